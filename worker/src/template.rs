//! Which chat template a worker renders with, and `worker chat-template`, which renders one
//! (the golden test compares it with Python's jinja2).
//!
//! Order: `--chat-template` (a built-in's name, or a Jinja file's path), else the model's own
//! `tokenizer.chat_template`, else the built-in `chatml` (the fallback, docs/protocol.md). A
//! model's template that does not compile is not fatal: the worker says so and uses the fallback.

use std::path::{Path, PathBuf};

use belljar_chat::{FALLBACK, Template};
use belljar_protocol::worker::ChatMessage;
use clap::Args;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

/// The GGUF key of a model's chat template.
const GGUF_KEY: &str = "tokenizer.chat_template";

/// A template named on the command line: a built-in or a file, read before the model loads.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// "built-in llama3", "file /etc/belljar/x.jinja".
    pub what: String,
    pub source: String,
    /// A built-in's name.
    pub builtin: Option<&'static str>,
}

/// Resolves `--chat-template`: a name without `/` is a built-in; anything else is a file.
pub fn choose(spec: &str) -> Result<Chosen, String> {
    if !spec.contains('/') {
        let Some((name, source)) = belljar_chat::BUILTINS.iter().find(|(n, _)| *n == spec) else {
            return Err(format!(
                "--chat-template {spec:?} is not a built-in ({}) and not a path; give a built-in's name or a Jinja file's path (with a /)",
                belljar_chat::builtin_names()
            ));
        };
        return Ok(Chosen {
            what: format!("built-in {name}"),
            source: (*source).to_owned(),
            builtin: Some(name),
        });
    }
    let path = Path::new(spec);
    let source = read_source(path)?;
    Template::new(&source, "", "").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Chosen {
        what: format!("file {}", path.display()),
        source,
        builtin: None,
    })
}

/// A template file's text: a regular file (opened without blocking) of at most
/// [`belljar_chat::MAX_SOURCE`] bytes of UTF-8; the supervisor checked the same at its start.
fn read_source(path: &Path) -> Result<String, String> {
    let bytes =
        belljar_host::chat_template::read_chat_template(path, belljar_chat::MAX_SOURCE as u64)
            .map_err(|e| e.to_string())?;
    String::from_utf8(bytes)
        .map_err(|_| format!("the chat template {} is not UTF-8 text", path.display()))
}

/// The template a worker renders chat requests and session turns with.
#[derive(Debug)]
pub struct ChatFormat {
    pub template: Template,
    /// Where it came from, for the log.
    pub what: String,
    /// A text that ends the reply besides the model's end-of-generation tokens: ChatML's
    /// `<|im_end|>`, which a model that does not know ChatML writes as text.
    pub end: Option<&'static str>,
}

/// The model's BOS and EOS texts, as templates see them (`bos_token`, `eos_token`).
pub fn special_texts(model: &LlamaModel) -> (String, String) {
    let vocab = model.vocab();
    (
        token_text(&vocab, vocab.bos()),
        token_text(&vocab, vocab.eos()),
    )
}

/// A token's text in the vocabulary (a control token's is its literal text, `<|im_end|>`).
pub fn token_text(vocab: &llama_cpp_2::vocab::LlamaVocab<'_>, tok: LlamaToken) -> String {
    vocab
        .text(tok)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The model's own template text, if it has one.
pub fn model_source(model: &LlamaModel) -> Option<String> {
    model.meta_val_str(GGUF_KEY).ok().filter(|s| !s.is_empty())
}

/// The chat format for `model`: `chosen`, else the model's, else the fallback.
pub fn load(model: &LlamaModel, chosen: Option<Chosen>) -> Result<ChatFormat, String> {
    let (bos, eos) = special_texts(model);
    let builtin = |name: &'static str, what: String| -> Result<ChatFormat, String> {
        let source = belljar_chat::builtin(name).unwrap_or_default();
        Ok(ChatFormat {
            template: Template::new(source, &bos, &eos)?,
            what,
            end: (name == FALLBACK).then_some("<|im_end|>"),
        })
    };
    if let Some(c) = chosen {
        if let Some(name) = c.builtin {
            return builtin(name, c.what);
        }
        return Ok(ChatFormat {
            template: Template::new(&c.source, &bos, &eos)?,
            what: c.what,
            end: None,
        });
    }
    match model_source(model).map(|s| Template::new(&s, &bos, &eos)) {
        Some(Ok(template)) => Ok(ChatFormat {
            template,
            what: format!("the model's ({GGUF_KEY})"),
            end: None,
        }),
        Some(Err(e)) => {
            tracing::warn!(
                "the model's chat template does not compile ({e}); using the built-in {FALLBACK}"
            );
            builtin(
                FALLBACK,
                format!("built-in {FALLBACK} (the model's does not compile)"),
            )
        }
        None => builtin(
            FALLBACK,
            format!("built-in {FALLBACK} (the model has no {GGUF_KEY})"),
        ),
    }
}

/// Render a chat template as the worker does, and print the prompt (no newline added).
#[derive(Debug, Args)]
pub struct ChatTemplateArgs {
    /// A JSON file with the messages: `[{"role": "user", "content": "hi"}, ...]`.
    #[arg(long, value_name = "FILE", required_unless_present = "print_source")]
    pub messages: Option<PathBuf>,
    /// The model whose template (and BOS/EOS texts) to use.
    #[arg(long, value_name = "GGUF")]
    pub model: Option<PathBuf>,
    /// A built-in's name or a Jinja file's path, instead of the model's template.
    #[arg(long, value_name = "NAME|PATH")]
    pub template: Option<String>,
    /// The `bos_token` text [default: the model's, else empty].
    #[arg(long)]
    pub bos: Option<String>,
    /// The `eos_token` text [default: the model's, else empty].
    #[arg(long)]
    pub eos: Option<String>,
    /// Render without `add_generation_prompt`.
    #[arg(long)]
    pub no_generation_prompt: bool,
    /// Print `{"template": ..., "bos_token": ..., "eos_token": ...}` (the template that would be
    /// used) instead of rendering.
    #[arg(long)]
    pub print_source: bool,
}

pub fn run(
    args: &ChatTemplateArgs,
    backend: impl FnOnce() -> Result<llama_cpp_2::llama_backend::LlamaBackend, (u8, String)>,
) -> Result<(), (u8, String)> {
    let usage = |e: String| (crate::exit::USAGE, e);
    let chosen = args
        .template
        .as_deref()
        .map(choose)
        .transpose()
        .map_err(usage)?;
    let (mut source, mut bos, mut eos) = (None, String::new(), String::new());
    if let Some(path) = &args.model {
        let backend = backend()?;
        let params = llama_cpp_2::model::params::LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(&backend, path, &params).map_err(|e| {
            (
                crate::exit::BAD_MODEL,
                format!("llama.cpp cannot load {}: {e}", path.display()),
            )
        })?;
        (bos, eos) = special_texts(&model);
        source = model_source(&model);
    }
    let source = match chosen {
        Some(c) => c.source,
        None => {
            source.unwrap_or_else(|| belljar_chat::builtin(FALLBACK).unwrap_or_default().into())
        }
    };
    let bos = args.bos.clone().unwrap_or(bos);
    let eos = args.eos.clone().unwrap_or(eos);
    if args.print_source {
        let out = serde_json::json!({"template": source, "bos_token": bos, "eos_token": eos});
        println!("{out}");
        return Ok(());
    }
    let template = Template::new(&source, &bos, &eos).map_err(usage)?;
    let path = args.messages.as_deref().unwrap_or(Path::new("-"));
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let messages: Vec<ChatMessage> = serde_json::from_str(&text).map_err(|e| {
        usage(format!(
            "{} is not a JSON list of {{\"role\", \"content\"}} messages: {e}",
            path.display()
        ))
    })?;
    let out = template
        .render(&messages, !args.no_generation_prompt)
        .map_err(usage)?;
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| {
            (
                crate::exit::IO_ERROR,
                format!("cannot write the prompt: {e}"),
            )
        })
}
