//! [swap] for real: more on-demand instances than fit, on real cgroups with real workers on
//! generated models, driven by HTTP requests. `[budget] total` is set from the instances' own
//! reservations (as `supervisor validate` computes them) so that any two of three fit and three
//! do not; what the ledger decides is then checked against what the kernel saw (the parent
//! cgroup's peak, its child cgroups, the OOM counters) and against the log's events.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use belljar_host::cgroup::Version;
use belljar_testkit::daemon::{Daemon, instance};
use belljar_testkit::http::{self, Reply};
use belljar_testkit::{ModelShape, TestDir, kv_heavy_shape, wait_for};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// The models' context: their KV cache (4 MiB per 1024 cells, allocated and cleared at load)
/// is most of their reservation, their file (~16 MiB, read without mmap) the rest. A small file
/// keeps the page cache an evicted worker leaves behind in the parent small against the
/// reservations.
const CTX: u32 = 8192;

fn shape(seed: u64) -> ModelShape {
    kv_heavy_shape(CTX, seed)
}

/// What most tests add to `[defaults]`.
const DEFAULTS: &str = "min_loaded = \"1s\"\nidle_unload = \"never\"";

/// The instances of a swap test: each its own model, on demand, one thread, no mmap.
/// `names` gives each instance's own keys, `defaults` more `[defaults]` keys; `total` is
/// `[budget] total` in bytes.
fn config(t: &TestDir, names: &[(&str, &str)], total: u64, defaults: &str) -> String {
    let mut s = format!(
        r#"
[budget]
total = "{total}"
per_instance_max = 1.0
min_required = "8MiB"
headroom = "64MiB"

[defaults]
ctx = {CTX}
use_mmap = false
threads = 1
load = "on-demand"
{defaults}
heartbeat_interval = "100ms"
backoff_initial = "50ms"
backoff_max = "1s"
stop_timeout = "5s"
"#
    );
    for (i, (name, keys)) in names.iter().enumerate() {
        let model = format!("models/{name}.gguf");
        if !t.join(&model).is_file() {
            t.model(&model, &shape(100 + i as u64));
        }
        s.push_str(&format!(
            "\n[instances.{name}]\nmodel = \"{model}\"\n{keys}\n"
        ));
    }
    let list: Vec<String> = names.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    s.push_str(&format!("\n[modes.m]\ninstances = [{}]\n", list.join(", ")));
    s
}

/// Each instance's reservation (`required`), as `supervisor validate --json` computes it.
fn reservations(t: &TestDir, names: &[(&str, &str)]) -> BTreeMap<String, u64> {
    let path = t.write("validate.toml", &config(t, names, 64 << 30, DEFAULTS));
    let r = belljar_testkit::run(
        "supervisor",
        &[
            "validate",
            "--config",
            path.to_str().unwrap(),
            "--mode",
            "m",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("validate --json ({e}): {}\n{}", r.stdout, r.stderr));
    v["modes"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["required"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A daemon whose `[budget] total` holds `fit` of the instances (they all reserve about the
/// same) and not one more: `fit` times the largest reservation plus half of the smallest.
struct Swap {
    /// The temp dir, kept while the daemon uses it.
    _t: TestDir,
    d: Daemon,
    addr: String,
    total: u64,
    required: BTreeMap<String, u64>,
}

impl Swap {
    fn start(names: &[(&str, &str)], fit: u64, defaults: &str) -> Swap {
        assert!(
            nix::unistd::geteuid().is_root(),
            "swap tests create real cgroups: run them as root"
        );
        let t = TestDir::new();
        let required = reservations(&t, names);
        let max = *required.values().max().unwrap();
        let min = *required.values().min().unwrap();
        let total = fit * max + min / 2;
        assert!(
            total < (fit + 1) * min,
            "the reservations differ too much for {fit} and only {fit} to fit: {required:?}"
        );
        let mut d = Daemon::start(&t, &config(&t, names, total, defaults), "m", &[]);
        let s = d.wait_status("every instance unloaded", |s| {
            s["instances"].as_array().is_some_and(|a| {
                a.len() == names.len() && a.iter().all(|i| i["state"] == "unloaded")
            })
        });
        for i in s["instances"].as_array().unwrap() {
            assert_eq!(i["allocated"], 0, "unloaded holds nothing: {i}");
            assert_eq!(i["load"], "on-demand", "{i}");
        }
        let addr = d.http_addr();
        Swap {
            _t: t,
            d,
            addr,
            total,
            required,
        }
    }

    fn status(&self) -> Value {
        let r = http::get(&self.addr, "/api/status");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    fn log(&self) -> String {
        self.d.stderr()
    }
}

/// A greedy chat completion of exactly `n` tokens for `model`.
fn chat(model: &str, n: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// POSTs a chat completion; panics with the log when no answer comes.
#[track_caller]
fn post(addr: &str, body: &Value) -> Reply {
    let bytes = http::request_bytes(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    http::raw(addr, &bytes).unwrap_or_else(|| panic!("no answer to {body}"))
}

/// A whole answer of `n` tokens from `model`; panics with the log otherwise.
#[track_caller]
fn ask(s: &Swap, model: &str, n: u32) -> Value {
    let r = post(&s.addr, &chat(model, n));
    assert_eq!(
        r.status,
        200,
        "{model}: {}\nstatus: {:#}\nlog:\n{}",
        r.text(),
        s.status(),
        s.log()
    );
    let v = r.json();
    assert_eq!(v["model"], model, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], n, "{v}");
    v
}

/// One event of the supervisor's text log: `event="E"` of `instance="I"`, with its line.
#[derive(Debug, Clone)]
struct Ev {
    event: String,
    instance: String,
    line: String,
}

fn field(line: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

fn events(log: &str) -> Vec<Ev> {
    log.lines()
        .filter_map(|l| {
            Some(Ev {
                event: field(l, "event")?,
                instance: field(l, "instance").unwrap_or_default(),
                line: l.to_owned(),
            })
        })
        .collect()
}

fn count(evs: &[Ev], event: &str, instance: &str) -> usize {
    evs.iter()
        .filter(|e| e.event == event && e.instance == instance)
        .count()
}

/// The parent cgroup's peak usage: `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2).
fn parent_peak(d: &Daemon) -> u64 {
    let file = match d.cgroups.version() {
        Version::V1 => "memory.max_usage_in_bytes",
        Version::V2 => "memory.peak",
    };
    read_u64(&d.parent().join(file))
}

/// The parent cgroup's OOM-kill counter: `oom_kill` in `memory.oom_control` (v1, counted in the
/// killed task's own cgroup only) or `memory.events` (v2, counted up the tree).
fn parent_oom_kills(d: &Daemon) -> u64 {
    let file = match d.cgroups.version() {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events",
    };
    let path = d.parent().join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no oom_kill line in {}", path.display()))
}

fn read_u64(path: &PathBuf) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Watches the parent's child cgroups through inotify (a Python helper with ctypes: the tests
/// have no inotify binding): each `mkdir` and `rmdir` of an instance cgroup, in the kernel's
/// order.
struct Watch {
    child: std::process::Child,
}

const INOTIFY: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
IN_CREATE, IN_DELETE = 0x100, 0x200
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), IN_CREATE | IN_DELETE) < 0:
    sys.exit("inotify: errno %d" % ctypes.get_errno())
print("ready", flush=True)
while True:
    buf = os.read(fd, 65536)
    i = 0
    while i < len(buf):
        _, mask, _, n = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode()
        print("create" if mask & IN_CREATE else "delete", name, flush=True)
        i += 16 + n
"#;

impl Watch {
    fn start(parent: &Path) -> Watch {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args(["-c", INOTIFY])
            .arg(parent)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the inotify helper started");
        Watch { child }
    }

    /// Every `create NAME` / `delete NAME` seen so far, in order.
    fn finish(mut self) -> Vec<(String, String)> {
        use std::io::Read;
        // It prints each event as it comes: what it printed is in the pipe.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect()
    }
}

/// The acceptance run: 60 round-robin requests over three on-demand instances of which two
/// fit. Every one is answered; the kernel never sees more than the budget nor an OOM kill; each
/// eviction takes the least recently used instance; a victim's cgroup is gone before the
/// newcomer's exists. `serial_`: it reads the machine-wide OOM counter (on v1 a kill is counted
/// only in the killed task's own cgroup, which an eviction removes).
#[test]
fn serial_sixty_round_robin_requests_over_three_on_demand_instances_of_which_two_fit() {
    let names = ["a", "b", "c"];
    let s = Swap::start(&[("a", ""), ("b", ""), ("c", "")], 2, DEFAULTS);
    let oom_before = belljar_testkit::kernel_oom_kills();
    let parent_oom_before = parent_oom_kills(&s.d);
    let watch = Watch::start(&s.d.parent());
    let started = Instant::now();
    for k in 0..60 {
        ask(&s, names[k % 3], 4);
    }
    let took = started.elapsed();
    let cgroup_events = watch.finish();
    let status = s.status();
    let log = s.log();
    let evs = events(&log);
    eprintln!(
        "60 requests in {took:?}; total {} MiB; reservations {:?}; parent peak {} MiB",
        s.total / MIB,
        s.required,
        parent_peak(&s.d) / MIB
    );

    // The kernel's view.
    let peak = parent_peak(&s.d);
    assert!(
        peak <= s.total,
        "the parent's peak {peak} is above [budget] total {}",
        s.total
    );
    assert_eq!(
        belljar_testkit::kernel_oom_kills(),
        oom_before,
        "no OOM kill: {log}"
    );
    assert_eq!(parent_oom_kills(&s.d), parent_oom_before);
    // The kernel's order of mkdir and rmdir: a newcomer's cgroup is made only once a victim's
    // is gone, so there are never three.
    let mut live: Vec<&str> = Vec::new();
    let mut made = 0;
    for (what, name) in &cgroup_events {
        match what.as_str() {
            "create" => {
                assert!(
                    live.len() < 2,
                    "{name}'s cgroup was made while {live:?} existed: {cgroup_events:?}"
                );
                live.push(name);
                made += 1;
            }
            _ => live.retain(|n| n != name),
        }
    }
    assert_eq!(made, 60, "one cgroup per load: {cgroup_events:?}");

    // The supervisor's view: 60 loads (two first loads, then one per request), 58 evictions.
    let mut loads = 0;
    let mut evictions = 0;
    for n in names {
        let i = instance(&status, n);
        assert_eq!(i["oom_kills"], 0, "{i}");
        assert_eq!(i["queued"], 0, "{i}");
        loads += i["loads"].as_u64().unwrap();
        evictions += i["evictions"].as_u64().unwrap();
        assert_eq!(
            i["loads"].as_u64().unwrap() as usize,
            count(&evs, "spawned", n),
            "one spawn per load of {n}"
        );
    }
    assert_eq!(loads, 60, "{status:#}");
    assert_eq!(evictions, 58, "{status:#}");
    assert_eq!(
        status["budget"]["allocated"].as_u64().unwrap(),
        s.required["b"] + s.required["c"],
        "b and c (the last two asked) are loaded: {status:#}"
    );

    // The order: request k (k >= 2) for names[k % 3] evicts the least recently used, the one
    // asked two requests before it, names[(k + 1) % 3]; its `evicted` comes before the
    // newcomer's `spawned`.
    let evicted: Vec<&Ev> = evs.iter().filter(|e| e.event == "evicted").collect();
    assert_eq!(evicted.len(), 58, "{log}");
    for (j, e) in evicted.iter().enumerate() {
        let k = j + 2;
        let (victim, newcomer) = (names[(k + 1) % 3], names[k % 3]);
        assert_eq!(
            e.instance, victim,
            "eviction {j} for request {k}: {}",
            e.line
        );
        assert!(
            e.line
                .contains(&format!("evicted to make room for {newcomer}")),
            "{}",
            e.line
        );
    }
    let spawned: Vec<usize> = evs
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "spawned")
        .map(|(i, _)| i)
        .collect();
    let evicted_at: Vec<usize> = evs
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "evicted")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(spawned.len(), 60);
    for (j, at) in evicted_at.iter().enumerate() {
        assert!(
            *at < spawned[j + 2],
            "the eviction for request {} is logged before its spawn",
            j + 2
        );
        if j > 0 {
            assert!(
                spawned[j + 1] < *at,
                "one swap at a time: request {}'s spawn before eviction {j}",
                j + 1
            );
        }
    }
}

/// A pinned on-demand instance stays loaded while the other two swap, although it is the least
/// recently used whenever room is made (it was asked first and then only every third time).
#[test]
fn a_pinned_instance_is_never_evicted_while_the_others_swap() {
    let names = ["a", "b", "c"];
    let s = Swap::start(&[("a", "pinned = true"), ("b", ""), ("c", "")], 2, DEFAULTS);
    for k in 0..9 {
        ask(&s, names[k % 3], 4);
    }
    let status = s.status();
    let a = instance(&status, "a");
    assert_eq!(a["pinned"], true, "{a}");
    assert_eq!(a["evictions"], 0, "{status:#}");
    assert_eq!(a["loads"], 1, "{status:#}");
    assert_eq!(a["state"], "ready", "{status:#}");
    // b and c took turns: every request for one of them after the first two evicted the other.
    let (b, c) = (instance(&status, "b"), instance(&status, "c"));
    assert_eq!(b["loads"], 3, "{status:#}");
    assert_eq!(c["loads"], 3, "{status:#}");
    assert_eq!(
        b["evictions"].as_u64().unwrap() + c["evictions"].as_u64().unwrap(),
        5,
        "{status:#}"
    );
    let evs = events(&s.log());
    assert_eq!(count(&evs, "evicted", "a"), 0);
}

/// Streams a long answer from `model` on a thread: it says when the first event came, and
/// returns the whole answer's text events and when the stream ended.
fn long_stream(
    addr: &str,
    model: &str,
    n: u32,
    first: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<(Vec<http::SseEvent>, Instant)> {
    let addr = addr.to_owned();
    let model = model.to_owned();
    std::thread::spawn(move || {
        let mut body = chat(&model, n);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let mut st = http::stream(&addr, "/v1/chat/completions", &body);
        st.expect_status(200);
        let mut evs = vec![st.next_event().expect("a first event")];
        first.send(model).unwrap();
        evs.extend(st.events());
        (evs, Instant::now())
    })
}

/// The usage of a streamed answer that ran to its end (`[DONE]` after a usage chunk).
#[track_caller]
fn completed(evs: &[http::SseEvent]) -> Value {
    assert_eq!(
        evs.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "the stream ran to its end: {:?}",
        evs.last()
    );
    let mut usage = None;
    for e in &evs[..evs.len() - 1] {
        let v = e.json();
        assert!(v.get("error").is_none(), "an error in the stream: {v}");
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    usage.expect("a usage chunk")
}

/// A busy instance is never evicted: with a and b both generating long answers, a request for
/// c waits (unloaded, queued) and is answered once one of them has finished; both long answers
/// run to their last token and neither is loaded twice.
#[test]
fn busy_instances_are_never_evicted_a_request_for_a_third_waits_then_succeeds() {
    const LONG: u32 = 500;
    let s = Swap::start(&[("a", ""), ("b", ""), ("c", "")], 2, DEFAULTS);
    let (tx, rx) = std::sync::mpsc::channel();
    let ta = long_stream(&s.addr, "a", LONG, tx.clone());
    // One at a time: a load while the other generates is the case of interest, not two loads.
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let tb = long_stream(&s.addr, "b", LONG, tx);
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let addr = s.addr.clone();
    let tc = std::thread::spawn(move || {
        let r = post(&addr, &chat("c", 4));
        (r, Instant::now())
    });
    let waiting = wait_for(
        "c queued and waiting for room",
        Duration::from_secs(30),
        || {
            let st = s.status();
            let c = instance(&st, "c");
            (c["state"] == "unloaded" && c["queued"].as_u64().unwrap() >= 1).then_some(st)
        },
    );
    for n in ["a", "b"] {
        let i = instance(&waiting, n);
        assert_eq!(i["state"], "ready", "{waiting:#}");
        assert_eq!(i["evictions"], 0, "{waiting:#}");
    }
    let (ea, a_done) = ta.join().unwrap();
    let (eb, b_done) = tb.join().unwrap();
    let (rc, c_done) = tc.join().unwrap();
    assert_eq!(rc.status, 200, "{}\nlog:\n{}", rc.text(), s.log());
    assert!(
        c_done > a_done.min(b_done),
        "c is answered only after a or b finished"
    );
    for (n, evs) in [("a", &ea), ("b", &eb)] {
        let u = completed(evs);
        assert_eq!(u["completion_tokens"], LONG, "{n}: {u}");
    }
    let status = s.status();
    for n in ["a", "b"] {
        assert_eq!(instance(&status, n)["loads"], 1, "{n}: {status:#}");
    }
    let evictions: u64 = ["a", "b"]
        .iter()
        .map(|n| instance(&status, n)["evictions"].as_u64().unwrap())
        .sum();
    assert_eq!(evictions, 1, "one of them made room for c: {status:#}");
    let log = s.log();
    assert!(!log.contains("event=\"request-retried\""), "{log}");
    assert!(!log.contains("event=\"request-failed\""), "{log}");
}

/// Two (and then four) concurrent requests for the same unloaded instance start one load.
#[test]
fn concurrent_requests_for_the_same_unloaded_instance_start_one_load() {
    let s = Swap::start(&[("a", ""), ("b", "")], 2, DEFAULTS);
    for (model, clients) in [("a", 2), ("b", 4)] {
        let barrier = Arc::new(Barrier::new(clients));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let addr = s.addr.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    post(&addr, &chat(model, 4))
                })
            })
            .collect();
        for t in threads {
            let r = t.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let status = s.status();
        assert_eq!(instance(&status, model)["loads"], 1, "{status:#}");
        assert_eq!(count(&events(&s.log()), "spawned", model), 1, "{}", s.log());
    }
}

/// A just-loaded instance is busy until the request that triggered its load is dispatched:
/// never used, it would otherwise be the first victim by the ordering (never used goes first).
/// And a request that arrives for a victim while it is being evicted waits and is served by its
/// next load. `min_loaded = "0s"`, so that only the rule itself protects the newcomer.
#[test]
fn a_just_loaded_instance_serves_its_request_and_a_request_for_a_victim_is_served_after() {
    let s = Swap::start(
        &[("a", ""), ("b", ""), ("c", "")],
        2,
        "min_loaded = \"0s\"\nidle_unload = \"never\"",
    );
    ask(&s, "a", 4);
    ask(&s, "b", 4);
    // c evicts a (least recently used); a's request comes while a stops.
    let addr = s.addr.clone();
    let tc = std::thread::spawn(move || post(&addr, &chat("c", 4)));
    // Its stop takes a few ms: on a loaded machine the poll may see it evicted already, and the
    // request then tests the load after an eviction only (said on stderr).
    let stopping = wait_for("a stopping for c", Duration::from_secs(30), || {
        let a = s.status();
        let a = instance(&a, "a");
        if a["state"] == "stopping" {
            Some(true)
        } else {
            (a["evictions"] == 1).then_some(false)
        }
    });
    eprintln!("a's request sent while a was stopping: {stopping}");
    let addr = s.addr.clone();
    let ta = std::thread::spawn(move || post(&addr, &chat("a", 4)));
    for (n, t) in [("c", tc), ("a", ta)] {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{n}: {}\nlog:\n{}", r.text(), s.log());
    }
    let status = s.status();
    let c = instance(&status, "c");
    assert_eq!(
        c["loads"], 1,
        "c served its request before anything could evict it: {status:#}"
    );
    assert_eq!(c["evictions"], 0, "{status:#}");
    let a = instance(&status, "a");
    assert_eq!(a["loads"], 2, "{status:#}");
    assert_eq!(a["evictions"], 1, "{status:#}");
    assert_eq!(
        instance(&status, "b")["evictions"],
        1,
        "b made room for a: {status:#}"
    );
    let evs = events(&s.log());
    let evicted: Vec<(&str, &str)> = evs
        .iter()
        .filter(|e| e.event == "evicted")
        .map(|e| (e.instance.as_str(), e.line.as_str()))
        .collect();
    assert_eq!(evicted.len(), 2, "{evicted:?}");
    assert!(
        evicted[0].0 == "a" && evicted[0].1.contains("room for c"),
        "{evicted:?}"
    );
    assert!(
        evicted[1].0 == "b" && evicted[1].1.contains("room for a"),
        "{evicted:?}"
    );
}

/// Many clients asking the three instances at once, `min_loaded = "0s"`: every request is
/// answered, and every load serves at least one request before its instance is evicted (so
/// there are no more loads than requests).
#[test]
fn concurrent_round_robin_clients_with_no_min_loaded_are_all_answered() {
    const CLIENTS: usize = 6;
    const EACH: usize = 4;
    let names = ["a", "b", "c"];
    let s = Swap::start(
        &[("a", ""), ("b", ""), ("c", "")],
        2,
        "min_loaded = \"0s\"\nidle_unload = \"never\"",
    );
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = s.addr.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                (0..EACH)
                    .map(|k| post(&addr, &chat(names[(i + k) % 3], 4)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for r in t.join().unwrap() {
            assert_eq!(r.status, 200, "{}\nlog:\n{}", r.text(), s.log());
        }
    }
    let status = s.status();
    let loads: u64 = names
        .iter()
        .map(|n| instance(&status, n)["loads"].as_u64().unwrap())
        .sum();
    assert!(
        loads as usize <= CLIENTS * EACH,
        "{loads} loads for {} requests: {status:#}",
        CLIENTS * EACH
    );
    assert!(!s.log().contains("event=\"request-retried\""));
}

/// `idle_unload = "2s"` (from `[defaults]`): an instance unloads about two seconds after its
/// last request, with `idle-unloaded`; one that overrides it with `"never"` stays.
#[test]
fn an_idle_instance_unloads_after_idle_unload_and_never_keeps_it() {
    let mut s = Swap::start(
        &[("quick", ""), ("kept", "idle_unload = \"never\"")],
        2,
        "min_loaded = \"1s\"\nidle_unload = \"2s\"",
    );
    ask(&s, "kept", 4);
    ask(&s, "quick", 4);
    let answered = Instant::now();
    let st =
        s.d.wait_status_for("quick unloaded", Duration::from_secs(15), |st| {
            instance(st, "quick")["state"] == "unloaded"
        });
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_secs(6),
        "unloaded {after:?} after its last answer, idle_unload 2s"
    );
    assert_eq!(instance(&st, "quick")["allocated"], 0, "{st:#}");
    assert_eq!(instance(&st, "quick")["evictions"], 0, "{st:#}");
    let evs = events(&s.log());
    assert_eq!(count(&evs, "idle-unloaded", "quick"), 1, "{}", s.log());
    // kept was last used before quick: had it taken the default it would be gone by now.
    // Absence can only be watched: a second more.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let st = s.status();
        assert_eq!(instance(&st, "kept")["state"], "ready", "{st:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&events(&s.log()), "idle-unloaded", "kept"), 0);
    assert_eq!(
        s.status()["budget"]["allocated"].as_u64().unwrap(),
        s.required["kept"]
    );
    // Its next request loads it again.
    ask(&s, "quick", 4);
    assert_eq!(instance(&s.status(), "quick")["loads"], 2);
}

/// Thrash: two instances that cannot both fit, a client for each asking back to back for
/// `SECONDS`. Every request is answered, and the loads are bounded by `min_loaded`: each load
/// after the first needs the other instance evicted (only one fits), and that one cannot go
/// sooner than `min_loaded` after its own load, which came after the previous load. So loads
/// are at least `min_loaded` apart: loads <= duration / min_loaded + 1, the duration taken from
/// the first request to the last answer.
#[test]
fn two_instances_that_cannot_both_fit_alternate_without_thrashing() {
    const SECONDS: u64 = 8;
    let s = Swap::start(&[("a", ""), ("b", "")], 1, DEFAULTS);
    let start = Instant::now();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|model| {
            let addr = s.addr.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut answers = Vec::new();
                while start.elapsed() < Duration::from_secs(SECONDS) {
                    answers.push(post(&addr, &chat(model, 4)));
                }
                answers
            })
        })
        .collect();
    let mut per_client = Vec::new();
    for t in threads {
        let answers = t.join().unwrap();
        for r in &answers {
            assert_eq!(r.status, 200, "{}\nlog:\n{}", r.text(), s.log());
        }
        per_client.push(answers.len());
    }
    let duration = start.elapsed().as_secs_f64();
    let status = s.status();
    let loads: u64 = ["a", "b"]
        .iter()
        .map(|n| instance(&status, n)["loads"].as_u64().unwrap())
        .sum();
    eprintln!("{per_client:?} answers, {loads} loads in {duration:.1} s");
    assert!(
        per_client.iter().all(|n| *n >= 2),
        "both clients were served: {per_client:?}"
    );
    assert!(
        loads as f64 <= duration / 1.0 + 1.0,
        "{loads} loads in {duration:.1} s with min_loaded 1s: {status:#}"
    );
    assert!(loads >= 2, "they did alternate: {status:#}");
}

/// A load is for the requests that want it: when the only request for an unloaded instance
/// leaves its queue (its client went away) before room could be made, nothing is evicted for
/// it later.
#[test]
fn a_load_wanted_only_by_a_request_that_left_is_not_carried_out() {
    const LONG: u32 = 300;
    let s = Swap::start(&[("a", ""), ("b", ""), ("c", "")], 2, DEFAULTS);
    let (tx, rx) = std::sync::mpsc::channel();
    let ta = long_stream(&s.addr, "a", LONG, tx.clone());
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let tb = long_stream(&s.addr, "b", LONG, tx);
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    // A request for c that its client gives up on while a and b are busy.
    {
        let bytes = http::request_bytes(
            &s.addr,
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            chat("c", 4).to_string().as_bytes(),
        );
        let mut conn = http::connect(&s.addr);
        std::io::Write::write_all(&mut conn, &bytes).unwrap();
        wait_for("c's request queued", Duration::from_secs(30), || {
            (instance(&s.status(), "c")["queued"] == 1).then_some(())
        });
    }
    wait_for(
        "c's queue empty once its client left",
        Duration::from_secs(30),
        || (instance(&s.status(), "c")["queued"] == 0).then_some(()),
    );
    for t in [ta, tb] {
        completed(&t.join().unwrap().0);
    }
    // Both are idle now, long past min_loaded: a load still wanted would evict one at once.
    std::thread::sleep(Duration::from_secs(2));
    let status = s.status();
    assert_eq!(
        instance(&status, "c")["loads"],
        0,
        "{status:#}\nlog:\n{}",
        s.log()
    );
    assert_eq!(instance(&status, "c")["state"], "unloaded", "{status:#}");
    for n in ["a", "b"] {
        assert_eq!(instance(&status, n)["evictions"], 0, "{status:#}");
    }
}
