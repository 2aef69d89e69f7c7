//! The control commands as the event loop carries them out: add, remove, restart, ask, status.
//! Replies that depend on a worker (ready, stopped, answered) are sent when it happens.

use belljar_budget::lifecycle::Input;
use belljar_budget::swap::LoadMode;
use belljar_budget::{InstanceName, Size, precheck, required};
use belljar_config::InstanceSection;
use belljar_host::{cpu_count, probe_model_file};
use belljar_protocol::control::{
    AddRequest, AskRequest, Command, OkReply, RemoveRequest, Response,
};
use belljar_protocol::worker::{Prompt, PromptMode};

use super::control::Peer;
use super::events::{Entry, Event};
use super::instance::{AfterStop, Instance, ReplyTx, State};
use super::{Daemon, persist, refused, usage};

/// What a command hears while the supervisor stops (the HTTP API answers it with 503).
pub(super) const SHUTTING_DOWN: &str = "the supervisor is shutting down";

fn ok(message: String) -> Response {
    Response::Ok(OkReply { message })
}

impl Daemon {
    pub(super) fn on_control(&mut self, cmd: Command, reply: ReplyTx, peer: Peer) {
        if self.stopping && !matches!(cmd, Command::Status(_)) {
            let _ = reply.send(refused(SHUTTING_DOWN.into()));
            return;
        }
        match cmd {
            Command::Status(_) => {
                let _ = reply.send(Response::Status(Box::new(self.status())));
            }
            Command::Add(req) => self.add(req, reply, peer),
            Command::Remove(r) => self.remove(&r, reply),
            Command::Restart(r) => self.restart(&r.name, reply),
            Command::Ask(a) => self.ask(a, reply),
            Command::Load(r) => self.load(&r.name, reply),
            Command::Unload(r) => self.unload(&r.name, reply),
        }
    }

    /// What planning an added instance needs from the loop, so the plan itself (file reads)
    /// can run anywhere.
    fn plan_input(&self, req: &AddRequest, peer: Option<Peer>) -> PlanInput {
        PlanInput {
            req: req.clone(),
            // Root and the supervisor's own user may load any model it can read.
            peer: peer.filter(|p| p.uid != 0 && p.uid != self.cfg.access.own_uid.as_raw()),
            config: self.cfg.config.clone(),
            state_dir: self.cfg.state_dir.clone(),
            others: self.instances.len(),
            capacity: self.ledger.capacity(),
        }
    }

    /// An added instance from its plan.
    fn added_instance(&self, plan: Plan, req: &AddRequest) -> Instance {
        let mut inst = Instance::new(plan.spec, plan.admitted, self.epoch, self.new_queue());
        inst.added = Some(req.clone());
        inst
    }

    /// VRAM for an instance added with `gpu_layers`: its reservation and those of the instances
    /// on the same GPU that hold their allocation must fit the GPU's usable VRAM (as layer 1 checks
    /// at start). An on-demand one is also checked beside every other on-demand instance on that
    /// GPU, loaded or not, as layer 1 counts them: eviction makes room in the RAM ledger only, so
    /// nothing would free VRAM for its load. Nothing to check without NVML.
    fn vram_refusal(&self, name: &str, inst: &Instance) -> Option<String> {
        let on_demand = inst.spec.load == LoadMode::OnDemand;
        if inst.vram == 0 {
            return None;
        }
        let device = inst.spec.gpu_device;
        let total = self
            .gpu_readings
            .iter()
            .find(|g| g.index == device)
            .map(|g| (g.index, g.total));
        self.cfg.gpus.as_ref()?;
        let mut demands: Vec<belljar_budget::gpu::VramDemand> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                let loaded =
                    i.state().holds_allocation() && i.machine.gpu.layers(i.spec.gpu_layers) > 0;
                let may_load = on_demand && i.spec.load == LoadMode::OnDemand && i.vram > 0;
                i.spec.gpu_device == device && (loaded || may_load)
            })
            .map(|(n, i)| belljar_budget::gpu::VramDemand {
                name: n.clone(),
                device,
                vram: i.vram,
            })
            .collect();
        demands.push(belljar_budget::gpu::VramDemand {
            name: name.to_owned(),
            device,
            vram: inst.vram,
        });
        let gpus: Vec<(u32, u64)> = total.into_iter().collect();
        let v = belljar_budget::gpu::validate_vram(
            &demands,
            &gpus,
            self.cfg.config.budget.safety_margin,
        );
        let v = v.first()?;
        if v.fits {
            return None;
        }
        Some(match v.total {
            None => format!(
                "{name} offloads layers to GPU {device}, which does not exist; pass --gpu-device of an existing GPU or --gpu-layers 0"
            ),
            Some(_) => format!(
                "{name} needs {} of VRAM on GPU {device}, but only {} of its usable {} is free of {} reservations; lower --gpu-layers or --ctx",
                Size(inst.vram),
                Size(v.usable.saturating_sub(v.required - inst.vram)),
                Size(v.usable),
                if on_demand {
                    "the loaded and the on-demand instances'"
                } else {
                    "other instances'"
                }
            ),
        })
    }

    /// Checks the name, then plans the instance on the blocking pool (the model's header and
    /// the observations are read from disk); `finish_add` goes on when the plan is ready.
    fn add(&mut self, req: AddRequest, reply: ReplyTx, peer: Peer) {
        if self.adding.contains_key(&req.name) {
            let _ = reply.send(refused(format!(
                "instance {} is being added by another request; wait for it to finish",
                req.name
            )));
            return;
        }
        if let Some(existing) = self.instances.get_mut(&req.name) {
            if existing.unconfirmed && existing.added.as_ref() == Some(&req) {
                // The same add again while the first waits for ready: both hear the outcome.
                existing.waiters.push(reply);
                return;
            }
            let _ = reply.send(if existing.added.as_ref() == Some(&req) {
                ok(format!("{} already exists with this spec; nothing changed", req.name))
            } else {
                refused(format!(
                    "instance {} already exists; remove it first (`supervisor remove {}`) or choose another name",
                    req.name, req.name
                ))
            });
            return;
        }
        let input = self.plan_input(&req, Some(peer));
        let events = self.events.clone();
        let name = req.name.clone();
        self.adding.insert(name.clone(), (req, reply));
        tokio::task::spawn_blocking(move || {
            let plan = Box::new(plan(&input));
            let _ = events.send(super::Event::Planned { name, plan });
        });
    }

    /// The rest of `add` once its plan is ready: VRAM, layer 2, layer 3, persistence, start.
    pub(super) fn finish_add(&mut self, name: &str, plan: Result<Plan, Response>) {
        let Some((req, reply)) = self.adding.remove(name) else {
            return;
        };
        if self.stopping {
            let _ = reply.send(refused(SHUTTING_DOWN.into()));
            return;
        }
        let mut inst = match plan {
            Ok(p) => self.added_instance(p, &req),
            Err(r) => {
                let _ = reply.send(r);
                return;
            }
        };
        let name = req.name.clone();
        if inst.spec.load == LoadMode::OnDemand {
            self.add_unloaded(name, inst, &req, reply);
            return;
        }
        if let Err(why) = self.admissible(&name, &inst) {
            let _ = reply.send(refused(why));
            return;
        }
        // Persisted once it is ready (`confirm_add`); a first run that fails removes it again.
        inst.unconfirmed = true;
        Entry::of(Event::Added, &name, &inst).log(format_args!(
            "added (reservation {})",
            belljar_budget::Size(inst.required())
        ));
        // The lifecycle reserves and starts it; a failed start tells the waiting client why.
        inst.waiters.push(reply);
        self.instances.insert(name.clone(), inst);
        self.drive(&name, Input::Admit);
    }

    /// An on-demand instance is added unloaded: it must fit beside the always-loaded instances
    /// (what layer 1 asks of an on-demand instance in a mode); it is persisted at once, as
    /// nothing has to start, and its first request (or `load`) loads it, making room as any
    /// load does.
    fn add_unloaded(&mut self, name: String, inst: Instance, req: &AddRequest, reply: ReplyTx) {
        if let Err(why) = self.fits_beside_always(&name, &inst) {
            let _ = reply.send(refused(why));
            return;
        }
        if let Err(e) = self.save_added(Some(req), None) {
            let _ = reply.send(refused(format!(
                "cannot persist {name}: {e}; nothing was added"
            )));
            return;
        }
        Entry::of(Event::Added, &name, &inst).log(format_args!(
            "added on demand (reservation {}): unloaded until its first request",
            belljar_budget::Size(inst.required())
        ));
        self.instances.insert(name.clone(), inst);
        let _ = reply.send(ok(format!(
            "added {name} (on demand: its first request loads it)"
        )));
    }

    /// Whether an on-demand instance's reservation (RAM and VRAM) fits beside the always-loaded
    /// instances' that hold an allocation: otherwise no eviction could ever make room for it.
    fn fits_beside_always(&self, name: &str, inst: &Instance) -> Result<(), String> {
        if let Some(why) = self.vram_refusal(name, inst) {
            return Err(why);
        }
        let always: u64 = self
            .instances
            .values()
            .filter(|i| i.spec.load == LoadMode::Always && i.state().holds_allocation())
            .fold(0u64, |s, i| s.saturating_add(i.required()));
        let room = self.ledger.capacity().saturating_sub(always);
        if inst.required() > room {
            return Err(format!(
                "{name} would need {} but only {} of the budget's {} is left beside the always-loaded instances ({}), so it could never be loaded; lower --ram-limit or --ctx, use a smaller model, or unload or remove an always-loaded instance",
                Size(inst.required()),
                Size(room),
                Size(self.ledger.capacity()),
                Size(always)
            ));
        }
        Ok(())
    }

    /// VRAM, layer 2, the pressure level and layer 3 for an instance about to be added:
    /// nothing changes unless all pass (the lifecycle reserves it when it is admitted).
    fn admissible(&self, name: &str, inst: &Instance) -> Result<(), String> {
        if let Some(why) = self.vram_refusal(name, inst) {
            return Err(why);
        }
        self.ledger
            .check(name, inst.required())
            .map_err(|denied| denied.to_string())?;
        if self.level >= belljar_budget::pressure::Level::Critical {
            return Err(format!(
                "memory pressure is {}: nothing new is admitted until it eases; try again later",
                self.level.as_str()
            ));
        }
        let (reading, _) = self.effective_memory()?;
        let check = precheck(inst.required(), self.cfg.headroom, reading);
        if !check.ok {
            return Err(format!("{name}: {}", check.summary()));
        }
        Ok(())
    }

    /// Rewrites the persisted list with `added` included and `removed` and unconfirmed adds
    /// left out.
    pub(super) fn save_added(
        &self,
        added: Option<&AddRequest>,
        removed: Option<&str>,
    ) -> std::io::Result<()> {
        let list: Vec<AddRequest> = self
            .instances
            .iter()
            .filter(|(n, i)| Some(n.as_str()) != removed && !i.unconfirmed)
            .filter_map(|(_, i)| i.added.clone())
            .chain(added.cloned())
            .collect();
        persist::save(&self.cfg.state_dir, &list)
    }

    /// The first run of an instance added at run time became ready (`Ok`) or ended before
    /// (`Err`): persist it, or refuse the `add` and remove it again. A bad model file (the
    /// worker's permanent exit) is exit 2, as for the client's own checks.
    pub(super) fn settle_add(&mut self, name: &str, outcome: Result<String, String>) {
        let stopping = self
            .instances
            .get(name)
            .is_some_and(|i| i.state() == State::Stopping);
        let outcome = match outcome {
            // Ready while being stopped (a `remove` or `restart` came first): not confirmed,
            // never persisted; a later run that gets ready confirms it.
            Ok(_) if stopping => {
                let message =
                    format!("{name} was stopped before its add completed; nothing was added");
                if let Some(inst) = self.instances.get_mut(name) {
                    for w in inst.waiters.drain(..) {
                        let _ = w.send(refused(message.clone()));
                    }
                }
                return;
            }
            Ok(message) => {
                if let Some(inst) = self.instances.get_mut(name) {
                    inst.unconfirmed = false;
                }
                match self.save_added(None, None) {
                    Ok(()) => Ok(message),
                    Err(e) => Err(refused(format!(
                        "cannot persist {name}: {e}; it is stopped and nothing was added"
                    ))),
                }
            }
            Err(why) => {
                let permanent = self.instances.get(name).is_some_and(|i| {
                    i.machine.last_class == Some(belljar_budget::restart::ExitClass::Permanent)
                });
                let message = format!("{why}; nothing was added");
                Err(if permanent {
                    usage(message)
                } else {
                    refused(message)
                })
            }
        };
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let response = match outcome {
            Ok(message) => ok(message),
            Err(r) => {
                inst.unconfirmed = true;
                inst.roll_back = true;
                r
            }
        };
        for w in inst.waiters.drain(..) {
            let _ = w.send(response.clone());
        }
    }

    fn remove(&mut self, req: &RemoveRequest, reply: ReplyTx) {
        let name = req.name.as_str();
        let Some(inst) = self.instances.get(name) else {
            let _ = reply.send(unknown(name));
            return;
        };
        if inst.added.is_some() {
            if let Err(e) = self.save_added(None, Some(name)) {
                let _ = reply.send(refused(format!(
                    "cannot persist the removal of {name}: {e}"
                )));
                return;
            }
        }
        let reply = self.session_then(name, req.keep_session, reply);
        self.stop_then(name, AfterStop::Remove, reply);
    }

    /// The reply a removal is answered through: once it succeeded (the worker has stopped and
    /// the instance is forgotten), `name`'s session dir is moved aside
    /// (`instances/NAME.removed-STAMP`) unless `keep`, then `client` hears the outcome and what
    /// became of the session. A new conversation thus starts when the name is added again, and a
    /// re-add with another model never meets the old token ids. The move is one rename, in a task
    /// on the loop's own (current-thread) runtime, woken when the removal is answered: it runs
    /// before a re-add of the name can spawn, which waits for its plan from the blocking pool.
    fn session_then(&self, name: &str, keep: bool, client: ReplyTx) -> ReplyTx {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let instances = self.cfg.state_dir.join("instances");
        let name = name.to_owned();
        tokio::spawn(async move {
            while let Some(response) = rx.recv().await {
                let response = match response {
                    Response::Ok(OkReply { message }) if keep => ok(format!(
                        "{message}; its session was kept in {} (adding the name again continues it)",
                        instances.join(&name).display()
                    )),
                    Response::Ok(OkReply { message }) => {
                        match move_session_aside(&instances, &name) {
                            Some(what) => ok(format!("{message}; {what}")),
                            None => ok(message),
                        }
                    }
                    other => other,
                };
                let _ = client.send(response);
            }
        });
        tx
    }

    fn restart(&mut self, name: &str, reply: ReplyTx) {
        if !self.instances.contains_key(name) {
            let _ = reply.send(unknown(name));
            return;
        }
        self.stop_then(name, AfterStop::Restart, reply);
    }

    /// Stops the worker if one runs and does `after` once it is gone; `reply` hears the outcome.
    fn stop_then(&mut self, name: &str, after: AfterStop, reply: ReplyTx) {
        if let Some(inst) = self.instances.get_mut(name) {
            if let Some(earlier) = inst.stopper.replace(reply) {
                let _ = earlier.send(refused(format!(
                    "{name}: a later request replaced this one"
                )));
            }
        }
        self.drive(name, Input::Stop(after));
    }

    /// `ask` joins the instance's queue like any request: it waits through a restart.
    fn ask(&mut self, a: AskRequest, reply: ReplyTx) {
        let prompt = Prompt {
            id: super::requests::next_id(),
            mode: PromptMode::Session,
            text: a.prompt,
            max_tokens: a.max_tokens,
            ignore_eos: a.ignore_eos,
            raw: a.raw,
            ..Prompt::default()
        };
        self.submit(&a.name, prompt, super::requests::Client::Control(reply));
    }

    /// Instances added at run time by an earlier supervisor: back, with their sessions.
    pub(super) fn restore_added(&mut self) {
        let list = match persist::load(&self.cfg.state_dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        for req in list {
            if self.instances.contains_key(&req.name) {
                tracing::warn!(instance = %req.name, "a persisted instance has the name of a mode instance; the mode's wins");
                continue;
            }
            match plan(&self.plan_input(&req, None)) {
                Ok(p) => {
                    let inst = self.added_instance(p, &req);
                    let on_demand = inst.spec.load == LoadMode::OnDemand;
                    tracing::info!(instance = %req.name, on_demand, "restoring an instance added at run time");
                    self.instances.insert(req.name.clone(), inst);
                    // An on-demand one stays unloaded until its first request.
                    if !on_demand {
                        self.drive(&req.name, Input::Admit);
                    }
                }
                Err(Response::Error(e)) => {
                    tracing::error!(instance = %req.name, "cannot restore: {}", e.message)
                }
                Err(_) => {}
            }
        }
    }
}

/// The inputs of an added instance's plan.
#[derive(Debug)]
struct PlanInput {
    req: AddRequest,
    /// The client, when it is neither root nor the supervisor's user: it may only add a model
    /// it could read itself.
    peer: Option<Peer>,
    config: belljar_config::Config,
    state_dir: std::path::PathBuf,
    /// How many instances there are already (they share the CPUs).
    others: usize,
    /// The ledger's capacity, for the per-instance cap.
    capacity: u64,
}

/// An added instance, resolved and estimated.
#[derive(Debug)]
pub(super) struct Plan {
    spec: belljar_config::InstanceSpec,
    admitted: super::Admitted,
}

/// Resolves an added instance against `[defaults]` and checks what needs no ledger: the name,
/// the config's per-instance rules (`InstanceSection::check`, as for the file), an absolute
/// model path, the model file, the chat template file and the per-instance cap. Reads the
/// model's header, the template and the observations: blocking file I/O, run off the loop.
fn plan(input: &PlanInput) -> Result<Plan, Response> {
    let req = &input.req;
    let name = InstanceName::parse(&req.name).map_err(|e| usage(e.to_string()))?;
    let section = InstanceSection {
        model: Some(req.model.clone()),
        ram_limit: req.ram_limit.map(Size),
        ctx: req.ctx,
        gpu_layers: req.gpu_layers,
        gpu_device: req.gpu_device,
        priority: req.priority,
        chat_template: req.chat_template.clone(),
        load: req
            .load
            .as_deref()
            .map(|l| load_mode(&name, l))
            .transpose()?,
        ..InstanceSection::default()
    };
    section
        .check()
        .map_err(|e| usage(format!("cannot add {name}: {e}")))?;
    // A relative path would be resolved against the supervisor's working directory, which is
    // not the client's: the client sends an absolute one (`supervisor add` canonicalizes).
    if !req.model.is_absolute() {
        return Err(usage(format!(
            "cannot add {name}: the model path {} is relative; give an absolute path (`supervisor add` resolves a relative --model itself)",
            req.model.display()
        )));
    }
    // Who may read it is checked first: the probe's errors (the header's names, the file's
    // size) are for clients who could read the file themselves.
    if let Some(p) = input.peer {
        match belljar_host::model_file::readable_by(&req.model, p.uid, p.gid) {
            Ok(true) => {}
            Ok(false) => {
                return Err(refused(format!(
                    "{} is not readable by uid {}: a member of the control group may only add a model it could read itself; fix the file's permissions or ask root to add it",
                    req.model.display(),
                    p.uid
                )));
            }
            Err(e) => {
                return Err(refused(format!(
                    "cannot check who may read {}: {e}",
                    req.model.display()
                )));
            }
        }
    }
    let file = probe_model_file(&req.model).map_err(|e| usage(e.to_string()))?;
    if let Some(template) = &req.chat_template {
        chat_template(&name, template, input.peer)?;
    }
    let others = u32::try_from(input.others).unwrap_or(u32::MAX);
    let threads = (cpu_count() / others.saturating_add(1)).max(1);
    let spec = input.config.spec(&name, &section, threads);
    let policy = input.config.budget_policy();
    let e = crate::estimating::estimate(&spec, &file, &crate::learn::load(&input.state_dir));
    let (estimate, source) = e.planned.estimate(&policy);
    let required = required(spec.ram_limit, estimate);
    let cap = policy.per_instance_cap(input.capacity);
    if required > cap {
        return Err(refused(format!(
            "{name} would need {} but one instance may take at most {} (per_instance_max {} of {}); lower --ram-limit or use a smaller model",
            Size(required),
            Size(cap),
            policy.per_instance_max,
            Size(input.capacity)
        )));
    }
    let admitted = super::Admitted {
        estimate,
        required,
        source,
        protected: crate::estimating::protected(estimate, source, e.breakdown.as_ref()),
        vram: crate::estimating::vram(&spec, &e).unwrap_or(0),
        identity: e.identity,
    };
    Ok(Plan { spec, admitted })
}

/// `--load`: the words of the config's `load` key.
fn load_mode(name: &InstanceName, value: &str) -> Result<LoadMode, Response> {
    LoadMode::parse(value).map_err(|e| usage(format!("cannot add {name}: --load {e}")))
}

/// Checks an added instance's chat template file (a built-in's name was checked with the other
/// keys) as `validate` checks the config's: an absolute path, readable by a client that is
/// neither root nor the supervisor's user (checked first, as for the model: the errors below
/// describe the file), a regular file of UTF-8 that compiles.
fn chat_template(name: &InstanceName, template: &str, peer: Option<Peer>) -> Result<(), Response> {
    if !crate::chat_template::is_file(template) {
        return Ok(());
    }
    let path = std::path::Path::new(template);
    if !path.is_absolute() {
        return Err(usage(format!(
            "cannot add {name}: the chat template path {template} is relative; give an absolute path (`supervisor add` resolves a relative --chat-template itself)"
        )));
    }
    if let Some(p) = peer {
        match belljar_host::model_file::readable_by(path, p.uid, p.gid) {
            Ok(true) => {}
            Ok(false) => {
                return Err(refused(format!(
                    "{template} is not readable by uid {}: a member of the control group may only add a chat template it could read itself; fix the file's permissions or ask root to add it",
                    p.uid
                )));
            }
            Err(e) => {
                return Err(refused(format!(
                    "cannot check who may read {template}: {e}"
                )));
            }
        }
    }
    crate::chat_template::check(template).map_err(|e| usage(format!("cannot add {name}: {e}")))
}

/// Moves a removed instance's session dir aside; says what became of it (nothing when it had
/// none).
fn move_session_aside(instances: &std::path::Path, name: &str) -> Option<String> {
    match belljar_host::safe_fs::move_session_aside(instances, name, std::time::SystemTime::now()) {
        Ok(Some(to)) => {
            tracing::info!(instance = %name, "session moved aside to {}", to.display());
            Some(format!("its session was moved aside to {}", to.display()))
        }
        Ok(None) => None,
        Err(e) => {
            let dir = instances.join(name);
            tracing::error!(instance = %name, "cannot move the session {} aside: {e}", dir.display());
            Some(format!(
                "its session could NOT be moved aside ({e}): remove {} before adding the name again",
                dir.display()
            ))
        }
    }
}

fn unknown(name: &str) -> Response {
    refused(unknown_instance(name))
}

/// What a control client hears about an instance that does not exist.
pub(super) fn unknown_instance(name: &str) -> String {
    format!("unknown instance {name}; `supervisor status` lists the instances")
}
