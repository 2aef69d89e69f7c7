//! The control socket (`control.sock` in the runtime directory): one request per connection,
//! answered with one response. `supervisor status` and, from [control] on, add/remove/ask/restart
//! speak it. The status report is a stable, documented interface (docs/operations.md).

use serde::{Deserialize, Serialize};

/// A request, with the client's protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub protocol_version: u32,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    Status(StatusQuery),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusQuery {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Response {
    Status(StatusReport),
    Error(ControlError),
}

/// A refused or failed request; `exit_code` is what the CLI exits with (docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub message: String,
    pub exit_code: u8,
}

/// `supervisor status --json`. Sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub host: HostStatus,
    pub budget: BudgetStatus,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub total: u64,
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    pub usable: u64,
    pub allocated: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    /// `starting`, `loading`, `ready`, `backoff`, `waiting-for-memory`, `failed`, `stopping`,
    /// `stopped`.
    pub state: String,
    /// A one-line human explanation of the state.
    pub reason: String,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub oom_kills: u64,
    /// `null`, `oom-kill`, `signal:N`, `exit:N`, `watchdog`, `precheck-refused`, `stopped`.
    pub last_exit: Option<String>,
    /// 0.0 to 1.0 while loading; 1.0 once ready.
    pub load_progress: f32,
    /// The ledger allocation held now (0 when none).
    pub allocated: u64,
    /// How the reservation was estimated: `file`.
    pub estimate_source: String,
    pub memory: MemoryStatus,
    /// Seconds since the current worker was spawned (null when none runs).
    pub uptime_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    pub current: Option<u64>,
    pub limit: Option<u64>,
    pub reservation: Option<u64>,
    /// This run's peak.
    pub peak: Option<u64>,
    /// The previous run's peak.
    pub last_peak: Option<u64>,
}
