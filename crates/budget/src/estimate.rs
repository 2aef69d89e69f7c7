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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelFacts {
    pub file_size: u64,
    /// The sum of every tensor's bytes.
    pub tensor_bytes: u64,
    pub block_count: u32,
    pub embedding: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// Per-head K and V widths (`attention.key_length` / `value_length`, else embedding / heads).
    pub key_length: u32,
    pub value_length: u32,
}

/// llama.cpp's default micro-batch (`n_ubatch`): the compute buffers are sized for it.
pub const UBATCH: u64 = 512;
/// Bytes of KV cache element (llama.cpp's default K and V type, f16).
pub const KV_ELEMENT: u64 = 2;
/// The worker process itself in its cgroup: binary and shared libraries (page cache, as a fresh
/// start reads them), heap, llama.cpp's and the tokenizer's tables. Fitted (bench/estimate.py).
pub const BASELINE: u64 = 14_836_000;
/// Compute and scratch per unit of embedding width (activations of a micro-batch). Fitted.
pub const COMPUTE_PER_WIDTH: u64 = 9_103;
/// Compute and scratch per context cell (masks and views that grow with the context). Measured.
pub const COMPUTE_PER_CTX: u64 = 64;
/// Headroom on top of the sum, in percent: the fitted terms are within about 3% of the
/// measured peaks, so this keeps the estimate above them.
pub const MARGIN_PERCENT: u64 = 3;

/// The GGUF-aware estimate, term by term (bytes). `total` is the reservation before `ram_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    pub ctx: u32,
    pub mmap: bool,
    /// The weights: file pages with mmap (reclaimable but the working set), anonymous memory
    /// without.
    pub weights: u64,
    /// Without mmap, reading the file also fills the page cache, charged to the same cgroup
    /// (cgroup v1 and v2): one file's worth, reclaimable.
    pub page_cache: u64,
    /// `2 x layers x ctx x kv_heads x head_dim x 2 bytes` (K and V, f16).
    pub kv: u64,
    /// One micro-batch's K/V plus activations, and per-context-cell scratch.
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

/// The GGUF-aware estimate of a worker's peak in its cgroup at `ctx`, with or without mmap.
/// Every term is checked: a header whose numbers overflow is an error naming them, never a
/// wrapped (small) or saturated estimate.
pub fn gguf(m: &ModelFacts, ctx: u32, mmap: bool) -> Result<Breakdown, Overflow> {
    let (weights, page_cache) = if mmap {
        (m.file_size, 0)
    } else {
        (m.tensor_bytes, m.file_size)
    };
    let kv = kv_cache(m, ctx)?;
    let compute = kv_cache(m, 1)?
        .checked_mul(UBATCH)
        .and_then(|v| v.checked_add(COMPUTE_PER_WIDTH * u64::from(m.embedding)))
        .and_then(|v| v.checked_add(COMPUTE_PER_CTX * u64::from(ctx)))
        .ok_or_else(|| Overflow {
            term: "compute buffer",
            fields: format!(
                "a {UBATCH}-token micro-batch's K/V of block_count {} x head_count_kv {} x (key_length {} + value_length {}), embedding_length {}",
                m.block_count, m.kv_heads, m.key_length, m.value_length, m.embedding
            ),
        })?;
    let total_overflow = || Overflow {
        term: "total",
        fields: format!(
            "weights {weights} + page cache {page_cache} + KV cache {kv} + compute {compute} bytes"
        ),
    };
    let sum = [page_cache, kv, compute, BASELINE]
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
        kv,
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
        assert_eq!(b.kv, 84 * MIB);
        assert_eq!(
            b.compute,
            kv_cache(&m, 1).unwrap() * UBATCH + COMPUTE_PER_WIDTH * 896 + COMPUTE_PER_CTX * 4096
        );
        assert_eq!(b.baseline, BASELINE);
        let sum = b.weights + b.kv + b.compute + b.baseline;
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

    #[test]
    fn the_estimate_tracks_the_measured_peaks() {
        // bench/estimate.py on this machine: 290M at ctx 16384, mmap, peaked at 680341504.
        let b = gguf(&facts(), 16384, true).unwrap();
        let err = (b.total as f64 - 680_341_504.0) / 680_341_504.0;
        assert!((0.0..0.10).contains(&err), "{err}");
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
