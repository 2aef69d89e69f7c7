//! Logs: `tracing` to journald (native protocol, structured fields) or to stderr as text or
//! JSON lines, filtered by RUST_LOG (default `info`).
//!
//! Two streams leave the supervisor: its own events (`SYSLOG_IDENTIFIER=belljar`) and its
//! workers' output lines (target [`WORKER_TARGET`], `SYSLOG_IDENTIFIER=belljar-worker`). In
//! journald each is its own layer with its own identifier; in text and JSON both go to stderr.

use std::io::IsTerminal;

use tracing_subscriber::Layer as _;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::fmt::format::{Writer, debug_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The tracing target of forwarded worker output lines.
pub const WORKER_TARGET: &str = "belljar_worker";
/// The journal identifiers of the supervisor's own entries and of its workers' output.
pub const SYSLOG_IDENTIFIER: &str = "belljar";
pub const WORKER_SYSLOG_IDENTIFIER: &str = "belljar-worker";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// journald when it is reachable (JOURNAL_STREAM set or its socket present), else text.
    Auto,
    /// The journal's native protocol: one entry per event with its fields.
    Journald,
    /// Readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

/// The socket journald listens on for the native protocol.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether `auto` picks journald: systemd connected stderr to the journal, or the journal's
/// socket exists and stderr is not a terminal someone is watching.
fn journald_reachable() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
        || (std::path::Path::new(JOURNAL_SOCKET).exists() && !std::io::stderr().is_terminal())
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the subscriber once; later calls do nothing. journald that cannot be reached falls
/// back to text with a warning (the supervisor must log somewhere).
pub fn init(format: LogFormat) {
    let format = match format {
        LogFormat::Auto if journald_reachable() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let mut fallback = None;
    if format == LogFormat::Journald {
        match journald_layers() {
            Ok((own, workers)) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(own.with_filter(filter_fn(|m| m.target() != WORKER_TARGET)))
                    .with(workers.with_filter(filter_fn(|m| m.target() == WORKER_TARGET)))
                    .try_init();
                return;
            }
            Err(e) => fallback = Some(e),
        }
    }
    if format == LogFormat::Json {
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter())
            .with_writer(|| Lossy(std::io::stderr()))
            .log_internal_errors(false)
            .try_init();
    } else {
        // Message IDs are for journal queries; on a terminal they are noise.
        let fields = debug_fn(|w: &mut Writer<'_>, field, value| match field.name() {
            "message_id" => Ok(()),
            "message" => write!(w, "{value:?}"),
            name => write!(w, "{name}={value:?}"),
        })
        .delimited(" ");
        let _ = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .with_env_filter(filter())
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(|| Lossy(std::io::stderr()))
            .log_internal_errors(false)
            .try_init();
    }
    if let Some(e) = fallback {
        tracing::warn!("journald is not reachable ({e}); logging to stderr");
    }
}

/// A log stream whose write errors are dropped: a reader that went away (`run 2>&1 | tee log`
/// and tee died first on Ctrl-C) loses the lines, and the supervisor goes on stopping its workers.
/// (Rust ignores SIGPIPE, so a closed pipe is an EPIPE here, never a signal.)
struct Lossy<W>(W);

impl<W: std::io::Write> std::io::Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

fn journald_layers() -> std::io::Result<(tracing_journald::Layer, tracing_journald::Layer)> {
    let layer = |id: &str| {
        tracing_journald::layer().map(|l| {
            l.with_field_prefix(None)
                .with_syslog_identifier(id.to_owned())
        })
    };
    Ok((layer(SYSLOG_IDENTIFIER)?, layer(WORKER_SYSLOG_IDENTIFIER)?))
}
