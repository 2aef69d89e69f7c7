//! Failure handling for real: exit classification, restarts with backoff, the crash-loop breaker,
//! OOM kills with adaptive limits, the watchdog and waiting for memory. Root, real cgroups, real
//! workers; each test with its own cgroup parent and directories.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::time::Duration;

use belljar_testkit::daemon::{
    Daemon, all_in, assert_ledger_matches_cgroups, instance, zombies_of,
};
use belljar_testkit::{TestDir, tiny_shape, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn config(t: &TestDir, budget: &str, defaults: &str) -> String {
    t.model("models/a.gguf", &tiny_shape());
    format!(
        r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"
{budget}

[defaults]
model = "models/a.gguf"
ctx = 256
heartbeat_interval = "100ms"
backoff_initial = "50ms"
backoff_max = "2s"
{defaults}

[instances.subject]

[modes.single]
instances = ["subject"]
"#
    )
}

fn start(t: &TestDir, cfg: &str) -> Daemon {
    assert!(
        nix::unistd::geteuid().is_root(),
        "failure tests create real cgroups: run them as root"
    );
    let mut d = Daemon::start(t, cfg, "single", &[]);
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    d
}

fn pid_of(s: &serde_json::Value) -> i32 {
    instance(s, "subject")["pid"].as_i64().unwrap() as i32
}

/// Settled: ledger = cgroup limits, no zombie, clean stop.
fn finish(mut d: Daemon) {
    let status = d.status().unwrap();
    assert_ledger_matches_cgroups(&d, &status);
    let sup = d.child.id();
    wait_for("no zombie children", Duration::from_secs(5), || {
        zombies_of(sup).is_empty().then_some(())
    });
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.stderr());
}

#[test]
fn sigkill_of_a_ready_worker_means_exactly_one_restart() {
    let t = TestDir::new();
    let mut d = start(&t, &config(&t, "", ""));
    let first = pid_of(&d.status().unwrap());
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let s = d.wait_status("ready again", |s| {
        let i = instance(s, "subject");
        i["state"] == "ready" && i["pid"].as_i64() != Some(first as i64)
    });
    let i = instance(&s, "subject");
    assert_eq!(i["restarts"], 1);
    assert_eq!(i["last_exit"], "signal:9");
    assert_eq!(i["oom_kills"], 0);
    assert_eq!(
        d.stderr().matches("event=\"restart-scheduled\"").count(),
        1,
        "{}",
        d.stderr()
    );
    finish(d);
}

/// `run` refuses a truncated model before it starts (the probe compares the tensors' extent
/// with the file), so the worker's own refusal (exit 65, permanent) is reached by a model that
/// was replaced by a truncated copy while the supervisor ran.
#[test]
fn a_truncated_model_fails_at_once_without_retries() {
    let t = TestDir::new();
    let cfg = config(&t, "", "");
    let mut d = start(&t, &cfg);
    let model = t.join("models/a.gguf");
    let bytes = std::fs::read(&model).unwrap();
    // A new file renamed over the old one: the running worker keeps its mapping of the old.
    let cut = t.join("models/cut.tmp");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::rename(&cut, &model).unwrap();
    d.cli(&["restart", "subject"]).expect_code(1);
    let s = d.wait_status("failed", |s| instance(s, "subject")["state"] == "failed");
    let i = instance(&s, "subject");
    assert_eq!(i["last_exit"], "exit:65");
    assert_eq!(i["allocated"], 0);
    assert!(i["reason"].as_str().unwrap().contains("truncated"), "{i}");
    assert!(!d.stderr().contains("restart-scheduled"));
    finish(d);
}

#[test]
fn a_stopped_worker_is_killed_by_the_watchdog_and_restarted() {
    let t = TestDir::new();
    let mut d = start(&t, &config(&t, "", ""));
    let first = pid_of(&d.status().unwrap());
    kill(Pid::from_raw(first), Signal::SIGSTOP).unwrap();
    let s = d.wait_status("restarted after the watchdog", |s| {
        let i = instance(s, "subject");
        i["state"] == "ready" && i["restarts"] == 1
    });
    assert_eq!(instance(&s, "subject")["last_exit"], "watchdog");
    assert!(d.stderr().contains("event=\"watchdog\""), "{}", d.stderr());
    finish(d);
}

/// The delays come from the event log (not wall-clock timing) and follow the policy:
/// 50ms x 2^(n-1), at most 2s, jitter within +-10%.
#[test]
fn backoff_delays_follow_the_policy() {
    let t = TestDir::new();
    let mut d = start(&t, &config(&t, "", "start_limit_burst = 20"));
    for n in 1..=5u64 {
        let pid = pid_of(&d.status().unwrap());
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        d.wait_status("ready again", |s| {
            instance(s, "subject")["state"] == "ready" && instance(s, "subject")["restarts"] == n
        });
    }
    let log = d.stderr();
    let delays: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains("event=\"restart-scheduled\""))
        .map(|l| {
            let field = |k: &str| -> u64 {
                let at = l.find(&format!("{k}=")).unwrap() + k.len() + 1;
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (field("attempt"), field("delay_ms"))
        })
        .collect();
    assert_eq!(delays.len(), 5, "{log}");
    for (i, (attempt, delay)) in delays.iter().enumerate() {
        assert_eq!(*attempt, i as u64 + 1);
        let base = (50.0 * 2f64.powi(i as i32)).min(2000.0);
        let (lo, hi) = (
            (base * 0.9).floor() as u64,
            (base * 1.1).ceil().min(2000.0) as u64,
        );
        assert!(
            (lo..=hi).contains(delay),
            "attempt {attempt}: {delay} ms not in {lo}..={hi}"
        );
    }
    finish(d);
}

/// A model whose KV cache at this ctx is about the size of its file, without mmap, under a limit
/// of file x 1.0: OOM-killed on load.
fn oom_config(t: &TestDir, budget: &str, burst: u32) -> String {
    let shape = belljar_testkit::kv_heavy_shape(4096, 5);
    t.model("models/kv.gguf", &shape);
    format!(
        r#"
[budget]
estimate = "file"
estimate_factor = 1.0
min_required = "8MiB"
headroom = "64MiB"
{budget}

[defaults]
model = "models/kv.gguf"
use_mmap = false
ctx = 4096
heartbeat_interval = "100ms"
backoff_initial = "0s"
start_limit_burst = {burst}

[instances.subject]

[modes.single]
instances = ["subject"]
"#
    )
}

#[test]
fn serial_oom_kills_are_classified_and_the_limit_grows_until_it_fits() {
    let t = TestDir::new();
    let before = belljar_testkit::kernel_oom_kills();
    let mut d = Daemon::start(&t, &oom_config(&t, "", 12), "single", &[]);
    let s = d.wait_status("ready after OOM kills", |s| {
        instance(s, "subject")["state"] == "ready"
    });
    let i = instance(&s, "subject");
    let ooms = i["oom_kills"].as_u64().unwrap();
    assert!(ooms >= 1, "the first limit is below the need: {i}");
    assert_eq!(
        i["restarts"], ooms,
        "each OOM kill was followed by one restart"
    );
    assert_eq!(
        belljar_testkit::kernel_oom_kills() - before,
        ooms,
        "consistent with the kernel's count"
    );
    assert!(
        d.stderr().contains("OOM at the limit: raising the limit"),
        "{}",
        d.stderr()
    );
    assert_eq!(
        d.stderr().matches("event=\"oom-kill\"").count() as u64,
        ooms,
        "each OOM kill was also seen through the cgroup's notification: {}",
        d.stderr()
    );
    assert!(i["allocated"].as_u64().unwrap() > 8 << 20);
    finish(d);
}

#[test]
fn serial_without_budget_room_the_breaker_trips_after_exactly_the_burst() {
    let t = TestDir::new();
    let before = belljar_testkit::kernel_oom_kills();
    let mut d = Daemon::start(&t, &oom_config(&t, "total = \"40MiB\"", 3), "single", &[]);
    let s = d.wait_status("failed by the breaker", |s| {
        instance(s, "subject")["state"] == "failed"
    });
    let i = instance(&s, "subject");
    assert_eq!(i["oom_kills"], 3, "{i}");
    assert_eq!(i["restarts"], 2, "exactly start_limit_burst = 3 starts");
    assert_eq!(i["last_exit"], "oom-kill");
    assert!(i["reason"].as_str().unwrap().contains("crash loop"), "{i}");
    assert_eq!(i["allocated"], 0, "budget released");
    assert_eq!(belljar_testkit::kernel_oom_kills() - before, 3);
    // None follow.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(instance(&d.status().unwrap(), "subject")["restarts"], 2);
    // `restart` clears it.
    d.cli(&["restart", "subject"]).expect_code(1);
    finish(d);
}

#[test]
fn serial_a_restart_waits_for_memory_while_a_hog_holds_it() {
    let t = TestDir::new();
    let available = {
        let m = std::fs::read_to_string("/proc/meminfo").unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let headroom = available - (1 << 30);
    let cfg = config(&t, "", "").replace("headroom = \"64MiB\"", &format!("headroom = {headroom}"));
    let mut d = start(&t, &cfg);
    let mut hog = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys,time; b=b'\\x01'*(2<<30); print('held', flush=True); time.sleep(600)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(hog.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
    }
    kill(Pid::from_raw(pid_of(&d.status().unwrap())), Signal::SIGKILL).unwrap();
    let s = d.wait_status("waiting for memory", |s| {
        instance(s, "subject")["state"] == "waiting-for-memory"
    });
    assert!(
        instance(&s, "subject")["reason"]
            .as_str()
            .unwrap()
            .contains("short by"),
        "{s}"
    );
    assert!(
        instance(&s, "subject")["allocated"].as_u64().unwrap() > 0,
        "waiting keeps the allocation"
    );
    hog.kill().unwrap();
    hog.wait().unwrap();
    d.wait_status("ready after the hog left", |s| {
        instance(s, "subject")["state"] == "ready"
    });
    finish(d);
}

/// The metadata of a session's `session.state` (`BJSESS02`, a little-endian u32 length, JSON).
fn state_meta(session: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(session.join("session.state")).unwrap();
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[12..12 + len]).unwrap()
}

/// Issue #17, 9: a kill between a turn's log append and its state save (BELLJAR_FAULT, the test
/// aid) leaves the state one turn behind, so the next start re-prefills the whole conversation.
/// With one thread that re-prefill outruns `load_stall_timeout`; it used to report no progress
/// until done (one 2048-token batch), so the watchdog killed it, and since the repaired state
/// was never written back, every later start did the same: the instance never came back. Now
/// the re-prefill reports progress every quarter second or so and its state is written back at
/// once.
#[test]
fn a_kill_between_log_append_and_state_save_comes_back_ready() {
    const TIMEOUT_MS: u128 = 2000;
    let t = TestDir::new();
    // Slow enough on one thread that re-prefilling ~2000 tokens takes several seconds.
    t.model(
        "models/slow.gguf",
        &belljar_testkit::ModelShape {
            layers: 4,
            width: 512,
            ff: 1536,
            heads: 8,
            kv_heads: 8,
            vocab: 1024,
            context_length: 4096,
            f16: false,
            seed: 3,
        },
    );
    let cfg = format!(
        r#"
[budget]
min_required = "64MiB"
headroom = "64MiB"

[defaults]
model = "models/slow.gguf"
ctx = 4096
threads = 1
heartbeat_interval = "200ms"
backoff_initial = "50ms"
load_stall_timeout = "{TIMEOUT_MS}ms"

[instances.subject]

[modes.single]
instances = ["subject"]
"#
    );
    let turns = 4;
    let mut d = Daemon::start(
        &t,
        &cfg,
        "single",
        &[
            ("BELLJAR_FAULT", &format!("after-log-append:{turns}")),
            ("BELLJAR_WORKER_LOG", "info"),
        ],
    );
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    let first = pid_of(&d.status().unwrap());
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(16);
    for turn in 1..=turns {
        let r = d.cli(&[
            "ask",
            "subject",
            &prompt,
            "--max-tokens",
            "4",
            "--ignore-eos",
        ]);
        if turn < turns {
            r.expect_code(0);
        } else {
            assert_eq!(
                r.code,
                Some(1),
                "the worker died during the last ask: {r:?}"
            );
        }
    }
    let session = d.state.join("instances/subject");
    let log = std::fs::read_to_string(session.join("session.log")).unwrap();
    let tokens: usize = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["tokens"].as_array().map(Vec::len))
        .sum();
    assert_eq!(log.lines().count(), turns + 1, "a header and the turns");
    let s = d.wait_status_for(
        "ready again after the re-prefill",
        Duration::from_secs(90),
        |s| {
            let i = instance(s, "subject");
            i["state"] == "ready" && i["pid"].as_i64() != Some(i64::from(first))
        },
    );
    let i = instance(&s, "subject");
    assert_eq!(i["last_exit"], "signal:9");
    assert!(
        i["reason"].as_str().unwrap().contains("restored from log"),
        "{i:#}"
    );
    let meta = state_meta(&session);
    assert_eq!(meta["turns"], turns, "the repaired state was written back");
    assert_eq!(meta["tokens"].as_array().unwrap().len(), tokens);
    // The test means something only if the re-prefill outran the watchdog's timeout.
    let log = d.stderr();
    let ms: u128 = log
        .lines()
        .find_map(|l| {
            let rest = l.split("re-prefilled ").nth(1)?;
            rest.split(" in ").nth(1)?.split(" ms").next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no re-prefill line in the log:\n{log}"));
    eprintln!("re-prefilled {tokens} tokens in {ms} ms (load_stall_timeout {TIMEOUT_MS} ms)");
    assert!(
        ms > TIMEOUT_MS,
        "the re-prefill of {tokens} tokens took only {ms} ms: make the prompt longer"
    );
    finish(d);
}
