//! What "free memory" means for belljar: the tightest of the host (MemAvailable) and every
//! cgroup from belljar's instance parent up to the root that has a memory limit (its limit minus
//! its usage, counting inactive file pages as reclaimable). Inside a container or a Kubernetes
//! pod that is the pod's limit, not the host's. Plus the system's memory PSI.

use std::path::{Path, PathBuf};

use belljar_budget::HostMemory;
use procfs::FromRead;

use crate::cgroup::{CgroupBackend, Version};
use crate::meminfo::{MemInfoError, ProcRoot, read_host_memory};

/// Where the tightest reading came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Host,
    /// A limited ancestor cgroup (its path).
    Cgroup(PathBuf),
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Host => "host",
            Source::Cgroup(_) => "cgroup",
        }
    }
}

/// A number file of `dir`; `None` when missing or not a number ("max").
fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    crate::cgroup::read_u64(dir, file).ok().flatten()
}

/// A key of `dir`'s memory.stat.
fn stat_key(dir: &Path, key: &str) -> Option<u64> {
    crate::cgroup::read_key(dir, "memory.stat", key)
        .ok()
        .flatten()
}

/// The memory reading of one cgroup with a limit, as `HostMemory` (total = its limit).
pub fn cgroup_memory(version: Version, dir: &Path) -> Option<HostMemory> {
    let (limit, usage, inactive) = match version {
        Version::V1 => (
            read_u64(dir, "memory.limit_in_bytes")?,
            read_u64(dir, "memory.usage_in_bytes")?,
            stat_key(dir, "total_inactive_file")
                .or_else(|| stat_key(dir, "inactive_file"))
                .unwrap_or(0),
        ),
        Version::V2 => (
            read_u64(dir, "memory.max")?, // "max" does not parse: unlimited
            read_u64(dir, "memory.current")?,
            stat_key(dir, "inactive_file").unwrap_or(0),
        ),
    };
    if limit >= crate::cgroup::V1_UNLIMITED {
        return None;
    }
    Some(HostMemory {
        total: limit,
        available: limit
            .saturating_sub(usage)
            .saturating_add(inactive)
            .min(limit),
    })
}

/// The tightest reading: the host, or a limited cgroup from `parent` up to the root.
pub fn effective_memory(
    proc_root: &ProcRoot,
    cgroups: &dyn CgroupBackend,
    parent: &Path,
) -> Result<(HostMemory, Source), MemInfoError> {
    let mut best = (read_host_memory(proc_root)?, Source::Host);
    let mut dir = Some(parent);
    while let Some(d) = dir.filter(|d| d.starts_with(cgroups.root()) && *d != cgroups.root()) {
        if let Some(m) = cgroup_memory(cgroups.version(), d) {
            if m.available < best.0.available {
                best = (m, Source::Cgroup(d.to_path_buf()));
            }
        }
        dir = d.parent();
    }
    Ok(best)
}

/// `some avg10` of the system's memory PSI (percent of time some task stalled on memory),
/// `None` where PSI is not available.
pub fn psi_some_avg10(proc_root: &ProcRoot) -> Option<f32> {
    procfs::MemoryPressure::from_file(proc_root.path().join("pressure/memory"))
        .ok()
        .map(|p| p.some.avg10)
}

/// Major page faults charged to a cgroup so far (`pgmajfault` in its memory.stat).
pub fn major_faults(version: Version, dir: &Path) -> Option<u64> {
    match version {
        Version::V1 => stat_key(dir, "total_pgmajfault").or_else(|| stat_key(dir, "pgmajfault")),
        Version::V2 => stat_key(dir, "pgmajfault"),
    }
}

/// A PSI trigger: a descriptor that becomes readable (POLLPRI) when tasks stall on memory for
/// `stall` within any `window` (e.g. `some 150000 1000000`). `path` is `/proc/pressure/memory`
/// or a v2 cgroup's `memory.pressure`. The kernel refuses triggers to processes without
/// CAP_SYS_RESOURCE unless the window is a multiple of 2 s (and some sandboxes refuse them
/// outright); callers fall back to the interval.
pub fn psi_trigger(
    path: &Path,
    stall: std::time::Duration,
    window: std::time::Duration,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    f.write_all(format!("some {} {}", stall.as_micros(), window.as_micros()).as_bytes())?;
    Ok(std::os::fd::OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::V2;

    #[test]
    fn the_tightest_limited_ancestor_wins() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("pod");
        let parent = pod.join("belljar");
        std::fs::create_dir_all(&parent).unwrap();
        // The pod: 3 GiB limit, 2.5 GiB used of which 0.5 GiB inactive file -> 1 GiB available.
        std::fs::write(pod.join("memory.max"), format!("{}\n", 3u64 << 30)).unwrap();
        std::fs::write(pod.join("memory.current"), format!("{}\n", 5u64 << 29)).unwrap();
        std::fs::write(
            pod.join("memory.stat"),
            format!("anon 1\ninactive_file {}\n", 1u64 << 29),
        )
        .unwrap();
        // The parent: unlimited.
        std::fs::write(parent.join("memory.max"), "max\n").unwrap();
        std::fs::write(parent.join("memory.current"), "100\n").unwrap();
        let v2 = V2 {
            root: root.path().into(),
        };
        let (m, source) = effective_memory(&ProcRoot::default(), &v2, &parent).unwrap();
        assert_eq!(source, Source::Cgroup(pod.clone()));
        assert_eq!(
            m,
            HostMemory {
                total: 3 << 30,
                available: 1 << 30
            }
        );
        assert_eq!(source.as_str(), "cgroup");
        // Without the pod limit the host wins.
        std::fs::write(pod.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            effective_memory(&ProcRoot::default(), &v2, &parent)
                .unwrap()
                .1,
            Source::Host
        );
    }

    #[test]
    fn psi_and_faults() {
        // PSI is present on this machine (and most current kernels); a missing file is None.
        assert!(psi_some_avg10(&ProcRoot(PathBuf::from("/nonexistent"))).is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.stat"), "pgfault 10\npgmajfault 7\n").unwrap();
        assert_eq!(major_faults(Version::V2, dir.path()), Some(7));
        std::fs::write(
            dir.path().join("memory.stat"),
            "pgmajfault 1\ntotal_pgmajfault 9\n",
        )
        .unwrap();
        assert_eq!(major_faults(Version::V1, dir.path()), Some(9));
    }
}
