//! The shipped budgets.toml and README command: matrix mode validates on this machine.
//! Reads machine-wide memory, so it runs in the `serial` nextest group.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::{TestDir, run};

#[test]
fn serial_shipped_config_validates_matrix_here() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let t = TestDir::new();
    std::fs::copy(repo.join("budgets.toml"), t.join("budgets.toml")).unwrap();
    let model = t.join("models/demo.gguf");
    run("worker", &["make-model", model.to_str().unwrap()]).expect_code(0);
    let config = t.join("budgets.toml");
    for mode in ["single", "matrix"] {
        run(
            "supervisor",
            &[
                "validate",
                "--mode",
                mode,
                "--config",
                config.to_str().unwrap(),
            ],
        )
        .expect_code(0)
        .expect_says(&["PASSED"]);
    }
}
