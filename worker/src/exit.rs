//! The worker's exit codes. The supervisor relies on them to tell a retry from a lost cause:
//! "temporary" means try again later; "permanent" means retrying cannot help. Values follow
//! sysexits.h so they read the same in `systemctl status` and shell scripts.

/// Clean shutdown, or a one-shot command that succeeded.
pub const OK: u8 = 0;
/// Permanent: bad arguments (a bad flag, a zero ctx, an impossible model shape).
pub const USAGE: u8 = 64;
/// Permanent: the model file is missing, truncated or not GGUF.
pub const BAD_MODEL: u8 = 65;
/// Permanent: the file is GGUF but llama.cpp cannot load it (unsupported architecture...).
pub const UNSUPPORTED_MODEL: u8 = 69;
/// A failure to retry: loading or running with layers on a GPU failed (GPU memory allocation).
/// The supervisor retries with backoff and, after 3 of these, runs the instance on the CPU.
pub const GPU_ALLOC: u8 = 71;
/// Temporary: the pre-load memory check refused (retry when memory is free).
pub const TEMPORARY: u8 = 75;
/// Permanent: the supervisor speaks another protocol version (or no protocol at all).
pub const PROTOCOL: u8 = 76;
/// I/O error writing an output file (make-model).
pub const IO_ERROR: u8 = 74;
