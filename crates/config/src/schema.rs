//! The budgets.toml schema, exactly as written by the user. Every table rejects unknown keys,
//! so the whole schema is defined here even for keys whose behaviour comes in later issues.
//! Range checks live in `deserialize_with` helpers so that a bad value is reported with its
//! line and column.

use std::collections::BTreeMap;
use std::path::PathBuf;

use belljar_budget::restart::RestartMode;
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
