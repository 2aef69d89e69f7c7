//! Readings of a process: its resident memory.

use std::path::PathBuf;

use crate::meminfo::ProcRoot;

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ProcessReadError {
    path: PathBuf,
    source: procfs::ProcError,
}

/// Resident set size of `pid` in bytes (`None`: this process), from `<proc root>/PID/statm`.
pub fn read_rss(proc_root: &ProcRoot, pid: Option<u32>) -> Result<u64, ProcessReadError> {
    let dir = proc_root
        .path()
        .join(pid.map_or_else(|| "self".to_owned(), |p| p.to_string()));
    let err = |source| ProcessReadError {
        path: dir.join("statm"),
        source,
    };
    let process = procfs::process::Process::new_with_root(dir.clone()).map_err(err)?;
    let statm = process.statm().map_err(err)?;
    Ok(statm.resident * procfs::page_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_is_plausible() {
        let rss = read_rss(&ProcRoot::default(), None).unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        let by_pid = read_rss(&ProcRoot::default(), Some(std::process::id())).unwrap();
        assert!(by_pid > 1 << 20);
        assert!(read_rss(&ProcRoot::default(), Some(u32::MAX)).is_err());
    }
}
