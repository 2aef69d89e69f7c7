//! Resource limits against a local attacker: connection floods (issue 16, defect 5) and a second
//! supervisor on the same cgroup parent (defect 6). Root, real cgroups, real workers.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use belljar_testkit::daemon::{Daemon, all_in, instance};
use belljar_testkit::{TestDir, tiny_shape};

/// The flood helper's environment: the address to flood, and for how long.
const FLOOD_ADDR: &str = "BELLJAR_TEST_FLOOD_ADDR";
const FLOOD_SECS: &str = "BELLJAR_TEST_FLOOD_SECS";
/// Connections the attacker keeps open: more than a soft open-files limit of 1024.
const FLOOD_CONNECTIONS: usize = 1500;

fn config(t: &TestDir) -> String {
    t.model("models/a.gguf", &tiny_shape());
    r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
stop_timeout = "5s"

[instances.a]
ram_limit = "64MiB"

[instances.b]
ram_limit = "64MiB"

[modes.pair]
instances = ["a", "b"]
"#
    .to_owned()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create real cgroups: run them as root"
    );
}

/// Not a test on its own: the attacker, re-executed by [`connection_floods_...`] as `nobody`.
/// It keeps up to [`FLOOD_CONNECTIONS`] TCP connections open to the address (reopening any the
/// supervisor closes, as many as its listen queue takes), says `flooding` once the first round
/// is open, and ends after the time.
#[test]
fn flood_helper() {
    let (Ok(addr), Ok(secs)) = (std::env::var(FLOOD_ADDR), std::env::var(FLOOD_SECS)) else {
        return;
    };
    let addr: SocketAddr = addr.parse().unwrap();
    // An unprivileged process may raise its own soft limit up to the hard one.
    raise_own_nofile();
    let end = Instant::now() + Duration::from_secs(secs.parse().unwrap());
    let mut conns: Vec<Option<TcpStream>> = (0..FLOOD_CONNECTIONS).map(|_| None).collect();
    let mut announced = false;
    while Instant::now() < end {
        let mut open = 0;
        let mut queue_full = false;
        for c in &mut conns {
            let alive = c.as_ref().is_some_and(|s| {
                let mut b = [0u8; 1];
                s.set_nonblocking(true).unwrap();
                matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            // Once the listen queue is full, the rest of this round would only time out.
            if !alive && !queue_full {
                *c = TcpStream::connect_timeout(&addr, Duration::from_millis(50)).ok();
                queue_full = c.is_none();
            }
            open += usize::from(c.is_some());
        }
        // A few rounds first: without a cap the supervisor takes all it can.
        if !announced
            && Instant::now() + Duration::from_secs(secs.parse::<u64>().unwrap() - 2) > end
        {
            println!("flooding with {open} connections");
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn raise_own_nofile() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap()
        .to_owned();
    let pid = std::process::id().to_string();
    let ok = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .unwrap();
    assert!(ok.success(), "prlimit");
}

/// `(soft, hard)` open-files limits of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let l = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = l.split_whitespace().collect();
    (f[3].to_owned(), f[4].to_owned())
}

/// Run twice: started as systemd and most shells start services (a soft open-files limit of
/// 1024, the hard one ours: raising it may need CAP_SYS_RESOURCE, which a container may lack),
/// where raising the limit protects; and with a hard limit of 1024 too, where only the
/// per-listener caps do (1500 connections would exhaust it without them).
#[test]
fn connection_floods_leave_status_and_restart_working_and_nothing_failed() {
    require_root();
    let hard = nofile(std::process::id()).1;
    flood_with_limit(&hard);
    flood_with_limit("1024");
}

fn flood_with_limit(hard: &str) {
    let t = TestDir::new();
    let hard = hard.to_owned();
    let wrapper = format!("--nofile=1024:{hard}");
    let mut d = Daemon::start_wrapped(
        &t,
        &config(&t),
        "pair",
        &[("BELLJAR_METRICS", "127.0.0.1:0")],
        belljar_testkit::daemon::unique_parent("flood"),
        &["prlimit", &wrapper, "--"],
    );
    let s = d.wait_status("both ready", |s| all_in(s, "ready"));
    // The supervisor raised its soft limit to the hard one at start.
    assert_eq!(nofile(d.child.id()), (hard.clone(), hard));
    let addr = s["metrics_addr"].as_str().unwrap().to_owned();

    // `nobody` floods the metrics port...
    let mut attacker = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "flood_helper", "--nocapture", "--test-threads=1"])
        .env(FLOOD_ADDR, &addr)
        .env(FLOOD_SECS, "40")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(attacker.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("flooding") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the attacker ended");
    }
    eprintln!("attacker: {}", line.trim());
    // ...and a client that may use the control socket holds idle connections to it.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(d.runtime.join("control.sock")).unwrap())
        .collect();

    let s = d.status().expect("status answers during the flood");
    assert!(all_in(&s, "ready"), "{s}");
    d.cli(&["restart", "b"]).expect_code(0);
    let s = d.wait_status("b ready again", |s| {
        instance(s, "b")["restarts"] == 1 && all_in(s, "ready")
    });
    for i in s["instances"].as_array().unwrap() {
        assert_ne!(i["state"], "failed", "{s}");
    }
    assert!(
        !d.stderr().contains("Too many open files"),
        "{}",
        d.stderr()
    );
    drop(idle);
    let _ = attacker.kill();
    let _ = attacker.wait();
    // The metrics port serves again once the flood is over.
    let resp = belljar_testkit::wait_for("a scrape", Duration::from_secs(20), || {
        ureq::get(&format!("http://{addr}/metrics")).call().ok()
    });
    assert_eq!(resp.status(), 200);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_second_supervisor_on_the_same_cgroup_parent_is_refused_and_harms_nothing() {
    require_root();
    let (t1, t2) = (TestDir::new(), TestDir::new());
    let parent = belljar_testkit::daemon::unique_parent("shared");
    let mut first = Daemon::start_with_parent(&t1, &config(&t1), "pair", &[], parent.clone());
    let s = first.wait_status("both ready", |s| all_in(s, "ready"));
    let pids: Vec<u64> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();

    // Its own runtime and state dirs, the same cgroup parent.
    let mut second = Daemon::start_with_parent(&t2, &config(&t2), "pair", &[], parent);
    let code = second.wait();
    assert_eq!(code.code(), Some(1), "{}", second.stderr());
    let err = second.stderr();
    assert!(
        err.contains(&format!(
            "another supervisor (pid {}) already manages the cgroup parent",
            first.child.id()
        )),
        "{err}"
    );
    assert!(!err.contains("removing a leftover"), "{err}");

    // The first one's workers live on, untouched.
    std::thread::sleep(Duration::from_millis(500));
    let s = first.status().unwrap();
    assert!(all_in(&s, "ready"), "{s}");
    let now: Vec<u64> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(now, pids, "the same workers");
    assert_eq!(first.terminate().code(), Some(0));
}
