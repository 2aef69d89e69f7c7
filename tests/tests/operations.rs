//! Operations for real: Prometheus metrics against `status --json`, and structured entries in a
//! real journald (started in a private mount namespace). Root, real cgroups, real workers.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use belljar_testkit::daemon::{Daemon, all_in, instance, unique_parent};
use belljar_testkit::{TestDir, tiny_shape};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// `subject` and `other` serve a tiny model; `oomer` (in mode `withoom`) loads a model whose KV
/// cache does not fit under a limit of file size x 1.0, so it is OOM-killed until the breaker
/// trips (no budget room to grow: `per_instance_max`).
fn config(t: &TestDir) -> String {
    t.model("models/a.gguf", &tiny_shape());
    t.model("models/kv.gguf", &belljar_testkit::kv_heavy_shape(4096, 5));
    r#"
[budget]
estimate = "file"
estimate_factor = 1.0
min_required = "8MiB"

headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
stop_timeout = "5s"
backoff_initial = "0s"

[instances.subject]
ram_limit = "64MiB"

[instances.other]
ram_limit = "80MiB"
priority = 1

[instances.oomer]
model = "models/kv.gguf"
use_mmap = false
ctx = 4096
ram_limit = "12MiB"
start_limit_burst = 2

[modes.pair]
instances = ["subject", "other"]

[modes.withoom]
instances = ["subject", "oomer"]
"#
    .to_owned()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "operations tests create real cgroups: run them as root"
    );
}

fn scrape(addr: &str) -> (String, String) {
    let mut resp = ureq::get(&format!("http://{addr}/metrics")).call().unwrap();
    let ctype = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    (ctype, resp.body_mut().read_to_string().unwrap())
}

/// Sample values by metric name and sorted labels.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

fn samples(text: &str) -> Samples {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let mut out = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            other => panic!("unexpected sample {other:?}"),
        };
        out.insert((s.metric, labels), v);
    }
    out
}

fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    l.sort();
    *m.get(&(name.to_owned(), l.clone()))
        .unwrap_or_else(|| panic!("no sample {name}{l:?}"))
}

#[test]
fn metrics_parse_as_prometheus_text_and_equal_status() {
    require_root();
    let t = TestDir::new();
    let mut d = Daemon::start(
        &t,
        &config(&t),
        "pair",
        &[("BELLJAR_METRICS", "127.0.0.1:0")],
    );
    let s = d.wait_status("both ready", |s| all_in(s, "ready"));
    // One crash, so that restarts and last_exit have something to say.
    let pid = instance(&s, "subject")["pid"].as_u64().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let s = d.wait_status("subject restarted", |s| {
        instance(s, "subject")["restarts"] == 1 && all_in(s, "ready")
    });
    let addr = s["metrics_addr"]
        .as_str()
        .expect("metrics_addr in status --json");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert!(
        d.stderr().contains(&format!("http://{addr}/metrics")),
        "the bound address is logged"
    );

    let (ctype, text) = scrape(addr);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let m = samples(&text);
    for name in ["subject", "other"] {
        let i = instance(&s, name);
        let l = [("instance", name)];
        for (metric, field) in [
            ("belljar_instance_memory_limit_bytes", &i["memory"]["limit"]),
            (
                "belljar_instance_memory_reservation_bytes",
                &i["memory"]["reservation"],
            ),
            ("belljar_instance_allocated_bytes", &i["allocated"]),
            ("belljar_instance_restarts_total", &i["restarts"]),
            ("belljar_instance_oom_kills_total", &i["oom_kills"]),
        ] {
            assert_eq!(
                get(&m, metric, &l),
                field.as_u64().unwrap() as f64,
                "{metric} of {name}\n{text}"
            );
        }
        assert_eq!(
            get(
                &m,
                "belljar_instance_state",
                &[("instance", name), ("state", "ready")]
            ),
            1.0
        );
        assert_eq!(
            get(
                &m,
                "belljar_instance_state",
                &[("instance", name), ("state", "failed")]
            ),
            0.0
        );
        assert_eq!(get(&m, "belljar_instance_load_progress_ratio", &l), 1.0);
        assert_eq!(get(&m, "belljar_instance_thrashing", &l), 0.0);
    }
    assert_eq!(
        get(
            &m,
            "belljar_instance_last_exit",
            &[("instance", "subject"), ("reason", "signal:9")]
        ),
        1.0
    );
    assert_eq!(
        get(&m, "belljar_budget_usable_bytes", &[]),
        s["budget"]["usable"].as_u64().unwrap() as f64
    );
    assert_eq!(
        get(&m, "belljar_budget_allocated_bytes", &[]),
        s["budget"]["allocated"].as_u64().unwrap() as f64
    );
    assert_eq!(
        get(&m, "belljar_host_memory_total_bytes", &[]),
        s["host"]["total"].as_u64().unwrap() as f64
    );
    let level = s["host"]["level"].as_str().unwrap();
    assert_eq!(
        get(&m, "belljar_host_pressure_level", &[("level", level)]),
        1.0
    );

    // Anything but GET /metrics gets a clear answer, not the metrics.
    let err = ureq::get(&format!("http://{addr}/")).call().unwrap_err();
    assert!(matches!(err, ureq::Error::StatusCode(404)), "{err}");
    d.terminate();
}

#[test]
fn metrics_on_a_taken_port_is_refused_before_anything_starts() {
    require_root();
    let t = TestDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut d = Daemon::start(&t, &config(&t), "pair", &[("BELLJAR_METRICS", &addr)]);
    let status = d.wait();
    assert_eq!(status.code(), Some(1), "{}", d.stderr());
    assert!(
        d.stderr().contains("cannot serve metrics at"),
        "{}",
        d.stderr()
    );
    assert!(!d.parent().join("subject").exists(), "nothing was started");
}

#[test]
fn worker_output_is_rate_limited_per_instance_and_drops_are_counted() {
    require_root();
    let t = TestDir::new();
    let cfg = config(&t).replace(
        "[defaults]",
        "[logging]\nworker_output_burst = 5\nworker_output_interval = \"10s\"\n\n[defaults]",
    );
    let mut d = Daemon::start(&t, &cfg, "pair", &[("BELLJAR_WORKER_LOG", "info")]);
    let s = d.wait_status("both ready", |s| all_in(s, "ready"));
    let lines_of = |log: &str, name: &str| {
        log.lines()
            .filter(|l| {
                l.contains("belljar_worker:") && l.contains(&format!("instance=\"{name}\""))
            })
            .count()
    };
    // Forwarding is asynchronous: wait for the burst to arrive before counting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ["subject", "other"]
        .iter()
        .any(|n| lines_of(&d.stderr(), n) < 5)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let log = d.stderr();
    assert_eq!(
        lines_of(&log, "subject"),
        5,
        "a burst of 5, the rest of the load log dropped:\n{log}"
    );

    assert_eq!(
        lines_of(&log, "other"),
        5,
        "each instance has its own limit:\n{log}"
    );
    // A second run once a token has come back (5 per 10 s: one every 2 s): its first line is
    // preceded by the count of drops.
    std::thread::sleep(Duration::from_millis(2200));
    let pid = instance(&s, "subject")["pid"].as_u64().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    d.wait_status("subject restarted", |s| {
        instance(s, "subject")["restarts"] == 1 && all_in(s, "ready")
    });
    let log = d.stderr();
    let note = log
        .lines()
        .find(|l| l.contains("event=\"output-suppressed\"") && l.contains("instance=\"subject\""))
        .unwrap_or_else(|| panic!("no output-suppressed entry:\n{log}"));
    let dropped: u64 = note
        .split(" line(s)")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in: {note}"));
    assert!(dropped >= 20, "the load log is longer than 5 lines: {note}");
    d.terminate();
}

/// A journald of our own: a private mount namespace with tmpfs on /run/systemd and /run/log and
/// a volatile journald.conf bound over the system's. Killed (with its namespace) on drop.
struct Journal {
    child: Child,
}

impl Journal {
    fn start(t: &TestDir) -> Journal {
        for tool in [
            "/lib/systemd/systemd-journald",
            "/usr/bin/journalctl",
            "/usr/bin/unshare",
            "/usr/bin/nsenter",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: install systemd and util-linux"
            );
        }
        let conf = t.write(
            "journald.conf",
            "[Journal]\nStorage=volatile\nRateLimitBurst=0\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n",
        );
        let script = format!(
            "mkdir -p /run/systemd /run/log && mount -t tmpfs tmpfs /run/systemd && \
             mount -t tmpfs tmpfs /run/log && mount --bind {} /etc/systemd/journald.conf && \
             exec /lib/systemd/systemd-journald",
            conf.display()
        );
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let j = Journal { child };
        let socket = j.root().join("run/systemd/journal/socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "journald did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        j
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.child.id()))
    }

    /// `journalctl -o json MATCHES...` on our journal's files.
    fn query(&self, matches: &[&str]) -> Vec<Value> {
        let out = Command::new("journalctl")
            .arg("-D")
            .arg(self.root().join("run/log/journal"))
            .args(["-o", "json", "--no-pager"])
            .args(matches)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_for(
        &self,
        what: &str,
        matches: &[&str],
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let entries = self.query(matches);
            if pred(&entries) {
                return entries;
            }
            assert!(Instant::now() < deadline, "journal: {what}: {entries:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(e: &'a Value, name: &str) -> &'a str {
    e[name].as_str().unwrap_or("")
}

const EXITED: &str = "2912ddede29c441a9c870d0c160aa32e";
const OOM_KILL: &str = "db4f01205a8c4f648b234234efc761e2";
const RESTART_SCHEDULED: &str = "b32491e1b96e4ed4a86d0f879d2f99bb";

#[test]
fn serial_lifecycle_events_and_worker_output_reach_a_real_journald() {
    require_root();
    let t = TestDir::new();
    let journal = Journal::start(&t);
    let pid = journal.pid();
    let wrapper = ["nsenter", "-m", "-t", pid.as_str(), "--"];
    let mut d = Daemon::start_wrapped(
        &t,
        &config(&t),
        "withoom",
        &[
            ("BELLJAR_LOG_FORMAT", "journald"),
            ("BELLJAR_WORKER_LOG", "info"),
        ],
        unique_parent("journal"),
        &wrapper,
    );
    let s = d.wait_status("subject ready, oomer failed after its OOM kills", |s| {
        instance(s, "subject")["state"] == "ready" && instance(s, "oomer")["state"] == "failed"
    });
    let victim = instance(&s, "subject")["pid"].as_u64().unwrap();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let s = d.wait_status("subject restarted", |s| {
        instance(s, "subject")["restarts"] == 1 && instance(s, "subject")["state"] == "ready"
    });
    let ooms = instance(&s, "oomer")["oom_kills"].as_u64().unwrap();
    assert!(ooms >= 1, "{s}");
    assert!(
        d.stderr().is_empty(),
        "journald mode writes nothing to stderr: {}",
        d.stderr()
    );

    // The SIGKILL: one `exited` entry with the words of status, the pid and cgroup of the run.
    let exited = journal.wait_for(
        "subject's exit",
        &["INSTANCE=subject", &format!("MESSAGE_ID={EXITED}")],
        |e| !e.is_empty(),
    );
    let kill_entry = exited
        .iter()
        .find(|e| field(e, "PID") == victim.to_string())
        .unwrap_or_else(|| panic!("no exit of pid {victim}: {exited:#?}"));
    assert_eq!(field(kill_entry, "EVENT"), "exited");
    assert_eq!(field(kill_entry, "EXIT_REASON"), "signal:9");
    assert_eq!(field(kill_entry, "SYSLOG_IDENTIFIER"), "belljar");
    assert!(
        field(kill_entry, "CGROUP").ends_with("/subject"),
        "{kill_entry}"
    );
    assert_eq!(field(kill_entry, "RESTARTS"), "0");
    let restart = journal.query(&["INSTANCE=subject", "EVENT=restart-scheduled"]);
    assert_eq!(restart.len(), 1, "{restart:#?}");
    assert_eq!(field(&restart[0], "MESSAGE_ID"), RESTART_SCHEDULED);
    assert_eq!(field(&restart[0], "EXIT_REASON"), "signal:9");
    let spawned = journal.query(&["INSTANCE=subject", "EVENT=spawned"]);
    assert_eq!(
        spawned.len(),
        2,
        "the first start and the restart: {spawned:#?}"
    );
    assert_eq!(field(&spawned[1], "RESTARTS"), "1");

    // Every OOM kill, by its message id alone.
    let oom = journal.query(&[&format!("MESSAGE_ID={OOM_KILL}")]);
    assert_eq!(oom.len() as u64, ooms, "one entry per OOM kill: {oom:#?}");
    for (n, e) in oom.iter().enumerate() {
        assert_eq!(field(e, "INSTANCE"), "oomer");
        assert_eq!(field(e, "EVENT"), "oom-kill");
        assert_eq!(field(e, "EXIT_REASON"), "oom-kill");
        assert_eq!(field(e, "OOM_KILLS"), (n + 1).to_string());
        assert_eq!(field(e, "PRIORITY"), "4", "a warning");
    }
    let failed = journal.query(&["INSTANCE=oomer", "EVENT=failed"]);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(field(&failed[0], "EXIT_REASON"), "oom-kill");

    // Worker output: whole lines (each starts with the worker's level word) under
    // belljar-worker, tagged with the instance.
    let lines = journal.query(&["SYSLOG_IDENTIFIER=belljar-worker", "INSTANCE=subject"]);
    assert!(
        lines.len() >= 20,
        "llama.cpp logs its load at info: {lines:#?}"
    );
    for e in &lines {
        let msg = field(e, "MESSAGE");
        let head = msg.trim_start();
        assert!(
            ["TRACE ", "DEBUG ", "INFO ", "WARN ", "ERROR "]
                .iter()
                .any(|l| head.starts_with(l)),
            "a line cut or joined: {msg:?}"
        );
        assert!(!msg.contains('\n'), "{msg:?}");
        assert_eq!(field(e, "STREAM"), "stderr");
    }
    assert!(
        lines
            .iter()
            .any(|e| field(e, "MESSAGE").contains("llama.context_length")),
        "the model's metadata dump arrives"
    );
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    let stopped = journal.wait_for(
        "the stop",
        &["SYSLOG_IDENTIFIER=belljar", "EVENT=stopped"],
        |e| e.len() == 1,
    );
    assert_eq!(field(&stopped[0], "MESSAGE"), "stopped");
}
