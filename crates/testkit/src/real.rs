//! The real parts some end-to-end tests need beyond the built binaries: a real model from the
//! model cache, and the Python environment with jinja2 and the `openai` SDK. A missing one is a
//! failure that names the script which provides it, never a silently skipped test.

use std::path::{Path, PathBuf};

/// The model cache when `BELLJAR_MODEL_CACHE` is unset (scripts/fetch-models fills it).
pub const MODEL_CACHE: &str = "/var/cache/belljar/models";

/// The cache's file names of the models the tests know when the workspace has no
/// models/registry.toml.
const KNOWN: &[(&str, &str)] = &[("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")];

/// The workspace root (this crate lives in `<root>/crates/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit has a workspace root two levels up")
        .to_path_buf()
}

/// The model cache: `$BELLJAR_MODEL_CACHE`, else [`MODEL_CACHE`].
pub fn model_cache() -> PathBuf {
    std::env::var_os("BELLJAR_MODEL_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(MODEL_CACHE), PathBuf::from)
}

/// The cached file of the model the registry calls `name` (`[models.NAME] file = ...` in
/// models/registry.toml, or the built-in list while there is no registry); panics with the
/// command that fetches it when it is not in the cache.
#[track_caller]
pub fn real_model(name: &str) -> PathBuf {
    let file = registry_file(name);
    let path = model_cache().join(&file);
    assert!(
        path.is_file(),
        "the model {name} ({}) is not in the model cache: run scripts/fetch-models {name}",
        path.display()
    );
    path
}

/// The file name of the model `name`.
fn registry_file(name: &str) -> String {
    let registry = workspace_root().join("models/registry.toml");
    match std::fs::read_to_string(&registry) {
        Ok(text) => {
            let table: toml::Table = toml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", registry.display()));
            table
                .get("models")
                .and_then(|m| m.get(name))
                .and_then(|m| m.get("file"))
                .and_then(toml::Value::as_str)
                .unwrap_or_else(|| {
                    panic!(
                        "{} has no [models.{name}] with a file = \"...\"",
                        registry.display()
                    )
                })
                .to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => KNOWN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| (*f).to_owned())
            .unwrap_or_else(|| panic!("no model called {name} (known: {KNOWN:?})")),
        Err(e) => panic!("cannot read {}: {e}", registry.display()),
    }
}

/// The Python of the tests' environment: `${CARGO_TARGET_DIR:-<workspace>/target}/pyenv`
/// (scripts/pyenv makes it from tests/py/requirements.txt); panics with that command when it
/// is missing.
#[track_caller]
pub fn python() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("target"), PathBuf::from);
    // A relative CARGO_TARGET_DIR is one from the workspace root, where cargo is run.
    let path = workspace_root().join(target).join("pyenv/bin/python");
    assert!(
        path.is_file(),
        "the tests' Python environment ({}) is missing: run scripts/pyenv",
        path.display()
    );
    path
}

/// A config with one instance, `subject`, on the real model at `model` (mode `single`):
/// `ctx` tokens and a `ram_limit` above what `supervisor estimate` says it needs. One thread:
/// tests run side by side on few cores, where llama.cpp's spinning threads of several workers
/// would slow each other down far more than one thread each does.
pub fn subject_config(model: &Path, ctx: u32, ram_limit: &str) -> String {
    format!(
        r#"
[budget]
min_required = "64MiB"
headroom = "256MiB"

[defaults]
heartbeat_interval = "100ms"
backoff_initial = "50ms"
backoff_max = "1s"
stop_timeout = "10s"

[instances.subject]
model = "{}"
ctx = {ctx}
ram_limit = "{ram_limit}"
threads = 1

[modes.single]
instances = ["subject"]
"#,
        model.display()
    )
}
