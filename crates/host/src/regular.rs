//! Opening a file that must be a regular file (a config, a model) without the ways that can
//! hang or race: a FIFO or a device named in its place would block `open(2)` or `read(2)`
//! forever, and checking the path's type before opening it leaves a window in which the path
//! can be swapped.

use std::fs::File;
use std::path::Path;

/// Opens `path` for reading without blocking (a FIFO or a device opens at once instead of
/// waiting for a writer) and returns the file with its metadata from the opened descriptor
/// (`fstat`), so that what is checked is what is read: there is no window between a type check
/// on the path and the open. Symbolic links are followed: model paths are often links (a
/// Hugging Face cache's snapshots link to its blobs).
pub fn open_regular(path: &Path) -> std::io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}
