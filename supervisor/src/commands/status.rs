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
        print!("{}", table(&report));
    }
    Ok(Exit::Ok)
}

fn table(r: &StatusReport) -> String {
    let s = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |b| Size(b).to_string());
    let mut out = format!(
        "host: {} available of {}; budget: {} allocated of {}\n",
        Size(r.host.available),
        Size(r.host.total),
        Size(r.budget.allocated),
        Size(r.budget.usable)
    );
    out.push_str(&format!(
        "{:<16} {:<19} {:>8} {:>11} {:>11} {:>11} {:<16} {}\n",
        "NAME", "STATE", "PID", "MEMORY", "LIMIT", "PEAK", "LAST EXIT", "REASON"
    ));
    for i in &r.instances {
        let state = if i.state == "loading" {
            format!("loading {:.0}%", i.load_progress * 100.0)
        } else {
            i.state.clone()
        };
        out.push_str(&format!(
            "{:<16} {:<19} {:>8} {:>11} {:>11} {:>11} {:<16} {}\n",
            i.name,
            state,
            i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            s(i.memory.current),
            s(i.memory.limit),
            s(i.memory.peak),
            i.last_exit.as_deref().unwrap_or("-"),
            i.reason
        ));
    }
    out
}
