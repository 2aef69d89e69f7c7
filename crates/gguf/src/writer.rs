//! A deterministic generator of llama-architecture GGUF models with random weights, so tests,
//! benchmarks and the demo run on real llama.cpp without downloading anything.

use std::io::{self, Write};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::format::{ALIGNMENT, GGML_F16, GGML_F32, GGUF_VERSION, ValueType};

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

/// Special and byte tokens come first; the rest of the vocabulary is filler words.
pub const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// 3 special tokens + 256 byte tokens.
pub const MIN_VOCAB: u32 = 3 + 256;

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "width {width} is not divisible by heads {heads}; pick a width that is a multiple of --heads"
    )]
    WidthHeads { width: u32, heads: u32 },
    #[error(
        "heads {heads} is not divisible by kv-heads {kv_heads}; --kv-heads must divide --heads (GQA groups)"
    )]
    Gqa { heads: u32, kv_heads: u32 },
    #[error("head dimension {0} (width / heads) must be even for rotary embeddings")]
    OddHeadDim(u32),
    #[error("vocab {0} is too small: the byte-level vocabulary needs at least {MIN_VOCAB} tokens")]
    Vocab(u32),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    /// Norm weights are ones; everything else is random.
    ones: bool,
}

impl Tensor {
    fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

impl ModelShape {
    pub fn check(&self) -> Result<(), ShapeError> {
        for (v, name) in [
            (self.layers, "layers"),
            (self.width, "width"),
            (self.ff, "ff"),
            (self.heads, "heads"),
            (self.kv_heads, "kv-heads"),
            (self.context_length, "context-length"),
        ] {
            if v == 0 {
                return Err(ShapeError::Zero(name));
            }
        }
        if self.width % self.heads != 0 {
            return Err(ShapeError::WidthHeads {
                width: self.width,
                heads: self.heads,
            });
        }
        if self.heads % self.kv_heads != 0 {
            return Err(ShapeError::Gqa {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if self.head_dim() % 2 != 0 {
            return Err(ShapeError::OddHeadDim(self.head_dim()));
        }
        if self.vocab < MIN_VOCAB {
            return Err(ShapeError::Vocab(self.vocab));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> u32 {
        self.width / self.heads
    }

    fn tensors(&self) -> Vec<Tensor> {
        let (w, ff, v) = (
            u64::from(self.width),
            u64::from(self.ff),
            u64::from(self.vocab),
        );
        let kv = u64::from(self.kv_heads * self.head_dim());
        let t = |name: String, dims: Vec<u64>| Tensor {
            ones: dims.len() == 1,
            name,
            dims,
        };
        let mut out = vec![t("token_embd.weight".into(), vec![w, v])];
        for i in 0..self.layers {
            let b = |s: &str| format!("blk.{i}.{s}.weight");
            out.extend([
                t(b("attn_norm"), vec![w]),
                t(b("attn_q"), vec![w, w]),
                t(b("attn_k"), vec![w, kv]),
                t(b("attn_v"), vec![w, kv]),
                t(b("attn_output"), vec![w, w]),
                t(b("ffn_norm"), vec![w]),
                t(b("ffn_gate"), vec![w, ff]),
                t(b("ffn_down"), vec![ff, w]),
                t(b("ffn_up"), vec![w, ff]),
            ]);
        }
        out.push(t("output_norm.weight".into(), vec![w]));
        out.push(t("output.weight".into(), vec![w, v]));
        out
    }

    /// Norm weights are kept in f32 (as llama.cpp's converters do); matrices use f16 with `f16`.
    fn tensor_type(&self, t: &Tensor) -> u32 {
        if self.f16 && !t.ones {
            GGML_F16
        } else {
            GGML_F32
        }
    }

    fn tensor_bytes(&self, t: &Tensor) -> u64 {
        t.elements()
            * if self.tensor_type(t) == GGML_F16 {
                2
            } else {
                4
            }
    }

    /// Total parameter count.
    pub fn parameters(&self) -> u64 {
        self.tensors().iter().map(Tensor::elements).sum()
    }

    /// Bytes of tensor data (without header and padding); a good approximation of file size.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors().iter().map(|t| self.tensor_bytes(t)).sum()
    }

    /// The vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then unique filler words.
    pub fn tokens(&self) -> Vec<String> {
        let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| (*s).to_owned()).collect();
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
        self.check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut w = Counting {
            inner: out,
            written: 0,
        };
        let tensors = self.tensors();
        let tokens = self.tokens();
        let n = tokens.len();
        let kvs: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::Str("llama".into())),
            (
                "general.name",
                Value::Str(format!("belljar-generated-seed{}", self.seed)),
            ),
            ("general.alignment", Value::U32(ALIGNMENT as u32)),
            ("general.file_type", Value::U32(u32::from(self.f16))),
            ("llama.context_length", Value::U32(self.context_length)),
            ("llama.embedding_length", Value::U32(self.width)),
            ("llama.block_count", Value::U32(self.layers)),
            ("llama.feed_forward_length", Value::U32(self.ff)),
            ("llama.attention.head_count", Value::U32(self.heads)),
            ("llama.attention.head_count_kv", Value::U32(self.kv_heads)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.dimension_count", Value::U32(self.head_dim())),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
            ("llama.vocab_size", Value::U32(self.vocab)),
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", Value::Strs(tokens)),
            (
                "tokenizer.ggml.scores",
                Value::F32s((0..n).map(|i| -(i as f32)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
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
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ];

        w.write_all(crate::format::MAGIC)?;
        w.write_all(&GGUF_VERSION.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(kvs.len() as u64).to_le_bytes())?;
        for (key, value) in &kvs {
            write_str(&mut w, key)?;
            value.write(&mut w)?;
        }
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

        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        const CHUNK: usize = 1 << 16;
        let mut raw = vec![0u8; CHUNK * 4];
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
                    let values = raw[..n * 4].chunks_exact(4).map(|c| {
                        let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
                    });
                    if self.f16 {
                        buf.extend(values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()));
                    } else {
                        buf.extend(values.flat_map(f32::to_le_bytes));
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
