//! Host memory readings from `<proc root>/meminfo`, through the procfs crate.

use std::path::{Path, PathBuf};

use belljar_budget::HostMemory;
use procfs::FromRead;

/// Where procfs is mounted. Tests point it at a fixture directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRoot(pub PathBuf);

impl ProcRoot {
    pub const DEFAULT: &'static str = "/proc";

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot(PathBuf::from(Self::DEFAULT))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemInfoError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: procfs::ProcError,
    },
    #[error("{path} has no MemAvailable line (Linux 3.14 or newer is required)")]
    NoMemAvailable { path: PathBuf },
}

/// MemTotal and MemAvailable, in bytes.
pub fn read_host_memory(proc_root: &ProcRoot) -> Result<HostMemory, MemInfoError> {
    let path = proc_root.path().join("meminfo");
    let info = procfs::Meminfo::from_file(&path).map_err(|source| MemInfoError::Read {
        path: path.clone(),
        source,
    })?;
    let available = info
        .mem_available
        .ok_or(MemInfoError::NoMemAvailable { path })?;
    Ok(HostMemory {
        total: info.mem_total,
        available,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture made from this host's meminfo (procfs insists on the full set of lines), with
    /// MemTotal and MemAvailable replaced, or MemAvailable dropped.
    fn fixture(available: Option<&str>) -> tempfile::TempDir {
        let real = std::fs::read_to_string("/proc/meminfo").unwrap();
        let text: String = real
            .lines()
            .filter_map(|l| match l.split(':').next() {
                Some("MemTotal") => Some("MemTotal:       24576000 kB".to_owned()),
                Some("MemAvailable") => available.map(|a| format!("MemAvailable:   {a} kB")),
                _ => Some(l.to_owned()),
            })
            .map(|l| l + "\n")
            .collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meminfo"), text).unwrap();
        dir
    }

    #[test]
    fn reads_a_fixture() {
        let dir = fixture(Some("12288000"));
        let m = read_host_memory(&ProcRoot(dir.path().into())).unwrap();
        assert_eq!(m.total, 24_576_000 * 1024);
        assert_eq!(m.available, 12_288_000 * 1024);
    }

    #[test]
    fn missing_mem_available_is_an_error() {
        let dir = fixture(None);
        let e = read_host_memory(&ProcRoot(dir.path().into())).unwrap_err();
        assert!(e.to_string().contains("no MemAvailable"), "{e}");
        let e = read_host_memory(&ProcRoot(dir.path().join("nope"))).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn reads_this_host() {
        let m = read_host_memory(&ProcRoot::default()).unwrap();
        assert!(m.total > 0 && m.available <= m.total);
    }
}
