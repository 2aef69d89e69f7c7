//! How much memory an instance needs: the estimate from its model file, and the reservation
//! (`required`) that the budget, the ledger and the cgroup limit all use.

use serde::{Deserialize, Serialize};

use crate::grammar::Size;

/// The knobs of the file-size rule (`[budget] estimate_factor`, `min_required`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimateRule {
    pub factor: f64,
    pub min_required: Size,
}

impl EstimateRule {
    /// `max(file size x factor, min_required)`, rounded up to a whole byte. The floor keeps tiny
    /// models from OOM-looping: a 0.6 MB model's worker still peaks at ~14 MB.
    pub fn estimate(&self, file_size: u64) -> u64 {
        let scaled = (file_size as f64 * self.factor).ceil();
        // f64 -> u64 saturates, so an absurd factor cannot wrap around to a small number.
        (scaled as u64).max(self.min_required.bytes())
    }
}

/// How an instance's estimate is made (`[budget] estimate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimateSource {
    /// `max(file size x estimate_factor, min_required)`.
    File,
    /// From the model's GGUF header: weights + KV cache + compute + baseline ([`gguf`]).
    #[default]
    Gguf,
    /// The larger of the two: never below the file-size rule.
    Max,
}

impl EstimateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EstimateSource::File => "file",
            EstimateSource::Gguf => "gguf",
            EstimateSource::Max => "max",
        }
    }
}

/// Where an instance's estimate came from: the file rule, the GGUF header, or the learned
/// peaks that raised it. Spelled `file`, `gguf`, `learned` in `status`, `validate` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File,
    Gguf,
    Learned,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Gguf => "gguf",
            Origin::Learned => "learned",
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the GGUF-aware estimate reads from a model's header (no tensor data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ModelFacts {
    pub file_size: u64,
    /// The sum of every tensor's bytes.
    pub tensor_bytes: u64,
    pub block_count: u32,
    pub embedding: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// `feed_forward_length` (0 when absent: the activations then count four widths).
    pub ff: u32,
    /// Per-head K and V widths (`attention.key_length` / `value_length`, else embedding / heads).
    pub key_length: u32,
    pub value_length: u32,
    /// Tokens in the vocabulary: the length of `tokenizer.ggml.tokens` (0 when absent).
    pub vocab: u32,
    /// BPE merges: the length of `tokenizer.ggml.merges` (0 for other tokenizers).
    pub merges: u32,
    /// No `output.weight`: llama.cpp uses `token_embd` for the output layer too.
    pub tied: bool,
    /// `attention.sliding_window` (0: no sliding-window layers). The worker keeps those layers'
    /// KV cache full-size, so it does not shrink the KV term (docs/configuration.md says why).
    pub sliding_window: u32,
    /// Bytes of the weight matrices that llama.cpp repacks for this CPU into its CPU_REPACK
    /// buffer ([`repacks`]).
    pub repack: u64,
    /// With tied embeddings whose type this CPU repacks: the output layer's repacked copy of
    /// `token_embd` (the input keeps the original for its row lookups).
    pub tied_repack: u64,
}

/// The SIMD features that decide which quantized types llama.cpp repacks on the CPU. They are
/// those the worker's llama.cpp was compiled for, not the running CPU's: llama-cpp-sys-2 builds
/// ggml without `GGML_NATIVE`, with ggml's default x86-64 set (AVX2, no AVX-512), and on
/// aarch64 with the Rust target's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512: bool,
    pub neon_dotprod: bool,
    pub neon_i8mm: bool,
}

/// Whether llama.cpp (ggml-cpu's `ggml_repack_get_optimal_repack_type`, llama-cpp-sys-2
/// 0.1.160) repacks a weight matrix of `ggml_type` with `rows` rows (`ne[1]`) on `cpu`.
pub fn repacks(cpu: CpuFeatures, ggml_type: u32, rows: u64) -> bool {
    let by = |n: u64| rows % n == 0;
    let arm = cpu.neon_dotprod || cpu.neon_i8mm;
    match ggml_type {
        // Q4_0
        2 => (cpu.avx2 && by(8)) || (arm && by(4)),
        // Q8_0
        8 => arm && by(4),
        // Q2_K
        10 => cpu.avx512 && by(8),
        // Q4_K
        12 => (cpu.avx2 || arm) && by(8),
        // Q5_K, Q6_K
        13 | 14 => arm && by(8),
        // IQ4_NL, MXFP4
        20 | 39 => (cpu.avx2 && by(8)) || (cpu.neon_dotprod && by(4)),
        _ => false,
    }
}

/// Whether a tensor is one llama.cpp multiplies as a weight matrix on the CPU (and so may
/// repack): a 2-D matrix (3-D: a mixture's experts) of a repeating layer or the output layer.
/// Embeddings are looked up by row, and convolutions are not matrix products.
pub fn weight_matrix(name: &str, dims: usize) -> bool {
    (dims == 2 || dims == 3)
        && (name.starts_with("blk.") || name == "output.weight")
        && !name.contains("embd")
        && !name.contains("conv")
}

/// llama.cpp's default micro-batch (`n_ubatch`): the compute buffers are sized for it.
pub const UBATCH: u64 = 512;
/// Bytes of KV cache element (llama.cpp's default K and V type, f16).
pub const KV_ELEMENT: u64 = 2;
/// The worker process itself in its cgroup: binary and shared libraries (page cache, as a fresh
/// start reads them), heap, llama.cpp's tables. Fitted (bench/estimate.py).
pub const BASELINE: u64 = 16 << 20;
/// Bytes of a micro-batch's activations per unit of width: a 512-token micro-batch of f32.
pub const ACTIVATION: u64 = UBATCH * 4;
/// Bytes of an attention mask per context cell: one micro-batch's row of f16.
pub const MASK_PER_CTX: u64 = UBATCH * 2;

/// Bytes per vocabulary token beside the logits buffer: llama.cpp's tokenizer tables (each
/// token's text, score and attributes, the text-to-id map, the piece cache), the sampler's
/// candidate array and the compute graph's row of logits. Fitted.
pub const VOCAB_PER_TOKEN: u64 = 166;
/// Bytes per BPE merge: llama.cpp's rank map of merged pairs and the metadata's strings. Fitted
/// (SmolLM2's 48,900 merges).
pub const PER_MERGE: u64 = 200;
/// Bytes of one logit (f32): llama.cpp's output buffer holds one row per output, and the worker
/// asks for one (the prompt's last token).
pub const LOGIT: u64 = 4;
/// Headroom on top of the sum, in percent: the fitted terms are within about 3% of the
/// measured peaks, so this keeps the estimate above them.
pub const MARGIN_PERCENT: u64 = 3;

/// The GGUF-aware estimate, term by term (bytes). `total` is the reservation before `ram_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    pub ctx: u32,
    pub mmap: bool,
    /// The weights: file pages with mmap (reclaimable but the working set), anonymous memory
    /// without (less what is repacked: that is in `repack`).
    pub weights: u64,
    /// Without mmap, reading the file also fills the page cache, charged to the same cgroup
    /// (cgroup v1 and v2): one file's worth, reclaimable.
    pub page_cache: u64,
    /// llama.cpp's CPU_REPACK buffer: the matrices of the types this CPU repacks, in an
    /// anonymous copy (with mmap beside the file's pages, without mmap instead of their share
    /// of `weights`), plus the output's copy of tied embeddings of such a type.
    pub repack: u64,
    /// `2 x layers x ctx x kv_heads x head_dim x 2 bytes` (K and V, f16). Sliding-window
    /// layers are kept full-size, so they count like the others.
    pub kv: u64,
    /// llama.cpp's output buffer: one row of `vocab` f32 logits.
    pub output: u64,
    /// The vocabulary's tables: [`VOCAB_PER_TOKEN`] per token and [`PER_MERGE`] per BPE merge.
    pub vocab: u64,
    /// What a prompt that fills the context touches of the compute buffer ([`compute`]).
    pub compute: u64,
    pub baseline: u64,
    pub margin: u64,
    pub total: u64,
    /// What may be reclaimed without hurting the worker (the page-cache copy without mmap):
    /// the cgroup's `memory.low` protects `total - reclaimable`.
    pub reclaimable: u64,
}

/// A term of the estimate that does not fit 64 bits: the header's numbers are corrupt or
/// crafted (no real model comes near).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "its {term} overflows 64 bits ({fields}); the header is corrupt or crafted: use another model file"
)]
pub struct Overflow {
    pub term: &'static str,
    pub fields: String,
}

/// The KV cache of a model at `ctx` cells (K and V, every layer, f16).
pub fn kv_cache(m: &ModelFacts, ctx: u32) -> Result<u64, Overflow> {
    u64::from(m.block_count)
        .checked_mul(u64::from(m.kv_heads))
        .and_then(|v| v.checked_mul(u64::from(m.key_length) + u64::from(m.value_length)))
        .and_then(|v| v.checked_mul(KV_ELEMENT))
        .and_then(|v| v.checked_mul(u64::from(ctx)))
        .ok_or_else(|| Overflow {
            term: "KV cache",
            fields: format!(
                "block_count {} x head_count_kv {} x (key_length {} + value_length {}) x {KV_ELEMENT} bytes x ctx {ctx}",
                m.block_count, m.kv_heads, m.key_length, m.value_length
            ),
        })
}

/// What a prompt that fills the context touches of llama.cpp's compute buffer: the larger of a
/// micro-batch's feed-forward activations (gate, up and their product, and two widths) and its
/// attention activations (three widths, Q and the attention output, K and V), plus the
/// attention masks' rows for every context cell (a sliding-window model has two masks). The
/// buffer llama.cpp allocates is larger (it reserves the logits of a whole micro-batch, which the
/// worker never asks for: it wants one token's), and a short prompt touches less.
pub fn compute(m: &ModelFacts, ctx: u32) -> Option<u64> {
    let width = u64::from(m.embedding);
    let ff = if m.ff > 0 { u64::from(m.ff) } else { 4 * width };
    let feed_forward = ff.checked_mul(3)?.checked_add(2 * width)?;
    let attention = u64::from(m.heads)
        .checked_mul(u64::from(m.key_length))?
        .checked_mul(2)?
        .checked_add(
            u64::from(m.kv_heads)
                .checked_mul(u64::from(m.key_length) + u64::from(m.value_length))?,
        )?
        .checked_add(3 * width)?;
    let masks: u64 = if m.sliding_window > 0 { 2 } else { 1 };
    feed_forward
        .max(attention)
        .checked_mul(ACTIVATION)?
        .checked_add(masks * MASK_PER_CTX * u64::from(ctx))
}

/// The GGUF-aware estimate of a worker's peak in its cgroup at `ctx`, with or without mmap.
/// Every term is checked: a header whose numbers overflow is an error naming them, never a
/// wrapped (small) or saturated estimate.
pub fn gguf(m: &ModelFacts, ctx: u32, mmap: bool) -> Result<Breakdown, Overflow> {
    let repacked = m.repack.min(m.tensor_bytes);
    let (weights, page_cache) = if mmap {
        (m.file_size, 0)
    } else {
        (m.tensor_bytes - repacked, m.file_size)
    };
    let repack = repacked
        .checked_add(m.tied_repack)
        .ok_or_else(|| Overflow {
            term: "repack buffer",
            fields: format!(
                "repacked matrices {repacked} + tied output {} bytes",
                m.tied_repack
            ),
        })?;
    let kv = kv_cache(m, ctx)?;
    let vocab = u64::from(m.vocab);
    let output = vocab * LOGIT;
    let vocab_tables = vocab * VOCAB_PER_TOKEN + u64::from(m.merges) * PER_MERGE;
    let compute = compute(m, ctx).ok_or_else(|| Overflow {
        term: "compute buffer",
        fields: format!(
            "embedding_length {} x feed_forward_length {} x heads {} x key_length {}, ctx {ctx}",
            m.embedding, m.ff, m.heads, m.key_length
        ),
    })?;
    let total_overflow = || Overflow {
        term: "total",
        fields: format!(
            "weights {weights} + page cache {page_cache} + repack {repack} + KV cache {kv} + compute {compute} bytes"
        ),
    };
    let sum = [
        page_cache,
        repack,
        kv,
        output,
        vocab_tables,
        compute,
        BASELINE,
    ]
    .into_iter()
    .try_fold(weights, u64::checked_add)
    .ok_or_else(total_overflow)?;
    let margin = sum / 100 * MARGIN_PERCENT;
    let total = sum
        .checked_add(margin)
        .and_then(checked_align_up)
        .ok_or_else(total_overflow)?;
    Ok(Breakdown {
        ctx,
        mmap,
        weights,
        page_cache,
        repack,
        kv,
        output,
        vocab: vocab_tables,
        compute,
        baseline: BASELINE,
        margin,
        total,
        reclaimable: page_cache,
    })
}

/// Whether every term of the estimate fits 64 bits at any ctx the config allows
/// ([`crate::limits::MAX_CTX`]), with or without mmap: a model that passes has an estimate at
/// every ctx.
pub fn check_facts(m: &ModelFacts) -> Result<(), Overflow> {
    gguf(m, crate::limits::MAX_CTX, false)?;
    gguf(m, crate::limits::MAX_CTX, true)?;
    Ok(())
}

/// Observed peaks of earlier runs of the same model at the same ctx and mmap: the estimate is
/// raised to the 95th percentile x 1.1 (nearest rank). None without observations.
pub fn learned(peaks: &[u64]) -> Option<u64> {
    if peaks.is_empty() {
        return None;
    }
    let mut v = peaks.to_vec();
    v.sort_unstable();
    let rank = (v.len() * 95).div_ceil(100).max(1);
    let p95 = v[rank - 1];
    Some(align_up(p95.saturating_add(p95 / 10)))
}

/// Reservations are whole multiples of this: the kernel keeps cgroup limits in pages (rounding
/// down), and 64 KiB is a multiple of every page size Linux uses, so the limit the kernel stores
/// is exactly the ledger's allocation.
pub const GRANULE: u64 = 64 << 10;

/// Rounds up to a whole [`GRANULE`]; `None` past the largest multiple.
pub fn checked_align_up(bytes: u64) -> Option<u64> {
    bytes.div_ceil(GRANULE).checked_mul(GRANULE)
}

/// Rounds up to a whole [`GRANULE`].
pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(GRANULE).saturating_mul(GRANULE)
}

/// Rounds down to a whole [`GRANULE`].
pub fn align_down(bytes: u64) -> u64 {
    bytes / GRANULE * GRANULE
}

/// `max(ram_limit, estimate)`, rounded up to a whole [`GRANULE`]: a `ram_limit` may raise the
/// reservation but never lower it below what the model needs (a limit below the need only
/// produces OOM kills).
pub fn required(ram_limit: Option<Size>, estimate: u64) -> u64 {
    align_up(ram_limit.map_or(estimate, |l| l.bytes().max(estimate)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crafted header once wrapped the KV term to 0 B: 2^31 layers x 2^31 KV heads x
    /// (2^31 + 2^31) per-head widths x 2 bytes is 2^96.
    #[test]
    fn an_overflowing_term_is_an_error_naming_the_fields() {
        let m = ModelFacts {
            block_count: 1 << 31,
            kv_heads: 1 << 31,
            key_length: 1 << 31,
            value_length: 1 << 31,
            ..facts()
        };
        let e = gguf(&m, 1, true).unwrap_err();
        assert_eq!(e.term, "KV cache");
        let said = e.to_string();
        assert!(
            said.contains("block_count 2147483648") && said.contains("another model file"),
            "{said}"
        );
        assert!(check_facts(&m).is_err());
        // Each factor fits, the product at the largest ctx does not.
        let wide = ModelFacts {
            block_count: 1 << 16,
            kv_heads: 1 << 10,
            key_length: 1 << 12,
            value_length: 1 << 12,
            ..facts()
        };
        assert!(gguf(&wide, 1, true).is_ok());
        assert!(check_facts(&wide).is_err(), "checked at MAX_CTX");
        let huge_file = ModelFacts {
            file_size: u64::MAX - 1,
            ..facts()
        };
        assert_eq!(gguf(&huge_file, 1, true).unwrap_err().term, "total");
        check_facts(&facts()).unwrap();
    }
    use proptest::prelude::*;

    const RULE: EstimateRule = EstimateRule {
        factor: 1.5,
        min_required: Size(64 << 20),
    };

    #[test]
    fn file_times_factor_with_a_floor() {
        assert_eq!(RULE.estimate(1 << 30), 3 << 29);
        assert_eq!(
            RULE.estimate(600_000),
            64 << 20,
            "tiny models get the floor"
        );
        assert_eq!(RULE.estimate(0), 64 << 20);
        assert_eq!(RULE.estimate(3), 64 << 20);
    }

    const MIB: u64 = 1 << 20;

    /// The 290M bench model: 6 layers, width 896, 14 heads of 64.
    fn facts() -> ModelFacts {
        ModelFacts {
            file_size: 292_902_240,
            tensor_bytes: 292_800_000,
            block_count: 6,
            embedding: 896,
            heads: 14,
            kv_heads: 14,
            key_length: 64,
            value_length: 64,
            vocab: 8192,
            ..Default::default()
        }
    }

    #[test]
    fn kv_is_two_x_layers_x_ctx_x_kv_heads_x_head_dim_x_f16() {
        assert_eq!(
            kv_cache(&facts(), 16384).unwrap(),
            2 * 6 * 16384 * 14 * 64 * 2
        );
        assert_eq!(
            kv_cache(&facts(), 16384).unwrap(),
            336 * MIB,
            "llama.cpp's reported KV buffer"
        );
        let gqa = ModelFacts {
            kv_heads: 2,
            ..facts()
        };
        assert_eq!(kv_cache(&gqa, 16384).unwrap(), 48 * MIB);
    }

    #[test]
    fn every_term_of_the_breakdown() {
        let m = facts();
        let b = gguf(&m, 4096, true).unwrap();
        assert_eq!(b.weights, m.file_size, "mmap: the file's pages");
        assert_eq!(b.page_cache, 0);
        assert_eq!(b.reclaimable, 0);
        assert_eq!(b.repack, 0);
        assert_eq!(b.kv, 84 * MIB);
        assert_eq!(b.output, 8192 * 4, "one row of f32 logits");
        assert_eq!(b.vocab, 8192 * VOCAB_PER_TOKEN);
        assert_eq!(b.compute, compute(&m, 4096).unwrap());
        assert_eq!(b.baseline, BASELINE);
        let sum = b.weights + b.kv + b.output + b.vocab + b.compute + b.baseline;
        assert_eq!(b.margin, sum / 100 * MARGIN_PERCENT);
        assert_eq!(b.total, align_up(sum + b.margin));
        assert_eq!(b.total % GRANULE, 0);
        let n = gguf(&m, 4096, false).unwrap();
        assert_eq!(n.weights, m.tensor_bytes, "no mmap: an anonymous copy");
        assert_eq!(
            n.page_cache, m.file_size,
            "and the page cache of reading it"
        );
        assert_eq!(n.reclaimable, m.file_size);
        assert!(n.total > b.total);
    }

    /// Gemma 3 270M Q4_K_M's header (models/registry.toml), as this CPU's llama.cpp loads it:
    /// the figures its log states are the expected values.
    fn gemma3_270m() -> ModelFacts {
        ModelFacts {
            file_size: 253_113_024,
            tensor_bytes: 246_587_904,
            block_count: 18,
            embedding: 640,
            heads: 4,
            kv_heads: 1,
            ff: 2048,
            key_length: 256,
            value_length: 256,
            vocab: 262_144,
            merges: 0,
            tied: true,
            sliding_window: 512,
            // 18 attn_output [1024, 640] and 9 ffn_down [2048, 640] in Q4_K.
            repack: 18 * 368_640 + 9 * 737_280,
            tied_repack: 0,
        }
    }

    #[test]
    fn repacked_matrices_are_an_anonymous_copy_beside_the_mapped_file() {
        let m = gemma3_270m();
        let on = gguf(&m, 4096, true).unwrap();
        // llama.cpp: "CPU_REPACK model buffer size = 12.66 MiB" with and without mmap.
        assert_eq!(on.repack, 13_271_040);
        assert_eq!(on.weights, m.file_size, "beside the whole file's pages");
        let off = gguf(&m, 4096, false).unwrap();
        assert_eq!(off.repack, 13_271_040);
        assert_eq!(
            off.weights + off.repack,
            m.tensor_bytes,
            "without mmap the repacked matrices are loaded straight into the repack buffer"
        );
        // "CPU model buffer size = 222.51 MiB"
        assert_eq!(off.weights, 233_316_864);
    }

    #[test]
    fn tied_embeddings_of_a_repacked_type_cost_a_second_copy() {
        let m = ModelFacts {
            tied_repack: 30 << 20,
            ..gemma3_270m()
        };
        let plain = gguf(&gemma3_270m(), 512, true).unwrap();
        for mmap in [true, false] {
            let b = gguf(&m, 512, mmap).unwrap();
            let without = gguf(&gemma3_270m(), 512, mmap).unwrap();
            assert_eq!(b.repack, without.repack + (30 << 20), "mmap {mmap}");
            assert_eq!(b.weights, without.weights, "mmap {mmap}");
        }
        assert!(gguf(&m, 512, true).unwrap().total > plain.total);
    }

    #[test]
    fn a_large_vocabulary_sizes_the_output_and_the_tables() {
        let m = gemma3_270m();
        let b = gguf(&m, 512, true).unwrap();
        // "CPU  output buffer size = 1.00 MiB"
        assert_eq!(b.output, MIB);
        assert_eq!(
            b.vocab,
            262_144 * VOCAB_PER_TOKEN,
            "SentencePiece: no merges"
        );
        let bpe = ModelFacts {
            merges: 48_900,
            ..m
        };
        assert_eq!(
            gguf(&bpe, 512, true).unwrap().vocab,
            b.vocab + 48_900 * PER_MERGE
        );
        let small = ModelFacts { vocab: 1024, ..m };
        let s = gguf(&small, 512, true).unwrap();
        assert!(b.total - s.total >= (b.output + b.vocab) - (s.output + s.vocab));
    }

    #[test]
    fn sliding_window_layers_are_counted_full_size_with_two_masks() {
        let m = gemma3_270m();
        // "size = 12.00 MiB (4096 cells, 3 layers)" + "size = 60.00 MiB (4096 cells, 15 layers)".
        assert_eq!(kv_cache(&m, 4096).unwrap(), 72 * MIB);
        let global = ModelFacts {
            sliding_window: 0,
            ..m
        };
        assert_eq!(
            kv_cache(&global, 4096).unwrap(),
            kv_cache(&m, 4096).unwrap()
        );
        assert_eq!(
            compute(&m, 4096).unwrap() - compute(&global, 4096).unwrap(),
            MASK_PER_CTX * 4096,
            "a second attention mask"
        );
        assert_eq!(
            compute(&m, 4097).unwrap() - compute(&m, 4096).unwrap(),
            2 * 1024,
            "two masks' rows of 512 f16 per cell"
        );
    }

    #[test]
    fn compute_is_the_larger_of_the_feed_forward_and_the_attention_activations() {
        // A wide feed-forward: 3 x ff + 2 x width.
        let wide_ff = ModelFacts {
            embedding: 128,
            ff: 4096,
            heads: 4,
            kv_heads: 4,
            key_length: 32,
            value_length: 32,
            ..Default::default()
        };
        assert_eq!(
            compute(&wide_ff, 0).unwrap(),
            (3 * 4096 + 2 * 128) * ACTIVATION
        );
        // Heads wider than the model (head_dim x heads > width): the attention side wins.
        let wide_heads = ModelFacts {
            embedding: 1024,
            ff: 256,
            heads: 4,
            kv_heads: 4,
            key_length: 256,
            value_length: 256,
            ..Default::default()
        };
        assert_eq!(
            compute(&wide_heads, 0).unwrap(),
            (3 * 1024 + 2 * 4 * 256 + 4 * 512) * ACTIVATION
        );
        // Without feed_forward_length: four widths.
        let no_ff = ModelFacts { ff: 0, ..wide_ff };
        assert_eq!(
            compute(&no_ff, 0).unwrap(),
            (3 * 512 + 2 * 128) * ACTIVATION
        );
    }

    #[test]
    fn which_types_llama_cpp_repacks() {
        let x86 = CpuFeatures {
            avx2: true,
            ..Default::default()
        };
        let avx512 = CpuFeatures {
            avx2: true,
            avx512: true,
            ..Default::default()
        };
        let arm = CpuFeatures {
            neon_dotprod: true,
            neon_i8mm: true,
            ..Default::default()
        };
        let (q4_0, q4_1, q8_0, q2_k, q4_k, q6_k, iq4_nl) = (2, 3, 8, 10, 12, 14, 20);
        assert!(repacks(x86, q4_0, 640));
        assert!(!repacks(x86, q4_0, 644), "rows not a multiple of 8");
        assert!(repacks(arm, q4_0, 644), "4 suffices on ARM");
        assert!(!repacks(x86, q4_1, 640), "Q4_1 is never repacked");
        assert!(!repacks(x86, q8_0, 640));
        assert!(repacks(arm, q8_0, 640));
        assert!(!repacks(x86, q2_k, 640));
        assert!(repacks(avx512, q2_k, 640));
        assert!(repacks(x86, q4_k, 640));
        assert!(!repacks(x86, q6_k, 640));
        assert!(repacks(arm, q6_k, 640));
        assert!(repacks(x86, iq4_nl, 640));
        assert!(
            !repacks(CpuFeatures::default(), q4_0, 640),
            "no SIMD, no repack"
        );
        assert!(!repacks(x86, 0, 640), "f32");
        assert!(weight_matrix("blk.3.attn_output.weight", 2));
        assert!(weight_matrix("blk.3.ffn_down_exps.weight", 3));
        assert!(weight_matrix("output.weight", 2));
        assert!(!weight_matrix("token_embd.weight", 2), "looked up by row");
        assert!(!weight_matrix("blk.3.attn_norm.weight", 1));
        assert!(!weight_matrix("blk.3.ssm_conv1d.weight", 2));
        assert!(!weight_matrix("blk.3.per_layer_token_embd.weight", 2));
    }

    #[test]
    fn learned_is_p95_times_1_1() {
        assert_eq!(learned(&[]), None);
        assert_eq!(learned(&[100 * MIB]), Some(align_up(110 * MIB)));
        let peaks: Vec<u64> = (1..=20).map(|i| i * MIB).collect();
        // Nearest rank: the 19th of 20.
        assert_eq!(learned(&peaks), Some(align_up(19 * MIB + 19 * MIB / 10)));
    }

    #[test]
    fn ram_limit_raises_but_never_lowers() {
        assert_eq!(required(None, 100), GRANULE);
        assert_eq!(required(Some(Size(50)), GRANULE), GRANULE);
        assert_eq!(required(Some(Size(5 * GRANULE)), 100), 5 * GRANULE);
        assert_eq!(
            required(Some(Size(5 * GRANULE + 1)), 100),
            6 * GRANULE,
            "rounded up to the granule"
        );
    }

    proptest! {
        #[test]
        fn gguf_grows_with_ctx_and_layers(
            ctx in 1u32..200_000, more_ctx in 0u32..100_000,
            layers in 1u32..200, more_layers in 0u32..50,
            width in 1u32..16_384, mmap in any::<bool>(),
        ) {
            let m = ModelFacts {
                file_size: u64::from(layers) * 1_000_000,
                tensor_bytes: u64::from(layers) * 990_000,
                block_count: layers,
                embedding: width,
                heads: 8,
                kv_heads: 8,
                key_length: 64,
                value_length: 64,
                ..Default::default()
            };
            let bigger = ModelFacts {
                block_count: layers + more_layers,
                file_size: u64::from(layers + more_layers) * 1_000_000,
                tensor_bytes: u64::from(layers + more_layers) * 990_000,
                ..m
            };
            prop_assert!(gguf(&m, ctx, mmap).unwrap().total <= gguf(&m, ctx + more_ctx, mmap).unwrap().total);
            prop_assert!(gguf(&m, ctx, mmap).unwrap().total <= gguf(&bigger, ctx, mmap).unwrap().total);
            prop_assert!(gguf(&m, ctx, mmap).unwrap().total >= BASELINE);
        }

        #[test]
        fn estimate_is_monotonic_and_floored(a in 0u64..1 << 42, b in 0u64..1 << 42) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(RULE.estimate(lo) <= RULE.estimate(hi));
            prop_assert!(RULE.estimate(lo) >= RULE.min_required.bytes());
            prop_assert!(RULE.estimate(hi) >= hi);
        }
    }
}
