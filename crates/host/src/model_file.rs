//! A probe of a model file before anything is planned around it: it exists, is a regular
//! readable file, has a GGUF header that reads (bounded) and describes no more data than the
//! file holds; how large it is, and what its header says for the estimates.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::regular::NotAFile;
use belljar_budget::estimate::{CpuFeatures, repacks, weight_matrix};

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    pub path: PathBuf,
    pub size: u64,
    /// The file's modification time (ns since the epoch; negative before it).
    pub mtime_ns: i128,
    /// CRC-32 of the header's bytes: the model's identity without hashing a multi-GB file.
    pub header_crc32: u32,
    /// What the GGUF-aware estimate needs, or why the header lacks it (the file rule applies).
    pub facts: Result<belljar_budget::estimate::ModelFacts, String>,
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
    #[error("model file {path} is truncated: its header describes {expected} bytes but the file has {size}; copy or download it again", path = .path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        size: u64,
    },
    #[error("model file {path} is not a usable model: {reason}", path = .path.display())]
    BadHeader { path: PathBuf, reason: String },
}

/// Whether user `uid` (primary group `gid`, with its supplementary groups) could open `path`
/// for reading (every directory on the way searchable, the file readable).
pub fn readable_by(path: &Path, uid: u32, gid: u32) -> Result<bool, String> {
    let path = path.to_path_buf();
    // access(2), as executable_by: nothing is opened, so a FIFO (which would wait for a writer)
    // or a device named here cannot hold the thread or act; the caller refuses what is not a
    // regular file.
    as_user(uid, gid, move || {
        nix::unistd::access(&path, nix::unistd::AccessFlags::R_OK).is_ok()
    })
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

/// Feeds every byte read through it to a CRC-32.
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Checks `path` and reads its GGUF header, once: the file is opened first (without blocking)
/// and its type and size come from the opened descriptor; the header is read through a bounded
/// reader ([`belljar_gguf::reader::MAX_HEADER`]) that keeps no array elements, and its checksum
/// is computed from the same read. Never reads tensor data.
///
/// A file that is not a usable model (not GGUF, a malformed or oversized header, tensor data
/// past the end of the file, numbers whose estimate overflows) is an error; a header that
/// merely lacks the keys the GGUF-aware estimate needs is not (`facts` says why, and the file
/// rule applies).
pub fn probe_model_file(path: &Path) -> Result<ModelFile, ModelFileError> {
    let owned = || path.to_path_buf();
    let unreadable = |source| ModelFileError::Unreadable {
        path: owned(),
        source,
    };
    let (file, meta) = crate::regular::open_regular_file(path).map_err(|e| match e {
        NotAFile::Missing => ModelFileError::Missing { path: owned() },
        NotAFile::Directory => ModelFileError::Directory { path: owned() },
        NotAFile::NotRegular => ModelFileError::NotRegular { path: owned() },
        NotAFile::Io(e) => unreadable(e),
    })?;
    let size = meta.len();
    let mtime_ns = match meta.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    };
    let mut reader = Crc {
        inner: std::io::BufReader::new(file),
        hasher: crc32fast::Hasher::new(),
    };
    let mut magic = [0u8; 4];
    match reader.read_exact(&mut magic) {
        Ok(()) if &magic == GGUF_MAGIC => {}
        Ok(()) => return Err(ModelFileError::NotGguf { path: owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ModelFileError::NotGguf { path: owned() });
        }
        Err(e) => return Err(unreadable(e)),
    }
    let header = belljar_gguf::reader::read_header(magic.as_slice().chain(&mut reader)).map_err(
        |e| match e {
            belljar_gguf::ReadError::Io(source) => unreadable(source),
            belljar_gguf::ReadError::Magic(_) => ModelFileError::NotGguf { path: owned() },
            belljar_gguf::ReadError::TooLarge { .. } => ModelFileError::BadHeader {
                path: owned(),
                reason: e.to_string(),
            },
            _ => ModelFileError::BadHeader {
                path: owned(),
                reason: format!("{e}; copy or download it again, or convert it anew"),
            },
        },
    )?;
    let header_crc32 = reader.hasher.finalize();
    let expected = header.min_file_size();
    if expected > size {
        return Err(ModelFileError::Truncated {
            path: owned(),
            expected,
            size,
        });
    }
    let bad = |reason: String| ModelFileError::BadHeader {
        path: owned(),
        reason,
    };
    // What llama.cpp refuses to load is refused here, before anything is started for it.
    if header.get_str("general.architecture").is_none() {
        return Err(bad(
            "it has no general.architecture, which llama.cpp needs to load a model; convert it anew".into(),
        ));
    }
    if let Some(t) = header
        .tensors
        .iter()
        .find(|t| !belljar_gguf::format::type_loadable(t.ggml_type))
    {
        return Err(bad(format!(
            "tensor {} has type {}, which this build's llama.cpp cannot load (removed or unknown); convert it anew",
            t.name, t.ggml_type
        )));
    }
    if let Some(arch) = header.get_str("general.architecture") {
        let heads = header.get_u64(&format!("{arch}.attention.head_count"));
        if heads == Some(0) && !recurrent(arch) {
            return Err(bad(format!(
                "its {arch}.attention.head_count is 0, which a {arch} model cannot have; convert it anew"
            )));
        }
    }
    let facts = match facts_of(&header, size) {
        Ok(f) => {
            // A head count of 0 is how recurrent models (Mamba) say "no attention": the gguf
            // estimate does not apply to them (facts_of), but they are models.
            let zero = [
                ("block_count", f.block_count),
                ("embedding_length", f.embedding),
            ]
            .into_iter()
            .find(|(_, v)| *v == 0);
            if let Some((key, _)) = zero {
                return Err(bad(format!(
                    "its {key} is 0, which no model can have; convert it anew"
                )));
            }
            belljar_budget::estimate::check_facts(&f).map_err(|e| ModelFileError::BadHeader {
                path: owned(),
                reason: e.to_string(),
            })?;
            Ok(f)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    };
    Ok(ModelFile {
        path: owned(),
        size,
        mtime_ns,
        header_crc32,
        facts,
    })
}

/// Architectures without attention (llama.cpp's converters write `attention.head_count = 0`
/// for them): a head count of 0 is theirs, and only the gguf estimate does not apply.
fn recurrent(arch: &str) -> bool {
    arch.starts_with("mamba") || arch.contains("rwkv")
}

/// What the GGUF-aware estimate needs from a header; `Err` names the first key it lacks.
fn facts_of(
    header: &belljar_gguf::Header,
    file_size: u64,
) -> Result<belljar_budget::estimate::ModelFacts, String> {
    let mut tensor_bytes: u64 = 0;
    for t in &header.tensors {
        let b = t.bytes().ok_or_else(|| {
            format!(
                "tensor {} has a type ({}) whose size is unknown",
                t.name, t.ggml_type
            )
        })?;
        // Every tensor lies within the file (checked before), so only a header of overlapping
        // tensors can get here.
        tensor_bytes = tensor_bytes.checked_add(b).ok_or_else(|| {
            format!(
                "the tensors' sizes add up past 64 bits (at tensor {})",
                t.name
            )
        })?;
    }
    // `{arch}.block_count`, `.embedding_length`, `.attention.head_count`, `.head_count_kv` and
    // the per-head K/V widths (default: embedding / heads).
    let arch = header
        .get_str("general.architecture")
        .ok_or("no general.architecture")?
        .to_owned();
    let get = |k: &str| {
        header
            .get_u64(&format!("{arch}.{k}"))
            .and_then(|v| u32::try_from(v).ok())
    };
    let key = |k: &str| get(k).ok_or_else(|| format!("no {arch}.{k}"));
    let block_count = key("block_count")?;
    let embedding = key("embedding_length")?;
    let heads = key("attention.head_count")?;
    if heads == 0 {
        return Err(format!(
            "its {arch}.attention.head_count is 0 (a model without attention): the gguf estimate, which sizes a KV cache, does not apply"
        ));
    }
    let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
    let head_dim = embedding / heads.max(1);
    // The vocabulary's size and the merges' count are their arrays' lengths (the reader keeps
    // no elements).
    let count = |k: &str| header.array_len(k).and_then(|n| u32::try_from(n).ok());
    let vocab = count("tokenizer.ggml.tokens")
        .or_else(|| get("vocab_size"))
        .unwrap_or(0);
    let merges = count("tokenizer.ggml.merges").unwrap_or(0);
    let cpu = llama_cpu_features();
    let repack = header
        .tensors
        .iter()
        .filter(|t| {
            weight_matrix(&t.name, t.dims.len())
                && repacks(cpu, t.ggml_type, t.dims.get(1).copied().unwrap_or(1))
        })
        .map(|t| t.bytes().unwrap_or(0))
        .fold(0u64, u64::saturating_add);
    let tied = !header.tensors.iter().any(|t| t.name == "output.weight");
    let tied_repack = header
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .filter(|t| tied && t.dims.len() == 2 && repacks(cpu, t.ggml_type, t.dims[1]))
        .and_then(|t| t.bytes())
        .unwrap_or(0);
    Ok(belljar_budget::estimate::ModelFacts {
        file_size,
        tensor_bytes,
        block_count,
        embedding,
        heads,
        kv_heads,
        ff: get("feed_forward_length").unwrap_or(0),
        key_length: get("attention.key_length").unwrap_or(head_dim),
        value_length: get("attention.value_length").unwrap_or(head_dim),
        vocab,
        merges,
        tied,
        sliding_window: get("attention.sliding_window").unwrap_or(0),
        repack,
        tied_repack,
    })
}

/// The SIMD features the worker's llama.cpp is compiled for, which decide what it repacks.
/// llama-cpp-sys-2 builds ggml without `GGML_NATIVE`: on x86-64 with ggml's default set (AVX2
/// on; AVX-512 only when the Rust target enables it, as `-C target-cpu=native` on such a CPU
/// does), on aarch64 with the Rust target's features. The supervisor is built with the same
/// target as the worker, so its own `cfg` tells.
pub fn llama_cpu_features() -> CpuFeatures {
    CpuFeatures {
        avx2: cfg!(target_arch = "x86_64"),
        avx512: cfg!(all(target_arch = "x86_64", target_feature = "avx512f")),
        neon_dotprod: cfg!(all(target_arch = "aarch64", target_feature = "dotprod")),
        neon_i8mm: cfg!(all(target_arch = "aarch64", target_feature = "i8mm")),
    }
}

/// What the GGUF-aware estimate needs from a model, read from its header only (bounded: never
/// the tensor data), and a checksum of the header bytes that identifies the model without
/// hashing a multi-GB file. One open and one read ([`probe_model_file`]).
pub fn model_facts(path: &Path) -> Result<(belljar_budget::estimate::ModelFacts, u32), String> {
    let file = probe_model_file(path).map_err(|e| e.to_string())?;
    Ok((file.facts?, file.header_crc32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// A Gemma-3-like header (262,144 tokens, tied Q4_0 embeddings, a sliding window, head_dim
    /// other than width / heads): every fact the new terms need, read without keeping the
    /// vocabulary.
    fn gemma3_like_facts_come_from_the_header() {
        use belljar_gguf::writer::{Arch, ModelShape, ModelSpec, WeightType};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.gguf");
        let spec = ModelSpec {
            shape: ModelShape {
                layers: 2,
                width: 64,
                ff: 128,
                heads: 2,
                kv_heads: 1,
                vocab: 262_144,
                ..Default::default()
            },
            arch: Arch::Gemma3,
            head_dim: Some(64),
            sliding_window: Some(32),
            tied: true,
            weights: Some(WeightType::Q4_0),
            ..Default::default()
        };
        spec.write(std::fs::File::create(&path).unwrap()).unwrap();
        let (f, _) = model_facts(&path).unwrap();
        assert_eq!(f.vocab, 262_144, "the token array's length");
        assert!(f.tied);
        assert_eq!(f.sliding_window, 32);
        assert_eq!((f.key_length, f.value_length, f.ff), (64, 64, 128));
        // Q4_0 matrices, rows a multiple of 8: per layer Q [64 -> 128], K and V [64 -> 64],
        // output [128 -> 64], gate and up [64 -> 128], down [128 -> 64], 18 bytes per 32.
        let q4 = |cols: u64, rows: u64| cols * rows / 32 * 18;
        let per_layer = q4(64, 128) + 2 * q4(64, 64) + q4(128, 64) + 2 * q4(64, 128) + q4(128, 64);
        assert_eq!(f.repack, 2 * per_layer, "{f:?}");
        assert_eq!(
            f.tied_repack,
            q4(64, 262_144),
            "the output's copy of token_embd"
        );
        // An f32 model repacks nothing.
        let plain = dir.path().join("p.gguf");
        ModelShape::default()
            .write(std::fs::File::create(&plain).unwrap())
            .unwrap();
        let (p, _) = model_facts(&plain).unwrap();
        assert_eq!(
            (p.repack, p.tied_repack, p.tied, p.vocab),
            (0, 0, false, 1024)
        );
    }

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
            belljar_budget::estimate::kv_cache(&facts, 100).unwrap() / 3,
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

    fn write_model(path: &Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        belljar_gguf::writer::ModelShape::default()
            .write(&mut bytes)
            .unwrap();
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn probes() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("m.gguf");
        let bytes = write_model(&good);
        let probed = probe_model_file(&good).unwrap();
        assert_eq!(probed.size, bytes.len() as u64);
        assert!(probed.facts.is_ok(), "{probed:?}");
        let bare = dir.path().join("bare.gguf");
        // A header without tensors or keys: llama.cpp cannot load it without an architecture.
        std::fs::write(&bare, b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").unwrap();
        match probe_model_file(&bare) {
            Err(ModelFileError::BadHeader { reason, .. }) => {
                assert!(reason.contains("general.architecture"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
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
        // A FIFO with no writer: opened without blocking, refused by the opened fd's type.
        let fifo = dir.path().join("fifo.gguf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            probe_model_file(&fifo),
            Err(ModelFileError::NotRegular { .. })
        ));
    }

    /// Tensor data past the end of the file is a truncated model, refused by the probe itself
    /// (before, only the soft header facts said so and the file rule was used instead).
    #[test]
    fn a_truncated_model_is_refused_by_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        let bytes = write_model(&path);
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = probe_model_file(&path).unwrap_err();
        assert!(matches!(e, ModelFileError::Truncated { .. }), "{e:?}");
        let said = e.to_string();
        assert!(
            said.contains("truncated") && said.contains("download it again"),
            "{said}"
        );
        // A malformed header is a bad model too, with the reader's reason.
        let mut bad = bytes.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let said = probe_model_file(&path).unwrap_err().to_string();
        assert!(
            said.contains("not a usable model") && said.contains("tensor count"),
            "{said}"
        );
    }

    /// The checksum comes from the one read of the header and equals the CRC-32 of the header's
    /// bytes (the identity that observations.json recorded before).
    #[test]
    fn the_checksum_is_of_the_header_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let bytes = write_model(&path);
        let header = belljar_gguf::read_header(&bytes[..]).unwrap();
        let probed = probe_model_file(&path).unwrap();
        assert_eq!(
            probed.header_crc32,
            crc32fast::hash(&bytes[..header.header_len as usize])
        );
    }

    /// Issue [chat] review: a FIFO named as a model (or chat template) used to block the
    /// readability check until some writer opened it.
    #[test]
    fn readable_by_does_not_wait_on_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(readable_by(&fifo, 0, 0));
        });
        let answer = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("readable_by returned instead of waiting for a writer");
        assert_eq!(answer, Ok(true));
    }
}
