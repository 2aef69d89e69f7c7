//! Requests to the workers, from HTTP clients and `ask`s alike: each joins its instance's queue
//! (`belljar_budget::queue`, the policy), is sent to the worker when the instance is ready and
//! idle, and its tokens go back to its client. A run that ends with a request in flight sends
//! it back to the head of the queue when nothing of it reached the client yet (once), so a
//! worker's OOM kill or restart costs a request nothing but time.

use std::sync::atomic::{AtomicU64, Ordering};

use belljar_budget::queue::{Refusal, RunEnded, waits_in};
use belljar_protocol::control::{AskDone, Response, TokenText};
use belljar_protocol::worker::{Cancel, Done, ErrorKind, ErrorReply, Prompt, SupervisorMsg};
use tokio::sync::mpsc::UnboundedSender;

use super::events::{Entry, Event};
use super::instance::ReplyTx;
use super::{Daemon, clock, refused};

/// Request ids, unique for the process (HTTP handlers take theirs before the loop sees them).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// What an HTTP handler hears about its request.
#[derive(Debug)]
pub enum Gen {
    Token(String),
    /// A restarted worker serves the request again from the start: forget the tokens so far.
    Reset,
    Done(Done),
    Failed(ApiError),
}

/// A failed request as an HTTP client sees it (the body is OpenAI's error shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// OpenAI's `error.code`.
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (503, 429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            431 => "invalid_request_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

/// Who waits for a request.
#[derive(Debug)]
pub enum Client {
    /// `supervisor ask`: tokens stream to the CLI.
    Control(ReplyTx),
    /// An HTTP request; `stream`: its tokens go to the client as they come (SSE), so once one
    /// has gone it cannot be served again from the start.
    Http {
        tx: UnboundedSender<Gen>,
        stream: bool,
    },
}

impl Client {
    fn closed(&self) -> bool {
        match self {
            Client::Control(tx) => tx.is_closed(),
            Client::Http { tx, .. } => tx.is_closed(),
        }
    }

    /// Whether a token sent to this client reaches the person at once.
    fn streams(&self) -> bool {
        match self {
            Client::Control(_) => true,
            Client::Http { stream, .. } => *stream,
        }
    }

    /// Sends a token; false when the client is gone.
    fn token(&self, text: String) -> bool {
        match self {
            Client::Control(tx) => tx.send(Response::Token(TokenText { text })).is_ok(),
            Client::Http { tx, .. } => tx.send(Gen::Token(text)).is_ok(),
        }
    }

    fn done(self, d: Done) {
        match self {
            Client::Control(tx) => {
                let _ = tx.send(Response::Done(AskDone {
                    tokens: d.tokens,
                    ms: d.ms,
                }));
            }
            Client::Http { tx, .. } => {
                let _ = tx.send(Gen::Done(d));
            }
        }
    }

    pub fn fail(self, e: ApiError) {
        match self {
            Client::Control(tx) => {
                let _ = tx.send(if e.status == 400 {
                    super::usage(e.message)
                } else {
                    refused(e.message)
                });
            }
            Client::Http { tx, .. } => {
                let _ = tx.send(Gen::Failed(e));
            }
        }
    }
}

/// A request the loop holds: queued or in flight.
#[derive(Debug)]
pub struct Request {
    pub instance: String,
    /// What goes to the worker (its `id` is the request's).
    pub prompt: Prompt,
    pub client: Client,
    /// The run it was sent to (a reply counts only from that run).
    pub generation: Option<u64>,
    /// Tokens that reached the client.
    pub sent: u32,
    /// How many had reached it when it went away.
    pub cancelled_at: Option<u32>,
}

impl Daemon {
    /// The instance an HTTP client means by `model`: its name or one of its aliases.
    pub(super) fn resolve(&self, model: &str) -> Option<String> {
        if self.instances.contains_key(model) {
            return Some(model.to_owned());
        }
        self.instances
            .iter()
            .find(|(_, i)| i.spec.aliases.iter().any(|a| a == model))
            .map(|(n, _)| n.clone())
    }

    /// A new request for `model`: queued (and sent at once when the instance is ready and
    /// idle), or refused through its client.
    pub(super) fn submit(&mut self, model: &str, prompt: Prompt, client: Client) {
        if self.stopping {
            client.fail(
                ApiError::new(503, "shutting_down", "the supervisor is shutting down")
                    .retry_after(5),
            );
            return;
        }
        let Some(name) = self.resolve(model) else {
            let message = match client {
                Client::Control(_) => super::commands::unknown_instance(model),
                Client::Http { .. } => format!(
                    "the model {model:?} does not exist; GET /v1/models lists the models (instance names and aliases)"
                ),
            };
            client.fail(ApiError::new(404, "model_not_found", message));
            return;
        };
        let Some(inst) = self.instances.get_mut(&name) else {
            return;
        };
        let id = prompt.id;
        match inst.queue.push(id, inst.machine.state, clock()) {
            Ok(()) => {}
            Err(Refusal::Full) => {
                client.fail(
                    ApiError::new(
                        429,
                        "queue_full",
                        format!(
                            "{name} has {} requests waiting already ([http] queue); retry later",
                            inst.queue.len()
                        ),
                    )
                    .retry_after(1),
                );
                return;
            }
            Err(Refusal::Unavailable) => {
                client.fail(unavailable(
                    &name,
                    inst.state().as_str(),
                    inst.reason(),
                    "`supervisor restart` starts it again",
                ));
                return;
            }
        }
        self.requests.insert(
            id,
            Request {
                instance: name.clone(),
                prompt,
                client,
                generation: None,
                sent: 0,
                cancelled_at: None,
            },
        );
        self.dispatch(&name);
        self.want_load(&name);
    }

    /// Sends the next queued request to the worker if the instance is ready and idle. Requests
    /// whose client went away meanwhile are dropped on the way.
    pub(super) fn dispatch(&mut self, name: &str) {
        let now = self.now();
        loop {
            let Some(inst) = self.instances.get_mut(name) else {
                return;
            };
            let Some(link) = inst.link.as_ref().filter(|l| !l.exited) else {
                return;
            };
            let Some(id) = inst.queue.dispatch(inst.machine.state) else {
                return;
            };
            let (tx, generation) = (link.tx.clone(), link.generation);
            let Some(req) = self.requests.get_mut(&id) else {
                inst.queue.finished(id);
                continue;
            };
            if req.client.closed() {
                inst.queue.finished(id);
                self.requests.remove(&id);
                continue;
            }
            req.generation = Some(generation);
            inst.last_used = Some(now);
            // A closed channel means the run is ending: its end requeues the request.
            let _ = tx.send(SupervisorMsg::Prompt(req.prompt.clone()));
            return;
        }
    }

    /// The request `id`, if it went to this instance's this run (a worker cannot answer for
    /// another).
    fn request_of(&mut self, id: u64, name: &str, generation: u64) -> Option<&mut Request> {
        self.requests
            .get_mut(&id)
            .filter(|r| r.instance == name && r.generation == Some(generation))
    }

    pub(super) fn on_token(&mut self, name: &str, generation: u64, id: u64, text: String) {
        let Some(req) = self.request_of(id, name, generation) else {
            return;
        };
        if req.cancelled_at.is_some() {
            return;
        }
        let streams = req.client.streams();
        if req.client.token(text) {
            req.sent += 1;
            if streams {
                if let Some(inst) = self.instances.get_mut(name) {
                    inst.queue.sent(id);
                }
            }
        } else {
            self.gone(id);
        }
    }

    pub(super) fn on_done(&mut self, name: &str, generation: u64, d: Done) {
        if self.request_of(d.id, name, generation).is_none() {
            return;
        }
        let Some(req) = self.requests.remove(&d.id) else {
            return;
        };
        let now = self.now();
        if let Some(inst) = self.instances.get_mut(name) {
            inst.queue.finished(d.id);
            inst.last_used = Some(now);
        }
        match req.cancelled_at {
            Some(at) => tracing::info!(
                instance = %name,
                request = d.id,
                "request cancelled: its client went away after {at} token(s); the worker generated {} more",
                d.tokens.saturating_sub(at)
            ),
            None => req.client.done(d),
        }
        self.dispatch(name);
        self.became_idle();
    }

    pub(super) fn on_error(&mut self, name: &str, generation: u64, e: ErrorReply) {
        let mine =
            e.id.filter(|id| self.request_of(*id, name, generation).is_some());
        let Some(req) = mine.and_then(|id| self.requests.remove(&id)) else {
            tracing::warn!(instance = %name, "worker reported: {}", e.message);
            return;
        };
        if let Some(inst) = self.instances.get_mut(name) {
            inst.queue.finished(req.prompt.id);
        }
        let error = match e.kind {
            ErrorKind::Invalid => ApiError::new(400, "invalid_request", e.message),
            ErrorKind::Internal | ErrorKind::Aborted => ApiError::new(
                500,
                "worker_error",
                format!("{name} could not serve the request: {}", e.message),
            ),
        };
        if req.cancelled_at.is_none() {
            req.client.fail(error);
        }
        self.dispatch(name);
        self.became_idle();
    }

    /// Request `id`'s client went away: a waiting request leaves the queue; the worker is told
    /// to stop the one it is generating (it answers `Done`, cancelled).
    pub(super) fn gone(&mut self, id: u64) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        let name = req.instance.clone();
        let Some(inst) = self.instances.get_mut(&name) else {
            self.requests.remove(&id);
            return;
        };
        if inst.queue.in_flight() == Some(id) {
            if inst.queue.cancel(id) {
                req.cancelled_at = Some(req.sent);
                if let Some(link) = inst.link.as_ref() {
                    let _ = link.tx.send(SupervisorMsg::Cancel(Cancel { id }));
                }
            }
        } else {
            inst.queue.cancel(id);
            self.requests.remove(&id);
            self.became_idle();
        }
    }

    /// The run serving `name` ended (the lifecycle's `FailAsks`): its request in flight goes
    /// back to the head of the queue, or fails when part of it already reached its client.
    pub(super) fn run_ended(&mut self, name: &str, why: &str) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        match inst.queue.run_ended(clock()) {
            RunEnded::Idle => {}
            RunEnded::Requeued(id) => {
                if let Some(req) = self.requests.get_mut(&id) {
                    req.generation = None;
                    req.sent = 0;
                    if let Client::Http { tx, .. } = &req.client {
                        let _ = tx.send(Gen::Reset);
                    }
                }
                Entry::new(Event::RequestRetried).named(name).log(format_args!(
                    "request {id} goes to the restarted worker ({why}); nothing of it had reached its client"
                ));
            }
            RunEnded::Failed(id) => {
                if let Some(req) = self.requests.remove(&id) {
                    if req.cancelled_at.is_none() {
                        let reason = if req.sent > 0 {
                            format!(
                                "{why} after {} token(s) of the answer were sent; the answer is incomplete, retry the request",
                                req.sent
                            )
                        } else {
                            format!("{why} twice while serving this request; retry it later")
                        };
                        Entry::new(Event::RequestFailed)
                            .named(name)
                            .log(format_args!("request {id} failed: {reason}"));
                        req.client
                            .fail(ApiError::new(503, "worker_stopped", reason).retry_after(1));
                    }
                }
            }
        }
    }

    /// After an instance's input: requests to an instance that will not serve them fail, and a
    /// ready one gets its next request.
    pub(super) fn settle_queue(&mut self, name: &str) {
        let Some(inst) = self.instances.get_mut(name) else {
            self.fail_requests_of(name, "was removed", None);
            return;
        };
        if waits_in(inst.state()) {
            self.dispatch(name);
            return;
        }
        let ids = inst.queue.drain();
        let (state, reason) = (inst.state().as_str(), inst.reason().to_owned());
        let error = unavailable(name, state, &reason, "`supervisor restart` starts it again");
        for id in ids {
            if let Some(req) = self.requests.remove(&id) {
                Entry::new(Event::RequestFailed)
                    .named(name)
                    .log(format_args!(
                        "request {id} failed: {name} is {state} ({reason})"
                    ));
                req.client.fail(error.clone());
            }
        }
    }

    /// Every request still held for `name` fails (it is gone, or the supervisor stops).
    pub(super) fn fail_requests_of(&mut self, name: &str, why: &str, retry: Option<u64>) {
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.instance == name)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(req) = self.requests.remove(&id) {
                let mut e = ApiError::new(503, "unavailable", format!("{name} {why}"));
                e.retry_after = retry;
                req.client.fail(e);
            }
        }
    }

    /// Waiting requests whose `queue_timeout` passed fail with 503.
    pub(super) fn expire_requests(&mut self) {
        let now = clock();
        let mut expired = Vec::new();
        for (name, inst) in &mut self.instances {
            for id in inst.queue.expire(now) {
                expired.push((
                    name.clone(),
                    id,
                    inst.state().as_str(),
                    inst.reason().to_owned(),
                ));
            }
        }
        for (name, id, state, reason) in expired {
            if let Some(req) = self.requests.remove(&id) {
                Entry::new(Event::RequestFailed).named(&name).log(format_args!(
                    "request {id} failed: it waited [http] queue_timeout while {name} was {state}"
                ));
                req.client.fail(
                    ApiError::new(
                        503,
                        "queue_timeout",
                        format!(
                            "{name} did not get to this request within [http] queue_timeout: it is {state} ({reason}); retry later"
                        ),
                    )
                    .retry_after(5),
                );
            }
        }
        // A load that only these requests wanted is wanted no more.
        self.became_idle();
    }
}

/// 503 for an instance that will not serve requests.
fn unavailable(name: &str, state: &str, reason: &str, fix: &str) -> ApiError {
    ApiError::new(
        503,
        "model_unavailable",
        format!("{name} is {state} ({reason}); {fix}"),
    )
    .retry_after(10)
}
