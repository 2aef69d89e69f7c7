//! `supervisor validate`: layer-1 validation of one mode (or all of them), as text or JSON.

use std::collections::BTreeMap;
use std::path::Path;

use belljar_budget::{HostMemory, PlannedInstance, ValidationReport, validate};
use belljar_config::{Config, InstanceSpec};
use belljar_host::{ProcRoot, cpu_count, probe_model_file, read_host_memory};
use serde::Serialize;

use crate::cli::{GlobalArgs, ValidateArgs};
use crate::error::{CliError, Exit};

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
    let reports = modes
        .iter()
        .map(|m| report(&config, m, host))
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

/// Reads and checks the config file.
pub fn load_config(path: &Path) -> Result<Config, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read config {}: {e}; pass --config PATH or create budgets.toml (see docs/configuration.md)",
            path.display()
        ))
    })?;
    Ok(Config::parse(&text, path)?)
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

fn report(config: &Config, mode: &str, host: HostMemory) -> Result<ValidationReport, CliError> {
    let specs = config.mode(mode, cpu_count())?;
    Ok(validate(
        mode,
        &config.budget_policy(),
        host,
        &plan(config, &specs)?,
    ))
}

/// Probes each distinct model file once and describes the instances for layer 1.
pub fn plan(config: &Config, specs: &[InstanceSpec]) -> Result<Vec<PlannedInstance>, CliError> {
    let mut sizes = BTreeMap::new();
    let mut planned = Vec::with_capacity(specs.len());
    for spec in specs {
        let size = match sizes.get(&spec.model) {
            Some(&s) => s,
            None => {
                let probe = probe_model_file(&spec.model).map_err(|e| {
                    CliError::Usage(format!(
                        "{}: instance {}: {e}",
                        config.path.display(),
                        spec.name
                    ))
                })?;
                sizes.insert(spec.model.clone(), probe.size);
                probe.size
            }
        };
        planned.push(PlannedInstance {
            name: spec.name.to_string(),
            model: spec.model.display().to_string(),
            file_size: size,
            ram_limit: spec.ram_limit,
            priority: spec.priority,
        });
    }
    Ok(planned)
}
