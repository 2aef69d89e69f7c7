//! Raw input for the bad-input catalogue (tests/tests/catalogue.rs): a binary run under a
//! deadline (a FIFO must never hang a test), hand-made frames on the control socket, and
//! snapshots of a directory's files to show that a refused input changed nothing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Run;

/// Runs `cmd` with its output captured; kills it after `timeout`. Returns what it said and
/// whether it had to be killed (then `code` is None).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> (Run, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let run = Run {
        code: if timed_out { None } else { status.code() },
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    (run, timed_out)
}

/// One frame: the 4-byte big-endian length, then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A correct `ClientHello` frame.
pub fn client_hello() -> Vec<u8> {
    frame(
        format!(
            r#"{{"protocol_version":{}}}"#,
            belljar_protocol::PROTOCOL_VERSION
        )
        .as_bytes(),
    )
}

/// What the supervisor answered a raw conversation: every frame it sent (as JSON; a payload
/// that is not JSON is kept as a string), and whether it closed the connection before `wait`.
#[derive(Debug)]
pub struct RawReply {
    pub frames: Vec<serde_json::Value>,
    pub closed: bool,
}

impl RawReply {
    /// The first `Error` answer: (message, exit_code).
    pub fn error(&self) -> Option<(String, u64)> {
        self.frames.iter().find(|f| f["type"] == "Error").map(|f| {
            (
                f["message"].as_str().unwrap_or_default().to_owned(),
                f["exit_code"].as_u64().unwrap_or(u64::MAX),
            )
        })
    }
}

/// Connects to `socket`, sends a correct hello first when `hello` (its `ServerHello` is in the
/// reply), then `bytes`; shuts the write side when `close_write`; reads frames until the
/// supervisor closes the connection or `wait` passes.
pub fn control_raw(
    socket: &Path,
    hello: bool,
    bytes: &[u8],
    close_write: bool,
    wait: Duration,
) -> RawReply {
    let mut s = UnixStream::connect(socket).expect("connect to the control socket");
    if hello {
        s.write_all(&client_hello()).expect("send the hello");
    }
    // The supervisor may answer and close before it has read everything: a failed write is
    // part of the conversation, not a test failure.
    let _ = s.write_all(bytes);
    if close_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        let mut chunk = [0u8; 64 * 1024];
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            // A reset after the answer counts as a close.
            Err(_) => {
                closed = true;
                break;
            }
        }
        if answered(&buf) {
            break;
        }
    }
    RawReply {
        frames: split_frames(&buf),
        closed,
    }
}

/// Whether `buf` already holds a final answer (anything but a hello or a token), so a
/// conversation that succeeded need not wait for the deadline.
fn answered(buf: &[u8]) -> bool {
    split_frames(buf)
        .iter()
        .any(|f| matches!(f["type"].as_str(), Some("Error" | "Ok" | "Done" | "Status")))
}

fn split_frames(mut buf: &[u8]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            break;
        }
        let payload = &buf[4..4 + len];
        out.push(serde_json::from_slice(payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
        }));
        buf = &buf[4 + len..];
    }
    out
}

/// Every regular file under `dir` (recursively) with its bytes; directories, sockets and FIFOs
/// are not listed. Two equal snapshots mean no file was created, removed, renamed or changed.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                todo.push(path);
            } else if ft.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                out.insert(rel, bytes);
            }
        }
    }
    out
}

/// The names of the subdirectories of `dir` (for a cgroup parent: the instance cgroups).
pub fn subdirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Describes how two snapshots differ (empty when equal).
pub fn snapshot_diff(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> String {
    let mut d = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => d.push(format!("{} removed", p.display())),
            Some(a) if a != b => d.push(format!("{} changed", p.display())),
            Some(_) => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        d.push(format!("{} created", p.display()));
    }
    d.join(", ")
}
