//! The loop's side of the lifecycle: which instance an OOM notification, a timer or freed
//! memory concerns, and the supervisor-wide stop. What each of them means for an instance is
//! decided by its `belljar_budget::lifecycle::Machine` (through `Daemon::drive`).

use std::time::{Duration, Instant};

use belljar_budget::lifecycle::{Input, RunStats};

use super::instance::State;
use super::{Daemon, clock};

impl Daemon {
    /// The thrash detector's monotonic clock.
    pub(super) fn now(&self) -> Duration {
        clock().saturating_duration_since(self.epoch)
    }

    /// The kernel's OOM counter of a running instance may have moved: the lifecycle logs the
    /// kill now; the exit is classified when the worker is reaped.
    pub(super) fn on_oom_event(&mut self, name: &str, generation: u64) {
        let Some(link) = self.instances.get(name).and_then(|i| i.link.as_ref()) else {
            return;
        };
        if link.generation != generation || link.exited {
            return;
        }
        let Ok(s) = self.cfg.cgroups.memory(&link.cgroup) else {
            return;
        };
        let stats = RunStats {
            limit: s.limit,
            peak: s.peak,
            oom_kill: s.oom_kill,
        };
        self.drive(name, Input::Oom(stats));
    }

    /// Memory was released: instances waiting for it look again (highest priority first).
    pub(super) fn retry_waiting(&mut self) {
        if self.stopping {
            return;
        }
        let mut waiting: Vec<(i64, String)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.state() == State::WaitingForMemory && i.machine.run.is_none())
            .map(|(n, i)| (i.spec.priority, n.clone()))
            .collect();
        waiting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, name) in waiting {
            self.drive(&name, Input::MemoryFreed);
        }
    }

    pub(super) fn begin_stop(&mut self) {
        tracing::info!("stopping: sending Shutdown to every worker");
        self.stopping = true;
        self.notify_stopping();
        let names: Vec<String> = self.instances.keys().cloned().collect();
        for name in names {
            self.drive(&name, Input::Shutdown);
        }
    }

    /// The earliest timer of any instance, or of the loop.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        // Fixed times, not "now + interval": events arriving all the time must not push them.
        self.instances
            .values()
            .filter_map(|i| i.machine.next_deadline())
            .chain(
                self.instances
                    .values()
                    .filter_map(|i| i.queue.next_expiry()),
            )
            .chain(self.pressure_at)
            .chain(self.watchdog_at)
            .chain(self.swap_deadline())
            .min()
    }

    /// Timers that came due: each instance's (stop timeout, backoff, watchdog, memory
    /// re-check), the systemd watchdog and the pressure guard.
    pub(super) fn deadlines(&mut self) {
        let now = clock();
        let due: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| i.machine.next_deadline().is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.drive(&name, Input::Timer);
        }
        if self
            .instances
            .values()
            .any(|i| i.queue.next_expiry().is_some_and(|t| t <= now))
        {
            self.expire_requests();
        }
        if self.watchdog_at.is_some_and(|t| t <= now) {
            self.notify_watchdog();
        }
        if self.pressure_at.is_some_and(|t| t <= now) && !self.stopping {
            self.pressure_tick();
        }
        if self.swap_deadline().is_some_and(|t| t <= now) && !self.stopping {
            self.swap_timers();
        }
    }
}
