//! `worker make-model`: writes a generated llama GGUF atomically (temp file, fsync, rename), so
//! an interrupted run never leaves a half-written model behind a valid name.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use belljar_gguf::ModelShape;
use clap::Args;

use belljar_protocol::exit;

/// Write a deterministic llama-architecture GGUF with random weights (no download needed).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  worker make-model models/demo.gguf\n  \
worker make-model /tmp/big.gguf --layers 6 --width 896 --ff 2432 --heads 14 --vocab 8192   # ~290 MB\n  \
worker make-model /tmp/gqa.gguf --heads 8 --kv-heads 2 --f16 --seed 3")]
pub struct MakeModelArgs {
    /// Where to write the model.
    pub out: PathBuf,
    /// Transformer blocks.
    #[arg(long, default_value_t = ModelShape::default().layers)]
    pub layers: u32,
    /// Embedding width (a multiple of --heads).
    #[arg(long, default_value_t = ModelShape::default().width)]
    pub width: u32,
    /// Feed-forward width.
    #[arg(long, default_value_t = ModelShape::default().ff)]
    pub ff: u32,
    /// Attention heads.
    #[arg(long, default_value_t = ModelShape::default().heads)]
    pub heads: u32,
    /// Key/value heads (must divide --heads; fewer than --heads makes a GQA model).
    #[arg(long)]
    pub kv_heads: Option<u32>,
    /// Vocabulary size (at least 259: 3 special + 256 byte tokens).
    #[arg(long, default_value_t = ModelShape::default().vocab)]
    pub vocab: u32,
    /// The training context length written into the metadata.
    #[arg(long, default_value_t = ModelShape::default().context_length)]
    pub context_length: u32,
    /// Store matrices as f16 instead of f32.
    #[arg(long)]
    pub f16: bool,
    /// Random seed: the same flags and seed give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &MakeModelArgs) -> Result<(), (u8, String)> {
    let shape = ModelShape {
        layers: args.layers,
        width: args.width,
        ff: args.ff,
        heads: args.heads,
        kv_heads: args.kv_heads.unwrap_or(args.heads),
        vocab: args.vocab,
        context_length: args.context_length,
        f16: args.f16,
        seed: args.seed,
    };
    shape
        .check()
        .map_err(|e| (exit::USAGE, format!("invalid model shape: {e}")))?;
    let started = Instant::now();
    write_atomically(&args.out, &shape).map_err(|e| {
        (
            exit::IO_ERROR,
            format!("cannot write {}: {e}", args.out.display()),
        )
    })?;
    let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {} parameters, {} layers x width {}, vocab {}) in {} ms",
        args.out.display(),
        belljar_budget::Size(size),
        shape.parameters(),
        shape.layers,
        shape.width,
        shape.vocab,
        started.elapsed().as_millis()
    );
    Ok(())
}

fn write_atomically(out: &Path, shape: &ModelShape) -> std::io::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        shape.write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
