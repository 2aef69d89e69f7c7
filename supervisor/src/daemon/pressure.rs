//! The host pressure guard: every `[pressure] interval` it reads the effective memory (the
//! tightest of the host and any limited cgroup above belljar's), moves the level with
//! hysteresis, tells the workers, sheds the lowest-priority instance in an emergency (again
//! after `settle` while it lasts), brings shed instances back highest priority first once usage
//! is below `restore` and the pre-load check passes, and flags thrashing instances.

use belljar_budget::lifecycle::Input;
use belljar_budget::pressure::{Candidate, Level, Levels, restore_order, shed_victim};
use belljar_budget::{HostMemory, Size};
use belljar_host::pressure::{Source, effective_memory};
use belljar_protocol::worker::{PressureNotice, SupervisorMsg};

use super::Daemon;
use super::events::{Entry, Event};
use super::instance::{AfterStop, State};

impl Daemon {
    pub(super) fn levels(&self) -> Levels {
        let p = &self.cfg.config.pressure;
        Levels {
            warning: p.warning,
            critical: p.critical,
            emergency: p.emergency,
            restore: p.restore,
        }
    }

    /// The memory reading layer 3 and status use: the tightest source.
    pub(super) fn effective_memory(&self) -> Result<(HostMemory, Source), String> {
        effective_memory(&self.cfg.proc_root, &*self.cfg.cgroups, &self.cfg.parent)
            .map_err(|e| e.to_string())
    }

    /// Wakes the guard early when tasks stall on memory: PSI triggers on the system's
    /// /proc/pressure/memory and, on v2, the instance parent's memory.pressure. Where the kernel
    /// refuses triggers the guard reads at its interval only.
    pub(super) fn watch_psi(&self) {
        if !self.cfg.config.pressure.enabled {
            return;
        }
        let mut files = vec![self.cfg.proc_root.path().join("pressure/memory")];
        if self.cfg.cgroups.version() == belljar_host::cgroup::Version::V2 {
            files.push(self.cfg.parent.join("memory.pressure"));
        }
        for file in files {
            let stall = std::time::Duration::from_millis(150);
            let window = std::time::Duration::from_secs(1);
            let fd = match belljar_host::pressure::psi_trigger(&file, stall, window) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::info!(
                        "no PSI trigger on {} ({e}); the pressure guard reads every {}",
                        file.display(),
                        self.cfg.config.pressure.interval
                    );
                    continue;
                }
            };
            // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open for its life.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::PRIORITY)
            };
            let afd = match registered {
                Ok(a) => a,
                Err(e) => {
                    tracing::info!("cannot watch the PSI trigger on {}: {e}", file.display());
                    continue;
                }
            };
            let events = self.events.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(mut ready) = afd.ready(tokio::io::Interest::PRIORITY).await else {
                        return;
                    };
                    ready.clear_ready();
                    if events.send(super::Event::PressureWake).is_err() {
                        return;
                    }
                }
            });
        }
    }

    pub(super) fn pressure_tick(&mut self) {
        let p = self.cfg.config.pressure.clone();
        self.pressure_at = Some(belljar_budget::lifecycle::later(
            super::clock(),
            p.interval.0,
        ));
        self.detect_thrashing(p.thrash_window.0, p.thrash_majflt_rate);
        self.gpu_tick();
        if !p.enabled {
            return;
        }
        let Ok((reading, _)) = self.effective_memory() else {
            return;
        };
        let levels = self.levels();
        let new = levels.next(self.level, reading);
        if new != self.level {
            Entry::new(Event::PressureLevel).log(format_args!(
                "memory pressure {} (was {}): {:.1}% used, {} available",
                new.as_str(),
                self.level.as_str(),
                reading.usage_percent(),
                Size(reading.available)
            ));
            self.level = new;
            for inst in self.instances.values() {
                if let Some(w) = &inst.link {
                    let _ =
                        w.tx.send(SupervisorMsg::Pressure(PressureNotice { level: new }));
                }
            }
        }
        if self.level == Level::Emergency
            && self
                .last_shed
                .is_none_or(|t| super::clock().saturating_duration_since(t) >= p.settle.0)
        {
            self.shed_one();
        }
        if levels.restored(reading) {
            self.restore_one(reading);
        }
    }

    /// Gracefully stops the lowest-priority running instance: session saved, allocation freed.
    fn shed_one(&mut self) {
        let running: Vec<Candidate> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.link.is_some()
                    && matches!(i.state(), State::Starting | State::Loading | State::Ready)
            })
            .map(|(n, i)| Candidate {
                name: n.clone(),
                priority: i.spec.priority,
                last_used_ms: i.last_used.map(|d| d.as_millis() as u64),
            })
            .collect();
        let Some(victim) = shed_victim(&running).map(|c| c.name.clone()) else {
            return;
        };
        tracing::warn!(instance = %victim, "emergency: stopping the lowest-priority (then least recently used) instance to shed it");
        self.last_shed = Some(super::clock());
        self.drive(&victim, Input::Stop(AfterStop::Shed));
    }

    /// Brings back the highest-priority shed instance if the pre-load check passes.
    fn restore_one(&mut self, reading: HostMemory) {
        let shed: Vec<Candidate> = self
            .instances
            .iter()
            .filter(|(_, i)| i.state() == State::Shed)
            .map(|(n, i)| Candidate {
                name: n.clone(),
                priority: i.spec.priority,
                last_used_ms: None,
            })
            .collect();
        let Some(first) = restore_order(&shed).first().map(|c| c.name.clone()) else {
            return;
        };
        // The lifecycle restarts it if the pre-load check passes.
        self.drive(&first, Input::Restore { memory: reading });
    }

    /// Samples each running instance's major faults; flags and clears `thrashing`.
    fn detect_thrashing(&mut self, window: std::time::Duration, rate: f64) {
        let now = self.now();
        for (name, inst) in &mut self.instances {
            let Some(w) = &inst.link else {
                inst.thrashing = false;
                continue;
            };
            let Some(faults) = self.cfg.cgroups.major_faults(&w.cgroup) else {
                continue;
            };
            let thrashing = inst.thrash.sample(now, faults, window, rate);
            if thrashing == inst.thrashing {
                continue;
            }
            inst.thrashing = thrashing;
            if thrashing {
                let file = std::fs::metadata(&inst.spec.model)
                    .map(|m| m.len())
                    .unwrap_or(0);
                let required = inst.required();
                let suggested = required.saturating_add(file);
                Entry::of(Event::Thrashing, name, inst).log(format_args!(
                    "major faults above {rate}/s for {window:?}: the limit {} is too small for the model's working set; raise ram_limit to at least {}",
                    Size(required),
                    Size(suggested)
                ));
                inst.thrash_reason = Some(format!(
                    "thrashing: re-reading its model under the limit {}; raise ram_limit to at least {}",
                    Size(required),
                    Size(suggested)
                ));
            } else {
                Entry::of(Event::ThrashingCleared, name, inst)
                    .log(format_args!("no longer thrashing"));
            }
        }
    }
}
