//! Restart policy: what to do when a worker exits. Pure: the exit's class, the instance's start
//! history and `now` (a monotonic time as a `Duration`) come in; a decision goes out.
//!
//! - `restart = "never"` never restarts; `"on-failure"` restarts after a failure; `"always"`
//!   also after a clean exit. A stop asked for by the supervisor is never restarted.
//! - Permanent exits (bad model, bad arguments, protocol mismatch) go straight to `failed`.
//! - Delays grow exponentially (`backoff_initial x backoff_factor^(n-1)`, at most `backoff_max`)
//!   with a jitter of +-10% (then capped at `backoff_max` again); a worker that was ready and
//!   healthy for `backoff_reset_after` before it died starts again from `backoff_initial`.
//! - Crash-loop breaker: at most `start_limit_burst` starts within `start_limit_interval`; the
//!   start that would exceed it is not made and the instance is `failed`. Pre-check refusals
//!   are not starts.
//! - Whatever the window, `start_limit_burst` starts in a row that never reached ready fail the
//!   instance too: a start that fails slower than the window (a load the watchdog kills every
//!   few minutes) cannot loop forever.

use std::collections::VecDeque;
use std::time::Duration;

/// The `[defaults]`/`[instances]` keys of the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartConfig {
    pub mode: RestartMode,
    pub backoff_initial: Duration,
    pub backoff_factor: f64,
    pub backoff_max: Duration,
    pub backoff_reset_after: Duration,
    pub start_limit_burst: u32,
    pub start_limit_interval: Duration,
}

/// `restart =` in budgets.toml: when a worker that exited is started again (`always`,
/// `on-failure`, `never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    Always,
    #[default]
    OnFailure,
    Never,
}

/// How a worker's run ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// The supervisor stopped it (Shutdown, remove, restart).
    Stopped,
    /// Exit 0 without being asked to stop.
    Clean,
    /// A documented permanent exit code: retrying cannot help.
    Permanent,
    /// The worker's pre-load check refused: wait for memory, not a start.
    PrecheckRefused,
    /// Crashed, killed by a signal, OOM-killed or killed by the watchdog.
    Failure,
}

/// The start history the policy needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestartState {
    /// When the recent starts happened (oldest first), pruned to the breaker's window.
    starts: VecDeque<Duration>,
    /// Failures since the last reset: the exponent of the backoff.
    pub consecutive_failures: u32,
    /// Runs in a row that ended without ever being ready.
    pub never_ready: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Do not restart; the instance is `stopped`.
    Stay,
    /// Do not restart; the instance is `failed` with this reason.
    Fail(String),
    /// Wait for memory (`waiting-for-memory`), then start without counting a failure.
    WaitForMemory,
    /// Start again after `delay` (`backoff`), the `attempt`-th consecutive failure.
    Restart { delay: Duration, attempt: u32 },
}

impl RestartState {
    /// Records a start at `now`.
    pub fn record_start(&mut self, now: Duration) {
        self.starts.push_back(now);
    }

    /// Forgets the last start: it was a pre-check refusal, which is not a start.
    pub fn unrecord_start(&mut self) {
        self.starts.pop_back();
    }

    /// Starts within the breaker's window ending at `now`.
    pub fn starts_within(&self, window: Duration, now: Duration) -> usize {
        self.starts
            .iter()
            .filter(|t| now.saturating_sub(**t) < window)
            .count()
    }

    /// Whether one more start at `now` stays within the burst.
    pub fn may_start(&mut self, cfg: &RestartConfig, now: Duration) -> bool {
        while self
            .starts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= cfg.start_limit_interval)
        {
            self.starts.pop_front();
        }
        self.starts.len() < cfg.start_limit_burst as usize
    }

    /// Clears the history (`supervisor restart NAME`).
    pub fn reset(&mut self) {
        *self = RestartState::default();
    }
}

/// The backoff before the `attempt`-th consecutive restart, `jitter` drawn uniformly from [0, 1).
pub fn backoff(cfg: &RestartConfig, attempt: u32, jitter: f64) -> Duration {
    let base = cfg.backoff_initial.as_secs_f64()
        * cfg.backoff_factor.powi(attempt.saturating_sub(1) as i32);
    let capped = base.min(cfg.backoff_max.as_secs_f64());
    let jittered = capped * (0.9 + 0.2 * jitter.clamp(0.0, 1.0));
    // Never panics: a NaN or an overflow (from a factor or durations beyond the config's
    // bounds) gives the cap.
    Duration::try_from_secs_f64(jittered.min(cfg.backoff_max.as_secs_f64()).max(0.0))
        .unwrap_or(cfg.backoff_max)
}

/// Decides what follows an exit. `ready_for` is how long the run was ready before it ended
/// (`None`: it never was).
pub fn decide(
    cfg: &RestartConfig,
    state: &mut RestartState,
    class: ExitClass,
    ready_for: Option<Duration>,
    now: Duration,
    jitter: f64,
) -> Decision {
    if ready_for.is_some() {
        state.never_ready = 0;
    } else if matches!(class, ExitClass::Clean | ExitClass::Failure) {
        state.never_ready += 1;
    }
    match class {
        ExitClass::Stopped => return Decision::Stay,
        ExitClass::Permanent => {
            return Decision::Fail(
                "the worker exited with a permanent error: retrying cannot help".into(),
            );
        }
        ExitClass::PrecheckRefused => {
            state.unrecord_start();
            return Decision::WaitForMemory;
        }
        ExitClass::Clean if cfg.mode != RestartMode::Always => return Decision::Stay,
        ExitClass::Failure if cfg.mode == RestartMode::Never => {
            return Decision::Fail("the worker failed and restart = \"never\"".into());
        }
        ExitClass::Clean | ExitClass::Failure => {}
    }
    if ready_for.is_some_and(|d| d >= cfg.backoff_reset_after) {
        state.consecutive_failures = 0;
    }
    if state.never_ready >= cfg.start_limit_burst {
        return Decision::Fail(format!(
            "crash loop: {} starts in a row never became ready (start_limit_burst {}); `supervisor restart NAME` starts it again",
            state.never_ready, cfg.start_limit_burst
        ));
    }
    if !state.may_start(cfg, now) {
        return Decision::Fail(format!(
            "crash loop: {} starts within {:?} (start_limit_burst {}); `supervisor restart NAME` starts it again",
            state.starts.len(),
            cfg.start_limit_interval,
            cfg.start_limit_burst
        ));
    }
    state.consecutive_failures += 1;
    let attempt = state.consecutive_failures;
    Decision::Restart {
        delay: backoff(cfg, attempt, jitter),
        attempt,
    }
}

/// The limit after an OOM kill whose peak reached the limit: `peak x 1.25`, at most `cap`;
/// `None` when that is no larger than `limit`.
pub fn grown_limit(limit: u64, peak: u64, cap: u64) -> Option<u64> {
    use crate::estimate::{align_down, align_up};
    let grown = align_up(((peak.max(limit) as f64) * 1.25).ceil() as u64);
    let grown = grown.min(align_down(cap));
    (grown > limit).then_some(grown)
}

/// Whether a run's peak "reached" its limit (the kernel charges in pages and reclaims first;
/// within 5% counts).
pub fn peak_reached_limit(peak: u64, limit: u64) -> bool {
    peak as f64 >= limit as f64 * 0.95
}

/// The kernel's `oom_score_adj` for a worker: lower priority, higher score (killed first);
/// always above the supervisor's own -900.
pub fn oom_score_adj(priority: i64) -> i32 {
    500_i64
        .saturating_sub(priority.saturating_mul(100))
        .clamp(0, 1000) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn cfg() -> RestartConfig {
        RestartConfig {
            mode: RestartMode::OnFailure,
            backoff_initial: S(1),
            backoff_factor: 2.0,
            backoff_max: S(60),
            backoff_reset_after: S(600),
            start_limit_burst: 5,
            start_limit_interval: S(300),
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters_within_ten_percent() {
        let c = cfg();
        assert_eq!(backoff(&c, 1, 0.5), S(1));
        assert_eq!(backoff(&c, 2, 0.5), S(2));
        assert_eq!(backoff(&c, 4, 0.5), S(8));
        assert_eq!(backoff(&c, 10, 0.5), S(60), "capped");
        assert_eq!(backoff(&c, 10, 0.99), S(60), "jitter never exceeds the cap");
        assert_eq!(backoff(&c, 3, 0.0), Duration::from_secs_f64(3.6));
        let hi = backoff(&c, 3, 0.999_999);
        assert!(
            hi > Duration::from_secs_f64(4.39) && hi <= Duration::from_secs_f64(4.4),
            "{hi:?}"
        );
        let zero = RestartConfig {
            backoff_initial: Duration::ZERO,
            ..c
        };
        assert_eq!(backoff(&zero, 7, 0.3), Duration::ZERO);
    }

    #[test]
    fn classes() {
        let c = cfg();
        let mut st = RestartState::default();
        assert_eq!(
            decide(&c, &mut st, ExitClass::Stopped, None, S(0), 0.5),
            Decision::Stay
        );
        assert_eq!(
            decide(&c, &mut st, ExitClass::Clean, None, S(0), 0.5),
            Decision::Stay
        );
        assert!(matches!(
            decide(&c, &mut st, ExitClass::Permanent, None, S(0), 0.5),
            Decision::Fail(_)
        ));
        let always = RestartConfig {
            mode: RestartMode::Always,
            ..c
        };
        assert!(matches!(
            decide(&always, &mut st, ExitClass::Clean, None, S(0), 0.5),
            Decision::Restart { .. }
        ));
        let never = RestartConfig {
            mode: RestartMode::Never,
            ..c
        };
        assert!(matches!(
            decide(&never, &mut st, ExitClass::Failure, None, S(0), 0.5),
            Decision::Fail(_)
        ));
    }

    #[test]
    fn breaker_allows_exactly_the_burst() {
        let c = cfg();
        let mut st = RestartState::default();
        st.record_start(S(0)); // the first start
        let mut starts = 1;
        for i in 1..20u64 {
            match decide(&c, &mut st, ExitClass::Failure, None, S(i), 0.5) {
                Decision::Restart { .. } => {
                    st.record_start(S(i));
                    starts += 1;
                }
                Decision::Fail(reason) => {
                    assert!(reason.contains("crash loop"), "{reason}");
                    break;
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(starts, 5, "exactly start_limit_burst starts");
        // Outside the window the history no longer counts.
        assert!(st.may_start(&c, S(1000)));
    }

    #[test]
    fn precheck_refusals_are_not_starts_and_healthy_runs_reset_the_backoff() {
        let c = cfg();
        let mut st = RestartState::default();
        st.record_start(S(0));
        assert_eq!(
            decide(&c, &mut st, ExitClass::PrecheckRefused, None, S(1), 0.5),
            Decision::WaitForMemory
        );
        assert_eq!(st.starts_within(S(300), S(1)), 0);
        for _ in 0..3 {
            st.record_start(S(2));
            decide(&c, &mut st, ExitClass::Failure, None, S(2), 0.5);
        }
        assert_eq!(st.consecutive_failures, 3);
        st.record_start(S(3));
        let d = decide(&c, &mut st, ExitClass::Failure, Some(S(600)), S(700), 0.5);
        assert_eq!(
            d,
            Decision::Restart {
                delay: S(1),
                attempt: 1
            },
            "reset after a healthy run"
        );
    }

    #[test]
    fn oom_growth_and_scores() {
        const M: u64 = 1 << 20;
        assert_eq!(grown_limit(100 * M, 100 * M, 1000 * M), Some(125 * M));
        assert_eq!(
            grown_limit(100 * M, 100 * M, 110 * M),
            Some(110 * M),
            "capped"
        );
        assert_eq!(grown_limit(100 * M, 100 * M, 100 * M), None, "no room");
        assert_eq!(
            grown_limit(100 * M, 100 * M, 1000 * M + 5).map(|g| g % (64 << 10)),
            Some(0),
            "granule-aligned"
        );
        assert!(peak_reached_limit(96, 100) && !peak_reached_limit(90, 100));
        assert_eq!(oom_score_adj(0), 500);
        assert!(oom_score_adj(-1) > oom_score_adj(0) && oom_score_adj(0) > oom_score_adj(1));
        assert_eq!(oom_score_adj(100), 0);
        assert_eq!(oom_score_adj(-100), 1000);
        assert_eq!(oom_score_adj(i64::MIN), 1000, "no overflow");
        assert_eq!(oom_score_adj(i64::MIN + 1), 1000);
        assert_eq!(oom_score_adj(i64::MAX), 0);
    }

    #[test]
    fn backoff_never_panics_on_huge_durations_or_factors() {
        let c = RestartConfig {
            backoff_initial: Duration::MAX,
            backoff_factor: f64::MAX,
            backoff_max: Duration::MAX,
            ..cfg()
        };
        assert_eq!(backoff(&c, 1000, 0.99), Duration::MAX);
    }

    /// Starts that fail before ready, each slower than the breaker's window (a watchdog kill
    /// every few minutes), still fail the instance after `start_limit_burst` in a row; one
    /// run that reached ready starts the count again.
    #[test]
    fn starts_that_never_become_ready_fail_whatever_the_window() {
        let c = cfg();
        let mut st = RestartState::default();
        let mut t = 0;
        let mut attempts = 0;
        loop {
            st.record_start(S(t));
            attempts += 1;
            t += 1000; // longer than start_limit_interval
            match decide(&c, &mut st, ExitClass::Failure, None, S(t), 0.5) {
                Decision::Restart { .. } => assert!(attempts < 5, "{attempts}"),
                Decision::Fail(reason) => {
                    assert!(reason.contains("in a row never became ready"), "{reason}");
                    break;
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(attempts, 5);
        let mut st = RestartState::default();
        for _ in 0..4 {
            decide(&c, &mut st, ExitClass::Failure, None, S(t), 0.5);
            t += 1000;
        }
        decide(&c, &mut st, ExitClass::Failure, Some(S(1)), S(t), 0.5);
        assert_eq!(st.never_ready, 0, "a ready run resets the count");
        assert!(matches!(
            decide(&c, &mut st, ExitClass::Failure, None, S(t + 1000), 0.5),
            Decision::Restart { .. }
        ));
    }
}
