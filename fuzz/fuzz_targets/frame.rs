//! The frame codec on any byte stream, against a reference model of the format.
//!
//! Input: one byte picks the reader's cap (0 to 2040 bytes), one byte seeds how the stream is cut
//! into short reads (and interrupted reads, and `Pending` polls for the async reader); the rest
//! is the stream. The blocking [`FrameReader`] must yield exactly the model's events (frames,
//! skipped oversized frames, a truncation, the end) and the async `read_frame` the same up to its
//! first refusal. Every payload read is then encoded as a JSON string with the same cap and must
//! read back equal, and all of them written with `write_frame` must read back in order.
#![no_main]

use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use belljar_fuzz::start_case;
use belljar_protocol::frame::tokio_io;
use belljar_protocol::{FrameError, FrameReader, MAX_FRAME, decode, encode, write_frame};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

#[derive(Debug, PartialEq)]
enum Event {
    Frame(Vec<u8>),
    TooLarge(usize),
    Truncated,
    End,
}

/// The format, read by the spec: a 4-byte big-endian length and that many bytes; a length over
/// `max` is skipped whole (or is a truncation when the stream ends inside it).
fn model(s: &[u8], max: usize, skip_oversized: bool) -> Vec<Event> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        if pos == s.len() {
            out.push(Event::End);
            return out;
        }
        if s.len() - pos < 4 {
            out.push(Event::Truncated);
            return out;
        }
        let len = u32::from_be_bytes(s[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        pos += 4;
        if len > max && !skip_oversized {
            out.push(Event::TooLarge(len));
            return out;
        }
        if s.len() - pos < len {
            out.push(Event::Truncated);
            return out;
        }
        out.push(if len > max {
            Event::TooLarge(len)
        } else {
            Event::Frame(s[pos..pos + len].to_vec())
        });
        pos += len;
    }
}

/// Short reads of 1 to 16 bytes, and now and then an `Interrupted` error or a `Pending` poll.
struct Chunks<'a> {
    data: &'a [u8],
    state: u32,
}

impl Chunks<'_> {
    fn next(&mut self) -> u32 {
        // xorshift32; the seed is never 0.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        self.state
    }
    fn take(&mut self, room: usize) -> &[u8] {
        let n = (1 + self.next() as usize % 16)
            .min(room)
            .min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.next().is_multiple_of(7) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let head = self.take(buf.len());
        buf[..head.len()].copy_from_slice(head);
        Ok(head.len())
    }
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.next().is_multiple_of(5) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let head = this.take(buf.remaining());
        buf.put_slice(head);
        Poll::Ready(Ok(()))
    }
}

fn sync_events(s: &[u8], max: usize, seed: u8) -> Vec<Event> {
    let mut r = FrameReader::new(
        Chunks {
            data: s,
            state: u32::from(seed) | 0x100,
        },
        max,
    );
    let mut out = Vec::new();
    loop {
        let event = match r.read_frame() {
            Ok(None) => Event::End,
            Ok(Some(p)) => {
                assert!(p.len() <= max, "a payload over the cap was returned");
                Event::Frame(p)
            }
            Err(FrameError::TooLarge { len, max: m }) => {
                assert_eq!(m, max);
                Event::TooLarge(len)
            }
            Err(FrameError::Truncated) => Event::Truncated,
            Err(e) => panic!("unexpected error from an in-memory stream: {e}"),
        };
        let last = matches!(event, Event::End | Event::Truncated);
        out.push(event);
        if last {
            return out;
        }
    }
}

fn async_events(s: &[u8], max: usize, seed: u8) -> Vec<Event> {
    let mut r = Chunks {
        data: s,
        state: u32::from(seed) | 0x100,
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        let mut fut = std::pin::pin!(tokio_io::read_frame(&mut r, max));
        // Each poll either makes progress or returns Pending at most every other time.
        let result = (0..16 * s.len() + 64)
            .find_map(|_| match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => Some(r),
                Poll::Pending => None,
            })
            .expect("read_frame finishes on an in-memory stream");
        let event = match result {
            Ok(None) => Event::End,
            Ok(Some(p)) => {
                assert!(p.len() <= max, "a payload over the cap was returned");
                Event::Frame(p)
            }
            Err(FrameError::TooLarge { len, .. }) => Event::TooLarge(len),
            Err(FrameError::Truncated) => Event::Truncated,
            Err(e) => panic!("unexpected error from an in-memory stream: {e}"),
        };
        let last = !matches!(event, Event::Frame(_));
        out.push(event);
        if last {
            return out;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    start_case();
    let [cap, seed, stream @ ..] = data else {
        return;
    };
    let max = usize::from(*cap) * 8;

    let expected = model(stream, max, true);
    let events = sync_events(stream, max, *seed);
    assert_eq!(events, expected, "FrameReader disagrees with the model");
    assert_eq!(
        async_events(stream, max, *seed),
        model(stream, max, false),
        "tokio_io::read_frame disagrees with the model"
    );

    let mut written = Vec::new();
    let mut texts = Vec::new();
    for event in &events {
        let Event::Frame(payload) = event else {
            continue;
        };
        let text = String::from_utf8_lossy(payload).into_owned();
        match encode(&text, max) {
            Ok(frame) => {
                let back = FrameReader::new(&frame[..], max)
                    .read_frame()
                    .expect("an encoded frame reads back")
                    .expect("one frame");
                assert_eq!(decode::<String>(&back).expect("decodes"), text);
            }
            Err(FrameError::TooLarge { len, max: m }) => {
                assert!(len > m && m == max, "TooLarge for {len} <= {m}");
            }
            Err(e) => panic!("encoding a string failed: {e}"),
        }
        write_frame(&mut written, &text).expect("writes to a Vec");
        texts.push(text);
    }
    let mut r = FrameReader::new(&written[..], MAX_FRAME);
    for text in &texts {
        let p = r.read_frame().expect("reads").expect("a frame");
        assert_eq!(&decode::<String>(&p).expect("decodes"), text);
    }
    assert!(r.read_frame().expect("clean end").is_none());
});
