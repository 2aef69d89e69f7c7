//! The GGUF-aware estimate for real: a model whose KV cache at a large ctx dwarfs its file.
//! Under the file rule (x1.5) it is OOM-killed and the adaptive limit grows until it fits; under
//! "gguf" and "max" it is admitted with a sufficient limit and never OOM-killed; a second
//! admission uses what the first run measured. Root, real cgroups, the real worker.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::daemon::{Daemon, instance};
use belljar_testkit::{TestDir, kernel_oom_kills, run};

const MIB: u64 = 1 << 20;

/// 4 layers of width 256: a ~16 MiB file with a 64 MiB KV cache at ctx 16384.
fn config(t: &TestDir, estimate: &str) -> String {
    t.model(
        "models/kv.gguf",
        &belljar_testkit::kv_heavy_shape(16384, 11),
    );
    format!(
        r#"
[budget]
estimate = "{estimate}"
min_required = "8MiB"
headroom = "64MiB"

[defaults]
model = "models/kv.gguf"
ctx = 16384
backoff_initial = "0s"
start_limit_burst = 15
stop_timeout = "5s"

[instances.long]

[modes.single]
instances = ["long"]
"#
    )
}

/// `supervisor validate` on the daemon's config and state directory (its learned peaks).
fn validate(d: &Daemon) -> belljar_testkit::Run {
    run(
        "supervisor",
        &[
            "validate",
            "--mode",
            "single",
            "--config",
            d.config.to_str().unwrap(),
            "--state-dir",
            d.state.to_str().unwrap(),
        ],
    )
}

fn ask(d: &Daemon) {
    let out = d.cli(&["ask", "long", "tell me a long story", "--max-tokens", "16"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn serial_a_large_ctx_fits_under_gguf_and_max_without_an_oom_kill() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates real cgroups: run it as root"
    );
    for rule in ["gguf", "max"] {
        let t = TestDir::new();
        let before = kernel_oom_kills();
        let mut d = Daemon::start(&t, &config(&t, rule), "single", &[]);
        let s = d.wait_status("ready", |s| instance(s, "long")["state"] == "ready");
        let i = instance(&s, "long");
        assert_eq!(i["estimate_source"], "gguf", "{rule}: {i}");
        let limit = i["memory"]["limit"].as_u64().unwrap();
        assert!(
            limit > 64 * MIB,
            "{rule}: the KV cache alone is 64 MiB: {i}"
        );
        ask(&d);
        let s = d.status().unwrap();
        let i = instance(&s, "long");
        assert_eq!(i["oom_kills"], 0, "{rule}: {i}");
        assert_eq!(i["restarts"], 0, "{rule}: {i}");
        let peak = i["memory"]["peak"].as_u64().unwrap();
        assert!(peak < limit, "{rule}: peak {peak} under the limit {limit}");
        assert_eq!(kernel_oom_kills(), before, "{rule}: no OOM kill anywhere");
        assert!(d.terminate().success());

        let v = validate(&d);
        assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);
        assert!(
            v.stdout.contains("file rule") && v.stdout.contains("(gguf)"),
            "both rules side by side: {}",
            v.stdout
        );
    }
}

#[test]
fn serial_under_the_file_rule_it_oom_kills_until_the_adaptive_limit_fits_then_learns() {
    let t = TestDir::new();
    let before = kernel_oom_kills();
    // Written once: rewriting the model would change its identity (mtime) and start afresh.
    let cfg = config(&t, "file");
    let mut d = Daemon::start(&t, &cfg, "single", &[]);
    let s = d.wait_status("ready after OOM kills", |s| {
        instance(s, "long")["state"] == "ready"
    });
    let i = instance(&s, "long");
    assert_eq!(i["estimate_source"], "file");
    let ooms = i["oom_kills"].as_u64().unwrap();
    assert!(
        ooms >= 1,
        "x1.5 of a 16 MiB file cannot hold a 64 MiB KV cache: {i}"
    );
    assert!(i["memory"]["limit"].as_u64().unwrap() > 64 * MIB, "{i}");
    // A limit that held the load may not hold generation (the KV cache's pages are charged as
    // tokens fill them): the first asks may OOM-kill it too, and the limit grows again.
    let mut answered = false;
    for _ in 0..6 {
        d.wait_status("ready", |s| instance(s, "long")["state"] == "ready");
        let out = d.cli(&["ask", "long", "tell me a long story", "--max-tokens", "16"]);
        if out.code == Some(0) {
            answered = true;
            break;
        }
        assert!(
            out.stderr.contains("stopped before answering"),
            "{}{}",
            out.stdout,
            out.stderr
        );
    }
    assert!(answered, "the limit grew until an ask fit");
    let s = d.status().unwrap();
    let i = instance(&s, "long");
    assert_eq!(
        kernel_oom_kills() - before,
        i["oom_kills"].as_u64().unwrap()
    );
    let peak = i["memory"]["peak"].as_u64().unwrap();
    assert!(d.terminate().success());

    // The run's peak was recorded: the next admission uses p95 x 1.1 of it, says "learned", and
    // starts without a single OOM kill.
    let before = kernel_oom_kills();
    let mut d = Daemon::start(&t, &cfg, "single", &[]);
    let s = d.wait_status("ready again", |s| instance(s, "long")["state"] == "ready");
    let i = instance(&s, "long");
    assert_eq!(i["estimate_source"], "learned", "{i}");
    assert_eq!(i["oom_kills"], 0, "{i}");
    let learned = i["allocated"].as_u64().unwrap();
    assert!(
        learned >= peak + peak / 10 && learned < peak + peak / 10 + MIB,
        "{learned} is the observed peak {peak} x 1.1"
    );
    ask(&d);
    assert_eq!(kernel_oom_kills(), before);
    assert!(d.terminate().success());
    let v = validate(&d);
    assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);
    assert!(
        v.stdout.contains("(learned)"),
        "validate says so: {}",
        v.stdout
    );
}

#[test]
fn estimate_prints_every_term_and_refuses_bad_files_clearly() {
    let t = TestDir::new();
    let _ = config(&t, "gguf");
    let model = t.join("models/kv.gguf");
    let out = run(
        "supervisor",
        &["estimate", model.to_str().unwrap(), "--ctx", "16384"],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for term in [
        "weights",
        "page cache",
        "repack",
        "kv cache",
        "output",
        "vocab",
        "compute",
        "baseline",
        "margin",
        "total",
        "file rule",
    ] {
        assert!(out.stdout.contains(term), "{term}: {}", out.stdout);
    }
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["estimate", model.to_str().unwrap(), "--json"];
        a.extend_from_slice(args);
        let o = run("supervisor", &a);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        serde_json::from_str(&o.stdout).unwrap()
    };
    let short = json(&["--ctx", "512"]);
    let long = json(&["--ctx", "16384"]);
    let no_mmap = json(&["--ctx", "16384", "--no-mmap"]);
    assert_eq!(long["kv"].as_u64().unwrap(), 64 * MIB);
    assert!(long["vram"].is_null());
    let half = json(&["--ctx", "16384", "--gpu-layers", "2"]);
    assert_eq!(half["vram"]["offloaded_layers"], 2);
    assert_eq!(
        half["vram"]["kv"].as_u64().unwrap(),
        32 * MIB,
        "the KV of 2 of 4 layers"
    );
    assert!(long["total"].as_u64() > short["total"].as_u64());
    assert_eq!(
        no_mmap["page_cache"].as_u64().unwrap(),
        std::fs::metadata(&model).unwrap().len()
    );

    // Truncated, not GGUF, missing, a zero ctx: exit 2 with the problem and the fix.
    let bytes = std::fs::read(&model).unwrap();
    let cut = t.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = run("supervisor", &["estimate", cut.to_str().unwrap()]);
    assert_eq!(o.code, Some(2));
    assert!(
        o.stderr.contains("truncated") && o.stderr.contains("download it again"),
        "{}",
        o.stderr
    );
    let text = t.write("notes.gguf", "hello");
    let o = run("supervisor", &["estimate", text.to_str().unwrap()]);
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("not a GGUF file"), "{}", o.stderr);
    let o = run("supervisor", &["estimate", "/nonexistent.gguf"]);
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
    let o = run(
        "supervisor",
        &["estimate", model.to_str().unwrap(), "--ctx", "0"],
    );
    assert_eq!(o.code, Some(2), "{}", o.stderr);
}

/// A header whose KV term overflows 64 bits (2^31 layers x 2^31 KV heads x 2^32 per-head
/// widths) once made the KV cache 0 B; it is refused naming the fields.
#[test]
fn an_overflowing_header_is_refused_naming_the_field() {
    let t = TestDir::new();
    let mut h = b"GGUF\x03\0\0\0".to_vec();
    let string = |h: &mut Vec<u8>, s: &str| {
        h.extend((s.len() as u64).to_le_bytes());
        h.extend(s.as_bytes());
    };
    let pairs: [(&str, u32); 6] = [
        ("llama.block_count", 1 << 31),
        ("llama.embedding_length", 4096),
        ("llama.attention.head_count", 32),
        ("llama.attention.head_count_kv", 1 << 31),
        ("llama.attention.key_length", 1 << 31),
        ("llama.attention.value_length", 1 << 31),
    ];
    h.extend(0u64.to_le_bytes()); // tensors
    h.extend((pairs.len() as u64 + 1).to_le_bytes());
    string(&mut h, "general.architecture");
    h.extend(8u32.to_le_bytes());
    string(&mut h, "llama");
    for (k, v) in pairs {
        string(&mut h, k);
        h.extend(4u32.to_le_bytes());
        h.extend(v.to_le_bytes());
    }
    // Padded to the alignment, as a writer would: the file holds its header whole.
    h.resize(h.len().div_ceil(32) * 32, 0);
    let path = t.join("crafted.gguf");
    std::fs::write(&path, &h).unwrap();
    let o = run("supervisor", &["estimate", path.to_str().unwrap()]);
    assert_eq!(o.code, Some(2), "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("KV cache") && o.stderr.contains("block_count"),
        "{}",
        o.stderr
    );
}
