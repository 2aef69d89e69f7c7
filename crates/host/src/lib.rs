//! The only crate that touches /proc, /sys (and later NVML): host memory readings, model-file
//! probes, chat template files and CPU counts, and the files root makes where other users could
//! interfere ([`safe_fs`]: no link followed, no other owner trusted). Every root path is injected; the defaults are consts beside the code.

pub mod cgroup;
pub mod chat_template;
pub mod gpu;
pub mod meminfo;
pub mod model_file;
pub mod pressure;
pub mod proc_ctl;
pub mod process;
pub mod regular;
pub mod safe_fs;
pub mod spawn;

pub use meminfo::{MemInfoError, ProcRoot, read_host_memory};
pub use model_file::{ModelFile, ModelFileError, probe_model_file};
pub use process::{ProcessReadError, read_rss, start_ticks};

/// The number of CPUs this process may run on (cgroup cpusets and affinity included), at least 1.
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}
