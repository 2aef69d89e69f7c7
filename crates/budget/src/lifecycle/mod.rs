//! The lifecycle of one instance as a sans-IO state machine, in the style of quinn-proto's
//! `Connection`: inputs and `now` go in through [`Machine::step`], actions come out, and
//! [`Machine::next_deadline`] says when to call back with [`Input::Timer`]. It does no I/O and
//! reads no clock. The daemon interprets the actions (ledger, spawn, signals, logs, replies) and
//! turns what happens into inputs.
//!
//! The machine keeps the invariant "an instance holds a ledger allocation if and only if its state
//! says so": it emits [`Action::Reserve`] and [`Action::Release`] itself, at the transitions, and
//! decides reservations against a read-only view of the ledger in [`Ctx`] (the interpreter applies
//! each step's actions before the next step). Everything that belongs to one run of the worker
//! (pid, greeting, progress, heartbeat, stop deadline, what the worker said) lives in a [`Run`]
//! that is dropped when the worker exits, so nothing is reset by hand.
//!
//! The transition table is in docs/operations.md ("The lifecycle, transition by transition"); the
//! tests in `tests.rs` follow it row by row.

#![deny(clippy::too_many_lines)]

mod event;
#[cfg(test)]
mod prop;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use belljar_protocol::exit::{ExitKind, kind};

pub use event::Event;

use crate::gpu::{Fallback, GpuState};
use crate::ledger::Ledger;
use crate::precheck::precheck;
use crate::restart::{
    Decision, ExitClass, RestartConfig, RestartState, decide, grown_limit, peak_reached_limit,
};
use crate::{HostMemory, Size};

/// The reason an on-demand instance shows while unloaded.
pub const UNLOADED: &str = "on demand: its next request loads it";

/// How often a restart waiting for a GPU release looks again.
pub const GPU_RELEASE_POLL: Duration = Duration::from_millis(250);
/// How often an instance waiting for memory checks again (also whenever memory is released).
pub const MEMORY_RECHECK: Duration = Duration::from_secs(1);

/// The states of `status`, spelled as in `status --json`, logs and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Loading,
    Ready,
    Backoff,
    WaitingForMemory,
    Failed,
    Stopping,
    Stopped,
    /// Stopped by the pressure guard; comes back when memory does.
    Shed,
    /// An on-demand instance with no worker: its next request (or `supervisor load`) loads it.
    Unloaded,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Loading => "loading",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::WaitingForMemory => "waiting-for-memory",
            State::Failed => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Shed => "shed",
            State::Unloaded => "unloaded",
        }
    }

    /// Budget by state: these states hold their ledger allocation; `failed`, `stopped`,
    /// `shed` and `unloaded` do not (docs/operations.md).
    pub fn holds_allocation(self) -> bool {
        !matches!(
            self,
            State::Failed | State::Stopped | State::Shed | State::Unloaded
        )
    }
}

/// How a worker process ended, from its wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// The signals that stop a worker cleanly when someone other than the supervisor sends them,
/// as systemd counts them: SIGHUP, SIGINT, SIGPIPE, SIGTERM (Linux numbers).
const STOP_SIGNALS: [(i32, &str); 4] = [
    (1, "SIGHUP"),
    (2, "SIGINT"),
    (13, "SIGPIPE"),
    (15, "SIGTERM"),
];

/// `t + d`, or the latest instant there is when that overflows (a duration far beyond the
/// config's bounds): time arithmetic never panics.
pub fn later(t: Instant, d: Duration) -> Instant {
    let mut d = d;
    loop {
        if let Some(at) = t.checked_add(d) {
            return at;
        }
        d /= 2;
    }
}

/// The kernel's counters of one run's cgroup, read before the cgroup goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// The limit in force (`None`: unlimited or unknown).
    pub limit: Option<u64>,
    /// The run's highest usage (`None` where the kernel has no such file).
    pub peak: Option<u64>,
    /// The kernel's `oom_kill` counter.
    pub oom_kill: u64,
}

/// The memory settings of one run's cgroup, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Hard limit (v2 `memory.max`, v1 `memory.limit_in_bytes`).
    pub max: u64,
    /// Throttle threshold (v2 `memory.high`; v1 has none).
    pub high: u64,
    /// Protected reservation (v2 `memory.low`, v1 `memory.soft_limit_in_bytes`).
    pub low: u64,
    /// Swap allowed (v2 `memory.swap.max`; v1 `memory.memsw.limit_in_bytes = max + swap`).
    pub swap_max: u64,
}

/// What happens once a stopping worker has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// `supervisor remove`: forget the instance.
    Remove,
    /// `supervisor restart`: start it again with a clean history.
    Restart,
    /// The pressure guard: keep it, `shed`, until memory comes back.
    Shed,
    /// The GPU guard: start it again with other GPU layers (fallback or restore).
    Relaunch,
    /// Give its memory back ([swap]): an on-demand instance becomes `unloaded` (its next request
    /// loads it), an `always` one `stopped` until `supervisor load`.
    Unload(Unload),
}

/// Why an instance is unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unload {
    /// `supervisor unload` (or the HTTP API's).
    Requested,
    /// Evicted to make room for another instance (named in [`Input::Evict`]).
    Evicted,
    /// `idle_unload` passed with nothing to do.
    Idle,
}

/// The instance's keys the lifecycle uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub restart: RestartConfig,
    pub stop_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub load_stall_timeout: Duration,
    /// The configured `gpu_layers` (the CPU fallback may run with 0).
    pub gpu_layers: u32,
    pub swap_max: u64,
    /// `load = "on-demand"`: no worker until a request wants one; `unloaded` rather than
    /// `stopped` or `shed` when its worker goes.
    pub on_demand: bool,
}

/// The instance's admitted memory: the ledger reservation, the estimate and what `memory.low`
/// protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub required: u64,
    pub estimate: u64,
    pub protected: u64,
}

/// What a step may look at besides the machine itself: read-only.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The ledger as it is before this step's actions.
    pub ledger: &'a Ledger,
    /// The supervisor is shutting down: nothing restarts.
    pub stopping: bool,
    /// The most one instance may hold (`per_instance_max` of the budget).
    pub cap: u64,
    /// The pre-load check's headroom.
    pub headroom: u64,
    /// Drawn uniformly from [0, 1) for the backoff's jitter.
    pub jitter: f64,
}

/// What happened, as the machine hears it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Start now if layer 2 admits it (mode start, add, restore).
    Admit,
    /// The worker process of the current run exists.
    Spawned {
        pid: u32,
    },
    /// The current run could not be started.
    SpawnFailed(String),
    /// The worker's first message: `valid` when it was a Hello with this instance's name and pid.
    Hello {
        valid: bool,
    },
    Loading(f32),
    Ready {
        load_ms: u64,
        turns: u64,
        restored_from: String,
    },
    /// The worker's reason before it exits (`Failed` or `Refused`), and whether it was a GPU
    /// allocation failure.
    Said {
        reason: String,
        gpu_alloc: bool,
    },
    Heartbeat,
    /// The run's cgroup reported an OOM event; these are its counters now.
    Oom(RunStats),
    /// The worker was reaped; `stats` are its cgroup's counters (None: unreadable).
    Exited {
        exit: Exit,
        stats: Option<RunStats>,
    },
    /// A deadline from [`Machine::next_deadline`] may have passed.
    Timer,
    /// The answer to [`Action::CheckRestart`]: the memory reading, whether pressure is critical
    /// and whether the last run's VRAM is confirmed released.
    RestartCheck {
        memory: Result<HostMemory, String>,
        critical: bool,
        gpu_released: bool,
    },
    /// Memory was released elsewhere: an instance waiting for it looks again.
    MemoryFreed,
    /// Stop the worker (if one runs), then do this.
    Stop(AfterStop),
    /// The supervisor is shutting down.
    Shutdown,
    /// The pressure guard brings a shed instance back if the pre-load check passes.
    Restore {
        memory: HostMemory,
    },
    /// The GPU guard moves the instance to the CPU; `memory` is the host reading, if any.
    GpuFallback {
        message: String,
        memory: Option<HostMemory>,
    },
    /// The GPU guard moves the instance back onto its GPU.
    GpuRestore {
        message: String,
    },
    /// Load an `unloaded` instance now: the daemon made room for its reservation (layer 2 is
    /// checked again here).
    Load,
    /// Unload it to make room for `by`.
    Evict {
        by: String,
    },
}

/// One lifecycle log entry, with the instance's counters as they were when it was decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub event: Event,
    pub message: String,
    /// Include the current run's pid and cgroup.
    pub with_run: bool,
    pub exit_reason: Option<String>,
    /// A scheduled restart's attempt and delay.
    pub restart: Option<(u32, Duration)>,
    pub restarts: u64,
    pub oom_kills: u64,
    pub memory_limit: Option<u64>,
    pub memory_peak: Option<u64>,
}

/// Who hears an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The clients waiting for the instance to be ready (add, restart): ok or refused.
    Waiters(Result<String, String>),
    /// The client that asked for the stop (remove, restart).
    Stopper(Result<String, String>),
    /// The stopper now waits for the instance to be ready (restart).
    StopperWaits,
}

/// What the interpreter does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Allocate this many bytes in the ledger (the instance holds nothing before).
    Reserve(u64),
    /// Change the allocation it holds to this many bytes (OOM-aware growth).
    Resize(u64),
    /// Give the allocation back.
    Release,
    /// Start a worker in a fresh cgroup with these limits and GPU layers; answer with
    /// [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        limits: Limits,
        gpu_layers: u32,
    },
    /// Greet the worker (Welcome).
    Welcome,
    /// Ask the worker to stop (Shutdown).
    Shutdown,
    /// Kill everything in the run's cgroup.
    Kill,
    Log(Box<Log>),
    /// A diagnostic line that is not a lifecycle event.
    Warn(String),
    Reply(Reply),
    /// Refuse every in-flight request of this instance.
    FailAsks(String),
    /// Record the run's peak for the learned corrections.
    RecordPeak(u64),
    /// Read memory (and the GPU release) and answer with [`Input::RestartCheck`].
    CheckRestart,
    /// The instance is gone (removed): drop it.
    Forget,
    /// An on-demand instance wants to be loaded (`supervisor restart` of one): the daemon makes
    /// room and answers with [`Input::Load`].
    WantLoad,
}

/// One run of the worker: created with the spawn, dropped at its exit.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// None until the process exists.
    pub pid: Option<u32>,
    pub started: Instant,
    /// Whether the worker has introduced itself (Hello checked, Welcome sent).
    pub greeted: bool,
    pub load_progress: f32,
    /// When load progress last moved (or the worker was spawned).
    pub last_progress: Instant,
    pub ready_since: Option<Instant>,
    pub last_heartbeat: Option<Instant>,
    /// The watchdog killed this run.
    pub watchdog_fired: bool,
    /// When a stopping worker's cgroup is killed.
    pub stop_deadline: Option<Instant>,
    /// The reason the worker gave before it exited.
    pub said: Option<String>,
    pub gpu_alloc_failed: bool,
    /// The cgroup's `oom_kill` counter as last logged.
    pub oom_seen: u64,
    /// Loaded on demand: its ready is logged as `loaded-on-demand` too.
    pub on_demand: bool,
}

impl Run {
    fn new(now: Instant) -> Run {
        Run {
            pid: None,
            started: now,
            greeted: false,
            load_progress: 0.0,
            last_progress: now,
            ready_since: None,
            last_heartbeat: None,
            watchdog_fired: false,
            stop_deadline: None,
            said: None,
            gpu_alloc_failed: false,
            oom_seen: 0,
            on_demand: false,
        }
    }
}

/// One instance's lifecycle.
#[derive(Debug, Clone)]
pub struct Machine {
    name: String,
    pub settings: Settings,
    pub reservation: Reservation,
    pub state: State,
    pub reason: String,
    pub run: Option<Run>,
    pub restarts: u64,
    pub oom_kills: u64,
    pub last_exit: Option<String>,
    /// The last exit's class for the restart policy (a permanent one is bad input).
    pub last_class: Option<ExitClass>,
    pub last_peak: Option<u64>,
    /// Progress of the last run that loaded (kept after it exits, as status always showed).
    pub load_progress: f32,
    /// CPU fallback and GPU allocation failures, kept across runs.
    pub gpu: GpuState,
    /// Loads on demand, and evictions to make room for another instance.
    pub loads: u64,
    pub evictions: u64,
    /// Who the current eviction makes room for.
    evicted_by: Option<String>,
    restart_state: RestartState,
    /// When a `backoff` or `waiting-for-memory` instance looks at memory again.
    restart_at: Option<Instant>,
    after_stop: Option<AfterStop>,
    /// What the ledger holds for it, as the machine's own actions left it.
    held: Option<u64>,
    epoch: Instant,
    out: Vec<Action>,
}

impl Machine {
    /// A new instance, not started and holding nothing: send [`Input::Admit`] to start it.
    /// `epoch` is the origin of the restart policy's clock (any instant before the first step).
    /// An on-demand one starts `unloaded`.
    pub fn new(name: &str, settings: Settings, reservation: Reservation, epoch: Instant) -> Self {
        let (state, reason) = if settings.on_demand {
            (State::Unloaded, UNLOADED)
        } else {
            (State::Stopped, "waiting to start")
        };
        Machine {
            name: name.to_owned(),
            settings,
            reservation,
            state,
            reason: reason.into(),
            run: None,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
            last_class: None,
            last_peak: None,
            load_progress: 0.0,
            gpu: GpuState::default(),
            loads: 0,
            evictions: 0,
            evicted_by: None,
            restart_state: RestartState::default(),
            restart_at: None,
            after_stop: None,
            held: None,
            epoch,
            out: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the ledger holds for this instance by the machine's own account.
    pub fn held(&self) -> Option<u64> {
        self.held
    }

    /// The cgroup settings of the next run: max = the reservation; high = 95% of it (throttle
    /// and early warning before a kill) but never below the estimate, since throttling below
    /// what the model is known to need only makes it re-read its weights; low = the estimate
    /// less its reclaimable page cache; swap as configured.
    pub fn limits(&self) -> Limits {
        let r = &self.reservation;
        Limits {
            max: r.required,
            high: (r.required / 100 * 95).max(r.estimate).min(r.required),
            low: r.protected.min(r.required),
            swap_max: self.settings.swap_max,
        }
    }

    /// When the watchdog fires for the current run, if it is watched now: 3 missed heartbeats
    /// while ready, or no load progress for `load_stall_timeout` while starting or loading.
    pub fn watchdog_deadline(&self) -> Option<Instant> {
        let run = self
            .run
            .as_ref()
            .filter(|r| !r.watchdog_fired && r.pid.is_some())?;
        match self.state {
            State::Ready => run
                .last_heartbeat
                .map(|t| later(t, self.settings.heartbeat_interval.saturating_mul(3))),
            State::Starting | State::Loading => {
                Some(later(run.last_progress, self.settings.load_stall_timeout))
            }
            _ => None,
        }
    }

    /// The earliest time at which [`Input::Timer`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let stop = self.run.as_ref().and_then(|r| r.stop_deadline);
        [stop, self.watchdog_deadline(), self.restart_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Feeds one input; returns the actions to carry out, in order.
    pub fn step(&mut self, input: Input, now: Instant, ctx: &Ctx<'_>) -> Vec<Action> {
        match input {
            Input::Admit => self.admit(now, ctx),
            Input::Spawned { pid } => self.spawned(pid),
            Input::SpawnFailed(e) => self.spawn_failed(&e, now, ctx),
            Input::Hello { valid } => self.hello(valid),
            Input::Loading(f) => self.loading(f, now),
            Input::Ready {
                load_ms,
                turns,
                restored_from,
            } => self.ready(load_ms, turns, &restored_from, now),
            Input::Said { reason, gpu_alloc } => {
                if let Some(run) = &mut self.run {
                    run.said = Some(reason);
                    run.gpu_alloc_failed |= gpu_alloc;
                }
            }
            Input::Heartbeat => {
                if let Some(run) = &mut self.run {
                    run.last_heartbeat = Some(now);
                }
            }
            Input::Oom(stats) => self.oom_noticed(stats),
            Input::Exited { exit, stats } => self.exited(exit, stats, now, ctx),
            Input::Timer => self.timer(now, ctx),
            Input::RestartCheck {
                memory,
                critical,
                gpu_released,
            } => self.restart_check(memory, critical, gpu_released, now, ctx),
            Input::MemoryFreed => {
                if self.state == State::WaitingForMemory && self.run.is_none() && !ctx.stopping {
                    self.restart_at = None;
                    self.out.push(Action::CheckRestart);
                }
            }
            Input::Stop(after) => self.stop(after, now, ctx),
            Input::Shutdown => self.shutdown(now),
            Input::Restore { memory } => self.restore(memory, now, ctx),
            Input::GpuFallback { message, memory } => self.gpu_fallback(message, memory, now, ctx),
            Input::GpuRestore { message } => {
                self.gpu.fallback = Fallback::None;
                self.log(Event::GpuRestored, message);
                self.stop(AfterStop::Relaunch, now, ctx);
            }
            Input::Load => self.load(now, ctx),
            Input::Evict { by } => {
                if self.settings.on_demand && self.state.holds_allocation() {
                    self.evicted_by = Some(by);
                    self.stop(AfterStop::Unload(Unload::Evicted), now, ctx);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    // ---- starting ----

    /// Layer 2, then a start; a denial leaves it `failed` with the reason.
    fn admit(&mut self, now: Instant, ctx: &Ctx<'_>) {
        if self.run.is_some() {
            return;
        }
        let required = self.reservation.required;
        match ctx.ledger.check(&self.name, required) {
            Ok(()) => {
                self.reserve(required);
                self.restart_state.record_start(now - self.epoch);
                self.spawn(now);
            }
            Err(denied) => {
                self.release();
                self.set(State::Failed, denied.to_string());
                self.log(Event::NotAdmitted, format!("not admitted: {denied}"));
                self.out
                    .push(Action::Reply(Reply::Waiters(Err(denied.to_string()))));
            }
        }
    }

    fn spawn(&mut self, now: Instant) {
        self.run = Some(Run::new(now));
        self.load_progress = 0.0;
        self.restart_at = None;
        self.set(State::Starting, "worker started, waiting for its hello");
        self.out.push(Action::Spawn {
            limits: self.limits(),
            gpu_layers: self.gpu.layers(self.settings.gpu_layers),
        });
    }

    fn spawned(&mut self, pid: u32) {
        if let Some(run) = self.run.as_mut().filter(|r| r.pid.is_none()) {
            run.pid = Some(pid);
            self.log(Event::Spawned, "spawned".into());
        }
    }

    /// The run could not be started (EMFILE, EAGAIN, a missing binary...): a failure like a
    /// crash. The restart policy retries it with backoff, counted by the crash-loop breaker, so
    /// a spawn that can never work still ends `failed` after `start_limit_burst` starts.
    fn spawn_failed(&mut self, e: &str, now: Instant, ctx: &Ctx<'_>) {
        if self.run.as_ref().is_none_or(|r| r.pid.is_some()) {
            return;
        }
        self.run = None;
        let ended = Ended {
            class: ExitClass::Failure,
            last_exit: "spawn-failed".to_owned(),
            what: format!("could not be started: {e}"),
        };
        self.last_exit = Some(ended.last_exit.clone());
        self.out.push(Action::Warn(format!("cannot start: {e}")));
        self.out.push(Action::Reply(Reply::Waiters(Err(format!(
            "{} did not become ready: {}",
            self.name, ended.what
        )))));
        let decision = if ctx.stopping {
            Decision::Stay
        } else {
            let t = now - self.epoch;
            decide(
                &self.settings.restart,
                &mut self.restart_state,
                ended.class,
                None,
                t,
                ctx.jitter,
            )
        };
        self.apply(decision, &ended, "", now);
        if !self.state.holds_allocation() {
            self.release();
        }
    }

    // ---- the worker's messages ----

    fn hello(&mut self, valid: bool) {
        let Some(run) = self.run.as_mut().filter(|r| !r.greeted) else {
            self.out.push(Action::Warn("second hello ignored".into()));
            return;
        };
        if valid {
            run.greeted = true;
            self.out.push(Action::Welcome);
        } else {
            self.out.push(Action::Warn(
                "worker did not introduce itself correctly; killing it".into(),
            ));
            self.out.push(Action::Kill);
        }
    }

    fn loading(&mut self, fraction: f32, now: Instant) {
        if !(0.0..=1.0).contains(&fraction) {
            self.out.push(Action::Warn(format!(
                "ignored a load fraction of {fraction}: it must be from 0 to 1"
            )));
            return;
        }
        let starting = self.state == State::Starting;
        let Some(run) = self.run.as_mut().filter(|r| r.greeted) else {
            return;
        };
        if fraction > run.load_progress || starting {
            run.last_progress = now;
        }
        run.load_progress = fraction;
        self.load_progress = fraction;
        if starting {
            self.log(Event::Loading, "loading the model".into());
        }
        if starting || self.state == State::Loading {
            self.set(
                State::Loading,
                format!("loading the model ({:.0}%)", fraction * 100.0),
            );
        }
    }

    fn ready(&mut self, load_ms: u64, turns: u64, restored_from: &str, now: Instant) {
        let Some(run) = self.run.as_mut().filter(|r| r.greeted) else {
            return;
        };
        run.load_progress = 1.0;
        run.ready_since = Some(now);
        run.last_heartbeat = Some(now);
        let on_demand = run.on_demand;
        self.load_progress = 1.0;
        self.out.push(Action::Reply(Reply::Waiters(Ok(format!(
            "{} is ready",
            self.name
        )))));
        self.log(
            Event::Ready,
            format!("ready (loaded in {load_ms} ms; session of {turns} turns)"),
        );
        if on_demand {
            self.log(
                Event::LoadedOnDemand,
                format!("loaded on demand in {load_ms} ms"),
            );
        }
        if self.state != State::Stopping {
            self.set(
                State::Ready,
                format!(
                    "serving (loaded in {load_ms} ms; session of {turns} turns restored from {restored_from})"
                ),
            );
        }
    }

    /// The OOM watch saw the counter move: one journal entry per kill, now, before the exit.
    fn oom_noticed(&mut self, stats: RunStats) {
        let Some(seen) = self.run.as_ref().map(|r| r.oom_seen) else {
            return;
        };
        if stats.oom_kill > seen {
            self.log_oom(&stats, seen);
            if let Some(run) = &mut self.run {
                run.oom_seen = stats.oom_kill;
            }
        }
    }

    fn log_oom(&mut self, stats: &RunStats, seen: u64) {
        let mut log = self.entry(
            Event::OomKill,
            "the kernel OOM-killed in this instance's cgroup".into(),
        );
        log.exit_reason = Some("oom-kill".into());
        log.oom_kills = self.oom_kills + stats.oom_kill.saturating_sub(seen);
        log.memory_limit = stats.limit.or(log.memory_limit);
        log.memory_peak = stats.peak.or(log.memory_peak);
        self.out.push(Action::Log(Box::new(log)));
    }

    // ---- the exit ----

    /// Classifies the run's end exactly once and applies the restart policy.
    fn exited(&mut self, exit: Exit, stats: Option<RunStats>, now: Instant, ctx: &Ctx<'_>) {
        let Some(run) = self.run.take() else {
            return;
        };
        let stats = stats.unwrap_or_default();
        let limit = stats.limit.unwrap_or(self.reservation.required);
        self.last_peak = stats.peak;
        if let (Some(peak), Some(_)) = (stats.peak, run.ready_since) {
            self.out.push(Action::RecordPeak(peak));
        }
        let oom = stats.oom_kill > 0 && exit == Exit::Signal(9);
        if stats.oom_kill > run.oom_seen {
            self.log_oom(&stats, run.oom_seen);
        }
        let ended = self.classify(exit, &run, oom, limit);
        if oom {
            self.oom_kills += 1;
        }
        let gpu_failed = run.gpu_alloc_failed || exit == Exit::Code(i32::from(GPU_ALLOC));
        if gpu_failed && self.gpu.alloc_failed() {
            self.log(
                Event::GpuFallback,
                format!(
                    "{} GPU allocation failures: running on the CPU until `supervisor restart {}`",
                    self.gpu.failures, self.name
                ),
            );
        }
        self.last_exit = Some(ended.last_exit.clone());
        self.last_class = Some(ended.class);
        let mut log = self.entry(Event::Exited, ended.what.clone());
        log.with_run = true;
        log.exit_reason = Some(ended.last_exit.clone());
        self.out.push(Action::Log(Box::new(log)));
        self.out.push(Action::Reply(Reply::Waiters(Err(format!(
            "{} did not become ready: {}",
            self.name, ended.what
        )))));
        let ready_for = run.ready_since.map(|t| now.saturating_duration_since(t));
        let decision = if ctx.stopping {
            Decision::Stay
        } else {
            let cfg = self.settings.restart;
            let t = now - self.epoch;
            decide(
                &cfg,
                &mut self.restart_state,
                ended.class,
                ready_for,
                t,
                ctx.jitter,
            )
        };
        let note = match decision {
            Decision::Restart { .. } if oom => self.grow(stats.peak.unwrap_or(limit), limit, ctx),
            _ => String::new(),
        };
        self.apply(decision, &ended, &note, now);
        if !self.state.holds_allocation() {
            self.release();
        }
        self.out.push(Action::FailAsks(format!(
            "{} stopped before answering",
            self.name
        )));
        if let Some(after) = self.after_stop.take() {
            self.after_stop(after, now, ctx);
        }
    }

    /// The exit's class for the policy, its `last_exit` word and its words for people.
    fn classify(&self, exit: Exit, run: &Run, oom: bool, limit: u64) -> Ended {
        let said = run.said.clone();
        let (class, last_exit, what) = match exit {
            _ if self.state == State::Stopping => (
                ExitClass::Stopped,
                "stopped".to_owned(),
                "stopped by the supervisor".to_owned(),
            ),
            _ if run.watchdog_fired => (
                ExitClass::Failure,
                "watchdog".to_owned(),
                "killed by the watchdog".to_owned(),
            ),
            Exit::Signal(9) if oom => (
                ExitClass::Failure,
                "oom-kill".to_owned(),
                format!("OOM-killed at limit {}", Size(limit)),
            ),
            // The supervisor signals a worker only with SIGKILL through its cgroup, and only
            // while stopping it or for the watchdog (both above): any other signal came from
            // outside. As systemd does, SIGTERM, SIGINT, SIGHUP and SIGPIPE are a clean stop.
            Exit::Signal(s) if STOP_SIGNALS.iter().any(|(n, _)| *n == s) => {
                let name = STOP_SIGNALS
                    .iter()
                    .find(|(n, _)| *n == s)
                    .map_or("", |(_, w)| w);
                (
                    ExitClass::Clean,
                    format!("external-stop:{name}"),
                    format!("stopped by {name} from outside the supervisor"),
                )
            }
            Exit::Signal(s) => (
                ExitClass::Failure,
                format!("signal:{s}"),
                format!("killed by signal {s} from outside the supervisor"),
            ),
            Exit::Code(c) => match kind(c) {
                ExitKind::Clean => (
                    ExitClass::Clean,
                    "exit:0".to_owned(),
                    "exited cleanly".to_owned(),
                ),
                ExitKind::Temporary => (
                    ExitClass::PrecheckRefused,
                    "precheck-refused".to_owned(),
                    said.unwrap_or_else(|| "the pre-load memory check refused".into()),
                ),
                ExitKind::GpuAlloc => (
                    ExitClass::Failure,
                    "gpu-alloc".to_owned(),
                    said.unwrap_or_else(|| "GPU memory allocation failed".into()),
                ),
                ExitKind::Permanent => (
                    ExitClass::Permanent,
                    format!("exit:{c}"),
                    said.map_or_else(|| format!("exit {c}"), |s| format!("exit {c}: {s}")),
                ),
                ExitKind::Failure => (
                    ExitClass::Failure,
                    format!("exit:{c}"),
                    format!("exited with code {c}"),
                ),
            },
        };
        Ended {
            class,
            last_exit,
            what,
        }
    }

    /// OOM-aware growth: a run that died at its limit gets a larger one when the budget allows.
    /// Returns the note for the state's reason.
    fn grow(&mut self, peak: u64, limit: u64, ctx: &Ctx<'_>) -> String {
        if !peak_reached_limit(peak, limit) {
            return String::new();
        }
        let old = self.reservation.required;
        let Some(grown) = grown_limit(old, peak, ctx.cap) else {
            return format!("; OOM at limit {}; per-instance cap reached", Size(old));
        };
        if ctx.ledger.check(&self.name, grown).is_err() {
            return format!("; OOM at limit {}; budget full", Size(old));
        }
        self.reservation.required = grown;
        self.held = Some(grown);
        self.out.push(Action::Resize(grown));
        self.log(
            Event::LimitRaised,
            format!(
                "OOM at the limit: raising the limit from {} to {}",
                Size(old),
                Size(grown)
            ),
        );
        format!("; limit raised from {} to {}", Size(old), Size(grown))
    }

    /// The restart policy's decision, as a state.
    fn apply(&mut self, decision: Decision, ended: &Ended, note: &str, now: Instant) {
        let what = &ended.what;
        match decision {
            Decision::Stay if self.settings.on_demand => {
                self.set(State::Unloaded, format!("the worker {what}; {UNLOADED}"));
            }
            Decision::Stay => self.set(State::Stopped, format!("the worker {what}")),
            Decision::Fail(reason) => {
                self.set(State::Failed, format!("{what}: {reason}"));
                let mut log = self.entry(Event::Failed, format!("failed: {reason}"));
                log.exit_reason = Some(ended.last_exit.clone());
                self.out.push(Action::Log(Box::new(log)));
            }
            Decision::WaitForMemory => {
                self.set(
                    State::WaitingForMemory,
                    format!("waiting for memory: {what}"),
                );
                let mut log = self.entry(
                    Event::WaitingForMemory,
                    format!("waiting for memory before restarting: {what}"),
                );
                log.exit_reason = Some(ended.last_exit.clone());
                self.out.push(Action::Log(Box::new(log)));
                self.restart_at = Some(later(now, MEMORY_RECHECK));
            }
            Decision::Restart { delay, attempt } => {
                let mut log = self.entry(
                    Event::RestartScheduled,
                    format!(
                        "restart {attempt} in {} ms after {}",
                        delay.as_millis(),
                        ended.last_exit
                    ),
                );
                log.exit_reason = Some(ended.last_exit.clone());
                log.restart = Some((attempt, delay));
                self.out.push(Action::Log(Box::new(log)));
                self.restart_at = Some(later(now, delay));
                self.set(
                    State::Backoff,
                    format!(
                        "{what}; restarting in {:.1}s (attempt {attempt}){note}",
                        delay.as_secs_f64()
                    ),
                );
            }
        }
    }

    // ---- timers and restarts ----

    fn timer(&mut self, now: Instant, ctx: &Ctx<'_>) {
        if let Some(run) = self
            .run
            .as_mut()
            .filter(|r| r.stop_deadline.is_some_and(|d| d <= now))
        {
            run.stop_deadline = None;
            self.out.push(Action::Warn(format!(
                "did not stop within {:?}; killing its cgroup",
                self.settings.stop_timeout
            )));
            self.out.push(Action::Kill);
        }
        if self.watchdog_deadline().is_some_and(|d| d <= now) {
            let why = if self.state == State::Ready {
                "no heartbeat for 3 intervals"
            } else {
                "no load progress"
            };
            if let Some(run) = &mut self.run {
                run.watchdog_fired = true;
            }
            self.log(Event::Watchdog, format!("{why}: killing its cgroup"));
            // Through the cgroup, never a bare pid that may have been recycled.
            self.out.push(Action::Kill);
        }
        if self.restart_at.is_some_and(|d| d <= now) {
            self.restart_at = None;
            if !ctx.stopping && self.run.is_none() {
                self.out.push(Action::CheckRestart);
            }
        }
    }

    /// Starts an instance that waited (backoff over, or memory back) if layer 3 passes now;
    /// otherwise it waits for memory.
    fn restart_check(
        &mut self,
        memory: Result<HostMemory, String>,
        critical: bool,
        gpu_released: bool,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        if self.run.is_some()
            || ctx.stopping
            || !matches!(self.state, State::Backoff | State::WaitingForMemory)
        {
            return;
        }
        self.restart_at = None;
        // A GPU run's VRAM must be confirmed released before the next one counts on it.
        if !gpu_released {
            self.restart_at = Some(later(now, GPU_RELEASE_POLL));
            self.reason = "waiting for NVML to confirm the last run's VRAM is released".into();
            return;
        }
        match memory.map(|m| precheck(self.reservation.required, ctx.headroom, m)) {
            Ok(_) if critical => self.set(
                State::WaitingForMemory,
                "memory pressure is critical: nothing new starts until it eases",
            ),
            Ok(c) if c.ok => {
                self.restart_state.record_start(now - self.epoch);
                self.restarts += 1;
                self.spawn(now);
            }
            Ok(c) => {
                if self.state != State::WaitingForMemory {
                    self.log(Event::WaitingForMemory, c.summary());
                }
                self.set(State::WaitingForMemory, c.summary());
            }
            Err(e) => self.set(
                State::WaitingForMemory,
                format!("cannot read host memory: {e}"),
            ),
        }
        if self.state == State::WaitingForMemory {
            self.restart_at = Some(later(now, MEMORY_RECHECK));
        }
    }

    // ---- stopping ----

    /// Sends Shutdown to a running worker (its cgroup is killed after `stop_timeout`) and does
    /// `after` once it has exited; at once when none runs.
    fn stop(&mut self, after: AfterStop, now: Instant, ctx: &Ctx<'_>) {
        if self.request_shutdown(now) {
            self.after_stop = Some(after);
        } else {
            self.after_stop(after, now, ctx);
        }
    }

    /// Shutdown to the running worker; false when none runs. A spawn still pending (waiting
    /// for the last run's cgroup to go) is dropped: there is nothing to stop.
    fn request_shutdown(&mut self, now: Instant) -> bool {
        if self.run.as_ref().is_some_and(|r| r.pid.is_none()) {
            self.run = None;
        }
        let Some(run) = &mut self.run else {
            return false;
        };
        self.out.push(Action::Shutdown);
        if self.state != State::Stopping {
            run.stop_deadline = Some(later(now, self.settings.stop_timeout));
            self.set(State::Stopping, "shutting down");
        }
        true
    }

    fn shutdown(&mut self, now: Instant) {
        if !self.request_shutdown(now) && self.state.holds_allocation() {
            self.restart_at = None;
            self.set(State::Stopped, "stopped by the supervisor");
            self.release();
        }
    }

    /// What a client (or a guard) asked for, once no worker runs.
    fn after_stop(&mut self, after: AfterStop, now: Instant, ctx: &Ctx<'_>) {
        self.restart_at = None;
        match after {
            AfterStop::Shed if self.settings.on_demand => {
                // Pressure restore never reloads an on-demand instance: its next request does.
                self.release();
                self.set(
                    State::Unloaded,
                    "shed under memory pressure (session saved); its next request loads it",
                );
                self.log(
                    Event::Shed,
                    "shed under memory pressure; its next request loads it".into(),
                );
            }
            AfterStop::Shed => {
                self.release();
                self.set(
                    State::Shed,
                    "shed under memory pressure (session saved); back when usage falls below restore",
                );
                self.log(
                    Event::Shed,
                    "shed under memory pressure; it comes back when memory does".into(),
                );
            }
            AfterStop::Remove => {
                self.release();
                self.set(State::Stopped, "removed");
                self.log(Event::Removed, "removed".into());
                self.out.push(Action::Reply(Reply::Stopper(Ok(format!(
                    "{} removed",
                    self.name
                )))));
                self.out.push(Action::Forget);
            }
            AfterStop::Relaunch if ctx.stopping => {}
            AfterStop::Relaunch => {
                // The GPU guard moved it (the new layer count is in `gpu`): a restart that
                // keeps the crash-loop history.
                self.restarts += 1;
                self.admit(now, ctx);
            }
            AfterStop::Restart if ctx.stopping => self.out.push(Action::Reply(Reply::Stopper(
                Err("the supervisor is shutting down".into()),
            ))),
            AfterStop::Restart => {
                self.log(Event::RestartRequested, "restarting on request".into());
                // A manual restart clears `failed`, the crash-loop history and the GPU
                // fallback; it counts as a restart like any other start after the first.
                self.restart_state.reset();
                self.gpu.reset();
                self.restarts += 1;
                self.out.push(Action::Reply(Reply::StopperWaits));
                if self.settings.on_demand {
                    // Loaded as a request would load it: the daemon makes room first.
                    self.release();
                    self.set(State::Unloaded, "restarting: waiting for room to load");
                    self.out.push(Action::WantLoad);
                } else {
                    self.admit(now, ctx);
                }
            }
            AfterStop::Unload(why) => self.unloaded(why),
        }
    }

    /// `unloaded` (on demand) or `stopped` (always), its memory given back.
    fn unloaded(&mut self, why: Unload) {
        self.release();
        let by = self.evicted_by.take();
        let (event, message) = match why {
            Unload::Requested => (Event::Unloaded, "unloaded on request".to_owned()),
            Unload::Idle => (
                Event::IdleUnloaded,
                "unloaded after idle_unload with nothing to do".to_owned(),
            ),
            Unload::Evicted => {
                self.evictions += 1;
                let by = by.as_deref().unwrap_or("another instance");
                (Event::Evicted, format!("evicted to make room for {by}"))
            }
        };
        if self.settings.on_demand {
            self.set(State::Unloaded, format!("{message}; {UNLOADED}"));
        } else {
            self.set(
                State::Stopped,
                format!("{message}; `supervisor load {}` starts it again", self.name),
            );
        }
        self.log(event, message);
        self.out.push(Action::Reply(Reply::Stopper(Ok(format!(
            "{} unloaded",
            self.name
        )))));
    }

    /// [`Input::Load`]: an unloaded on-demand instance starts, if layer 2 admits it now.
    fn load(&mut self, now: Instant, ctx: &Ctx<'_>) {
        if self.state != State::Unloaded || self.run.is_some() || ctx.stopping {
            return;
        }
        let required = self.reservation.required;
        if let Err(denied) = ctx.ledger.check(&self.name, required) {
            self.out
                .push(Action::Warn(format!("cannot load on demand yet: {denied}")));
            return;
        }
        self.loads += 1;
        self.reserve(required);
        self.restart_state.record_start(now - self.epoch);
        self.spawn(now);
        if let Some(run) = &mut self.run {
            run.on_demand = true;
        }
    }

    fn restore(&mut self, memory: HostMemory, now: Instant, ctx: &Ctx<'_>) {
        if self.state != State::Shed
            || !precheck(self.reservation.required, ctx.headroom, memory).ok
        {
            return;
        }
        self.log(
            Event::Restored,
            "memory is back: restarting a shed instance".into(),
        );
        self.admit(now, ctx);
    }

    fn gpu_fallback(
        &mut self,
        message: String,
        memory: Option<HostMemory>,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        // Its CPU footprint is its reservation (the ledger holds it already); layer 3 checks
        // that the memory is there now.
        if let Some(m) = memory {
            let check = precheck(self.reservation.required, ctx.headroom, m);
            if !check.ok {
                self.out.push(Action::Warn(format!(
                    "GPU emergency, but no host memory to run it on the CPU: {}",
                    check.summary()
                )));
                return;
            }
        }
        self.gpu.fallback = Fallback::Pressure;
        self.log(Event::GpuFallback, message);
        self.stop(AfterStop::Relaunch, now, ctx);
    }

    // ---- bookkeeping ----

    fn set(&mut self, state: State, reason: impl Into<String>) {
        self.state = state;
        self.reason = reason.into();
    }

    fn reserve(&mut self, bytes: u64) {
        match self.held {
            None => self.out.push(Action::Reserve(bytes)),
            Some(held) if held != bytes => self.out.push(Action::Resize(bytes)),
            Some(_) => {}
        }
        self.held = Some(bytes);
    }

    fn release(&mut self) {
        if self.held.take().is_some() {
            self.out.push(Action::Release);
        }
    }

    /// A log entry with the counters as they are now.
    fn entry(&self, event: Event, message: String) -> Log {
        Log {
            event,
            message,
            with_run: self.run.is_some(),
            exit_reason: None,
            restart: None,
            restarts: self.restarts,
            oom_kills: self.oom_kills,
            memory_limit: Some(self.reservation.required),
            memory_peak: self.last_peak,
        }
    }

    fn log(&mut self, event: Event, message: String) {
        let log = self.entry(event, message);
        self.out.push(Action::Log(Box::new(log)));
    }
}

use belljar_protocol::exit::GPU_ALLOC;

/// How a run ended.
#[derive(Debug)]
struct Ended {
    class: ExitClass,
    last_exit: String,
    what: String,
}
