//! More models than fit ([swap]), the loop's side: an unloaded on-demand instance that a request
//! (or `supervisor load`) wants is loaded when its reservation fits the ledger's free budget
//! (layer 2) and MemAvailable (layer 3); otherwise `belljar_budget::swap::make_room` names the
//! idle on-demand instances that give way, and the load waits for their workers to exit and
//! their cgroups to go (their release wakes it). Idle on-demand instances unload after
//! `idle_unload`. Each instance's own transitions stay in its lifecycle machine.

use std::time::{Duration, Instant};

use belljar_budget::Size;
use belljar_budget::lifecycle::{AfterStop, Input, MEMORY_RECHECK, Unload, later};
use belljar_budget::swap::{LoadMode, Loaded, Room, idle_due, make_room};
use belljar_protocol::control::{OkReply, Response};

use super::instance::{GpuRelease, Instance, ReplyTx, State};
use super::{Daemon, clock, refused};

/// How many rounds one `try_loads` makes when loads and evictions keep freeing memory.
const MAX_ROUNDS: usize = 8;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Daemon {
    /// `supervisor load NAME`: an unloaded on-demand instance loads (making room as a request
    /// would), a stopped one starts; the client hears when it is ready.
    pub(super) fn load(&mut self, name: &str, reply: ReplyTx) {
        let Some(inst) = self.instances.get_mut(name) else {
            let _ = reply.send(refused(super::commands::unknown_instance(name)));
            return;
        };
        match inst.state() {
            State::Ready => {
                let _ = reply.send(Response::Ok(OkReply {
                    message: format!("{name} is loaded already"),
                }));
            }
            State::Unloaded => {
                inst.waiters.push(reply);
                self.want_load(name);
            }
            State::Stopped | State::Shed => {
                inst.waiters.push(reply);
                self.drive(name, Input::Admit);
            }
            State::Failed => {
                let _ = reply.send(refused(format!(
                    "{name} is failed ({}); `supervisor restart {name}` clears it and starts it",
                    inst.reason()
                )));
            }
            State::Stopping => {
                let _ = reply.send(refused(format!(
                    "{name} is stopping; run `supervisor load {name}` again once it has stopped"
                )));
            }
            State::Starting | State::Loading | State::Backoff | State::WaitingForMemory => {
                inst.waiters.push(reply);
            }
        }
    }

    /// `supervisor unload NAME`: its worker stops and its allocation goes back. An on-demand
    /// instance comes back with its next request; an `always` one with `load` (or a restart of
    /// the daemon).
    pub(super) fn unload(&mut self, name: &str, reply: ReplyTx) {
        let Some(inst) = self.instances.get_mut(name) else {
            let _ = reply.send(refused(super::commands::unknown_instance(name)));
            return;
        };
        if !inst.state().holds_allocation() {
            let _ = reply.send(Response::Ok(OkReply {
                message: format!(
                    "{name} is {} already: nothing to unload",
                    inst.state().as_str()
                ),
            }));
            return;
        }
        inst.load_wanted = None;
        if let Some(earlier) = inst.stopper.replace(reply) {
            let _ = earlier.send(refused(format!(
                "{name}: a later request replaced this one"
            )));
        }
        self.drive(name, Input::Stop(AfterStop::Unload(Unload::Requested)));
    }

    /// A request (or `load`, or a restart) wants the unloaded instance `name`: one load, however
    /// many want it.
    pub(super) fn want_load(&mut self, name: &str) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        if inst.state() != State::Unloaded || inst.load_wanted.is_some() {
            return;
        }
        inst.load_wanted = Some(self.swap_seq);
        self.swap_seq += 1;
        self.try_loads();
    }

    /// Every wanted load looks for room, the most important (then the longest waiting) first.
    /// Evictions that free memory at once (a victim with no worker) make another round.
    pub(super) fn try_loads(&mut self) {
        if self.swapping {
            self.swap_again = true;
            return;
        }
        self.swapping = true;
        for _ in 0..MAX_ROUNDS {
            self.swap_again = false;
            if self.stopping {
                break;
            }
            let mut wanted: Vec<(i64, u64, String)> = self
                .instances
                .iter()
                .filter_map(|(n, i)| i.load_wanted.map(|at| (i.spec.priority, at, n.clone())))
                .collect();
            wanted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            for (_, _, name) in wanted {
                self.try_load(&name);
            }
            if !self.swap_again {
                break;
            }
        }
        self.swapping = false;
    }

    /// One wanted load: start it, evict for it, or say why it waits (and when it looks again).
    fn try_load(&mut self, name: &str) {
        let now = clock();
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        if inst.state() != State::Unloaded {
            inst.load_wanted = None;
            inst.load_at = None;
            inst.load_waits = None;
            return;
        }
        inst.load_at = None;
        // Its requests gave up (timed out, or their clients left) and no client waits for a
        // `load`: nothing wants it any more.
        if inst.queue.idle() && inst.waiters.is_empty() {
            inst.load_wanted = None;
            inst.load_waits = None;
            return;
        }
        let need = inst.required();
        if let Some((why, at)) = self.load_blocked(name, now) {
            self.waits(name, why, at);
            return;
        }
        let ledger_free = self.ledger.free();
        let host_free = self
            .effective_memory()
            .ok()
            .map(|(m, _)| m.available.saturating_sub(self.cfg.headroom));
        let free = host_free.map_or(ledger_free, |h| h.min(ledger_free));
        let now_ms = ms(self.now());
        let candidates = self.candidates(now_ms);
        let loaded: Vec<Loaded<'_>> = candidates.iter().map(Candidate::as_loaded).collect();
        match make_room(need, free, &loaded, now_ms) {
            Room::Fits => {
                if let Some(inst) = self.instances.get_mut(name) {
                    inst.load_wanted = None;
                    inst.load_waits = None;
                }
                self.drive(name, Input::Load);
            }
            Room::Evict(victims) => {
                let victims: Vec<String> = victims.into_iter().map(str::to_owned).collect();
                self.evict_for(name, &victims, need, free);
            }
            Room::Wait { until_ms } => {
                let at = until_ms.map(|t| later(self.epoch, Duration::from_millis(t)));
                let why = format!(
                    "loading on demand needs {} with {} free: the on-demand instances that could make room are busy or were loaded less than min_loaded ago",
                    Size(need),
                    Size(free)
                );
                self.waits(name, why, at);
            }
            Room::Never => {
                let why = format!(
                    "loading on demand needs {} with {} free, more than unloading every on-demand instance would free: waiting for memory",
                    Size(need),
                    Size(free)
                );
                self.waits(name, why, Some(later(now, MEMORY_RECHECK)));
            }
        }
    }

    /// What holds a wanted load back before room is even looked for: victims still stopping
    /// for it, a GPU release not yet confirmed, critical pressure. The reason, and when to look
    /// again (None: an event wakes it).
    fn load_blocked(&mut self, name: &str, now: Instant) -> Option<(String, Option<Instant>)> {
        let leaving: Vec<&str> = self
            .instances
            .iter()
            .filter(|(_, i)| i.evicting_for.as_deref() == Some(name))
            .map(|(n, _)| n.as_str())
            .collect();
        if !leaving.is_empty() {
            // Their release wakes it.
            let why = format!(
                "loading on demand: waiting for {} to unload",
                leaving.join(", ")
            );
            return Some((why, None));
        }
        if let Some(why) = self.gpu_release_pending(name) {
            let poll = belljar_budget::lifecycle::GPU_RELEASE_POLL;
            return Some((why, Some(later(now, poll))));
        }
        if self.level >= belljar_budget::pressure::Level::Critical {
            let why =
                "loading on demand: memory pressure is critical; nothing loads until it eases"
                    .to_owned();
            return Some((why, Some(later(now, MEMORY_RECHECK))));
        }
        None
    }

    /// Stops `victims` to make room for `name`; their release wakes its load.
    fn evict_for(&mut self, name: &str, victims: &[String], need: u64, free: u64) {
        let list = victims.join(", ");
        tracing::info!(
            instance = %name,
            "loading on demand needs {} with {} free: evicting {list}",
            Size(need),
            Size(free),
        );
        self.waits(
            name,
            format!("loading on demand: waiting for {list} to unload"),
            None,
        );
        for v in victims {
            if let Some(i) = self.instances.get_mut(v) {
                i.evicting_for = Some(name.to_owned());
            }
            self.drive(
                v,
                Input::Evict {
                    by: name.to_owned(),
                },
            );
        }
    }

    fn waits(&mut self, name: &str, why: String, at: Option<Instant>) {
        if let Some(inst) = self.instances.get_mut(name) {
            if inst.load_waits.as_deref() != Some(why.as_str()) {
                tracing::info!(instance = %name, "{why}");
            }
            inst.load_waits = Some(why);
            inst.load_at = at;
        }
    }

    /// A GPU instance loads only once the VRAM of every stopped run on its device is confirmed
    /// released (NVML no longer lists their processes).
    fn gpu_release_pending(&mut self, name: &str) -> Option<String> {
        let inst = self.instances.get(name)?;
        if inst.spec.gpu_layers == 0 {
            return None;
        }
        let device = inst.spec.gpu_device;
        let pending: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.spec.gpu_device == device && matches!(i.gpu_release, GpuRelease::Pending { .. })
            })
            .map(|(n, _)| n.clone())
            .collect();
        if pending.is_empty() {
            return None;
        }
        let readings = self.read_gpus().unwrap_or_default();
        let mut still = Vec::new();
        for n in pending {
            if let Some(mut i) = self.instances.remove(&n) {
                if !self.settle_release(&n, &mut i, &readings) {
                    still.push(n.clone());
                }
                self.instances.insert(n, i);
            }
        }
        (!still.is_empty()).then(|| {
            format!(
                "loading on demand: waiting for NVML to confirm that the VRAM of {} is released",
                still.join(", ")
            )
        })
    }

    /// The loaded instances as eviction sees them: every one holding an allocation.
    fn candidates(&self, now_ms: u64) -> Vec<Candidate> {
        let epoch = self.epoch;
        self.instances
            .iter()
            .filter(|(_, i)| i.state().holds_allocation())
            .map(|(n, i)| Candidate {
                name: n.clone(),
                priority: i.spec.priority,
                last_used_ms: i.last_used.map(ms),
                loaded_at_ms: loaded_at(i, epoch).map_or(now_ms, ms),
                allocated: self.ledger.get(n).unwrap_or(0),
                on_demand: i.spec.load == LoadMode::OnDemand,
                pinned: i.spec.pinned,
                busy: busy(i),
                min_loaded_ms: ms(i.spec.min_loaded.0),
            })
            .collect()
    }

    /// When the next wanted load looks again, or an idle on-demand instance is due to unload.
    pub(super) fn swap_deadline(&self) -> Option<Instant> {
        let loads = self.instances.values().filter_map(|i| i.load_at);
        let idle = self
            .instances
            .values()
            .filter_map(|i| idle_deadline(i, self.epoch));
        loads.chain(idle).min()
    }

    /// Timers: wanted loads look again; idle on-demand instances unload.
    pub(super) fn swap_timers(&mut self) {
        let now = clock();
        let now_ms = ms(self.now());
        let due: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                let Some(idle) = i.spec.idle_unload.after() else {
                    return false;
                };
                idle_deadline(i, self.epoch).is_some_and(|d| d <= now) && {
                    let c = Loaded {
                        name: "",
                        priority: i.spec.priority,
                        last_used_ms: i.last_used.map(ms),
                        loaded_at_ms: loaded_at(i, self.epoch).map_or(now_ms, ms),
                        allocated: 0,
                        on_demand: true,
                        pinned: i.spec.pinned,
                        busy: busy(i),
                        min_loaded_ms: 0,
                    };
                    idle_due(&c, Some(ms(idle)), now_ms)
                }
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.drive(&name, Input::Stop(AfterStop::Unload(Unload::Idle)));
        }
        if self
            .instances
            .values()
            .any(|i| i.load_at.is_some_and(|t| t <= now))
        {
            self.try_loads();
        }
    }

    /// A request ended or left a queue: an instance may have become idle, and so evictable for a
    /// load that waits.
    pub(super) fn became_idle(&mut self) {
        if self.instances.values().any(|i| i.load_wanted.is_some()) {
            self.try_loads();
        }
    }

    /// After an instance's input: its stale eviction mark goes once it no longer stops, and an
    /// unloaded on-demand instance with requests waiting wants a load.
    pub(super) fn settle_swap(&mut self, name: &str) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        if inst.evicting_for.is_some() && inst.state() != State::Stopping {
            inst.evicting_for = None;
            self.swap_again = true;
        }
        if inst.state() == State::Unloaded && !inst.queue.idle() && inst.load_wanted.is_none() {
            inst.load_wanted = Some(self.swap_seq);
            self.swap_seq += 1;
            self.swap_again = true;
        }
    }
}

/// An owned [`Loaded`] (the names borrow from it).
#[derive(Debug)]
struct Candidate {
    name: String,
    priority: i64,
    last_used_ms: Option<u64>,
    loaded_at_ms: u64,
    allocated: u64,
    on_demand: bool,
    pinned: bool,
    busy: bool,
    min_loaded_ms: u64,
}

impl Candidate {
    fn as_loaded(&self) -> Loaded<'_> {
        Loaded {
            name: &self.name,
            priority: self.priority,
            last_used_ms: self.last_used_ms,
            loaded_at_ms: self.loaded_at_ms,
            allocated: self.allocated,
            on_demand: self.on_demand,
            pinned: self.pinned,
            busy: self.busy,
            min_loaded_ms: self.min_loaded_ms,
        }
    }
}

/// Busy: anything but ready and idle. A just-loaded instance holds the request that triggered
/// its load in its queue until it is dispatched, so it is busy until then; one that is starting,
/// loading, restarting or stopping is never a victim either.
fn busy(i: &Instance) -> bool {
    i.state() != State::Ready || !i.queue.idle()
}

/// When the current run became ready (its load finished), on the daemon's clock.
fn loaded_at(i: &Instance, epoch: Instant) -> Option<Duration> {
    i.machine
        .run
        .as_ref()
        .and_then(|r| r.ready_since)
        .map(|t| t.saturating_duration_since(epoch))
}

/// When an idle, ready, unpinned on-demand instance unloads (None: never, or not idle).
fn idle_deadline(i: &Instance, epoch: Instant) -> Option<Instant> {
    let idle = i.spec.idle_unload.after()?;
    if i.spec.load != LoadMode::OnDemand || i.spec.pinned || busy(i) {
        return None;
    }
    let ready = loaded_at(i, epoch)?;
    let since = i.last_used.map_or(ready, |u| u.max(ready));
    Some(later(epoch, since.saturating_add(idle)))
}
