//! A deterministic generator of GGUF models with random weights, so tests, benchmarks and the
//! demo run on real llama.cpp without downloading anything.
//!
//! [`ModelShape`] is a llama-architecture model's size; [`ModelSpec`] adds what gives a model a
//! real family's header shape: the architecture (llama or gemma3), a head dimension other than
//! width / heads, a sliding window and its layer pattern, tied embeddings, and the matrices'
//! storage type (f32, f16, or real ggml Q8_0 / Q4_0 blocks). A [`ModelShape`] writes exactly
//! the bytes it wrote before those options existed.

use std::io::{self, Write};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::format::{
    ALIGNMENT, GGML_F16, GGML_F32, GGML_Q4_0, GGML_Q8_0, GGUF_VERSION, ValueType, type_block,
};

/// The shape of a generated model. Defaults give a ~5 MB model that loads in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: u32,
    pub width: u32,
    pub ff: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub vocab: u32,
    pub context_length: u32,
    pub f16: bool,
    pub seed: u64,
}

impl Default for ModelShape {
    fn default() -> Self {
        ModelShape {
            layers: 2,
            width: 256,
            ff: 768,
            heads: 4,
            kv_heads: 4,
            vocab: 1024,
            context_length: 4096,
            f16: false,
            seed: 0,
        }
    }
}

/// The architecture written to `general.architecture` (and the prefix of its keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arch {
    /// llama.cpp's `llama`: RMS norms, SwiGLU, rotary embeddings.
    #[default]
    Llama,
    /// llama.cpp's `gemma3` (src/models/gemma3.cpp): Q/K norms of the head dimension, norms
    /// after attention and after the feed-forward, GELU, and optionally a sliding window.
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// How the matrices (and the token embeddings) are stored. Norm weights are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F32,
    F16,
    /// ggml's Q8_0: blocks of 32 values, an f16 scale then 32 signed bytes.
    Q8_0,
    /// ggml's Q4_0: blocks of 32 values, an f16 scale then 16 bytes of 4-bit values.
    Q4_0,
}

impl WeightType {
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
        }
    }

    /// The ggml tensor type.
    pub fn ggml_type(self) -> u32 {
        match self {
            WeightType::F32 => GGML_F32,
            WeightType::F16 => GGML_F16,
            WeightType::Q8_0 => GGML_Q8_0,
            WeightType::Q4_0 => GGML_Q4_0,
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` (`LLAMA_FTYPE_MOSTLY_Q4_0` is 2,
    /// `LLAMA_FTYPE_MOSTLY_Q8_0` is 7).
    fn file_type(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7,
            WeightType::Q4_0 => 2,
        }
    }

    /// Values per block: a row (a tensor's first dimension) must be a multiple of it.
    pub fn block(self) -> u32 {
        match self {
            WeightType::F32 | WeightType::F16 => 1,
            WeightType::Q8_0 | WeightType::Q4_0 => QK,
        }
    }
}

/// Values per Q8_0 / Q4_0 block (ggml's `QK8_0`, `QK4_0`).
const QK: u32 = 32;

/// A [`ModelShape`] and the options that give it a real family's header shape. The default
/// options write exactly what the shape alone writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelSpec {
    pub shape: ModelShape,
    pub arch: Arch,
    /// The head dimension, when it is not width / heads: writes `{arch}.attention.key_length`
    /// and `value_length` (gemma3 writes them always).
    pub head_dim: Option<u32>,
    /// gemma3 only: `gemma3.attention.sliding_window`; llama.cpp then makes every 6th layer
    /// global and the others sliding (see `swa_pattern`).
    pub sliding_window: Option<u32>,
    /// With a sliding window: `{arch}.attention.sliding_window_pattern`, every K-th layer
    /// global, the others sliding (llama.cpp's `load_swa_pattern`; 6 when absent). K > layers
    /// makes every layer sliding, which llama.cpp runs (with an empty global cache); K = 1 makes
    /// none sliding, which it aborts on.
    pub swa_pattern: Option<u32>,
    /// No `output.weight`: llama.cpp uses the token embeddings for the output too.
    pub tied: bool,
    /// The matrices' type; `None`: f16 when `shape.f16`, else f32.
    pub weights: Option<WeightType>,
}

impl From<ModelShape> for ModelSpec {
    fn from(shape: ModelShape) -> Self {
        ModelSpec {
            shape,
            ..ModelSpec::default()
        }
    }
}

/// Special and byte tokens come first; the rest of the vocabulary is filler words.
pub const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// 3 special tokens + 256 byte tokens.
pub const MIN_VOCAB: u32 = 3 + 256;
/// Most tokens: the most elements the header reader accepts in one array
/// ([`crate::reader::MAX_ARRAY`]); published vocabularies have at most about 262k.
pub const MAX_VOCAB: u32 = crate::reader::MAX_ARRAY as u32;
/// Most layers llama.cpp loads (`LLAMA_MAX_LAYERS`).
pub const MAX_LAYERS: u32 = 512;
/// Most bytes of weights the generator writes: 1 TiB.
pub const MAX_WEIGHT_BYTES: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "layers {0} is more than llama.cpp loads ({MAX_LAYERS}, its LLAMA_MAX_LAYERS); pick --layers {MAX_LAYERS} or fewer"
    )]
    TooManyLayers(u32),
    #[error(
        "width {width} is not divisible by heads {heads}; pick a width that is a multiple of --heads, or give the head dimension with --head-dim"
    )]
    WidthHeads { width: u32, heads: u32 },
    #[error(
        "heads {heads} is not divisible by kv-heads {kv_heads}; --kv-heads must divide --heads (GQA groups)"
    )]
    Gqa { heads: u32, kv_heads: u32 },
    #[error("head dimension {0} (width / heads) must be even for rotary embeddings")]
    OddHeadDim(u32),
    #[error("--head-dim {0} must be even for rotary embeddings; pick an even head dimension")]
    OddHeadDimFlag(u32),
    #[error("vocab {0} is too small: the byte-level vocabulary needs at least {MIN_VOCAB} tokens")]
    Vocab(u32),
    #[error(
        "vocab {0} is more than the {MAX_VOCAB} tokens a GGUF vocabulary may have here (published vocabularies have at most about 262k); pick a smaller --vocab"
    )]
    VocabTooLarge(u32),
    #[error("--f16 is an alias of --type f16 and conflicts with --type {0}; give only one of them")]
    TypeConflict(&'static str),
    #[error(
        "--sliding-window needs --arch gemma3: llama.cpp's llama architecture has no sliding-window attention"
    )]
    WindowNeedsGemma3,
    #[error(
        "--sliding-window 0 is no window at all; leave --sliding-window out for global attention in every layer"
    )]
    WindowZero,
    #[error(
        "--sliding-window {window} is longer than the training context (--context-length {context}) and would slide over nothing; pick a window of at most {context}"
    )]
    WindowPastContext { window: u32, context: u32 },
    #[error("--swa-pattern needs --sliding-window: the pattern says which layers use the window")]
    PatternNeedsWindow,
    #[error(
        "--swa-pattern 0 makes every layer sliding in llama.cpp; to say so, give a pattern larger than --layers ({layers}), as llama.cpp's default of 6 does for fewer than 6 layers"
    )]
    PatternZero { layers: u32 },
    #[error(
        "--swa-pattern 1 makes every layer global, and llama.cpp aborts on a sliding window without a sliding layer (GGML_ASSERT is_swa_any); give a pattern of 2 or more, or leave --sliding-window out for global attention in every layer"
    )]
    PatternOne,
    #[error(
        "--type {ty} stores rows in blocks of {QK} values, but {what} is {value}, not a multiple of {QK}; {fix}, or use --type f32 or f16"
    )]
    QuantRows {
        ty: &'static str,
        what: &'static str,
        value: u64,
        fix: &'static str,
    },
    #[error(
        "the weights would take {bytes} bytes, more than the {MAX_WEIGHT_BYTES} bytes (1 TiB) the generator writes; make --layers, --width, --ff, --vocab, --heads or --head-dim smaller"
    )]
    TooLarge { bytes: u64 },
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    /// Norm weights are ones (and f32); everything else is random.
    ones: bool,
}

impl Tensor {
    fn elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, d| a.saturating_mul(*d))
    }
}

impl ModelShape {
    pub fn check(&self) -> Result<(), ShapeError> {
        self.spec().check()
    }

    /// width / heads (0 when heads is 0).
    pub fn head_dim(&self) -> u32 {
        self.width.checked_div(self.heads).unwrap_or(0)
    }

    /// Total parameter count.
    pub fn parameters(&self) -> u64 {
        self.spec().parameters()
    }

    /// Bytes of tensor data (without header and padding); a good approximation of file size.
    pub fn weight_bytes(&self) -> u64 {
        self.spec().weight_bytes()
    }

    /// The vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then unique filler words.
    pub fn tokens(&self) -> Vec<String> {
        let mut tokens: Vec<String> = Vec::with_capacity(self.vocab.min(MAX_VOCAB) as usize);
        tokens.extend(SPECIAL_TOKENS.iter().map(|s| (*s).to_owned()));
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let mut k = 1u64;
        while tokens.len() < self.vocab as usize {
            let word = bijective_base26(k);
            // Alternate bare pieces and word-initial pieces (SentencePiece's U+2581 marker).
            tokens.push(if k % 2 == 0 {
                format!("\u{2581}{word}")
            } else {
                word
            });
            k += 1;
        }
        tokens
    }

    /// Writes the model. The output is a pure function of the shape (seed included).
    pub fn write<W: Write>(&self, out: W) -> io::Result<()> {
        self.spec().write(out)
    }

    fn spec(&self) -> ModelSpec {
        ModelSpec::from(self.clone())
    }
}

impl ModelSpec {
    pub fn check(&self) -> Result<(), ShapeError> {
        let s = &self.shape;
        for (v, name) in [
            (s.layers, "layers"),
            (s.width, "width"),
            (s.ff, "ff"),
            (s.heads, "heads"),
            (s.kv_heads, "kv-heads"),
            (s.context_length, "context-length"),
            (self.head_dim.unwrap_or(1), "head-dim"),
        ] {
            if v == 0 {
                return Err(ShapeError::Zero(name));
            }
        }
        if s.layers > MAX_LAYERS {
            return Err(ShapeError::TooManyLayers(s.layers));
        }
        if self.head_dim.is_none() && s.width % s.heads != 0 {
            return Err(ShapeError::WidthHeads {
                width: s.width,
                heads: s.heads,
            });
        }
        if s.heads % s.kv_heads != 0 {
            return Err(ShapeError::Gqa {
                heads: s.heads,
                kv_heads: s.kv_heads,
            });
        }
        match self.head_dim {
            Some(d) if d % 2 != 0 => return Err(ShapeError::OddHeadDimFlag(d)),
            None if s.head_dim() % 2 != 0 => return Err(ShapeError::OddHeadDim(s.head_dim())),
            _ => {}
        }
        if s.vocab < MIN_VOCAB {
            return Err(ShapeError::Vocab(s.vocab));
        }
        if s.vocab > MAX_VOCAB {
            return Err(ShapeError::VocabTooLarge(s.vocab));
        }
        if let Some(t) = self.weights.filter(|t| s.f16 && *t != WeightType::F16) {
            return Err(ShapeError::TypeConflict(t.name()));
        }
        match (self.sliding_window, self.swa_pattern) {
            (None, Some(_)) => return Err(ShapeError::PatternNeedsWindow),
            (Some(_), _) if self.arch != Arch::Gemma3 => {
                return Err(ShapeError::WindowNeedsGemma3);
            }
            (Some(0), _) => return Err(ShapeError::WindowZero),
            (Some(w), _) if w > s.context_length => {
                return Err(ShapeError::WindowPastContext {
                    window: w,
                    context: s.context_length,
                });
            }
            (Some(_), Some(0)) => return Err(ShapeError::PatternZero { layers: s.layers }),
            (Some(_), Some(1)) => return Err(ShapeError::PatternOne),
            _ => {}
        }
        let ty = self.weight_type();
        let block = u64::from(ty.block());
        for (what, value, fix) in [
            (
                "--width",
                u64::from(s.width),
                "pick a --width that is a multiple of 32",
            ),
            (
                "--ff",
                u64::from(s.ff),
                "pick a --ff that is a multiple of 32",
            ),
            (
                "--heads x head dimension (attn_output's rows)",
                self.q_width(),
                "pick --heads and --head-dim (or --width) whose product is a multiple of 32",
            ),
        ] {
            if value % block != 0 {
                return Err(ShapeError::QuantRows {
                    ty: ty.name(),
                    what,
                    value,
                    fix,
                });
            }
        }
        let bytes = self.weight_bytes();
        if bytes > MAX_WEIGHT_BYTES {
            return Err(ShapeError::TooLarge { bytes });
        }
        Ok(())
    }

    /// The head dimension: `head_dim`, or width / heads.
    pub fn head_dim(&self) -> u32 {
        self.head_dim.unwrap_or_else(|| self.shape.head_dim())
    }

    /// The matrices' type: `weights`, or f16 / f32 by `shape.f16`.
    pub fn weight_type(&self) -> WeightType {
        self.weights.unwrap_or(if self.shape.f16 {
            WeightType::F16
        } else {
            WeightType::F32
        })
    }

    /// heads x head dimension: the width of the queries (attn_q's columns, attn_output's rows).
    fn q_width(&self) -> u64 {
        u64::from(self.shape.heads).saturating_mul(u64::from(self.head_dim()))
    }

    fn tensor_type(&self, t: &Tensor) -> u32 {
        if t.ones {
            GGML_F32
        } else {
            self.weight_type().ggml_type()
        }
    }

    fn tensor_bytes(&self, t: &Tensor) -> u64 {
        let (block, size) = type_block(self.tensor_type(t)).unwrap_or((1, 4));
        (t.elements() / block).saturating_mul(size)
    }

    /// The tensors before the blocks: the token embeddings.
    fn first_tensors(&self) -> Vec<Tensor> {
        let (w, v) = (u64::from(self.shape.width), u64::from(self.shape.vocab));
        vec![matrix("token_embd.weight".into(), w, v)]
    }

    /// Block `i`'s tensors, in the order llama.cpp's converters write them.
    fn layer_tensors(&self, i: u32) -> Vec<Tensor> {
        let (w, ff) = (u64::from(self.shape.width), u64::from(self.shape.ff));
        let hd = u64::from(self.head_dim());
        let q = self.q_width();
        let kv = u64::from(self.shape.kv_heads).saturating_mul(hd);
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        match self.arch {
            Arch::Llama => vec![
                norm(b("attn_norm"), w),
                matrix(b("attn_q"), w, q),
                matrix(b("attn_k"), w, kv),
                matrix(b("attn_v"), w, kv),
                matrix(b("attn_output"), q, w),
                norm(b("ffn_norm"), w),
                matrix(b("ffn_gate"), w, ff),
                matrix(b("ffn_down"), ff, w),
                matrix(b("ffn_up"), w, ff),
            ],
            Arch::Gemma3 => vec![
                norm(b("attn_norm"), w),
                matrix(b("attn_q"), w, q),
                matrix(b("attn_k"), w, kv),
                matrix(b("attn_v"), w, kv),
                matrix(b("attn_output"), q, w),
                norm(b("attn_q_norm"), hd),
                norm(b("attn_k_norm"), hd),
                norm(b("post_attention_norm"), w),
                norm(b("ffn_norm"), w),
                matrix(b("ffn_gate"), w, ff),
                matrix(b("ffn_down"), ff, w),
                matrix(b("ffn_up"), w, ff),
                norm(b("post_ffw_norm"), w),
            ],
        }
    }

    /// The tensors after the blocks: the final norm and, unless tied, the output matrix.
    fn last_tensors(&self) -> Vec<Tensor> {
        let (w, v) = (u64::from(self.shape.width), u64::from(self.shape.vocab));
        let mut out = vec![norm("output_norm.weight".into(), w)];
        if !self.tied {
            out.push(matrix("output.weight".into(), w, v));
        }
        out
    }

    /// Every tensor in file order (for a checked spec: at most [`MAX_LAYERS`] blocks).
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = self.first_tensors();
        for i in 0..self.shape.layers {
            out.extend(self.layer_tensors(i));
        }
        out.extend(self.last_tensors());
        out
    }

    /// The sum of `f` over every tensor, without listing every block's (saturates).
    fn sum(&self, f: impl Fn(&Tensor) -> u64) -> u64 {
        let add = |a: u64, b: u64| a.saturating_add(b);
        let ends = self
            .first_tensors()
            .iter()
            .chain(&self.last_tensors())
            .map(&f)
            .fold(0, add);
        let block = self.layer_tensors(0).iter().map(&f).fold(0, add);
        add(ends, block.saturating_mul(u64::from(self.shape.layers)))
    }

    /// Total parameter count (tied embeddings count once).
    pub fn parameters(&self) -> u64 {
        self.sum(Tensor::elements)
    }

    /// Bytes of tensor data (without header and padding); a good approximation of file size.
    pub fn weight_bytes(&self) -> u64 {
        self.sum(|t| self.tensor_bytes(t))
    }

    /// The metadata, in file order.
    fn metadata(&self) -> Vec<(String, Value)> {
        let s = &self.shape;
        let a = self.arch.name();
        let k = |key: &str| format!("{a}.{key}");
        let mut kvs: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::Str(a.into())),
            (
                "general.name".into(),
                Value::Str(format!("belljar-generated-seed{}", s.seed)),
            ),
            ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
            (
                "general.file_type".into(),
                Value::U32(self.weight_type().file_type()),
            ),
            (k("context_length"), Value::U32(s.context_length)),
            (k("embedding_length"), Value::U32(s.width)),
            (k("block_count"), Value::U32(s.layers)),
            (k("feed_forward_length"), Value::U32(s.ff)),
            (k("attention.head_count"), Value::U32(s.heads)),
            (k("attention.head_count_kv"), Value::U32(s.kv_heads)),
        ];
        let head_dim = [
            (k("attention.key_length"), Value::U32(self.head_dim())),
            (k("attention.value_length"), Value::U32(self.head_dim())),
        ];
        match self.arch {
            Arch::Llama => {
                if self.head_dim.is_some() {
                    kvs.extend(head_dim);
                }
                kvs.extend([
                    (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
                    (k("rope.dimension_count"), Value::U32(self.head_dim())),
                    (k("rope.freq_base"), Value::F32(10_000.0)),
                    (k("vocab_size"), Value::U32(s.vocab)),
                ]);
            }
            Arch::Gemma3 => {
                kvs.extend(head_dim);
                kvs.extend([
                    (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
                    (k("rope.freq_base"), Value::F32(1_000_000.0)),
                ]);
                if let Some(w) = self.sliding_window {
                    kvs.push((k("attention.sliding_window"), Value::U32(w)));
                }
                if let Some(p) = self.swa_pattern {
                    kvs.push((k("attention.sliding_window_pattern"), Value::U32(p)));
                }
            }
        }
        let tokens = s.tokens();
        let n = tokens.len();
        kvs.extend([
            ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
            ("tokenizer.ggml.tokens".into(), Value::Strs(tokens)),
            (
                "tokenizer.ggml.scores".into(),
                Value::F32s((0..n).map(|i| -(i as f32)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::I32s(
                    (0..n)
                        .map(|i| match i {
                            0 => 2,       // unknown
                            1 | 2 => 3,   // control
                            3..=258 => 6, // byte
                            _ => 1,       // normal
                        })
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ]);
        kvs
    }

    /// Writes the model. The output is a pure function of the spec (seed included).
    pub fn write<W: Write>(&self, out: W) -> io::Result<()> {
        self.check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut w = Counting {
            inner: out,
            written: 0,
        };
        let tensors = self.tensors();
        let kvs = self.metadata();

        w.write_all(crate::format::MAGIC)?;
        w.write_all(&GGUF_VERSION.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(kvs.len() as u64).to_le_bytes())?;
        for (key, value) in &kvs {
            write_str(&mut w, key)?;
            value.write(&mut w)?;
        }
        drop(kvs);
        let mut offset = 0u64;
        for t in &tensors {
            write_str(&mut w, &t.name)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes())?;
            }
            w.write_all(&self.tensor_type(t).to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset = align(offset + self.tensor_bytes(t));
        }
        w.pad()?;

        let ty = self.weight_type();
        let mut rng = ChaCha8Rng::seed_from_u64(self.shape.seed);
        // A multiple of the quantized block: a block never straddles two chunks.
        const CHUNK: usize = 1 << 16;
        let mut raw = vec![0u8; CHUNK * 4];
        let mut values = Vec::with_capacity(CHUNK);
        let mut buf = Vec::with_capacity(CHUNK * 4);
        for t in &tensors {
            let scale = 1.0 / (t.dims[0] as f32).sqrt();
            let mut left = t.elements() as usize;
            while left > 0 {
                let n = left.min(CHUNK);
                buf.clear();
                if t.ones {
                    buf.extend((0..n).flat_map(|_| 1.0f32.to_le_bytes()));
                } else {
                    rng.fill_bytes(&mut raw[..n * 4]);
                    values.clear();
                    values.extend(raw[..n * 4].chunks_exact(4).map(|c| {
                        let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
                    }));
                    match ty {
                        WeightType::F32 => buf.extend(values.iter().flat_map(|v| v.to_le_bytes())),
                        WeightType::F16 => buf.extend(
                            values
                                .iter()
                                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
                        ),
                        WeightType::Q8_0 => quantize_q8_0(&values, &mut buf),
                        WeightType::Q4_0 => quantize_q4_0(&values, &mut buf),
                    }
                }
                w.write_all(&buf)?;
                left -= n;
            }
            w.pad()?;
        }
        w.inner.flush()
    }
}

fn norm(name: String, len: u64) -> Tensor {
    Tensor {
        name,
        dims: vec![len],
        ones: true,
    }
}

/// A matrix of `rows` values per row (ggml's ne[0]) and `cols` rows.
fn matrix(name: String, rows: u64, cols: u64) -> Tensor {
    Tensor {
        name,
        dims: vec![rows, cols],
        ones: false,
    }
}

/// ggml's `quantize_row_q8_0_ref`: per block of 32, d = amax / 127 (stored as f16) and
/// q = round(x / d) as i8.
fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for block in x.chunks_exact(QK as usize) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
}

/// ggml's `quantize_row_q4_0_ref`: per block of 32, d = max / -8 where max is the value of the
/// largest magnitude (stored as f16), q = min(15, trunc(x / d + 8.5)); byte j holds element j in
/// its low nibble and element j + 16 in its high nibble.
fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let half_block = QK as usize / 2;
    for block in x.chunks_exact(QK as usize) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend((0..half_block).map(|j| q(block[j]) | (q(block[j + half_block]) << 4)));
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// 1 -> a, 26 -> z, 27 -> aa: every positive number gets a distinct word.
fn bijective_base26(mut k: u64) -> String {
    let mut out = Vec::new();
    while k > 0 {
        k -= 1;
        out.push(b'a' + (k % 26) as u8);
        k /= 26;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

impl Value {
    fn write<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let ty = |w: &mut W, t: ValueType| w.write_all(&(t as u32).to_le_bytes());
        let array = |w: &mut W, t: ValueType, n: usize| -> io::Result<()> {
            ty(w, ValueType::Array)?;
            w.write_all(&(t as u32).to_le_bytes())?;
            w.write_all(&(n as u64).to_le_bytes())
        };
        match self {
            Value::U32(v) => {
                ty(w, ValueType::U32)?;
                w.write_all(&v.to_le_bytes())
            }
            Value::F32(v) => {
                ty(w, ValueType::F32)?;
                w.write_all(&v.to_le_bytes())
            }
            Value::Bool(v) => {
                ty(w, ValueType::Bool)?;
                w.write_all(&[u8::from(*v)])
            }
            Value::Str(s) => {
                ty(w, ValueType::String)?;
                write_str(w, s)
            }
            Value::Strs(v) => {
                array(w, ValueType::String, v.len())?;
                v.iter().try_for_each(|s| write_str(w, s))
            }
            Value::F32s(v) => {
                array(w, ValueType::F32, v.len())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
            Value::I32s(v) => {
                array(w, ValueType::I32, v.len())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
        }
    }
}

fn write_str<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Tracks the position so padding to the alignment needs no seeking.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn pad(&mut self) -> io::Result<()> {
        let pad = align(self.written) - self.written;
        self.write_all(&vec![0u8; pad as usize])
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_unique() {
        assert_eq!(bijective_base26(1), "a");
        assert_eq!(bijective_base26(26), "z");
        assert_eq!(bijective_base26(27), "aa");
        let shape = ModelShape {
            vocab: 5000,
            ..ModelShape::default()
        };
        let tokens = shape.tokens();
        assert_eq!(tokens.len(), 5000);
        let unique: std::collections::BTreeSet<_> = tokens.iter().collect();
        assert_eq!(unique.len(), 5000, "duplicate tokens make llama.cpp abort");
        assert_eq!(tokens[3 + 10], "<0x0A>", "a newline token exists");
    }

    #[test]
    fn shape_errors() {
        let bad = |s: ModelShape| s.check().unwrap_err().to_string();
        assert!(
            bad(ModelShape {
                width: 250,
                ..Default::default()
            })
            .contains("not divisible by heads")
        );
        assert!(
            bad(ModelShape {
                kv_heads: 3,
                ..Default::default()
            })
            .contains("kv-heads must divide")
        );
        assert!(
            bad(ModelShape {
                vocab: 100,
                ..Default::default()
            })
            .contains("at least 259")
        );
        assert!(
            bad(ModelShape {
                layers: 0,
                ..Default::default()
            })
            .contains("layers must be at least 1")
        );
        assert!(
            bad(ModelShape {
                width: 12,
                heads: 4,
                kv_heads: 4,
                ..Default::default()
            })
            .contains("even")
        );
    }
}
