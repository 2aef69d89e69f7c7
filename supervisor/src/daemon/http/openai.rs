//! OpenAI's request and response shapes: what `/v1/chat/completions` and `/v1/completions`
//! take, how it becomes a worker `Prompt`, and the objects that go back. Unknown fields are
//! ignored, as OpenAI-compatible servers do; fields belljar cannot honour (`n` > 1, non-text
//! content) are refused with 400.

use belljar_protocol::worker::{
    CHAT_ROLES, ChatMessage, Done, Prompt, PromptMode, Sampling, check_stops,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::daemon::requests::ApiError;

/// At most this many chat messages.
pub const MAX_MESSAGES: usize = 4096;

/// Sampling when the request does not say (llama.cpp's server's defaults).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
pub const DEFAULT_TOP_K: u32 = 40;
pub const DEFAULT_TOP_P: f32 = 0.95;
pub const DEFAULT_MIN_P: f32 = 0.05;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    /// llama.cpp's name; OpenAI has none.
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    /// llama.cpp's extension: generate through the end-of-generation token.
    #[serde(default)]
    ignore_eos: bool,
    /// llama.cpp server's extension: `false` evaluates the whole prompt, reusing nothing the
    /// context holds.
    #[serde(default)]
    cache_prompt: Option<bool>,
}

/// A parsed request: the instance asked for, the worker's prompt (id 0 until submitted) and
/// how to answer.
#[derive(Debug)]
pub struct Parsed {
    pub model: String,
    pub prompt: Prompt,
    pub stream: bool,
    pub include_usage: bool,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "invalid_request", message)
}

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }
}

/// Parses and checks a request body (already known to be JSON by its type).
pub fn parse(kind: Kind, body: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    // Each part is read on its own, so that an error names its field (`max_tokens: invalid
    // value: integer -5, expected u32`).
    let common: Common = field(&value, None)?;
    let (mode, text, messages) = match kind {
        Kind::Chat => {
            let raw: Vec<Message> = field(&value, Some("messages"))?;
            (PromptMode::Chat, String::new(), messages(raw)?)
        }
        Kind::Completion => {
            let text = match value.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_owned()
                }
                _ => {
                    return Err(bad(
                        "prompt must be a string (or a list of exactly one string)",
                    ));
                }
            };
            if text.is_empty() {
                return Err(bad("prompt is empty; send some text"));
            }
            (PromptMode::Completion, text, Vec::new())
        }
    };
    let c = common;
    if c.model.is_empty() {
        return Err(bad("model is empty; GET /v1/models lists the models"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad("n must be 1: belljar generates one choice per request"));
    }
    let (sampling, stop) = settings(&c)?;
    let max_tokens = c.max_completion_tokens.or(c.max_tokens);
    if max_tokens == Some(0) {
        return Err(bad("max_tokens must be at least 1"));
    }
    Ok(Parsed {
        model: c.model,
        prompt: Prompt {
            id: 0,
            mode,
            text,
            messages,
            // The worker clamps it to what the context has left after the prompt.
            max_tokens: max_tokens.unwrap_or(u32::MAX),
            ignore_eos: c.ignore_eos,
            sampling,
            stop,
            raw: false,
            fresh: c.cache_prompt == Some(false),
        },
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The sampler's settings and the stop texts, checked.
fn settings(c: &Common) -> Result<(Sampling, Vec<String>), ApiError> {
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    check_stops(&stop).map_err(bad)?;
    let sampling = Sampling {
        temperature: c.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: c.top_p.unwrap_or(DEFAULT_TOP_P),
        top_k: c.top_k.unwrap_or(DEFAULT_TOP_K),
        min_p: c.min_p.unwrap_or(DEFAULT_MIN_P),
        // OpenAI's seed is any integer; the sampler takes 32 bits of it.
        seed: c.seed.map(|s| s as u32),
        repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        ..Sampling::default()
    };
    sampling.check().map_err(bad)?;
    Ok((sampling, stop))
}

/// The body (or its field `name`) as a `T`; the error names the field and the problem.
fn field<T: serde::de::DeserializeOwned>(body: &Value, name: Option<&str>) -> Result<T, ApiError> {
    let part = match name {
        None => body,
        Some(n) => body
            .get(n)
            .ok_or_else(|| bad(format!("missing field `{n}`")))?,
    };
    serde_path_to_error::deserialize(part).map_err(|e| {
        let path = e.path().to_string();
        let at = match (name, path.as_str()) {
            (Some(n), ".") => n.to_owned(),
            (Some(n), p) => format!("{n}{}{p}", if p.starts_with('[') { "" } else { "." }),
            (None, ".") => "the body".to_owned(),
            (None, p) => p.to_owned(),
        };
        bad(format!("{at}: {}", e.inner()))
    })
}

fn messages(raw: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if raw.is_empty() {
        return Err(bad("messages is empty; send at least one message"));
    }
    if raw.len() > MAX_MESSAGES {
        return Err(bad(format!(
            "messages has {} entries; send at most {MAX_MESSAGES}",
            raw.len()
        )));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !CHAT_ROLES.contains(&m.role.as_str()) {
                let mut role = m.role.clone();
                belljar_protocol::cut(&mut role, 64);
                return Err(bad(format!(
                    "messages[{i}].role {role:?} is not one of {}",
                    CHAT_ROLES.join(", ")
                )));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(bad(format!(
                                    "messages[{i}] has a {kind:?} part; belljar's models take text parts only"
                                )));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

/// What a finished request's answer looks like.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub kind: Kind,
    pub id: u64,
    pub created: u64,
    pub model: &'a str,
}

impl Answer<'_> {
    fn id(&self) -> String {
        format!("{}-belljar-{}", self.kind.id_prefix(), self.id)
    }

    pub fn usage(d: &Done) -> Value {
        json!({
            "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.tokens,
            "total_tokens": u64::from(d.prompt_tokens) + u64::from(d.tokens),
            "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
        })
    }

    /// The whole answer (`stream: false`).
    pub fn whole(&self, text: &str, d: &Done) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": d.finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": d.finish.as_str(),
            }),
        };
        json!({
            "id": self.id(),
            "object": self.kind.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Answer::usage(d),
        })
    }

    /// One streamed chunk: the first (the role), a piece of text, or the last (the finish).
    pub fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id(),
            "object": self.kind.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// A token's chunk as text around the token: the chunk is serialised once per stream, and
    /// each token only adds its own JSON string between the two halves (no JSON tree per token).
    pub fn token_template(&self) -> (String, String) {
        const MARK: &str = "\u{1}";
        let whole = self.chunk(Some(MARK), None).to_string();
        // serde_json writes the control character as this escape, and nowhere else.
        match whole.split_once("\"\\u0001\"") {
            Some((head, tail)) => (head.to_owned(), tail.to_owned()),
            None => (whole, String::new()),
        }
    }

    /// The usage chunk that ends a stream when `stream_options.include_usage` asked for it.
    pub fn usage_chunk(&self, d: &Done) -> Value {
        json!({
            "id": self.id(),
            "object": self.kind.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": Answer::usage(d),
        })
    }
}

/// OpenAI's error body.
pub fn error_body(e: &ApiError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse(Kind::Chat, body.to_string().as_bytes())
    }

    #[test]
    fn a_chat_request_becomes_a_prompt() {
        let p = chat(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "x",
            "seed": -1,
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "ignored"
        }))
        .unwrap();
        assert_eq!(p.model, "m");
        assert!(p.stream && p.include_usage);
        assert_eq!(p.prompt.mode, PromptMode::Chat);
        assert_eq!(p.prompt.max_tokens, 7);
        assert_eq!(p.prompt.stop, vec!["x"]);
        assert_eq!(p.prompt.sampling.temperature, 0.0);
        assert_eq!(p.prompt.sampling.seed, Some(u32::MAX));
        assert_eq!(p.prompt.messages[1].content, "hi!");
        let d =
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(d.prompt.max_tokens, u32::MAX, "unset: the worker clamps");
        assert_eq!(d.prompt.sampling.temperature, DEFAULT_TEMPERATURE);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let cases = [
            (json!([1]), "JSON object"),
            (json!({"messages": []}), "model"),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages is empty"),
            (
                json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                "role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "image_url",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n must be 1",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": -1}),
                "top_p",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}),
                "stop",
            ),
            (json!({"model": "m", "messages": "hi"}), "messages"),
            (
                json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
        ];
        for (body, needle) in cases {
            let e = chat(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let e = parse(Kind::Chat, b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"));
        let e = parse(Kind::Completion, br#"{"model":"m","prompt":[1,2]}"#).unwrap_err();
        assert!(e.message.contains("prompt"));
        let e = parse(Kind::Completion, br#"{"model":"m","prompt":""}"#).unwrap_err();
        assert!(e.message.contains("empty"));
    }

    #[test]
    fn answers_have_openais_shape() {
        let d = Done {
            id: 3,
            tokens: 2,
            ms: 1,
            prompt_tokens: 5,
            cached_tokens: 4,
            finish: belljar_protocol::worker::Finish::Length,
        };
        let a = Answer {
            kind: Kind::Chat,
            id: 3,
            created: 1,
            model: "m",
        };
        let w = a.whole("hi", &d);
        assert_eq!(w["object"], "chat.completion");
        assert_eq!(w["choices"][0]["message"]["content"], "hi");
        assert_eq!(w["choices"][0]["finish_reason"], "length");
        assert_eq!(w["usage"]["total_tokens"], 7);
        assert_eq!(w["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(
            a.chunk(None, None)["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(
            a.chunk(Some("x"), None)["choices"][0]["delta"]["content"],
            "x"
        );
        assert_eq!(
            a.chunk(None, Some("stop"))["choices"][0]["finish_reason"],
            "stop"
        );
        let c = Answer {
            kind: Kind::Completion,
            ..a
        };
        assert_eq!(c.whole("t", &d)["choices"][0]["text"], "t");
        for text in ["x", "", "quote \" and \\ and \u{1} and é\n"] {
            for answer in [a, c] {
                let (head, tail) = answer.token_template();
                let chunk = format!("{head}{}{tail}", serde_json::to_string(text).unwrap());
                let parsed: Value = serde_json::from_str(&chunk).unwrap();
                assert_eq!(parsed, answer.chunk(Some(text), None), "{chunk}");
            }
        }
        let e = error_body(&ApiError::new(404, "model_not_found", "no"));
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["code"], "model_not_found");
    }
}
