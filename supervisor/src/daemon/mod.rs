//! The supervisor daemon: one event loop that owns all state. Worker links, the control server,
//! child exits and timers feed it events; it decides and acts (spawn, signal, cgroup kill).
//!
//! `serve` is a library function taking a bound control listener and a shutdown future, so tests
//! and `main` wire it the same way.

#![deny(clippy::too_many_lines)]

mod commands;
mod control;
mod drive;
pub mod events;
mod gpu;
pub mod host;
pub mod http;
mod instance;
mod lifecycle;
mod listen;
mod metrics;
mod notify;

mod output;

pub(crate) mod persist;
mod pressure;
pub(crate) mod requests;
mod runs;
mod spawn;
mod swap;
#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use belljar_budget::Ledger;
use belljar_budget::lifecycle::{Input, Limits, RunStats};
use belljar_host::ProcRoot;
use belljar_host::cgroup::CgroupBackend;
use belljar_host::proc_ctl::Exit;
use belljar_protocol::PROTOCOL_VERSION;
use belljar_protocol::control::{
    BudgetStatus, ControlError, GpuStatus, HostStatus, InstanceStatus, MemoryStatus, Response,
    StatusReport,
};
use belljar_protocol::worker::WorkerMsg;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

pub use control::Access;
pub use instance::State;
use instance::{Instance, ReplyTx};

/// The loop's clock: tokio's, so tests that pause time drive every timer of the lifecycle.
pub(crate) fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How long an OOM notification waits for the kernel to count the kill.
const OOM_SETTLE: Duration = Duration::from_millis(20);
/// How long a cgroup's removal waits for it to empty.
const CGROUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What `serve` needs, resolved by the `run` command.
#[derive(Debug)]
pub struct DaemonConfig {
    /// Shared with the blocking pool, where cgroups are destroyed.
    pub cgroups: Arc<dyn CgroupBackend>,
    /// Starts workers and reports child exits (`host::Processes` for real ones).
    pub spawner: Box<dyn host::Spawner>,
    /// The absolute cgroup directory that holds the instance cgroups.
    pub parent: PathBuf,
    /// Remove `parent` itself at shutdown (false when it is the supervisor's own delegated
    /// cgroup).
    pub remove_parent: bool,
    pub state_dir: PathBuf,
    pub worker_bin: PathBuf,
    pub headroom: u64,
    pub usable: u64,
    pub proc_root: ProcRoot,
    /// The mode's instances with their estimates.
    pub instances: Vec<(belljar_config::InstanceSpec, Admitted)>,
    /// The config, for `[defaults]` of instances added at run time.
    pub config: belljar_config::Config,
    /// Who may use the control socket.
    pub access: Access,
    /// The bound `--metrics` listener and its address.
    pub metrics: Option<(std::net::TcpListener, std::net::SocketAddr)>,
    /// NVML, when the GPU guard is on.
    pub gpus: Option<belljar_host::gpu::Gpus>,
    /// The bound HTTP API listener and its settings, unless `--http off`.
    pub http: Option<http::HttpServe>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot set up the event loop: {0}")]
    Setup(std::io::Error),
}

/// How an instance was admitted: its estimate, where it came from, and what the cgroup
/// protects.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub estimate: u64,
    pub required: u64,
    pub source: belljar_budget::estimate::Origin,
    /// `memory.low`: the estimate less what is reclaimable.
    pub protected: u64,
    /// The model's identity, for recording this instance's observed peaks.
    pub identity: Option<crate::learn::ModelIdentity>,
    /// The VRAM reservation with `gpu_layers` (0 without, or when the header cannot say).
    pub vram: u64,
}

/// Events into the loop.
#[derive(Debug)]
enum Event {
    Worker {
        name: String,
        generation: u64,
        msg: WorkerMsg,
    },
    LinkClosed {
        name: String,
        generation: u64,
    },
    /// A command, its client, and who sent it.
    Control(belljar_protocol::control::Command, ReplyTx, control::Peer),
    /// The cgroup's OOM state may have changed (eventfd on v1, inotify on v2).
    Oom {
        name: String,
        generation: u64,
    },
    /// A PSI trigger fired: tasks are stalling on memory, read the pressure now.
    PressureWake,
    /// A cgroup's removal (on the blocking pool) is over.
    CgroupGone {
        dir: PathBuf,
        result: Result<(), String>,
    },
    /// An added instance's plan (model probe, header, observations: read on the blocking
    /// pool) is ready.
    Planned {
        name: String,
        plan: Box<Result<commands::Plan, Response>>,
    },
    /// A request for the instance (or alias) `model`, from an HTTP client.
    Request {
        model: String,
        prompt: Box<belljar_protocol::worker::Prompt>,
        client: requests::Client,
    },
    /// The client of request `id` went away (disconnected, or gave up).
    RequestGone {
        id: u64,
    },
}

/// A worker's exit waiting for its cgroup's removal.
#[derive(Debug)]
struct Exiting {
    name: String,
    pid: u32,
    exit: Exit,
    /// The run's cgroup counters, read when the exit was reaped.
    stats: Option<RunStats>,
}

struct Daemon {
    cfg: DaemonConfig,
    instances: BTreeMap<String, Instance>,
    ledger: Ledger,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
    stopping: bool,
    /// Requests (HTTP and `ask`), queued or in flight, by id.
    requests: BTreeMap<u64, requests::Request>,
    /// The origin of the monotonic clock the restart policy sees.
    epoch: Instant,
    /// The pressure guard's level, next tick and last shedding.
    level: belljar_budget::pressure::Level,
    pressure_at: Option<Instant>,
    last_shed: Option<Instant>,
    /// sd_notify: half the watchdog period, the next ping, the last STATUS= sent.
    watchdog: Option<Duration>,
    watchdog_at: Option<Instant>,
    last_status: String,
    /// The GPU guard: the last readings, each GPU's level and last fallback or restore.
    gpu_readings: Vec<belljar_budget::gpu::GpuReading>,
    gpu_level: BTreeMap<u32, belljar_budget::pressure::Level>,
    gpu_last_action: BTreeMap<u32, Instant>,
    /// Writes observed peaks for the learned corrections, off the loop.
    learn: crate::learn::Recorder,
    /// Cgroups being removed on the blocking pool: nothing new starts in one until it is gone.
    destroying: BTreeSet<PathBuf>,
    /// Starts waiting for the last run's cgroup to go: the limits and GPU layers of the spawn
    /// the lifecycle asked for.
    deferred_starts: BTreeMap<String, (Limits, u32)>,
    /// Runs whose worker exited, by cgroup: classified once the cgroup is gone.
    exiting: BTreeMap<PathBuf, Exiting>,
    /// `add`s being planned on the blocking pool: the request and its client, by name.
    adding: BTreeMap<String, (belljar_protocol::control::AddRequest, ReplyTx)>,
    /// [swap] `try_loads` is running (a nested call asks for another round instead).
    swapping: bool,
    swap_again: bool,
    /// Orders wanted loads (first wanted, first considered among equal priorities).
    swap_seq: u64,
}

/// Runs the daemon until `shutdown` resolves and every worker has stopped.
pub async fn serve(
    mut cfg: DaemonConfig,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (exit_tx, mut exits) = mpsc::unbounded_channel();
    cfg.spawner
        .watch_exits(exit_tx)
        .map_err(DaemonError::Setup)?;
    tokio::spawn(control::accept_loop(
        listener,
        tx.clone(),
        cfg.access.clone(),
    ));
    if let Some((l, _)) = &cfg.metrics {
        let l = l
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(DaemonError::Setup)?;
        tokio::spawn(metrics::serve(l, tx.clone()));
    }
    if let Some(h) = &cfg.http {
        let server = http::Server::new(h, tx.clone()).map_err(DaemonError::Setup)?;
        tokio::spawn(server.serve());
    }

    let mut daemon = Daemon {
        ledger: Ledger::new(cfg.usable),
        instances: BTreeMap::new(),
        events: tx,
        generation: 0,
        stopping: false,
        requests: BTreeMap::new(),
        epoch: clock(),
        level: belljar_budget::pressure::Level::Normal,
        pressure_at: Some(clock()),
        last_shed: None,
        watchdog: None,
        watchdog_at: None,
        last_status: String::new(),
        learn: crate::learn::Recorder::spawn(cfg.state_dir.clone()),
        gpu_readings: Vec::new(),
        gpu_level: BTreeMap::new(),
        gpu_last_action: BTreeMap::new(),
        destroying: BTreeSet::new(),
        deferred_starts: BTreeMap::new(),
        exiting: BTreeMap::new(),
        adding: BTreeMap::new(),
        swapping: false,
        swap_again: false,
        swap_seq: 0,
        cfg,
    };
    daemon.admit_all();
    daemon.restore_added();
    daemon.watch_psi();
    daemon.notify_ready();
    tokio::pin!(shutdown);
    loop {
        let deadline = daemon.next_deadline();
        tokio::select! {
            // In this order: a worker's last frames (a `Failed` reason written just before it
            // exited) are handled before its exit, which arrives on another channel.
            biased;
            Some(ev) = rx.recv() => daemon.handle(ev),
            Some((pid, exit)) = exits.recv() => daemon.on_child_exit(pid, exit),
            () = &mut shutdown, if !daemon.stopping => daemon.begin_stop(),
            () = sleep_until(deadline), if deadline.is_some() => daemon.deadlines(),
        }
        // Timers already due (a zero backoff) run now: the timer wheel's 1 ms tick would
        // otherwise add up to a millisecond to every immediate restart.
        if daemon.next_deadline().is_some_and(|d| d <= clock()) {
            daemon.deadlines();
        }
        daemon.notify_status();
        if daemon.stopping
            && daemon.instances.values().all(|i| i.link.is_none())
            && daemon.destroying.is_empty()
        {
            break;
        }
    }
    daemon.final_cleanup().await;
    Ok(())
}

/// The status report, asked of the loop as a client would (`/metrics`, the HTTP API's
/// snapshots); the error says why there is none.
async fn status_snapshot(
    events: &mpsc::UnboundedSender<Event>,
    timeout: Duration,
) -> Result<StatusReport, String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    events
        .send(Event::Control(
            belljar_protocol::control::Command::Status(belljar_protocol::control::StatusQuery {}),
            tx,
            control::Peer::SUPERVISOR,
        ))
        .map_err(|_| "the supervisor is stopping".to_owned())?;
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(Response::Status(report))) => Ok(*report),
        Ok(_) => Err("the supervisor did not answer".to_owned()),
        Err(_) => Err(format!("the event loop did not answer within {timeout:?}")),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Layer 2 and the first start of every instance of the mode; on-demand instances wait,
    /// `unloaded`, for their first request.
    fn admit_all(&mut self) {
        for (spec, a) in std::mem::take(&mut self.cfg.instances) {
            let name = spec.name.to_string();
            let inst = Instance::new(spec, a, self.epoch, self.new_queue());
            let on_demand = inst.state() == State::Unloaded;
            self.instances.insert(name.clone(), inst);
            if !on_demand {
                self.drive(&name, Input::Admit);
            }
        }
    }

    /// A new instance's request queue, sized by `[http]`.
    fn new_queue(&self) -> belljar_budget::queue::Queue {
        let http = &self.cfg.config.http;
        belljar_budget::queue::Queue::new(http.queue as usize, http.queue_timeout.0)
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Worker {
                name,
                generation,
                msg,
            } => self.on_worker(&name, generation, msg),
            Event::LinkClosed { name, generation } => {
                if let Some(w) = self.instances.get(&name).and_then(|i| i.link.as_ref()) {
                    if w.generation == generation {
                        tracing::debug!(instance = %name, "worker link closed");
                    }
                }
            }
            Event::Control(cmd, reply, peer) => self.on_control(cmd, reply, peer),
            Event::Oom { name, generation } => self.on_oom_event(&name, generation),
            Event::PressureWake => {
                if self.cfg.config.pressure.enabled && !self.stopping {
                    self.pressure_tick();
                }
            }
            Event::CgroupGone { dir, result } => self.on_cgroup_gone(dir, result),
            Event::Planned { name, plan } => self.finish_add(&name, *plan),
            Event::Request {
                model,
                prompt,
                client,
            } => self.submit(&model, *prompt, client),
            Event::RequestGone { id } => self.gone(id),
        }
    }

    fn on_worker(&mut self, name: &str, generation: u64, msg: WorkerMsg) {
        let Some(inst) = self.instances.get(name) else {
            return;
        };
        let Some(link) = inst
            .link
            .as_ref()
            .filter(|l| l.generation == generation && !l.exited)
        else {
            return; // a message from a previous run of this instance
        };
        let greeted = inst.machine.run.as_ref().is_some_and(|r| r.greeted);
        let msg = msg.sanitized();
        let input = match msg {
            WorkerMsg::Hello(h) if !greeted => {
                if h.protocol_version != PROTOCOL_VERSION {
                    tracing::warn!(instance = %name, "worker speaks protocol {}, supervisor {PROTOCOL_VERSION}", h.protocol_version);
                }
                Input::Hello {
                    valid: h.instance == name && h.pid == link.pid,
                }
            }
            other if !greeted => {
                tracing::error!(instance = %name, "worker did not introduce itself correctly ({other:?})");
                Input::Hello { valid: false }
            }
            WorkerMsg::Hello(_) => Input::Hello { valid: true },
            WorkerMsg::Loading(l) => Input::Loading(l.fraction),
            WorkerMsg::Ready(r) => Input::Ready {
                load_ms: r.load_ms,
                turns: r.session.turns,
                // A session set aside is worth a word in the reason (and the journal).
                restored_from: match r.session.note {
                    Some(note) => format!("{}: {note}", r.session.restored_from.as_str()),
                    None => r.session.restored_from.as_str().to_owned(),
                },
            },
            WorkerMsg::Refused(r) => Input::Said {
                reason: r.reason,
                gpu_alloc: false,
            },
            WorkerMsg::Failed(f) => Input::Said {
                reason: f.reason,
                gpu_alloc: f.gpu_alloc,
            },
            WorkerMsg::Heartbeat(_) => Input::Heartbeat,
            WorkerMsg::Token(t) => return self.on_token(name, generation, t.id, t.text),
            WorkerMsg::Done(d) => return self.on_done(name, generation, d),
            WorkerMsg::Error(e) => return self.on_error(name, generation, e),
        };
        self.drive(name, input);
    }

    /// A child exited (reported by the spawner). A worker's run ends here: its cgroup's
    /// counters are read and the cgroup is removed, at once when the worker was alone in it (a
    /// read and an rmdir), else on the blocking pool (anything the worker left behind dies
    /// there). The lifecycle classifies the exit once the cgroup is gone, so the state, the
    /// replies and the restart all come after it. Orphans re-parented to us (a worker's
    /// double-forked children) were simply reaped.
    fn on_child_exit(&mut self, pid: u32, exit: Exit) {
        let found = self.instances.iter_mut().find_map(|(n, i)| {
            i.link
                .as_mut()
                .filter(|l| l.pid == pid && !l.exited)
                .map(|_| n.clone())
        });
        let Some(name) = found else {
            tracing::debug!(pid, "reaped an orphaned descendant");
            return;
        };
        let Some(inst) = self.instances.get_mut(&name) else {
            return;
        };
        let Some(link) = inst.link.as_mut() else {
            return;
        };
        link.exited = true;
        let dir = link.cgroup.clone();
        // A fresh cgroup per run means every oom_kill counted here belongs to this run.
        let stats = self.cfg.cgroups.memory(&dir).ok().map(|s| RunStats {
            limit: s.limit,
            peak: s.peak,
            oom_kill: s.oom_kill,
        });
        // The run's VRAM counts as free only once NVML no longer lists its pids.
        inst.gpu_memory = None;
        let pids = std::mem::take(&mut inst.gpu_pids);
        if !pids.is_empty() {
            inst.gpu_release = instance::GpuRelease::Pending {
                pids,
                since: clock(),
            };
        }
        // The common case: the worker was alone in its cgroup, which goes at once.
        let gone = !self.destroying.contains(&dir)
            && self.cfg.cgroups.remove_if_empty(&dir).unwrap_or(false);
        let x = Exiting {
            name,
            pid,
            exit,
            stats,
        };
        if gone {
            self.on_exit(x);
        } else {
            self.exiting.insert(dir.clone(), x);
            self.destroy_later(dir);
        }
    }

    /// The lifecycle classifies a run's exit (its cgroup is gone); the run's link goes.
    fn on_exit(&mut self, x: Exiting) {
        self.drive(
            &x.name,
            Input::Exited {
                exit: x.exit,
                stats: x.stats,
            },
        );
        if let Some(inst) = self.instances.get_mut(&x.name) {
            if inst.link.as_ref().is_some_and(|l| l.pid == x.pid) {
                inst.link = None;
            }
        }
    }

    fn instance_status(&self, name: &str, i: &Instance) -> InstanceStatus {
        let m = &i.machine;
        let stats = i
            .link
            .as_ref()
            .and_then(|w| self.cfg.cgroups.memory(&w.cgroup).ok());
        let run = m.run.as_ref();
        InstanceStatus {
            name: name.to_owned(),
            state: m.state.as_str().to_owned(),
            thrashing: i.thrashing,
            reason: i.reason().to_owned(),
            pid: run.and_then(|r| r.pid),
            restarts: m.restarts,
            oom_kills: m.oom_kills,
            last_exit: m.last_exit.clone(),
            load_progress: m.load_progress,
            allocated: self.ledger.get(name).unwrap_or(0),
            estimate_source: i.estimate_source.as_str().to_owned(),
            memory: MemoryStatus {
                current: stats.map(|s| s.current),
                limit: stats.and_then(|s| s.limit),
                reservation: stats.map(|s| s.reservation),
                peak: stats.and_then(|s| s.peak),
                last_peak: m.last_peak,
            },
            uptime_s: run
                .filter(|r| r.pid.is_some())
                .map(|r| clock().saturating_duration_since(r.started).as_secs()),
            gpu_memory: i.link.as_ref().and(i.gpu_memory),
            cpu_fallback: i.spec.gpu_layers > 0
                && m.gpu.fallback != belljar_budget::gpu::Fallback::None,
            gpu_release: i.gpu_release.as_str().map(str::to_owned),
            queued: i.queue.len() as u64,
            aliases: i.spec.aliases.clone(),
            chat_template: i.spec.chat_template.clone(),
            last_used_unix: i.last_used.map(|at| {
                let ago = self.now().saturating_sub(at);
                std::time::SystemTime::now()
                    .checked_sub(ago)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs())
            }),
            load: i.spec.load.as_str().to_owned(),
            pinned: i.spec.pinned,
            loads: m.loads,
            evictions: m.evictions,
        }
    }

    fn status(&self) -> StatusReport {
        let (host, source) = self.effective_memory().unwrap_or((
            belljar_budget::HostMemory {
                total: 0,
                available: 0,
            },
            belljar_host::pressure::Source::Host,
        ));
        let instances = self
            .instances
            .iter()
            .map(|(name, i)| self.instance_status(name, i))
            .collect();
        StatusReport {
            host: HostStatus {
                total: host.total,
                available: host.available,
                level: self.level.as_str().to_owned(),
                psi_some_avg10: belljar_host::pressure::psi_some_avg10(&self.cfg.proc_root)
                    .filter(|v| v.is_finite()),
                source: source.as_str().to_owned(),
            },
            budget: BudgetStatus {
                usable: self.ledger.capacity(),
                allocated: self.ledger.allocated(),
            },
            instances,
            metrics_addr: self.cfg.metrics.as_ref().map(|(_, a)| a.to_string()),
            http_addr: self.cfg.http.as_ref().map(|h| h.addr.to_string()),
            gpus: self
                .gpu_readings
                .iter()
                .map(|g| GpuStatus {
                    index: g.index,
                    name: g.name.clone(),
                    used: g.used,
                    total: g.total,
                    level: self
                        .gpu_level
                        .get(&g.index)
                        .copied()
                        .unwrap_or(belljar_budget::pressure::Level::Normal)
                        .as_str()
                        .to_owned(),
                })
                .collect(),
            omitted: 0,
        }
    }
}

/// A refusal for a client: exit code 1.
fn refused(message: String) -> Response {
    Response::Error(ControlError {
        message,
        exit_code: 1,
    })
}

/// A usage error for a client: exit code 2.
fn usage(message: String) -> Response {
    Response::Error(ControlError {
        message,
        exit_code: 2,
    })
}

/// The leaf a delegated supervisor moves itself into (cgroup v2's no-internal-processes rule).
pub const SUPERVISOR_LEAF: &str = "supervisor";
