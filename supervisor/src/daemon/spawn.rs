//! Starting a worker: a fresh cgroup with the instance's limits, a private socketpair, and a
//! process that joins its cgroup (and drops to `worker_user`) between fork and exec.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use belljar_host::cgroup::{self, CgroupBackend, Limits};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::{Gid, Uid, User};

use super::instance::Instance;

/// Everything a spawn needs besides the instance.
#[derive(Debug)]
pub struct SpawnEnv<'a> {
    pub cgroups: &'a dyn CgroupBackend,
    pub parent: &'a Path,
    pub worker_bin: &'a Path,
    pub state_dir: &'a Path,
    pub headroom: u64,
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

/// The cgroup settings of an instance: max = the reservation; high = 95% of it (throttle and
/// early warning before a kill) but never below the estimate, since throttling below what the
/// model is known to need only makes it re-read its weights; low = the estimate less its
/// reclaimable page cache; swap as configured.
pub fn limits(inst: &Instance) -> Limits {
    Limits {
        max: inst.required,
        high: (inst.required / 100 * 95)
            .max(inst.estimate)
            .min(inst.required),
        low: inst.protected.min(inst.required),
        swap_max: inst.spec.swap_max.bytes(),
    }
}

pub fn spawn(env: &SpawnEnv<'_>, inst: &Instance) -> Result<Spawned, String> {
    let name = inst.spec.name.as_str();
    let user = match &inst.spec.worker_user {
        Some(u) => Some(
            User::from_name(u)
                .map_err(|e| format!("cannot look up worker_user {u:?}: {e}"))?
                .ok_or_else(|| {
                    format!("worker_user {u:?} does not exist; create it or unset worker_user")
                })?,
        ),
        None => None,
    };
    let state_dir = env.state_dir.join("instances").join(name);
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    if let Some(u) = &user {
        nix::unistd::chown(&state_dir, Some(u.uid), Some(u.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", state_dir.display(), u.name))?;
    }

    // A fresh cgroup per start, so peak and event counters are this run's.
    let dir = env.parent.join(name);
    cgroup::destroy(env.cgroups, &dir, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    std::fs::create_dir(&dir)
        .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
    env.cgroups
        .apply_limits(&dir, &limits(inst))
        .map_err(|e| e.to_string())?;
    let procs = cgroup::open_procs(&dir).map_err(|e| e.to_string())?;

    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
    let spec = &inst.spec;
    let mut cmd = Command::new(env.worker_bin);
    cmd.arg("serve")
        .arg("--fd")
        .arg(theirs.as_raw_fd().to_string())
        .args(["--instance", name, "--model"])
        .arg(&spec.model)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--ctx", &spec.ctx.to_string()])
        .args([
            "--gpu-layers",
            &inst.gpu.layers(spec.gpu_layers).to_string(),
        ])
        .args(["--gpu-device", &spec.gpu_device.to_string()])
        .args(["--threads", &spec.threads.to_string()])
        .args(["--heartbeat-interval", &spec.heartbeat_interval.to_string()])
        .args(["--required", &inst.required.to_string()])
        .args(["--headroom", &env.headroom.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The supervisor's RUST_LOG is for the supervisor; workers (llama.cpp included) log
        // at BELLJAR_WORKER_LOG, warnings by default.
        .env(
            "RUST_LOG",
            std::env::var("BELLJAR_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        );

    if !spec.use_mmap {
        cmd.arg("--no-mmap");
    }
    let procs_fd = procs.as_raw_fd();
    let link_fd = theirs.as_raw_fd();
    let ids = user.map(|u| (u.uid, u.gid));
    let score = belljar_budget::restart::oom_score_adj(spec.priority).to_string();
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (write, setsid, open, fcntl, setgroups, setgid, setuid) on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || pre_exec(procs_fd, link_fd, score.as_bytes(), ids));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", env.worker_bin.display()))?;
    Ok(Spawned {
        pid: child.id(),
        cgroup: dir,
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
        c"/proc/self/oom_score_adj",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&adj, oom_score)?;
    drop(adj);
    fcntl(link, FcntlArg::F_SETFD(FdFlag::empty()))?;
    if let Some((uid, gid)) = ids {
        nix::unistd::setgroups(&[gid])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
    }
    Ok(())
}
