//! A minimal HTTP/1.1 client over a plain `TcpStream`, for the HTTP API's end-to-end tests: it
//! sends exactly the bytes a test gives (no client library refuses a malformed request or
//! rewrites a `Host`), reads `Content-Length`, chunked and close-delimited bodies, and reads
//! server-sent events line by line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// How long a test waits for an answer's next bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the {} answer is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts an OpenAI error body with this status; returns the `error` object.
    #[track_caller]
    pub fn expect_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        let e = v["error"].clone();
        assert!(
            e["message"].is_string() && e["type"].is_string() && e.get("code").is_some(),
            "OpenAI's error shape: {v}"
        );
        assert!(e.get("param").is_some(), "OpenAI's error shape: {v}");
        e
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A connection to `addr` with the test's timeouts.
pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(READ_TIMEOUT))
        .expect("read timeout");
    s.set_write_timeout(Some(READ_TIMEOUT))
        .expect("write timeout");
    s
}

/// The bytes of a request: `headers` as given, then `Host: addr` unless a `Host` is among
/// them, `Content-Length` for a body unless given, and `Connection: close`.
pub fn request_bytes(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("host") {
        out.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length") && (!body.is_empty() || method == "POST") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if !has("connection") {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `raw` as is and reads the whole response; `None` when the server closed the
/// connection without answering.
pub fn raw(addr: &str, raw: &[u8]) -> Option<Reply> {
    let mut s = connect(addr);
    // The server may answer (and close) before it read everything: a failed write is fine.
    let _ = s.write_all(raw);
    let _ = s.flush();
    let mut r = BufReader::new(s);
    let (status, headers) = head(&mut r)?;
    let mut body = Vec::new();
    body_reader(r, &headers)
        .read_to_end(&mut body)
        .unwrap_or_else(|e| panic!("reading the {status} body: {e}"));
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// A request with `headers` and `body`; panics when no answer comes.
#[track_caller]
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    raw(addr, &request_bytes(addr, method, path, headers, body))
        .unwrap_or_else(|| panic!("{method} {path}: the server closed without an answer"))
}

#[track_caller]
pub fn get(addr: &str, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"")
}

/// POST of `body` as `application/json`.
#[track_caller]
pub fn post_json(addr: &str, path: &str, body: &Value) -> Reply {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The status line and headers; `None` when the connection ends before them.
fn head(r: &mut impl BufRead) -> Option<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("a header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .unwrap_or_else(|| panic!("not a header: {l:?}"));
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if status == 100 {
        return head(r);
    }
    Some((status, headers))
}

/// The body, however the headers say it is delimited.
fn body_reader<R: BufRead + Send + 'static>(
    r: R,
    headers: &[(String, String)],
) -> Box<dyn Read + Send> {
    if header_of(headers, "transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        return Box::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        });
    }
    match header_of(headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        Some(n) => Box::new(r.take(n)),
        None => Box::new(r),
    }
}

/// A chunked body, de-chunked.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                self.done = true;
                // Trailers until the empty line (none here); the connection closes anyway.
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` name, when it has one.
    pub event: Option<String>,
    /// Its `data:` lines, joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON; panics when it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

/// A response read as it arrives: its head, then its events.
pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: BufReader<Box<dyn Read + Send>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// The next event (comments and keep-alives skipped); `None` at the end of the body.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        let mut event = None;
        let mut data: Option<String> = None;
        let mut line = String::new();
        loop {
            line.clear();
            match self.body.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    return data.map(|data| SseEvent { event, data });
                }
                Ok(_) => {}
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if let Some(data) = data.take() {
                    return Some(SseEvent { event, data });
                }
                event = None;
                continue;
            }
            if l.starts_with(':') {
                continue;
            }
            let (field, value) = l.split_once(':').unwrap_or((l, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
    }

    /// Every event up to the end of the body.
    pub fn events(&mut self) -> Vec<SseEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn expect_status(&mut self, status: u16) {
        if self.status != status {
            let got = self.status;
            panic!("status {got}, not {status}: {}", self.rest());
        }
    }

    /// The rest of the body as text (for a response that is not a stream after all).
    pub fn rest(&mut self) -> String {
        let mut s = String::new();
        let _ = self.body.read_to_string(&mut s);
        s
    }
}

/// POSTs `body` as JSON and returns the response to be read as it arrives.
#[track_caller]
pub fn stream(addr: &str, path: &str, body: &Value) -> Stream {
    stream_with(addr, path, &[], body)
}

/// [`stream`] with more headers.
#[track_caller]
pub fn stream_with(addr: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Stream {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let bytes = request_bytes(addr, "POST", path, &all, body.to_string().as_bytes());
    let mut s = connect(addr);
    s.write_all(&bytes).expect("send the request");
    let mut r = BufReader::new(s);
    let (status, headers) =
        head(&mut r).unwrap_or_else(|| panic!("POST {path}: the server closed without an answer"));
    let body = BufReader::new(body_reader(r, &headers));
    Stream {
        status,
        headers,
        body,
    }
}
