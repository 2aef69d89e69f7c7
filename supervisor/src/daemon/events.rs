//! Lifecycle events: one structured log entry each, with the same words as `status` and a stable
//! journal `MESSAGE_ID` per kind (listed in docs/operations.md), so that
//! `journalctl MESSAGE_ID=<id>` finds every event of a kind and `journalctl INSTANCE=<name>`
//! every event of an instance.

use std::fmt;
use std::path::Path;

use tracing::Level;

use super::instance::Instance;

/// The kinds of lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Spawned,
    Loading,
    Ready,
    Exited,
    OomKill,
    RestartScheduled,
    WaitingForMemory,
    Failed,
    NotAdmitted,
    Watchdog,
    LimitRaised,
    Shed,
    Restored,
    Thrashing,
    ThrashingCleared,
    PressureLevel,
    Added,
    Removed,
    RestartRequested,
    GpuFallback,
    GpuRestored,
    GpuReleaseTimeout,
    OutputSuppressed,
    Started,
    Stopped,
}

impl Event {
    pub const ALL: [Event; 25] = [
        Event::Spawned,
        Event::Loading,
        Event::Ready,
        Event::Exited,
        Event::OomKill,
        Event::RestartScheduled,
        Event::WaitingForMemory,
        Event::Failed,
        Event::NotAdmitted,
        Event::Watchdog,
        Event::LimitRaised,
        Event::Shed,
        Event::Restored,
        Event::Thrashing,
        Event::ThrashingCleared,
        Event::PressureLevel,
        Event::Added,
        Event::Removed,
        Event::RestartRequested,
        Event::GpuFallback,
        Event::GpuRestored,
        Event::GpuReleaseTimeout,
        Event::OutputSuppressed,
        Event::Started,
        Event::Stopped,
    ];

    /// The `EVENT` field: the words of `status` where a state has the same name.
    pub fn word(self) -> &'static str {
        match self {
            Event::Spawned => "spawned",
            Event::Loading => "loading",
            Event::Ready => "ready",
            Event::Exited => "exited",
            Event::OomKill => "oom-kill",
            Event::RestartScheduled => "restart-scheduled",
            Event::WaitingForMemory => "waiting-for-memory",
            Event::Failed => "failed",
            Event::NotAdmitted => "not-admitted",
            Event::Watchdog => "watchdog",
            Event::LimitRaised => "limit-raised",
            Event::Shed => "shed",
            Event::Restored => "restored",
            Event::Thrashing => "thrashing",
            Event::ThrashingCleared => "thrashing-cleared",
            Event::PressureLevel => "pressure-level",
            Event::Added => "added",
            Event::Removed => "removed",
            Event::RestartRequested => "restart-requested",
            Event::GpuFallback => "gpu-fallback",
            Event::GpuRestored => "gpu-restored",
            Event::GpuReleaseTimeout => "gpu-release-timeout",
            Event::OutputSuppressed => "output-suppressed",
            Event::Started => "started",
            Event::Stopped => "stopped",
        }
    }

    /// The journal `MESSAGE_ID` (128 bits, as `journalctl --new-id128` prints them). Stable:
    /// alert rules and saved queries depend on them; never reuse or change one.
    pub fn message_id(self) -> &'static str {
        match self {
            Event::Spawned => "f7e217e10eee407eb5a4c7deba93b416",
            Event::Loading => "4ced3133fb3542eb8a02abf6735215f6",
            Event::Ready => "b30987f0bc804ecf8a7bac0973a1c67e",
            Event::Exited => "2912ddede29c441a9c870d0c160aa32e",
            Event::OomKill => "db4f01205a8c4f648b234234efc761e2",
            Event::RestartScheduled => "b32491e1b96e4ed4a86d0f879d2f99bb",
            Event::WaitingForMemory => "4cad32d548e046c39741319c9ed0f0c5",
            Event::Failed => "6d13cc8941684717af01265bb0b2e545",
            Event::NotAdmitted => "16729a20d6564ccaabf19335b2d325f6",
            Event::Watchdog => "411d024c64444581a474b451fd1f22be",
            Event::LimitRaised => "22d21a2cfdb1457987a864baf03694d2",
            Event::Shed => "8eb6a2501eb84e1cba32211d138bb86d",
            Event::Restored => "ff1baa6dc75e420f91b86d28203f78f3",
            Event::Thrashing => "bbf9baa179814d99b3a06c56b5e8723e",
            Event::ThrashingCleared => "84e857200be04e368e19a4b1ff8b2b6b",
            Event::PressureLevel => "405a42dfabb84617b71c35b54ac3a79a",
            Event::Added => "ec592417f78b41afa76cd8a471418ae6",
            Event::Removed => "38aa2d39e05b474cbd4f10efb39d4e14",
            Event::RestartRequested => "043a11ce996745aabbf6257ca5dbf7db",
            Event::GpuFallback => "50294221a6a44b9dba4db5550703db57",
            Event::GpuRestored => "f9e697128a394cd3be4f6503a547767b",
            Event::GpuReleaseTimeout => "9042af19e0664e9395b35dc83d355efe",
            Event::OutputSuppressed => "3d9b5e53e348445795ae9ce0e600261b",
            Event::Started => "9a93f28c83ec4fe897900bf8da120eeb",
            Event::Stopped => "58f3f4a1f07e4b8c9d7c1a3e5b2d6f80",
        }
    }

    /// The journal priority of the event.
    pub fn level(self) -> Level {
        match self {
            Event::Failed | Event::NotAdmitted | Event::Watchdog => Level::ERROR,
            Event::OomKill
            | Event::WaitingForMemory
            | Event::LimitRaised
            | Event::Shed
            | Event::Thrashing
            | Event::PressureLevel
            | Event::GpuFallback
            | Event::GpuReleaseTimeout
            | Event::OutputSuppressed => Level::WARN,
            _ => Level::INFO,
        }
    }
}

/// One entry: the event and the fields known at that point. Absent fields are left out of the
/// entry rather than written empty.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    event: Event,
    instance: Option<&'a str>,
    pid: Option<u32>,
    cgroup: Option<&'a Path>,
    exit_reason: Option<&'a str>,
    restarts: Option<u64>,
    oom_kills: Option<u64>,
    memory_peak: Option<u64>,
    memory_limit: Option<u64>,
    attempt: Option<u32>,
    delay_ms: Option<u64>,
}

impl<'a> Entry<'a> {
    pub fn new(event: Event) -> Entry<'a> {
        Entry {
            event,
            instance: None,
            pid: None,
            cgroup: None,
            exit_reason: None,
            restarts: None,
            oom_kills: None,
            memory_peak: None,
            memory_limit: None,
            attempt: None,
            delay_ms: None,
        }
    }

    /// An instance's event, with its counters and (while one runs) its worker's pid and cgroup.
    pub fn of(event: Event, name: &'a str, inst: &'a Instance) -> Entry<'a> {
        let mut e = Entry::new(event).named(name);
        e.restarts = Some(inst.restarts);
        e.oom_kills = Some(inst.oom_kills);
        e.memory_peak = inst.last_peak;
        e.memory_limit = Some(inst.required);
        if let Some(w) = &inst.worker {
            e = e.worker(w.pid, &w.cgroup);
        }
        e
    }

    pub fn named(mut self, name: &'a str) -> Self {
        self.instance = Some(name);
        self
    }

    pub fn worker(mut self, pid: u32, cgroup: &'a Path) -> Self {
        self.pid = Some(pid);
        self.cgroup = Some(cgroup);
        self
    }

    pub fn exit_reason(mut self, reason: Option<&'a str>) -> Self {
        self.exit_reason = reason;
        self
    }

    /// A scheduled restart: its attempt number and delay.
    pub fn restart(mut self, attempt: u32, delay: std::time::Duration) -> Self {
        self.attempt = Some(attempt);
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub fn oom_kills(mut self, n: u64) -> Self {
        self.oom_kills = Some(n);
        self
    }

    pub fn memory(mut self, limit: Option<u64>, peak: Option<u64>) -> Self {
        self.memory_limit = limit.or(self.memory_limit);
        self.memory_peak = peak.or(self.memory_peak);
        self
    }

    /// Writes the entry. `message_id` comes last so that the text format, which leaves it out,
    /// keeps single spaces between the other fields.
    pub fn log(self, message: fmt::Arguments<'_>) {
        let cgroup = self.cgroup.map(|p| tracing::field::display(p.display()));
        macro_rules! at {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    event = self.event.word(),
                    instance = self.instance,
                    pid = self.pid,
                    cgroup,
                    exit_reason = self.exit_reason,
                    restarts = self.restarts,
                    oom_kills = self.oom_kills,
                    memory_peak = self.memory_peak,
                    memory_limit = self.memory_limit,
                    attempt = self.attempt,
                    delay_ms = self.delay_ms,
                    message_id = self.event.message_id(),
                    "{message}"
                )
            };
        }
        match self.event.level() {
            Level::ERROR => at!(Level::ERROR),
            Level::WARN => at!(Level::WARN),
            _ => at!(Level::INFO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_message_ids_are_unique_and_well_formed() {
        let mut words: Vec<_> = Event::ALL.iter().map(|e| e.word()).collect();
        let mut ids: Vec<_> = Event::ALL.iter().map(|e| e.message_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        words.sort_unstable();
        words.dedup();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(words.len(), Event::ALL.len());
        assert_eq!(ids.len(), Event::ALL.len());
    }

    #[test]
    fn event_words_reuse_the_state_words() {
        use super::super::instance::State;
        for (e, s) in [
            (Event::Loading, State::Loading),
            (Event::Ready, State::Ready),
            (Event::WaitingForMemory, State::WaitingForMemory),
            (Event::Failed, State::Failed),
            (Event::Shed, State::Shed),
        ] {
            assert_eq!(e.word(), s.as_str());
        }
    }
}
