//! The control socket (`control.sock` in the runtime directory). One conversation per
//! connection: the client sends [`ClientHello`], the server answers [`ServerHello`] (or an
//! `Error`), the client sends one [`Command`], the server answers with one or more [`Response`]s
//! (an `ask` streams `Token`s and ends with `Done`; everything else answers once). The status
//! report is a stable, documented interface (docs/operations.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    pub protocol_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    pub protocol_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    Status(StatusQuery),
    Add(AddRequest),
    Remove(RemoveRequest),
    Restart(NameRequest),
    Ask(AskRequest),
    /// `supervisor load NAME`: start an unloaded instance now (making room as a request would).
    Load(NameRequest),
    /// `supervisor unload NAME`: stop its worker and give its memory back; an on-demand
    /// instance comes back with its next request, an `always` one with `load` or a restart of
    /// the daemon.
    Unload(NameRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusQuery {}

/// `supervisor add`: a new instance at run time (persisted in the state dir). Unset fields
/// come from the config's `[defaults]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub name: String,
    /// Canonicalized by the client.
    pub model: PathBuf,
    pub ram_limit: Option<u64>,
    pub ctx: Option<u32>,
    pub gpu_layers: Option<u32>,
    #[serde(default)]
    pub gpu_device: Option<u32>,
    pub priority: Option<i64>,
    /// The worker's chat template: a built-in's name, or a file's absolute path (the client
    /// resolves a relative one). Absent in requests and persisted files of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// `always` or `on-demand` (absent: `[defaults]`, else always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRequest {
    pub name: String,
}

/// `supervisor remove`: stop the instance and forget it. Its session (the conversation in
/// `instances/NAME` of the state dir) is moved aside to `instances/NAME.removed-STAMP` once the
/// worker has stopped, so that adding the name again starts a new conversation; with
/// `keep_session` it stays where it is and comes back with the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub name: String,
    #[serde(default)]
    pub keep_session: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskRequest {
    pub name: String,
    pub prompt: String,
    pub max_tokens: u32,
    #[serde(default)]
    pub ignore_eos: bool,
    /// The prompt goes to the model as is, not through its chat template.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Response {
    Status(Box<StatusReport>),
    /// A command that changed something (or found it already so) succeeded.
    Ok(OkReply),
    /// One generated token of an `ask`.
    Token(TokenText),
    /// The end of an `ask`.
    Done(AskDone),
    Error(ControlError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkReply {
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenText {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskDone {
    pub tokens: u32,
    pub ms: u64,
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
    /// Where Prometheus metrics are served (`run --metrics`), or null.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Where the OpenAI-compatible HTTP API listens (`run --http`, `[http] listen`), or null
    /// when it is off.
    #[serde(default)]
    pub http_addr: Option<String>,
    /// Every GPU NVML reports; empty without NVML.
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// Instances left out at the end of `instances` so the reply fits one frame (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StatusReport {
    /// Leaves instances out, from the end, until the report encodes in at most `cap` bytes,
    /// and counts them in `omitted`. Without instances every field is bounded, so the rest
    /// always fits a frame.
    pub fn fit(&mut self, cap: usize) {
        let whole = json_len(self);
        if whole <= cap {
            return;
        }
        let mut used = whole
            - self
                .instances
                .iter()
                .map(|i| json_len(i) + 1)
                .sum::<usize>();
        // Room for the largest possible count in `"omitted":N,`.
        used += 32;
        let keep = self
            .instances
            .iter()
            .take_while(|i| {
                used += json_len(*i) + 1;
                used <= cap
            })
            .count();
        self.omitted += (self.instances.len() - keep) as u64;
        self.instances.truncate(keep);
    }
}

/// The length of a value's JSON.
fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 4, |v| v.len())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub used: u64,
    pub total: u64,
    /// The GPU guard's level for this GPU: `normal`, `warning`, `critical`, `emergency`.
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub total: u64,
    pub available: u64,
    /// `normal`, `warning`, `critical`, `emergency` ([pressure]).
    pub level: String,
    /// The system's memory PSI `some avg10` (percent), when the kernel has PSI.
    #[serde(default, deserialize_with = "crate::finite::option_f32")]
    pub psi_some_avg10: Option<f32>,
    /// Where `total`/`available` come from: `host` (MemAvailable) or `cgroup` (the tightest
    /// limited cgroup above belljar's instances, e.g. a container's or pod's).
    pub source: String,
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
    /// `stopped`, `shed`, `unloaded` (on-demand, no worker).
    pub state: String,
    /// Its major-fault rate stayed high over `thrash_window`: the limit is too small for the
    /// model's working set (`reason` says what to raise it to).
    pub thrashing: bool,
    /// A one-line human explanation of the state.
    pub reason: String,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub oom_kills: u64,
    /// `null`, `oom-kill`, `signal:N`, `exit:N`, `watchdog`, `precheck-refused`, `stopped`.
    pub last_exit: Option<String>,
    /// 0.0 to 1.0 while loading; 1.0 once ready.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub load_progress: f32,
    /// The ledger allocation held now (0 when none).
    pub allocated: u64,
    /// How the reservation was estimated: `file`.
    pub estimate_source: String,
    pub memory: MemoryStatus,
    /// Seconds since the current worker was spawned (null when none runs).
    pub uptime_s: Option<u64>,
    /// VRAM attributed to the current run (its cgroup's processes as NVML lists them); null
    /// without NVML or when no worker runs.
    #[serde(default)]
    pub gpu_memory: Option<u64>,
    /// It runs on the CPU although it has gpu_layers (GPU emergency, or 3 GPU allocation
    /// failures).
    #[serde(default)]
    pub cpu_fallback: bool,
    /// `pending` while NVML still lists the last run's processes, `timed-out` when they did not
    /// go within `[gpu] release_timeout`; null otherwise.
    #[serde(default)]
    pub gpu_release: Option<String>,
    /// Requests waiting for the worker (HTTP and `ask`), not counting the one it serves.
    #[serde(default)]
    pub queued: u64,
    /// More names HTTP clients may use for it (`aliases`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Its `chat_template` (a built-in's name or a file's path); absent when the worker uses
    /// the model's own template (else chatml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// When it last took or finished a request (seconds since the epoch); null when it has not
    /// since the supervisor started. Shedding takes the least recently used first among equal
    /// priorities.
    #[serde(default)]
    pub last_used_unix: Option<u64>,
    /// `always` or `on-demand` (its `load` key).
    #[serde(default = "always")]
    pub load: String,
    /// `pinned = true`: never evicted to make room.
    #[serde(default)]
    pub pinned: bool,
    /// Loads on demand (by a request or `supervisor load`) since the supervisor started.
    #[serde(default)]
    pub loads: u64,
    /// Times it was unloaded to make room for another instance.
    #[serde(default)]
    pub evictions: u64,
}

fn always() -> String {
    "always".to_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(n: usize) -> InstanceStatus {
        InstanceStatus {
            name: format!("i{n}"),
            state: "failed".into(),
            thrashing: false,
            reason: "r".repeat(1000),
            pid: None,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
            load_progress: 0.0,
            allocated: 0,
            estimate_source: "file".into(),
            memory: MemoryStatus {
                current: None,
                limit: None,
                reservation: None,
                peak: None,
                last_peak: None,
            },
            uptime_s: None,
            gpu_memory: None,
            cpu_fallback: false,
            gpu_release: None,
            queued: 0,
            aliases: vec![],
            chat_template: None,
            last_used_unix: None,
            load: always(),
            pinned: false,
            loads: 0,
            evictions: 0,
        }
    }

    #[test]
    fn a_status_of_many_instances_fits_the_frame_cap_and_says_how_many_it_left_out() {
        let mut r = StatusReport {
            host: HostStatus {
                total: 1,
                available: 1,
                level: "normal".into(),
                psi_some_avg10: None,
                source: "host".into(),
            },
            budget: BudgetStatus {
                usable: 1,
                allocated: 0,
            },
            instances: (0..3000).map(instance).collect(),
            metrics_addr: None,
            http_addr: None,
            gpus: vec![],
            omitted: 0,
        };
        assert!(serde_json::to_vec(&r).unwrap().len() > crate::MAX_FRAME);
        r.fit(crate::MAX_FRAME);
        let len = serde_json::to_vec(&r).unwrap().len();
        assert!(len <= crate::MAX_FRAME, "{len}");
        assert!(r.omitted > 0);
        assert_eq!(r.instances.len() as u64 + r.omitted, 3000);
        // Nearly full: no more than one instance's worth of room is wasted.
        assert!(len + 1200 > crate::MAX_FRAME, "{len}");
        let small = r.clone();
        r.fit(crate::MAX_FRAME);
        assert_eq!(r, small, "fitting twice changes nothing");
    }
}
