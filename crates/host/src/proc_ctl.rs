//! Process control the supervisor needs: directory locks, the subreaper flag, reaping every
//! child (orphans included), signals, and the socket-path length check.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The longest path a Unix socket address holds (`sun_path`, NUL included).
pub const MAX_SOCKET_PATH: usize = 108;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another supervisor is already running on {0} (it holds {1}); stop it first or give this one other --runtime-dir/--state-dir"
    )]
    Held(PathBuf, PathBuf),
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on a directory (a `.lock` file inside it), held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Takes the exclusive lock of `dir`, failing at once when another process holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    let path = dir.join(".lock");
    // Never through a link: a `.lock` planted as a symlink is refused (ELOOP).
    let file = crate::safe_fs::open_lock_file(dir, ".lock").map_err(|source| LockError::Io {
        path: path.clone(),
        source,
    })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held(dir.to_path_buf(), path)),
        Err((_, e)) => Err(LockError::Io {
            path,
            source: e.into(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParentLockError {
    #[error(
        "another supervisor ({}) already manages the cgroup parent {dir}; stop it first or give this one another --cgroup-parent",
        holder.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"))
    )]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock the cgroup parent {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on a cgroup parent directory itself (flock works on cgroupfs
/// directories), held until dropped: two supervisors never manage the same instance cgroups.
#[derive(Debug)]
pub struct CgroupParentLock {
    _lock: Flock<File>,
}

/// Takes the exclusive lock of the cgroup directory `dir`, failing at once when another process
/// holds it; the error names the holder's pid, read from `<proc>/locks`.
pub fn lock_cgroup_parent(dir: &Path, proc: &Path) -> Result<CgroupParentLock, ParentLockError> {
    let io = |source| ParentLockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    // O_RDONLY on a directory (std opens it O_CLOEXEC: workers do not inherit the lock).
    let file = File::open(dir).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(CgroupParentLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            use std::os::unix::fs::MetadataExt;
            let holder = std::fs::read_to_string(proc.join("locks"))
                .ok()
                .and_then(|text| flock_holder(&text, meta.dev(), meta.ino()));
            Err(ParentLockError::Held {
                dir: dir.to_path_buf(),
                holder,
            })
        }
        Err((_, e)) => Err(io(e.into())),
    }
}

/// The pid holding a flock on the file `dev`/`ino`, from the text of `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`; blocked waiters, `->`, are skipped).
pub fn flock_holder(proc_locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (nix::libc::major(dev), nix::libc::minor(dev));
    let file = format!("{major:02x}:{minor:02x}:{ino}");
    proc_locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&file.as_str()))
            .then(|| f.get(4).and_then(|p| p.parse().ok()))
            .flatten()
    })
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (systemd and most shells start
/// services with a soft limit of 1024); returns the soft limit before and after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::libc::{RLIMIT_NOFILE, getrlimit, rlimit, setrlimit};
    let mut lim = rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass.
    if unsafe { getrlimit(RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads only the struct we pass.
        if unsafe { setrlimit(RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Makes this process the reaper of its orphaned descendants (a worker's double-forked child
/// is re-parented here, not to PID 1).
pub fn set_child_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(Into::into)
}

/// How a child ended: the lifecycle's own type (crates/budget), one spelling.
pub use belljar_budget::lifecycle::Exit;

/// Reaps every child that has exited, without blocking.
pub fn reap_all() -> Vec<(u32, Exit)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw() as u32, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw() as u32, Exit::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => {}
        }
    }
}

/// Sends `SIGKILL` to `pid` (ignoring a process that is already gone).
pub fn kill_pid(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
}

/// Whether a process with this pid exists (a zombie counts).
pub fn pid_exists(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|raw| kill(Pid::from_raw(raw), None).is_ok())
}

/// Sets this process's `oom_score_adj` (-1000..=1000; negative values need privilege).
pub fn set_own_oom_score_adj(value: i32) -> std::io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", value.to_string())
}

/// Sets this process's nice value (lower runs first; below 0 needs privilege).
pub fn set_own_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flock_holder_is_read_from_proc_locks() {
        let dev = nix::libc::makedev(0, 0x1f);
        let text = "1: POSIX  ADVISORY  WRITE 10 00:1f:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:1f:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 00:1f:77 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 7 00:20:77 0 EOF\n";
        assert_eq!(super::flock_holder(text, dev, 77), Some(4242));
        assert_eq!(super::flock_holder(text, dev, 78), None);
        assert_eq!(
            super::flock_holder(text, nix::libc::makedev(0, 0x20), 77),
            Some(7)
        );
    }

    #[test]
    fn a_second_flock_on_a_directory_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("belljar-flock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = super::lock_cgroup_parent(&dir, std::path::Path::new("/proc")).unwrap();
        let err = super::lock_cgroup_parent(&dir, std::path::Path::new("/proc")).unwrap_err();
        assert!(
            matches!(err, super::ParentLockError::Held { holder: Some(p), .. } if p == std::process::id()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
        drop(first);
        drop(super::lock_cgroup_parent(&dir, std::path::Path::new("/proc")).unwrap());
        std::fs::remove_dir(&dir).unwrap();
    }
}
