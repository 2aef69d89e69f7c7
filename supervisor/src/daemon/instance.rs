//! One instance as the daemon tracks it: its resolved spec, its reservation, its state and the
//! worker process running it (if any).

use std::path::PathBuf;
use std::time::Instant;

use belljar_budget::restart::{RestartConfig, RestartState};
use belljar_config::InstanceSpec;
use belljar_protocol::control::{AddRequest, Response};
use belljar_protocol::worker::SupervisorMsg;
use tokio::sync::mpsc::UnboundedSender;

/// Where a control connection's responses go.
pub type ReplyTx = UnboundedSender<Response>;

/// What happens once a stopping worker has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// `supervisor remove`: forget the instance.
    Remove,
    /// `supervisor restart`: start it again.
    Restart,
    /// The pressure guard: keep it, `shed`, until memory comes back.
    Shed,
    /// The GPU guard: start it again with other GPU layers (fallback or restore).
    Relaunch,
}

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
        }
    }

    /// Budget by state: these states hold their ledger allocation; `failed` and `stopped`
    /// release it (docs/operations.md).
    pub fn holds_allocation(self) -> bool {
        !matches!(self, State::Failed | State::Stopped | State::Shed)
    }
}

/// A running worker process.
#[derive(Debug)]
pub struct Worker {
    pub pid: u32,
    /// Distinguishes this run's link events from a previous run's.
    pub generation: u64,
    pub started: Instant,
    pub cgroup: PathBuf,
    /// Frames to the worker, written by the link's writer task.
    pub tx: UnboundedSender<SupervisorMsg>,
    /// Whether the worker has introduced itself (Hello checked, Welcome sent).
    pub greeted: bool,
    /// The task watching this run's cgroup for OOM events (aborted when the run ends).
    pub oom_watch: Option<tokio::task::JoinHandle<()>>,
    /// The cgroup's `oom_kill` counter as last seen by the OOM watch.
    pub oom_seen: u64,
    /// The process has exited; the run ends once its cgroup is removed.
    pub exited: bool,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = self.oom_watch.take() {
            task.abort();
        }
    }
}

#[derive(Debug)]
pub struct Instance {
    pub spec: InstanceSpec,
    /// The ledger reservation: max(ram_limit, estimate).
    pub required: u64,
    /// The estimate, where it came from (`file`, `gguf`, `learned`), and what `memory.low`
    /// protects.
    pub estimate: u64,
    pub estimate_source: belljar_budget::estimate::Origin,
    pub protected: u64,
    pub identity: Option<crate::learn::ModelIdentity>,
    /// The VRAM reservation with `gpu_layers` (0 without).
    pub vram: u64,
    pub state: State,
    pub reason: String,
    pub worker: Option<Worker>,
    pub restarts: u64,
    pub oom_kills: u64,
    pub last_exit: Option<String>,
    pub load_progress: f32,
    pub last_peak: Option<u64>,
    /// When a stopping worker gets SIGKILL.
    pub stop_deadline: Option<Instant>,
    /// The reason the worker gave in a `Failed` or `Refused` message before it exited.
    pub worker_said: Option<String>,
    /// Set for instances added at run time (persisted in the state dir).
    pub added: Option<AddRequest>,
    /// Clients waiting for this instance to become ready (add, restart).
    pub waiters: Vec<ReplyTx>,
    /// What a client asked to happen once the worker has stopped.
    pub after_stop: Option<(AfterStop, Option<ReplyTx>)>,
    /// Start history for backoff and the crash-loop breaker.
    pub restart_state: RestartState,
    /// When the current run became ready.
    pub ready_since: Option<Instant>,
    pub last_heartbeat: Option<Instant>,
    /// When load progress last moved (or the worker was spawned).
    pub last_progress: Instant,
    /// The watchdog killed the current run.
    pub watchdog_fired: bool,
    /// When a `backoff` instance starts again.
    pub restart_at: Option<Instant>,
    /// Major faults over time, for thrash detection.
    pub thrash: belljar_budget::pressure::ThrashDetector,
    pub thrashing: bool,
    /// The rate limit on this instance's forwarded output, kept across its runs.
    pub output_limiter: Option<super::output::SharedLimiter>,
    /// CPU fallback and GPU allocation failures, kept across runs.
    pub gpu: belljar_budget::gpu::GpuState,
    /// VRAM attributed to the current run at the last GPU reading, and its (device, pid)s.
    pub gpu_memory: Option<u64>,
    pub gpu_pids: Vec<(u32, u32)>,
    /// Whether the last run's VRAM is confirmed released.
    pub gpu_release: GpuRelease,
    /// The current run reported a GPU allocation failure.
    pub gpu_alloc_failed: bool,
}

/// The release of a stopped worker's VRAM, confirmed through NVML before it counts as free.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuRelease {
    /// Nothing to wait for.
    #[default]
    Done,
    /// Its pids were still on the GPU at the last look.
    Pending {
        pids: Vec<(u32, u32)>,
        since: Instant,
    },
    /// They did not go within `[gpu] release_timeout` (logged; shown in status).
    TimedOut,
}

impl GpuRelease {
    pub fn as_str(&self) -> Option<&'static str> {
        match self {
            GpuRelease::Done => None,
            GpuRelease::Pending { .. } => Some("pending"),
            GpuRelease::TimedOut => Some("timed-out"),
        }
    }
}

impl Instance {
    pub fn new(spec: InstanceSpec, a: super::Admitted) -> Instance {
        Instance {
            spec,
            required: a.required,
            estimate: a.estimate,
            estimate_source: a.source,
            protected: a.protected,
            identity: a.identity,
            vram: a.vram,
            state: State::Starting,
            reason: "waiting to start".into(),
            worker: None,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
            load_progress: 0.0,
            last_peak: None,
            stop_deadline: None,
            worker_said: None,
            added: None,
            waiters: Vec::new(),
            after_stop: None,
            restart_state: RestartState::default(),
            ready_since: None,
            last_heartbeat: None,
            last_progress: Instant::now(),
            watchdog_fired: false,
            restart_at: None,
            thrash: Default::default(),
            thrashing: false,
            output_limiter: None,
            gpu: Default::default(),
            gpu_memory: None,
            gpu_pids: Vec::new(),
            gpu_release: GpuRelease::Done,
            gpu_alloc_failed: false,
        }
    }

    /// The restart policy's view of this instance's keys.
    pub fn restart_config(&self) -> RestartConfig {
        let s = &self.spec;
        RestartConfig {
            mode: s.restart,
            backoff_initial: s.backoff_initial.0,
            backoff_factor: s.backoff_factor,
            backoff_max: s.backoff_max.0,
            backoff_reset_after: s.backoff_reset_after.0,
            start_limit_burst: s.start_limit_burst,
            start_limit_interval: s.start_limit_interval.0,
        }
    }

    /// When the watchdog fires for the current run, if it is watched now: 3 missed heartbeats
    /// while ready, or no load progress for `load_stall_timeout` while starting or loading.
    pub fn watchdog_deadline(&self) -> Option<Instant> {
        if self.worker.as_ref().is_none_or(|w| w.exited) || self.watchdog_fired {
            return None;
        }
        match self.state {
            State::Ready => self
                .last_heartbeat
                .map(|t| t + self.spec.heartbeat_interval.0 * 3),
            State::Starting | State::Loading => {
                Some(self.last_progress + self.spec.load_stall_timeout.0)
            }
            _ => None,
        }
    }

    pub fn set(&mut self, state: State, reason: impl Into<String>) {
        self.state = state;
        self.reason = reason.into();
    }
}
