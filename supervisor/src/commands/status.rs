//! `supervisor status [--json]`: asks the running supervisor over its control socket.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use belljar_budget::Size;
use belljar_protocol::control::{Command, Request, Response, StatusQuery, StatusReport};
use belljar_protocol::{FrameReader, MAX_FRAME, PROTOCOL_VERSION, decode, write_frame};

use crate::cli::{GlobalArgs, StatusArgs};
use crate::error::{CliError, Exit};
use crate::paths;

/// How long the client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(global: &GlobalArgs, args: &StatusArgs) -> Result<Exit, CliError> {
    let report = match request(global, Command::Status(StatusQuery {}))? {
        Response::Status(r) => r,
        Response::Error(e) => return Err(error_exit(e.message, e.exit_code)),
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

/// Sends one request to the supervisor and returns its answer.
pub fn request(global: &GlobalArgs, command: Command) -> Result<Response, CliError> {
    let dir = paths::resolve(
        global.runtime_dir.clone(),
        None,
        false,
        paths::DEFAULT_RUNTIME_DIR,
    );
    let socket = dir.join(crate::commands::run::CONTROL_SOCKET);
    let unreachable = |e: std::io::Error| {
        CliError::Unreachable(format!(
            "cannot reach the supervisor at {}: {e}; is `supervisor run` running with the same --runtime-dir?",
            socket.display()
        ))
    };
    let mut stream = UnixStream::connect(&socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(unreachable)?;
    write_frame(
        &mut stream,
        &Request {
            protocol_version: PROTOCOL_VERSION,
            command,
        },
    )
    .map_err(|e| CliError::Unreachable(format!("cannot send to {}: {e}", socket.display())))?;
    let payload = FrameReader::new(&stream, MAX_FRAME)
        .read_frame()
        .map_err(|e| CliError::Unreachable(format!("no answer from {}: {e}", socket.display())))?
        .ok_or_else(|| {
            CliError::Unreachable(format!(
                "{} closed the connection without answering",
                socket.display()
            ))
        })?;
    decode(&payload)
        .map_err(|e| CliError::Unreachable(format!("bad answer from the supervisor: {e}")))
}

fn error_exit(message: String, code: u8) -> CliError {
    match code {
        2 => CliError::Usage(message),
        3 => CliError::Unreachable(message),
        _ => CliError::Refused(message),
    }
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
