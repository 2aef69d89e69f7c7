//! The model host: a llama.cpp context holding one conversation (sequence 0), with the session
//! kept durable after every reply (see `session`).

use std::num::NonZeroU32;
use std::time::{Instant, SystemTime};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use belljar_chat::{Piece, Rendered};
use belljar_protocol::worker::{
    ChatMessage, Finish, Prompt, PromptMode, RestoredFrom, Sampling, SessionInfo,
};

use crate::session::{Identity, SessionFiles, StateMeta, StateReject, Turn, keep_newest};
use crate::stop::StopScan;
use crate::template::{ChatFormat, token_text};

/// The sequence every conversation lives in.
const SEQ: i32 = 0;
/// A re-prefill reports progress after each decode, sized to take about this long.
const PROGRESS_STEP: std::time::Duration = std::time::Duration::from_millis(250);
/// The smallest re-prefill decode, so that per-decode overhead stays small.
const MIN_PIECE: usize = 32;

/// A loaded context with its conversation.
pub struct Engine<'m> {
    backend: &'m LlamaBackend,
    model: &'m LlamaModel,
    /// `None` while freed under memory pressure; rebuilt (and the session restored from disk)
    /// on the next prompt.
    ctx: Option<LlamaContext<'m>>,
    ctx_len: u32,
    threads: i32,
    /// The context holds the session (its turns from `first_turn` on), not a request outside it.
    /// When false the next session turn restores the session from disk first.
    holds_session: bool,
    /// The tokens in the context, in order (KV positions 0..len).
    tokens: Vec<LlamaToken>,
    turns: Vec<Turn>,
    /// Index of the oldest turn still in the context.
    first_turn: usize,
    files: SessionFiles,
    identity: Identity,
    fault: Option<Fault>,
    chat: ChatFormat,
}

/// How the engine runs: its context, threads, chat template and test fault.
pub struct Setup {
    pub ctx_len: u32,
    pub threads: u32,
    pub fault: Option<Fault>,
    pub chat: ChatFormat,
}

/// How a request ended.
pub enum Outcome {
    /// Generation ended (a cancelled session turn is not kept: neither in the log nor in the
    /// context).
    Done {
        /// Tokens generated.
        tokens: u32,
        /// Tokens of the prompt (a chat request's as rendered).
        prompt_tokens: u32,
        /// Of those, or before them for a session turn, the tokens the context already held.
        cached_tokens: u32,
        ms: u64,
        finish: Finish,
    },
    /// Stopped early (Shutdown or the supervisor went away). The partial turn is not kept: it is
    /// neither in the log nor in the context, as the client hears that the request failed.
    Aborted,
}

/// A request that could not be served, and whose fault that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqError {
    /// The request's: too long, empty, bad settings. The message names the fix.
    Invalid(String),
    /// The worker's (llama.cpp failed, a disk error).
    Internal(String),
}

impl From<String> for ReqError {
    fn from(message: String) -> ReqError {
        ReqError::Internal(message)
    }
}

/// A fault injected on purpose, for tests only (`BELLJAR_FAULT`, docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `after-log-append:N`: SIGKILL itself right after turn N is in the log and before the
    /// state is saved (a kill in the worst place).
    AfterLogAppend { turn: usize },
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        let turn = s
            .strip_prefix("after-log-append:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unknown fault {s:?}; the one fault is after-log-append:N"))?;
        Ok(Fault::AfterLogAppend { turn })
    }
}

/// How the session came back at start: where from, and a note when something was set aside.
pub struct Restored {
    pub from: RestoredFrom,
    pub note: Option<String>,
}

/// What a generation step may be told by the caller between tokens.
pub enum Control {
    Continue,
    /// The client went away: stop and answer `Done` (`finish: cancelled`).
    Cancel,
    /// The worker is stopping: the request fails.
    Abort,
}

/// Temperatures below this are greedy: dividing logits by them could overflow to infinity.
const MIN_TEMPERATURE: f32 = 1e-3;

const NO_CONTEXT: &str = "the context is not loaded";

impl<'m> Engine<'m> {
    pub fn new(
        backend: &'m LlamaBackend,
        model: &'m LlamaModel,
        setup: Setup,
        files: SessionFiles,
        identity: Identity,
    ) -> Result<Engine<'m>, String> {
        let Setup {
            ctx_len,
            threads,
            fault,
            chat,
        } = setup;
        let mut engine = Engine {
            backend,
            model,
            ctx: None,
            ctx_len,
            threads: i32::try_from(threads).unwrap_or(i32::MAX),
            holds_session: true,
            tokens: Vec::new(),
            turns: Vec::new(),
            first_turn: 0,
            files,
            identity,
            fault,
            chat,
        };
        engine.create_context()?;
        Ok(engine)
    }

    fn create_context(&mut self) -> Result<(), String> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.ctx_len))
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            // Sliding-window layers keep a full-size KV cache (llama.cpp's library default, said
            // here on purpose): prefix reuse cuts the context at any position and needs the
            // window before the cut, which a windowed cache has already overwritten, and a
            // restored session continues from any length. The estimate counts them full-size.
            .with_swa_full(true);
        let ctx = self.model.new_context(self.backend, params).map_err(|e| {
            format!(
                "llama.cpp cannot create a context of {} tokens: {e}",
                self.ctx_len
            )
        })?;
        self.ctx = Some(ctx);
        Ok(())
    }

    /// Frees the context (its KV cache and buffers) under memory pressure. The session is on
    /// disk after every reply, so nothing is lost; the next prompt restores it. Returns whether
    /// anything was freed.
    pub fn free_context(&mut self) -> bool {
        let freed = self.ctx.take().is_some();
        self.tokens.clear();
        freed
    }

    /// Makes the context hold the session: a freed context is rebuilt and the session restored
    /// into it from disk; a context that holds a request outside the session is cleared and the
    /// session restored the same way (its saved state, else a re-prefill from the log).
    fn ensure_session(&mut self) -> Result<(), String> {
        if self.ctx.is_none() {
            self.create_context()?;
            self.holds_session = false;
            let restored = self.restore(|_, _| {})?;
            self.holds_session = true;
            tracing::warn!(
                "context reloaded after memory pressure (session restored from {})",
                restored.from.as_str()
            );
        } else if !self.holds_session {
            let started = Instant::now();
            self.ctx()?.clear_kv_cache();
            self.tokens.clear();
            let from = self.restore_turns(&mut |_, _| {})?;
            self.holds_session = true;
            tracing::info!(
                "session restored from {} after a request outside it: {} turns, {} tokens in {} ms",
                from.as_str(),
                self.turns.len(),
                self.tokens.len(),
                started.elapsed().as_millis()
            );
        }
        Ok(())
    }

    /// Keeps the first `len` tokens of the context for a request outside the session and drops
    /// the rest (the session leaves the context: it is on disk after every turn). Returns how many
    /// were kept: all of the context is dropped when llama.cpp cannot remove a tail of it.
    fn keep_prefix(&mut self, len: usize) -> Result<usize, String> {
        self.holds_session = false;
        if self.tokens.len() > len {
            let p0 = u32::try_from(len).ok();
            let removed = self
                .ctx()?
                .clear_kv_cache_seq(Some(SEQ as u32), p0, None)
                .unwrap_or(false);
            if removed && p0.is_some() {
                self.tokens.truncate(len);
            } else {
                self.ctx()?.clear_kv_cache();
                self.tokens.clear();
            }
        }
        Ok(self.tokens.len())
    }

    fn ctx(&mut self) -> Result<&mut LlamaContext<'m>, String> {
        self.ctx.as_mut().ok_or_else(|| NO_CONTEXT.to_owned())
    }

    pub fn n_ctx(&self) -> u32 {
        self.ctx.as_ref().map_or(self.ctx_len, LlamaContext::n_ctx)
    }

    pub fn session_info(&self, restored: Restored) -> SessionInfo {
        SessionInfo {
            turns: self.turns.len() as u64,
            tokens: self.tokens.len() as u64,
            restored_from: restored.from,
            note: restored.note,
        }
    }

    /// Bytes of the conversation's state (what `session.state` holds).
    pub fn state_bytes(&self) -> u64 {
        self.ctx.as_ref().map_or(0, |c| {
            c.state_seq_get_size_ext(SEQ, LlamaStateSeqFlags::empty()) as u64
        })
    }

    /// Restores the conversation: the saved state when it is valid, else a re-prefill from the
    /// log, whose state is then saved at once (a kill between a turn's log append and its state
    /// save would otherwise make every later start re-prefill). `progress(done, total)` reports
    /// re-prefill progress. A session that cannot be restored (another model's, unreadable, or
    /// refused by llama.cpp) never stops the start: its files are moved aside and a new session
    /// starts, with a note saying so. Only when even that fails is this an error.
    pub fn restore(&mut self, mut progress: impl FnMut(usize, usize)) -> Result<Restored, String> {
        match self.files.clean_temp() {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} temp file(s) an interrupted save left behind"),
            Err(e) => tracing::warn!("cannot clean the session's temp files: {e}"),
        }
        let log = match self.files.load_log() {
            Ok(log) => log,
            Err(e) => {
                let why = format!("cannot read {}: {e}", self.files.log_path().display());
                return self.start_over(&why);
            }
        };
        for w in log.warnings {
            tracing::warn!("{w}");
        }
        let model = self.files.model();
        if let Some(saved) = log.model.filter(|m| *m != model) {
            let why = format!("the session belongs to another model ({saved}; now {model})");
            return self.start_over(&why);
        }
        let headerless = log.model.is_none() && !log.turns.is_empty();
        self.turns = log.turns;
        let from = match self.restore_turns(&mut progress) {
            Ok(from) => from,
            Err(e) => return self.start_over(&format!("the session cannot be restored: {e}")),
        };
        if headerless {
            // Written before the log named its model; it restored, so it is this model's.
            if let Err(e) = self.files.rewrite_log(&self.turns) {
                tracing::warn!("cannot add the model header to the session log: {e}");
            }
        }
        Ok(Restored { from, note: None })
    }

    fn restore_turns(
        &mut self,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<RestoredFrom, String> {
        match self
            .files
            .check_state(&self.identity, self.turns.len() as u64)
        {
            Ok(meta) => match self.apply_state(&meta) {
                Ok(()) => return Ok(RestoredFrom::State),
                Err(e) => {
                    tracing::warn!("session state not usable, re-prefilling from the log: {e}")
                }
            },
            Err(StateReject::Missing) if self.turns.is_empty() => return Ok(RestoredFrom::New),
            Err(e) => tracing::warn!("{e}; re-prefilling the session from the log"),
        }
        if self.turns.is_empty() {
            return Ok(RestoredFrom::New);
        }
        let first = keep_newest(&self.turns, self.n_ctx() as usize);
        let started = Instant::now();
        self.refill(first, progress)?;
        tracing::info!(
            "re-prefilled {} tokens of {} turns in {} ms",
            self.tokens.len(),
            self.turns.len() - first,
            started.elapsed().as_millis()
        );
        if let Err(e) = self.save_state() {
            // The conversation is intact in the log; the next turn tries again.
            tracing::warn!("cannot write the re-prefilled state back: {e}");
        }
        Ok(RestoredFrom::Log)
    }

    /// The session cannot be used: its files are moved aside (`*.stale`) and a new one starts.
    fn start_over(&mut self, why: &str) -> Result<Restored, String> {
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.clear_kv_cache();
        }
        self.tokens.clear();
        self.turns.clear();
        self.first_turn = 0;
        let moved = self
            .files
            .move_aside(SystemTime::now())
            .map_err(|e| format!("{why}; cannot move its files aside: {e}"))?;
        let note = if moved.is_empty() {
            format!("{why}; started a new session")
        } else {
            format!(
                "{why}; started a new session, the old files were moved aside ({})",
                moved.join(", ")
            )
        };
        tracing::warn!("{note}");
        Ok(Restored {
            from: RestoredFrom::New,
            note: Some(note),
        })
    }

    /// Has llama.cpp stream the checked KV file into the context (one layer's slice in memory
    /// at a time), then drops the file's pages from the cache.
    fn apply_state(&mut self, meta: &StateMeta) -> Result<(), String> {
        if meta.tokens.len() > self.n_ctx() as usize || meta.first_turn as usize > self.turns.len()
        {
            return Err("state does not fit this context".into());
        }
        let path = self.files.kv_path();
        let ctx = self.ctx()?;
        let loaded = ctx.state_seq_load_file(&path, SEQ, meta.tokens.len());
        crate::session::drop_cache(&path);
        let tokens = match loaded {
            Ok((tokens, _)) => tokens,
            Err(e) => {
                ctx.clear_kv_cache();
                return Err(format!("llama.cpp rejected the saved state: {e}"));
            }
        };
        if tokens.iter().map(|t| t.0).ne(meta.tokens.iter().copied()) {
            ctx.clear_kv_cache();
            return Err("the saved state's tokens differ from its metadata".into());
        }
        self.tokens = meta.tokens.iter().map(|t| LlamaToken(*t)).collect();
        self.first_turn = meta.first_turn as usize;
        Ok(())
    }

    /// Clears the context and decodes the turns from `first` on, in pieces sized so that each
    /// decode takes about [`PROGRESS_STEP`] (at least [`MIN_PIECE`] tokens, at most a
    /// micro-batch, which llama.cpp would run as one step anyway): `progress` moves that often
    /// however slow the machine, so a long re-prefill is never mistaken for a stalled load.
    fn refill(
        &mut self,
        first: usize,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<(), String> {
        self.ctx()?.clear_kv_cache();
        self.tokens.clear();
        self.first_turn = first;
        let all: Vec<LlamaToken> = self.turns[first..]
            .iter()
            .flat_map(|t| t.tokens.iter().map(|x| LlamaToken(*x)))
            .collect();
        // Pieces never exceed what one decode may take (n_batch: a context under 32 tokens has
        // a smaller one).
        let batch = (self.ctx()?.n_batch() as usize).max(1);
        let most = (self.ctx()?.n_ubatch() as usize).max(MIN_PIECE).min(batch);
        let least = MIN_PIECE.min(most);
        let mut piece = least;
        let mut done = 0;
        while done < all.len() {
            let end = (done + piece).min(all.len());
            let started = Instant::now();
            self.decode_in(&all[done..end], piece, &mut |_, _| {})?;
            let per_token = started.elapsed().as_secs_f64() / (end - done) as f64;
            done = end;
            progress(done, all.len());
            piece =
                ((PROGRESS_STEP.as_secs_f64() / per_token.max(1e-9)) as usize).clamp(least, most);
        }
        Ok(())
    }

    /// Decodes `tokens` at the end of the context in batches; logits only for the last one.
    fn decode(
        &mut self,
        tokens: &[LlamaToken],
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<(), String> {
        let n_batch = self.ctx()?.n_batch() as usize;
        self.decode_in(tokens, n_batch, progress)
    }

    /// [`Engine::decode`] in pieces of at most `n_batch` tokens.
    fn decode_in(
        &mut self,
        tokens: &[LlamaToken],
        n_batch: usize,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<(), String> {
        let n_batch = n_batch.max(1);
        let mut batch = LlamaBatch::new(n_batch, 1);
        for (chunk_no, chunk) in tokens.chunks(n_batch).enumerate() {
            batch.clear();
            let last_chunk = (chunk_no + 1) * n_batch >= tokens.len();
            for (i, tok) in chunk.iter().enumerate() {
                let pos = i32::try_from(self.tokens.len())
                    .map_err(|_| "context position overflow".to_owned())?;
                let logits = last_chunk && i + 1 == chunk.len();
                batch
                    .add(*tok, pos, &[SEQ], logits)
                    .map_err(|e| format!("cannot build a batch: {e}"))?;
                self.tokens.push(*tok);
            }
            self.ctx()?
                .decode(&mut batch)
                .map_err(|e| format!("llama.cpp decode failed: {e}"))?;
            progress(chunk_no * n_batch + chunk.len(), tokens.len());
        }
        Ok(())
    }

    /// Answers one prompt: `on_token(text)` for each generated token (the text that can be sent:
    /// a tail that may be the start of a stop text is held back), `control()` between tokens.
    /// Everything in `p` is checked first: a bad request is [`ReqError::Invalid`] and leaves the
    /// context as it was.
    pub fn answer(
        &mut self,
        p: &Prompt,
        on_token: impl FnMut(String),
        control: impl FnMut() -> Control,
    ) -> Result<Outcome, ReqError> {
        let started = Instant::now();
        crate::request::check(p).map_err(ReqError::Invalid)?;
        match p.mode {
            PromptMode::Session => self.answer_turn(p, started, on_token, control),
            PromptMode::Completion | PromptMode::Chat => {
                self.answer_outside(p, started, on_token, control)
            }
        }
    }

    /// The session's next turn. A finished turn is appended to the log and the state saved
    /// before this returns; a turn that is cancelled, aborted or fails is taken back out of the
    /// context and never logged, so the log holds exactly the replies that ended in `Done`
    /// without `finish: cancelled`. With a stop text, the logged reply is the text before it (as
    /// sent) and the turn's tokens are all the generated ones (as in the context).
    fn answer_turn(
        &mut self,
        p: &Prompt,
        started: Instant,
        on_token: impl FnMut(String),
        control: impl FnMut() -> Control,
    ) -> Result<Outcome, ReqError> {
        self.ensure_session()?;
        let prompt_tokens = if p.raw {
            self.model
                .vocab()
                .tokenize(p.text.as_bytes(), self.tokens.is_empty(), false)
        } else {
            let rendered = self.turn_prompt(&p.text)?;
            self.tokenize_pieces(&rendered.pieces, self.tokens.is_empty())
        };
        let n_ctx = self.n_ctx() as usize;
        let need = prompt_tokens.len() + p.max_tokens as usize;
        if need > n_ctx {
            return Err(ReqError::Invalid(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds ctx {n_ctx}; shorten the prompt, lower max_tokens or raise ctx",
                prompt_tokens.len(),
                p.max_tokens
            )));
        }
        if self.tokens.len() + need > n_ctx {
            let first = keep_newest(&self.turns, n_ctx - need).max(self.first_turn);
            tracing::info!(
                "context full: compacting to turns {first}.. of {} (keeping the newest that fit)",
                self.turns.len()
            );
            self.refill(first, &mut |_, _| {})?;
        }
        let before = self.tokens.len();
        let end = if p.raw { None } else { self.chat.end };
        let generated = match self.generate(&prompt_tokens, p.max_tokens, p, end, on_token, control)
        {
            Ok(Some(g)) => g,
            Ok(None) => {
                self.take_back(before);
                return Ok(Outcome::Aborted);
            }
            Err(e) => {
                self.take_back(before);
                return Err(e.into());
            }
        };
        let outcome = Outcome::Done {
            tokens: generated.tokens.len() as u32,
            prompt_tokens: prompt_tokens.len() as u32,
            cached_tokens: before as u32,
            ms: 0,
            finish: generated.finish,
        };
        if generated.finish == Finish::Cancelled {
            self.take_back(before);
            return Ok(outcome.at(started));
        }
        let turn = Turn {
            prompt: p.text.clone(),
            reply: generated.reply,
            tokens: prompt_tokens
                .iter()
                .chain(&generated.tokens)
                .map(|t| t.0)
                .collect(),
        };
        if let Err(e) = self.persist(turn) {
            self.take_back(before);
            return Err(e.into());
        }
        Ok(outcome.at(started))
    }

    /// A session turn's prompt through the chat template: what the conversation in the context,
    /// rendered with this message added, has beyond the context (the turns before it rendered
    /// the same way, and the last reply). A template that renders the conversation's start
    /// differently once it goes on has the turn rendered alone.
    fn turn_prompt(&self, text: &str) -> Result<Rendered, ReqError> {
        let message = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let mut history: Vec<ChatMessage> = Vec::new();
        for t in self.turns.get(self.first_turn..).unwrap_or_default() {
            history.push(message("user", &t.prompt));
            history.push(message("assistant", &t.reply));
        }
        let Some(last) = history.pop() else {
            return self.render_checked(&[message("user", text)], 0);
        };
        let mut before = self.chat.template.render(&history, true).map_err(refused)?;
        before.push_str(&last.content);
        history.push(last);
        history.push(message("user", text));
        let whole = self.render_checked(&history, history.len() - 1)?;
        if whole.text().starts_with(&before) {
            return Ok(whole.from_offset(before.len()));
        }
        tracing::warn!(
            "the chat template ({}) renders the conversation's start differently once it goes on; this turn is rendered alone",
            self.chat.what
        );
        self.render_checked(&[message("user", text)], 0)
    }

    /// `messages` through the chat template, ending where the reply starts. When the template
    /// changed the message text so that it cannot be told apart from the markup, the messages
    /// from `new` on must not hold a control token's text (a client could smuggle one in).
    fn render_checked(&self, messages: &[ChatMessage], new: usize) -> Result<Rendered, ReqError> {
        let rendered = self
            .chat
            .template
            .render_pieces(messages, true)
            .map_err(refused)?;
        if !rendered.exact {
            let vocab = self.model.vocab();
            for (i, m) in messages.iter().enumerate().skip(new) {
                let bytes = m.content.as_bytes();
                if vocab.tokenize(bytes, false, true) != vocab.tokenize(bytes, false, false) {
                    return Err(ReqError::Invalid(format!(
                        "message {i} holds the text of one of the model's control tokens, and this chat template ({}) changes message text (it trims it, say), so it cannot be kept apart from the template's markup; remove the control token's text",
                        self.chat.what
                    )));
                }
            }
        }
        Ok(rendered)
    }

    /// A request outside the session (`completion`, `chat`): nothing of it is logged or saved,
    /// and the next session turn restores the session first. The longest prefix of its prompt
    /// that the context holds is reused (unless `fresh`), so a chat that resends its history
    /// evaluates only what is new. `max_tokens` is clamped to what the context has left after
    /// the prompt.
    fn answer_outside(
        &mut self,
        p: &Prompt,
        started: Instant,
        on_token: impl FnMut(String),
        control: impl FnMut() -> Control,
    ) -> Result<Outcome, ReqError> {
        let (prompt_tokens, end) = match p.mode {
            PromptMode::Chat => {
                let rendered = self.render_checked(&p.messages, 0)?;
                (self.tokenize_pieces(&rendered.pieces, true), self.chat.end)
            }
            _ => {
                let whole = Piece {
                    text: p.text.clone(),
                    special: true,
                };
                (self.tokenize_pieces(&[whole], true), None)
            }
        };
        if self.ctx.is_none() {
            // Freed under memory pressure: rebuilt empty (the session comes back on its next
            // turn). llama.cpp may make it longer than asked, so it is measured once built.
            self.create_context()?;
            self.holds_session = false;
        }
        let n_ctx = self.n_ctx() as usize;
        if prompt_tokens.len() >= n_ctx {
            return Err(ReqError::Invalid(format!(
                "the prompt is {} tokens and the context holds {n_ctx}, leaving no room for a reply; shorten the prompt or raise ctx",
                prompt_tokens.len()
            )));
        }
        let max_tokens = p.max_tokens.min((n_ctx - prompt_tokens.len()) as u32);
        let common = if p.fresh {
            0
        } else {
            self.tokens
                .iter()
                .zip(&prompt_tokens)
                .take_while(|(a, b)| a == b)
                .count()
        };
        // At least the prompt's last token is evaluated: its logits start the reply.
        let cached = self.keep_prefix(common.min(prompt_tokens.len() - 1))?;
        let rest = &prompt_tokens[cached..];
        match self.generate(rest, max_tokens, p, end, on_token, control) {
            Ok(Some(g)) => Ok(Outcome::Done {
                tokens: g.tokens.len() as u32,
                prompt_tokens: prompt_tokens.len() as u32,
                cached_tokens: cached as u32,
                ms: 0,
                finish: g.finish,
            }
            .at(started)),
            Ok(None) => Ok(Outcome::Aborted),
            Err(e) => {
                // What the context holds after a failed decode is unknown: nothing is reused.
                if let Some(ctx) = self.ctx.as_mut() {
                    ctx.clear_kv_cache();
                }
                self.tokens.clear();
                Err(e.into())
            }
        }
    }

    /// Tokenizes a prompt as llama.cpp tokenizes a whole text with special-token parsing on
    /// (plain runs between control tokens, each run tokenized in one go), except that
    /// control-token texts in message text (the non-special pieces) stay plain text: only the
    /// template's markup yields control tokens. With `bos`, the BOS token first when the model
    /// wants one (a BOS text the template wrote at the start is dropped, not doubled).
    fn tokenize_pieces(&self, pieces: &[Piece], bos: bool) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        let add_bos = bos && vocab.should_add_bos();
        let mut bos_text = String::new();
        if add_bos {
            tokens.push(vocab.bos());
            bos_text = token_text(&vocab, vocab.bos());
        }
        let mut plain = String::new();
        let flush = |plain: &mut String, tokens: &mut Vec<LlamaToken>| {
            if !plain.is_empty() {
                vocab.tokenize_into(plain.as_bytes(), tokens, false, false);
                plain.clear();
            }
        };
        for (i, piece) in pieces.iter().enumerate() {
            let mut rest = piece.text.as_str();
            if !piece.special {
                plain.push_str(rest);
                continue;
            }
            if i == 0 && !bos_text.is_empty() {
                rest = rest.strip_prefix(bos_text.as_str()).unwrap_or(rest);
            }
            // The control tokens llama.cpp finds in the markup, located in order.
            for tok in vocab.tokenize(rest.as_bytes(), false, true) {
                if !is_special(&vocab, tok) {
                    continue; // an ordinary token: part of a plain run
                }
                let text = token_text(&vocab, tok);
                let Some(at) = rest.find(text.as_str()) else {
                    continue;
                };
                plain.push_str(&rest[..at]);
                flush(&mut plain, &mut tokens);
                tokens.push(tok);
                rest = &rest[at + text.len()..];
            }
            plain.push_str(rest);
        }
        flush(&mut plain, &mut tokens);
        tokens
    }

    /// The sampler chain for `s` (checked): penalties when they are not neutral, then greedy at
    /// temperature 0, else top-k, top-p, min-p (each when on), temperature and a seeded draw.
    fn sampler(&self, s: &Sampling) -> LlamaSampler {
        let mut chain = Vec::new();
        if penalties_on(s) {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                i32::try_from(s.penalty_last_n).unwrap_or(i32::MAX),
                s.repeat_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            ));
        }
        if s.temperature < MIN_TEMPERATURE {
            if chain.is_empty() {
                return LlamaSampler::greedy();
            }
            chain.push(LlamaSampler::greedy());
            return LlamaSampler::chain_simple(chain);
        }
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(
                i32::try_from(s.top_k).unwrap_or(i32::MAX),
            ));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        // No seed: llama.cpp draws one (LLAMA_DEFAULT_SEED means random).
        chain.push(LlamaSampler::dist(s.seed.unwrap_or(u32::MAX)));
        LlamaSampler::chain_simple(chain)
    }

    /// Decodes the prompt and generates up to `max_tokens`, sampling with `p.sampling` and
    /// stopping at `p.stop` (and `end`, a template's end of turn); `None` when `control`
    /// aborted it.
    fn generate(
        &mut self,
        prompt_tokens: &[LlamaToken],
        max_tokens: u32,
        p: &Prompt,
        end: Option<&str>,
        mut on_token: impl FnMut(String),
        mut control: impl FnMut() -> Control,
    ) -> Result<Option<Generated>, String> {
        self.decode(prompt_tokens, &mut |_, _| {})?;
        let mut sampler = self.sampler(&p.sampling);
        if penalties_on(&p.sampling) {
            // The penalties look at the text so far, the prompt (the conversation) included.
            let last = self
                .tokens
                .len()
                .saturating_sub(p.sampling.penalty_last_n as usize);
            sampler.accept_many(&self.tokens[last..]);
        }
        let mut stop = StopScan::new(p.stop.iter().cloned().chain(end.map(str::to_owned)));
        let mut decoder = encoding_rs::UTF_8.new_decoder();
        let mut reply = String::new();
        let mut tokens: Vec<LlamaToken> = Vec::new();
        let mut finish = Finish::Length;
        for i in 0..max_tokens {
            let ctx = self.ctx.as_ref().ok_or_else(|| NO_CONTEXT.to_owned())?;
            let tok = sampler.sample(ctx, -1);
            if !p.ignore_eos && self.model.vocab().is_eog(tok) {
                finish = Finish::Stop;
                break;
            }
            let piece = self.model.vocab().token_to_piece(tok, false, None);
            let mut text = String::new();
            reserve_for(&mut text, &decoder, piece.len());
            let last = i + 1 == max_tokens;
            let _ = decoder.decode_to_string(&piece, &mut text, last);
            let step = stop.push(&text);
            let mut emit = step.emit;
            if last {
                // The last token's frame carries what was held back: one frame per token.
                emit.push_str(&stop.finish());
            }
            reply.push_str(&emit);
            on_token(emit);
            self.decode(&[tok], &mut |_, _| {})?;
            tokens.push(tok);
            if step.stopped {
                finish = Finish::Stop;
                break;
            }
            if last {
                break;
            }
            match control() {
                Control::Continue => {}
                Control::Cancel => {
                    return Ok(Some(Generated {
                        reply,
                        tokens,
                        finish: Finish::Cancelled,
                    }));
                }
                Control::Abort => return Ok(None),
            }
        }
        if finish == Finish::Stop {
            // The model ended its turn (a stop text leaves nothing held): an incomplete character
            // becomes U+FFFD, and what was held back is sent in one more frame.
            let mut tail = String::new();
            reserve_for(&mut tail, &decoder, 0);
            let _ = decoder.decode_to_string(&[], &mut tail, true);
            let mut rest = stop.push(&tail).emit;
            rest.push_str(&stop.finish());
            if !rest.is_empty() {
                reply.push_str(&rest);
                on_token(rest);
            }
        }
        Ok(Some(Generated {
            reply,
            tokens,
            finish,
        }))
    }

    /// Takes a turn that did not finish back out of the context: positions from `len` on are
    /// removed, so the context again matches the logged turns. If llama.cpp cannot remove them,
    /// the context is freed and restored from disk on the next prompt.
    fn take_back(&mut self, len: usize) {
        if self.tokens.len() <= len {
            return;
        }
        let removed = u32::try_from(len).ok().and_then(|p0| {
            self.ctx
                .as_mut()
                .and_then(|c| c.clear_kv_cache_seq(Some(SEQ as u32), Some(p0), None).ok())
        });
        if removed == Some(true) {
            self.tokens.truncate(len);
        } else {
            self.free_context();
        }
    }

    /// Appends the turn to the log (fsync) and saves the state atomically. Once the turn is in the
    /// log it is durable (a start re-prefills it if the state is older), so a failed state save
    /// is logged, not an error.
    fn persist(&mut self, turn: Turn) -> Result<(), String> {
        self.files
            .append(&turn)
            .map_err(|e| format!("cannot append to {}: {e}", self.files.log_path().display()))?;
        self.turns.push(turn);
        if self.fault
            == Some(Fault::AfterLogAppend {
                turn: self.turns.len(),
            })
        {
            tracing::warn!(
                "BELLJAR_FAULT: killing this worker after appending turn {}, before saving the state",
                self.turns.len()
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        if let Err(e) = self.save_state() {
            tracing::warn!("{e}; the turn is in the log and is re-prefilled from there");
        }
        Ok(())
    }

    /// Removes any temp file left in the session dir (at a clean exit: none should be).
    pub fn clean_temp(&self) {
        if let Err(e) = self.files.clean_temp() {
            tracing::warn!("cannot clean the session's temp files: {e}");
        }
    }

    /// Saves the context's state and its metadata atomically (temp files, then renames). A
    /// failed save leaves no temp file behind.
    fn save_state(&mut self) -> Result<(), String> {
        let saved = self.write_state();
        if saved.is_err() {
            let _ = self.files.clean_temp();
        }
        saved
    }

    fn write_state(&mut self) -> Result<(), String> {
        // llama.cpp streams the state to the file one layer's slice at a time: a long context is
        // never copied whole into the worker's memory.
        let tmp = self.files.kv_tmp_path();
        let tokens = self.tokens.clone();
        self.ctx()?
            .state_seq_save_file(&tmp, SEQ, &tokens)
            .map_err(|e| format!("cannot save the session state to {}: {e}", tmp.display()))?;
        let meta = StateMeta {
            identity: self.identity.clone(),
            turns: self.turns.len() as u64,
            first_turn: self.first_turn as u64,
            tokens: self.tokens.iter().map(|t| t.0).collect(),
            state_len: 0,
            state_crc32: 0,
        };
        self.files
            .commit_state(meta)
            .map_err(|e| format!("cannot save {}: {e}", self.files.state_path().display()))
    }
}

/// A finished (or cancelled) generation.
struct Generated {
    /// The text sent (without a stop text).
    reply: String,
    tokens: Vec<LlamaToken>,
    finish: Finish,
}

impl Outcome {
    /// The outcome with its time taken since `started`.
    fn at(self, started: Instant) -> Outcome {
        match self {
            Outcome::Done {
                tokens,
                prompt_tokens,
                cached_tokens,
                finish,
                ..
            } => Outcome::Done {
                tokens,
                prompt_tokens,
                cached_tokens,
                ms: started.elapsed().as_millis() as u64,
                finish,
            },
            Outcome::Aborted => Outcome::Aborted,
        }
    }
}

/// Whether special-token parsing yields `tok` (llama.cpp's rule: control, user-defined and
/// unknown tokens).
fn is_special(vocab: &llama_cpp_2::vocab::LlamaVocab<'_>, tok: LlamaToken) -> bool {
    use llama_cpp_2::token_type::LlamaTokenAttr as A;
    let attrs = vocab.attr(tok).0;
    attrs.contains(A::Control) || attrs.contains(A::UserDefined) || attrs.contains(A::Unknown)
}

/// A template's refusal (`raise_exception`, an error in it) is the request's problem.
fn refused(e: String) -> ReqError {
    ReqError::Invalid(format!("the chat template refused these messages: {e}"))
}

/// Whether any penalty is on (not its neutral value) and looks at some tokens.
fn penalties_on(s: &Sampling) -> bool {
    s.penalty_last_n > 0
        && (s.repeat_penalty != 1.0 || s.presence_penalty != 0.0 || s.frequency_penalty != 0.0)
}

/// Makes room for the decoder's worst case, so `decode_to_string` consumes the whole input
/// (it only writes into spare capacity). Invalid bytes become U+FFFD.
fn reserve_for(s: &mut String, decoder: &encoding_rs::Decoder, len: usize) {
    s.reserve(decoder.max_utf8_buffer_length(len).unwrap_or(len * 3 + 4));
}
