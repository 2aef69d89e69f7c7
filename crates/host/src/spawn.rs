//! Starting a worker process: its state directory, a fresh cgroup with its limits, a private
//! socketpair, and a child that joins its cgroup, leaves the supervisor's session, sets its OOM
//! score and drops to `worker_user` between fork and exec.
//!
//! The caller resolves everything into a [`SpawnRequest`] (what to run, with which limits, as
//! whom); this module only carries it out.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::{Gid, Uid, User};

use crate::cgroup::{CgroupBackend, Limits};

/// In [`SpawnRequest::args`], stands for the number of the child's end of the link.
pub const LINK_FD: &str = "{link-fd}";

/// Where a process's OOM score is set (relative to the child, between fork and exec).
const OOM_SCORE_ADJ: &std::ffi::CStr = c"/proc/self/oom_score_adj";

/// One run of a worker, fully resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnRequest {
    /// The instance's name, for messages.
    pub name: String,
    pub program: PathBuf,
    /// The arguments; an argument equal to [`LINK_FD`] becomes the child's link descriptor.
    pub args: Vec<OsString>,
    /// Variables set in the child's environment (the rest is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// The run's cgroup: created here, so it must not exist yet.
    pub cgroup: PathBuf,
    pub limits: Limits,
    /// `worker_user`: the child drops to this user (and its primary group).
    pub user: Option<String>,
    /// The child's `oom_score_adj`.
    pub oom_score_adj: i32,
    /// The instance's session directory (`<state>/instances/<name>`): created (`instances` 0700,
    /// this one 0700 and given to `user`); the child starts in it.
    pub state_dir: PathBuf,
}

/// A started worker: its pid, its cgroup, our end of its link and its output pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub cgroup: PathBuf,
    pub link: UnixStream,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Starts `req` as a child process in its own fresh cgroup (see the module doc).
pub fn spawn(req: &SpawnRequest, cgroups: &dyn CgroupBackend) -> Result<Spawned, String> {
    let user = match &req.user {
        Some(u) => Some(
            User::from_name(u)
                .map_err(|e| format!("cannot look up worker_user {u:?}: {e}"))?
                .ok_or_else(|| {
                    format!("worker_user {u:?} does not exist; create it or unset worker_user")
                })?,
        ),
        None => None,
    };
    // 0700 and the worker's own; the worker starts in it (the state dir above is root's 0700,
    // so an unprivileged worker reaches its session dir only as its working directory).
    crate::safe_fs::session_dir(&req.state_dir, user.as_ref().map(|u| (u.uid, u.gid)))
        .map_err(|e| e.to_string())?;

    // A fresh cgroup per start, so peak and event counters are this run's.
    let dir = &req.cgroup;
    cgroups.create(dir).map_err(|e| e.to_string())?;
    cgroups
        .apply_limits(dir, &req.limits)
        .map_err(|e| e.to_string())?;
    let procs = cgroups.attach_handle(dir).map_err(|e| e.to_string())?;

    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
    let link_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&req.program);
    for arg in &req.args {
        if arg == LINK_FD {
            cmd.arg(link_fd.to_string());
        } else {
            cmd.arg(arg);
        }
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let procs_fd = procs.as_raw_fd();
    let ids = user.map(|u| (u.uid, u.gid));
    let score = req.oom_score_adj.to_string();
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (write, setsid, open, fcntl, setgroups, setgid, setuid) on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || pre_exec(procs_fd, link_fd, score.as_bytes(), ids));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", req.program.display()))?;
    Ok(Spawned {
        pid: child.id(),
        cgroup: dir.clone(),
        link: ours,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}

/// Runs in the child: join the cgroup first (so every instruction of the worker's own is
/// accounted there), leave the supervisor's session and terminal, set the OOM score from the
/// priority (lower priority, killed first), keep the link open across exec, then drop privileges.
fn pre_exec(
    procs_fd: i32,
    link_fd: i32,
    oom_score: &[u8],
    ids: Option<(Uid, Gid)>,
) -> std::io::Result<()> {
    // SAFETY: both descriptors are open in the parent for the whole spawn and inherited by fork.
    let (procs, link) = unsafe {
        (
            BorrowedFd::borrow_raw(procs_fd),
            BorrowedFd::borrow_raw(link_fd),
        )
    };
    nix::unistd::write(procs, b"0")?;
    // Its own session: a Ctrl-C (or SIGHUP) meant for the supervisor's terminal must not reach
    // the workers; the supervisor stops them itself, gracefully.
    nix::unistd::setsid()?;
    let adj = nix::fcntl::open(
        OOM_SCORE_ADJ,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&adj, oom_score)?;
    drop(adj);
    // The supervisor runs at a raised priority (nice -5) so that its loop stays ahead of the
    // workers; a worker must not inherit it. Best effort: from a nice above 0 (a supervisor
    // started with `nice`), lowering it needs privilege and it stays.
    // SAFETY: setpriority takes plain integers and touches no memory; async-signal-safe.
    let _ = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 0) };
    fcntl(link, FcntlArg::F_SETFD(FdFlag::empty()))?;
    if let Some((uid, gid)) = ids {
        nix::unistd::setgroups(&[gid])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
    }
    Ok(())
}
