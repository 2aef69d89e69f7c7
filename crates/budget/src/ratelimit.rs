//! Rate limiting of forwarded worker output, as journald's `RateLimitIntervalSec=` /
//! `RateLimitBurst=`: at most `burst` lines per `interval` per instance, refilled continuously.
//! Lines over the limit are dropped and counted; the next admitted line carries the count so the
//! log says how many went missing.

use std::time::Duration;

/// A token bucket over lines. Time comes in as a monotonic offset.
#[derive(Debug, Clone)]
pub struct LineLimiter {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Option<Duration>,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Forward it; `suppressed` lines were dropped since the last forwarded one.
    Forward { suppressed: u64 },
    /// Drop it (counted).
    Drop,
}

impl LineLimiter {
    /// `burst` lines per `interval`; a zero burst or interval disables the limit.
    pub fn new(burst: u32, interval: Duration) -> LineLimiter {
        let per_sec = if burst == 0 || interval.is_zero() {
            f64::INFINITY
        } else {
            f64::from(burst) / interval.as_secs_f64()
        };
        LineLimiter {
            burst: f64::from(burst),
            per_sec,
            tokens: f64::from(burst),
            last: None,
            dropped: 0,
        }
    }

    pub fn admit(&mut self, now: Duration) -> Admit {
        if self.per_sec.is_infinite() {
            return Admit::Forward { suppressed: 0 };
        }
        if let Some(last) = self.last {
            let elapsed = now.saturating_sub(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Forward {
                suppressed: std::mem::take(&mut self.dropped),
            }
        } else {
            self.dropped += 1;
            Admit::Drop
        }
    }

    /// Lines dropped since the last forwarded one.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_passes_then_lines_are_dropped_and_counted() {
        let mut l = LineLimiter::new(3, 30 * S);
        for _ in 0..3 {
            assert_eq!(l.admit(S), Admit::Forward { suppressed: 0 });
        }
        assert_eq!(l.admit(S), Admit::Drop);
        assert_eq!(l.admit(S), Admit::Drop);
        assert_eq!(l.dropped(), 2);
        // 3 per 30 s: one token every 10 s.
        assert_eq!(l.admit(S * 10), Admit::Drop);
        assert_eq!(l.admit(S * 11), Admit::Forward { suppressed: 3 });
        assert_eq!(l.dropped(), 0);
    }

    #[test]
    fn a_steady_rate_under_the_limit_is_never_dropped() {
        let mut l = LineLimiter::new(10, S);
        for i in 0..1000u32 {
            assert!(matches!(
                l.admit(Duration::from_millis(u64::from(i) * 100)),
                Admit::Forward { .. }
            ));
        }
    }

    #[test]
    fn the_bucket_never_holds_more_than_the_burst() {
        let mut l = LineLimiter::new(5, S);
        l.admit(Duration::ZERO);
        let mut forwarded = 0;
        for _ in 0..100 {
            if matches!(l.admit(S * 3600), Admit::Forward { .. }) {
                forwarded += 1;
            }
        }
        assert_eq!(forwarded, 5);
    }

    #[test]
    fn zero_disables_the_limit() {
        let mut l = LineLimiter::new(0, S);
        for _ in 0..10_000 {
            assert_eq!(l.admit(Duration::ZERO), Admit::Forward { suppressed: 0 });
        }
    }
}
