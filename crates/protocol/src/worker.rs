//! Messages on the worker link: one socketpair per worker, so a worker can only ever speak for
//! itself. Every message is an enum variant carrying a struct, tagged by `"type"` in JSON.
//!
//! Handshake: the worker sends [`Hello`]; the supervisor answers [`Welcome`] with its protocol
//! version (a mismatch makes the worker send [`Failed`] and exit with its protocol code). Then
//! the worker sends [`Loading`] while it loads, and [`Ready`] or [`Refused`] / [`Failed`].

use serde::{Deserialize, Serialize};

/// Worker -> supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WorkerMsg {
    Hello(Hello),
    Refused(Refused),
    Failed(Failed),
    Loading(Loading),
    Ready(Ready),
    Heartbeat(Heartbeat),
    Token(Token),
    Done(Done),
    Error(ErrorReply),
}

impl WorkerMsg {
    /// The message as the supervisor may keep it: every text cut to [`crate::MAX_TEXT`] bytes.
    /// (A load fraction outside 0..=1 never gets this far: decoding refuses it,
    /// `crate::finite::fraction`.)
    pub fn sanitized(self) -> WorkerMsg {
        let short = |mut text: String| {
            crate::cut(&mut text, crate::MAX_TEXT);
            text
        };
        match self {
            WorkerMsg::Hello(h) => WorkerMsg::Hello(Hello {
                instance: short(h.instance),
                ..h
            }),
            WorkerMsg::Refused(r) => WorkerMsg::Refused(Refused {
                reason: short(r.reason),
                ..r
            }),
            WorkerMsg::Failed(f) => WorkerMsg::Failed(Failed {
                reason: short(f.reason),
                ..f
            }),
            WorkerMsg::Token(t) => WorkerMsg::Token(Token {
                text: short(t.text),
                ..t
            }),
            WorkerMsg::Error(e) => WorkerMsg::Error(ErrorReply {
                message: short(e.message),
                ..e
            }),
            WorkerMsg::Ready(mut r) => {
                r.session.note = r.session.note.map(short);
                WorkerMsg::Ready(r)
            }
            other @ (WorkerMsg::Loading(_) | WorkerMsg::Heartbeat(_) | WorkerMsg::Done(_)) => other,
        }
    }
}

/// Supervisor -> worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SupervisorMsg {
    Welcome(Welcome),
    Prompt(Prompt),
    Shutdown(Shutdown),
    Pressure(PressureNotice),
    Cancel(Cancel),
}

/// The client of request `id` went away: stop generating it. The worker answers with `Done`
/// (`finish: cancelled`), or not at all when the request had already finished or is unknown.
/// A cancelled session turn is not kept in the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub id: u64,
}

/// The host's memory pressure level changed. At `critical` and above an idle worker frees its
/// context (its session is already on disk) and loads it again on the next prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PressureNotice {
    pub level: Level,
}

/// A memory pressure level (the host's, or a GPU's), ordered from harmless to worst; spelled
/// `normal`, `warning`, `critical`, `emergency` on the wire, in logs and in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Normal,
    Warning,
    Critical,
    Emergency,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
            Level::Emergency => "emergency",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub instance: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
}

/// The pre-load check refused: nothing was loaded; retry when memory is free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
    pub available: u64,
    pub required: u64,
    pub headroom: u64,
}

/// The worker cannot go on (bad model, bad arguments, protocol mismatch). `exit_code` is the
/// code the worker is about to exit with; its class (crate::exit) says whether retrying helps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    pub reason: String,
    pub exit_code: u8,
    /// The failure was allocating GPU memory (the worker exits 71).
    #[serde(default)]
    pub gpu_alloc: bool,
}

impl Failed {
    /// Retrying cannot help: the exit code's class is permanent.
    pub fn permanent(&self) -> bool {
        crate::exit::kind(i32::from(self.exit_code)) == crate::exit::ExitKind::Permanent
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Loading {
    /// 0.0 ..= 1.0 over model load and session restore together.
    #[serde(deserialize_with = "crate::finite::fraction")]
    pub fraction: f32,
}

/// Where the session came from at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoredFrom {
    /// The saved context state was valid: no re-prefill.
    State,
    /// The state file was missing, corrupt or for another model/ctx: re-prefilled from the log.
    Log,
    /// No previous conversation.
    New,
}

impl RestoredFrom {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoredFrom::State => "state",
            RestoredFrom::Log => "log",
            RestoredFrom::New => "new",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Turns (prompt + reply) in the conversation so far.
    pub turns: u64,
    /// Tokens in the context now.
    pub tokens: u64,
    pub restored_from: RestoredFrom,
    /// Set when the previous session could not be used and was moved aside (why, and where
    /// its files went); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub load_ms: u64,
    pub rss: u64,
    /// Bytes of model weights as llama.cpp reports them.
    pub model_bytes: u64,
    pub ctx: u32,
    pub session: SessionInfo,
    /// Size of the context's state (KV cache in use and outputs) as llama.cpp reports it.
    pub state_bytes: u64,
}

/// What the worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Loading,
    Ready,
    Busy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub rss: u64,
    pub state: WorkerState,
}

/// One request. `mode` says what the text is: the next turn of the persistent session (`ask`,
/// appended to the conversation and saved), or a request outside it (`completion`: a raw
/// prompt; `chat`: `messages`, rendered by the worker's chat template). A request outside the
/// session may use the context; the next session turn restores the session's saved state first.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Prompt {
    pub id: u64,
    #[serde(default)]
    pub mode: PromptMode,
    /// The session turn's or the completion's text (empty for `chat`).
    #[serde(default)]
    pub text: String,
    /// The conversation of a `chat` request, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    /// The most tokens to generate. A `completion` or `chat` request's is clamped to what the
    /// context has left after the prompt; a session turn's must fit beside its prompt.
    pub max_tokens: u32,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub sampling: Sampling,
    /// Generation stops before any of these texts, which are not sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// A session turn's text goes to the model as is, not through the chat template.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
    /// Evaluate the whole prompt: reuse nothing the context already holds (llama.cpp server's
    /// `cache_prompt: false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptMode {
    /// The persistent session's next turn.
    #[default]
    Session,
    /// A raw prompt, outside the session.
    Completion,
    /// Chat messages, outside the session.
    Chat,
}

/// The roles a chat message may have.
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The most stop texts a request may have (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// The longest stop text, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Why these stop texts cannot be used, if they cannot.
pub fn check_stops(stops: &[String]) -> Result<(), String> {
    if stops.len() > MAX_STOPS {
        return Err(format!(
            "{} stop texts given; send at most {MAX_STOPS}",
            stops.len()
        ));
    }
    for (i, s) in stops.iter().enumerate() {
        if s.is_empty() {
            return Err(format!(
                "stop text {i} is empty; leave it out (an empty text would stop at once)"
            ));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(format!(
                "stop text {i} is {} bytes; each may have at most {MAX_STOP_BYTES}",
                s.len()
            ));
        }
    }
    Ok(())
}

/// One chat message: its role (one of [`CHAT_ROLES`]) and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The sampler chain's settings (llama.cpp's samplers). The default is greedy: temperature 0
/// picks the most likely token, and the other settings are off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// 0 is greedy.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub temperature: f32,
    /// Nucleus sampling; 1 is off.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub top_p: f32,
    /// 0 is off.
    pub top_k: u32,
    /// 0 is off.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub min_p: f32,
    /// The random seed; none picks one.
    pub seed: Option<u32>,
    /// 1 is off.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub repeat_penalty: f32,
    /// 0 is off.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub presence_penalty: f32,
    /// 0 is off.
    #[serde(deserialize_with = "crate::finite::f32")]
    pub frequency_penalty: f32,
    /// How many of the last tokens the penalties look at.
    pub penalty_last_n: u32,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
        }
    }
}

impl Sampling {
    /// Why these settings cannot be used, if they cannot (each bound as OpenAI's API has it).
    pub fn check(&self) -> Result<(), String> {
        let within = |name: &str, v: f32, lo: f32, hi: f32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be from {lo} to {hi}, got {v}"))
            }
        };
        within("temperature", self.temperature, 0.0, 2.0)?;
        within("top_p", self.top_p, 0.0, 1.0)?;
        within("min_p", self.min_p, 0.0, 1.0)?;
        // llama.cpp divides logits by it: 0 is not a penalty.
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0) {
            return Err(format!(
                "repeat_penalty must be above 0 and at most 10, got {}",
                self.repeat_penalty
            ));
        }
        within("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        within("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.penalty_last_n > 1 << 20 {
            return Err(format!(
                "penalty_last_n must be at most {}, got {}",
                1 << 20,
                self.penalty_last_n
            ));
        }
        Ok(())
    }
}

/// One generated token. `text` is decoded incrementally as UTF-8: empty while a multi-byte
/// character is incomplete; invalid bytes come out as U+FFFD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: u64,
    pub text: String,
}

/// The request is complete (a session turn: and durable on disk), or was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {
    pub id: u64,
    /// Tokens generated (sent or held back by a stop string).
    pub tokens: u32,
    pub ms: u64,
    /// Tokens of the prompt (a chat request's: rendered by its template; a session turn's: the
    /// turn's own, without the conversation before it).
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Tokens the context already held and were not evaluated again: of a `completion` or `chat`
    /// request, its prompt's longest prefix that the context held (at most `prompt_tokens - 1`);
    /// of a session turn, the conversation before it.
    #[serde(default)]
    pub cached_tokens: u32,
    #[serde(default)]
    pub finish: Finish,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Finish {
    /// The model ended its turn, or a stop text came.
    #[default]
    Stop,
    /// `max_tokens` (or the context) ran out.
    Length,
    /// A `Cancel` came.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// A request or frame the worker could not serve; it keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The request it answers, when known.
    pub id: Option<u64>,
    pub message: String,
    /// Whose fault it is: the request's (`invalid`: too long, empty, bad settings; an HTTP
    /// client gets 400), the worker's (`internal`, the default), or nobody's (`aborted`: the
    /// worker is stopping; the supervisor serves the request again when its next run is ready,
    /// as for any run that ends mid-request).
    #[serde(default)]
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    Invalid,
    #[default]
    Internal,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Shutdown {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_json() {
        let m = WorkerMsg::Hello(Hello {
            protocol_version: 1,
            instance: "a".into(),
            pid: 7,
        });
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"Hello","protocol_version":1,"instance":"a","pid":7}"#
        );
        assert_eq!(serde_json::from_str::<WorkerMsg>(&s).unwrap(), m);
        let p: SupervisorMsg =
            serde_json::from_str(r#"{"type":"Prompt","id":1,"text":"hi","max_tokens":4}"#).unwrap();
        assert!(matches!(
            p,
            SupervisorMsg::Prompt(Prompt {
                ignore_eos: false,
                ..
            })
        ));
        assert!(serde_json::from_str::<SupervisorMsg>(r#"{"type":"Nope"}"#).is_err());
        let s = serde_json::to_string(&RestoredFrom::State).unwrap();
        assert_eq!(s, r#""state""#);
    }

    #[test]
    fn stop_texts_are_checked_against_their_limits() {
        assert!(check_stops(&[]).is_ok());
        assert!(check_stops(&vec!["s".to_owned(); 4]).is_ok());
        let five = vec!["s".to_owned(); 5];
        assert!(check_stops(&five).unwrap_err().contains("at most 4"));
        assert!(check_stops(&["x".repeat(257)]).unwrap_err().contains("256"));
        assert!(check_stops(&["x".repeat(256)]).is_ok());
        assert!(check_stops(&[String::new()]).unwrap_err().contains("empty"));
    }

    #[test]
    fn sanitized_cuts_texts_and_refuses_impossible_fractions() {
        let huge = "x".repeat(1 << 20);
        let failed = WorkerMsg::Failed(Failed {
            reason: huge.clone(),
            exit_code: 65,
            gpu_alloc: false,
        });
        let WorkerMsg::Failed(f) = failed.sanitized() else {
            panic!("the variant changed");
        };
        assert!(f.reason.len() <= crate::MAX_TEXT);
        assert_eq!(f.exit_code, 65);
        // Impossible fractions never reach sanitized(): decoding refuses them (crate::finite);
        // 1e39 does not fit an f32 (it would be infinite).
        for bad in ["1e39", "-1e39", "-0.5", "1.5"] {
            let json = format!(r#"{{"type":"Loading","fraction":{bad}}}"#);
            assert!(serde_json::from_str::<WorkerMsg>(&json).is_err(), "{bad}");
        }
        let fine = WorkerMsg::Loading(Loading { fraction: 0.5 });
        assert_eq!(fine.clone().sanitized(), fine);
        let token = WorkerMsg::Token(Token { id: 1, text: huge });
        let WorkerMsg::Token(t) = token.sanitized() else {
            panic!("the variant changed");
        };
        assert!(t.text.len() <= crate::MAX_TEXT);
        let ready = WorkerMsg::Ready(Ready {
            load_ms: 1,
            rss: 0,
            model_bytes: 0,
            ctx: 1,
            session: SessionInfo {
                turns: 0,
                tokens: 0,
                restored_from: RestoredFrom::New,
                note: Some("n".repeat(1 << 20)),
            },
            state_bytes: 0,
        });
        let WorkerMsg::Ready(r) = ready.sanitized() else {
            panic!("the variant changed");
        };
        assert!(r.session.note.unwrap().len() <= crate::MAX_TEXT);
    }
}
