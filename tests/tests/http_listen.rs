//! Where the HTTP API listens: `--http ADDR` / `[http] listen`, a taken port, an exposed address
//! without a key, the key file's checks. Root, real cgroups, the real supervisor.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::time::Duration;

use belljar_testkit::daemon::{Daemon, all_in};
use belljar_testkit::{TestDir, tiny_shape};

fn config(t: &TestDir, http: &str) -> String {
    t.model("models/a.gguf", &tiny_shape());
    format!(
        r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
worker_user = "root"

[instances.subject]
ram_limit = "96MiB"

[modes.single]
instances = ["subject"]
{http}
"#
    )
}

/// Waits for the daemon to exit on its own (it refused to start).
fn exits(d: &mut Daemon) -> i32 {
    for _ in 0..300 {
        if let Some(s) = d.child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the daemon did not exit; log:\n{}", d.stderr());
}

#[test]
fn an_explicit_address_that_is_taken_is_exit_1_and_nothing_starts() {
    let t = TestDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(&t, "");
    let mut d = Daemon::start(&t, &cfg, "single", &[("BELLJAR_HTTP", &addr)]);
    assert_eq!(exits(&mut d), 1, "log:\n{}", d.stderr());
    let log = d.stderr();
    assert!(
        log.contains(&format!("cannot serve the HTTP API at {addr}")) && log.contains("--http"),
        "{log}"
    );
    assert!(!log.contains("event=\"spawned\""), "nothing started: {log}");
    // The same from the config file.
    let t = TestDir::new();
    let cfg = config(&t, &format!("[http]\nlisten = \"{addr}\"\n"));
    let mut d = Daemon::start(&t, &cfg, "single", &[("BELLJAR_HTTP", "")]);
    assert_eq!(exits(&mut d), 1, "log:\n{}", d.stderr());
    drop(taken);
}

/// The default address (127.0.0.1:8080) taken by someone else: a warning, and the supervisor
/// runs without HTTP (`http_addr` null).
#[test]
fn serial_a_taken_default_port_warns_and_runs_without_http() {
    let t = TestDir::new();
    // Whoever holds 8080 already (another program, or this listener) makes it taken.
    let _holder = std::net::TcpListener::bind("127.0.0.1:8080");
    let cfg = config(&t, "");
    let mut d = Daemon::start(&t, &cfg, "single", &[("BELLJAR_HTTP", "")]);
    let s = d.wait_status("ready", |s| all_in(s, "ready"));
    assert!(s["http_addr"].is_null(), "{s}");
    let log = d.stderr();
    assert!(
        log.contains("cannot serve the HTTP API at the default 127.0.0.1:8080")
            && log.contains("running without it"),
        "{log}"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn http_off_serves_nothing_and_port_0_picks_a_free_port() {
    let t = TestDir::new();
    let cfg = config(&t, "");
    let mut d = Daemon::start(&t, &cfg, "single", &[("BELLJAR_HTTP", "off")]);
    let s = d.wait_status("ready", |s| all_in(s, "ready"));
    assert!(s["http_addr"].is_null(), "{s}");
    assert_eq!(d.terminate().code(), Some(0));
    let t = TestDir::new();
    let cfg = config(&t, "");
    let mut d = Daemon::start(&t, &cfg, "single", &[]);
    let addr = d.http_addr();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A non-loopback address without `api_key_file` is refused (exit 2), from the flag and from
/// the config; so is a key file others may read, or a short key.
#[test]
fn an_exposed_api_needs_a_private_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestDir::new();
    let cfg = config(&t, "");
    let mut d = Daemon::start(&t, &cfg, "single", &[("BELLJAR_HTTP", "0.0.0.0:0")]);
    assert_eq!(exits(&mut d), 2, "log:\n{}", d.stderr());
    assert!(d.stderr().contains("api_key_file"), "{}", d.stderr());

    let key = t.write("api.key", "0123456789abcdef0123\n");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let t2 = TestDir::new();
    let cfg = config(
        &t2,
        &format!("[http]\napi_key_file = \"{}\"\n", key.display()),
    );
    let mut d = Daemon::start(&t2, &cfg, "single", &[("BELLJAR_HTTP", "0.0.0.0:0")]);
    assert_eq!(exits(&mut d), 2, "log:\n{}", d.stderr());
    assert!(d.stderr().contains("chmod 600"), "{}", d.stderr());

    let short = t.write("short.key", "abc\n");
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t3 = TestDir::new();
    let cfg = config(
        &t3,
        &format!("[http]\napi_key_file = \"{}\"\n", short.display()),
    );
    let mut d = Daemon::start(&t3, &cfg, "single", &[]);
    assert_eq!(exits(&mut d), 2, "log:\n{}", d.stderr());
    assert!(d.stderr().contains("at least 16"), "{}", d.stderr());

    // A private key file: an exposed listener starts, and wants the key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t4 = TestDir::new();
    let cfg = config(
        &t4,
        &format!("[http]\napi_key_file = \"{}\"\n", key.display()),
    );
    let mut d = Daemon::start(&t4, &cfg, "single", &[("BELLJAR_HTTP", "0.0.0.0:0")]);
    d.wait_status("ready", |s| all_in(s, "ready"));
    let port = d.http_addr().rsplit(':').next().unwrap().to_owned();
    let get = |auth: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        write!(
            s,
            "GET /v1/models HTTP/1.1\r\nHost: box.lan:{port}\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    assert!(get("").starts_with("HTTP/1.1 401"));
    assert!(get("Authorization: Bearer 0123456789abcdef0123\r\n").starts_with("HTTP/1.1 200"));
    assert_eq!(d.terminate().code(), Some(0));
}
