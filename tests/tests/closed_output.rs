//! A closed stdout/stderr (`supervisor run 2>&1 | tee log`, and tee dies first on Ctrl-C) must
//! never stop the supervisor, least of all in the middle of its shutdown.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::process::Stdio;

use belljar_testkit::daemon::{Daemon, all_in};
use belljar_testkit::{TestDir, tiny_shape};

const CONFIG: &str = r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
heartbeat_interval = "200ms"
stop_timeout = "5s"

[instances.a]
ram_limit = "96MiB"

[instances.b]
ram_limit = "96MiB"

[modes.two]
instances = ["a", "b"]
"#;

#[test]
fn a_closed_log_stream_never_stops_the_shutdown() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    t.model("models/a.gguf", &tiny_shape());
    // A pipe whose reader is gone: every write to it fails with EPIPE (or SIGPIPE).
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = Stdio::from(writer.try_clone().unwrap());
    let mut d = Daemon::start_with_output(&t, CONFIG, "two", out, Stdio::from(writer));
    d.wait_status("both instances ready", |s| all_in(s, "ready"));
    let parent = d.parent();
    for name in ["a", "b"] {
        assert!(parent.join(name).is_dir(), "{name}'s cgroup exists");
    }
    d.signal(nix::sys::signal::Signal::SIGINT);
    let exit = d.wait();
    assert_eq!(exit.code(), Some(0), "the supervisor exits 0: {exit}");
    for name in ["a", "b"] {
        assert!(
            !parent.join(name).exists(),
            "{name}'s cgroup was removed at shutdown"
        );
    }
}
