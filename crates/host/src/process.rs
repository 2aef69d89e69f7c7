//! Readings of a process: its resident memory, and its start time (what tells a process from
//! a later one that got the same pid).

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

/// When `pid` started, in clock ticks since boot (`<proc root>/PID/stat` field 22): a recorded
/// pid names the same process only while this is unchanged ([adopt]). `Ok(None)`: no such
/// process (any more).
pub fn start_ticks(proc_root: &ProcRoot, pid: u32) -> Result<Option<u64>, ProcessReadError> {
    let dir = proc_root.path().join(pid.to_string());
    let err = |source| ProcessReadError {
        path: dir.join("stat"),
        source,
    };
    let process = match procfs::process::Process::new_with_root(dir.clone()) {
        Ok(p) => p,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    match process.stat() {
        Ok(stat) => Ok(Some(stat.starttime)),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(e) => Err(err(e)),
    }
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

    #[test]
    fn a_start_time_tells_a_process_from_its_successor() {
        let root = ProcRoot::default();
        let me = start_ticks(&root, std::process::id()).unwrap().unwrap();
        assert_eq!(start_ticks(&root, std::process::id()).unwrap(), Some(me));
        // A child started after us, then gone.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let theirs = start_ticks(&root, pid).unwrap().unwrap();
        assert!(theirs >= me, "{theirs} < {me}");
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: gone, or (should the pid be reused at once) another process's start time.
        assert_ne!(start_ticks(&root, pid).unwrap(), Some(theirs));
        assert_eq!(start_ticks(&root, u32::MAX).unwrap(), None);
    }
}
