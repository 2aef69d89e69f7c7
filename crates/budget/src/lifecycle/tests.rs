//! One test per row of the transition table in docs/operations.md ("The lifecycle, transition
//! by transition"), named `row_N_...`.

use std::time::{Duration, Instant};

use super::*;
use crate::restart::RestartMode;

const MB: u64 = 1 << 20;
const S: fn(u64) -> Duration = Duration::from_secs;

/// A machine, a ledger the harness applies the machine's ledger actions to, and a clock.
struct H {
    m: Machine,
    ledger: Ledger,
    now: Instant,
    stopping: bool,
    cap: u64,
}

fn settings() -> Settings {
    Settings {
        restart: RestartConfig {
            mode: RestartMode::OnFailure,
            backoff_initial: S(1),
            backoff_factor: 2.0,
            backoff_max: S(60),
            backoff_reset_after: S(600),
            start_limit_burst: 5,
            start_limit_interval: S(300),
        },
        stop_timeout: S(10),
        heartbeat_interval: S(1),
        load_stall_timeout: S(30),
        gpu_layers: 0,
        swap_max: 0,
        on_demand: false,
    }
}

fn mem(available: u64) -> HostMemory {
    HostMemory {
        total: 16 * 1024 * MB,
        available,
    }
}

impl H {
    fn new() -> H {
        H::with(settings(), 1024 * MB)
    }

    fn with(settings: Settings, capacity: u64) -> H {
        let now = Instant::now();
        let r = Reservation {
            required: 100 * MB,
            estimate: 90 * MB,
            protected: 60 * MB,
        };
        H {
            m: Machine::new("a", settings, r, now),
            ledger: Ledger::new(capacity),
            now,
            stopping: false,
            cap: 512 * MB,
        }
    }

    fn step(&mut self, input: Input) -> Vec<Action> {
        let ctx = Ctx {
            ledger: &self.ledger,
            stopping: self.stopping,
            cap: self.cap,
            headroom: 0,
            jitter: 0.5,
        };
        let actions = self.m.step(input, self.now, &ctx);
        for a in &actions {
            match a {
                Action::Reserve(b) => self.ledger.allocate("a", *b).expect("reserve fits"),
                Action::Resize(b) => self.ledger.set("a", *b).expect("resize fits"),
                Action::Release => {
                    self.ledger
                        .release("a")
                        .expect("release of a held allocation");
                }
                _ => {}
            }
        }
        assert_eq!(
            self.ledger.get("a").is_some(),
            self.m.state.holds_allocation() && !actions.contains(&Action::Forget),
            "state {:?} and the ledger disagree after {actions:?}",
            self.m.state
        );
        actions
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Admitted, spawned, greeted and ready.
    fn ready(mut self) -> H {
        self.step(Input::Admit);
        self.step(Input::Spawned { pid: 42 });
        self.step(Input::Hello { valid: true });
        self.step(Input::Ready {
            load_ms: 5,
            turns: 0,
            restored_from: "none".into(),
        });
        assert_eq!(self.m.state, State::Ready);
        self
    }

    /// Admitted, spawned and greeted: loading.
    fn admitted(mut self) -> H {
        self.step(Input::Admit);
        self.step(Input::Spawned { pid: 42 });
        self.step(Input::Hello { valid: true });
        self
    }

    /// A due restart made at once: checked, spawned and greeted.
    fn restart_now(&mut self) {
        assert_eq!(self.step(Input::Timer), [Action::CheckRestart]);
        let a = self.step(Input::RestartCheck {
            memory: Ok(mem(1024 * MB)),
            critical: false,
            gpu_released: true,
        });
        assert!(has(&a, |x| matches!(x, Action::Spawn { .. })), "{a:?}");
        self.step(Input::Spawned { pid: 43 });
        self.step(Input::Hello { valid: true });
    }

    fn exit(&mut self, exit: Exit, oom_kill: u64, peak: Option<u64>) -> Vec<Action> {
        self.step(Input::Exited {
            exit,
            stats: Some(RunStats {
                limit: Some(self.m.reservation.required),
                peak,
                oom_kill,
            }),
        })
    }
}

fn logs(actions: &[Action]) -> Vec<Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(l.event),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], f: impl Fn(&Action) -> bool) -> bool {
    actions.iter().any(f)
}

#[test]
fn row_1_admit_reserves_and_spawns_with_the_limits() {
    let mut h = H::new();
    assert_eq!(h.m.state, State::Stopped);
    let a = h.step(Input::Admit);
    assert_eq!(a[0], Action::Reserve(100 * MB));
    let Action::Spawn { limits, gpu_layers } = a[1] else {
        panic!("{a:?}")
    };
    assert_eq!(gpu_layers, 0);
    assert_eq!(limits.max, 100 * MB);
    assert_eq!(
        limits.high,
        95 * MB,
        "95% of the reservation, above the estimate"
    );
    assert_eq!(limits.low, 60 * MB);
    assert_eq!(h.m.state, State::Starting);
    assert!(h.m.run.is_some());
}

#[test]
fn row_2_admit_refused_by_the_ledger_fails_and_tells_the_clients() {
    let mut h = H::with(settings(), 50 * MB);
    let a = h.step(Input::Admit);
    assert_eq!(h.m.state, State::Failed);
    assert!(h.m.reason.contains("only 50.0 MiB"), "{}", h.m.reason);
    assert_eq!(logs(&a), [Event::NotAdmitted]);
    assert!(has(&a, |x| matches!(
        x,
        Action::Reply(Reply::Waiters(Err(_)))
    )));
    assert!(!has(&a, |x| matches!(x, Action::Spawn { .. })));
}

#[test]
fn row_3_spawned_records_the_pid_and_logs() {
    let mut h = H::new();
    h.step(Input::Admit);
    let a = h.step(Input::Spawned { pid: 7 });
    assert_eq!(logs(&a), [Event::Spawned]);
    assert_eq!(h.m.run.as_ref().and_then(|r| r.pid), Some(7));
    // A second Spawned for the same run is ignored.
    assert!(h.step(Input::Spawned { pid: 8 }).is_empty());
}

#[test]
fn row_4_a_spawn_failure_is_retried_with_backoff_until_the_breaker() {
    let mut s = settings();
    s.restart.start_limit_burst = 2;
    let mut h = H::with(s, 1024 * MB);
    h.step(Input::Admit);
    // EMFILE and the like are temporary: backoff, the allocation kept, the waiters told.
    let a = h.step(Input::SpawnFailed("Too many open files".into()));
    assert_eq!(h.m.state, State::Backoff);
    assert!(h.m.run.is_none());
    assert!(!a.contains(&Action::Release), "kept while in backoff");
    assert_eq!(h.ledger.get("a"), Some(100 * MB));
    assert_eq!(logs(&a), [Event::RestartScheduled]);
    assert!(has(
        &a,
        |x| matches!(x, Action::Warn(w) if w.contains("Too many open files"))
    ));
    assert!(has(&a, |x| matches!(
        x,
        Action::Reply(Reply::Waiters(Err(e))) if e.contains("Too many open files")
    )));
    assert_eq!(h.m.last_exit.as_deref(), Some("spawn-failed"));
    assert!(
        h.m.reason.contains("could not be started"),
        "{}",
        h.m.reason
    );
    assert_eq!(h.m.next_deadline(), Some(h.now + S(1)));
    // The retry spawns again...
    h.advance(S(1));
    assert_eq!(h.step(Input::Timer), [Action::CheckRestart]);
    let a = h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert!(has(&a, |x| matches!(x, Action::Spawn { .. })));
    // ...and a spawn that keeps failing ends `failed` at the crash-loop breaker, released.
    let a = h.step(Input::SpawnFailed("no such file".into()));
    assert_eq!(h.m.state, State::Failed);
    assert!(h.m.reason.contains("crash loop"), "{}", h.m.reason);
    assert!(a.contains(&Action::Release));
    assert_eq!(logs(&a), [Event::Failed]);
    assert_eq!(h.m.next_deadline(), None);
}

#[test]
fn row_4_a_spawn_failure_with_restart_never_or_while_stopping_releases() {
    let mut s = settings();
    s.restart.mode = RestartMode::Never;
    let mut h = H::with(s, 1024 * MB);
    h.step(Input::Admit);
    let a = h.step(Input::SpawnFailed("no such file".into()));
    assert_eq!(h.m.state, State::Failed);
    assert!(a.contains(&Action::Release));
    assert_eq!(logs(&a), [Event::Failed]);

    let mut h = H::new();
    h.step(Input::Admit);
    h.stopping = true;
    let a = h.step(Input::SpawnFailed("no such file".into()));
    assert_eq!(h.m.state, State::Stopped);
    assert!(a.contains(&Action::Release));
    // A second answer for the same run changes nothing.
    assert!(h.step(Input::SpawnFailed("again".into())).is_empty());
}

#[test]
fn row_5_a_valid_hello_is_welcomed() {
    let mut h = H::new();
    h.step(Input::Admit);
    h.step(Input::Spawned { pid: 7 });
    assert_eq!(h.step(Input::Hello { valid: true }), [Action::Welcome]);
    assert!(h.m.run.as_ref().is_some_and(|r| r.greeted));
    // A second hello changes nothing.
    let a = h.step(Input::Hello { valid: true });
    assert!(matches!(a[..], [Action::Warn(_)]));
}

#[test]
fn row_6_a_bad_hello_kills_the_run() {
    let mut h = H::new();
    h.step(Input::Admit);
    let a = h.step(Input::Hello { valid: false });
    assert!(a.contains(&Action::Kill));
    assert!(h.m.run.as_ref().is_some_and(|r| !r.greeted));
}

#[test]
fn row_7_loading_moves_to_loading_and_logs_once() {
    let mut h = H::new();
    h.step(Input::Admit);
    h.step(Input::Spawned { pid: 7 });
    h.step(Input::Hello { valid: true });
    // Before the greeting nothing counts: here it is greeted.
    let a = h.step(Input::Loading(0.25));
    assert_eq!(logs(&a), [Event::Loading]);
    assert_eq!(h.m.state, State::Loading);
    assert_eq!(h.m.reason, "loading the model (25%)");
    h.advance(S(20));
    let a = h.step(Input::Loading(0.5));
    assert!(logs(&a).is_empty());
    assert_eq!(h.m.load_progress, 0.5);
    // Progress moved the load watchdog: 30 s from the last progress.
    assert_eq!(h.m.watchdog_deadline(), Some(h.now + S(30)));
}

#[test]
fn row_8_ready_answers_the_waiters() {
    let mut h = H::new();
    h.step(Input::Admit);
    h.step(Input::Spawned { pid: 7 });
    h.step(Input::Hello { valid: true });
    let a = h.step(Input::Ready {
        load_ms: 12,
        turns: 3,
        restored_from: "disk".into(),
    });
    assert_eq!(h.m.state, State::Ready);
    assert_eq!(a[0], Action::Reply(Reply::Waiters(Ok("a is ready".into()))));
    assert_eq!(logs(&a), [Event::Ready]);
    assert!(h.m.reason.contains("3 turns restored from disk"));
}

#[test]
fn row_9_ready_while_stopping_stays_stopping() {
    let mut h = H::new();
    h.step(Input::Admit);
    h.step(Input::Spawned { pid: 7 });
    h.step(Input::Hello { valid: true });
    h.step(Input::Stop(AfterStop::Remove));
    let a = h.step(Input::Ready {
        load_ms: 1,
        turns: 0,
        restored_from: "none".into(),
    });
    assert_eq!(h.m.state, State::Stopping);
    assert_eq!(logs(&a), [Event::Ready]);
}

#[test]
fn row_10_what_the_worker_said_names_a_permanent_exit() {
    let mut h = H::new().ready();
    assert!(
        h.step(Input::Said {
            reason: "not a GGUF file".into(),
            gpu_alloc: false
        })
        .is_empty()
    );
    h.exit(Exit::Code(65), 0, None);
    assert_eq!(h.m.state, State::Failed);
    assert!(
        h.m.reason.starts_with("exit 65: not a GGUF file"),
        "{}",
        h.m.reason
    );
}

#[test]
fn row_11_heartbeats_keep_the_watchdog_away() {
    let mut h = H::new().ready();
    assert_eq!(h.m.watchdog_deadline(), Some(h.now + S(3)));
    h.advance(S(2));
    h.step(Input::Heartbeat);
    assert_eq!(h.m.watchdog_deadline(), Some(h.now + S(3)));
}

#[test]
fn row_12_an_oom_is_logged_once_per_kill() {
    let mut h = H::new().ready();
    let stats = RunStats {
        limit: Some(100 * MB),
        peak: Some(100 * MB),
        oom_kill: 1,
    };
    let a = h.step(Input::Oom(stats));
    assert_eq!(logs(&a), [Event::OomKill]);
    assert!(h.step(Input::Oom(stats)).is_empty(), "the same kill again");
    // The exit that follows does not log it a second time.
    let a = h.exit(Exit::Signal(9), 1, Some(100 * MB));
    assert!(!logs(&a).contains(&Event::OomKill));
    assert_eq!(h.m.oom_kills, 1);
    assert_eq!(h.m.last_exit.as_deref(), Some("oom-kill"));
}

#[test]
fn row_13_an_exit_while_stopping_is_stopped() {
    let mut h = H::new().ready();
    let a = h.step(Input::Stop(AfterStop::Remove));
    assert_eq!(a, [Action::Shutdown]);
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.last_exit.as_deref(), Some("stopped"));
    assert!(a.contains(&Action::Release));
    assert_eq!(logs(&a), [Event::Exited, Event::Removed]);
    assert_eq!(a.last(), Some(&Action::Forget));
}

#[test]
fn row_14_a_crash_backs_off_and_schedules_a_restart() {
    let mut h = H::new().ready();
    let a = h.exit(Exit::Signal(11), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    assert_eq!(h.m.last_exit.as_deref(), Some("signal:11"));
    assert_eq!(logs(&a), [Event::Exited, Event::RestartScheduled]);
    assert!(has(&a, |x| matches!(x, Action::FailAsks(_))));
    assert!(
        !a.contains(&Action::Release),
        "backoff holds its allocation"
    );
    // jitter 0.5: exactly backoff_initial.
    assert_eq!(h.m.next_deadline(), Some(h.now + S(1)));
}

#[test]
fn row_15_an_oom_at_the_limit_grows_the_reservation() {
    let mut h = H::new().ready();
    let a = h.exit(Exit::Signal(9), 1, Some(100 * MB));
    assert_eq!(h.m.state, State::Backoff);
    assert_eq!(h.m.reservation.required, 125 * MB);
    assert!(a.contains(&Action::Resize(125 * MB)));
    assert_eq!(
        logs(&a),
        [
            Event::OomKill,
            Event::Exited,
            Event::LimitRaised,
            Event::RestartScheduled
        ]
    );
    assert!(
        h.m.reason
            .contains("limit raised from 100.0 MiB to 125.0 MiB")
    );
    assert_eq!(h.ledger.get("a"), Some(125 * MB));
}

#[test]
fn row_16_an_oom_with_the_budget_full_keeps_the_limit() {
    let mut h = H::with(settings(), 110 * MB).ready();
    let a = h.exit(Exit::Signal(9), 1, Some(100 * MB));
    assert_eq!(h.m.reservation.required, 100 * MB);
    assert!(!has(&a, |x| matches!(x, Action::Resize(_))));
    assert!(h.m.reason.contains("budget full"), "{}", h.m.reason);
    let mut h = H::new().ready();
    h.cap = 100 * MB;
    h.exit(Exit::Signal(9), 1, Some(100 * MB));
    assert!(
        h.m.reason.contains("per-instance cap reached"),
        "{}",
        h.m.reason
    );
}

#[test]
fn row_17_a_permanent_exit_fails_and_releases() {
    for code in [64, 65, 69, 76] {
        let mut h = H::new().ready();
        let a = h.exit(Exit::Code(code), 0, None);
        assert_eq!(h.m.state, State::Failed, "{code}");
        assert!(a.contains(&Action::Release));
        assert_eq!(logs(&a), [Event::Exited, Event::Failed]);
    }
}

#[test]
fn row_18_a_precheck_refusal_waits_for_memory_and_is_not_a_start() {
    let mut s = settings();
    s.restart.start_limit_burst = 1;
    let mut h = H::with(s, 1024 * MB);
    h.step(Input::Admit);
    let a = h.exit(Exit::Code(75), 0, None);
    assert_eq!(h.m.state, State::WaitingForMemory);
    assert_eq!(h.m.last_exit.as_deref(), Some("precheck-refused"));
    assert_eq!(logs(&a), [Event::Exited, Event::WaitingForMemory]);
    assert_eq!(h.m.next_deadline(), Some(h.now + MEMORY_RECHECK));
    // With a burst of 1 the refused start did not count: a start is still allowed.
    h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert_eq!(h.m.state, State::Starting);
}

#[test]
fn row_19_a_clean_exit_under_on_failure_stays_stopped() {
    let mut h = H::new().ready();
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.state, State::Stopped);
    assert!(a.contains(&Action::Release));
    assert_eq!(h.m.next_deadline(), None);
}

#[test]
fn row_20_the_crash_loop_breaker_fails_the_instance() {
    let mut s = settings();
    s.restart.start_limit_burst = 2;
    s.restart.backoff_initial = Duration::ZERO;
    let mut h = H::with(s, 1024 * MB);
    h.step(Input::Admit);
    h.exit(Exit::Code(1), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    h.step(Input::Timer);
    h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert_eq!(h.m.restarts, 1);
    let a = h.exit(Exit::Code(1), 0, None);
    assert_eq!(h.m.state, State::Failed);
    assert!(h.m.reason.contains("crash loop"), "{}", h.m.reason);
    assert!(a.contains(&Action::Release));
}

#[test]
fn row_21_an_exit_while_the_supervisor_stops_is_not_restarted() {
    let mut h = H::new().ready();
    h.stopping = true;
    let a = h.exit(Exit::Signal(11), 0, None);
    assert_eq!(h.m.state, State::Stopped);
    assert!(a.contains(&Action::Release));
}

#[test]
fn row_22_a_due_backoff_asks_for_a_restart_check() {
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    assert!(h.step(Input::Timer).is_empty(), "not due yet");
    h.advance(S(1));
    assert_eq!(h.step(Input::Timer), [Action::CheckRestart]);
    assert_eq!(h.m.next_deadline(), None);
}

#[test]
fn row_23_a_passing_restart_check_starts_again() {
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    h.advance(S(1));
    h.step(Input::Timer);
    let a = h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert!(matches!(a[..], [Action::Spawn { .. }]), "{a:?}");
    assert_eq!(h.m.state, State::Starting);
    assert_eq!(h.m.restarts, 1);
}

#[test]
fn row_24_a_refused_restart_check_waits_for_memory() {
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    let a = h.step(Input::RestartCheck {
        memory: Ok(mem(10 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert_eq!(h.m.state, State::WaitingForMemory);
    assert_eq!(logs(&a), [Event::WaitingForMemory]);
    assert_eq!(h.m.next_deadline(), Some(h.now + MEMORY_RECHECK));
    // Still short: no second event.
    let a = h.step(Input::RestartCheck {
        memory: Ok(mem(10 * MB)),
        critical: false,
        gpu_released: true,
    });
    assert!(logs(&a).is_empty());
}

#[test]
fn row_25_critical_pressure_holds_restarts() {
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: true,
        gpu_released: true,
    });
    assert_eq!(h.m.state, State::WaitingForMemory);
    assert!(h.m.reason.contains("critical"));
    assert_eq!(h.m.next_deadline(), Some(h.now + MEMORY_RECHECK));
}

#[test]
fn row_26_an_unreleased_gpu_run_delays_the_restart() {
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    let a = h.step(Input::RestartCheck {
        memory: Ok(mem(1024 * MB)),
        critical: false,
        gpu_released: false,
    });
    assert!(a.is_empty());
    assert_eq!(h.m.state, State::Backoff);
    assert_eq!(h.m.next_deadline(), Some(h.now + GPU_RELEASE_POLL));
}

#[test]
fn row_27_memory_freed_wakes_a_waiting_instance() {
    let mut h = H::new().ready();
    h.exit(Exit::Code(75), 0, None);
    assert_eq!(h.step(Input::MemoryFreed), [Action::CheckRestart]);
    // Not waiting: nothing.
    let mut h = H::new().ready();
    assert!(h.step(Input::MemoryFreed).is_empty());
}

#[test]
fn row_28_the_watchdog_kills_a_stalled_load_and_a_silent_worker() {
    let mut h = H::new();
    h.step(Input::Admit);
    h.step(Input::Spawned { pid: 7 });
    h.advance(S(30));
    let a = h.step(Input::Timer);
    assert_eq!(logs(&a), [Event::Watchdog]);
    assert!(a.contains(&Action::Kill));
    assert!(h.step(Input::Timer).is_empty(), "fires once per run");
    h.exit(Exit::Signal(9), 0, None);
    assert_eq!(h.m.last_exit.as_deref(), Some("watchdog"));
    assert_eq!(h.m.state, State::Backoff);

    let mut h = H::new().ready();
    h.advance(S(3));
    let a = h.step(Input::Timer);
    assert!(a.contains(&Action::Kill));
    assert!(matches!(&a[0], Action::Log(l) if l.message.starts_with("no heartbeat")));
}

#[test]
fn row_29_a_worker_that_does_not_stop_is_killed() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Restart));
    h.advance(S(10));
    let a = h.step(Input::Timer);
    assert!(a.contains(&Action::Kill));
    assert!(h.step(Input::Timer).is_empty());
}

#[test]
fn row_30_a_stop_sends_shutdown_once_and_arms_the_kill_timer() {
    let mut h = H::new().ready();
    assert_eq!(h.step(Input::Stop(AfterStop::Shed)), [Action::Shutdown]);
    assert_eq!(h.m.state, State::Stopping);
    assert_eq!(h.m.next_deadline(), Some(h.now + S(10)));
    h.advance(S(5));
    h.step(Input::Stop(AfterStop::Shed));
    assert_eq!(
        h.m.next_deadline(),
        Some(h.now + S(5)),
        "the first deadline stands"
    );
}

#[test]
fn row_31_removing_an_idle_instance_forgets_it() {
    let mut h = H::new().ready();
    h.exit(Exit::Code(0), 0, None);
    let a = h.step(Input::Stop(AfterStop::Remove));
    assert_eq!(logs(&a), [Event::Removed]);
    assert!(a.contains(&Action::Reply(Reply::Stopper(Ok("a removed".into())))));
    assert_eq!(a.last(), Some(&Action::Forget));
    // In backoff it holds memory: removing releases it.
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    let a = h.step(Input::Stop(AfterStop::Remove));
    assert_eq!(a[0], Action::Release);
    assert_eq!(h.m.next_deadline(), None);
}

#[test]
fn row_32_a_manual_restart_clears_the_history_and_starts() {
    let mut s = settings();
    s.restart.start_limit_burst = 1;
    let mut h = H::with(s, 1024 * MB).ready();
    h.exit(Exit::Code(1), 0, None);
    assert_eq!(h.m.state, State::Failed, "the breaker");
    let a = h.step(Input::Stop(AfterStop::Restart));
    assert_eq!(logs(&a), [Event::RestartRequested]);
    assert!(a.contains(&Action::Reply(Reply::StopperWaits)));
    assert!(a.contains(&Action::Reserve(100 * MB)));
    assert_eq!(h.m.state, State::Starting);
    assert_eq!(h.m.restarts, 1);
}

#[test]
fn row_33_a_shed_instance_gives_its_memory_back() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Shed));
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.state, State::Shed);
    assert_eq!(logs(&a), [Event::Exited, Event::Shed]);
    assert_eq!(h.ledger.get("a"), None);
}

#[test]
fn row_34_a_relaunch_keeps_the_history() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Relaunch));
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.state, State::Starting);
    assert_eq!(h.m.restarts, 1);
    assert!(a.contains(&Action::Release) && a.contains(&Action::Reserve(100 * MB)));
}

#[test]
fn row_35_shutdown_stops_runs_and_releases_idle_holders() {
    let mut h = H::new().ready();
    assert_eq!(h.step(Input::Shutdown), [Action::Shutdown]);
    assert_eq!(h.m.state, State::Stopping);
    let mut h = H::new().ready();
    h.exit(Exit::Signal(11), 0, None);
    h.stopping = true;
    assert_eq!(h.step(Input::Shutdown), [Action::Release]);
    assert_eq!(h.m.state, State::Stopped);
    assert_eq!(h.m.next_deadline(), None);
}

#[test]
fn row_36_a_shed_instance_comes_back_when_memory_does() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Shed));
    h.exit(Exit::Code(0), 0, None);
    assert!(
        h.step(Input::Restore {
            memory: mem(10 * MB)
        })
        .is_empty()
    );
    let a = h.step(Input::Restore {
        memory: mem(1024 * MB),
    });
    assert_eq!(logs(&a), [Event::Restored]);
    assert_eq!(h.m.state, State::Starting);
}

#[test]
fn row_37_gpu_fallback_relaunches_on_the_cpu() {
    let mut s = settings();
    s.gpu_layers = 20;
    let mut h = H::with(s, 1024 * MB).ready();
    let a = h.step(Input::GpuFallback {
        message: "GPU 0 emergency".into(),
        memory: Some(mem(10 * MB)),
    });
    assert!(matches!(a[..], [Action::Warn(_)]), "no host memory: stays");
    let a = h.step(Input::GpuFallback {
        message: "GPU 0 emergency".into(),
        memory: None,
    });
    assert_eq!(logs(&a), [Event::GpuFallback]);
    assert_eq!(h.m.state, State::Stopping);
    let a = h.exit(Exit::Code(0), 0, None);
    assert!(a.contains(&Action::Spawn {
        limits: h.m.limits(),
        gpu_layers: 0
    }));
}

#[test]
fn row_38_gpu_restore_relaunches_on_the_gpu() {
    let mut s = settings();
    s.gpu_layers = 20;
    let mut h = H::with(s, 1024 * MB).ready();
    h.m.gpu.fallback = Fallback::Pressure;
    let a = h.step(Input::GpuRestore {
        message: "GPU 0 below restore".into(),
    });
    assert_eq!(logs(&a), [Event::GpuRestored]);
    let a = h.exit(Exit::Code(0), 0, None);
    assert!(has(&a, |x| matches!(
        x,
        Action::Spawn { gpu_layers: 20, .. }
    )));
}

#[test]
fn row_39_three_gpu_allocation_failures_fall_back_to_the_cpu() {
    let mut s = settings();
    s.gpu_layers = 20;
    s.restart.backoff_initial = Duration::ZERO;
    let mut h = H::with(s, 1024 * MB);
    h.step(Input::Admit);
    for n in 1..=3 {
        let a = h.exit(Exit::Code(71), 0, None);
        assert_eq!(h.m.last_exit.as_deref(), Some("gpu-alloc"));
        assert_eq!(logs(&a).contains(&Event::GpuFallback), n == 3, "{n}");
        h.step(Input::Timer);
        let a = h.step(Input::RestartCheck {
            memory: Ok(mem(1024 * MB)),
            critical: false,
            gpu_released: true,
        });
        let layers = if n == 3 { 0 } else { 20 };
        assert!(has(
            &a,
            |x| matches!(x, Action::Spawn { gpu_layers, .. } if *gpu_layers == layers)
        ));
    }
}

#[test]
fn row_40_a_pending_restart_is_refused_when_the_supervisor_stops() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Restart));
    h.stopping = true;
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.state, State::Stopped);
    assert!(a.contains(&Action::Reply(Reply::Stopper(Err(
        "the supervisor is shutting down".into()
    )))));
}

#[test]
fn row_41_a_stop_drops_a_pending_spawn() {
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Restart));
    // The restart's spawn waits (the interpreter has not answered it yet).
    let a = h.exit(Exit::Code(0), 0, None);
    assert!(has(&a, |x| matches!(x, Action::Spawn { .. })));
    assert!(h.m.run.as_ref().is_some_and(|r| r.pid.is_none()));
    assert_eq!(
        h.m.watchdog_deadline(),
        None,
        "nothing to watch before the process exists"
    );
    let a = h.step(Input::Stop(AfterStop::Remove));
    assert!(h.m.run.is_none());
    assert!(!a.contains(&Action::Shutdown));
    assert_eq!(a.last(), Some(&Action::Forget));
    // A late answer to the dropped spawn is ignored.
    assert!(h.step(Input::Spawned { pid: 9 }).is_empty());
}

#[test]
fn row_42_a_stop_signal_from_outside_is_a_clean_stop() {
    let mut h = H::new().ready();
    let a = h.exit(Exit::Signal(15), 0, None);
    assert_eq!(h.m.state, State::Stopped);
    assert_eq!(h.m.last_exit.as_deref(), Some("external-stop:SIGTERM"));
    assert!(
        h.m.reason.contains("from outside the supervisor"),
        "{}",
        h.m.reason
    );
    assert!(a.contains(&Action::Release));
    let mut always = settings();
    always.restart.mode = RestartMode::Always;
    let mut h = H::with(always, 1024 * MB).ready();
    h.exit(Exit::Signal(1), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    assert_eq!(h.m.last_exit.as_deref(), Some("external-stop:SIGHUP"));
    // A SIGKILL from outside (no OOM, no watchdog) stays a failure, as systemd counts it.
    let mut h = H::new().ready();
    h.exit(Exit::Signal(9), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    assert_eq!(h.m.last_exit.as_deref(), Some("signal:9"));
}

#[test]
fn row_43_starts_in_a_row_that_never_become_ready_fail_however_slow() {
    let mut h = H::new().admitted();
    for attempt in 1..=5 {
        // Each start loads for longer than start_limit_interval, then the watchdog kills it.
        h.now += S(400);
        let a = h.step(Input::Timer);
        assert!(a.contains(&Action::Kill), "attempt {attempt}: {a:?}");
        h.exit(Exit::Signal(9), 0, None);
        assert_eq!(h.m.last_exit.as_deref(), Some("watchdog"));
        if attempt < 5 {
            assert_eq!(h.m.state, State::Backoff, "attempt {attempt}");
            h.now += S(60);
            h.restart_now();
        }
    }
    assert_eq!(h.m.state, State::Failed);
    assert!(
        h.m.reason.contains("in a row never became ready"),
        "{}",
        h.m.reason
    );
}

#[test]
fn row_44_an_impossible_load_fraction_is_ignored() {
    let mut h = H::new().admitted();
    h.step(Input::Loading(0.25));
    for bad in [f32::INFINITY, f32::NAN, 2.0, -1.0] {
        let a = h.step(Input::Loading(bad));
        assert!(matches!(a.as_slice(), [Action::Warn(_)]), "{a:?}");
        assert_eq!(h.m.load_progress, 0.25);
    }
}

/// Durations far beyond the config's bounds never panic in the machine's time arithmetic
/// (`Instant + Duration` and `heartbeat_interval x 3` used to): deadlines saturate.
#[test]
fn time_arithmetic_never_panics_on_huge_durations() {
    let mut s = settings();
    s.stop_timeout = Duration::MAX;
    s.heartbeat_interval = Duration::MAX;
    s.load_stall_timeout = Duration::MAX;
    s.restart.backoff_initial = Duration::MAX;
    s.restart.backoff_max = Duration::MAX;
    let mut h = H::with(s, 1024 * MB).admitted();
    assert!(h.m.next_deadline().is_some_and(|d| d > h.now));
    h.step(Input::Ready {
        load_ms: 1,
        turns: 0,
        restored_from: "new".into(),
    });
    assert!(h.m.next_deadline().is_some_and(|d| d > h.now));
    h.exit(Exit::Signal(11), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    assert!(h.m.next_deadline().is_some_and(|d| d > h.now));
    let mut h = H::with(s, 1024 * MB).ready();
    h.step(Input::Stop(AfterStop::Remove));
    assert!(h.m.next_deadline().is_some_and(|d| d > h.now));
}

// ---- on demand ([swap]) ----

fn on_demand() -> H {
    let mut s = settings();
    s.on_demand = true;
    H::with(s, 1024 * MB)
}

/// An on-demand instance loaded on demand, greeted and ready.
fn loaded() -> H {
    let mut h = on_demand();
    h.step(Input::Load);
    h.step(Input::Spawned { pid: 42 });
    h.step(Input::Hello { valid: true });
    h.step(Input::Ready {
        load_ms: 5,
        turns: 0,
        restored_from: "none".into(),
    });
    h
}

#[test]
fn row_45_an_on_demand_instance_starts_unloaded_holding_nothing() {
    let h = on_demand();
    assert_eq!(h.m.state, State::Unloaded);
    assert!(!h.m.state.holds_allocation());
    assert_eq!(h.m.state.as_str(), "unloaded");
    assert_eq!(h.m.next_deadline(), None);
    assert_eq!(h.ledger.get("a"), None);
}

#[test]
fn row_46_a_load_reserves_spawns_counts_and_says_loaded_on_demand_when_ready() {
    let mut h = on_demand();
    let a = h.step(Input::Load);
    assert_eq!(a[0], Action::Reserve(100 * MB));
    assert!(has(&a, |x| matches!(x, Action::Spawn { .. })));
    assert_eq!((h.m.state, h.m.loads), (State::Starting, 1));
    h.step(Input::Spawned { pid: 42 });
    h.step(Input::Hello { valid: true });
    let a = h.step(Input::Ready {
        load_ms: 5,
        turns: 0,
        restored_from: "none".into(),
    });
    assert_eq!(logs(&a), [Event::Ready, Event::LoadedOnDemand]);
    // A second Load of a loaded instance changes nothing.
    assert!(h.step(Input::Load).is_empty());
    assert_eq!(h.m.loads, 1);
}

#[test]
fn row_47_a_load_the_ledger_refuses_stays_unloaded() {
    let mut s = settings();
    s.on_demand = true;
    let mut h = H::with(s, 50 * MB);
    let a = h.step(Input::Load);
    assert!(matches!(a.as_slice(), [Action::Warn(_)]), "{a:?}");
    assert_eq!((h.m.state, h.m.loads), (State::Unloaded, 0));
    // An `always` instance ignores Load (it is admitted instead).
    let mut h = H::new();
    assert!(h.step(Input::Load).is_empty());
}

#[test]
fn row_48_an_eviction_stops_then_unloads_counting_and_naming_who_needed_the_room() {
    let mut h = loaded();
    let a = h.step(Input::Evict { by: "big".into() });
    assert_eq!(a, [Action::Shutdown]);
    assert_eq!(h.m.state, State::Stopping);
    let a = h.exit(Exit::Code(0), 0, None);
    assert!(a.contains(&Action::Release));
    assert_eq!(logs(&a), [Event::Exited, Event::Evicted]);
    let msg = a.iter().find_map(|x| match x {
        Action::Log(l) if l.event == Event::Evicted => Some(l.message.clone()),
        _ => None,
    });
    assert_eq!(msg.as_deref(), Some("evicted to make room for big"));
    assert_eq!((h.m.state, h.m.evictions), (State::Unloaded, 1));
    // The next load is counted again.
    h.step(Input::Load);
    assert_eq!(h.m.loads, 2);
}

#[test]
fn row_49_only_on_demand_instances_holding_memory_are_evicted() {
    let mut h = H::new().ready();
    assert!(h.step(Input::Evict { by: "b".into() }).is_empty());
    assert_eq!(h.m.state, State::Ready);
    let mut h = on_demand();
    assert!(h.step(Input::Evict { by: "b".into() }).is_empty());
    assert_eq!((h.m.state, h.m.evictions), (State::Unloaded, 0));
}

#[test]
fn row_50_idle_and_requested_unloads() {
    let mut h = loaded();
    h.step(Input::Stop(AfterStop::Unload(Unload::Idle)));
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(logs(&a), [Event::Exited, Event::IdleUnloaded]);
    assert_eq!((h.m.state, h.m.evictions), (State::Unloaded, 0));
    // `unload` of an always instance stops it until `load`, and answers the client.
    let mut h = H::new().ready();
    h.step(Input::Stop(AfterStop::Unload(Unload::Requested)));
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(logs(&a), [Event::Exited, Event::Unloaded]);
    assert_eq!(h.m.state, State::Stopped);
    assert!(h.m.reason.contains("supervisor load a"), "{}", h.m.reason);
    assert!(a.contains(&Action::Reply(Reply::Stopper(Ok("a unloaded".into())))));
    // An instance with no worker (backing off) unloads at once.
    let mut h = loaded();
    h.exit(Exit::Signal(11), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    let a = h.step(Input::Stop(AfterStop::Unload(Unload::Requested)));
    assert!(a.contains(&Action::Release));
    assert_eq!((h.m.state, h.m.next_deadline()), (State::Unloaded, None));
}

#[test]
fn row_51_shedding_an_on_demand_instance_unloads_it_and_restore_leaves_it() {
    let mut h = loaded();
    h.step(Input::Stop(AfterStop::Shed));
    let a = h.exit(Exit::Code(0), 0, None);
    assert_eq!(logs(&a), [Event::Exited, Event::Shed]);
    assert_eq!(h.m.state, State::Unloaded);
    assert!(
        h.step(Input::Restore {
            memory: mem(1024 * MB)
        })
        .is_empty()
    );
    assert_eq!(h.m.state, State::Unloaded);
}

#[test]
fn row_52_an_on_demand_worker_that_exits_cleanly_is_unloaded() {
    let mut h = loaded();
    h.exit(Exit::Code(0), 0, None);
    assert_eq!(h.m.state, State::Unloaded);
    assert_eq!(h.ledger.get("a"), None);
    // A crash still backs off and restarts: the instance was wanted.
    let mut h = loaded();
    h.exit(Exit::Signal(11), 0, None);
    assert_eq!(h.m.state, State::Backoff);
    h.advance(S(2));
    h.restart_now();
    assert_eq!((h.m.loads, h.m.restarts), (1, 1));
}

#[test]
fn row_53_restarting_an_on_demand_instance_wants_a_load() {
    let mut h = loaded();
    h.step(Input::Stop(AfterStop::Restart));
    let a = h.exit(Exit::Code(0), 0, None);
    assert!(a.contains(&Action::Reply(Reply::StopperWaits)));
    assert_eq!(a.last(), Some(&Action::WantLoad));
    assert_eq!(h.m.state, State::Unloaded);
    assert_eq!(h.ledger.get("a"), None);
}
