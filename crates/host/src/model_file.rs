//! A cheap probe of a model file before anything is planned around it: it exists, is a regular
//! readable file, starts with the GGUF magic, and how large it is.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("model file {path} does not exist; check the `model` path (relative paths are resolved against the config file's directory), or generate a demo model with `worker make-model {path}`", path = .path.display())]
    Missing { path: PathBuf },
    #[error("model file {path} is a directory; point `model` at a .gguf file inside it", path = .path.display())]
    Directory { path: PathBuf },
    #[error("model file {path} is not a regular file; point `model` at a .gguf file", path = .path.display())]
    NotRegular { path: PathBuf },
    #[error("model file {path} cannot be read: {source}; fix its permissions (the supervisor and the worker must be able to read it)", path = .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} is not a GGUF file (it starts with {found:?}, not \"GGUF\"); convert it with llama.cpp's convert_hf_to_gguf.py or pick a .gguf file", path = .path.display())]
    NotGguf { path: PathBuf, found: String },
}

/// Checks `path` and returns its size. Reads 4 bytes; never the whole file.
pub fn probe_model_file(path: &Path) -> Result<ModelFile, ModelFileError> {
    let owned = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelFileError::Missing { path: owned() },
        _ => ModelFileError::Unreadable {
            path: owned(),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return Err(ModelFileError::Directory { path: owned() });
    }
    if !meta.is_file() {
        return Err(ModelFileError::NotRegular { path: owned() });
    }
    let mut magic = Vec::with_capacity(4);
    File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut magic))
        .map_err(|source| ModelFileError::Unreadable {
            path: owned(),
            source,
        })?;
    if magic != GGUF_MAGIC {
        return Err(ModelFileError::NotGguf {
            path: owned(),
            found: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    Ok(ModelFile {
        path: owned(),
        size: meta.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("m.gguf");
        std::fs::write(&good, b"GGUF\x03\0\0\0rest").unwrap();
        assert_eq!(probe_model_file(&good).unwrap().size, 12);
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, b"PK\x03\x04").unwrap();
        assert!(matches!(
            probe_model_file(&bad),
            Err(ModelFileError::NotGguf { .. })
        ));
        let short = dir.path().join("short.gguf");
        std::fs::write(&short, b"GG").unwrap();
        assert!(matches!(
            probe_model_file(&short),
            Err(ModelFileError::NotGguf { .. })
        ));
        assert!(matches!(
            probe_model_file(dir.path()),
            Err(ModelFileError::Directory { .. })
        ));
        assert!(matches!(
            probe_model_file(&dir.path().join("none")),
            Err(ModelFileError::Missing { .. })
        ));
        assert!(matches!(
            probe_model_file(Path::new("/dev/null")),
            Err(ModelFileError::NotRegular { .. })
        ));
    }
}
