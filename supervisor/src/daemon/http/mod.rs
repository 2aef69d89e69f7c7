//! The OpenAI-compatible HTTP API, served by the supervisor itself on the loop's runtime
//! (docs/ARCHITECTURE.md says why). Handlers never touch the loop's state: a request becomes an
//! `Event::Request` with a channel for its tokens, a snapshot an `Event::Control` status query,
//! and a client that goes away an `Event::RequestGone`.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /api/status`,
//! `POST /api/instances/{name}/ask` (the persistent session, streamed as SSE),
//! `POST /api/instances/{name}/load` and `POST /api/instances/{name}/unload` ([swap]: the
//! control commands `supervisor load` and `unload` send).

pub mod access;
pub mod openai;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use belljar_protocol::control::StatusReport;
use belljar_protocol::worker::{Done, Prompt, PromptMode, Sampling};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::Event;
use super::requests::{ApiError, Client, Gen, next_id};
use openai::{Answer, Kind};

/// How long a client may take to send its request's headers, and then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes of request line and headers (431 beyond; hyper's own buffer cap is set to
/// it too, which bounds a connection's memory).
const MAX_HEADERS: usize = 64 * 1024;
/// How long a snapshot (status, models) may wait for the loop.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// The persistent session's default reply length (`/api/instances/{name}/ask`).
const ASK_MAX_TOKENS: u32 = 256;
/// How long `/api/instances/{name}/load` and `unload` wait for their outcome: a load may take
/// as long as a model load (after evictions), an unload a worker's stop. Past it the client
/// hears 503 and the load or unload goes on (`GET /api/status` shows it).
const SWAP_TIMEOUT: Duration = Duration::from_secs(600);

/// The bound listener and its settings, from `run`.
#[derive(Debug)]
pub struct HttpServe {
    pub listener: std::net::TcpListener,
    pub addr: SocketAddr,
    /// The API key (`api_key_file`'s content, trimmed), when set.
    pub key: Option<Vec<u8>>,
    pub max_body: usize,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
struct App {
    events: UnboundedSender<Event>,
    rules: Arc<access::Rules>,
    max_body: usize,
}

/// The server: its listener, router and connection cap.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    router: Router,
    max_connections: usize,
}

impl Server {
    pub(super) fn new(h: &HttpServe, events: UnboundedSender<Event>) -> std::io::Result<Server> {
        let l = h.listener.try_clone()?;
        l.set_nonblocking(true)?;
        let app = App {
            events,
            rules: Arc::new(access::Rules {
                listen: h.addr,
                key: h.key.clone(),
            }),
            max_body: h.max_body,
        };
        Ok(Server {
            listener: tokio::net::TcpListener::from_std(l)?,
            router: router(app),
            max_connections: h.max_connections.max(1),
        })
    }

    /// Serves until the runtime stops: one task per connection, HTTP/1.1, at most
    /// `max_connections` at once (further ones wait in the kernel's listen queue).
    pub async fn serve(self) {
        let caps = super::listen::Caps {
            name: "http",
            connections: self.max_connections,
            header_timeout: HEADER_TIMEOUT,
            max_buf: Some(MAX_HEADERS),
        };
        let service = hyper_util::service::TowerToHyperService::new(self.router);
        super::listen::serve(self.listener, caps, service).await;
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/api/status", get(status))
        .route("/api/instances/{name}/ask", post(ask))
        .route("/api/instances/{name}/load", post(load))
        .route("/api/instances/{name}/unload", post(unload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (code, axum::Json(openai::error_body(&self))).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == 401 {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The access rules, before any handler.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let h = req.headers();
    // hyper's buffer cap holds only roughly (a head that arrives in one or two reads can pass
    // it): the limit is exact here.
    let head = req.uri().to_string().len()
        + h.iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > MAX_HEADERS {
        return ApiError::new(
            431,
            "headers_too_large",
            format!("the request line and headers take {head} bytes; send at most {MAX_HEADERS}"),
        )
        .into_response();
    }
    let text = |name: header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    let seen = access::Seen {
        post: req.method() == Method::POST,
        path: req.uri().path(),
        host: text(header::HOST),
        origin: h.get(header::ORIGIN).map(|v| v.to_str().unwrap_or("?")),
        content_type: text(header::CONTENT_TYPE),
        authorization: text(header::AUTHORIZATION),
    };
    if let Err(e) = app.rules.check(&seen) {
        return e.into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "not_found",
        format!(
            "no endpoint {} {}; belljar serves /v1/models, /v1/chat/completions, /v1/completions, /health, /api/status and /api/instances/NAME/ask, /api/instances/NAME/load and /api/instances/NAME/unload",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("{} does not take {}", req.uri().path(), req.method()),
    )
}

async fn health(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let r = snapshot(&app).await?;
    let ready = r.instances.iter().filter(|i| i.state == "ready").count();
    Ok(axum::Json(json!({
        "status": "ok",
        "instances": {"ready": ready, "total": r.instances.len() as u64 + r.omitted},
    })))
}

/// The status report, from the loop.
async fn snapshot(app: &App) -> Result<StatusReport, ApiError> {
    super::status_snapshot(&app.events, SNAPSHOT_TIMEOUT)
        .await
        .map_err(|e| ApiError::new(503, "unavailable", format!("{e}; retry")).retry_after(1))
}

async fn status(State(app): State<App>) -> Result<axum::Json<StatusReport>, ApiError> {
    snapshot(&app).await.map(axum::Json)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_entry(i: &belljar_protocol::control::InstanceStatus) -> Value {
    json!({
        "id": i.name,
        "object": "model",
        "created": 0,
        "owned_by": "belljar",
        "belljar": {
            "state": i.state,
            "loaded": i.state == "ready",
            "reservation": i.allocated,
            "queued": i.queued,
            "aliases": i.aliases,
            "load": i.load,
            "pinned": i.pinned,
        },
    })
}

async fn models(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let r = snapshot(&app).await?;
    let data: Vec<Value> = r.instances.iter().map(model_entry).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})))
}

async fn model(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let r = snapshot(&app).await?;
    r.instances
        .iter()
        .find(|i| i.name == id || i.aliases.contains(&id))
        .map(|i| axum::Json(model_entry(i)))
        .ok_or_else(|| {
            ApiError::new(
                404,
                "model_not_found",
                format!("the model {id:?} does not exist; GET /v1/models lists the models"),
            )
        })
}

/// `POST /api/instances/{name}/load`: what `supervisor load NAME` does (an unloaded instance
/// loads, making room by evicting idle on-demand instances); answers once it is ready.
async fn load(State(app): State<App>, Path(name): Path<String>) -> Response {
    swap_command(&app, belljar_protocol::control::Command::Load, name).await
}

/// `POST /api/instances/{name}/unload`: what `supervisor unload NAME` does; answers once its
/// worker has stopped.
async fn unload(State(app): State<App>, Path(name): Path<String>) -> Response {
    swap_command(&app, belljar_protocol::control::Command::Unload, name).await
}

/// Sends a load or unload to the loop as a control command and waits (at most
/// [`SWAP_TIMEOUT`]) for its outcome: 200 `{"ok": true, "message"}`, or OpenAI's error shape
/// (404 for an unknown instance, 409 when its state refuses it, 503 when the supervisor is
/// stopping or the outcome took too long).
async fn swap_command(
    app: &App,
    command: fn(belljar_protocol::control::NameRequest) -> belljar_protocol::control::Command,
    name: String,
) -> Response {
    use belljar_protocol::control::{NameRequest, Response as Reply};
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sent = app.events.send(Event::Control(
        command(NameRequest { name: name.clone() }),
        tx,
        super::control::Peer::SUPERVISOR,
    ));
    if sent.is_err() {
        return ApiError::new(503, "unavailable", "the supervisor is stopping").into_response();
    }
    match tokio::time::timeout(SWAP_TIMEOUT, rx.recv()).await {
        Ok(Some(Reply::Ok(ok))) => {
            axum::Json(json!({"ok": true, "message": ok.message})).into_response()
        }
        Ok(Some(Reply::Error(e))) => swap_error(&name, e).into_response(),
        Ok(Some(other)) => ApiError::new(
            500,
            "internal",
            format!("unexpected answer from the supervisor: {other:?}"),
        )
        .into_response(),
        Ok(None) => ApiError::new(
            503,
            "unavailable",
            format!("the supervisor dropped the request for {name} (it is stopping?); retry"),
        )
        .retry_after(1)
        .into_response(),
        Err(_) => ApiError::new(
            503,
            "timeout",
            format!(
                "{name} did not finish within {}s; it goes on: GET /api/status shows its state",
                SWAP_TIMEOUT.as_secs()
            ),
        )
        .retry_after(5)
        .into_response(),
    }
}

/// A refused load or unload as an HTTP error.
fn swap_error(name: &str, e: belljar_protocol::control::ControlError) -> ApiError {
    if e.message == super::commands::unknown_instance(name) {
        return ApiError::new(
            404,
            "instance_not_found",
            format!("no instance {name:?}; GET /api/status lists the instances"),
        );
    }
    if e.message == super::commands::SHUTTING_DOWN {
        return ApiError::new(503, "unavailable", e.message);
    }
    match e.exit_code {
        2 => ApiError::new(400, "invalid_request", e.message),
        _ => ApiError::new(409, "conflict", e.message),
    }
}

/// The body, within `max_body` bytes and [`BODY_TIMEOUT`].
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!(
                "the request body is larger than [http] max_body ({} bytes); send less",
                app.max_body
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, app.max_body);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            400,
            "bad_body",
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            408,
            "body_timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

/// Tells the loop when a request's client is gone: the HTTP connection dropped the handler or
/// its stream before the answer was over.
#[derive(Debug)]
struct Gone {
    id: u64,
    events: UnboundedSender<Event>,
    armed: bool,
}

impl Drop for Gone {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.events.send(Event::RequestGone { id: self.id });
        }
    }
}

/// A submitted request: its id, its client's end, and the guard that cancels it on drop.
struct Submitted {
    rx: UnboundedReceiver<Gen>,
    gone: Gone,
}

fn submit(
    app: &App,
    model: String,
    mut prompt: Prompt,
    stream: bool,
) -> Result<Submitted, ApiError> {
    let id = next_id();
    prompt.id = id;
    let (tx, rx) = mpsc::unbounded_channel();
    app.events
        .send(Event::Request {
            model,
            prompt: Box::new(prompt),
            client: Client::Http { tx, stream },
        })
        .map_err(|_| {
            ApiError::new(503, "shutting_down", "the supervisor is stopping").retry_after(5)
        })?;
    Ok(Submitted {
        rx,
        gone: Gone {
            id,
            events: app.events.clone(),
            armed: true,
        },
    })
}

fn lost() -> ApiError {
    ApiError::new(
        500,
        "internal",
        "the supervisor dropped the request; retry it",
    )
}

/// Waits for the first thing the request produced (a token, its end, or its failure).
async fn first(s: &mut Submitted) -> Result<Gen, ApiError> {
    loop {
        match s.rx.recv().await {
            Some(Gen::Reset) => continue,
            Some(Gen::Failed(e)) => {
                s.gone.armed = false;
                return Err(e);
            }
            Some(g) => return Ok(g),
            None => return Err(lost()),
        }
    }
}

async fn chat(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    completion(app, Kind::Chat, headers, body).await
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    completion(app, Kind::Completion, headers, body).await
}

async fn completion(app: App, kind: Kind, headers: HeaderMap, body: Body) -> Response {
    let parsed = match read_body(&app, &headers, body)
        .await
        .and_then(|b| openai::parse(kind, &b))
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut s = match submit(&app, parsed.model.clone(), parsed.prompt, parsed.stream) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let answer = Answered {
        kind,
        id: s.gone.id,
        created: unix_now(),
        model: parsed.model,
        include_usage: parsed.include_usage,
    };
    if parsed.stream {
        return match first(&mut s).await {
            Ok(g) => stream(answer, s, g),
            Err(e) => e.into_response(),
        };
    }
    let mut text = String::new();
    loop {
        match s.rx.recv().await {
            Some(Gen::Token(t)) => text.push_str(&t),
            Some(Gen::Reset) => text.clear(),
            Some(Gen::Done(d)) => {
                s.gone.armed = false;
                return axum::Json(answer.as_answer().whole(&text, &d)).into_response();
            }
            Some(Gen::Failed(e)) => {
                s.gone.armed = false;
                return e.into_response();
            }
            None => return lost().into_response(),
        }
    }
}

/// What the answer's objects need.
struct Answered {
    kind: Kind,
    id: u64,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Answered {
    fn as_answer(&self) -> Answer<'_> {
        Answer {
            kind: self.kind,
            id: self.id,
            created: self.created,
            model: &self.model,
        }
    }
}

fn data(v: &Value) -> Sse {
    Sse::default().data(v.to_string())
}

/// An OpenAI stream: a role chunk (chat), a chunk per token, a finish chunk, the usage chunk
/// when asked for, then `[DONE]`; a failure after tokens went out ends the stream with
/// `data: {"error": ...}` and no `[DONE]`.
fn stream(answer: Answered, s: Submitted, first: Gen) -> Response {
    let mut pending = std::collections::VecDeque::new();
    if answer.kind == Kind::Chat {
        pending.push_back(data(&answer.as_answer().chunk(None, None)));
    }
    let template = answer.as_answer().token_template();
    let state = (answer, s, Some(first), pending, false, template);
    let events = futures_util::stream::unfold(state, |mut st| async move {
        let (answer, s, first, pending, over, (head, tail)) = &mut st;
        loop {
            if let Some(e) = pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if *over {
                return None;
            }
            let next = match first.take() {
                Some(g) => Some(g),
                None => s.rx.recv().await,
            };
            let a = answer.as_answer();
            match next {
                // An incomplete UTF-8 character comes as an empty token: nothing to send.
                Some(Gen::Token(t)) if t.is_empty() => {}
                Some(Gen::Token(t)) => {
                    let text = serde_json::to_string(&t).unwrap_or_default();
                    pending.push_back(Sse::default().data(format!("{head}{text}{tail}")));
                }
                Some(Gen::Reset) => {}
                Some(Gen::Done(d)) => {
                    s.gone.armed = false;
                    pending.push_back(data(&a.chunk(None, Some(d.finish.as_str()))));
                    if answer.include_usage {
                        pending.push_back(data(&a.usage_chunk(&d)));
                    }
                    pending.push_back(Sse::default().data("[DONE]"));
                    *over = true;
                }
                Some(Gen::Failed(e)) => {
                    s.gone.armed = false;
                    pending.push_back(data(&openai::error_body(&e)));
                    *over = true;
                }
                None => {
                    pending.push_back(data(&openai::error_body(&lost())));
                    *over = true;
                }
            }
        }
    });
    axum::response::Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    prompt: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    /// The prompt goes to the model as is, not through its chat template.
    #[serde(default)]
    raw: bool,
}

/// The persistent session (what `supervisor ask` talks to), streamed as SSE: `data:
/// {"text": ...}` per token, then `event: done` with `{"tokens", "ms"}`, or `event: error`
/// with OpenAI's error body.
async fn ask(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let a: AskBody = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return ApiError::new(
                400,
                "invalid_request",
                format!("the body must be {{\"prompt\": TEXT, \"max_tokens\": N}}: {e}"),
            )
            .into_response();
        }
    };
    if a.prompt.is_empty() || a.max_tokens == Some(0) {
        return ApiError::new(
            400,
            "invalid_request",
            "prompt and max_tokens must not be empty or 0",
        )
        .into_response();
    }
    let prompt = Prompt {
        mode: PromptMode::Session,
        text: a.prompt,
        max_tokens: a.max_tokens.unwrap_or(ASK_MAX_TOKENS),
        ignore_eos: a.ignore_eos,
        raw: a.raw,
        sampling: Sampling::default(),
        ..Prompt::default()
    };
    let mut s = match submit(&app, name, prompt, true) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let first = match first(&mut s).await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    ask_stream(s, first)
}

/// The session's SSE stream (see [`ask`]).
fn ask_stream(s: Submitted, first: Gen) -> Response {
    let state = (s, Some(first), false);
    let events = futures_util::stream::unfold(state, |mut st| async move {
        let (s, first, over) = &mut st;
        loop {
            if *over {
                return None;
            }
            let next = match first.take() {
                Some(g) => Some(g),
                None => s.rx.recv().await,
            };
            let e = match next {
                Some(Gen::Token(t)) => data(&json!({"text": t})),
                Some(Gen::Reset) => continue,
                Some(Gen::Done(Done { tokens, ms, .. })) => {
                    s.gone.armed = false;
                    *over = true;
                    Sse::default()
                        .event("done")
                        .data(json!({"tokens": tokens, "ms": ms}).to_string())
                }
                Some(Gen::Failed(err)) => {
                    s.gone.armed = false;
                    *over = true;
                    Sse::default()
                        .event("error")
                        .data(openai::error_body(&err).to_string())
                }
                None => {
                    *over = true;
                    Sse::default()
                        .event("error")
                        .data(openai::error_body(&lost()).to_string())
                }
            };
            return Some((Ok::<_, Infallible>(e), st));
        }
    });
    axum::response::Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
