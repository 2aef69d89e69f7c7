//! `worker inspect`: loads a model through llama.cpp and prints what llama.cpp sees. Proves a
//! file loads before a supervisor plans around it, and is how the generator is checked against
//! the real loader.

use std::path::PathBuf;
use std::time::Instant;

use belljar_host::probe_model_file;
use clap::Args;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use belljar_protocol::exit;

/// Load a GGUF model with llama.cpp and print its shape.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  worker inspect models/demo.gguf --json")]
pub struct InspectArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Read the model into memory instead of mapping it.
    #[arg(long)]
    pub no_mmap: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs, backend: &LlamaBackend) -> Result<(), (u8, String)> {
    let file = probe_model_file(&args.model).map_err(|e| (exit::BAD_MODEL, e.to_string()))?;
    let params = LlamaModelParams::default().with_use_mmap(!args.no_mmap);
    let started = Instant::now();
    let model = LlamaModel::load_from_file(backend, &file.path, &params).map_err(|e| {
        (
            exit::UNSUPPORTED_MODEL,
            format!(
                "llama.cpp cannot load {}: {e}; the file may be truncated or of an unsupported architecture (RUST_LOG=debug shows llama.cpp's reason)",
                file.path.display()
            ),
        )
    })?;
    let load_ms = started.elapsed().as_millis();
    let facts = serde_json::json!({
        "path": file.path,
        "file_size": file.size,
        "architecture": model.meta_val_str("general.architecture").ok(),
        "n_params": model.n_params(),
        "model_bytes": model.size(),
        "n_layer": model.n_layer(),
        "n_embd": model.n_embd(),
        "n_head": model.n_head(),
        "n_head_kv": model.n_head_kv(),
        "n_vocab": model.n_vocab(),
        "n_ctx_train": model.n_ctx_train(),
        "load_ms": load_ms,
    });
    if args.json {
        println!("{facts:#}");
    } else if let serde_json::Value::Object(map) = facts {
        for (k, v) in map {
            println!("{k:<13} {v}");
        }
    }
    Ok(())
}
