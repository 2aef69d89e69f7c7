//! The frame codec: `u32` big-endian length + JSON payload, with a maximum frame size.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default maximum frame: 1 MiB. Prompts and replies are far smaller; a larger length is a bug
/// or an attack, and is refused before it is allocated.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("i/o error on the socket: {0}")]
    Io(#[from] io::Error),
}

/// Serializes `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Writes `msg` as one frame with a single `write_all`, so frames from several threads sharing
/// a locked writer never interleave.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode(msg, MAX_FRAME)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Parses one frame's payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads frames from a blocking stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> FrameReader<R> {
        FrameReader { inner, max }
    }

    /// The next frame's payload; `Ok(None)` on a clean end of stream between frames. An
    /// oversized frame is skipped (read and dropped in small pieces, never allocated) and
    /// reported as [`FrameError::TooLarge`], so the stream stays usable.
    pub fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max {
            let skipped = io::copy(&mut (&mut self.inner).take(len as u64), &mut io::sink())?;
            if skipped < len as u64 {
                return Err(FrameError::Truncated);
            }
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let mut payload = vec![0u8; len];
        self.inner
            .read_exact(&mut payload)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        Ok(Some(payload))
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"a": 1})).unwrap();
        write_frame(&mut buf, &"second").unwrap();
        let mut r = FrameReader::new(&buf[..], 64);
        assert_eq!(r.read_frame().unwrap().unwrap(), br#"{"a":1}"#);
        assert_eq!(
            decode::<String>(&r.read_frame().unwrap().unwrap()).unwrap(),
            "second"
        );
        assert!(r.read_frame().unwrap().is_none());
    }

    #[test]
    fn oversized_frames_are_skipped_not_allocated() {
        let mut buf = Vec::new();
        buf.extend((100u32).to_be_bytes());
        buf.extend(vec![b'x'; 100]);
        write_frame(&mut buf, &"after").unwrap();
        let mut r = FrameReader::new(&buf[..], 10);
        assert!(matches!(
            r.read_frame(),
            Err(FrameError::TooLarge { len: 100, max: 10 })
        ));
        assert_eq!(
            r.read_frame().unwrap().unwrap(),
            br#""after""#,
            "the stream stays in sync"
        );
        // A hostile 4 GiB length on a short stream: skipped to EOF, reported, no allocation.
        let hostile = u32::MAX.to_be_bytes();
        let mut r = FrameReader::new(&hostile[..], 10);
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
        assert!(matches!(
            encode(&"x".repeat(100), 10),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_malformed() {
        let mut r = FrameReader::new(&[0u8, 0][..], 10);
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
        let mut r = FrameReader::new(&[0u8, 0, 0, 5, b'{'][..], 10);
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
        assert!(matches!(
            decode::<u32>(b"{nope"),
            Err(FrameError::Malformed(_))
        ));
    }
}

/// Async reading and writing of frames, for the supervisor's event loop.
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use serde::Serialize;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{FrameError, MAX_FRAME, encode};

    /// The next frame's payload; `Ok(None)` on a clean end of stream between frames. An
    /// oversized length is refused before anything is allocated (the caller drops the
    /// connection: after it the stream is out of sync).
    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        Ok(Some(payload))
    }

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        msg: &T,
    ) -> Result<(), FrameError> {
        let frame = encode(msg, MAX_FRAME)?;
        w.write_all(&frame).await?;
        w.flush().await?;
        Ok(())
    }
}
