//! One instance as the daemon holds it: its resolved spec, its lifecycle (the pure
//! `belljar_budget::lifecycle::Machine`, which owns its state, reservation and counters), and
//! the I/O handles that the machine cannot hold: the current run's link and cgroup, the clients
//! waiting on it, the output limiter and the GPU readings.

use std::path::PathBuf;
use std::time::Instant;

use belljar_budget::estimate::Origin;
use belljar_budget::lifecycle::{Machine, Reservation, Settings};
use belljar_config::InstanceSpec;
use belljar_protocol::control::{AddRequest, Response};
use belljar_protocol::worker::SupervisorMsg;
use tokio::sync::mpsc::UnboundedSender;

pub use belljar_budget::lifecycle::{AfterStop, State};

/// Where a control connection's responses go.
pub type ReplyTx = UnboundedSender<Response>;

/// The I/O side of one run of the worker (the machine's `Run` holds its policy side). Dropped
/// when the run's exit has been handled.
#[derive(Debug)]
pub struct Link {
    pub pid: u32,
    /// Distinguishes this run's link events from a previous run's.
    pub generation: u64,
    pub cgroup: PathBuf,
    /// Frames to the worker, written by the link's writer task.
    pub tx: UnboundedSender<SupervisorMsg>,
    /// The task watching this run's cgroup for OOM events (aborted when the run ends).
    pub oom_watch: Option<tokio::task::JoinHandle<()>>,
    /// The process was reaped: its exit is being handled.
    pub exited: bool,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(task) = self.oom_watch.take() {
            task.abort();
        }
    }
}

#[derive(Debug)]
pub struct Instance {
    pub spec: InstanceSpec,
    pub machine: Machine,
    /// Where the estimate came from.
    pub estimate_source: Origin,
    pub identity: Option<crate::learn::ModelIdentity>,
    /// The VRAM reservation with `gpu_layers` (0 without).
    pub vram: u64,
    /// The current run's link and cgroup.
    pub link: Option<Link>,
    /// Set for instances added at run time (persisted in the state dir once confirmed).
    pub added: Option<AddRequest>,
    /// Added at run time and not yet ready: not persisted, and removed again (the `add`
    /// refused) if its first run ends before it is ready.
    pub unconfirmed: bool,
    /// An unconfirmed add failed: the instance goes once the current input is carried out.
    pub roll_back: bool,
    /// Clients waiting for this instance to become ready (add, restart).
    pub waiters: Vec<ReplyTx>,
    /// The client that asked for the current stop (remove, restart).
    pub stopper: Option<ReplyTx>,
    /// Major faults over time, for thrash detection.
    pub thrash: belljar_budget::pressure::ThrashDetector,
    pub thrashing: bool,
    /// The reason the thrash detector gave, shown instead of the machine's while thrashing.
    pub thrash_reason: Option<String>,
    /// The rate limit on this instance's forwarded output, kept across its runs.
    pub output_limiter: Option<super::output::SharedLimiter>,
    /// VRAM attributed to the current run at the last GPU reading, and its (device, pid)s.
    pub gpu_memory: Option<u64>,
    pub gpu_pids: Vec<(u32, u32)>,
    /// Whether the last run's VRAM is confirmed released.
    pub gpu_release: GpuRelease,
    /// Requests waiting for the worker, and the one it serves.
    pub queue: belljar_budget::queue::Queue,
    /// When it last took or finished a request (the daemon's monotonic clock).
    pub last_used: Option<std::time::Duration>,
    /// [swap] An unloaded on-demand instance that a request (or `load`) wants: the order in
    /// which it was wanted (a sequence number; the paused clock of tests cannot order them).
    pub load_wanted: Option<u64>,
    /// When a wanted load looks for room again (a victim's `min_loaded` ends, or memory).
    pub load_at: Option<Instant>,
    /// Why a wanted load waits, shown as its reason.
    pub load_waits: Option<String>,
    /// This instance is being evicted to make room for the named one.
    pub evicting_for: Option<String>,
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
    /// A new instance, not started: the loop admits it.
    pub fn new(
        spec: InstanceSpec,
        a: super::Admitted,
        epoch: Instant,
        queue: belljar_budget::queue::Queue,
    ) -> Instance {
        let settings = Settings {
            restart: spec.restart_config(),
            stop_timeout: spec.stop_timeout.0,
            heartbeat_interval: spec.heartbeat_interval.0,
            load_stall_timeout: spec.load_stall_timeout.0,
            gpu_layers: spec.gpu_layers,
            swap_max: spec.swap_max.bytes(),
            on_demand: spec.load == belljar_budget::swap::LoadMode::OnDemand,
        };
        let reservation = Reservation {
            required: a.required,
            estimate: a.estimate,
            protected: a.protected,
        };
        Instance {
            machine: Machine::new(spec.name.as_str(), settings, reservation, epoch),
            spec,
            estimate_source: a.source,
            identity: a.identity,
            vram: a.vram,
            link: None,
            added: None,
            unconfirmed: false,
            roll_back: false,
            waiters: Vec::new(),
            stopper: None,
            thrash: Default::default(),
            thrashing: false,
            thrash_reason: None,
            output_limiter: None,
            gpu_memory: None,
            gpu_pids: Vec::new(),
            gpu_release: GpuRelease::Done,
            queue,
            last_used: None,
            load_wanted: None,
            load_at: None,
            load_waits: None,
            evicting_for: None,
        }
    }

    pub fn state(&self) -> State {
        self.machine.state
    }

    /// The ledger reservation: max(ram_limit, estimate), grown after OOM kills.
    pub fn required(&self) -> u64 {
        self.machine.reservation.required
    }

    /// The reason shown in status: the thrash detector's while it flags the instance.
    pub fn reason(&self) -> &str {
        match (&self.thrash_reason, self.thrashing, &self.load_waits) {
            (Some(r), true, _) => r,
            (_, _, Some(w)) if self.state() == State::Unloaded => w,
            _ => &self.machine.reason,
        }
    }
}
