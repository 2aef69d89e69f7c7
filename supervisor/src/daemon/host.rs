//! The loop's seam to processes: starting a worker and learning that a child exited. The real
//! implementation ([`Processes`]) forks and execs through `belljar_host::spawn` and reaps on
//! SIGCHLD; a test double can hand back one end of a socketpair to an in-process fake worker
//! and report a fake pid's exit whenever the test says so. With `CgroupBackend` (crates/host)
//! this is everything the loop does to the host.

use belljar_host::cgroup::CgroupBackend;
use belljar_host::proc_ctl::{self, Exit};
use belljar_host::spawn::{SpawnRequest, Spawned};
use tokio::sync::mpsc::UnboundedSender;

/// Where child exits go: the loop's channel of `(pid, how it ended)`.
pub type ExitSink = UnboundedSender<(u32, Exit)>;

/// Starts workers and reports their exits to the loop.
pub trait Spawner: std::fmt::Debug + Send {
    /// Starts one run: a fresh cgroup (`req.cgroup`, which must not exist), limits, the child
    /// joined to it. Quick: it does not wait for the child to do anything.
    fn spawn(&mut self, req: &SpawnRequest, cgroups: &dyn CgroupBackend)
    -> Result<Spawned, String>;
    /// From now on, sends every exited child (workers and re-parented orphans alike) to `exits`.
    /// Called once, inside the runtime, before the first spawn.
    fn watch_exits(&mut self, exits: ExitSink) -> std::io::Result<()>;
    /// At shutdown, after the last cgroup is gone: collects whatever is left to collect.
    fn reap_remaining(&mut self) {}
}

/// Real processes: fork/exec and `waitpid(-1, WNOHANG)` on every SIGCHLD.
#[derive(Debug, Default)]
pub struct Processes;

impl Spawner for Processes {
    fn spawn(
        &mut self,
        req: &SpawnRequest,
        cgroups: &dyn CgroupBackend,
    ) -> Result<Spawned, String> {
        belljar_host::spawn::spawn(req, cgroups)
    }

    fn watch_exits(&mut self, exits: ExitSink) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = signal(SignalKind::child())?;
        tokio::spawn(async move {
            loop {
                // Reaping is idempotent and collects every child that has exited, so SIGCHLDs
                // coalesced by the kernel lose nothing.
                for exit in proc_ctl::reap_all() {
                    if exits.send(exit).is_err() {
                        return;
                    }
                }
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(())
    }

    fn reap_remaining(&mut self) {
        let _ = proc_ctl::reap_all();
    }
}
