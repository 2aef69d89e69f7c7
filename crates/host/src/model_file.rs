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
    /// The file's own bytes are never echoed: a client of the control socket must not learn
    /// what any file the supervisor can read begins with.
    #[error("model file {path} is not a GGUF file (it does not start with \"GGUF\"); convert it with llama.cpp's convert_hf_to_gguf.py or pick a .gguf file", path = .path.display())]
    NotGguf { path: PathBuf },
}

/// Whether user `uid` (primary group `gid`, with its supplementary groups) could open `path`
/// for reading (every directory on the way searchable, the file readable).
pub fn readable_by(path: &Path, uid: u32, gid: u32) -> Result<bool, String> {
    let path = path.to_path_buf();
    as_user(uid, gid, move || File::open(&path).is_ok())
}

/// Whether user `uid` (primary group `gid`, with its supplementary groups) could execute `path`.
pub fn executable_by(path: &Path, uid: u32, gid: u32) -> Result<bool, String> {
    let path = path.to_path_buf();
    as_user(uid, gid, move || {
        nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_ok()
    })
}

/// Runs `check` on a fresh thread that has taken user `uid`'s identity (its groups, then
/// `gid` and `uid` as real and effective ids) through raw `setgroups`/`setresgid`/`setresuid`
/// system calls, which change only the calling thread, unlike libc's wrappers that change
/// every thread of the process; the credentials end with the thread. No child process: the
/// supervisor reaps every child. Blocks (user lookup): run it off the event loop.
fn as_user<T: Send + 'static>(
    uid: u32,
    gid: u32,
    check: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use nix::libc;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map_err(|e| format!("cannot look up uid {uid}: {e}"))?;
    let primary = nix::unistd::Gid::from_raw(gid);
    let groups: Vec<libc::gid_t> = match &user {
        Some(u) => std::ffi::CString::new(u.name.as_bytes())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, primary).ok())
            .unwrap_or_else(|| vec![primary]),
        None => vec![primary],
    }
    .into_iter()
    .map(nix::unistd::Gid::as_raw)
    .collect();
    let thread = std::thread::spawn(move || -> Result<T, String> {
        let keep: libc::c_long = -1;
        let (uid, gid) = (libc::c_long::from(uid), libc::c_long::from(gid));
        // SAFETY: plain system calls on values owned by this thread; they change only this
        // thread's credentials, and the thread ends right after the check.
        let failed = unsafe {
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, keep) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, keep) != 0
        };
        if failed {
            return Err(format!(
                "cannot take uid {uid}'s identity: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(check())
    });
    thread
        .join()
        .map_err(|_| "the permission check panicked".to_owned())?
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
        return Err(ModelFileError::NotGguf { path: owned() });
    }
    Ok(ModelFile {
        path: owned(),
        size: meta.len(),
    })
}

/// What the GGUF-aware estimate needs from a model, read from its header only (bounded: never
/// the tensor data), and a checksum of the header bytes that identifies the model without
/// hashing a multi-GB file.
pub fn model_facts(path: &Path) -> Result<(belljar_budget::estimate::ModelFacts, u32), String> {
    use std::io::Read;
    let file_size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let header = belljar_gguf::reader::read_header(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(expected) = header.expected_file_size()
        && expected > file_size
    {
        return Err(format!(
            "{} is truncated: its header describes {expected} bytes but the file has {file_size}; download it again",
            path.display()
        ));
    }
    let mut tensor_bytes: u64 = 0;
    for t in &header.tensors {
        let b = t.bytes().ok_or_else(|| {
            format!(
                "{}: tensor {} has a type ({}) whose size is unknown",
                path.display(),
                t.name,
                t.ggml_type
            )
        })?;
        tensor_bytes = tensor_bytes.saturating_add(b);
    }
    // `{arch}.block_count`, `.embedding_length`, `.attention.head_count`, `.head_count_kv` and
    // the per-head K/V widths (default: embedding / heads).
    let arch = header
        .get_str("general.architecture")
        .ok_or_else(|| format!("{}: no general.architecture", path.display()))?
        .to_owned();
    let get = |k: &str| {
        header
            .get_u64(&format!("{arch}.{k}"))
            .and_then(|v| u32::try_from(v).ok())
    };
    let key = |k: &str| get(k).ok_or_else(|| format!("{}: no {arch}.{k}", path.display()));
    let block_count = key("block_count")?;
    let embedding = key("embedding_length")?;
    let heads = key("attention.head_count")?;
    let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
    let head_dim = embedding / heads.max(1);
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|f| f.take(header.header_len).read_to_end(&mut raw))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok((
        belljar_budget::estimate::ModelFacts {
            file_size,
            tensor_bytes,
            block_count,
            embedding,
            heads,
            kv_heads,
            key_length: get("attention.key_length").unwrap_or(head_dim),
            value_length: get("attention.value_length").unwrap_or(head_dim),
        },
        crc32fast::hash(&raw),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_facts_come_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gqa.gguf");
        let shape = belljar_gguf::writer::ModelShape {
            layers: 3,
            width: 256,
            heads: 8,
            kv_heads: 2,
            ..Default::default()
        };
        shape.write(std::fs::File::create(&path).unwrap()).unwrap();
        let (facts, crc) = model_facts(&path).unwrap();
        assert_eq!(
            (
                facts.block_count,
                facts.embedding,
                facts.heads,
                facts.kv_heads
            ),
            (3, 256, 8, 2)
        );
        // f16 K and V, 2 KV heads of 32 at ctx 100, per layer.
        assert_eq!(
            belljar_budget::estimate::kv_cache(&facts, 100) / 3,
            2 * 100 * 2 * 32 * 2
        );
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(facts.file_size, size);
        assert!(
            facts.tensor_bytes < size && facts.tensor_bytes > size * 9 / 10,
            "{facts:?}"
        );
        assert_eq!(
            (facts.key_length, facts.value_length),
            (32, 32),
            "embedding / heads"
        );
        assert_eq!(
            model_facts(&path).unwrap().1,
            crc,
            "the header checksum is stable"
        );
        std::fs::write(&path, b"GGUF\x03\0\0\0").unwrap();
        assert!(model_facts(&path).is_err(), "truncated header");
    }

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
        // The refusal names the file, never its content.
        let secret = dir.path().join("shadow");
        std::fs::write(&secret, b"root:$y$j9T$secret").unwrap();
        let said = probe_model_file(&secret).unwrap_err().to_string();
        assert!(said.contains("is not a GGUF file"), "{said}");
        assert!(!said.contains("root"), "the error echoes the file: {said}");
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
