//! The pressure guard for real: a parent cgroup with a limit (as a container or pod would have)
//! holds belljar's instances and a growing hog. Without the guard the kernel OOM-kills; with it
//! the lowest-priority instance is shed first and nothing is OOM-killed. And thrash detection on
//! an mmap'd model under a limit too small for it. These read and move machine-wide memory:
//! `serial_` tests, one at a time.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use belljar_host::cgroup::{self, CgroupBackend, Limits};
use belljar_testkit::daemon::{Daemon, all_in, instance, unique_parent};
use belljar_testkit::{ModelShape, TestDir};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// ~374 MB of f32 weights: loaded without mmap, each instance holds that much anonymous memory.
fn big_shape() -> ModelShape {
    ModelShape {
        layers: 6,
        width: 1024,
        ff: 2816,
        heads: 8,
        kv_heads: 8,
        vocab: 8000,
        context_length: 512,
        f16: false,
        seed: 11,
    }
}

fn guard_config(model: &Path, enabled: bool) -> String {
    format!(
        r#"
[budget]
total = "2800MiB"
per_instance_max = 0.5
headroom = "64MiB"

[defaults]
model = "{}"
use_mmap = false
ctx = 256
ram_limit = "900MiB"
restart = "never"

[instances.low]
priority = 0
[instances.mid]
priority = 1
[instances.high]
priority = 2

[modes.three]
instances = ["low", "mid", "high"]

[pressure]
enabled = {enabled}
interval = "100ms"
settle = "3s"
warning = 70
critical = 80
emergency = 88
restore = 50
"#,
        model.display()
    )
}

/// A hog in `dir` that grows by 32 MiB every 100 ms up to `target` bytes and holds.
fn hog(dir: &Path, target: u64) -> std::process::Child {
    let script = format!(
        "import time, sys\nchunks = []\nprint('ready', flush=True)\nsys.stdin.readline()\nwhile sum(map(len, chunks)) < {target}:\n    chunks.append(b'x' * (32 << 20))\n    time.sleep(0.1)\nprint('full', flush=True)\ntime.sleep(600)\n"
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cgroup::attach(dir, child.id()).unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

struct Outer {
    cgroups: Box<dyn CgroupBackend>,
    rel: String,
}

impl Outer {
    fn new(limit: u64) -> Outer {
        let cgroups = cgroup::detect(None).unwrap();
        let rel = unique_parent("guard");
        let dir = cgroups.root().join(&rel);
        cgroups.prepare_parent(&dir).unwrap();
        cgroups
            .apply_limits(
                &dir,
                &Limits {
                    max: limit,
                    high: limit,
                    low: 0,
                    swap_max: 0,
                },
            )
            .unwrap();
        std::fs::create_dir(dir.join("hog")).unwrap();
        Outer { cgroups, rel }
    }
    fn dir(&self) -> std::path::PathBuf {
        self.cgroups.root().join(&self.rel)
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        let _ = cgroup::destroy(&*self.cgroups, &self.dir(), Duration::from_secs(10));
    }
}

/// Runs the three instances and the hog inside a 3 GiB parent; returns (OOM kills in the parent,
/// the final status, the supervisor's log).
fn run_guard(enabled: bool) -> (u64, serde_json::Value, String) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "pressure tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let model = t.model("models/big.gguf", &big_shape());
    let limit = 3 * GIB;
    let outer = Outer::new(limit);
    let mut d = Daemon::start_with_parent(
        &t,
        &guard_config(&model, enabled),
        "three",
        &[],
        format!("{}/belljar", outer.rel),
    );
    d.wait_status("three ready", |s| all_in(s, "ready"));
    // The instances' own memory: anonymous pages (their page cache is reclaimable).
    let instances_usage: u64 = {
        let s = d.status().unwrap();
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let status = std::fs::read_to_string(format!("/proc/{}/status", i["pid"])).unwrap();
                let kib: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .unwrap()
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap();
                kib * 1024
            })
            .sum()
    };
    let target = limit.saturating_sub(instances_usage) + 200 * MIB;
    let mut h = hog(&outer.dir().join("hog"), target);
    let before = belljar_testkit::kernel_oom_kills();
    use std::io::Write;
    h.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    // Until the hog is full (or killed).
    let mut line = String::new();
    let _ = BufReader::new(h.stdout.as_mut().unwrap()).read_line(&mut line);
    let after = belljar_testkit::kernel_oom_kills();
    let read = |f: &str| {
        std::fs::read_to_string(outer.dir().join(f))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    eprintln!(
        "hog said {:?}; target {} MiB; instances {} MiB; parent usage {} max {} failcnt {}",
        line.trim(),
        target >> 20,
        instances_usage >> 20,
        read("memory.usage_in_bytes"),
        read("memory.max_usage_in_bytes"),
        read("memory.failcnt")
    );
    let status = d.status().unwrap();
    let _ = h.kill();
    let _ = h.wait();
    if enabled {
        d.wait_status("the shed instances back after the hog left", |s| {
            all_in(s, "ready")
        });
    }
    let log = d.stderr();
    assert_eq!(d.terminate().code(), Some(0));
    (after - before, status, log)
}

#[test]
fn serial_without_the_guard_the_kernel_oom_kills() {
    let (ooms, _, _) = run_guard(false);
    assert!(ooms > 0, "the control run must overflow the parent's limit");
}

#[test]
fn serial_the_guard_sheds_the_lowest_priority_first_and_nothing_is_oom_killed() {
    let (ooms, status, log) = run_guard(true);
    assert_eq!(ooms, 0, "the guard acted before the kernel had to: {log}");
    assert_eq!(instance(&status, "low")["state"], "shed", "{status:#}");
    assert_eq!(instance(&status, "high")["state"], "ready", "{status:#}");
    assert_eq!(
        status["host"]["source"], "cgroup",
        "judged by the parent's limit, not the host's"
    );
    let first_shed = log
        .lines()
        .find(|l| l.contains("event=\"shed\""))
        .unwrap_or_default();
    assert!(
        first_shed.contains("instance=\"low\""),
        "lowest priority first: {first_shed}"
    );
    assert!(log.contains("event=\"restored\""), "{log}");
}

#[test]
fn serial_an_mmapped_model_under_a_too_small_limit_is_flagged_thrashing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "pressure tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let tight = t.model(
        "models/tight.gguf",
        &ModelShape {
            layers: 8,
            width: 768,
            ff: 2048,
            heads: 8,
            kv_heads: 8,
            vocab: 4000,
            context_length: 512,
            f16: false,
            seed: 12,
        },
    );
    let healthy = t.model("models/healthy.gguf", &belljar_testkit::tiny_shape());
    // Evict both files from the page cache so their pages are read (and charged) anew.
    for f in [&tight, &healthy] {
        let file = std::fs::File::open(f).unwrap();
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }
    let config = format!(
        r#"
[budget]
estimate = "file"
estimate_factor = 0.3
min_required = "8MiB"
headroom = "64MiB"

[defaults]
ctx = 256
restart = "never"

[instances.tight]
model = "{}"
[instances.healthy]
model = "{}"
ram_limit = "64MiB"

[modes.m]
instances = ["tight", "healthy"]

[pressure]
interval = "200ms"
thrash_window = "2s"
thrash_majflt_rate = 20
"#,
        tight.display(),
        healthy.display()
    );
    let mut d = Daemon::start(&t, &config, "m", &[]);
    d.wait_status_for("both ready", Duration::from_secs(120), |s| {
        all_in(s, "ready")
    });
    // Generation touches every weight for every token: under a limit of ~0.3 x the file, the
    // mapped pages keep being evicted and read again.
    let runtime = d.runtime.clone();
    let asker = std::thread::spawn(move || {
        Command::new(belljar_testkit::bin("supervisor"))
            .args([
                "ask",
                "tight",
                "go on and on",
                "--max-tokens",
                "200",
                "--ignore-eos",
                // Raw: through the (ChatML fallback) template the prompt and 200 tokens would
                // not fit ctx 256.
                "--raw",
                "--runtime-dir",
            ])
            .arg(runtime)
            .output()
    });
    let s = d.wait_status_for("tight flagged thrashing", Duration::from_secs(120), |s| {
        instance(s, "tight")["thrashing"] == true
    });
    assert_eq!(instance(&s, "healthy")["thrashing"], false);
    let reason = instance(&s, "tight")["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("raise ram_limit to at least"), "{reason}");
    assert!(d.stderr().contains("event=\"thrashing\""));
    assert_eq!(d.terminate().code(), Some(0));
    let _ = asker.join();
}
