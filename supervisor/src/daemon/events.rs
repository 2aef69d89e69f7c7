//! Lifecycle events: one structured log entry each, with the same words as `status` and a stable
//! journal `MESSAGE_ID` per kind (listed in docs/operations.md), so that
//! `journalctl MESSAGE_ID=<id>` finds every event of a kind and `journalctl INSTANCE=<name>`
//! every event of an instance.

use std::fmt;
use std::path::Path;

use tracing::Level;

use belljar_budget::lifecycle::Log;

use super::instance::{Instance, Link};

pub use belljar_budget::lifecycle::Event;

/// The journal priority of an event.
fn level(event: Event) -> Level {
    match event {
        Event::Failed | Event::NotAdmitted | Event::Watchdog => Level::ERROR,
        Event::OomKill
        | Event::WaitingForMemory
        | Event::LimitRaised
        | Event::Shed
        | Event::Thrashing
        | Event::PressureLevel
        | Event::GpuFallback
        | Event::GpuReleaseTimeout
        | Event::OutputSuppressed
        | Event::RequestRetried
        | Event::RequestFailed => Level::WARN,
        _ => Level::INFO,
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
        let m = &inst.machine;
        let mut e = Entry::new(event).named(name);
        e.restarts = Some(m.restarts);
        e.oom_kills = Some(m.oom_kills);
        e.memory_peak = m.last_peak;
        e.memory_limit = Some(m.reservation.required);
        if let Some(w) = &inst.link {
            e = e.worker(w.pid, &w.cgroup);
        }
        e
    }

    /// The entry the lifecycle asked for, with the run's pid and cgroup when it says so.
    pub fn of_log(name: &'a str, log: &'a Log, link: Option<&'a Link>) -> Entry<'a> {
        let mut e = Entry::new(log.event).named(name);
        e.restarts = Some(log.restarts);
        e.oom_kills = Some(log.oom_kills);
        e.memory_peak = log.memory_peak;
        e.memory_limit = log.memory_limit;
        e.exit_reason = log.exit_reason.as_deref();
        if let Some((attempt, delay)) = log.restart {
            e = e.restart(attempt, delay);
        }
        if let Some(w) = link.filter(|_| log.with_run) {
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
        match level(self.event) {
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
        use belljar_budget::lifecycle::State;
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
