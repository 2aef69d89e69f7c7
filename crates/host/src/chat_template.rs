//! Reading a chat template file that the config or `supervisor add` names (`chat_template`),
//! so that it is checked before any worker starts: it exists, is a regular file (opened without
//! blocking, as a model is) and is no larger than the caller's bound. Its text is checked by the
//! caller (`belljar_config::rules::chat_template_source`): this crate only touches the file.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::regular::NotAFile;

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateFileError {
    #[error("the chat template {path} does not exist; check the chat_template path (a relative path in budgets.toml is resolved against the config file's directory), or name a built-in template instead", path = .path.display())]
    Missing { path: PathBuf },
    #[error("the chat template {path} is a directory; point chat_template at a Jinja file inside it", path = .path.display())]
    Directory { path: PathBuf },
    #[error("the chat template {path} is not a regular file (a FIFO, a device or a socket); point chat_template at a Jinja file", path = .path.display())]
    NotRegular { path: PathBuf },
    #[error("the chat template {path} cannot be read: {source}; fix its permissions or the path", path = .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the chat template {path} is {size} bytes, larger than the {max} accepted; point chat_template at a Jinja template file (is it the right file?)", path = .path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
}

/// The bytes of the chat template file at `path`, at most `max` of them: the file is opened
/// without blocking and its type and size come from the opened descriptor
/// ([`crate::regular::open_regular`]); a file larger than `max` is refused without reading it,
/// and the read itself stops one byte past `max` (a file that grows meanwhile).
pub fn read_chat_template(path: &Path, max: u64) -> Result<Vec<u8>, ChatTemplateFileError> {
    let owned = || path.to_path_buf();
    let unreadable = |source| ChatTemplateFileError::Unreadable {
        path: owned(),
        source,
    };
    let (file, meta) = crate::regular::open_regular_file(path).map_err(|e| match e {
        NotAFile::Missing => ChatTemplateFileError::Missing { path: owned() },
        NotAFile::Directory => ChatTemplateFileError::Directory { path: owned() },
        NotAFile::NotRegular => ChatTemplateFileError::NotRegular { path: owned() },
        NotAFile::Io(e) => unreadable(e),
    })?;
    let too_large = |size| ChatTemplateFileError::TooLarge {
        path: owned(),
        size,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_file_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jinja");
        std::fs::write(&file, "{{ messages }}").unwrap();
        assert_eq!(read_chat_template(&file, 100).unwrap(), b"{{ messages }}");

        let e = read_chat_template(&file, 4).unwrap_err();
        assert!(
            matches!(e, ChatTemplateFileError::TooLarge { size: 14, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("larger than the 4 accepted"), "{e}");

        let e = read_chat_template(&dir.path().join("none.jinja"), 100).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = read_chat_template(dir.path(), 100).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");

        // A FIFO is refused at once instead of blocking until a writer comes.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_chat_template(&fifo, 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_chat_template(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
