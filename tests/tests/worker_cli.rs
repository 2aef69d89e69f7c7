//! `worker make-model` and `worker inspect`: generated models are deterministic, honour their
//! shape flags, and load in the real llama.cpp.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::{TestDir, run};

fn make(t: &TestDir, name: &str, flags: &[&str]) -> std::path::PathBuf {
    let out = t.join(name);
    let mut args = vec!["make-model", out.to_str().unwrap()];
    args.extend_from_slice(flags);
    run("worker", &args).expect_code(0).expect_says(&["wrote"]);
    out
}

fn inspect(path: &std::path::Path) -> serde_json::Value {
    let r = run("worker", &["inspect", path.to_str().unwrap(), "--json"]);
    r.expect_code(0);
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let t = TestDir::new();
    let a = make(&t, "a.gguf", &["--seed", "5"]);
    let b = make(&t, "b.gguf", &["--seed", "5"]);
    let c = make(&t, "c.gguf", &["--seed", "6"]);
    let read = |p| std::fs::read(p).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
    assert!(
        !t.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")),
        "no temp file left"
    );
}

#[test]
fn llama_cpp_loads_the_shape_it_was_given() {
    let t = TestDir::new();
    let m = make(
        &t,
        "gqa.gguf",
        &[
            "--layers",
            "3",
            "--width",
            "128",
            "--ff",
            "320",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--vocab",
            "700",
            "--context-length",
            "1024",
            "--f16",
        ],
    );
    let v = inspect(&m);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["n_layer"], 3);
    assert_eq!(v["n_embd"], 128);
    assert_eq!(v["n_head"], 8);
    assert_eq!(v["n_head_kv"], 2);
    assert_eq!(v["n_vocab"], 700);
    assert_eq!(v["n_ctx_train"], 1024);
    // 700x128 x2 (embd, output) + 3 x (2x128x128 + 2x128x32 + 3x128x320 + 2x128) + 128
    assert_eq!(
        v["n_params"],
        700 * 128 * 2 + 3 * (2 * 128 * 128 + 2 * 128 * 32 + 3 * 128 * 320 + 2 * 128) + 128
    );
}

#[test]
fn default_demo_model_loads_without_mmap_too() {
    let t = TestDir::new();
    let m = make(&t, "demo.gguf", &[]);
    let r = run("worker", &["inspect", m.to_str().unwrap(), "--no-mmap"]);
    r.expect_code(0).expect_says(&["n_params", "llama"]);
}

#[test]
fn impossible_shapes_are_usage_errors() {
    let t = TestDir::new();
    let out = t.join("x.gguf");
    run(
        "worker",
        &[
            "make-model",
            out.to_str().unwrap(),
            "--width",
            "100",
            "--heads",
            "3",
        ],
    )
    .expect_code(64)
    .expect_says(&["not divisible by heads"]);
    run(
        "worker",
        &["make-model", out.to_str().unwrap(), "--vocab", "10"],
    )
    .expect_code(64)
    .expect_says(&["at least 259"]);
    assert!(!out.exists(), "nothing written");
    run("worker", &["make-model"]).expect_code(64);
}

#[test]
fn inspect_refuses_bad_files_with_a_permanent_code() {
    let t = TestDir::new();
    let junk = t.write("junk.gguf", "not a model at all");
    run("worker", &["inspect", junk.to_str().unwrap()])
        .expect_code(65)
        .expect_says(&["not a GGUF file"]);
    let m = make(&t, "m.gguf", &[]);
    let bytes = std::fs::read(&m).unwrap();
    let cut = t.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    // The model probe compares the tensors' extent with the file before llama.cpp sees it:
    // a truncated file is a bad model file (65), not one llama.cpp cannot load (69).
    run("worker", &["inspect", cut.to_str().unwrap()])
        .expect_code(65)
        .expect_says(&["truncated", "download it again"]);
}
