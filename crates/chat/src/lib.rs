//! Chat templates: a model's own Jinja template (GGUF `tokenizer.chat_template`), a built-in one,
//! or one from a file, rendered the way Hugging Face's tokenizers render them (Python's jinja2
//! with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now`, a Python-style
//! `tojson`, Python's string and dict methods), with minijinja.
//!
//! The rendered prompt comes back as [`Piece`]s: template markup, whose control-token texts the
//! worker tokenizes as control tokens, and message text, which it tokenizes as plain text, so a
//! client cannot smuggle a control token in. The message text is found by rendering twice: once
//! as is, and once with every message's content between two Unicode noncharacters. When the
//! second render, markers removed, equals the first, the markers say exactly where each content
//! went. When it does not (the template changed the content, say by trimming whitespace next to
//! the markers), the prompt is one markup piece and [`Rendered::exact`] is false: the caller must
//! then make sure no content holds a control token's text.

use std::fmt::Write as _;

use belljar_protocol::worker::ChatMessage;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, State};

/// The engine's work limit for one render (minijinja's fuel: about one unit per instruction).
/// Real templates take a few thousand units per message.
const FUEL: u64 = 10_000_000;
/// The longest rendered prompt, in bytes.
pub const MAX_RENDERED: usize = 64 << 20;
/// The longest template source, in bytes.
pub const MAX_SOURCE: usize = 1 << 20;

/// Marks the start of a message's content in the marked render.
const OPEN: char = '\u{FDD0}';
/// Marks its end.
const CLOSE: char = '\u{FDD1}';

/// The built-in templates, by name. `chatml` is the fallback for a model without a template.
pub const BUILTINS: &[(&str, &str)] = &[
    ("chatml", CHATML),
    ("llama3", LLAMA3),
    ("mistral", MISTRAL),
    ("gemma", GEMMA),
    ("phi3", PHI3),
    ("zephyr", ZEPHYR),
];

/// The fallback's name.
pub const FALLBACK: &str = "chatml";

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const MISTRAL: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('the mistral template has no role ' + message['role'] + '; use system, user or assistant') }}{% endif %}{% endfor %}";

const GEMMA: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

const PHI3: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

const ZEPHYR: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}";

/// The built-in template called `name`.
pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The names of the built-ins, for messages.
pub fn builtin_names() -> String {
    BUILTINS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// Template markup: control-token texts in it are control tokens.
    pub special: bool,
}

/// A rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub pieces: Vec<Piece>,
    /// The message contents are known to be the non-special pieces. When false, the whole
    /// prompt is one markup piece.
    pub exact: bool,
}

impl Rendered {
    /// The whole prompt as one string.
    pub fn text(&self) -> String {
        self.pieces.iter().map(|p| p.text.as_str()).collect()
    }

    /// The prompt from byte `at` of [`Rendered::text`] on (`at` on a character boundary).
    pub fn from_offset(&self, mut at: usize) -> Rendered {
        let mut pieces = Vec::new();
        for p in &self.pieces {
            if at >= p.text.len() {
                at -= p.text.len();
                continue;
            }
            pieces.push(Piece {
                text: p.text.get(at..).unwrap_or_default().to_owned(),
                special: p.special,
            });
            at = 0;
        }
        Rendered {
            pieces,
            exact: self.exact,
        }
    }
}

/// A compiled chat template with the model's BOS and EOS texts.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl Template {
    /// Compiles `source`. The error names the line and what is wrong.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Template, String> {
        if source.len() > MAX_SOURCE {
            return Err(format!(
                "the chat template is {} bytes, more than the {MAX_SOURCE} accepted",
                source.len()
            ));
        }
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(python_methods);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", generation_as_if(source))
            .map_err(|e| describe(&e))?;
        Ok(Template {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// The template's output for `messages`, exactly as Python's jinja2 would render it.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_values(
            messages.iter().map(|m| message(&m.role, &m.content)),
            add_generation_prompt,
        )
    }

    /// The prompt for `messages` as pieces of markup and message text.
    pub fn render_pieces(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Rendered, String> {
        let plain = self.render(messages, add_generation_prompt)?;
        let whole = |text: String| Rendered {
            pieces: vec![Piece {
                text,
                special: true,
            }],
            exact: false,
        };
        if messages
            .iter()
            .any(|m| m.content.contains([OPEN, CLOSE]) || m.role.contains([OPEN, CLOSE]))
        {
            return Ok(whole(plain));
        }
        // A template that fails on marked content (it parses the content, say) is not an error:
        // the plain render stands.
        let Ok(marked) = self.render_values(
            messages
                .iter()
                .map(|m| message(&m.role, &format!("{OPEN}{}{CLOSE}", m.content))),
            add_generation_prompt,
        ) else {
            return Ok(whole(plain));
        };
        match split_marked(&marked) {
            Some(pieces) if pieces.iter().map(|p| p.text.as_str()).collect::<String>() == plain => {
                Ok(Rendered {
                    pieces,
                    exact: true,
                })
            }
            _ => Ok(whole(plain)),
        }
    }

    fn render_values(
        &self,
        messages: impl Iterator<Item = Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => Value::from(messages.collect::<Vec<_>>()),
            add_generation_prompt => add_generation_prompt,
            // As transformers passes them without tools: `tools is none` holds.
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        };
        let out = tmpl.render(ctx).map_err(|e| describe(&e))?;
        if out.len() > MAX_RENDERED {
            return Err(format!(
                "the chat template rendered {} bytes, more than the {MAX_RENDERED} accepted",
                out.len()
            ));
        }
        Ok(out)
    }
}

/// Splits a marked render into markup and content pieces; `None` when the markers do not nest
/// as `OPEN … CLOSE` pairs. Empty pieces are dropped and adjacent ones of a kind merged.
fn split_marked(marked: &str) -> Option<Vec<Piece>> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut push = |text: &str, special: bool| {
        if text.is_empty() {
            return;
        }
        match pieces.last_mut() {
            Some(last) if last.special == special => last.text.push_str(text),
            _ => pieces.push(Piece {
                text: text.to_owned(),
                special,
            }),
        }
    };
    let mut rest = marked;
    while let Some(open) = rest.find(OPEN) {
        let (markup, after) = rest.split_at(open);
        if markup.contains(CLOSE) {
            return None;
        }
        push(markup, true);
        let after = &after[OPEN.len_utf8()..];
        let close = after.find(CLOSE)?;
        let content = &after[..close];
        if content.contains(OPEN) {
            return None;
        }
        push(content, false);
        rest = &after[close + CLOSE.len_utf8()..];
    }
    if rest.contains(CLOSE) {
        return None;
    }
    push(rest, true);
    Some(pieces)
}

/// Hugging Face's `{% generation %}…{% endgeneration %}` (it marks the assistant's part for
/// training masks and renders its body) as `{% if true %}…{% endif %}`, whitespace control kept.
fn generation_as_if(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let (open, body) = split_flag(inner, true);
        let (body, close) = split_flag(body.trim(), false);
        let replaced = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replaced {
            Some(word) => {
                out.push_str("{%");
                out.push_str(open);
                out.push(' ');
                out.push_str(word);
                out.push(' ');
                out.push_str(close);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A tag's whitespace-control flag (`-` or `+`) at its start (`leading`) or end, and the rest.
fn split_flag(inner: &str, leading: bool) -> (&str, &str) {
    let flagged = |c: char| c == '-' || c == '+';
    if leading {
        match inner.chars().next() {
            Some(c) if flagged(c) => (&inner[..1], &inner[1..]),
            _ => ("", inner),
        }
    } else {
        match inner.chars().last() {
            Some(c) if flagged(c) => (&inner[..inner.len() - 1], &inner[inner.len() - 1..]),
            _ => (inner, ""),
        }
    }
}

/// Python's string methods: minijinja-contrib's `pycompat`, plus `rsplit`, `removeprefix` and
/// `removesuffix`, which it lacks.
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match method {
            "rsplit" => {
                let (sep, maxsplit): (Option<&str>, Option<i64>) =
                    minijinja::value::from_args(args)?;
                return rsplit(s, sep, maxsplit.unwrap_or(-1)).map(Value::from);
            }
            "removeprefix" | "removesuffix" => {
                let (affix,): (&str,) = minijinja::value::from_args(args)?;
                let cut = if method == "removeprefix" {
                    s.strip_prefix(affix)
                } else {
                    s.strip_suffix(affix)
                };
                return Ok(Value::from(cut.unwrap_or(s)));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `str.rsplit(sep, maxsplit)`.
fn rsplit(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<String>, Error> {
    let limit = usize::try_from(maxsplit).ok();
    match sep {
        Some("") => Err(Error::new(
            ErrorKind::InvalidOperation,
            "rsplit: empty separator",
        )),
        Some(sep) => {
            let mut parts: Vec<String> = match limit {
                Some(n) => s.rsplitn(n + 1, sep).map(str::to_owned).collect(),
                None => s.rsplit(sep).map(str::to_owned).collect(),
            };
            parts.reverse();
            Ok(parts)
        }
        None => {
            // Runs of whitespace separate; the kept left part keeps its leading whitespace.
            let mut parts = Vec::new();
            let mut rest = s.trim_end();
            while !rest.is_empty() {
                if limit.is_some_and(|n| parts.len() == n) {
                    parts.push(rest.to_owned());
                    break;
                }
                match rest.rfind(char::is_whitespace) {
                    Some(at) => {
                        let ws = rest[at..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[at + ws..].to_owned());
                        rest = rest[..at].trim_end();
                    }
                    None => {
                        parts.push(rest.to_owned());
                        rest = "";
                    }
                }
            }
            parts.reverse();
            Ok(parts)
        }
    }
}

/// A message as templates see it: a map with `role` and `content`, in that order.
fn message(role: &str, content: &str) -> Value {
    Value::from(minijinja::value::Serde(ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
    }))
}

/// A template error in one line: what went wrong and where.
fn describe(e: &Error) -> String {
    let mut s = match e.kind() {
        // raise_exception's message is the template author's, word for word.
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_owned()
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(s, " (chat template line {line})");
    }
    s
}

/// `raise_exception(message)`: the template refuses these messages.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time in Python's strftime format.
fn strftime_now(format: String) -> Result<Value, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: {format:?} is not a valid strftime format"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson` as Hugging Face defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)`, not minijinja's HTML-safe one.
fn tojson(_state: &State, value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(
            usize::try_from(v)
                .ok()
                .filter(|n| *n <= 64)
                .ok_or_else(|| bad("indent must be a number of spaces up to 64"))?,
        ),
    };
    let pair = "separators must be a pair of strings";
    let (item, key) = match separators {
        None => (
            if indent.is_some() { "," } else { ", " }.to_owned(),
            ": ".to_owned(),
        ),
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()
                .map_err(|_| bad(pair))?
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(pair))?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => return Err(bad(pair)),
            }
        }
    };
    let mut out = String::new();
    PyJson {
        out: &mut out,
        indent,
        item: &item,
        key: &key,
        sort_keys: sort_keys == Some(true),
    }
    .write(&value, 0)
    .map_err(|what| bad(&what))?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` layout (`ensure_ascii=False`).
struct PyJson<'a> {
    out: &'a mut String,
    indent: Option<usize>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
}

/// Deeper values are refused.
const MAX_JSON_DEPTH: usize = 512;

impl PyJson<'_> {
    fn newline(&mut self, depth: usize) {
        if let Some(n) = self.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }

    /// Before item `i` of a container opened with `c`.
    fn item(&mut self, c: char, i: usize, depth: usize) {
        if i == 0 {
            self.out.push(c);
        } else {
            self.out.push_str(self.item);
        }
        self.newline(depth + 1);
    }

    /// After the `n` items of a container opened with `open`.
    fn close(&mut self, open: char, c: char, n: usize, depth: usize) {
        if n == 0 {
            self.out.push(open);
        } else {
            self.newline(depth);
        }
        self.out.push(c);
    }

    fn write(&mut self, v: &Value, depth: usize) -> Result<(), String> {
        use minijinja::value::ValueKind as K;
        if depth > MAX_JSON_DEPTH {
            return Err("the value is nested too deeply".into());
        }
        match v.kind() {
            K::Undefined | K::None => self.out.push_str("null"),
            K::Bool | K::Number => {
                let s = serde_json::to_string(v).map_err(|e| e.to_string())?;
                self.out.push_str(&s);
            }
            K::String => self.string(v.as_str().unwrap_or_default()),
            K::Map => {
                let mut keys: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
                if self.sort_keys {
                    keys.sort_by_key(ToString::to_string);
                }
                for (i, k) in keys.iter().enumerate() {
                    self.item('{', i, depth);
                    self.string(&k.to_string());
                    self.out.push_str(self.key);
                    let x = v.get_item(k).map_err(|e| e.to_string())?;
                    self.write(&x, depth + 1)?;
                }
                self.close('{', '}', keys.len(), depth);
            }
            K::Seq | K::Iterable => {
                let mut n = 0;
                for (i, x) in v.try_iter().map_err(|e| e.to_string())?.enumerate() {
                    self.item('[', i, depth);
                    self.write(&x, depth + 1)?;
                    n += 1;
                }
                self.close('[', ']', n, depth);
            }
            other => return Err(format!("cannot write a {other} as JSON")),
        }
        Ok(())
    }

    /// A string as Python writes it with `ensure_ascii=False`: only `"`, `\` and control
    /// characters are escaped.
    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

#[cfg(test)]
mod tests;
