//! `worker make-model`: writes a generated llama or gemma3 GGUF atomically (temp file, fsync, rename), so
//! an interrupted run never leaves a half-written model behind a valid name.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use belljar_gguf::{Arch, ModelShape, ModelSpec, WeightType};
use clap::{Args, ValueEnum};

use belljar_protocol::exit;

/// Write a deterministic llama- or gemma3-architecture GGUF with random weights (no download
/// needed).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  worker make-model models/demo.gguf\n  \
worker make-model /tmp/big.gguf --layers 6 --width 896 --ff 2432 --heads 14 --vocab 8192   # ~290 MB\n  \
worker make-model /tmp/gqa.gguf --heads 8 --kv-heads 2 --f16 --seed 3\n\n\
Shaped like real families (random weights, the real header shapes):\n  \
worker make-model /tmp/gemma3-270m.gguf --arch gemma3 --layers 18 --width 640 --ff 2048 --heads 4 --kv-heads 1 \\\n    \
--head-dim 256 --vocab 262144 --context-length 32768 --sliding-window 512 --tied --type q8_0\n  \
worker make-model /tmp/smollm2-135m.gguf --layers 30 --width 576 --ff 1536 --heads 9 --kv-heads 3 --vocab 49152 \\\n    \
--context-length 8192 --tied --type q8_0")]
pub struct MakeModelArgs {
    /// Where to write the model.
    pub out: PathBuf,
    /// Transformer blocks.
    #[arg(long, default_value_t = ModelShape::default().layers)]
    pub layers: u32,
    /// Embedding width (a multiple of --heads, unless --head-dim is given).
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
    /// Store matrices as f16 instead of f32 (an alias of --type f16).
    #[arg(long)]
    pub f16: bool,
    /// How the matrices and token embeddings are stored (norms stay f32); q8_0 and q4_0 are
    /// ggml's blocks of 32, so --width, --ff and --heads x head dimension must be multiples
    /// of 32.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub weight_type: Option<TypeArg>,
    /// The architecture: llama, or gemma3 (Q/K norms, post-attention and post-feed-forward
    /// norms, optional sliding window).
    #[arg(long, value_enum, default_value_t = ArchArg::Llama)]
    pub arch: ArchArg,
    /// Head dimension, when it is not --width / --heads: writes the key/value length keys and
    /// sizes the attention matrices by --heads x it.
    #[arg(long)]
    pub head_dim: Option<u32>,
    /// gemma3 only: the sliding-window attention's window (llama.cpp makes every 6th layer
    /// global, the others sliding).
    #[arg(long)]
    pub sliding_window: Option<u32>,
    /// With --sliding-window: every K-th layer is global, the others slide (llama.cpp's default
    /// is 6; K must be at least 2; K > --layers makes every layer slide).
    #[arg(long, value_name = "K")]
    pub swa_pattern: Option<u32>,
    /// Tied embeddings: no output matrix (llama.cpp uses the token embeddings for the output).
    #[arg(long)]
    pub tied: bool,
    /// Random seed: the same flags and seed give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    Llama,
    Gemma3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TypeArg {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
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
    let spec = ModelSpec {
        shape,
        arch: match args.arch {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Gemma3 => Arch::Gemma3,
        },
        head_dim: args.head_dim,
        sliding_window: args.sliding_window,
        swa_pattern: args.swa_pattern,
        tied: args.tied,
        weights: args.weight_type.map(|t| match t {
            TypeArg::F32 => WeightType::F32,
            TypeArg::F16 => WeightType::F16,
            TypeArg::Q8_0 => WeightType::Q8_0,
            TypeArg::Q4_0 => WeightType::Q4_0,
        }),
    };
    spec.check()
        .map_err(|e| (exit::USAGE, format!("invalid model shape: {e}")))?;
    let started = Instant::now();
    write_atomically(&args.out, &spec).map_err(|e| {
        (
            exit::IO_ERROR,
            format!("cannot write {}: {e}", args.out.display()),
        )
    })?;
    let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {} parameters, {} {}, {} layers x width {}, vocab {}) in {} ms",
        args.out.display(),
        belljar_budget::Size(size),
        spec.parameters(),
        spec.arch.name(),
        spec.weight_type().name(),
        spec.shape.layers,
        spec.shape.width,
        spec.shape.vocab,
        started.elapsed().as_millis()
    );
    Ok(())
}

fn write_atomically(out: &Path, spec: &ModelSpec) -> std::io::Result<()> {
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
        spec.write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
