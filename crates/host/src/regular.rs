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
///
/// A path that is not a regular file when looked at first is never opened at all (opening a
/// device node has effects of its own: a terminal could become the daemon's controlling tty,
/// a watchdog device would be armed): [`Opened::Other`] gives its metadata for the caller's
/// message. The open itself adds `O_NOCTTY`, and a path swapped between the look and the open
/// shows in the metadata of the opened descriptor, which the caller checks again.
pub fn open_regular(path: &Path) -> std::io::Result<Opened> {
    use std::os::unix::fs::OpenOptionsExt;
    let before = std::fs::metadata(path)?;
    if !before.is_file() {
        return Ok(Opened::Other(before));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    Ok(Opened::File(file, meta))
}

/// What [`open_regular`] found.
#[derive(Debug)]
pub enum Opened {
    /// Opened, with the metadata of the opened descriptor (check `is_file()` again).
    File(File, std::fs::Metadata),
    /// Not a regular file at the first look: not opened.
    Other(std::fs::Metadata),
}

/// Why [`open_regular_file`] did not give a file.
#[derive(Debug)]
pub enum NotAFile {
    Missing,
    Directory,
    /// A FIFO, a device or a socket.
    NotRegular,
    Io(std::io::Error),
}

/// [`open_regular`] with its answers classified: the opened file and its descriptor's metadata,
/// or why not. The type is checked on the path and again on the opened descriptor (a path
/// swapped between the look and the open).
pub fn open_regular_file(path: &Path) -> Result<(File, std::fs::Metadata), NotAFile> {
    let opened = open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NotAFile::Missing,
        _ => NotAFile::Io(e),
    })?;
    let (file, meta) = match opened {
        Opened::File(f, m) => (f, m),
        Opened::Other(m) if m.is_dir() => return Err(NotAFile::Directory),
        Opened::Other(_) => return Err(NotAFile::NotRegular),
    };
    if meta.is_dir() {
        return Err(NotAFile::Directory);
    }
    if !meta.is_file() {
        return Err(NotAFile::NotRegular);
    }
    Ok((file, meta))
}
