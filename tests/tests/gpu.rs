//! The GPU guard where there is no NVML (this machine, CI): it turns itself off with one info
//! line, `gpus` is empty and everything else works, instances with `gpu_layers` included (the
//! llama.cpp build has no GPU backend, so they run on the CPU). The guard's policy is unit-tested
//! in crates/budget/src/gpu.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::daemon::{Daemon, all_in, instance};
use belljar_testkit::{TestDir, run, tiny_shape};

fn config(t: &TestDir) -> String {
    t.model("models/a.gguf", &tiny_shape());
    r#"
[budget]
min_required = "8MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
stop_timeout = "5s"

[instances.gpu]
ram_limit = "64MiB"
gpu_layers = 8
gpu_device = 0

[instances.cpu]
ram_limit = "64MiB"

[modes.both]
instances = ["gpu", "cpu"]
"#
    .to_owned()
}

fn nvml_present() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib64/libnvidia-ml.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

#[test]
fn without_nvml_the_guard_is_off_with_one_line_and_gpus_is_empty() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates real cgroups: run it as root"
    );
    let t = TestDir::new();
    let mut d = Daemon::start(&t, &config(&t), "both", &[]);
    let s = d.wait_status("both ready", |s| all_in(s, "ready"));
    if nvml_present() {
        // A GPU machine: the guard is on and reports its GPUs (the rest of this test is about
        // machines without one).
        let s = d.wait_status("a GPU tick", |s| {
            s["gpus"].as_array().is_some_and(|g| !g.is_empty())
        });
        assert!(!d.stderr().contains("the GPU guard is off"), "{s:#}");
        return;
    }
    assert_eq!(s["gpus"], serde_json::json!([]), "{s:#}");
    for name in ["gpu", "cpu"] {
        let i = instance(&s, name);
        assert!(i["gpu_memory"].is_null(), "{i}");
        assert_eq!(i["cpu_fallback"], false, "{i}");
        assert!(i["gpu_release"].is_null(), "{i}");
    }
    // The worker was asked for its layers and device (llama.cpp runs them on the CPU here).
    let pid = instance(&s, "gpu")["pid"].as_u64().unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&str> = cmdline.split('\0').collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert_eq!(after("--gpu-layers"), "8");
    assert_eq!(after("--gpu-device"), "0");
    let log = d.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("NVML")).collect();
    assert_eq!(lines.len(), 1, "one info line: {log}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("the GPU guard is off"),
        "{}",
        lines[0]
    );
    let pid = instance(&s, "cpu")["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_status("restarts work as always", |s| {
        instance(s, "cpu")["restarts"] == 1 && all_in(s, "ready")
    });
    assert!(d.terminate().success());

    // validate: says VRAM is not checked, and passes on RAM.
    let out = run(
        "supervisor",
        &[
            "validate",
            "--mode",
            "both",
            "--config",
            d.config.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("VRAM is not checked"), "{}", out.stderr);
}
