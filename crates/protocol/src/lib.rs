//! Wire types only: the worker link (supervisor <-> worker) and, later, the control socket,
//! plus the frame codec both use. A frame is a 4-byte big-endian length and that many bytes of
//! JSON; a frame longer than the codec's maximum is refused before anything is allocated for it.

pub mod control;
pub mod exit;
mod finite;
pub mod frame;
pub mod worker;

#[cfg(feature = "tokio")]
pub use frame::tokio_io;
pub use frame::{FrameError, FrameReader, MAX_FRAME, decode, encode, write_frame};

/// Bumped on any incompatible change to a message. Exchanged in the handshake
/// (`Hello` / `Welcome`); a mismatch ends the connection with a clear error.
pub const PROTOCOL_VERSION: u32 = 1;
