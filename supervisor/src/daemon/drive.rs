//! The interpreter of the lifecycle: every input an instance gets goes through
//! [`Daemon::drive`], which steps its `Machine` and carries out the actions it returns. This is
//! the only place the ledger changes, workers are spawned, signalled or greeted, lifecycle
//! events are logged and waiting clients are answered.

use std::collections::VecDeque;

use belljar_budget::lifecycle::{Action, Ctx, Input, Limits, Log, Reply};
use belljar_protocol::PROTOCOL_VERSION;
use belljar_protocol::control::{OkReply, Response};
use belljar_protocol::worker::{Shutdown, SupervisorMsg, Welcome};

use super::events::Entry;
use super::instance::GpuRelease;
use super::{Daemon, clock, refused, spawn};

impl Daemon {
    /// Feeds `input` to `name`'s machine and carries out its actions; inputs that answer an
    /// action (a spawn's outcome, a restart check) are fed back before this returns. When an
    /// allocation was released, instances waiting for memory look again.
    pub(super) fn drive(&mut self, name: &str, input: Input) {
        let mut queue = VecDeque::from([input]);
        let mut freed = false;
        while let Some(input) = queue.pop_front() {
            let policy = self.cfg.config.budget_policy();
            let Some(inst) = self.instances.get_mut(name) else {
                break;
            };
            let ctx = Ctx {
                ledger: &self.ledger,
                stopping: self.stopping,
                cap: policy.per_instance_cap(self.ledger.capacity()),
                headroom: self.cfg.headroom,
                jitter: fastrand::f64(),
            };
            let actions = inst.machine.step(input, clock(), &ctx);
            for action in actions {
                freed |= action == Action::Release;
                if let Some(next) = self.act(name, action) {
                    queue.push_back(next);
                }
            }
        }
        if self.instances.get(name).is_some_and(|i| i.roll_back) {
            if let Some(inst) = self.instances.get_mut(name) {
                inst.roll_back = false;
            }
            self.drive(
                name,
                Input::Stop(belljar_budget::lifecycle::AfterStop::Remove),
            );
        }
        self.settle_queue(name);
        self.settle_swap(name);
        if freed {
            self.retry_waiting();
        }
        if freed || self.swap_again {
            self.try_loads();
        }
    }

    /// Carries out one action; returns the input that answers it, if any.
    fn act(&mut self, name: &str, action: Action) -> Option<Input> {
        match action {
            Action::Reserve(bytes) | Action::Resize(bytes) => {
                // The machine decided against this very ledger: a refusal here is a bug.
                if let Err(e) = self.ledger.set(name, bytes) {
                    tracing::error!(instance = %name, "the ledger refused a reservation the lifecycle made: {e}");
                }
            }
            Action::Release => {
                self.ledger.release(name);
            }
            Action::Spawn { limits, gpu_layers } => {
                return self.spawn_run(name, limits, gpu_layers);
            }
            Action::Welcome => self.send(
                name,
                SupervisorMsg::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                }),
            ),
            Action::Shutdown => self.send(name, SupervisorMsg::Shutdown(Shutdown {})),
            Action::Kill => {
                let link = self.instances.get(name).and_then(|i| i.link.as_ref());
                if let Some(l) = link.filter(|l| !l.exited) {
                    if let Err(e) = self.cfg.cgroups.kill_all(&l.cgroup) {
                        tracing::error!(instance = %name, "cannot kill: {e}");
                    }
                }
            }
            Action::Log(log) => self.log(name, &log),
            Action::Warn(text) => tracing::warn!(instance = %name, "{text}"),
            Action::Reply(reply) => self.reply(name, reply),
            Action::FailAsks(why) => self.run_ended(name, &why),
            Action::RecordPeak(peak) => self.record_peak(name, peak),
            Action::CheckRestart => return Some(self.restart_check(name)),
            Action::Forget => {
                // Whatever answered before, a forgotten instance is not persisted.
                let persisted = self
                    .instances
                    .get(name)
                    .is_some_and(|i| i.added.is_some() && !i.unconfirmed);
                if persisted {
                    if let Err(e) = self.save_added(None, Some(name)) {
                        tracing::error!(instance = %name, "cannot persist its removal: {e}");
                    }
                }
                self.instances.remove(name);
            }
            Action::WantLoad => {
                if let Some(inst) = self.instances.get_mut(name) {
                    if inst.load_wanted.is_none() {
                        inst.load_wanted = Some(self.swap_seq);
                        self.swap_seq += 1;
                    }
                    self.swap_again = true;
                }
            }
        }
        None
    }

    fn send(&self, name: &str, msg: SupervisorMsg) {
        if let Some(l) = self.instances.get(name).and_then(|i| i.link.as_ref()) {
            let _ = l.tx.send(msg);
        }
    }

    fn log(&self, name: &str, log: &Log) {
        let link = self.instances.get(name).and_then(|i| i.link.as_ref());
        Entry::of_log(name, log, link).log(format_args!("{}", log.message));
    }

    fn reply(&mut self, name: &str, reply: Reply) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let response = |r: Result<String, String>| match r {
            Ok(message) => Response::Ok(OkReply { message }),
            Err(message) => refused(message),
        };
        match reply {
            Reply::Waiters(r) if inst.unconfirmed => self.settle_add(name, r),
            Reply::Waiters(r) => {
                for w in inst.waiters.drain(..) {
                    let _ = w.send(response(r.clone()));
                }
            }
            Reply::Stopper(r) => {
                if let Some(s) = inst.stopper.take() {
                    let _ = s.send(response(r));
                }
            }
            Reply::StopperWaits => inst.waiters.extend(inst.stopper.take()),
        }
    }

    /// Learned corrections: a run that got as far as serving records its peak.
    fn record_peak(&self, name: &str, peak: u64) {
        let Some(inst) = self.instances.get(name) else {
            return;
        };
        if let Some(model) = inst.identity.clone() {
            self.learn.record(crate::learn::Observation {
                model,
                ctx: inst.spec.ctx,
                mmap: inst.spec.use_mmap,
                estimate: inst.machine.reservation.estimate,
                peak,
            });
        }
    }

    /// What a restart needs to know now: the memory reading, whether pressure is critical,
    /// and whether the last run's VRAM is confirmed released.
    fn restart_check(&mut self, name: &str) -> Input {
        let gpu_released = match self.instances.get(name).map(|i| &i.gpu_release) {
            Some(GpuRelease::Pending { .. }) => {
                let readings = self.read_gpus().unwrap_or_default();
                match self.instances.remove(name) {
                    Some(mut inst) => {
                        let done = self.settle_release(name, &mut inst, &readings);
                        self.instances.insert(name.to_owned(), inst);
                        done
                    }
                    None => true,
                }
            }
            _ => true,
        };
        Input::RestartCheck {
            memory: self.effective_memory().map(|(m, _)| m),
            critical: self.level >= belljar_budget::pressure::Level::Critical,
            gpu_released,
        }
    }

    /// Starts the run the machine asked for; answers with `Spawned` or `SpawnFailed`, or with
    /// nothing while the last run's cgroup is still being removed (`on_cgroup_gone` spawns then).
    pub(super) fn spawn_run(
        &mut self,
        name: &str,
        limits: Limits,
        gpu_layers: u32,
    ) -> Option<Input> {
        let env = spawn::SpawnEnv {
            parent: &self.cfg.parent,
            worker_bin: &self.cfg.worker_bin,
            state_dir: &self.cfg.state_dir,
            headroom: self.cfg.headroom,
        };
        let inst = self.instances.get(name)?;
        let req = spawn::request(&env, &inst.spec, limits, gpu_layers);
        // One run per cgroup: a run's cgroup (or one left behind) goes before the next is made.
        if self.destroying.contains(&req.cgroup) || self.cfg.cgroups.exists(&req.cgroup) {
            self.destroy_later(req.cgroup);
            self.deferred_starts
                .insert(name.to_owned(), (limits, gpu_layers));
            return None;
        }
        self.deferred_starts.remove(name);
        match self.cfg.spawner.spawn(&req, &*self.cfg.cgroups) {
            Ok(s) => {
                let pid = s.pid;
                self.attach_run(name, s);
                Some(Input::Spawned { pid })
            }
            Err(e) => Some(Input::SpawnFailed(e)),
        }
    }
}
