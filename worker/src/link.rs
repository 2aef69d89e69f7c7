//! The worker's end of its private link to the supervisor: an inherited socketpair end
//! (`--fd N`) or, by hand and in tests, a Unix socket path (`--connect PATH`). Frames are written
//! whole under one lock, so heartbeats from their own thread never split a token frame.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use belljar_protocol::worker::{SupervisorMsg, WorkerMsg};
use belljar_protocol::{FrameError, FrameReader, MAX_FRAME, decode, write_frame};

/// Sends frames to the supervisor; cheap to clone, safe to share between threads.
#[derive(Debug, Clone)]
pub struct Link {
    writer: Arc<Mutex<UnixStream>>,
}

/// What the reader thread hands to the main loop.
#[derive(Debug)]
pub enum Inbound {
    Msg(SupervisorMsg),
    /// A frame that could not be used (oversized, malformed); answered with an error reply.
    Bad(String),
    /// The supervisor is gone.
    Closed,
}

impl Link {
    /// Connects and returns the link and a second handle for the reader thread.
    pub fn open(fd: Option<i32>, path: Option<&Path>) -> Result<(Link, UnixStream), String> {
        let stream = match (fd, path) {
            (Some(fd), None) => {
                if fd < 3 {
                    return Err(format!(
                        "--fd {fd} is a standard stream, not the supervisor's socket"
                    ));
                }
                // SAFETY: the supervisor passes this descriptor to this process alone and nothing
                // else in the process uses it; ownership is taken exactly once, here.
                let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let meta = file
                    .metadata()
                    .map_err(|e| format!("--fd {fd} is not an open descriptor: {e}"))?;
                if !meta.file_type().is_socket() {
                    return Err(format!("--fd {fd} is not a socket"));
                }
                UnixStream::from(OwnedFd::from(file))
            }
            (None, Some(path)) => UnixStream::connect(path).map_err(|e| {
                format!(
                    "cannot connect to {}: {e}; is the supervisor (or test) listening there?",
                    path.display()
                )
            })?,
            _ => return Err("give exactly one of --fd N or --connect PATH".to_owned()),
        };
        let reader = stream
            .try_clone()
            .map_err(|e| format!("cannot clone the socket: {e}"))?;
        Ok((
            Link {
                writer: Arc::new(Mutex::new(stream)),
            },
            reader,
        ))
    }

    /// Sends one message. A poisoned lock only means another sender panicked mid-frame; the
    /// frame it wrote is whole or absent, so the stream is still usable.
    pub fn send(&self, msg: &WorkerMsg) -> Result<(), FrameError> {
        let mut w = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_frame(&mut *w, msg)
    }
}

/// Reads frames until the supervisor goes away; each becomes an [`Inbound`].
pub fn spawn_reader(stream: UnixStream, tx: Sender<Inbound>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("link-reader".into())
        .spawn(move || {
            let mut frames = FrameReader::new(stream, MAX_FRAME);
            loop {
                let item = match frames.read_frame() {
                    Ok(Some(payload)) => match decode::<SupervisorMsg>(&payload) {
                        Ok(m) => Inbound::Msg(m),
                        Err(e) => Inbound::Bad(e.to_string()),
                    },
                    Err(e @ FrameError::TooLarge { .. }) => Inbound::Bad(e.to_string()),
                    Ok(None) | Err(_) => {
                        let _ = tx.send(Inbound::Closed);
                        return;
                    }
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}
