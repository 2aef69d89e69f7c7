//! The GPU guard's pure policy: what an instance reserves in VRAM, layer-1 validation of VRAM per
//! device, attribution of per-process VRAM to instances, per-GPU levels (the host's [`Levels`]
//! applied to a GPU's memory), the CPU-fallback victim and restore order, the 3-failure rule and
//! the verified release of a killed worker's VRAM. Readings come in as values (NVML's shape).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::estimate::{ModelFacts, align_up, kv_cache};
use crate::pressure::{Candidate, Level, Levels, restore_order, shed_victim};
use crate::validate::HostMemory;

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub total: u64,
    pub used: u64,
    /// Percent of time a kernel ran over the last sample period.
    pub utilization: Option<u32>,
    /// Compute and graphics processes with their VRAM (None where the driver does not say, e.g.
    /// inside some containers).
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub used: Option<u64>,
}

impl GpuReading {
    /// The GPU's memory in the host's terms, for [`Levels`].
    pub fn memory(&self) -> HostMemory {
        HostMemory {
            total: self.total,
            available: self.total.saturating_sub(self.used),
        }
    }
}

/// What an instance with `gpu_layers > 0` reserves in VRAM: the offloaded share of the weights
/// plus the KV cache of the offloaded layers. ([estimate] refines the terms.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VramEstimate {
    pub offloaded_layers: u32,
    pub weights: u64,
    pub kv: u64,
    pub total: u64,
}

/// The VRAM reservation of a model (from its header's facts) with `gpu_layers` offloaded at
/// `ctx`: the per-layer KV cache is the estimate's own ([`kv_cache`]) divided by the layers.
pub fn model_vram(
    m: &ModelFacts,
    gpu_layers: u32,
    ctx: u32,
) -> Result<VramEstimate, crate::estimate::Overflow> {
    let per_layer = kv_cache(m, ctx)? / u64::from(m.block_count.max(1));
    Ok(vram_estimate(
        m.file_size,
        m.block_count,
        gpu_layers,
        per_layer,
    ))
}

/// The VRAM reservation of `gpu_layers` of a model of `block_count` layers. llama.cpp offloads
/// at most every repeating layer (plus the output layer, counted in the weights' share here).
pub fn vram_estimate(
    file_size: u64,
    block_count: u32,
    gpu_layers: u32,
    kv_per_layer: u64,
) -> VramEstimate {
    if gpu_layers == 0 {
        return VramEstimate {
            offloaded_layers: 0,
            weights: 0,
            kv: 0,
            total: 0,
        };
    }
    let blocks = block_count.max(1);
    let offloaded = gpu_layers.min(blocks);
    let weights = if gpu_layers > blocks {
        file_size
    } else {
        (u128::from(file_size) * u128::from(offloaded) / u128::from(blocks)) as u64
    };
    let kv = kv_per_layer.saturating_mul(u64::from(offloaded));
    VramEstimate {
        offloaded_layers: offloaded,
        weights,
        kv,
        total: align_up(weights.saturating_add(kv)),
    }
}

/// One instance's VRAM need on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VramDemand {
    pub name: String,
    pub device: u32,
    pub vram: u64,
}

/// Layer 1 for one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceVerdict {
    pub device: u32,
    /// None when no such GPU exists.
    pub total: Option<u64>,
    pub usable: u64,
    pub required: u64,
    pub instances: Vec<String>,
    pub fits: bool,
}

/// Checks VRAM per device like RAM: the reservations on each device must fit
/// `total x (1 - safety_margin)`. Devices nobody uses are not reported.
pub fn validate_vram(
    demands: &[VramDemand],
    gpus: &[(u32, u64)],
    safety_margin: f64,
) -> Vec<DeviceVerdict> {
    let mut by_device: BTreeMap<u32, (u64, Vec<String>)> = BTreeMap::new();
    for d in demands.iter().filter(|d| d.vram > 0) {
        let e = by_device.entry(d.device).or_default();
        e.0 = e.0.saturating_add(d.vram);
        e.1.push(d.name.clone());
    }
    by_device
        .into_iter()
        .map(|(device, (required, instances))| {
            let total = gpus.iter().find(|(i, _)| *i == device).map(|(_, t)| *t);
            let usable = total.map_or(0, |t| (t as f64 * (1.0 - safety_margin)) as u64);
            DeviceVerdict {
                device,
                total,
                usable,
                required,
                instances,
                fits: total.is_some() && required <= usable,
            }
        })
        .collect()
}

/// VRAM per instance on one GPU: each process's memory goes to the instance whose cgroup holds
/// the pid (`owner`); processes of nobody's are left out.
pub fn attribute<'a>(
    reading: &GpuReading,
    owner: impl Fn(u32) -> Option<&'a str>,
) -> BTreeMap<&'a str, u64> {
    let mut out = BTreeMap::new();
    for p in &reading.processes {
        if let Some(name) = owner(p.pid) {
            *out.entry(name).or_insert(0) += p.used.unwrap_or(0);
        }
    }
    out
}

/// Why an instance runs on the CPU although it has `gpu_layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// On the GPU as configured.
    #[default]
    None,
    /// Moved off by the guard in an emergency; comes back when the GPU's usage is below
    /// `restore`.
    Pressure,
    /// After [`GPU_FAILURE_LIMIT`] GPU allocation failures: stays on the CPU until a manual
    /// `supervisor restart`.
    Failures,
}

/// GPU allocation failures after which an instance stays on the CPU.
pub const GPU_FAILURE_LIMIT: u32 = 3;

/// An instance's GPU standing, kept across its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuState {
    pub fallback: Fallback,
    pub failures: u32,
}

impl GpuState {
    /// The layers the next start gets.
    pub fn layers(&self, configured: u32) -> u32 {
        match self.fallback {
            Fallback::None => configured,
            _ => 0,
        }
    }

    /// A worker reported a GPU allocation failure; true when this one moves it to the CPU for
    /// good.
    pub fn alloc_failed(&mut self) -> bool {
        self.failures += 1;
        if self.failures >= GPU_FAILURE_LIMIT && self.fallback != Fallback::Failures {
            self.fallback = Fallback::Failures;
            return true;
        }
        false
    }

    /// `supervisor restart NAME`: back to the configured layers, failures forgotten.
    pub fn reset(&mut self) {
        *self = GpuState::default();
    }
}

/// An instance as the GPU guard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCandidate {
    pub name: String,
    pub priority: i64,
    pub device: u32,
    /// Configured with `gpu_layers > 0`.
    pub wants_gpu: bool,
    /// A worker runs (or is starting) now.
    pub running: bool,
    pub state: GpuState,
}

/// What the guard does on one GPU this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuAction {
    /// Restart `name` on the CPU (`n_gpu_layers = 0`).
    FallBack(String),
    /// Restart `name` with its configured layers.
    Restore(String),
}

/// One decision for one GPU at `level`, given its reading: in an emergency the lowest-priority
/// instance running on it moves to the CPU (at most one per `settle`, the caller's clock); once
/// usage is below `restore`, the highest-priority instance moved off by pressure comes back.
/// Instances moved off by failures never come back by themselves.
pub fn decide(
    levels: &Levels,
    level: Level,
    reading: &GpuReading,
    instances: &[GpuCandidate],
    since_last_action: Option<Duration>,
    settle: Duration,
) -> Option<GpuAction> {
    let here = |c: &&GpuCandidate| c.device == reading.index && c.wants_gpu;
    if level == Level::Emergency {
        if since_last_action.is_some_and(|d| d < settle) {
            return None;
        }
        let on_gpu: Vec<Candidate> = instances
            .iter()
            .filter(here)
            .filter(|c| c.running && c.state.fallback == Fallback::None)
            .map(|c| Candidate {
                name: c.name.clone(),
                priority: c.priority,
                last_used_ms: None,
            })
            .collect();
        return shed_victim(&on_gpu).map(|c| GpuAction::FallBack(c.name.clone()));
    }
    if level == Level::Normal && levels.restored(reading.memory()) {
        let off: Vec<Candidate> = instances
            .iter()
            .filter(here)
            .filter(|c| c.state.fallback == Fallback::Pressure)
            .map(|c| Candidate {
                name: c.name.clone(),
                priority: c.priority,
                last_used_ms: None,
            })
            .collect();
        return restore_order(&off)
            .first()
            .map(|c| GpuAction::Restore(c.name.clone()));
    }
    None
}

/// Whether a stopped worker's VRAM came back: none of its pids is listed on the GPU any more.
pub fn released(pids: &[u32], reading: &GpuReading) -> bool {
    !reading.processes.iter().any(|p| pids.contains(&p.pid))
}

#[cfg(test)]
mod tests;
