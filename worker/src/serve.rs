//! `worker serve`: the model host. Handshake, layer-3 pre-load check, model load with progress,
//! session restore, then one request at a time until Shutdown or until the supervisor goes away.
//! Heartbeats come from their own thread so they never stall behind a long decode.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use belljar_budget::{HumanDuration, InstanceName, Size, precheck};
use belljar_host::{ProcRoot, probe_model_file, read_host_memory, read_rss};
use belljar_protocol::PROTOCOL_VERSION;
use belljar_protocol::worker::{
    Done, ErrorKind, ErrorReply, Failed, Finish, Heartbeat, Hello, Level, Loading, Prompt, Ready,
    Refused, SupervisorMsg, Token, WorkerMsg, WorkerState,
};
use clap::Args;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use crate::engine::{Control, Engine, Fault, Outcome, ReqError, Setup};
use crate::link::{Inbound, Link, spawn_reader};
use crate::session::{Identity, SessionFiles};
use belljar_protocol::exit;

/// How long the worker waits for the supervisor's `Welcome`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Loading progress is sent at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);
/// Share of the progress bar for the model load; the session restore gets the rest.
const LOAD_SHARE: f32 = 0.8;
/// Where a re-prefill's progress ends; saving its state back and Ready take the bar to 1.0.
const RESTORE_END: f32 = 0.95;
/// Prompts waiting behind the one in progress; more are refused with an error reply.
const MAX_QUEUED: usize = 16;

/// Host one GGUF model for the supervisor (started by it; runnable by hand for debugging).
#[derive(Debug, Args)]
#[command(after_help = serve_help())]
pub struct ServeArgs {
    /// The inherited socketpair end from the supervisor.
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "connect",
        required_unless_present = "connect"
    )]
    pub fd: Option<i32>,
    /// Connect to a listening Unix socket instead (by hand, tests).
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,
    /// The instance this worker speaks for.
    #[arg(long)]
    pub instance: String,
    /// The GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// The instance's state directory (session log and saved context).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Context length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub ctx: u32,
    /// Layers offloaded to a GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu_layers: u32,
    /// The GPU the offloaded layers go to.
    #[arg(long, default_value_t = 0)]
    pub gpu_device: u32,
    /// llama.cpp threads [default: all CPUs].
    #[arg(long)]
    pub threads: Option<u32>,
    /// Read the model into memory instead of mapping it.
    #[arg(long)]
    pub no_mmap: bool,
    /// The chat template: a built-in's name (chatml, llama3, mistral, gemma, phi3, zephyr) or
    /// a Jinja file's path [default: the model's own, else chatml].
    #[arg(long, value_name = "NAME|PATH")]
    pub chat_template: Option<String>,
    /// Heartbeat period.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: HumanDuration,
    /// The instance's reservation, for the pre-load check.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub required: Size,
    /// Memory that must stay free on top of the reservation, for the pre-load check.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub headroom: Size,
    /// Where procfs is mounted (tests).
    #[arg(long, default_value = ProcRoot::DEFAULT, hide = true)]
    pub proc_root: PathBuf,
    /// Test aid: leave a double-forked `sleep` behind, as a misbehaving model runtime might, to
    /// prove the supervisor reaps it and kills it with the cgroup.
    #[arg(long, hide = true, env = "BELLJAR_DEBUG_SPAWN_ORPHAN")]
    pub debug_spawn_orphan: bool,
    /// Test aid: a fault injected on purpose (`after-log-append:N`: SIGKILL itself right after
    /// turn N is in the session log, before its state is saved). Never set it in production.
    #[arg(long, hide = true, env = "BELLJAR_FAULT")]
    pub fault: Option<Fault>,
}

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    HumanDuration::parse(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<Size, String> {
    Size::parse(s).map_err(|e| e.to_string())
}

/// A failure: the code the process exits with and the message it printed.
pub type Failure = (u8, String);

/// The worker's state, shared with the heartbeat thread.
struct SharedState(AtomicU8);

impl SharedState {
    fn set(&self, s: WorkerState) {
        self.0.store(s as u8, Ordering::Relaxed);
    }
    fn get(&self) -> WorkerState {
        match self.0.load(Ordering::Relaxed) {
            0 => WorkerState::Loading,
            1 => WorkerState::Ready,
            _ => WorkerState::Busy,
        }
    }
}

pub fn run(args: &ServeArgs, backend: &LlamaBackend) -> Result<(), Failure> {
    let (link, reader) =
        Link::open(args.fd, args.connect.as_deref()).map_err(|e| (exit::USAGE, e))?;
    let (tx, rx) = mpsc::channel();
    spawn_reader(reader, tx)
        .map_err(|e| (exit::USAGE, format!("cannot start the link reader: {e}")))?;
    let fail = |code: u8, reason: String| -> Failure {
        let _ = link.send(&WorkerMsg::Failed(Failed {
            reason: reason.clone(),
            exit_code: code,
            gpu_alloc: code == exit::GPU_ALLOC,
        }));
        (code, reason)
    };
    // With layers on a GPU, a load or context failure is taken for a GPU allocation failure
    // (llama.cpp does not say more through its API): retried, and counted by the supervisor.
    let on_gpu = args.gpu_layers > 0 && backend.supports_gpu_offload();
    let load_code = if on_gpu {
        exit::GPU_ALLOC
    } else {
        exit::UNSUPPORTED_MODEL
    };
    let _ = link.send(&WorkerMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        instance: args.instance.clone(),
        pid: std::process::id(),
    }));
    match rx.recv_timeout(HANDSHAKE_TIMEOUT) {
        Ok(Inbound::Msg(SupervisorMsg::Welcome(w))) if w.protocol_version == PROTOCOL_VERSION => {}
        Ok(Inbound::Msg(SupervisorMsg::Welcome(w))) => {
            return Err(fail(
                exit::PROTOCOL,
                format!(
                    "protocol mismatch: the supervisor speaks version {}, this worker {PROTOCOL_VERSION}; install matching supervisor and worker binaries",
                    w.protocol_version
                ),
            ));
        }
        Ok(Inbound::Closed) | Err(RecvTimeoutError::Disconnected) => {
            return Err((
                exit::OK,
                "the supervisor went away before the handshake".into(),
            ));
        }
        Ok(other) => {
            return Err(fail(
                exit::PROTOCOL,
                format!("expected Welcome from the supervisor, got {other:?}"),
            ));
        }
        Err(RecvTimeoutError::Timeout) => {
            return Err(fail(
                exit::PROTOCOL,
                format!("no Welcome from the supervisor within {HANDSHAKE_TIMEOUT:?}"),
            ));
        }
    }

    if args.debug_spawn_orphan {
        // sh exits at once; its background sleep is re-parented to the nearest subreaper.
        let _ = std::process::Command::new("sh")
            .args(["-c", "sleep 3600 >/dev/null 2>&1 &"])
            .status();
    }

    // Arguments that parse but cannot work are reported over the link, not just by clap.
    InstanceName::parse(&args.instance).map_err(|e| fail(exit::USAGE, e.to_string()))?;
    if args.ctx == 0 {
        return Err(fail(
            exit::USAGE,
            "ctx 0 is not a context length; give --ctx 1 or more (e.g. 2048)".into(),
        ));
    }

    let state = Arc::new(SharedState(AtomicU8::new(WorkerState::Loading as u8)));
    let proc_root = ProcRoot(args.proc_root.clone());
    spawn_heartbeat(
        link.clone(),
        state.clone(),
        args.heartbeat_interval.0,
        proc_root.clone(),
    )
    .map_err(|e| {
        fail(
            exit::USAGE,
            format!("cannot start the heartbeat thread: {e}"),
        )
    })?;

    // Layer 3: nothing is loaded unless the memory is there now.
    let reading = read_host_memory(&proc_root).map_err(|e| fail(exit::TEMPORARY, e.to_string()))?;
    let check = precheck(args.required.bytes(), args.headroom.bytes(), reading);
    if !check.ok {
        let reason = check.summary();
        let _ = link.send(&WorkerMsg::Refused(Refused {
            reason: reason.clone(),
            available: check.available,
            required: check.required,
            headroom: check.headroom,
        }));
        return Err((exit::TEMPORARY, reason));
    }
    if let Some(w) = &check.warning {
        tracing::warn!("{w}");
    }

    // A template named by the config is read and compiled before the model loads.
    let chosen = args
        .chat_template
        .as_deref()
        .map(crate::template::choose)
        .transpose()
        .map_err(|e| fail(exit::USAGE, e))?;
    let file = probe_model_file(&args.model).map_err(|e| fail(exit::BAD_MODEL, e.to_string()))?;
    check_header(&file.path, file.size).map_err(|e| fail(exit::BAD_MODEL, e))?;
    let identity = Identity::of_model(&file.path, args.ctx).map_err(|e| {
        fail(
            exit::BAD_MODEL,
            format!("cannot read {}: {e}", file.path.display()),
        )
    })?;
    let files = SessionFiles::new(&args.state_dir, identity.model_id()).map_err(|e| {
        fail(
            exit::USAGE,
            format!("cannot create state dir {}: {e}", args.state_dir.display()),
        )
    })?;

    let started = Instant::now();
    let progress = Progress::new(link.clone());
    let load_progress = progress.clone();
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(args.gpu_layers)
        .with_main_gpu(i32::try_from(args.gpu_device).unwrap_or(0))
        .with_use_mmap(!args.no_mmap)
        .with_progress_callback(move |f| {
            load_progress.report(f * LOAD_SHARE);
            true
        });
    let model = LlamaModel::load_from_file(backend, &file.path, &params).map_err(|e| {
        fail(
            load_code,
            format!(
                "llama.cpp cannot load {}: {e}; its architecture may be unsupported (the worker's log has llama.cpp's reason)",
                file.path.display()
            ),
        )
    })?;
    let threads = args.threads.unwrap_or_else(belljar_host::cpu_count).max(1);
    let chat = crate::template::load(&model, chosen).map_err(|e| fail(exit::USAGE, e))?;
    tracing::info!("chat template: {}", chat.what);
    let setup = Setup {
        ctx_len: args.ctx,
        threads,
        fault: args.fault,
        chat,
    };
    let mut engine =
        Engine::new(backend, &model, setup, files, identity).map_err(|e| fail(load_code, e))?;
    // A re-prefill moves the bar from LOAD_SHARE to RESTORE_END every quarter second or so, so
    // the supervisor's load watchdog sees progress however long the conversation; writing its
    // state back comes after that.
    let restored = engine
        .restore(|done, total| {
            progress
                .report(LOAD_SHARE + (RESTORE_END - LOAD_SHARE) * done as f32 / total.max(1) as f32)
        })
        // The session could not even be set aside: an I/O problem, retried (never permanent).
        .map_err(|e| fail(exit::IO_ERROR, e))?;
    progress.report(1.0);

    let _ = link.send(&WorkerMsg::Ready(Ready {
        load_ms: started.elapsed().as_millis() as u64,
        rss: read_rss(&proc_root, None).unwrap_or(0),
        model_bytes: model.size(),
        ctx: engine.n_ctx(),
        state_bytes: engine.state_bytes(),
        session: engine.session_info(restored),
    }));
    state.set(WorkerState::Ready);
    serve(&link, &rx, &mut engine, &state);
    engine.clean_temp();
    Ok(())
}

/// The request loop. Returns on Shutdown or when the supervisor goes away; the session is
/// durable after every request, so there is nothing left to save then. Messages are taken in
/// before the next queued prompt is served, so a Cancel reaches a queued request in time.
fn serve(link: &Link, rx: &Receiver<Inbound>, engine: &mut Engine<'_>, state: &SharedState) {
    let mut queue: VecDeque<Prompt> = VecDeque::new();
    loop {
        let inbound = match rx.try_recv() {
            Ok(m) => Some(m),
            Err(TryRecvError::Empty) if !queue.is_empty() => None,
            Err(TryRecvError::Empty) => Some(rx.recv().unwrap_or(Inbound::Closed)),
            Err(TryRecvError::Disconnected) => Some(Inbound::Closed),
        };
        if let Some(m) = inbound {
            match take(link, m, None, &mut queue) {
                Event::Stop => return,
                Event::Pressure(level) => on_pressure(engine, level, true),
                Event::None | Event::CancelCurrent => {}
            }
            continue;
        }
        let Some(p) = queue.pop_front() else {
            continue;
        };
        state.set(WorkerState::Busy);
        let stop = answer(link, rx, engine, &p, &mut queue);
        state.set(WorkerState::Ready);
        if stop {
            return;
        }
    }
}

/// What an inbound message asks of the request loop.
enum Event {
    None,
    /// Shutdown, or the supervisor went away.
    Stop,
    /// A Cancel for the request being generated.
    CancelCurrent,
    Pressure(Level),
}

/// Takes one inbound message while `current` (if any) is being generated: prompts are queued
/// (at most [`MAX_QUEUED`]), a Cancel for a queued prompt removes it and answers it, a Cancel
/// for an unknown id is ignored, bad frames are answered.
fn take(
    link: &Link,
    inbound: Inbound,
    current: Option<u64>,
    queue: &mut VecDeque<Prompt>,
) -> Event {
    match inbound {
        Inbound::Msg(SupervisorMsg::Prompt(q)) if queue.len() < MAX_QUEUED => queue.push_back(q),
        Inbound::Msg(SupervisorMsg::Prompt(q)) => error_reply(
            link,
            Some(q.id),
            ErrorKind::Internal,
            format!("{MAX_QUEUED} requests are already queued; retry when one is done"),
        ),
        Inbound::Msg(SupervisorMsg::Cancel(c)) if current == Some(c.id) => {
            return Event::CancelCurrent;
        }
        Inbound::Msg(SupervisorMsg::Cancel(c)) => {
            if let Some(at) = queue.iter().position(|q| q.id == c.id) {
                queue.remove(at);
                tracing::info!("request {} cancelled while queued", c.id);
                let _ = link.send(&WorkerMsg::Done(Done {
                    id: c.id,
                    finish: Finish::Cancelled,
                    ..Done::default()
                }));
            } else {
                tracing::debug!("Cancel for request {}, which is not here: ignored", c.id);
            }
        }
        Inbound::Msg(SupervisorMsg::Shutdown(_)) | Inbound::Closed => return Event::Stop,
        Inbound::Msg(SupervisorMsg::Pressure(p)) => return Event::Pressure(p.level),
        Inbound::Msg(other) => error_reply(
            link,
            None,
            ErrorKind::Internal,
            format!("unexpected message {other:?} after the handshake"),
        ),
        Inbound::Bad(e) => error_reply(link, None, ErrorKind::Internal, e),
    }
    Event::None
}

/// Serves one prompt; returns true when the worker must stop (Shutdown or link closed).
fn answer(
    link: &Link,
    rx: &Receiver<Inbound>,
    engine: &mut Engine<'_>,
    p: &Prompt,
    queue: &mut VecDeque<Prompt>,
) -> bool {
    let mut stop = false;
    let mut pressure: Option<Level> = None;
    let id = p.id;
    let outcome = engine.answer(
        p,
        |text| {
            let _ = link.send(&WorkerMsg::Token(Token { id, text }));
        },
        || {
            // Between tokens: take in new messages; act on Cancel and Shutdown.
            loop {
                let inbound = match rx.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => return Control::Continue,
                    Err(TryRecvError::Disconnected) => Inbound::Closed,
                };
                match take(link, inbound, Some(id), queue) {
                    Event::None => {}
                    Event::Stop => {
                        stop = true;
                        return Control::Abort;
                    }
                    Event::CancelCurrent => return Control::Cancel,
                    // Busy: finish the request first, free the context after it.
                    Event::Pressure(level) => pressure = Some(level),
                }
            }
        },
    );
    match outcome {
        Ok(Outcome::Done {
            tokens,
            prompt_tokens,
            cached_tokens,
            ms,
            finish,
        }) => {
            if finish == Finish::Cancelled {
                tracing::info!("request {id} cancelled after {tokens} tokens");
            }
            let _ = link.send(&WorkerMsg::Done(Done {
                id,
                tokens,
                ms,
                prompt_tokens,
                cached_tokens,
                finish,
            }));
        }
        Ok(Outcome::Aborted) => error_reply(
            link,
            Some(id),
            ErrorKind::Aborted,
            "request aborted: the worker is shutting down (the partial reply is not kept in the conversation)".into(),
        ),
        // A request that cannot be served (too long, empty) is answered and the worker goes on.
        Err(ReqError::Invalid(e)) => error_reply(link, Some(id), ErrorKind::Invalid, e),
        Err(ReqError::Internal(e)) => error_reply(link, Some(id), ErrorKind::Internal, e),
    }
    if let Some(level) = pressure {
        on_pressure(engine, level, false);
    }
    stop
}

/// `serve --help`'s epilogue: an example and the exit codes, from the one table in
/// belljar_protocol::exit (docs/protocol.md shows the same table).
fn serve_help() -> String {
    let mut help = String::from(
        "Example (by hand, against a test listener):\n  \
worker serve --connect /tmp/link.sock --instance subject --model models/demo.gguf --state-dir /tmp/subject\n\n\
Exit codes (docs/protocol.md):",
    );
    for (code, kind, meaning) in exit::TABLE {
        help.push_str(&format!("\n  {code:>3}  {:<9}  {meaning}", kind.as_str()));
    }
    help
}

/// Memory pressure from the supervisor: at `critical` and above the context is freed (the
/// session is already on disk) and rebuilt on the next prompt.
fn on_pressure(engine: &mut Engine<'_>, level: Level, idle: bool) {
    if level >= Level::Critical {
        if engine.free_context() {
            tracing::warn!(
                "memory pressure {level}: freed the context (reloaded on the next prompt)"
            );
        }
    } else {
        tracing::info!(
            "memory pressure {level}{}",
            if idle { "" } else { " (while busy)" }
        );
    }
}

fn error_reply(link: &Link, id: Option<u64>, kind: ErrorKind, message: String) {
    match kind {
        ErrorKind::Invalid | ErrorKind::Aborted => tracing::info!("request not served: {message}"),
        ErrorKind::Internal => tracing::warn!("request error: {message}"),
    }
    let _ = link.send(&WorkerMsg::Error(ErrorReply { id, message, kind }));
}

/// Checks the GGUF header before llama.cpp sees the file: a malformed or truncated file is a bad
/// model (permanent), with a precise reason.
fn check_header(path: &std::path::Path, size: u64) -> Result<(), String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let header = belljar_gguf::read_header(std::io::BufReader::new(f))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(expected) = header.expected_file_size().filter(|e| *e > size) {
        return Err(format!(
            "{} is truncated: its header describes {expected} bytes but the file has {size}; copy or download it again",
            path.display()
        ));
    }
    Ok(())
}

fn spawn_heartbeat(
    link: Link,
    state: Arc<SharedState>,
    every: Duration,
    proc_root: ProcRoot,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let rss = read_rss(&proc_root, None).unwrap_or(0);
                if link
                    .send(&WorkerMsg::Heartbeat(Heartbeat {
                        rss,
                        state: state.get(),
                    }))
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Sends `Loading` at most every [`PROGRESS_INTERVAL`], always the final 1.0, never backwards.
#[derive(Clone)]
struct Progress {
    link: Link,
    last: Arc<Mutex<(Option<Instant>, f32)>>,
}

impl Progress {
    fn new(link: Link) -> Progress {
        Progress {
            link,
            last: Arc::new(Mutex::new((None, 0.0))),
        }
    }

    fn report(&self, fraction: f32) {
        let fraction = fraction.clamp(0.0, 1.0);
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.0.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL)
            || (fraction >= 1.0 && last.1 < 1.0);
        if due && fraction >= last.1 {
            *last = (Some(Instant::now()), fraction);
            let _ = self.link.send(&WorkerMsg::Loading(Loading { fraction }));
        }
    }
}
