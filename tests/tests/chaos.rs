//! Chaos: many kills, kills aimed at the restart path, and a SIGKILLed supervisor. Bounded in
//! time, no fixed sleeps: every wait polls status with a deadline. Root, real cgroups.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::time::Duration;

use belljar_testkit::daemon::{
    Daemon, all_in, assert_ledger_matches_cgroups, instance, zombies_of,
};
use belljar_testkit::{ModelShape, TestDir, tiny_shape, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const NAMES: [&str; 5] = ["i0", "i1", "i2", "i3", "i4"];

fn config(t: &TestDir, model: &str) -> String {
    let mut c = format!(
        r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "{model}"
ctx = 256
heartbeat_interval = "200ms"
backoff_initial = "0s"
start_limit_burst = 100000
start_limit_interval = "1s"
"#
    );
    for n in NAMES {
        c.push_str(&format!("\n[instances.{n}]\n"));
    }
    c.push_str(&format!("\n[modes.five]\ninstances = {NAMES:?}\n[modes.three]\ninstances = [\"i0\", \"i1\", \"i2\"]\n"));
    let _ = t;
    c
}

fn start(t: &TestDir, mode: &str) -> Daemon {
    assert!(
        nix::unistd::geteuid().is_root(),
        "chaos tests create real cgroups: run them as root"
    );
    t.model("models/a.gguf", &tiny_shape());
    let mut d = Daemon::start(t, &config(t, "models/a.gguf"), mode, &[]);
    d.wait_status("all ready", |s| all_in(s, "ready"));
    d
}

fn pid(s: &Value, name: &str) -> Option<i32> {
    instance(s, name)["pid"].as_i64().map(|p| p as i32)
}

fn total_restarts(s: &Value) -> u64 {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap())
        .sum()
}

/// Settled: all ready, ledger = cgroup limits, no zombie; returns the final status.
fn settle(d: &mut Daemon) -> Value {
    let s = d.wait_status("all ready again", |s| all_in(s, "ready"));
    assert_ledger_matches_cgroups(d, &s);
    let sup = d.child.id();
    wait_for("no zombie children", Duration::from_secs(10), || {
        zombies_of(sup).is_empty().then_some(())
    });
    s
}

#[test]
fn three_hundred_random_kills_mean_three_hundred_restarts() {
    let t = TestDir::new();
    let mut d = start(&t, "five");
    let mut rng = fastrand::Rng::with_seed(7);
    for k in 0..300 {
        // A random instance that has a worker right now, in whatever state it is.
        let s = d.wait_status("a worker to kill", |s| {
            NAMES.iter().any(|n| pid(s, n).is_some())
        });
        let alive: Vec<(&str, i32)> = NAMES
            .iter()
            .filter_map(|n| pid(&s, n).map(|p| (*n, p)))
            .collect();
        let (name, victim) = alive[rng.usize(..alive.len())];
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        // The next kill must hit a new run: wait until this instance has moved past the victim.
        d.wait_status(&format!("kill {k}: {name} restarted"), |s| {
            pid(s, name).is_some_and(|p| p != victim)
        });
    }
    d.wait_status("every kill restarted", |s| {
        total_restarts(s) >= 300 && all_in(s, "ready")
    });
    let s = settle(&mut d);
    assert_eq!(total_restarts(&s), 300, "exactly one restart per kill");
    for n in NAMES {
        assert_eq!(instance(&s, n)["last_exit"], "signal:9");
    }
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn kills_aimed_at_the_restart_path() {
    let t = TestDir::new();
    // A model big enough (no mmap) that loading takes a visible moment.
    let shape = ModelShape {
        layers: 4,
        width: 512,
        ff: 1536,
        heads: 8,
        kv_heads: 8,
        vocab: 4096,
        context_length: 512,
        f16: false,
        seed: 4,
    };
    t.model("models/slow.gguf", &shape);
    assert!(nix::unistd::geteuid().is_root());
    let cfg =
        config(&t, "models/slow.gguf").replace("ctx = 256\n", "ctx = 256\nuse_mmap = false\n");
    let mut d = Daemon::start(&t, &cfg, "three", &[]);
    d.wait_status("all ready", |s| all_in(s, "ready"));
    let mut deaths = 0u64;

    // 1. During loading: kill the new worker as soon as it exists, before it is ready.
    let first = pid(&d.status().unwrap(), "i0").unwrap();
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    deaths += 1;
    let s = d.wait_status("i0 restarting", |s| {
        pid(s, "i0").is_some_and(|p| p != first)
    });
    let loading = pid(&s, "i0").unwrap();
    let state = instance(&s, "i0")["state"].as_str().unwrap().to_owned();
    kill(Pid::from_raw(loading), Signal::SIGKILL).unwrap();
    deaths += 1;
    eprintln!("second kill hit i0 in state {state}");

    // 2. During Shutdown: `restart` sends Shutdown; kill the worker while it is stopping.
    let before = pid(
        &d.wait_status("i1 ready", |s| instance(s, "i1")["state"] == "ready"),
        "i1",
    )
    .unwrap();
    let restart = {
        let runtime = d.runtime.clone();
        std::thread::spawn(move || {
            belljar_testkit::run_cmd(
                std::process::Command::new(belljar_testkit::bin("supervisor"))
                    .args(["restart", "i1", "--runtime-dir"])
                    .arg(runtime),
            )
        })
    };
    d.wait_status("i1 stopping", |s| {
        instance(s, "i1")["state"] == "stopping" || pid(s, "i1") != Some(before)
    });
    let _ = kill(Pid::from_raw(before), Signal::SIGKILL);
    deaths += 1;
    restart.join().unwrap().expect_code(0);

    // 3. Two kills within a millisecond: two instances at once, and the same pid twice.
    let s = d.wait_status("all ready", |s| all_in(s, "ready"));
    let (a, b) = (pid(&s, "i0").unwrap(), pid(&s, "i2").unwrap());
    kill(Pid::from_raw(a), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(b), Signal::SIGKILL).unwrap();
    let _ = kill(Pid::from_raw(a), Signal::SIGKILL);
    deaths += 2;

    d.wait_status("every death restarted", |s| {
        total_restarts(s) >= deaths && all_in(s, "ready")
    });
    let s = settle(&mut d);
    assert_eq!(
        total_restarts(&s),
        deaths,
        "restarts equal the deaths reaped"
    );
    assert_eq!(d.terminate().code(), Some(0));
    assert!(!d.parent().exists(), "no cgroup left over");
}

#[test]
fn a_sigkilled_supervisor_leaves_workers_that_exit_and_a_clean_next_start() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let t = TestDir::new();
    let mut d = start(&t, "three");
    let b = t.join("models/a.gguf");
    d.cli(&["add", "extra", "--model", b.to_str().unwrap()])
        .expect_code(0);
    d.cli(&[
        "ask",
        "i0",
        "remember me",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ])
    .expect_code(0);
    let s = d.status().unwrap();
    let workers: Vec<i32> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(workers.len(), 4);
    d.signal(Signal::SIGKILL);
    d.wait();
    // Each worker notices its link is gone, persists its session and exits; we reap them.
    for w in &workers {
        wait_for(
            &format!("worker {w} to exit"),
            Duration::from_secs(10),
            || {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(*w),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                (!std::path::Path::new(&format!("/proc/{w}")).exists()).then_some(())
            },
        );
    }
    let parent = d.parent_rel.clone();
    let leftover = d.parent();
    assert!(
        leftover.join("i0").exists(),
        "a killed supervisor cannot clean up its cgroups"
    );
    drop(d);

    let mut d = Daemon::start_with_parent(&t, &config(&t, "models/a.gguf"), "three", &[], parent);
    let s = d.wait_status("all four back", |s| {
        all_in(s, "ready") && s["instances"].as_array().unwrap().len() == 4
    });
    assert!(
        instance(&s, "i0")["reason"]
            .as_str()
            .unwrap()
            .contains("1 turns restored from state"),
        "{s}"
    );
    let live: Vec<i32> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_i64().unwrap() as i32)
        .collect();
    for w in &workers {
        assert!(!live.contains(w), "no orphan of the old run serves");
    }
    assert_ledger_matches_cgroups(&d, &s);
    assert_eq!(d.terminate().code(), Some(0));
}
