//! The official `openai` Python SDK against a real daemon serving SmolLM2-135M-Instruct
//! (tests/py/openai_e2e.py): what a user's client library sees, end to end, on a real model.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use belljar_testkit::daemon::{Daemon, all_in};
use belljar_testkit::real::{python, real_model, subject_config};
use belljar_testkit::{TestDir, run_cmd};

#[test]
fn the_openai_sdk_lists_chats_streams_stops_and_counts_usage_on_smollm2() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let model = real_model("smollm2-135m-instruct");
    let mut d = Daemon::start(&t, &subject_config(&model, 2048, "512MiB"), "single", &[]);
    d.wait_status_for("subject ready", Duration::from_secs(120), |s| {
        all_in(s, "ready")
    });
    let addr = d.http_addr();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/openai_e2e.py");
    let started = Instant::now();
    let r = run_cmd(
        Command::new(python())
            .arg(&script)
            .arg(format!("http://{addr}/v1"))
            .arg("subject"),
    );
    eprintln!(
        "openai_e2e.py ({:.1} s):\n{}{}",
        started.elapsed().as_secs_f64(),
        r.stdout,
        r.stderr
    );
    assert_eq!(
        r.code,
        Some(0),
        "openai_e2e.py failed\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        r.stdout,
        r.stderr,
        d.stderr()
    );
    assert!(r.stdout.contains("all checks passed"), "{}", r.stdout);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
}
