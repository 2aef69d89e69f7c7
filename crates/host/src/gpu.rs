//! GPUs through NVML (`nvml-wrapper`, which loads libnvidia-ml at run time: no build-time CUDA
//! dependency, and a machine without the driver simply has no GPUs).

use belljar_budget::gpu::{GpuProcess, GpuReading};
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

/// An initialised NVML.
pub struct Gpus {
    nvml: Nvml,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gpus(NVML)")
    }
}

impl Gpus {
    /// Loads and initialises NVML; the error says why there is none (no driver, no library).
    pub fn init() -> Result<Gpus, String> {
        Nvml::init()
            .map(|nvml| Gpus { nvml })
            .map_err(|e| e.to_string())
    }

    /// Every GPU: memory, utilisation, and the compute and graphics processes with their VRAM
    /// (a process listed as both is counted once).
    pub fn read(&self) -> Result<Vec<GpuReading>, String> {
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(|e| format!("GPU {index}: {e}"))?;
            let mem = d.memory_info().map_err(|e| format!("GPU {index}: {e}"))?;
            let mut processes: Vec<GpuProcess> = Vec::new();
            let lists = [
                d.running_compute_processes(),
                d.running_graphics_processes(),
            ];
            for p in lists.into_iter().flatten().flatten() {
                if processes.iter().any(|q| q.pid == p.pid) {
                    continue;
                }
                processes.push(GpuProcess {
                    pid: p.pid,
                    used: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                });
            }
            out.push(GpuReading {
                index,
                name: d.name().unwrap_or_else(|_| format!("GPU {index}")),
                total: mem.total,
                used: mem.used,
                utilization: d.utilization_rates().ok().map(|u| u.gpu),
                processes,
            });
        }
        Ok(out)
    }
}
