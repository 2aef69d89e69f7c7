//! The model host: a llama.cpp context holding one conversation (sequence 0), with the session
//! kept durable after every reply (see `session`).

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use belljar_protocol::worker::{RestoredFrom, SessionInfo};

use crate::session::{Identity, SessionFiles, StateMeta, StateReject, Turn, keep_newest};

/// The sequence every conversation lives in.
const SEQ: i32 = 0;

/// A loaded context with its conversation.
pub struct Engine<'m> {
    backend: &'m LlamaBackend,
    model: &'m LlamaModel,
    /// `None` while freed under memory pressure; rebuilt (and the session restored from disk)
    /// on the next prompt.
    ctx: Option<LlamaContext<'m>>,
    ctx_len: u32,
    threads: i32,
    sampler: LlamaSampler,
    /// The tokens in the context, in order (KV positions 0..len).
    tokens: Vec<LlamaToken>,
    turns: Vec<Turn>,
    /// Index of the oldest turn still in the context.
    first_turn: usize,
    files: SessionFiles,
    identity: Identity,
}

/// How a request ended.
pub enum Outcome {
    Done {
        tokens: u32,
        ms: u64,
    },
    /// Stopped early (Shutdown or the supervisor went away); the partial turn was persisted.
    Aborted,
}

/// What a generation step may be told by the caller between tokens.
pub enum Control {
    Continue,
    Abort,
}

const NO_CONTEXT: &str = "the context is not loaded";

impl<'m> Engine<'m> {
    pub fn new(
        backend: &'m LlamaBackend,
        model: &'m LlamaModel,
        ctx_len: u32,
        threads: u32,
        files: SessionFiles,
        identity: Identity,
    ) -> Result<Engine<'m>, String> {
        let mut engine = Engine {
            backend,
            model,
            ctx: None,
            ctx_len,
            threads: i32::try_from(threads).unwrap_or(i32::MAX),
            sampler: LlamaSampler::greedy(),
            tokens: Vec::new(),
            turns: Vec::new(),
            first_turn: 0,
            files,
            identity,
        };
        engine.create_context()?;
        Ok(engine)
    }

    fn create_context(&mut self) -> Result<(), String> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.ctx_len))
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
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

    /// Rebuilds a freed context and restores the session into it.
    fn ensure_context(&mut self) -> Result<(), String> {
        if self.ctx.is_none() {
            self.create_context()?;
            let from = self.restore(|_, _| {})?;
            tracing::warn!(
                "context reloaded after memory pressure (session restored from {})",
                from.as_str()
            );
        }
        Ok(())
    }

    fn ctx(&mut self) -> Result<&mut LlamaContext<'m>, String> {
        self.ctx.as_mut().ok_or_else(|| NO_CONTEXT.to_owned())
    }

    pub fn n_ctx(&self) -> u32 {
        self.ctx.as_ref().map_or(self.ctx_len, LlamaContext::n_ctx)
    }

    pub fn session_info(&self, restored_from: RestoredFrom) -> SessionInfo {
        SessionInfo {
            turns: self.turns.len() as u64,
            tokens: self.tokens.len() as u64,
            restored_from,
        }
    }

    /// Bytes of the conversation's state (what `session.state` holds).
    pub fn state_bytes(&self) -> u64 {
        self.ctx.as_ref().map_or(0, |c| {
            c.state_seq_get_size_ext(SEQ, LlamaStateSeqFlags::empty()) as u64
        })
    }

    /// Restores the conversation: the saved state when it is valid, else a re-prefill from the
    /// log. `progress(done, total)` reports re-prefill progress. Never fails on bad session files;
    /// only llama.cpp errors during re-prefill are errors.
    pub fn restore(
        &mut self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<RestoredFrom, String> {
        let (turns, warnings) = self
            .files
            .load_log()
            .map_err(|e| format!("cannot read {}: {e}", self.files.log_path().display()))?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        self.turns = turns;
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
        self.refill(first, &mut progress)?;
        Ok(RestoredFrom::Log)
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

    /// Clears the context and decodes the turns from `first` on.
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
        self.decode(&all, progress)
    }

    /// Decodes `tokens` at the end of the context in batches; logits only for the last one.
    fn decode(
        &mut self,
        tokens: &[LlamaToken],
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<(), String> {
        let n_batch = (self.ctx()?.n_batch() as usize).max(1);
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
            progress(self.tokens.len(), tokens.len());
        }
        Ok(())
    }

    /// Answers one prompt: `on_token(text)` per generated token, `control()` between tokens.
    /// The turn is appended to the log and the state saved before this returns.
    pub fn answer(
        &mut self,
        prompt: &str,
        max_tokens: u32,
        ignore_eos: bool,
        mut on_token: impl FnMut(String),
        mut control: impl FnMut() -> Control,
    ) -> Result<Outcome, String> {
        let started = Instant::now();
        if prompt.is_empty() {
            return Err("empty prompt; send some text".into());
        }
        self.ensure_context()?;
        let prompt_tokens =
            self.model
                .vocab()
                .tokenize(prompt.as_bytes(), self.tokens.is_empty(), false);
        let n_ctx = self.n_ctx() as usize;
        let need = prompt_tokens.len() + max_tokens as usize;
        if need > n_ctx {
            return Err(format!(
                "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds ctx {n_ctx}; shorten the prompt, lower max_tokens or raise ctx",
                prompt_tokens.len()
            ));
        }
        if self.tokens.len() + need > n_ctx {
            let first = keep_newest(&self.turns, n_ctx - need).max(self.first_turn);
            tracing::info!(
                "context full: compacting to turns {first}.. of {} (keeping the newest that fit)",
                self.turns.len()
            );
            self.refill(first, &mut |_, _| {})?;
        }
        self.decode(&prompt_tokens, &mut |_, _| {})?;

        let mut decoder = encoding_rs::UTF_8.new_decoder();
        let mut reply = String::new();
        let mut generated: Vec<LlamaToken> = Vec::new();
        let mut aborted = false;
        for _ in 0..max_tokens {
            let ctx = self.ctx.as_ref().ok_or_else(|| NO_CONTEXT.to_owned())?;
            let tok = self.sampler.sample(ctx, -1);
            if !ignore_eos && self.model.vocab().is_eog(tok) {
                break;
            }
            let piece = self.model.vocab().token_to_piece(tok, false, None);
            let mut text = String::new();
            reserve_for(&mut text, &decoder, piece.len());
            let _ = decoder.decode_to_string(&piece, &mut text, false);
            reply.push_str(&text);
            on_token(text);
            self.decode(&[tok], &mut |_, _| {})?;
            generated.push(tok);
            if let Control::Abort = control() {
                aborted = true;
                break;
            }
        }
        let mut tail = String::new();
        reserve_for(&mut tail, &decoder, 0);
        let _ = decoder.decode_to_string(&[], &mut tail, true);
        reply.push_str(&tail);

        let turn = Turn {
            prompt: prompt.to_owned(),
            reply,
            tokens: prompt_tokens
                .iter()
                .chain(&generated)
                .map(|t| t.0)
                .collect(),
        };
        self.persist(turn)?;
        if aborted {
            return Ok(Outcome::Aborted);
        }
        Ok(Outcome::Done {
            tokens: generated.len() as u32,
            ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Appends the turn to the log (fsync) and saves the state atomically.
    fn persist(&mut self, turn: Turn) -> Result<(), String> {
        self.files
            .append(&turn)
            .map_err(|e| format!("cannot append to {}: {e}", self.files.log_path().display()))?;
        self.turns.push(turn);
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

/// Makes room for the decoder's worst case, so `decode_to_string` consumes the whole input
/// (it only writes into spare capacity). Invalid bytes become U+FFFD.
fn reserve_for(s: &mut String, decoder: &encoding_rs::Decoder, len: usize) {
    s.reserve(decoder.max_utf8_buffer_length(len).unwrap_or(len * 3 + 4));
}
