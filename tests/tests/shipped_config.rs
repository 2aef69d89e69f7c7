//! The shipped budgets.toml and README command: matrix mode validates on this machine, on the
//! real model it names (fetched by scripts/fetch-models) and on the generated demo model that
//! scripts/demo falls back to. Reads machine-wide memory, so it runs in the `serial` nextest
//! group.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::real::real_model;
use belljar_testkit::{TestDir, run};

/// budgets.toml's model line, replaced as scripts/demo replaces it.
fn with_model(shipped: &str, model: &std::path::Path) -> String {
    let line = shipped
        .lines()
        .find(|l| l.starts_with("model = "))
        .expect("budgets.toml names a model in [defaults]");
    shipped.replacen(line, &format!("model = {:?}", model.to_str().unwrap()), 1)
}

#[test]
fn serial_shipped_config_validates_matrix_here() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let shipped = std::fs::read_to_string(repo.join("budgets.toml")).unwrap();
    let smol = real_model("smollm2-135m-instruct");
    assert!(
        shipped.contains(&format!(
            "model = \"/var/cache/belljar/models/{}\"",
            smol.file_name().unwrap().to_str().unwrap()
        )),
        "budgets.toml names the fetched SmolLM2 in the default cache"
    );
    let t = TestDir::new();
    let demo = t.join("models/demo.gguf");
    run("worker", &["make-model", demo.to_str().unwrap()]).expect_code(0);
    for (what, model) in [("real", &smol), ("fallback", &demo)] {
        let config = t.write(&format!("{what}.toml"), &with_model(&shipped, model));
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
}
