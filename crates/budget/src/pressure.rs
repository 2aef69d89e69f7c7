//! Host pressure policy: levels with hysteresis, who is shed first, who comes back first, and
//! thrash detection. Pure: readings and times come in as values.
//!
//! Levels rise at once when a threshold is crossed. They fall only with a margin: one level at a
//! time once usage is [`HYSTERESIS_PERCENT`] points below the current level's threshold (for
//! floors: that share of total memory above it), and back to `normal` only below `restore`.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::validate::HostMemory;

/// How far below a level's threshold usage must fall before the level is left (percent of total).
pub const HYSTERESIS_PERCENT: f64 = 5.0;

/// The levels are the wire's (`PressureNotice`): one type from the worker link to status.
pub use belljar_protocol::worker::Level;

/// The level one step down.
fn below(level: Level) -> Level {
    match level {
        Level::Emergency => Level::Critical,
        Level::Critical => Level::Warning,
        _ => Level::Normal,
    }
}

/// One threshold: percent of memory used, or a floor of available bytes (budgets.toml's
/// `[pressure]` resolves to one kind for all four levels).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threshold {
    PercentUsed(f64),
    Available(u64),
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::PercentUsed(p) => write!(f, "{p}% used"),
            Threshold::Available(s) => write!(f, "{} available", crate::Size(*s)),
        }
    }
}

impl Threshold {
    /// Whether `m` is at or beyond this threshold (the bad side).
    fn crossed(self, m: HostMemory) -> bool {
        match self {
            Threshold::PercentUsed(p) => m.usage_percent() >= p,
            Threshold::Available(floor) => m.available <= floor,
        }
    }

    /// Whether `m` is clearly back on the good side (by the hysteresis margin).
    fn cleared(self, m: HostMemory) -> bool {
        match self {
            Threshold::PercentUsed(p) => m.usage_percent() < p - HYSTERESIS_PERCENT,
            Threshold::Available(floor) => {
                m.available as f64 > floor as f64 + m.total as f64 * HYSTERESIS_PERCENT / 100.0
            }
        }
    }

    /// Whether `m` is below this threshold at all (for `restore`).
    fn below(self, m: HostMemory) -> bool {
        match self {
            Threshold::PercentUsed(p) => m.usage_percent() < p,
            Threshold::Available(floor) => m.available > floor,
        }
    }
}

/// The `[pressure]` levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Levels {
    pub warning: Threshold,
    pub critical: Threshold,
    pub emergency: Threshold,
    pub restore: Threshold,
}

impl Levels {
    fn threshold(&self, l: Level) -> Option<Threshold> {
        match l {
            Level::Normal => None,
            Level::Warning => Some(self.warning),
            Level::Critical => Some(self.critical),
            Level::Emergency => Some(self.emergency),
        }
    }

    /// Whether usage is below `restore` (shed instances may come back).
    pub fn restored(&self, m: HostMemory) -> bool {
        self.restore.below(m)
    }

    /// The highest level whose threshold `m` crosses.
    pub fn raw(&self, m: HostMemory) -> Level {
        [Level::Emergency, Level::Critical, Level::Warning]
            .into_iter()
            .find(|l| self.threshold(*l).is_some_and(|t| t.crossed(m)))
            .unwrap_or(Level::Normal)
    }

    /// The next level from `current` given reading `m`, with hysteresis.
    pub fn next(&self, current: Level, m: HostMemory) -> Level {
        let raw = self.raw(m);
        if raw >= current {
            return raw;
        }
        if self.restore.below(m) {
            return raw;
        }
        // Fall one level at a time, and only once clearly below the current level's threshold.
        let mut level = current;
        while level > raw && level > Level::Warning {
            match self.threshold(level) {
                Some(t) if t.cleared(m) => level = below(level),
                _ => break,
            }
        }
        level
    }
}

/// An instance as the shedder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub priority: i64,
    /// When it last took or finished a request (ms on the supervisor's monotonic clock).
    pub last_used_ms: Option<u64>,
}

/// The instance to shed: the one that gives way first ([`crate::swap::give_way_first`]: the
/// lowest priority, then the least recently used, then by name).
pub fn shed_victim(running: &[Candidate]) -> Option<&Candidate> {
    running.iter().min_by(|a, b| {
        crate::swap::give_way_first(
            (a.priority, a.last_used_ms, &a.name),
            (b.priority, b.last_used_ms, &b.name),
        )
    })
}

/// The order in which shed instances come back: highest priority first, ties by name.
pub fn restore_order(shed: &[Candidate]) -> Vec<&Candidate> {
    let mut v: Vec<&Candidate> = shed.iter().collect();
    v.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    v
}

/// Major-fault samples of one instance over a sliding window: "thrashing" when the rate over the
/// whole window stays at or above the threshold. A limit too small for an mmap'd model does not
/// OOM; llama.cpp re-reads the file instead, and this is how that shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThrashDetector {
    samples: VecDeque<(Duration, u64)>,
}

impl ThrashDetector {
    /// Adds a cumulative major-fault count at `now`; returns whether the instance is thrashing.
    pub fn sample(
        &mut self,
        now: Duration,
        majflt: u64,
        window: Duration,
        rate_per_s: f64,
    ) -> bool {
        if self.samples.back().is_some_and(|(_, m)| majflt < *m) {
            self.samples.clear(); // a new process: counters restart
        }
        self.samples.push_back((now, majflt));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_sub(*t) >= window)
        {
            self.samples.pop_front();
        }
        let (Some((t0, m0)), Some((t1, m1))) = (self.samples.front(), self.samples.back()) else {
            return false;
        };
        let span = t1.saturating_sub(*t0);
        if span < window {
            return false;
        }
        (m1 - m0) as f64 / span.as_secs_f64() >= rate_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn used(percent: f64) -> HostMemory {
        HostMemory {
            total: 100 * GIB,
            available: ((100.0 - percent) * GIB as f64) as u64,
        }
    }

    fn levels() -> Levels {
        Levels {
            warning: Threshold::PercentUsed(80.0),
            critical: Threshold::PercentUsed(90.0),
            emergency: Threshold::PercentUsed(95.0),
            restore: Threshold::PercentUsed(60.0),
        }
    }

    #[test]
    fn raw_levels() {
        let l = levels();
        assert_eq!(l.raw(used(50.0)), Level::Normal);
        assert_eq!(l.raw(used(80.0)), Level::Warning);
        assert_eq!(l.raw(used(91.0)), Level::Critical);
        assert_eq!(l.raw(used(99.0)), Level::Emergency);
    }

    #[test]
    fn rises_at_once_falls_with_hysteresis() {
        let l = levels();
        assert_eq!(
            l.next(Level::Normal, used(96.0)),
            Level::Emergency,
            "straight up"
        );
        assert_eq!(
            l.next(Level::Emergency, used(94.0)),
            Level::Emergency,
            "not yet 5 points below"
        );
        assert_eq!(
            l.next(Level::Emergency, used(89.0)),
            Level::Critical,
            "one level down"
        );
        assert_eq!(l.next(Level::Critical, used(84.0)), Level::Warning);
        assert_eq!(
            l.next(Level::Warning, used(70.0)),
            Level::Warning,
            "warning holds until restore"
        );
        assert_eq!(
            l.next(Level::Warning, used(59.0)),
            Level::Normal,
            "below restore"
        );
        assert_eq!(
            l.next(Level::Emergency, used(50.0)),
            Level::Normal,
            "below restore from any level"
        );
    }

    #[test]
    fn floors_work_the_same_way() {
        let l = Levels {
            warning: Threshold::Available(8 * GIB),
            critical: Threshold::Available(4 * GIB),
            emergency: Threshold::Available(2 * GIB),
            restore: Threshold::Available(16 * GIB),
        };
        let avail = |g: u64| HostMemory {
            total: 100 * GIB,
            available: g * GIB,
        };
        assert_eq!(l.raw(avail(50)), Level::Normal);
        assert_eq!(l.raw(avail(3)), Level::Critical);
        assert_eq!(l.next(Level::Normal, avail(1)), Level::Emergency);
        assert_eq!(
            l.next(Level::Emergency, avail(5)),
            Level::Emergency,
            "needs 2 GiB + 5 GiB"
        );
        assert_eq!(l.next(Level::Emergency, avail(8)), Level::Critical);
        assert_eq!(l.next(Level::Warning, avail(17)), Level::Normal);
    }

    #[test]
    fn victims_and_restore_order() {
        let c = |n: &str, p| Candidate {
            name: n.into(),
            priority: p,
            last_used_ms: None,
        };
        let running = [c("god", 2), c("subject", 0), c("observer", 1), c("aaa", 0)];
        assert_eq!(
            shed_victim(&running).unwrap().name,
            "aaa",
            "lowest priority, ties by name"
        );
        // Among equal priorities the least recently used goes first, one never used before any.
        let used = |n: &str, p, at| Candidate {
            last_used_ms: Some(at),
            ..c(n, p)
        };
        let running = [
            used("aaa", 0, 9_000),
            used("subject", 0, 2_000),
            used("god", 2, 1),
        ];
        assert_eq!(shed_victim(&running).unwrap().name, "subject");
        let running = [used("aaa", 0, 9_000), c("zzz", 0)];
        assert_eq!(shed_victim(&running).unwrap().name, "zzz", "never used");
        assert_eq!(shed_victim(&[]), None);
        let shed = [c("subject", 0), c("god", 2), c("observer", 1)];
        let order: Vec<&str> = restore_order(&shed)
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(order, ["god", "observer", "subject"]);
    }

    #[test]
    fn thrashing_needs_a_sustained_rate() {
        let s = Duration::from_secs;
        let mut d = ThrashDetector::default();
        let w = s(3);
        assert!(!d.sample(s(0), 0, w, 100.0));
        assert!(!d.sample(s(1), 1000, w, 100.0), "window not yet covered");
        assert!(!d.sample(s(2), 2000, w, 100.0));
        assert!(d.sample(s(3), 3000, w, 100.0), "1000/s over 3 s");
        assert!(d.sample(s(4), 3500, w, 100.0));
        // Quiet now: the rate over the window drops.
        assert!(!d.sample(s(7), 3500, w, 100.0));
        // A restarted process resets the counters.
        assert!(!d.sample(s(8), 10, w, 100.0));
    }
}
