//! The supervisor daemon: one event loop that owns all state. Worker links, the control server,
//! child exits and timers feed it events; it decides and acts (spawn, signal, cgroup kill).
//!
//! `serve` is a library function taking a bound control listener and a shutdown future, so tests
//! and `main` wire it the same way.

mod commands;
mod control;
pub mod events;
mod gpu;
pub mod host;
mod instance;
mod lifecycle;
mod metrics;
mod notify;

mod output;

pub(crate) mod persist;
mod pressure;
mod spawn;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use belljar_budget::Ledger;
use belljar_budget::ratelimit::LineLimiter;
use belljar_host::ProcRoot;
use belljar_host::cgroup::CgroupBackend;
use belljar_host::proc_ctl::Exit;
use belljar_protocol::control::{
    AskDone, BudgetStatus, ControlError, GpuStatus, HostStatus, InstanceStatus, MemoryStatus,
    OkReply, Response, StatusReport, TokenText,
};
use belljar_protocol::tokio_io::{read_frame, write_frame};
use belljar_protocol::worker::{SupervisorMsg, Welcome, WorkerMsg};
use belljar_protocol::{MAX_FRAME, PROTOCOL_VERSION, decode};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

pub use control::Access;
use events::{Entry, Event as Lifecycle};
pub use instance::State;
use instance::{Instance, ReplyTx, Worker};

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
    Control(belljar_protocol::control::Command, ReplyTx),
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
}

/// A worker's exit waiting for its cgroup's removal.
#[derive(Debug)]
struct Exiting {
    name: String,
    pid: u32,
    exit: Exit,
    /// The run's cgroup counters, read when the exit was reaped.
    stats: Option<belljar_host::cgroup::MemoryStats>,
}

struct Daemon {
    cfg: DaemonConfig,
    instances: BTreeMap<String, Instance>,
    ledger: Ledger,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
    stopping: bool,
    /// In-flight `ask`s by request id: the instance and the client.
    asks: BTreeMap<u64, (String, ReplyTx)>,
    next_ask: u64,
    /// The origin of the monotonic clock the restart policy sees.
    epoch: Instant,
    /// When instances waiting for memory are checked again.
    memory_recheck_at: Option<Instant>,
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
    /// Instances whose start waits for their cgroup's removal.
    deferred_starts: BTreeSet<String>,
    /// Runs whose worker exited, by cgroup: classified once the cgroup is gone.
    exiting: BTreeMap<PathBuf, Exiting>,
    /// `add`s being planned on the blocking pool: the request and its client, by name.
    adding: BTreeMap<String, (belljar_protocol::control::AddRequest, ReplyTx)>,
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

    let mut daemon = Daemon {
        ledger: Ledger::new(cfg.usable),
        instances: BTreeMap::new(),
        events: tx,
        generation: 0,
        stopping: false,
        asks: BTreeMap::new(),
        next_ask: 0,
        epoch: Instant::now(),
        memory_recheck_at: None,
        level: belljar_budget::pressure::Level::Normal,
        pressure_at: Some(Instant::now()),
        last_shed: None,
        watchdog: None,
        watchdog_at: None,
        last_status: String::new(),
        learn: crate::learn::Recorder::spawn(cfg.state_dir.clone()),
        gpu_readings: Vec::new(),
        gpu_level: BTreeMap::new(),
        gpu_last_action: BTreeMap::new(),
        destroying: BTreeSet::new(),
        deferred_starts: BTreeSet::new(),
        exiting: BTreeMap::new(),
        adding: BTreeMap::new(),
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
            Some(ev) = rx.recv() => daemon.handle(ev),
            Some((pid, exit)) = exits.recv() => daemon.on_child_exit(pid, exit),
            () = &mut shutdown, if !daemon.stopping => daemon.begin_stop(),
            () = sleep_until(deadline), if deadline.is_some() => daemon.deadlines(),
        }
        // Timers already due (a zero backoff) run now: the timer wheel's 1 ms tick would
        // otherwise add up to a millisecond to every immediate restart.
        if daemon.next_deadline().is_some_and(|d| d <= Instant::now()) {
            daemon.deadlines();
        }
        daemon.notify_status();
        if daemon.stopping
            && daemon.instances.values().all(|i| i.worker.is_none())
            && daemon.destroying.is_empty()
        {
            break;
        }
    }
    daemon.final_cleanup().await;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Layer 2 and the first start of every instance of the mode.
    fn admit_all(&mut self) {
        for (spec, a) in std::mem::take(&mut self.cfg.instances) {
            let name = spec.name.to_string();
            let inst = Instance::new(spec, a);
            self.admit(name, inst);
        }
    }

    /// Layer 2 for one instance, then its start; a denial leaves it `failed` with the reason.
    fn admit(&mut self, name: String, mut inst: Instance) {
        match self.ledger.allocate(&name, inst.required) {
            Ok(()) => {
                inst.restart_state.record_start(self.now());
                self.start(&mut inst);
            }
            Err(denied) => {
                inst.set(State::Failed, denied.to_string());
                Entry::of(Lifecycle::NotAdmitted, &name, &inst)
                    .log(format_args!("not admitted: {denied}"));
            }
        }
        self.instances.insert(name, inst);
    }

    fn start(&mut self, inst: &mut Instance) {
        let env = spawn::SpawnEnv {
            parent: &self.cfg.parent,
            worker_bin: &self.cfg.worker_bin,
            state_dir: &self.cfg.state_dir,
            headroom: self.cfg.headroom,
        };
        let name = inst.spec.name.to_string();
        let req = spawn::request(&env, inst);
        // One run per cgroup: a run's cgroup (or one left behind) goes before the next is made.
        if self.destroying.contains(&req.cgroup) || self.cfg.cgroups.exists(&req.cgroup) {
            self.destroy_later(req.cgroup);
            self.deferred_starts.insert(name);
            inst.restart_at = None;
            inst.set(
                State::Starting,
                "waiting for the last run's cgroup to be removed",
            );
            return;
        }
        self.deferred_starts.remove(&name);
        match self.cfg.spawner.spawn(&req, &*self.cfg.cgroups) {
            Ok(s) => {
                self.generation += 1;
                let generation = self.generation;
                let (tx, rx) = mpsc::unbounded_channel();
                if let Err(e) = self.attach_link(&name, generation, s.link, rx) {
                    tracing::error!(instance = %name, "cannot watch the worker's link: {e}");
                }
                Entry::of(Lifecycle::Spawned, &name, inst)
                    .worker(s.pid, &s.cgroup)
                    .log(format_args!("spawned"));
                let logging = &self.cfg.config.logging;
                let limiter = inst
                    .output_limiter
                    .get_or_insert_with(|| {
                        std::sync::Arc::new(std::sync::Mutex::new(LineLimiter::new(
                            logging.worker_output_burst,
                            logging.worker_output_interval.0,
                        )))
                    })
                    .clone();
                for (stream, pipe) in [
                    (output::Stream::Stdout, s.stdout),
                    (output::Stream::Stderr, s.stderr),
                ] {
                    let Some(pipe) = pipe else { continue };
                    if let Err(e) =
                        output::forward(&name, stream, pipe, limiter.clone(), self.epoch)
                    {
                        tracing::warn!(instance = %name, "cannot forward the worker's {stream:?}: {e}");
                    }
                }

                let oom_watch = self.watch_oom(&name, generation, &s.cgroup);
                inst.worker = Some(Worker {
                    exited: false,
                    pid: s.pid,
                    generation,
                    started: Instant::now(),
                    cgroup: s.cgroup,
                    tx,
                    greeted: false,
                    oom_watch,
                    oom_seen: 0,
                });
                inst.load_progress = 0.0;
                inst.worker_said = None;
                inst.gpu_alloc_failed = false;
                inst.ready_since = None;
                inst.last_heartbeat = None;
                inst.last_progress = Instant::now();
                inst.watchdog_fired = false;
                inst.restart_at = None;
                inst.set(State::Starting, "worker started, waiting for its hello");
            }
            Err(e) => self.cannot_start(&name, inst, &e),
        }
    }

    /// A start that failed: the allocation goes, the instance is `failed`, and clients waiting
    /// for it to become ready are told why.
    fn cannot_start(&mut self, name: &str, inst: &mut Instance, e: &str) {
        self.deferred_starts.remove(name);
        self.ledger.release(name);
        inst.set(State::Failed, format!("cannot start: {e}"));
        Entry::of(Lifecycle::Failed, name, inst).log(format_args!("cannot start: {e}"));
        for w in inst.waiters.drain(..) {
            let _ = w.send(refused(inst.reason.clone()));
        }
    }

    /// Removes a cgroup on the blocking pool (it may wait up to `CGROUP_TIMEOUT` for its
    /// processes to go); `Event::CgroupGone` says when it is over.
    fn destroy_later(&mut self, dir: PathBuf) {
        if !self.destroying.insert(dir.clone()) {
            return; // already under way
        }
        let cgroups = Arc::clone(&self.cfg.cgroups);
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let result = cgroups
                .destroy(&dir, CGROUP_TIMEOUT)
                .map_err(|e| e.to_string());
            let _ = events.send(Event::CgroupGone { dir, result });
        });
    }

    /// A cgroup is gone (or could not be removed): a start that waited for it goes ahead (or
    /// fails with the reason).
    fn on_cgroup_gone(&mut self, dir: PathBuf, result: Result<(), String>) {
        self.destroying.remove(&dir);
        let exiting = self.exiting.remove(&dir);
        if let Err(e) = &result {
            match &exiting {
                Some(x) => tracing::error!(instance = %x.name, "cannot remove cgroup: {e}"),
                None => tracing::error!(cgroup = %dir.display(), "cannot remove cgroup: {e}"),
            }
        }
        if let Some(x) = exiting {
            self.on_exit(&x.name, x.pid, x.exit, x.stats);
        }
        let waiting: Vec<String> = self
            .deferred_starts
            .iter()
            .filter(|n| self.cfg.parent.join(n.as_str()) == dir)
            .cloned()
            .collect();
        for name in waiting {
            self.deferred_starts.remove(&name);
            let Some(mut inst) = self.instances.remove(&name) else {
                continue;
            };
            if !self.stopping && inst.state == State::Starting && inst.worker.is_none() {
                match &result {
                    Ok(()) => self.start(&mut inst),
                    Err(e) => self.cannot_start(&name, &mut inst, e),
                }
            }
            self.instances.insert(name, inst);
        }
    }

    /// A task that turns the cgroup's OOM notifications into events, so an OOM kill is known
    /// (and logged) the moment the kernel acts, before the worker is even reaped.
    fn watch_oom(
        &self,
        name: &str,
        generation: u64,
        dir: &std::path::Path,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let watch = match self
            .cfg
            .cgroups
            .oom_watch(dir)
            .map_err(|e| e.to_string())
            .and_then(|w| {
                // SAFETY: the OomWatch owns its descriptor (eventfd or inotify), keeps it open for
                // its whole life and always returns the same one from as_raw_fd.
                unsafe { tokio::io::unix::AsyncFd::register(w) }.map_err(|e| e.to_string())
            }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(instance = %name, "no OOM notifications for this run ({e}); OOM kills are still classified at exit");
                return None;
            }
        };
        let events = self.events.clone();
        let name = name.to_owned();
        Some(tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let Ok(mut ready) = watch.readable().await else {
                    return;
                };
                watch.get_ref().drain();
                ready.clear_ready();
                // The notification can come as the OOM starts, before the kill is counted: give
                // the kernel a few milliseconds (yielding, so the loop keeps running).
                let noticed = std::time::Instant::now();
                while watch.get_ref().kills() <= seen && noticed.elapsed() < OOM_SETTLE {
                    tokio::task::yield_now().await;
                }
                seen = watch.get_ref().kills();
                if events
                    .send(Event::Oom {
                        name: name.clone(),
                        generation,
                    })
                    .is_err()
                {
                    return;
                }
            }
        }))
    }

    /// Reader and writer tasks for one worker link.
    fn attach_link(
        &self,
        name: &str,
        generation: u64,
        link: std::os::unix::net::UnixStream,
        mut outbox: mpsc::UnboundedReceiver<SupervisorMsg>,
    ) -> std::io::Result<()> {
        link.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(link)?;
        let (mut rd, mut wr) = stream.into_split();
        let events = self.events.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let msg = match read_frame(&mut rd, MAX_FRAME).await {
                    Ok(Some(payload)) => match decode::<WorkerMsg>(&payload) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(instance = %name, "bad frame from the worker: {e}");
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(instance = %name, "worker link error: {e}");
                        break;
                    }
                };
                let event = Event::Worker {
                    name: name.clone(),
                    generation,
                    msg,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
            let _ = events.send(Event::LinkClosed { name, generation });
        });
        tokio::spawn(async move {
            while let Some(msg) = outbox.recv().await {
                if write_frame(&mut wr, &msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Worker {
                name,
                generation,
                msg,
            } => self.on_worker(&name, generation, msg),
            Event::LinkClosed { name, generation } => {
                if let Some(w) = self.instances.get(&name).and_then(|i| i.worker.as_ref()) {
                    if w.generation == generation {
                        tracing::debug!(instance = %name, "worker link closed");
                    }
                }
            }
            Event::Control(cmd, reply) => self.on_control(cmd, reply),
            Event::Oom { name, generation } => self.on_oom_event(&name, generation),
            Event::PressureWake => {
                if self.cfg.config.pressure.enabled && !self.stopping {
                    self.pressure_tick();
                }
            }
            Event::CgroupGone { dir, result } => self.on_cgroup_gone(dir, result),
            Event::Planned { name, plan } => self.finish_add(&name, *plan),
        }
    }

    fn on_worker(&mut self, name: &str, generation: u64, msg: WorkerMsg) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let Some(worker) = inst.worker.as_mut().filter(|w| w.generation == generation) else {
            return; // a message from a previous run of this instance
        };
        if !worker.greeted {
            match msg {
                WorkerMsg::Hello(h) if h.instance == name && h.pid == worker.pid => {
                    worker.greeted = true;
                    let _ = worker.tx.send(SupervisorMsg::Welcome(Welcome {
                        protocol_version: PROTOCOL_VERSION,
                    }));
                    if h.protocol_version != PROTOCOL_VERSION {
                        tracing::warn!(instance = %name, "worker speaks protocol {}, supervisor {PROTOCOL_VERSION}", h.protocol_version);
                    }
                }
                other => {
                    tracing::error!(instance = %name, "worker did not introduce itself correctly ({other:?}); killing it");
                    let _ = self.cfg.cgroups.kill_all(&worker.cgroup);
                }
            }
            return;
        }
        match msg {
            WorkerMsg::Loading(l) => {
                if l.fraction > inst.load_progress || inst.state == State::Starting {
                    inst.last_progress = Instant::now();
                }
                inst.load_progress = l.fraction;
                if inst.state == State::Starting {
                    Entry::of(Lifecycle::Loading, name, inst)
                        .log(format_args!("loading the model"));
                }
                if inst.state == State::Starting || inst.state == State::Loading {
                    inst.set(
                        State::Loading,
                        format!("loading the model ({:.0}%)", l.fraction * 100.0),
                    );
                }
            }
            WorkerMsg::Ready(r) => {
                inst.load_progress = 1.0;
                inst.ready_since = Some(Instant::now());
                inst.last_heartbeat = Some(Instant::now());
                for w in inst.waiters.drain(..) {
                    let _ = w.send(Response::Ok(OkReply {
                        message: format!("{name} is ready"),
                    }));
                }
                Entry::of(Lifecycle::Ready, name, inst).log(format_args!(
                    "ready (loaded in {} ms; session of {} turns)",
                    r.load_ms, r.session.turns
                ));

                if inst.state != State::Stopping {
                    inst.set(
                        State::Ready,
                        format!(
                            "serving (loaded in {} ms; session of {} turns restored from {})",
                            r.load_ms,
                            r.session.turns,
                            r.session.restored_from.as_str()
                        ),
                    );
                }
            }
            WorkerMsg::Refused(r) => inst.worker_said = Some(r.reason),
            WorkerMsg::Failed(f) => {
                inst.gpu_alloc_failed |= f.gpu_alloc;
                inst.worker_said = Some(f.reason);
            }
            WorkerMsg::Token(t) => {
                if let Some((_, client)) = self.asks.get(&t.id) {
                    let _ = client.send(Response::Token(TokenText { text: t.text }));
                }
            }
            WorkerMsg::Done(d) => {
                if let Some((_, client)) = self.asks.remove(&d.id) {
                    let _ = client.send(Response::Done(AskDone {
                        tokens: d.tokens,
                        ms: d.ms,
                    }));
                }
            }
            WorkerMsg::Error(e) => match e.id.and_then(|id| self.asks.remove(&id)) {
                Some((_, client)) => {
                    let _ = client.send(refused(e.message));
                }
                None => tracing::warn!(instance = %name, "worker reported: {}", e.message),
            },
            WorkerMsg::Heartbeat(_) => inst.last_heartbeat = Some(Instant::now()),
            WorkerMsg::Hello(_) => tracing::warn!(instance = %name, "second hello ignored"),
        }
    }

    /// A child exited (reported by the spawner). A worker's run ends in two steps: now its
    /// cgroup's counters are read and the cgroup is destroyed on the blocking pool (anything the
    /// worker left behind dies there); once it is gone (`Event::CgroupGone`), the exit is
    /// classified (`on_exit`). Orphans re-parented to us (a worker's double-forked children)
    /// were simply reaped.
    /// An empty cgroup is removed at once (a read and an rmdir), and the exit classified then.
    fn on_child_exit(&mut self, pid: u32, exit: Exit) {
        let found = self.instances.iter_mut().find_map(|(n, i)| {
            i.worker
                .as_mut()
                .filter(|w| w.pid == pid && !w.exited)
                .map(|w| (n.clone(), w))
        });
        let Some((name, worker)) = found else {
            tracing::debug!(pid, "reaped an orphaned descendant");
            return;
        };
        worker.exited = true;
        // A fresh cgroup per start means every oom_kill counted here belongs to this run.
        let stats = self.cfg.cgroups.memory(&worker.cgroup).ok();
        let dir = worker.cgroup.clone();
        // The common case: the worker was alone in its cgroup, which goes at once.
        if !self.destroying.contains(&dir)
            && self.cfg.cgroups.remove_if_empty(&dir).unwrap_or(false)
        {
            self.on_exit(&name, pid, exit, stats);
            return;
        }
        self.exiting.insert(
            dir.clone(),
            Exiting {
                name,
                pid,
                exit,
                stats,
            },
        );
        self.destroy_later(dir);
    }

    /// Every instance cgroup (and the parent, when ours) goes, on the blocking pool.
    async fn final_cleanup(&mut self) {
        for (name, (_, reply)) in std::mem::take(&mut self.adding) {
            let _ = reply.send(refused(format!(
                "the supervisor is shutting down; {name} was not added"
            )));
        }
        let cgroups = Arc::clone(&self.cfg.cgroups);
        let parent = self.cfg.parent.clone();
        let remove_parent = self.cfg.remove_parent;
        let cleanup = tokio::task::spawn_blocking(move || {
            let dirs = cgroups.subdirs(&parent).unwrap_or_default();
            for dir in dirs.iter().filter(|d| !d.ends_with(SUPERVISOR_LEAF)) {
                if let Err(e) = cgroups.destroy(dir, CGROUP_TIMEOUT) {
                    tracing::error!("cannot remove {}: {e}", dir.display());
                }
            }
            if remove_parent {
                if let Err(e) = cgroups.destroy(&parent, CGROUP_TIMEOUT) {
                    tracing::error!("cannot remove {}: {e}", parent.display());
                }
            }
        });
        if let Err(e) = cleanup.await {
            tracing::error!("the cgroup clean-up did not finish: {e}");
        }
        // Whatever died in the clean-up is ours to reap.
        self.cfg.spawner.reap_remaining();
        Entry::new(Lifecycle::Stopped).log(format_args!("stopped"));
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
            .map(|(name, i)| {
                let stats = i
                    .worker
                    .as_ref()
                    .and_then(|w| self.cfg.cgroups.memory(&w.cgroup).ok());
                InstanceStatus {
                    name: name.clone(),
                    state: i.state.as_str().to_owned(),
                    thrashing: i.thrashing,
                    reason: i.reason.clone(),
                    pid: i.worker.as_ref().map(|w| w.pid),
                    restarts: i.restarts,
                    oom_kills: i.oom_kills,
                    last_exit: i.last_exit.clone(),
                    load_progress: i.load_progress,
                    allocated: self.ledger.get(name).unwrap_or(0),
                    estimate_source: i.estimate_source.as_str().to_owned(),
                    memory: MemoryStatus {
                        current: stats.map(|s| s.current),
                        limit: stats.and_then(|s| s.limit),
                        reservation: stats.map(|s| s.reservation),
                        peak: stats.and_then(|s| s.peak),
                        last_peak: i.last_peak,
                    },
                    uptime_s: i.worker.as_ref().map(|w| w.started.elapsed().as_secs()),
                    gpu_memory: i.worker.as_ref().and(i.gpu_memory),
                    cpu_fallback: i.spec.gpu_layers > 0
                        && i.gpu.fallback != belljar_budget::gpu::Fallback::None,
                    gpu_release: i.gpu_release.as_str().map(str::to_owned),
                }
            })
            .collect();
        StatusReport {
            host: HostStatus {
                total: host.total,
                available: host.available,
                level: self.level.as_str().to_owned(),
                psi_some_avg10: belljar_host::pressure::psi_some_avg10(&self.cfg.proc_root),
                source: source.as_str().to_owned(),
            },
            budget: BudgetStatus {
                usable: self.ledger.capacity(),
                allocated: self.ledger.allocated(),
            },
            instances,
            metrics_addr: self.cfg.metrics.as_ref().map(|(_, a)| a.to_string()),
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
