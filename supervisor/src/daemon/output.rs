//! Worker stdout and stderr: read line by line and forwarded whole, one log entry per line
//! (target [`WORKER_TARGET`]: `SYSLOG_IDENTIFIER=belljar-worker` with `INSTANCE` in the
//! journal), rate-limited per instance across restarts so a crash loop cannot flood the journal.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use belljar_budget::ratelimit::{Admit, LineLimiter};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::events::{Entry, Event};
use crate::logging::WORKER_TARGET;

/// One instance's limiter, shared by its stdout and stderr readers and by all of its runs.
pub type SharedLimiter = Arc<Mutex<LineLimiter>>;

/// Longer lines are cut here (journald's own `LineMax=` is 48 KiB) and marked as cut; the rest
/// of the line is skipped, never forwarded as a line of its own.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Starts forwarding one of a worker's output pipes; the task ends at end of file (when the
/// worker and everything it started have closed the pipe).
pub fn forward(
    name: &str,
    stream: Stream,
    pipe: OwnedFd,
    limiter: SharedLimiter,
    epoch: Instant,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    let name = name.to_owned();
    Ok(tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(MAX_LINE, pipe);
        let mut line = Vec::with_capacity(256);
        let mut cut = 0usize;
        while let Ok(buf) = reader.fill_buf().await {
            if buf.is_empty() {
                if !line.is_empty() || cut > 0 {
                    emit(&name, stream, &line, cut, &limiter, epoch);
                }
                break;
            }
            let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            let room = MAX_LINE - line.len();
            let keep = chunk.len().min(room);
            line.extend_from_slice(&chunk[..keep]);
            cut += chunk.len() - keep;
            let used = end.unwrap_or(chunk.len());
            reader.consume(used);
            if end.is_some() {
                emit(&name, stream, &line, cut, &limiter, epoch);
                line.clear();
                cut = 0;
            }
        }
    }))
}

fn emit(
    name: &str,
    stream: Stream,
    line: &[u8],
    cut: usize,
    limiter: &SharedLimiter,
    epoch: Instant,
) {
    let admit = match limiter.lock() {
        Ok(mut l) => l.admit(epoch.elapsed()),
        Err(_) => Admit::Forward { suppressed: 0 },
    };
    let Admit::Forward { suppressed } = admit else {
        return;
    };
    if suppressed > 0 {
        Entry::new(Event::OutputSuppressed).named(name).log(format_args!(
            "{suppressed} line(s) of worker output dropped by the rate limit ([logging] worker_output_burst per worker_output_interval)"
        ));
    }
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let stream = stream.as_str();
    let cut = (cut > 0).then_some(cut);
    // The worker logs `LEVEL target: message` (no time, no colour) when its stderr is a pipe.
    let head = text.trim_start();
    if head.starts_with("ERROR") || head.starts_with("error:") {
        tracing::error!(target: WORKER_TARGET, instance = name, stream, cut_bytes = cut, "{text}");
    } else if head.starts_with("WARN") {
        tracing::warn!(target: WORKER_TARGET, instance = name, stream, cut_bytes = cut, "{text}");
    } else {
        tracing::info!(target: WORKER_TARGET, instance = name, stream, cut_bytes = cut, "{text}");
    }
}
