//! `supervisor estimate MODEL`: the GGUF-aware estimate, term by term, beside the file rule.

use belljar_budget::Size;
use belljar_budget::estimate::{Breakdown, EstimateRule, ModelFacts, gguf};
use belljar_budget::gpu::{VramEstimate, model_vram};
use belljar_host::probe_model_file;
use serde::Serialize;

use crate::cli::{EstimateArgs, GlobalArgs};
use crate::error::{CliError, Exit};

#[derive(Serialize)]
struct Output<'a> {
    model: String,
    facts: ModelFacts,
    #[serde(flatten)]
    breakdown: &'a Breakdown,
    /// `max(file x estimate_factor, min_required)` with the config's (or built-in) values.
    file_rule: u64,
    /// With `--gpu-layers`: the VRAM those layers reserve.
    vram: Option<VramEstimate>,
}

pub fn run(global: &GlobalArgs, args: &EstimateArgs) -> Result<Exit, CliError> {
    let file = probe_model_file(&args.model).map_err(|e| CliError::Usage(e.to_string()))?;
    let cannot = |e: String| {
        CliError::Usage(format!(
            "cannot estimate {}: {e}; the file rule still applies (estimate = \"file\")",
            args.model.display()
        ))
    };
    let facts = file.facts.map_err(cannot)?;
    // The file rule's knobs from the config when there is one, else the defaults.
    let rule = match std::fs::metadata(&global.config) {
        Ok(_) => {
            super::validate::load_config(&global.config)?
                .budget_policy()
                .rule
        }
        Err(_) => EstimateRule {
            factor: 1.5,
            min_required: Size(64 << 20),
        },
    };
    let b = gguf(&facts, args.ctx, !args.no_mmap)
        .map_err(|e| cannot(format!("{}: {e}", args.model.display())))?;
    let vram = if args.gpu_layers > 0 {
        Some(
            model_vram(&facts, args.gpu_layers, args.ctx)
                .map_err(|e| cannot(format!("{}: {e}", args.model.display())))?,
        )
    } else {
        None
    };
    let out = Output {
        model: args.model.display().to_string(),
        facts,
        breakdown: &b,
        file_rule: rule.estimate(facts.file_size),
        vram,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| CliError::Refused(e.to_string()))?
        );
        return Ok(Exit::Ok);
    }
    let s = |v: u64| Size(v).to_string();
    println!(
        "{}: {} layers, width {}, {} heads ({} KV) of {}, vocab {}{}, ctx {}, {}",
        out.model,
        facts.block_count,
        facts.embedding,
        facts.heads,
        facts.kv_heads,
        facts.key_length,
        facts.vocab,
        if facts.tied { " (tied)" } else { "" },
        args.ctx,
        if b.mmap { "mmap" } else { "no mmap" }
    );
    let rows = [
        (
            "weights",
            b.weights,
            if b.mmap {
                "file pages (mapped)".to_owned()
            } else {
                "anonymous copy of the tensors".to_owned()
            },
        ),
        (
            "page cache",
            b.page_cache,
            "reading the file without mmap (reclaimable)".to_owned(),
        ),
        (
            "repack",
            b.repack,
            if facts.tied_repack > 0 {
                "matrices llama.cpp repacks for this CPU, and the tied output's copy".to_owned()
            } else {
                "matrices llama.cpp repacks for this CPU (CPU_REPACK)".to_owned()
            },
        ),
        (
            "kv cache",
            b.kv,
            format!(
                "2 x layers x ctx x kv_heads x head_dim x 2 bytes (f16){}",
                if facts.sliding_window > 0 {
                    format!(
                        "; the {}-token sliding-window layers full-size",
                        facts.sliding_window
                    )
                } else {
                    String::new()
                }
            ),
        ),
        (
            "output",
            b.output,
            format!("one row of {} f32 logits", facts.vocab),
        ),
        (
            "vocab",
            b.vocab,
            format!(
                "{} tokens x {} bytes{}: tokenizer tables, sampler candidates",
                facts.vocab,
                belljar_budget::estimate::VOCAB_PER_TOKEN,
                if facts.merges > 0 {
                    format!(
                        ", {} merges x {} bytes",
                        facts.merges,
                        belljar_budget::estimate::PER_MERGE
                    )
                } else {
                    String::new()
                }
            ),
        ),
        (
            "compute",
            b.compute,
            if facts.sliding_window > 0 {
                "a full 512-token micro-batch's activations, two masks' rows per cell".to_owned()
            } else {
                "a full 512-token micro-batch's activations, the mask's row per cell".to_owned()
            },
        ),
        (
            "baseline",
            b.baseline,
            "the worker process itself".to_owned(),
        ),
        ("margin", b.margin, "3%".to_owned()),
    ];
    for (name, v, what) in rows {
        println!("  {name:<11} {:>11}  {what}", s(v));
    }
    println!(
        "  {:<11} {:>11}  (memory.low protects {})",
        "total",
        s(b.total),
        s(b.total - b.reclaimable)
    );
    println!(
        "  {:<11} {:>11}  (file size x {})",
        "file rule",
        s(out.file_rule),
        rule.factor
    );
    if let Some(v) = out.vram {
        println!(
            "  {:<11} {:>11}  ({} layers offloaded: {} of weights, {} of KV cache)",
            "vram",
            s(v.total),
            v.offloaded_layers,
            s(v.weights),
            s(v.kv)
        );
    }
    Ok(Exit::Ok)
}
