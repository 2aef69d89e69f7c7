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
