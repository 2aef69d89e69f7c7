//! The GPU guard in the loop: each pressure tick reads NVML, attributes per-process VRAM to
//! instances by cgroup membership, moves each GPU's level, and applies
//! `belljar_budget::gpu::decide` (CPU fallback in an emergency, restore below `restore`).
//! Stopped workers' VRAM counts as free only once NVML no longer lists their pids.

use std::collections::{BTreeMap, HashMap};

use belljar_budget::gpu::{
    Fallback, GpuAction, GpuCandidate, GpuReading, attribute, decide, released,
};
use belljar_budget::lifecycle::Input;
use belljar_budget::pressure::{Level, Levels, Threshold};

use super::Daemon;
use super::events::{Entry, Event};
use super::instance::{GpuRelease, Instance, State};

impl Daemon {
    fn gpu_levels(&self) -> Levels {
        let g = &self.cfg.config.gpu;
        Levels {
            warning: Threshold::PercentUsed(g.warning),
            critical: Threshold::PercentUsed(g.critical),
            emergency: Threshold::PercentUsed(g.emergency),
            restore: Threshold::PercentUsed(g.restore),
        }
    }

    /// One GPU tick (from the pressure tick).
    pub(super) fn gpu_tick(&mut self) {
        let Some(gpus) = &self.cfg.gpus else { return };
        let readings = match gpus.read() {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("cannot read the GPUs: {e}");
                return;
            }
        };
        self.attribute_vram(&readings);
        let names: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| matches!(i.gpu_release, GpuRelease::Pending { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Some(mut inst) = self.instances.remove(&name) {
                self.settle_release(&name, &mut inst, &readings);
                self.instances.insert(name, inst);
            }
        }
        let levels = self.gpu_levels();
        let settle = self.cfg.config.gpu.settle.0;
        for r in &readings {
            let old = self
                .gpu_level
                .get(&r.index)
                .copied()
                .unwrap_or(Level::Normal);
            let new = levels.next(old, r.memory());
            if new != old {
                tracing::warn!(
                    gpu = r.index,
                    "GPU {} ({}) memory pressure {} (was {}): {:.1}% used",
                    r.index,
                    r.name,
                    new.as_str(),
                    old.as_str(),
                    r.memory().usage_percent()
                );
                self.gpu_level.insert(r.index, new);
            }
            let candidates: Vec<GpuCandidate> = self
                .instances
                .iter()
                .map(|(n, i)| GpuCandidate {
                    name: n.clone(),
                    priority: i.spec.priority,
                    device: i.spec.gpu_device,
                    wants_gpu: i.spec.gpu_layers > 0,
                    running: i.link.is_some()
                        && matches!(i.state(), State::Starting | State::Loading | State::Ready),
                    state: i.machine.gpu,
                })
                .collect();
            let since = self
                .gpu_last_action
                .get(&r.index)
                .map(|t| super::clock().saturating_duration_since(*t));
            match decide(&levels, new, r, &candidates, since, settle) {
                Some(GpuAction::FallBack(name)) => self.gpu_fall_back(&name, r),
                Some(GpuAction::Restore(name)) => self.gpu_restore(&name, r),
                None => {}
            }
        }
        self.gpu_readings = readings;
    }

    /// VRAM per instance: every pid NVML lists goes to the instance whose cgroup holds it.
    fn attribute_vram(&mut self, readings: &[GpuReading]) {
        let mut owner: HashMap<u32, String> = HashMap::new();
        for (name, inst) in &self.instances {
            if let Some(w) = &inst.link {
                for pid in self.cfg.cgroups.procs(&w.cgroup).unwrap_or_default() {
                    owner.insert(pid, name.clone());
                }
            }
        }
        let mut memory: BTreeMap<String, u64> = BTreeMap::new();
        let mut pids: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        for r in readings {
            for (name, bytes) in attribute(r, |pid| owner.get(&pid).map(String::as_str)) {
                *memory.entry(name.to_owned()).or_insert(0) += bytes;
            }
            for p in &r.processes {
                if let Some(name) = owner.get(&p.pid) {
                    pids.entry(name.clone()).or_default().push((r.index, p.pid));
                }
            }
        }
        for (name, inst) in &mut self.instances {
            if inst.link.is_none() {
                continue;
            }
            inst.gpu_memory = Some(memory.get(name).copied().unwrap_or(0));
            inst.gpu_pids = pids.remove(name).unwrap_or_default();
        }
    }

    /// Whether a stopped run's VRAM may count as free: NVML no longer lists its pids, or the
    /// bounded wait is over (logged, and `gpu_release: "timed-out"` in status).
    pub(super) fn settle_release(
        &self,
        name: &str,
        inst: &mut Instance,
        readings: &[GpuReading],
    ) -> bool {
        let GpuRelease::Pending { pids, since } = &inst.gpu_release else {
            return true;
        };
        let gone = pids.iter().all(|(dev, pid)| {
            readings
                .iter()
                .filter(|r| r.index == *dev)
                .all(|r| released(&[*pid], r))
        });
        if gone {
            tracing::debug!(instance = %name, "VRAM of the last run released (confirmed by NVML)");
            inst.gpu_release = GpuRelease::Done;
            return true;
        }
        let timeout = self.cfg.config.gpu.release_timeout.0;
        if super::clock().saturating_duration_since(*since) >= timeout {
            let listed: Vec<String> = pids
                .iter()
                .map(|(d, p)| format!("{p} on GPU {d}"))
                .collect();
            Entry::of(Event::GpuReleaseTimeout, name, inst).log(format_args!(
                "NVML still lists {} {timeout:?} after the worker stopped: its VRAM is not free",
                listed.join(", ")
            ));
            inst.gpu_release = GpuRelease::TimedOut;
            return true;
        }
        false
    }

    /// Fresh readings for a restart waiting on a release (None without NVML).
    pub(super) fn read_gpus(&self) -> Option<Vec<GpuReading>> {
        self.cfg.gpus.as_ref().map(|g| g.read().unwrap_or_default())
    }

    fn gpu_fall_back(&mut self, name: &str, r: &GpuReading) {
        // Its CPU footprint is its reservation (the ledger holds it already: layers 1 and 2);
        // the lifecycle checks with layer 3 that the memory is there now.
        let memory = self.effective_memory().ok().map(|(m, _)| m);
        let message = format!(
            "GPU {} memory emergency ({:.1}% used): restarting on the CPU (n_gpu_layers = 0)",
            r.index,
            r.memory().usage_percent()
        );
        self.drive(name, Input::GpuFallback { message, memory });
        let moved = self
            .instances
            .get(name)
            .is_some_and(|i| i.machine.gpu.fallback == Fallback::Pressure);
        if moved {
            self.gpu_last_action.insert(r.index, super::clock());
        }
    }

    fn gpu_restore(&mut self, name: &str, r: &GpuReading) {
        let Some(inst) = self.instances.get(name) else {
            return;
        };
        let message = format!(
            "GPU {} usage is below restore ({:.1}% used): restarting with gpu_layers = {}",
            r.index,
            r.memory().usage_percent(),
            inst.spec.gpu_layers
        );
        self.gpu_last_action.insert(r.index, super::clock());
        self.drive(name, Input::GpuRestore { message });
    }
}
