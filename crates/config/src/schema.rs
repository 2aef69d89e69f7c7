//! The budgets.toml schema, exactly as written by the user. Every table rejects unknown keys,
//! so the whole schema is defined here even for keys whose behaviour comes in later issues.
//! Range checks live in `deserialize_with` helpers so that a bad value is reported with its
//! line and column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use belljar_budget::restart::RestartMode;
use belljar_budget::swap::{IdleUnload, LoadMode};
use belljar_budget::{HumanDuration, Size};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub budget: BudgetSection,
    #[serde(default)]
    pub defaults: InstanceSection,
    #[serde(default)]
    pub instances: BTreeMap<Spanned<String>, InstanceSection>,
    #[serde(default)]
    pub modes: BTreeMap<Spanned<String>, ModeSection>,
    #[serde(default)]
    pub pressure: PressureSection,
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub gpu: GpuSection,
    #[serde(default)]
    pub http: HttpSection,
}

/// How an instance's memory need is estimated (`[budget] estimate`): `file`, `gguf` (default)
/// or `max`.
pub use belljar_budget::estimate::EstimateSource;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    #[serde(deserialize_with = "safety_margin")]
    pub safety_margin: f64,
    #[serde(deserialize_with = "nonzero_size")]
    pub headroom: Size,
    #[serde(deserialize_with = "per_instance_max")]
    pub per_instance_max: f64,
    #[serde(deserialize_with = "positive_f64")]
    pub estimate_factor: f64,
    #[serde(deserialize_with = "nonzero_size")]
    pub min_required: Size,
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub total: Option<Size>,
    pub estimate: EstimateSource,
}

impl Default for BudgetSection {
    fn default() -> Self {
        BudgetSection {
            safety_margin: 0.15,
            headroom: Size(2 << 30),
            per_instance_max: 0.5,
            estimate_factor: 1.5,
            min_required: Size(64 << 20),
            total: None,
            estimate: EstimateSource::Gguf,
        }
    }
}

/// `[defaults]` and `[instances.NAME]`: every key optional; unset keys fall back to
/// `[defaults]`, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSection {
    pub model: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_nonzero_size")]
    pub ram_limit: Option<Size>,
    #[serde(default, deserialize_with = "opt_ctx")]
    pub ctx: Option<u32>,
    #[serde(default, deserialize_with = "opt_gpu_layers")]
    pub gpu_layers: Option<u32>,
    /// The GPU (NVML / CUDA index) the offloaded layers go to.
    pub gpu_device: Option<u32>,
    #[serde(default, deserialize_with = "opt_priority")]
    pub priority: Option<i64>,
    pub use_mmap: Option<bool>,
    #[serde(default, deserialize_with = "opt_threads")]
    pub threads: Option<u32>,
    pub swap_max: Option<Size>,
    pub restart: Option<RestartMode>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub backoff_initial: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_backoff_factor")]
    pub backoff_factor: Option<f64>,
    #[serde(default, deserialize_with = "opt_nonzero_duration")]
    pub backoff_max: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_nonzero_duration")]
    pub backoff_reset_after: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_start_limit_burst")]
    pub start_limit_burst: Option<u32>,
    #[serde(default, deserialize_with = "opt_nonzero_duration")]
    pub start_limit_interval: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_nonzero_duration")]
    pub heartbeat_interval: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_nonzero_duration")]
    pub load_stall_timeout: Option<HumanDuration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub stop_timeout: Option<HumanDuration>,
    pub worker_user: Option<String>,
    /// More names under which HTTP clients may ask for the instance (OpenAI's `model`). Only
    /// in `[instances.NAME]` (and `add`): `Config::parse` refuses it in `[defaults]`.
    #[serde(default, deserialize_with = "opt_aliases")]
    pub aliases: Option<Vec<String>>,
    /// The chat template the worker renders with: a built-in's name (`belljar_chat::BUILTINS`)
    /// or a Jinja file's path (anything with a `/`; a relative one is resolved against the
    /// config file's directory by `Config::parse`). Unset: the model's own, else chatml. The
    /// file itself is read and compiled by the caller ([`rules::chat_template_source`]).
    #[serde(default, deserialize_with = "opt_chat_template")]
    pub chat_template: Option<String>,
    /// `always` (default) or `on-demand` ([swap]).
    #[serde(default, deserialize_with = "opt_load")]
    pub load: Option<LoadMode>,
    /// How long an idle on-demand instance stays loaded (`"never"`: until evicted or unloaded).
    #[serde(default, deserialize_with = "opt_idle_unload")]
    pub idle_unload: Option<IdleUnload>,
    /// Never evicted (nor unloaded when idle) once loaded.
    #[serde(default, deserialize_with = "opt_pinned")]
    pub pinned: Option<bool>,
    /// No eviction sooner than this after a load.
    #[serde(default, deserialize_with = "opt_min_loaded")]
    pub min_loaded: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeSection {
    pub instances: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PressureSection {
    pub enabled: bool,
    #[serde(deserialize_with = "nonzero_duration")]
    pub interval: HumanDuration,
    #[serde(deserialize_with = "duration")]
    pub settle: HumanDuration,
    #[serde(deserialize_with = "opt_percent")]
    pub warning: Option<f64>,
    #[serde(deserialize_with = "opt_percent")]
    pub critical: Option<f64>,
    #[serde(deserialize_with = "opt_percent")]
    pub emergency: Option<f64>,
    #[serde(deserialize_with = "opt_percent")]
    pub restore: Option<f64>,
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub warning_available: Option<Size>,
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub critical_available: Option<Size>,
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub emergency_available: Option<Size>,
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub restore_available: Option<Size>,
    #[serde(deserialize_with = "nonzero_duration")]
    pub thrash_window: HumanDuration,
    #[serde(deserialize_with = "positive_f64")]
    pub thrash_majflt_rate: f64,
}

impl Default for PressureSection {
    fn default() -> Self {
        PressureSection {
            enabled: true,
            interval: secs(2),
            settle: secs(10),
            warning: None,
            critical: None,
            emergency: None,
            restore: None,
            warning_available: None,
            critical_available: None,
            emergency_available: None,
            restore_available: None,
            thrash_window: secs(30),
            thrash_majflt_rate: 500.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    pub group: Option<String>,
}

/// `[gpu]`: the GPU guard (NVML). Levels in percent of the GPU's memory used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSection {
    pub enabled: bool,
    pub warning: f64,
    pub critical: f64,
    pub emergency: f64,
    pub restore: f64,
    #[serde(deserialize_with = "duration")]
    pub settle: HumanDuration,
    #[serde(deserialize_with = "duration")]
    pub release_timeout: HumanDuration,
}

impl Default for GpuSection {
    fn default() -> Self {
        GpuSection {
            enabled: true,
            warning: 80.0,
            critical: 90.0,
            emergency: 95.0,
            restore: 60.0,
            settle: secs(10),
            release_timeout: secs(10),
        }
    }
}

/// `[logging]`: how much of each instance's worker output reaches the log, as journald's
/// `RateLimitBurst=` per `RateLimitIntervalSec=` (0 turns the limit off).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    pub worker_output_burst: u32,
    #[serde(deserialize_with = "nonzero_duration")]
    pub worker_output_interval: HumanDuration,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            worker_output_burst: 1000,
            worker_output_interval: secs(30),
        }
    }
}

/// The address of the HTTP API when `[http] listen` is unset.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

/// `[http]`: the OpenAI-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// `"off"` or `IP:PORT`; `None` (unset) means [`DEFAULT_HTTP_LISTEN`]. Kept apart from the
    /// default so that the supervisor can tell an explicit address (taken: an error) from the
    /// default one (taken: a warning).
    #[serde(deserialize_with = "opt_http_listen")]
    pub listen: Option<String>,
    /// Requests waiting per instance (FIFO); a full queue answers 429.
    #[serde(deserialize_with = "http_queue")]
    pub queue: u32,
    /// How long a request may wait in the queue before it is answered 503.
    #[serde(deserialize_with = "http_queue_timeout")]
    pub queue_timeout: HumanDuration,
    /// The file holding the API key; relative paths are resolved against the config file's
    /// directory by `Config::parse`.
    #[serde(deserialize_with = "opt_api_key_file")]
    pub api_key_file: Option<PathBuf>,
    /// The largest request body; a larger one is answered 413.
    #[serde(deserialize_with = "http_max_body")]
    pub max_body: Size,
    /// The most connections open at once.
    #[serde(deserialize_with = "http_max_connections")]
    pub max_connections: u32,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: None,
            queue: 64,
            queue_timeout: secs(60),
            api_key_file: None,
            max_body: Size(4 << 20),
            max_connections: 256,
        }
    }
}

impl HttpSection {
    /// The address to listen on: `None` when `listen = "off"`, the default address when unset.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        let listen = self.listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN);
        if listen == "off" {
            return None;
        }
        // Checked when parsed; a value set by hand that does not parse is treated as off.
        listen.parse().ok()
    }

    /// Whether `listen` was set (the address, or `"off"`), rather than left to the default.
    pub fn explicit(&self) -> bool {
        self.listen.is_some()
    }

    /// The rules over every key, as `Config::parse` applies them (the deserializers apply the
    /// same with the key's line): for a section built in code. The error names the key.
    pub fn check(&self) -> Result<(), String> {
        if let Some(l) = &self.listen {
            rules::http_listen(l)?;
        }
        rules::http_queue(&self.queue)?;
        rules::nonzero_duration(&self.queue_timeout).map_err(|e| format!("queue_timeout: {e}"))?;
        if let Some(f) = &self.api_key_file {
            rules::api_key_file(f)?;
        }
        rules::http_max_body(&self.max_body)?;
        rules::http_max_connections(&self.max_connections)?;
        if let Some(addr) = self.listen_addr() {
            check_exposure(&addr, self.api_key_file.as_deref())
                .map_err(|e| format!("listen: {e}"))?;
        }
        Ok(())
    }
}

/// Refuses an HTTP address that other machines can reach unless an API key guards it: only
/// loopback addresses (127.0.0.0/8, ::1, also as `::ffff:127.x.y.z`) may go without
/// `api_key_file`. Applied to `[http] listen` and to `supervisor run --http ADDR`.
pub fn check_exposure(addr: &SocketAddr, api_key_file: Option<&Path>) -> Result<(), String> {
    if api_key_file.is_some() || addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "{addr} is not a loopback address and no API key is set, so anyone who can reach it could use the models; set [http] api_key_file, or listen on 127.0.0.1 (e.g. \"127.0.0.1:{}\")",
        addr.port()
    ))
}

pub(crate) const fn secs(s: u64) -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(s))
}

// --- range-checked fields: the error carries the key's line and column -------------------

/// The rules of the per-instance keys, each with its bound in the message. The same functions
/// check the file (through the `deserialize_with` helpers below, so errors carry the line and
/// column) and an instance added at run time ([`InstanceSection::check`]).
pub mod rules {
    use belljar_budget::limits::{
        MAX_BACKOFF_FACTOR, MAX_CTX, MAX_DURATION, MAX_GPU_LAYERS, MAX_PRIORITY,
        MAX_START_LIMIT_BURST, MAX_THREADS,
    };
    use belljar_budget::{HumanDuration, Size};
    use std::net::SocketAddr;
    use std::path::Path;

    /// The most requests waiting per instance (`[http] queue`).
    pub const MAX_HTTP_QUEUE: u32 = 4096;
    /// The most connections at once (`[http] max_connections`).
    pub const MAX_HTTP_CONNECTIONS: u32 = 65_536;
    /// The largest request body (`[http] max_body`): 64 MiB.
    pub const MAX_HTTP_BODY: Size = Size(64 << 20);
    /// The most aliases per instance.
    pub const MAX_ALIASES: usize = 16;
    /// The longest alias, in bytes.
    pub const MAX_ALIAS_LEN: usize = 128;
    /// The largest chat template file, in bytes: what the worker accepts
    /// ([`belljar_chat::MAX_SOURCE`]).
    pub const MAX_CHAT_TEMPLATE: usize = belljar_chat::MAX_SOURCE;

    pub fn nonzero_size(v: &Size) -> Result<(), String> {
        if v.bytes() == 0 {
            return Err(
                "a size of zero is not allowed here; give a positive size such as \"64MiB\"".into(),
            );
        }
        Ok(())
    }

    /// At most [`MAX_DURATION`].
    pub fn duration(v: &HumanDuration) -> Result<(), String> {
        if v.0 > MAX_DURATION {
            return Err(format!(
                "the duration {v} is too long: at most {} is allowed (e.g. \"1h\")",
                HumanDuration(MAX_DURATION)
            ));
        }
        Ok(())
    }

    /// Positive and at most [`MAX_DURATION`].
    pub fn nonzero_duration(v: &HumanDuration) -> Result<(), String> {
        if v.0.is_zero() {
            return Err(
                "a duration of zero is not allowed here; give a positive duration such as \"1s\""
                    .into(),
            );
        }
        duration(v)
    }

    fn count(v: u32, max: u32, what: &str) -> Result<(), String> {
        if v == 0 {
            return Err(format!(
                "0 is not allowed here; give a number of at least 1 (and at most {max} {what})"
            ));
        }
        if v > max {
            return Err(format!(
                "{v} is too large: at most {max} {what} are allowed"
            ));
        }
        Ok(())
    }

    pub fn ctx(v: &u32) -> Result<(), String> {
        count(*v, MAX_CTX, "tokens of context")
    }

    pub fn threads(v: &u32) -> Result<(), String> {
        count(*v, MAX_THREADS, "threads")
    }

    pub fn start_limit_burst(v: &u32) -> Result<(), String> {
        count(*v, MAX_START_LIMIT_BURST, "starts")
    }

    pub fn gpu_layers(v: &u32) -> Result<(), String> {
        if *v > MAX_GPU_LAYERS {
            return Err(format!(
                "{v} is too large: at most {MAX_GPU_LAYERS} layers (any number above a model's layer count offloads all of them)"
            ));
        }
        Ok(())
    }

    pub fn priority(v: &i64) -> Result<(), String> {
        if v.unsigned_abs() > MAX_PRIORITY.unsigned_abs() {
            return Err(format!(
                "priority {v} is out of range: give a number between -{MAX_PRIORITY} and {MAX_PRIORITY} (higher is more important)"
            ));
        }
        Ok(())
    }

    /// `[http] listen`: `"off"` or a socket address `IP:PORT`.
    pub fn http_listen(v: &str) -> Result<(), String> {
        if v == "off" || v.parse::<SocketAddr>().is_ok() {
            return Ok(());
        }
        Err(format!(
            "listen = {v:?} is neither \"off\" nor an address IP:PORT (a host name is not accepted); give e.g. \"127.0.0.1:8080\", \"[::1]:8080\" or \"off\""
        ))
    }

    fn http_count(key: &str, v: u32, max: u32, what: &str) -> Result<(), String> {
        if !(1..=max).contains(&v) {
            return Err(format!(
                "{key} = {v} is out of range: give a number from 1 to {max} ({what})"
            ));
        }
        Ok(())
    }

    /// `[http] queue`: 1 to [`MAX_HTTP_QUEUE`].
    pub fn http_queue(v: &u32) -> Result<(), String> {
        http_count("queue", *v, MAX_HTTP_QUEUE, "requests waiting per instance")
    }

    /// `[http] max_connections`: 1 to [`MAX_HTTP_CONNECTIONS`].
    pub fn http_max_connections(v: &u32) -> Result<(), String> {
        http_count(
            "max_connections",
            *v,
            MAX_HTTP_CONNECTIONS,
            "connections open at once",
        )
    }

    /// `[http] max_body`: nonzero, at most [`MAX_HTTP_BODY`].
    pub fn http_max_body(v: &Size) -> Result<(), String> {
        nonzero_size(v).map_err(|e| format!("max_body: {e}"))?;
        if v.bytes() > MAX_HTTP_BODY.bytes() {
            return Err(format!(
                "max_body {v} is too large: at most {MAX_HTTP_BODY} is allowed (e.g. \"4MiB\")"
            ));
        }
        Ok(())
    }

    /// `[http] api_key_file`: a path, not empty.
    pub fn api_key_file(v: &Path) -> Result<(), String> {
        if v.as_os_str().is_empty() {
            return Err(
                "api_key_file is empty; give the path of the file holding the key, e.g. \"api.key\""
                    .into(),
            );
        }
        Ok(())
    }

    /// One alias: 1 to [`MAX_ALIAS_LEN`] bytes of printable characters, without whitespace,
    /// control characters or `/`, and neither `.` nor `..` (an alias never becomes a path).
    pub fn alias(v: &str) -> Result<(), String> {
        if v.is_empty() {
            return Err("an alias is empty; give a name such as \"gpt-4o-mini\"".into());
        }
        if v.len() > MAX_ALIAS_LEN {
            return Err(format!(
                "alias {v:?} is {} bytes long: at most {MAX_ALIAS_LEN} bytes are allowed",
                v.len()
            ));
        }
        if let Some(c) = v
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
        {
            return Err(format!(
                "alias {v:?} contains {c:?}; an alias may not contain whitespace, control characters or '/' (e.g. \"llama-3-8b\")"
            ));
        }
        if v == "." || v == ".." {
            return Err(format!(
                "alias {v:?} is not allowed; give a name such as \"llama-3-8b\""
            ));
        }
        Ok(())
    }

    /// An instance's `aliases`: at most [`MAX_ALIASES`], each following [`alias`], none twice.
    pub fn aliases(v: &[String]) -> Result<(), String> {
        if v.len() > MAX_ALIASES {
            return Err(format!(
                "{} aliases are too many: at most {MAX_ALIASES} per instance are allowed",
                v.len()
            ));
        }
        for (i, a) in v.iter().enumerate() {
            alias(a)?;
            if v[..i].contains(a) {
                return Err(format!("alias {a:?} is listed twice; list each alias once"));
            }
        }
        Ok(())
    }

    /// `chat_template`: not empty; without a `/` the name of a built-in. A value with a `/` is a
    /// file's path, whose text [`chat_template_source`] checks once it is read.
    pub fn chat_template(v: &str) -> Result<(), String> {
        let builtins = belljar_chat::builtin_names();
        if v.is_empty() {
            return Err(format!(
                "the chat template is empty; give a built-in's name ({builtins}) or a Jinja file's path such as \"./my.jinja\", or remove the key to use the model's own template"
            ));
        }
        if v.contains('/') || belljar_chat::builtin(v).is_some() {
            return Ok(());
        }
        // A misspelt built-in (`Llama3`, `llama-3`), else a file named without its `./`.
        let lower = v.to_lowercase();
        let nearest = belljar_chat::BUILTINS
            .iter()
            .map(|(name, _)| (strsim::levenshtein(&lower, name), *name))
            .min()
            .filter(|(d, _)| *d <= 2);
        if let Some((_, name)) = nearest {
            return Err(format!(
                "{v:?} is not a built-in chat template ({builtins}); did you mean {name:?}? (a Jinja file's path needs a /, e.g. \"./my.jinja\")"
            ));
        }
        let hint = if v.contains('.') {
            format!("did you mean the file \"./{v}\"?")
        } else {
            "e.g. \"./my.jinja\"".to_owned()
        };
        Err(format!(
            "{v:?} is not a built-in chat template ({builtins}); give one of those, or a Jinja file's path, which needs a / ({hint})"
        ))
    }

    /// The text of a chat template file, `bytes` as read from `path` (at most one byte more
    /// than [`MAX_CHAT_TEMPLATE`] need be read): at most that size, UTF-8, and a template
    /// that compiles (the error names the line), as the worker will load it.
    pub fn chat_template_source(path: &Path, bytes: &[u8]) -> Result<(), String> {
        let path = path.display();
        let max = MAX_CHAT_TEMPLATE;
        if bytes.len() > max {
            return Err(format!(
                "the chat template {path} is larger than {max} bytes; point chat_template at a Jinja template file (is it the right file?)"
            ));
        }
        let source = std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "the chat template {path} is not UTF-8 text (invalid byte at offset {}); save it as UTF-8",
                e.valid_up_to()
            )
        })?;
        belljar_chat::Template::new(source, "", "").map_err(|e| {
            format!(
                "the chat template {path} does not compile: {e}; fix the template or use a built-in"
            )
        })?;
        Ok(())
    }

    pub fn backoff_factor(v: &f64) -> Result<(), String> {
        if !(v.is_finite() && (1.0..=MAX_BACKOFF_FACTOR).contains(v)) {
            return Err(format!(
                "backoff_factor {v} must be at least 1 and at most {MAX_BACKOFF_FACTOR} (1 keeps the delay constant, 2 doubles it)"
            ));
        }
        Ok(())
    }
}

impl InstanceSection {
    /// The per-instance rules over every key that is set: what `Config::parse` enforces for
    /// `[defaults]` and `[instances.NAME]`, and the server applies to `add`. The error names
    /// the key.
    pub fn check(&self) -> Result<(), String> {
        fn key<T>(
            name: &str,
            v: &Option<T>,
            rule: impl Fn(&T) -> Result<(), String>,
        ) -> Result<(), String> {
            match v {
                Some(v) => rule(v).map_err(|e| format!("{name}: {e}")),
                None => Ok(()),
            }
        }
        key("ram_limit", &self.ram_limit, rules::nonzero_size)?;
        key("ctx", &self.ctx, rules::ctx)?;
        key("gpu_layers", &self.gpu_layers, rules::gpu_layers)?;
        key("priority", &self.priority, rules::priority)?;
        key("threads", &self.threads, rules::threads)?;
        key("backoff_initial", &self.backoff_initial, rules::duration)?;
        key(
            "backoff_factor",
            &self.backoff_factor,
            rules::backoff_factor,
        )?;
        key("backoff_max", &self.backoff_max, rules::nonzero_duration)?;
        key(
            "backoff_reset_after",
            &self.backoff_reset_after,
            rules::nonzero_duration,
        )?;
        key(
            "start_limit_burst",
            &self.start_limit_burst,
            rules::start_limit_burst,
        )?;
        key(
            "start_limit_interval",
            &self.start_limit_interval,
            rules::nonzero_duration,
        )?;
        key(
            "heartbeat_interval",
            &self.heartbeat_interval,
            rules::nonzero_duration,
        )?;
        key(
            "load_stall_timeout",
            &self.load_stall_timeout,
            rules::nonzero_duration,
        )?;
        key("stop_timeout", &self.stop_timeout, rules::duration)?;
        key("min_loaded", &self.min_loaded, rules::duration)?;
        key("aliases", &self.aliases, |v: &Vec<String>| {
            rules::aliases(v)
        })?;
        key("chat_template", &self.chat_template, |v: &String| {
            rules::chat_template(v)
        })?;
        Ok(())
    }
}

/// Deserializes a `T` and applies `rule`, so a broken rule is reported at the key.
fn ruled<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    rule: impl Fn(&T) -> Result<(), String>,
) -> Result<T, D::Error> {
    let v = T::deserialize(d)?;
    rule(&v).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn check<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    ok: impl Fn(&T) -> bool,
    msg: impl Fn(&T) -> String,
) -> Result<T, D::Error> {
    ruled(d, |v: &T| if ok(v) { Ok(()) } else { Err(msg(v)) })
}

fn safety_margin<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(
        d,
        |v: &f64| (0.0..1.0).contains(v),
        |v| {
            format!(
                "safety_margin {v} is outside [0, 1): it is the fraction of memory kept back, e.g. 0.15 for 15%"
            )
        },
    )
}

fn per_instance_max<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(
        d,
        |v: &f64| *v > 0.0 && *v <= 1.0,
        |v| {
            format!(
                "per_instance_max {v} is outside (0, 1]: it is the largest fraction of usable memory one instance may take, e.g. 0.5"
            )
        },
    )
}

fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(
        d,
        |v: &f64| v.is_finite() && *v > 0.0,
        |v| format!("{v} must be a number greater than zero"),
    )
}

fn nonzero_size<'de, D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
    ruled(d, rules::nonzero_size)
}

fn opt_nonzero_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
    nonzero_size(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    ruled(d, rules::duration)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HumanDuration>, D::Error> {
    duration(d).map(Some)
}

fn nonzero_duration<'de, D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    ruled(d, rules::nonzero_duration)
}

fn opt_nonzero_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<HumanDuration>, D::Error> {
    nonzero_duration(d).map(Some)
}

/// Deserializes a `T` and names `key` in its error (followed by `fix`): for values whose own
/// errors do not say which key they belong to.
fn keyed<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    key: &str,
    fix: &str,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{key}: {}{fix}", e.to_string().trim_end())))
}

fn opt_load<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LoadMode>, D::Error> {
    keyed(d, "load", "")
}

fn opt_idle_unload<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IdleUnload>, D::Error> {
    keyed(d, "idle_unload", "")
}

fn opt_pinned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    keyed(
        d,
        "pinned",
        "; write pinned = true or pinned = false (no quotes)",
    )
}

fn opt_min_loaded<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HumanDuration>, D::Error> {
    keyed::<D, HumanDuration>(d, "min_loaded", "")?
        .map(|v| {
            rules::duration(&v)
                .map(|()| v)
                .map_err(|e| serde::de::Error::custom(format!("min_loaded: {e}")))
        })
        .transpose()
}

fn opt_ctx<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ruled(d, rules::ctx).map(Some)
}

fn opt_threads<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ruled(d, rules::threads).map(Some)
}

fn opt_start_limit_burst<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ruled(d, rules::start_limit_burst).map(Some)
}

fn opt_gpu_layers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ruled(d, rules::gpu_layers).map(Some)
}

fn opt_priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    ruled(d, rules::priority).map(Some)
}

fn opt_backoff_factor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    ruled(d, rules::backoff_factor).map(Some)
}

fn opt_percent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    check(
        d,
        |v: &f64| *v > 0.0 && *v <= 100.0,
        |v| format!("{v} is not a percentage in (0, 100]"),
    )
    .map(Some)
}

fn opt_aliases<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    ruled(d, |v: &Vec<String>| {
        rules::aliases(v).map_err(|e| format!("aliases: {e}"))
    })
    .map(Some)
}

fn opt_chat_template<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    ruled(d, |v: &String| {
        rules::chat_template(v).map_err(|e| format!("chat_template: {e}"))
    })
    .map(Some)
}

fn opt_http_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    ruled(d, |v: &String| rules::http_listen(v)).map(Some)
}

fn http_queue<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ruled(d, rules::http_queue)
}

fn http_max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ruled(d, rules::http_max_connections)
}

fn http_max_body<'de, D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
    ruled(d, rules::http_max_body)
}

fn http_queue_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    ruled(d, |v: &HumanDuration| {
        rules::nonzero_duration(v).map_err(|e| format!("queue_timeout: {e}"))
    })
}

fn opt_api_key_file<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    ruled(d, |v: &PathBuf| rules::api_key_file(v)).map(Some)
}
