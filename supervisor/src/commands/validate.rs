//! `supervisor validate`: layer-1 validation of one mode (or all of them), as text or JSON.

use std::collections::BTreeMap;
use std::path::Path;

use belljar_budget::gpu::{DeviceVerdict, VramDemand, validate_vram};
use belljar_budget::{HostMemory, PlannedInstance, ValidationReport, validate};
use belljar_config::{Config, InstanceSpec};
use belljar_host::gpu::Gpus;
use belljar_host::{ProcRoot, cpu_count, probe_model_file, read_host_memory};
use serde::Serialize;

use crate::cli::{GlobalArgs, ValidateArgs};
use crate::error::{CliError, Exit};
use crate::estimating::Estimated;

#[derive(Serialize)]
struct JsonOutput<'a> {
    passed: bool,
    modes: &'a [ValidationReport],
}

pub fn run(global: &GlobalArgs, args: &ValidateArgs) -> Result<Exit, CliError> {
    let config = load_config(&global.config)?;
    let modes: Vec<String> = match &args.mode {
        Some(m) => vec![m.clone()],
        None if config.modes.is_empty() => {
            return Err(CliError::Usage(format!(
                "{} defines no modes; add e.g. [modes.single] instances = [\"NAME\"]",
                config.path.display()
            )));
        }
        None => config.modes.keys().cloned().collect(),
    };
    let host = host_memory(args)?;
    // Learned corrections from the state directory `run` uses (none when it does not exist).
    let state_dir = crate::paths::resolve(
        global.state_dir.clone(),
        None,
        false,
        crate::paths::DEFAULT_STATE_DIR,
    );
    // Read only: `validate` reports a corrupt file and leaves it (`run` moves it aside).
    let observations = crate::learn::read(&state_dir).unwrap_or_else(|c| {
        eprintln!(
            "warning: {} is not valid ({}); learned corrections are ignored here, and `supervisor run` will move it aside and learn afresh",
            c.path.display(),
            c.reason
        );
        Vec::new()
    });
    let reports = modes
        .iter()
        .map(|m| report(&config, m, host, &observations))
        .collect::<Result<Vec<_>, _>>()?;
    let passed = reports.iter().all(|r| r.passed);
    if args.json {
        let out = JsonOutput {
            passed,
            modes: &reports,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| CliError::Refused(e.to_string()))?
        );
    } else {
        let text: Vec<String> = reports.iter().map(ToString::to_string).collect();
        print!("{}", text.join("\n"));
    }
    Ok(if passed { Exit::Ok } else { Exit::Refused })
}

/// Reads and checks the config file, and the chat template files it names.
pub fn load_config(path: &Path) -> Result<Config, CliError> {
    let cannot = |e: std::io::Error| {
        CliError::Usage(format!(
            "cannot read config {}: {e}; pass --config PATH or create budgets.toml (see docs/configuration.md)",
            path.display()
        ))
    };
    // Opened without blocking and checked through the opened descriptor: a FIFO or a device
    // given as the config is refused instead of hanging in open(2) or read(2).
    let (file, meta) = match belljar_host::regular::open_regular(path).map_err(cannot)? {
        belljar_host::regular::Opened::File(f, m) => (Some(f), m),
        belljar_host::regular::Opened::Other(m) => (None, m),
    };
    let Some(file) = file.filter(|_| meta.is_file()) else {
        return Err(CliError::Usage(format!(
            "config {} is not a regular file (a FIFO, a device or a directory); pass --config PATH of a budgets.toml file",
            path.display()
        )));
    };
    let text = std::io::read_to_string(file).map_err(cannot)?;
    let config = Config::parse(&text, path)?;
    crate::chat_template::check_config(&config)?;
    Ok(config)
}

/// The memory reading, real or assumed (`--assume-total`, `--assume-available`).
fn host_memory(args: &ValidateArgs) -> Result<HostMemory, CliError> {
    let real = || {
        read_host_memory(&ProcRoot::default())
            .map_err(|e| CliError::Refused(format!("cannot read host memory: {e}")))
    };
    let host = match (args.assume_total, args.assume_available) {
        (Some(t), Some(a)) => HostMemory {
            total: t.bytes(),
            available: a.bytes(),
        },
        (Some(t), None) => HostMemory {
            total: t.bytes(),
            available: t.bytes(),
        },
        (None, Some(a)) => HostMemory {
            available: a.bytes(),
            ..real()?
        },
        (None, None) => real()?,
    };
    if host.available > host.total {
        return Err(CliError::Usage(format!(
            "--assume-available ({}) is larger than the total memory ({}); lower it or pass a larger --assume-total",
            belljar_budget::Size(host.available),
            belljar_budget::Size(host.total)
        )));
    }
    Ok(host)
}

fn report(
    config: &Config,
    mode: &str,
    host: HostMemory,
    observations: &[crate::learn::Observation],
) -> Result<ValidationReport, CliError> {
    let specs = config.mode(mode, cpu_count())?;
    let estimated = plan(config, &specs, observations)?;
    let planned: Vec<PlannedInstance> = estimated.iter().map(|e| e.planned.clone()).collect();
    let mut report = validate(mode, &config.budget_policy(), host, &planned);
    if specs.iter().any(|s| s.gpu_layers > 0) {
        match Gpus::init() {
            Ok(g) => report.apply_vram(vram_verdicts(
                config,
                &specs,
                &estimated,
                &gpu_totals(Some(&g), &specs),
            )?),
            Err(e) => eprintln!(
                "note: no NVML ({e}): VRAM is not checked; llama.cpp runs instances with gpu_layers on the CPU where there is no GPU"
            ),
        }
    }
    Ok(report)
}

/// The GPUs' indices and total memory, when some instance offloads layers.
pub fn gpu_totals(gpus: Option<&Gpus>, specs: &[InstanceSpec]) -> Vec<(u32, u64)> {
    match gpus {
        Some(g) if specs.iter().any(|s| s.gpu_layers > 0) => g
            .read()
            .map(|r| r.iter().map(|g| (g.index, g.total)).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Layer 1 for VRAM: each instance's VRAM reservation (the offloaded share of its weights and
/// the KV cache of those layers) per GPU. Empty without GPUs.
pub fn vram_verdicts(
    config: &Config,
    specs: &[InstanceSpec],
    estimated: &[Estimated],
    gpus: &[(u32, u64)],
) -> Result<Vec<DeviceVerdict>, CliError> {
    if gpus.is_empty() {
        return Ok(Vec::new());
    }
    let mut demands = Vec::new();
    for (spec, e) in specs
        .iter()
        .zip(estimated)
        .filter(|(s, _)| s.gpu_layers > 0)
    {
        demands.push(VramDemand {
            name: spec.name.to_string(),
            device: spec.gpu_device,
            vram: crate::estimating::vram(spec, e).map_err(|e| {
                CliError::Usage(format!(
                    "{}: instance {}: {e}",
                    config.path.display(),
                    spec.name
                ))
            })?,
        });
    }
    Ok(validate_vram(&demands, gpus, config.budget.safety_margin))
}

/// Probes each distinct model file once (its header read once) and describes the instances
/// for layer 1. A file that is not a usable model (missing, not GGUF, truncated, a malformed
/// header) is a usage error naming the instance; a header without what the GGUF estimate needs
/// falls back to the file rule with a warning.
pub fn plan(
    config: &Config,
    specs: &[InstanceSpec],
    observations: &[crate::learn::Observation],
) -> Result<Vec<Estimated>, CliError> {
    let mut files = BTreeMap::new();
    let mut planned = Vec::with_capacity(specs.len());
    for spec in specs {
        if !files.contains_key(&spec.model) {
            let probe = probe_model_file(&spec.model).map_err(|e| {
                CliError::Usage(format!(
                    "{}: instance {}: {e}",
                    config.path.display(),
                    spec.name
                ))
            })?;
            files.insert(spec.model.clone(), probe);
        }
        let e = crate::estimating::estimate(spec, &files[&spec.model], observations);
        if let (
            Some(err),
            belljar_budget::estimate::EstimateSource::Gguf
            | belljar_budget::estimate::EstimateSource::Max,
        ) = (&e.gguf_error, config.budget.estimate)
        {
            tracing::warn!(instance = %spec.name, "no GGUF estimate ({err}); using the file-size rule");
        }
        planned.push(e);
    }
    Ok(planned)
}
