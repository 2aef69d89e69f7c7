//! Models shaped like real families, written by the real `worker make-model` (gemma3 with a
//! sliding window and a head dimension other than width / heads, tied embeddings, Q8_0 and
//! Q4_0 blocks, a 262,144-token vocabulary), then loaded by the real worker through llama.cpp,
//! which must generate with each. llama.cpp's own log (the worker's stderr at RUST_LOG=info)
//! says what it made of each header.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::path::{Path, PathBuf};

use belljar_protocol::worker::{Prompt, PromptMode, Shutdown, SupervisorMsg, WorkerMsg};
use belljar_testkit::link::WorkerLink;
use belljar_testkit::{TestDir, run};

/// Tokens each model must generate.
const TOKENS: u32 = 8;

/// Writes a model with `worker make-model OUT FLAGS...`.
fn make(t: &TestDir, name: &str, flags: &[&str]) -> PathBuf {
    let out = t.join(name);
    let mut args = vec!["make-model", out.to_str().unwrap()];
    args.extend_from_slice(flags);
    run("worker", &args).expect_code(0).expect_says(&["wrote"]);
    out
}

/// Serves `model` with the real worker, generates [`TOKENS`] tokens from a completion, shuts
/// the worker down cleanly and returns its stderr (llama.cpp's log among it).
fn generate(t: &TestDir, model: &Path) -> String {
    let mut w = WorkerLink::start_with_env(
        t.path(),
        "subject",
        model,
        &t.join("state"),
        &["--ctx", "256", "--threads", "1"],
        &[("RUST_LOG", "info")],
    );
    w.handshake();
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Loading(_)) => {}
            Some(WorkerMsg::Ready(_)) => break,
            other => panic!(
                "expected Loading/Ready, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    }
    w.send(&SupervisorMsg::Prompt(Prompt {
        id: 1,
        mode: PromptMode::Completion,
        text: "once upon a time".into(),
        max_tokens: TOKENS,
        ignore_eos: true,
        ..Prompt::default()
    }));
    let mut streamed = 0;
    let done = loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(tok)) if tok.id == 1 => streamed += 1,
            Some(WorkerMsg::Done(d)) if d.id == 1 => break d,
            other => panic!(
                "expected Token/Done, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    };
    assert_eq!(
        (streamed, done.tokens),
        (TOKENS, TOKENS),
        "llama.cpp generates with the model; stderr:\n{}",
        w.stderr()
    );
    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
    assert_eq!(w.wait().code(), Some(0), "clean shutdown");
    w.stderr()
}

/// The value llama.cpp's `print_info` logs for `field` (`n_swa = 64` is logged with the value
/// aligned: `n_swa                 = 64`).
fn info(stderr: &str, field: &str) -> String {
    let marker = format!(" {field} ");
    stderr
        .lines()
        .filter(|l| l.contains("llama.cpp::print_info"))
        .find_map(|l| {
            let rest = &l[l.find(&marker)? + marker.len()..];
            let value = rest.trim_start().strip_prefix('=')?.trim_start();
            Some(
                value
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| panic!("llama.cpp logged no {field}:\n{stderr}"))
}

/// How many tensors llama.cpp's loader found in the file.
fn tensor_count(stderr: &str) -> u32 {
    let line = stderr
        .lines()
        .find(|l| l.contains("loaded meta data with"))
        .unwrap_or_else(|| panic!("llama.cpp logged no tensor count:\n{stderr}"));
    let before = line.split(" tensors").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The layers of llama.cpp's (non-SWA, SWA) KV caches: each `creating ... KV cache` line is
/// followed by the cache's `size = ... (N cells, L layers, ...)` line.
fn kv_cache_layers(stderr: &str) -> (u32, u32) {
    let layers_after = |marker: &str| -> u32 {
        let mut lines = stderr.lines().skip_while(|l| !l.contains(marker));
        let size = lines
            .find(|l| l.contains(" layers,"))
            .unwrap_or_else(|| panic!("llama.cpp logged no {marker:?} and its size:\n{stderr}"));
        let before = size.split(" layers,").next().unwrap();
        before.rsplit(' ').next().unwrap().parse().unwrap()
    };
    (
        layers_after("creating non-SWA KV cache"),
        layers_after("creating     SWA KV cache"),
    )
}

/// The MiB llama.cpp logged for its buffers of `kind` ("model", "KV", "output", "compute") on
/// `device` ("CPU", "CPU_REPACK", "CPU_Mapped"), summed (an SWA model has two KV caches), in
/// bytes; 0 when it logged none.
fn logged(stderr: &str, device: &str, kind: &str) -> u64 {
    let marker = format!(" {kind} buffer size =");
    stderr
        .lines()
        .filter_map(|l| {
            let at = l.find(&marker)?;
            if l[..at].split_whitespace().last()? != device {
                return None;
            }
            let mib: f64 = l[at + marker.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((mib * 1024.0 * 1024.0).round() as u64)
        })
        .sum()
}

/// `supervisor estimate` for the model at the worker's ctx (256), mmap on: the terms that
/// llama.cpp states in its log must match its buffers (to the 0.01 MiB it prints), and the
/// facts what the generator wrote.
fn estimate_matches_the_log(model: &Path, stderr: &str) -> serde_json::Value {
    let out = run(
        "supervisor",
        &[
            "estimate",
            model.to_str().unwrap(),
            "--ctx",
            "256",
            "--json",
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let est: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let close = |term: &str, log: u64| {
        let e = est[term].as_u64().unwrap();
        assert!(
            e.abs_diff(log) <= 10 << 10,
            "{term}: the estimate says {e}, llama.cpp's log {log}\n{stderr}"
        );
    };
    close("repack", logged(stderr, "CPU_REPACK", "model"));
    close("kv", logged(stderr, "CPU", "KV"));
    close("output", logged(stderr, "CPU", "output"));
    assert_eq!(
        est["facts"]["vocab"].as_u64().unwrap().to_string(),
        info(stderr, "n_vocab")
    );
    est
}

fn has_avx2() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == "avx2")
}

/// gemma3 with a 64-token window, head dimension 64 at width 128 over 2 heads (queries 128
/// wide, keys and values 64 wide with 1 KV head), and every 2nd layer global.
#[test]
fn gemma3_with_a_sliding_window_generates() {
    let t = TestDir::new();
    let model = make(
        &t,
        "gemma3.gguf",
        &[
            "--arch",
            "gemma3",
            "--layers",
            "2",
            "--width",
            "128",
            "--ff",
            "256",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "64",
            "--vocab",
            "512",
            "--context-length",
            "2048",
            "--sliding-window",
            "64",
            "--swa-pattern",
            "2",
        ],
    );
    let stderr = generate(&t, &model);
    assert_eq!(info(&stderr, "arch"), "gemma3");
    assert_eq!(info(&stderr, "n_swa"), "64", "n_swa = 64");
    assert_eq!(info(&stderr, "is_swa_any"), "1");
    assert_eq!(info(&stderr, "n_embd_head_k"), "64");
    assert_eq!(info(&stderr, "n_embd_head_v"), "64");
    assert_eq!(info(&stderr, "n_embd"), "128");
    assert!(stderr.contains("SWA KV cache"), "{stderr}");
    assert_eq!(
        kv_cache_layers(&stderr),
        (1, 1),
        "--swa-pattern 2: layer 0 slides, layer 1 is global"
    );
    // 1 + 2 x 13 + 2: Q/K norms and the post-attention and post-feed-forward norms.
    assert_eq!(tensor_count(&stderr), 29);
    let est = estimate_matches_the_log(&model, &stderr);
    assert_eq!(est["facts"]["sliding_window"], 64);
    assert_eq!(est["facts"]["key_length"], 64);
    assert_eq!(
        est["kv"].as_u64().unwrap(),
        2 * 256 * (64 + 64) * 2,
        "both layers full-size: 2 layers x 256 cells x 1 KV head x (64 + 64) x f16"
    );
}

/// Without --swa-pattern llama.cpp's gemma3 default (every 6th layer global) applies: of 6
/// layers, the last is global.
#[test]
fn gemma3_takes_llama_cpps_default_pattern() {
    let t = TestDir::new();
    let model = make(
        &t,
        "gemma3-6.gguf",
        &[
            "--arch",
            "gemma3",
            "--layers",
            "6",
            "--width",
            "64",
            "--ff",
            "128",
            "--heads",
            "2",
            "--vocab",
            "300",
            "--sliding-window",
            "32",
        ],
    );
    let stderr = generate(&t, &model);
    assert_eq!(info(&stderr, "n_swa"), "32");
    assert_eq!(
        kv_cache_layers(&stderr),
        (1, 5),
        "layers 0-4 slide, layer 5 is global"
    );
}

#[test]
fn a_tied_llama_generates_without_an_output_matrix() {
    let t = TestDir::new();
    let flags = [
        "--layers", "1", "--width", "64", "--ff", "128", "--heads", "2", "--vocab", "300",
    ];
    let untied = generate(&t, &make(&t, "untied.gguf", &flags));
    assert_eq!(tensor_count(&untied), 1 + 9 + 2);
    let t = TestDir::new();
    let tied = generate(
        &t,
        &make(&t, "tied.gguf", &[&flags[..], &["--tied"]].concat()),
    );
    assert_eq!(tensor_count(&tied), 1 + 9 + 1, "no output.weight");
    let est = estimate_matches_the_log(&t.join("tied.gguf"), &tied);
    assert_eq!(est["facts"]["tied"], true);
    assert_eq!(est["repack"], 0, "f32: nothing is repacked");
}

/// Tied Q4_0 embeddings: the input keeps token_embd for its row lookups, and the output layer,
/// a matrix product, gets a repacked copy (rows: the vocabulary, a multiple of 8).
#[test]
fn tied_q4_0_embeddings_are_repacked_a_second_time_for_the_output() {
    let t = TestDir::new();
    let model = make(
        &t,
        "tied-q4.gguf",
        &[
            "--layers", "1", "--width", "64", "--ff", "128", "--heads", "2", "--vocab", "4096",
            "--tied", "--type", "q4_0",
        ],
    );
    let stderr = generate(&t, &model);
    let est = estimate_matches_the_log(&model, &stderr);
    // token_embd: 4096 x 64 in Q4_0 (18 bytes per 32).
    assert_eq!(est["facts"]["tied_repack"], 4096 * 64 / 32 * 18);
    assert!(est["repack"].as_u64().unwrap() > 4096 * 64 / 32 * 18);
}

#[test]
fn a_q8_0_llama_generates() {
    let t = TestDir::new();
    let model = make(
        &t,
        "q8.gguf",
        &[
            "--layers", "2", "--width", "96", "--ff", "160", "--heads", "3", "--vocab", "400",
            "--type", "q8_0",
        ],
    );
    let stderr = generate(&t, &model);
    estimate_matches_the_log(&model, &stderr);
    assert!(stderr.contains("file type   = Q8_0"), "{stderr}");
    assert!(
        stderr.contains("type q8_0:   16 tensors"),
        "every matrix in Q8_0: 2 x 7, the token embeddings and the output\n{stderr}"
    );
}

/// Q4_0 with every matrix's row count a multiple of 8: on AVX2, llama.cpp repacks the weights
/// into its interleaved CPU layout (the CPU_REPACK buffer), which reads the blocks as ggml's.
#[test]
fn a_q4_0_llama_generates_and_is_repacked() {
    let t = TestDir::new();
    let model = make(
        &t,
        "q4.gguf",
        &[
            "--layers", "2", "--width", "64", "--ff", "128", "--heads", "2", "--vocab", "512",
            "--type", "q4_0",
        ],
    );
    let stderr = generate(&t, &model);
    assert!(stderr.contains("file type   = Q4_0"), "{stderr}");
    assert!(
        stderr.contains("type q4_0:   16 tensors"),
        "every matrix in Q4_0: 2 x 7, the token embeddings and the output\n{stderr}"
    );
    if has_avx2() {
        assert!(stderr.contains("CPU_REPACK"), "{stderr}");
    } else {
        eprintln!("note: this CPU has no AVX2; the CPU_REPACK check is skipped");
    }
    let est = estimate_matches_the_log(&model, &stderr);
    assert!(est["repack"].as_u64().unwrap() > 0);
}

/// A Gemma-3-sized vocabulary on a tiny model (tied, Q4_0: ~10 MB, most of it the header).
#[test]
fn a_262144_token_vocabulary_loads_and_generates() {
    let t = TestDir::new();
    let model = make(
        &t,
        "v262k.gguf",
        &[
            "--layers", "1", "--width", "32", "--ff", "64", "--heads", "2", "--vocab", "262144",
            "--tied", "--type", "q4_0",
        ],
    );
    let stderr = generate(&t, &model);
    assert_eq!(info(&stderr, "n_vocab"), "262144");
    let est = estimate_matches_the_log(&model, &stderr);
    assert_eq!(est["output"], 262_144 * 4, "one row of f32 logits: 1 MiB");
}
