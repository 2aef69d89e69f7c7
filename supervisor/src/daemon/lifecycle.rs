//! What happens after a worker exits, and on timers: exact exit classification (the wait status
//! combined with the cgroup's OOM counter and the watchdog's own record), the restart policy of
//! crates/budget, OOM-aware limits, waiting for memory, the watchdog and stop timeouts.

use std::time::{Duration, Instant};

use belljar_budget::restart::{Decision, ExitClass, decide, grown_limit, peak_reached_limit};
use belljar_budget::{Size, precheck};
use belljar_host::cgroup;
use belljar_host::proc_ctl::Exit;
use belljar_protocol::exit::{ExitKind, kind as exit_kind};

use super::events::{Entry, Event};
use super::instance::{GpuRelease, Instance, State, Worker};

use super::{Daemon, refused};

/// How often a restart waiting for a GPU release looks again.
const GPU_RELEASE_POLL: Duration = Duration::from_millis(250);
/// How often instances waiting for memory are re-checked (also whenever memory is released).
const MEMORY_RECHECK: Duration = Duration::from_secs(1);

impl Daemon {
    /// The restart policy's monotonic clock.
    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Classifies a worker's exit exactly once and applies the restart policy. Runs once the
    /// run's cgroup is gone (`stats` are its counters, read when the exit was reaped).
    pub(super) fn on_exit(
        &mut self,
        name: &str,
        pid: u32,
        exit: Exit,
        stats: Option<cgroup::MemoryStats>,
    ) {
        let now = self.now();
        let cap = self
            .cfg
            .config
            .budget_policy()
            .per_instance_cap(self.ledger.capacity());
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let Some(worker) = inst.worker.take_if(|w| w.pid == pid) else {
            return;
        };
        let limit = stats.and_then(|s| s.limit).unwrap_or(inst.required);
        inst.last_peak = stats.and_then(|s| s.peak);
        // Learned corrections: a run that got as far as serving records its peak.
        if let (Some(peak), Some(model), true) = (
            inst.last_peak,
            inst.identity.clone(),
            inst.ready_since.is_some(),
        ) {
            let obs = crate::learn::Observation {
                model,
                ctx: inst.spec.ctx,
                mmap: inst.spec.use_mmap,
                estimate: inst.estimate,
                peak,
            };
            self.learn.record(obs);
        }
        let oom = stats.is_some_and(|s| s.oom_kill > 0) && exit == Exit::Signal(9);
        // Logged once per kill: by the OOM watch when it came first, else here.
        if let Some(st) = stats.filter(|s| s.oom_kill > worker.oom_seen) {
            log_oom(name, inst, &worker, &st);
        }
        let said = inst.worker_said.take();
        let (class, last_exit, what) = match exit {
            _ if inst.state == State::Stopping => (
                ExitClass::Stopped,
                "stopped".to_owned(),
                "stopped by the supervisor".to_owned(),
            ),
            _ if inst.watchdog_fired => (
                ExitClass::Failure,
                "watchdog".to_owned(),
                "killed by the watchdog".to_owned(),
            ),
            Exit::Signal(9) if oom => (
                ExitClass::Failure,
                "oom-kill".to_owned(),
                format!("OOM-killed at limit {}", Size(limit)),
            ),
            Exit::Signal(s) => (
                ExitClass::Failure,
                format!("signal:{s}"),
                format!("killed by signal {s}"),
            ),
            Exit::Code(c) => match exit_kind(c) {
                ExitKind::Clean => (
                    ExitClass::Clean,
                    format!("exit:{c}"),
                    "exited cleanly".to_owned(),
                ),
                ExitKind::Temporary => (
                    ExitClass::PrecheckRefused,
                    "precheck-refused".to_owned(),
                    said.clone()
                        .unwrap_or_else(|| "the pre-load memory check refused".into()),
                ),
                ExitKind::GpuAlloc => (
                    ExitClass::Failure,
                    "gpu-alloc".to_owned(),
                    said.clone()
                        .unwrap_or_else(|| "GPU memory allocation failed".into()),
                ),
                ExitKind::Permanent => (
                    ExitClass::Permanent,
                    format!("exit:{c}"),
                    said.clone()
                        .map_or_else(|| format!("exit {c}"), |s| format!("exit {c}: {s}")),
                ),
                ExitKind::Failure => (
                    ExitClass::Failure,
                    format!("exit:{c}"),
                    format!("exited with code {c}"),
                ),
            },
        };
        if oom {
            inst.oom_kills += 1;
        }
        // GPU: count allocation failures (3 move it to the CPU for good) and wait for NVML to
        // show the run's VRAM released before it counts as free.
        let gpu_failed = std::mem::take(&mut inst.gpu_alloc_failed)
            || matches!(exit, Exit::Code(c) if exit_kind(c) == ExitKind::GpuAlloc);
        if gpu_failed && inst.gpu.alloc_failed() {
            Entry::of(Event::GpuFallback, name, inst).log(format_args!(
                "{} GPU allocation failures: running on the CPU until `supervisor restart {name}`",
                inst.gpu.failures
            ));
        }
        inst.gpu_memory = None;
        let pids = std::mem::take(&mut inst.gpu_pids);
        if !pids.is_empty() {
            inst.gpu_release = GpuRelease::Pending {
                pids,
                since: Instant::now(),
            };
        }
        inst.last_exit = Some(last_exit.clone());
        Entry::of(Event::Exited, name, inst)
            .worker(worker.pid, &worker.cgroup)
            .exit_reason(Some(&last_exit))
            .log(format_args!("{what}"));
        inst.stop_deadline = None;
        for w in inst.waiters.drain(..) {
            let _ = w.send(refused(format!("{name} did not become ready: {what}")));
        }
        let healthy_for = inst.ready_since.map_or(Duration::ZERO, |t| t.elapsed());
        let cfg = inst.restart_config();
        let decision = if self.stopping {
            Decision::Stay
        } else {
            decide(
                &cfg,
                &mut inst.restart_state,
                class,
                healthy_for,
                now,
                fastrand::f64(),
            )
        };

        // OOM-aware: a run that died at its limit gets a larger one when the budget allows.
        let mut note = String::new();
        if oom && matches!(decision, Decision::Restart { .. }) {
            let peak = inst.last_peak.unwrap_or(limit);
            if peak_reached_limit(peak, limit) {
                let old = inst.required;
                match grown_limit(old, peak, cap) {
                    Some(grown) => {
                        self.ledger.release(name);
                        if self.ledger.allocate(name, grown).is_ok() {
                            inst.required = grown;
                            note = format!("; limit raised from {} to {}", Size(old), Size(grown));
                            Entry::of(Event::LimitRaised, name, inst).log(format_args!(
                                "OOM at the limit: raising the limit from {} to {}",
                                Size(old),
                                Size(grown)
                            ));
                        } else {
                            let _ = self.ledger.allocate(name, old);
                            note = format!("; OOM at limit {}; budget full", Size(old));
                        }
                    }
                    None => {
                        note = format!("; OOM at limit {}; per-instance cap reached", Size(old))
                    }
                }
            }
        }

        match decision {
            Decision::Stay => inst.set(State::Stopped, format!("the worker {what}")),
            Decision::Fail(reason) => {
                inst.set(State::Failed, format!("{what}: {reason}"));
                Entry::of(Event::Failed, name, inst)
                    .exit_reason(Some(&last_exit))
                    .log(format_args!("failed: {reason}"));
            }
            Decision::WaitForMemory => {
                inst.set(
                    State::WaitingForMemory,
                    format!("waiting for memory: {what}"),
                );
                Entry::of(Event::WaitingForMemory, name, inst)
                    .exit_reason(Some(&last_exit))
                    .log(format_args!("waiting for memory before restarting: {what}"));
            }
            Decision::Restart { delay, attempt } => {
                Entry::of(Event::RestartScheduled, name, inst)
                    .exit_reason(Some(&last_exit))
                    .restart(attempt, delay)
                    .log(format_args!(
                        "restart {attempt} in {} ms after {last_exit}",
                        delay.as_millis()
                    ));
                inst.restart_at = Some(Instant::now() + delay);
                inst.set(
                    State::Backoff,
                    format!(
                        "{what}; restarting in {:.1}s (attempt {attempt}){note}",
                        delay.as_secs_f64()
                    ),
                );
            }
        }
        let state = inst.state;
        if !state.holds_allocation() {
            self.ledger.release(name);
        }
        let orphaned: Vec<u64> = self
            .asks
            .iter()
            .filter(|(_, (n, _))| n == name)
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            if let Some((_, client)) = self.asks.remove(&id) {
                let _ = client.send(refused(format!("{name} stopped before answering")));
            }
        }
        if let Some((after, client)) = self
            .instances
            .get_mut(name)
            .and_then(|i| i.after_stop.take())
        {
            self.after_stop(name, after, client);
        }
        if !state.holds_allocation() {
            self.retry_waiting();
        }
    }

    /// The kernel's OOM counter of a running instance may have moved: log the kill now; the
    /// exit is classified when the worker is reaped (the counter and the wait status together).
    pub(super) fn on_oom_event(&mut self, name: &str, generation: u64) {
        let Some(w) = self.instances.get_mut(name).and_then(|i| i.worker.as_mut()) else {
            return;
        };
        if w.generation != generation {
            return;
        }
        let Ok(stats) = self.cfg.cgroups.memory(&w.cgroup) else {
            return;
        };
        if stats.oom_kill > w.oom_seen {
            let inst = &self.instances[name];
            let Some(w) = &inst.worker else { return };
            log_oom(name, inst, w, &stats);
            if let Some(w) = self.instances.get_mut(name).and_then(|i| i.worker.as_mut()) {
                w.oom_seen = stats.oom_kill;
            }
        }
    }

    /// Starts an instance that waited (backoff over, or memory back) if layer 3 passes now;
    /// otherwise it waits for memory.
    fn try_restart(&mut self, name: &str) {
        let now = self.now();
        let reading = self.effective_memory();
        let critical = self.level >= belljar_budget::pressure::Level::Critical;
        let Some(mut inst) = self.instances.remove(name) else {
            return;
        };
        inst.restart_at = None;
        // A GPU run's VRAM must be confirmed released before the next one counts on it.
        if matches!(inst.gpu_release, GpuRelease::Pending { .. }) {
            let readings = self.read_gpus().unwrap_or_default();
            if !self.settle_release(name, &mut inst, &readings) {
                inst.restart_at = Some(Instant::now() + GPU_RELEASE_POLL);
                inst.reason = "waiting for NVML to confirm the last run's VRAM is released".into();
                self.instances.insert(name.to_owned(), inst);
                return;
            }
        }
        let check = reading.map(|(r, _)| precheck(inst.required, self.cfg.headroom, r));
        match check {
            Ok(_) if critical => {
                inst.set(
                    State::WaitingForMemory,
                    "memory pressure is critical: nothing new starts until it eases",
                );
            }
            Ok(c) if c.ok => {
                inst.restart_state.record_start(now);
                inst.restarts += 1;
                self.start(&mut inst);
            }
            Ok(c) => {
                if inst.state != State::WaitingForMemory {
                    Entry::of(Event::WaitingForMemory, name, &inst)
                        .log(format_args!("{}", c.summary()));
                }
                inst.set(State::WaitingForMemory, c.summary());
            }
            Err(e) => inst.set(
                State::WaitingForMemory,
                format!("cannot read host memory: {e}"),
            ),
        }
        if inst.state == State::WaitingForMemory {
            self.memory_recheck_at
                .get_or_insert_with(|| Instant::now() + MEMORY_RECHECK);
        }
        self.instances.insert(name.to_owned(), inst);
    }

    /// Memory was released: instances waiting for it try again (highest priority first).
    pub(super) fn retry_waiting(&mut self) {
        let mut waiting: Vec<(i64, String)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.state == State::WaitingForMemory && i.worker.is_none())
            .map(|(n, i)| (i.spec.priority, n.clone()))
            .collect();
        waiting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, name) in waiting {
            self.try_restart(&name);
        }
    }

    pub(super) fn begin_stop(&mut self) {
        tracing::info!("stopping: sending Shutdown to every worker");
        self.stopping = true;
        self.notify_stopping();
        let names: Vec<String> = self.instances.keys().cloned().collect();
        for name in names {
            if !self.stop(&name) {
                if let Some(i) = self
                    .instances
                    .get_mut(&name)
                    .filter(|i| i.state.holds_allocation())
                {
                    i.restart_at = None;
                    i.set(State::Stopped, "stopped by the supervisor");
                    self.ledger.release(&name);
                }
            }
        }
    }

    /// The earliest timer of any instance.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        // A fixed time, not "now + interval": events arriving all the time must not push it away.
        let waiting = self.memory_recheck_at;
        self.instances
            .values()
            .flat_map(|i| [i.stop_deadline, i.restart_at, i.watchdog_deadline()])
            .flatten()
            .chain(waiting)
            .chain(self.pressure_at)
            .chain(self.watchdog_at)
            .min()
    }

    /// Timers that came due: stop timeouts, backoffs, the watchdog, memory re-checks.
    pub(super) fn deadlines(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.instances.keys().cloned().collect();
        for name in &names {
            let Some(inst) = self.instances.get_mut(name) else {
                continue;
            };
            if inst.stop_deadline.is_some_and(|d| d <= now) {
                inst.stop_deadline = None;
                if let Some(w) = &inst.worker {
                    tracing::warn!(instance = %name, "did not stop within {}; killing its cgroup", inst.spec.stop_timeout);
                    if let Err(e) = self.cfg.cgroups.kill_all(&w.cgroup) {
                        tracing::error!(instance = %name, "cannot kill: {e}");
                    }
                }
            }
            if inst.watchdog_deadline().is_some_and(|d| d <= now) {
                inst.watchdog_fired = true;
                if let Some(w) = &inst.worker {
                    let why = if inst.state == State::Ready {
                        "no heartbeat for 3 intervals"
                    } else {
                        "no load progress"
                    };
                    Entry::of(Event::Watchdog, name, inst)
                        .log(format_args!("{why}: killing its cgroup"));
                    // Through the cgroup, never a bare pid that may have been recycled.
                    if let Err(e) = self.cfg.cgroups.kill_all(&w.cgroup) {
                        tracing::error!(instance = %name, "cannot kill: {e}");
                    }
                }
            }
            if inst.restart_at.is_some_and(|d| d <= now) && !self.stopping {
                self.try_restart(name);
            }
        }
        if self.watchdog_at.is_some_and(|t| t <= now) {
            self.notify_watchdog();
        }
        if self.pressure_at.is_some_and(|t| t <= now) && !self.stopping {
            self.pressure_tick();
        }
        if self.memory_recheck_at.is_some_and(|t| t <= now) {
            self.memory_recheck_at = None;
            if !self.stopping {
                self.retry_waiting();
            }
        }
    }
}

/// The one journal entry per OOM kill; OOM_KILLS counts it already (the exit that follows is
/// classified as `oom-kill` and counted then).
fn log_oom(name: &str, inst: &Instance, w: &Worker, stats: &cgroup::MemoryStats) {
    Entry::of(Event::OomKill, name, inst)
        .worker(w.pid, &w.cgroup)
        .memory(stats.limit, stats.peak)
        .exit_reason(Some("oom-kill"))
        .oom_kills(inst.oom_kills + stats.oom_kill.saturating_sub(w.oom_seen))
        .log(format_args!(
            "the kernel OOM-killed in this instance's cgroup"
        ));
}
