//! `supervisor status [--json]`: asks the running supervisor over its control socket.

use std::time::Duration;

use belljar_budget::Size;
use belljar_protocol::control::{Command, Response, StatusQuery, StatusReport};

use crate::cli::{GlobalArgs, StatusArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

/// How long status waits for its answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(global: &GlobalArgs, args: &StatusArgs) -> Result<Exit, CliError> {
    let report = match request(
        global,
        &Command::Status(StatusQuery {}),
        Some(STATUS_TIMEOUT),
    )? {
        Response::Status(r) => r,
        other => {
            return Err(CliError::Unreachable(format!(
                "unexpected answer to status: {other:?}"
            )));
        }
    };
    if args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Refused(e.to_string()))?;
        println!("{text}");
    } else {
        use std::io::IsTerminal;
        print!("{}", table(&report, std::io::stdout().is_terminal()));
    }
    Ok(Exit::Ok)
}

/// The table fits 100 columns: one row per instance, sorted by name, and its reason on an
/// indented line below (cut to fit). States are coloured only on a terminal.
const WIDTH: usize = 100;

fn table(r: &StatusReport, color: bool) -> String {
    let s = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |b| Size(b).to_string());
    let mut out = match &r.http_addr {
        Some(a) => format!("api: http://{a}/v1\n"),
        None => String::new(),
    };
    out.push_str(&format!(
        "memory: {} free of {} ({}, pressure {}); budget: {} of {}\n",
        Size(r.host.available),
        Size(r.host.total),
        r.host.source,
        r.host.level,
        Size(r.budget.allocated),
        Size(r.budget.usable)
    ));
    for g in &r.gpus {
        let name: String = g.name.chars().take(32).collect();
        out.push_str(&format!(
            "gpu {}: {name}: {} used of {} (pressure {})\n",
            g.index,
            Size(g.used),
            Size(g.total),
            g.level
        ));
    }
    out.push_str(&format!(
        "{:<16} {:<18} {:>7} {:>11} {:>11} {:>11} {:>3} {:<12}\n",
        "NAME", "STATE", "PID", "MEMORY", "LIMIT", "PEAK", "RST", "LAST EXIT"
    ));
    let mut rows: Vec<_> = r.instances.iter().collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    for i in rows {
        let mut state = match i.state.as_str() {
            "loading" => format!("loading {:.0}%", i.load_progress * 100.0),
            _ => i.state.clone(),
        };
        if i.thrashing {
            state.push('!');
        }
        let padded = format!("{state:<18}");
        let state = if color {
            paint(&i.state, &padded)
        } else {
            padded
        };
        out.push_str(&format!(
            "{:<16} {} {:>7} {:>11} {:>11} {:>11} {:>3} {:<12}\n",
            i.name,
            state,
            i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            s(i.memory.current),
            s(i.memory.limit),
            s(i.memory.peak),
            i.restarts,
            i.last_exit.as_deref().unwrap_or("-")
        ));
        let mut reason = i.reason.clone();
        if let Some(v) = i.gpu_memory.filter(|v| *v > 0) {
            reason = format!("[VRAM {}] {reason}", Size(v));
        }
        if i.cpu_fallback {
            reason = format!("[CPU fallback] {reason}");
        }
        if i.queued > 0 {
            reason = format!("[{} queued] {reason}", i.queued);
        }
        if let Some(tag) = swap_tag(i) {
            reason = format!("[{tag}] {reason}");
        }
        let reason: String = reason.chars().take(WIDTH - 4).collect();
        out.push_str(&format!("    {reason}\n"));
    }
    if r.omitted > 0 {
        out.push_str(&format!(
            "... and {} more instances, left out to fit one reply\n",
            r.omitted
        ));
    }
    out
}

/// The [swap] marker before the reason: `on demand` (with its loads and evictions once it has
/// any) and `pinned`; nothing for an unpinned always-loaded instance.
fn swap_tag(i: &belljar_protocol::control::InstanceStatus) -> Option<String> {
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let mut parts = Vec::new();
    if i.load == "on-demand" {
        parts.push("on demand".to_owned());
    }
    if i.pinned {
        parts.push("pinned".to_owned());
    }
    if i.loads > 0 || i.evictions > 0 {
        parts.push(format!(
            "{}, {}",
            plural(i.loads, "load"),
            plural(i.evictions, "eviction")
        ));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// ANSI colour by state: green serving, yellow on the way, red failed, dim stopped, shed or
/// unloaded.
fn paint(state: &str, text: &str) -> String {
    let code = match state {
        "ready" => "32",
        "failed" => "31",
        "stopped" | "shed" | "unloaded" => "2",
        _ => "33",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;
    use belljar_protocol::control::{
        BudgetStatus, GpuStatus, HostStatus, InstanceStatus, MemoryStatus,
    };

    #[test]
    fn the_table_fits_100_columns() {
        let inst = |name: &str, state: &str| InstanceStatus {
            name: name.into(),
            state: state.into(),
            thrashing: state == "loading",
            reason: "x".repeat(300),
            pid: Some(4_194_304),
            restarts: 12,
            oom_kills: 0,
            last_exit: Some("precheck-refused".into()),
            load_progress: 0.5,
            allocated: 1 << 40,
            estimate_source: "file".into(),
            memory: MemoryStatus {
                current: Some(1023 << 30),
                limit: Some(1023 << 30),
                reservation: None,
                peak: Some(1023 << 30),
                last_peak: None,
            },
            uptime_s: Some(1),
            gpu_memory: Some(3 << 30),
            cpu_fallback: state == "loading",
            gpu_release: None,
            queued: 3,
            aliases: vec![],
            chat_template: None,
            last_used_unix: None,
            load: "always".into(),
            pinned: false,
            loads: 0,
            evictions: 0,
        };
        let r = StatusReport {
            host: HostStatus {
                total: 1 << 40,
                available: 1 << 39,
                level: "emergency".into(),
                psi_some_avg10: None,
                source: "cgroup".into(),
            },
            budget: BudgetStatus {
                usable: 1 << 40,
                allocated: 1 << 39,
            },
            instances: vec![
                inst("zeta", "waiting-for-memory"),
                inst(&"a".repeat(16), "loading"),
            ],
            metrics_addr: None,
            http_addr: None,
            gpus: vec![GpuStatus {
                index: 0,
                name: "NVIDIA H100 80GB HBM3 with a name longer than any real one".into(),
                used: 81 << 30,
                total: 80 << 30,
                level: "emergency".into(),
            }],
            omitted: 0,
        };

        let text = table(&r, false);
        for line in text.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(text.contains("loading 50%!"), "{text}");
        assert!(text.contains("gpu 0: NVIDIA H100"), "{text}");
        assert!(
            text.contains("[3 queued] [CPU fallback] [VRAM 3.0 GiB]"),
            "{text}"
        );
        let names: Vec<&str> = text
            .lines()
            .skip(3)
            .step_by(2)
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(names, [&"a".repeat(16), "zeta"], "sorted by name");
        assert!(!text.contains('\x1b'), "no colour off a terminal");
        assert!(table(&r, true).contains("\x1b[33m"));
    }

    #[test]
    fn on_demand_instances_are_marked_with_their_loads_and_evictions() {
        let base = InstanceStatus {
            name: "coder".into(),
            state: "unloaded".into(),
            thrashing: false,
            reason: "loaded by its next request".into(),
            pid: None,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
            load_progress: 0.0,
            allocated: 0,
            estimate_source: "gguf".into(),
            memory: MemoryStatus {
                current: None,
                limit: None,
                reservation: None,
                peak: None,
                last_peak: None,
            },
            uptime_s: None,
            gpu_memory: None,
            cpu_fallback: false,
            gpu_release: None,
            queued: 0,
            aliases: vec![],
            chat_template: None,
            last_used_unix: None,
            load: "on-demand".into(),
            pinned: false,
            loads: 0,
            evictions: 0,
        };
        assert_eq!(swap_tag(&base).as_deref(), Some("on demand"));
        let used = InstanceStatus {
            loads: 3,
            evictions: 1,
            pinned: true,
            ..base.clone()
        };
        assert_eq!(
            swap_tag(&used).as_deref(),
            Some("on demand, pinned, 3 loads, 1 eviction")
        );
        let always = InstanceStatus {
            load: "always".into(),
            ..base.clone()
        };
        assert_eq!(swap_tag(&always), None);
        let r = StatusReport {
            host: HostStatus {
                total: 1 << 30,
                available: 1 << 29,
                level: "normal".into(),
                psi_some_avg10: None,
                source: "meminfo".into(),
            },
            budget: BudgetStatus {
                usable: 1 << 30,
                allocated: 0,
            },
            instances: vec![used],
            metrics_addr: None,
            http_addr: None,
            gpus: vec![],
            omitted: 0,
        };
        let text = table(&r, false);
        assert!(text.contains("coder            unloaded "), "{text}");
        assert!(
            text.contains(
                "    [on demand, pinned, 3 loads, 1 eviction] loaded by its next request"
            ),
            "{text}"
        );
        assert!(table(&r, true).contains("\x1b[2munloaded"), "dim");
    }
}
