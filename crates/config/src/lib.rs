//! budgets.toml: parsing, validation with file:line:col errors, and resolution of a mode into
//! fully specified instances. Pure: the caller reads the file and passes its text in.

mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use belljar_budget::pressure::Threshold;
pub use belljar_budget::restart::RestartMode;
use belljar_budget::swap::{IdleUnload, LoadMode};
use belljar_budget::{BudgetPolicy, EstimateRule, HumanDuration, InstanceName, Size};
use serde::Serialize;

pub use schema::rules;
pub use schema::{
    BudgetSection, ControlSection, DEFAULT_HTTP_LISTEN, EstimateSource, GpuSection, HttpSection,
    InstanceSection, LoggingSection, PressureSection, RawConfig, check_exposure,
};

/// The default config path, relative to the working directory.
pub const DEFAULT_CONFIG: &str = "budgets.toml";

/// A config that cannot be used. Every variant names the file, the place when known, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}:{line}:{col}: {message}")]
    At {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// A parsed and checked config. Instances and modes are known valid; model files and chat
/// template files are not yet checked (that is I/O, done by the caller through crates/host;
/// a template's text with [`rules::chat_template_source`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub budget: BudgetSection,
    pub defaults: InstanceSection,
    pub instances: BTreeMap<InstanceName, InstanceSection>,
    pub modes: BTreeMap<String, Vec<InstanceName>>,
    pub pressure: Pressure,
    pub control: ControlSection,
    pub logging: LoggingSection,
    pub gpu: GpuSection,
    /// `[http]`, with `api_key_file` resolved against the config file's directory.
    pub http: HttpSection,
}

/// An instance with every key resolved: what the supervisor starts and the worker loads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSpec {
    pub name: InstanceName,
    /// Absolute or relative to the working directory (relative paths in the file were resolved
    /// against the config file's directory).
    pub model: PathBuf,
    pub ram_limit: Option<Size>,
    pub ctx: u32,
    pub gpu_layers: u32,
    pub gpu_device: u32,
    pub priority: i64,
    pub use_mmap: bool,
    pub threads: u32,
    pub swap_max: Size,
    pub restart: RestartMode,
    pub backoff_initial: HumanDuration,
    pub backoff_factor: f64,
    pub backoff_max: HumanDuration,
    pub backoff_reset_after: HumanDuration,
    pub start_limit_burst: u32,
    pub start_limit_interval: HumanDuration,
    pub heartbeat_interval: HumanDuration,
    pub load_stall_timeout: HumanDuration,
    pub stop_timeout: HumanDuration,
    /// The user workers run as (`None`: root, only with `worker_user = "root"`).
    pub worker_user: Option<String>,
    /// More names HTTP clients may use for the instance (OpenAI's `model`); unique across the
    /// config, never equal to an instance name.
    pub aliases: Vec<String>,
    /// `--chat-template` for the worker: a built-in's name, or a file's path (it has a `/`;
    /// relative paths in the file were resolved against the config file's directory). `None`:
    /// the model's own template, else chatml.
    pub chat_template: Option<String>,
    /// `always`: runs from the start of its mode; `on-demand`: loaded by its first request.
    pub load: LoadMode,
    /// On-demand instances only: unloaded after this long with nothing to do.
    pub idle_unload: IdleUnload,
    /// Never evicted (nor unloaded when idle) once loaded.
    pub pinned: bool,
    /// No eviction sooner than this after a load (two alternating models cannot thrash).
    pub min_loaded: HumanDuration,
}

/// The user workers run as by default, created by packaging/belljar.sysusers.
pub const DEFAULT_WORKER_USER: &str = "belljar-worker";

impl InstanceSpec {
    /// The keys that shape a run of its worker (its arguments, user and cgroup limits), as text:
    /// a run started with other values is replaced rather than adopted after a supervisor
    /// restart ([adopt]). Keys the supervisor applies on its own side (priority, the restart
    /// policy, timeouts, aliases, the [swap] keys) are not among them.
    pub fn run_keys(&self) -> BTreeMap<String, String> {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "(unset)".to_owned());
        [
            ("model", self.model.display().to_string()),
            ("ram_limit", opt(self.ram_limit.map(|s| s.to_string()))),
            ("ctx", self.ctx.to_string()),
            ("gpu_layers", self.gpu_layers.to_string()),
            ("gpu_device", self.gpu_device.to_string()),
            ("threads", self.threads.to_string()),
            ("use_mmap", self.use_mmap.to_string()),
            ("swap_max", self.swap_max.to_string()),
            ("worker_user", opt(self.worker_user.clone())),
            ("chat_template", opt(self.chat_template.clone())),
            ("heartbeat_interval", self.heartbeat_interval.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The restart policy's keys.
    pub fn restart_config(&self) -> belljar_budget::restart::RestartConfig {
        belljar_budget::restart::RestartConfig {
            mode: self.restart,
            backoff_initial: self.backoff_initial.0,
            backoff_factor: self.backoff_factor,
            backoff_max: self.backoff_max.0,
            backoff_reset_after: self.backoff_reset_after.0,
            start_limit_burst: self.start_limit_burst,
            start_limit_interval: self.start_limit_interval.0,
        }
    }
}

/// `[pressure]` with its thresholds resolved to one kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pressure {
    pub enabled: bool,
    pub interval: HumanDuration,
    pub settle: HumanDuration,
    pub warning: Threshold,
    pub critical: Threshold,
    pub emergency: Threshold,
    pub restore: Threshold,
    pub thrash_window: HumanDuration,
    pub thrash_majflt_rate: f64,
}

impl Config {
    /// Parses and checks the text of the config file at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = ErrCtx { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.toml(&e))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        // Relative paths (`model`, a `chat_template` file) are the config directory's.
        let resolve = |section: InstanceSection| -> Result<InstanceSection, String> {
            let chat_template = match section.chat_template {
                Some(t) if t.contains('/') => Some(
                    dir.join(&t).into_os_string().into_string().map_err(|p| {
                        format!(
                            "chat_template: the path {} is not UTF-8 (the config file's directory is not); give an absolute path or move the config",
                            Path::new(&p).display()
                        )
                    })?,
                ),
                other => other,
            };
            Ok(InstanceSection {
                model: section.model.map(|m| dir.join(m)),
                chat_template,
                ..section
            })
        };

        let mut instances = BTreeMap::new();
        for (key, section) in raw.instances {
            let name = InstanceName::parse(key.get_ref()).map_err(|e| {
                ctx.at(
                    key.span().start,
                    format!("[instances.{}]: {e}", key.get_ref()),
                )
            })?;
            if section.model.is_none() && raw.defaults.model.is_none() {
                return Err(ctx.at(
                    key.span().start,
                    format!(
                        "instance {name} has no model; add `model = \"path/to/model.gguf\"` to [instances.{name}] or [defaults]"
                    ),
                ));
            }
            // The deserializers enforce the same rules with the key's line; this is the one
            // function `add` uses too, so the two cannot drift apart.
            let section = section
                .check()
                .and_then(|()| resolve(section))
                .map_err(|e| ctx.at(key.span().start, format!("[instances.{name}] {e}")))?;
            instances.insert(name, section);
        }
        raw.defaults
            .check()
            .map_err(|e| ctx.file(format!("[defaults] {e}")))?;
        if raw.defaults.aliases.is_some() {
            return Err(ctx.file(
                "[defaults] aliases: aliases name one instance and must be unique, so they cannot be defaults; move `aliases = [...]` to the [instances.NAME] it names".into(),
            ));
        }
        // An alias is one more name for one instance: it may equal no instance name and no
        // other alias. Checked in name order, so the error is the same on every run.
        let mut owners: BTreeMap<&str, &InstanceName> = BTreeMap::new();
        for name in instances.keys() {
            owners.insert(name.as_str(), name);
        }
        for (name, section) in &instances {
            for alias in section.aliases.iter().flatten() {
                if let Some(owner) = owners.insert(alias, name) {
                    let what = if owner.as_str() == alias.as_str() {
                        format!("the name of instance {owner}")
                    } else {
                        format!("already an alias of instance {owner}")
                    };
                    return Err(ctx.file(format!(
                        "[instances.{name}] aliases: alias {alias:?} is {what}; every alias and instance name must be unique: rename or remove one of them"
                    )));
                }
            }
        }

        let mut modes = BTreeMap::new();
        for (key, mode) in raw.modes {
            let mode_name = key.get_ref().clone();
            InstanceName::parse(&mode_name).map_err(|e| {
                ctx.at(
                    key.span().start,
                    format!("[modes.{mode_name}]: mode names follow the instance-name rules: {e}"),
                )
            })?;
            if mode.instances.is_empty() {
                return Err(ctx.at(
                    key.span().start,
                    format!("mode {mode_name} has no instances; list at least one, e.g. instances = [\"subject\"]"),
                ));
            }
            let mut seen = BTreeSet::new();
            let mut members = Vec::new();
            for entry in mode.instances {
                let known = instances
                    .keys()
                    .find(|n| n.as_str() == entry.get_ref().as_str());
                let Some(name) = known else {
                    return Err(ctx.at(
                        entry.span().start,
                        format!(
                            "mode {mode_name} names unknown instance {:?}; define [instances.{}] or use one of: {}",
                            entry.get_ref(),
                            entry.get_ref(),
                            list(instances.keys().map(InstanceName::as_str))
                        ),
                    ));
                };
                if !seen.insert(name.clone()) {
                    return Err(ctx.at(
                        entry.span().start,
                        format!(
                            "mode {mode_name} lists instance {name} twice; list each instance once"
                        ),
                    ));
                }
                members.push(name.clone());
            }
            modes.insert(mode_name, members);
        }

        let pressure =
            resolve_pressure(&raw.pressure).map_err(|m| ctx.file(format!("[pressure]: {m}")))?;
        let mut http = raw.http;
        http.check().map_err(|e| ctx.file(format!("[http] {e}")))?;
        http.api_key_file = http.api_key_file.map(|f| dir.join(f));
        let g = &raw.gpu;
        if !(0.0 <= g.restore
            && g.restore < g.warning
            && g.warning < g.critical
            && g.critical < g.emergency
            && g.emergency <= 100.0)
        {
            return Err(ctx.file(format!(
                "[gpu]: the levels must satisfy 0 <= restore < warning < critical < emergency <= 100 (got {}, {}, {}, {} percent used)",
                g.restore, g.warning, g.critical, g.emergency
            )));
        }
        Ok(Config {
            path: path.to_path_buf(),
            budget: raw.budget,
            defaults: resolve(raw.defaults).map_err(|e| ctx.file(format!("[defaults] {e}")))?,
            instances,
            modes,
            pressure,
            control: raw.control,
            logging: raw.logging,
            gpu: raw.gpu,
            http,
        })
    }

    /// The layer-1 policy from `[budget]`.
    pub fn budget_policy(&self) -> BudgetPolicy {
        BudgetPolicy {
            safety_margin: self.budget.safety_margin,
            per_instance_max: self.budget.per_instance_max,
            total: self.budget.total,
            rule: EstimateRule {
                factor: self.budget.estimate_factor,
                min_required: self.budget.min_required,
            },
            source: self.budget.estimate,
        }
    }

    /// The instances of mode `name`, fully resolved. `cpus` sets the default thread count:
    /// max(1, cpus / instances in the mode).
    pub fn mode(&self, name: &str, cpus: u32) -> Result<Vec<InstanceSpec>, ConfigError> {
        let members = self.modes.get(name).ok_or_else(|| ConfigError::File {
            path: self.path.display().to_string(),
            message: format!(
                "unknown mode {name:?}; the config defines: {}",
                list(self.modes.keys().map(String::as_str))
            ),
        })?;
        let threads = (cpus / members.len() as u32).max(1);
        Ok(members
            .iter()
            .map(|n| self.spec(n, &self.instances[n], threads))
            .collect())
    }

    /// Resolves one instance section (from the file, or added at run time) against `[defaults]`.
    pub fn spec(
        &self,
        name: &InstanceName,
        section: &InstanceSection,
        default_threads: u32,
    ) -> InstanceSpec {
        let d = &self.defaults;
        macro_rules! pick {
            ($key:ident, $builtin:expr) => {
                section
                    .$key
                    .clone()
                    .or_else(|| d.$key.clone())
                    .unwrap_or($builtin)
            };
        }
        InstanceSpec {
            name: name.clone(),
            model: pick!(model, PathBuf::new()),
            ram_limit: section.ram_limit.or(d.ram_limit),
            ctx: pick!(ctx, 2048),
            gpu_layers: pick!(gpu_layers, 0),
            gpu_device: pick!(gpu_device, 0),
            priority: pick!(priority, 0),
            use_mmap: pick!(use_mmap, true),
            threads: pick!(
                threads,
                default_threads.min(belljar_budget::limits::MAX_THREADS)
            ),
            swap_max: pick!(swap_max, Size(0)),
            restart: pick!(restart, RestartMode::OnFailure),
            backoff_initial: pick!(backoff_initial, schema::secs(1)),
            backoff_factor: pick!(backoff_factor, 2.0),
            backoff_max: pick!(backoff_max, schema::secs(60)),
            backoff_reset_after: pick!(backoff_reset_after, schema::secs(600)),
            start_limit_burst: pick!(start_limit_burst, 5),
            start_limit_interval: pick!(start_limit_interval, schema::secs(300)),
            heartbeat_interval: pick!(heartbeat_interval, schema::secs(1)),
            load_stall_timeout: pick!(load_stall_timeout, schema::secs(60)),
            stop_timeout: pick!(stop_timeout, schema::secs(10)),
            worker_user: {
                let user = section
                    .worker_user
                    .clone()
                    .or_else(|| d.worker_user.clone())
                    .unwrap_or_else(|| DEFAULT_WORKER_USER.to_owned());
                // Workers run unprivileged unless the config says `worker_user = "root"`.
                (user != "root").then_some(user)
            },
            // Never from [defaults] (refused there): an alias names one instance.
            aliases: section.aliases.clone().unwrap_or_default(),
            chat_template: section
                .chat_template
                .clone()
                .or_else(|| d.chat_template.clone()),
            load: pick!(load, LoadMode::Always),
            idle_unload: pick!(idle_unload, IdleUnload::DEFAULT),
            pinned: pick!(pinned, false),
            min_loaded: pick!(min_loaded, schema::secs(30)),
        }
    }
}

fn resolve_pressure(p: &PressureSection) -> Result<Pressure, String> {
    let percents = [p.warning, p.critical, p.emergency, p.restore];
    let floors = [
        p.warning_available,
        p.critical_available,
        p.emergency_available,
        p.restore_available,
    ];
    let [warning, critical, emergency, restore] = if floors.iter().any(Option::is_some) {
        if percents.iter().any(Option::is_some) {
            return Err("use either the percent keys (warning, critical, emergency, restore) or the *_available keys, not both".into());
        }
        let [Some(w), Some(c), Some(e), Some(r)] = floors else {
            return Err("set all four of warning_available, critical_available, emergency_available and restore_available".into());
        };
        if !(r > w && w > c && c > e) {
            return Err(format!(
                "the floors must satisfy restore_available > warning_available > critical_available > emergency_available (got {r}, {w}, {c}, {e})"
            ));
        }
        [w, c, e, r].map(|s| Threshold::Available(s.bytes()))
    } else {
        let [w, c, e, r] = [
            p.warning.unwrap_or(80.0),
            p.critical.unwrap_or(90.0),
            p.emergency.unwrap_or(95.0),
            p.restore.unwrap_or(60.0),
        ];
        if !(r < w && w < c && c < e) {
            return Err(format!(
                "the levels must satisfy restore < warning < critical < emergency (got {r}, {w}, {c}, {e} percent used)"
            ));
        }
        [w, c, e, r].map(Threshold::PercentUsed)
    };
    Ok(Pressure {
        enabled: p.enabled,
        interval: p.interval,
        settle: p.settle,
        warning,
        critical,
        emergency,
        restore,
        thrash_window: p.thrash_window,
        thrash_majflt_rate: p.thrash_majflt_rate,
    })
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.collect();
    if v.is_empty() {
        "(none)".to_owned()
    } else {
        v.join(", ")
    }
}

/// Turns byte offsets and toml errors into `path:line:col: message` errors.
struct ErrCtx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl ErrCtx<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    fn at(&self, offset: usize, message: String) -> ConfigError {
        let (line, col) = self.line_col(offset);
        ConfigError::At {
            path: self.path.display().to_string(),
            line,
            col,
            message,
        }
    }

    fn file(&self, message: String) -> ConfigError {
        ConfigError::File {
            path: self.path.display().to_string(),
            message,
        }
    }

    fn toml(&self, e: &toml::de::Error) -> ConfigError {
        let message = with_suggestion(e.message().trim_end());
        match e.span() {
            Some(span) => self.at(span.start, message),
            None => self.file(message),
        }
    }
}

/// serde reports `unknown field `x`, expected one of `a`, `b``; point at the nearest valid
/// key (or variant) instead of leaving the user to spot it in the list.
fn with_suggestion(message: &str) -> String {
    let Some((unknown, expected)) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split_once('`'))
    else {
        return message.to_owned();
    };
    let options: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let nearest = options
        .iter()
        .map(|o| (strsim::levenshtein(unknown, o), *o))
        .min()
        .filter(|(d, o)| *d <= 3.max(o.len() / 3));
    match nearest {
        Some((_, o)) => format!("{message}; did you mean `{o}`?"),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests;
