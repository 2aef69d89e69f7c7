//! Planning one instance's estimate: the file-size rule, the GGUF-aware estimate from its
//! header at its ctx and mmap, and the learned correction from earlier runs. Shared by
//! `validate`, `run` and `add` so that all three admit with the same numbers.

use belljar_budget::PlannedInstance;
use belljar_budget::estimate::{Breakdown, ModelFacts, Origin, gguf, learned};
use belljar_budget::gpu::model_vram;
use belljar_config::InstanceSpec;
use belljar_host::ModelFile;

use crate::learn::{self, ModelIdentity, Observation};

/// Everything about an instance's estimate besides the policy's choice.
#[derive(Debug, Clone)]
pub struct Estimated {
    pub planned: PlannedInstance,
    /// What the header says (None when it could not be read: `gguf_error`).
    pub facts: Option<ModelFacts>,
    pub breakdown: Option<Breakdown>,
    pub identity: Option<ModelIdentity>,
    /// Why there is no GGUF estimate (the header could not be read).
    pub gguf_error: Option<String>,
}

/// The estimate from a probed model file (its header's facts, read once by the probe) and the
/// observations for this model+ctx+mmap.
pub fn estimate(spec: &InstanceSpec, file: &ModelFile, observations: &[Observation]) -> Estimated {
    let identity = Some(learn::identity(file));
    let (facts, breakdown, gguf_error) = match &file.facts {
        Ok(f) => match gguf(f, spec.ctx, spec.use_mmap) {
            Ok(b) => (Some(*f), Some(b), None),
            Err(e) => (None, None, Some(format!("{}: {e}", file.path.display()))),
        },
        Err(e) => (None, None, Some(e.clone())),
    };
    let learned = identity
        .as_ref()
        .and_then(|id| learned(&learn::peaks(observations, id, spec.ctx, spec.use_mmap)));
    Estimated {
        planned: PlannedInstance {
            name: spec.name.to_string(),
            model: spec.model.display().to_string(),
            file_size: file.size,
            ram_limit: spec.ram_limit,
            priority: spec.priority,
            gguf: breakdown.map(|b| b.total),
            learned,
            load: spec.load,
        },
        facts,
        breakdown,
        identity,
        gguf_error,
    }
}

/// The instance's VRAM reservation with its `gpu_layers` (0 without), from its header's facts.
pub fn vram(spec: &InstanceSpec, e: &Estimated) -> Result<u64, String> {
    if spec.gpu_layers == 0 {
        return Ok(0);
    }
    match &e.facts {
        Some(f) => model_vram(f, spec.gpu_layers, spec.ctx)
            .map(|v| v.total)
            .map_err(|e| e.to_string()),
        None => Err(e
            .gguf_error
            .clone()
            .unwrap_or_else(|| "its GGUF header could not be read".into())),
    }
}

/// What the cgroup's `memory.low` protects: the estimate less what may be reclaimed without
/// hurting the worker (the page-cache copy of a model read without mmap).
pub fn protected(estimate: u64, source: Origin, breakdown: Option<&Breakdown>) -> u64 {
    match (source, breakdown) {
        (Origin::Gguf | Origin::Learned, Some(b)) => estimate.saturating_sub(b.reclaimable),
        _ => estimate,
    }
}
