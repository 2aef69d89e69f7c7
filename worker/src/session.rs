//! The persistent session: "never start a new chat".
//!
//! Three files in the instance's state directory:
//! - `session.log`: a header line naming the model the token ids belong to (its size and the
//!   CRC-32 of its first MiB), then one JSON line per turn (prompt, reply and the exact tokens
//!   that entered the context), appended and fsync'd before `Done` is sent. Only finished turns
//!   are written: a reply cut off by Shutdown or a lost link was answered with an error, so it
//!   is not part of the conversation. A torn last line (a crash mid-append) is cut off at the
//!   next start.
//! - `session.kv`: the context's KV state for sequence 0, streamed to disk by llama.cpp
//!   (`llama_state_seq_save_file`: one layer's slice in memory at a time, never the whole context).
//! - `session.state`: its metadata: length and CRC-32 of `session.kv`, the identity of what it
//!   belongs to (model path, size, mtime, a CRC-32 of the model's first MiB, ctx), the turn count
//!   it covers and the context's tokens. Both are written atomically (temp file, fsync, rename,
//!   fsync of the directory), and their pages are dropped from the page cache once on disk.
//!
//! At start, temp files a kill left behind are removed; a log of another model is moved aside
//! (`<file>.<UTC stamp>.stale`) with its state and a new session starts. The state file is used
//! when it is intact, belongs to this model and ctx, and covers every turn in the log; otherwise
//! the context is re-prefilled from the log.
//!
//! Compaction rule (context full): keep the newest whole turns whose tokens, together with the
//! new prompt and its `max_tokens`, fit in ctx; older turns stay in the log but leave the context.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const LOG: &str = "session.log";
const STATE: &str = "session.state";
const KV: &str = "session.kv";
const STATE_MAGIC: &[u8; 8] = b"BJSESS02";
/// The format of the log's header line.
const LOG_FORMAT: u32 = 1;
/// How much of the model file goes into its identity hash.
const IDENTITY_PREFIX: u64 = 1 << 20;
/// Largest metadata block accepted in a state file (it holds at most ctx token ids).
const MAX_META: u32 = 64 << 20;

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub prompt: String,
    pub reply: String,
    /// The tokens this turn put into the context: prompt tokens, then generated tokens.
    pub tokens: Vec<i32>,
}

/// What a log's token ids belong to: the model file's size and the CRC-32 of its first MiB (its
/// header, where the tokenizer is). Not its path or mtime: a model that was moved or copied keeps
/// its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    pub size: u64,
    pub prefix_crc32: u32,
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes, first MiB CRC-32 {:08x}",
            self.size, self.prefix_crc32
        )
    }
}

/// The log's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogHeader {
    session_log: u32,
    model: ModelId,
}

/// What a state file belongs to. Any difference means the state cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub model_path: PathBuf,
    pub model_size: u64,
    pub model_mtime_ns: i128,
    pub model_prefix_crc32: u32,
    pub ctx: u32,
}

impl Identity {
    /// Stats the model and hashes its first MiB (never the whole file).
    pub fn of_model(path: &Path, ctx: u32) -> std::io::Result<Identity> {
        let meta = std::fs::metadata(path)?;
        let mtime = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::new();
        File::open(path)?
            .take(IDENTITY_PREFIX)
            .read_to_end(&mut buf)?;
        hasher.update(&buf);
        Ok(Identity {
            model_path: std::fs::canonicalize(path)?,
            model_size: meta.len(),
            model_mtime_ns: mtime,
            model_prefix_crc32: hasher.finalize(),
            ctx,
        })
    }

    /// The part of the identity the log is bound to.
    pub fn model_id(&self) -> ModelId {
        ModelId {
            size: self.model_size,
            prefix_crc32: self.model_prefix_crc32,
        }
    }
}

/// The log as read at start.
#[derive(Debug, Default)]
pub struct LogRead {
    /// The model its header names; `None` for an empty log or one written before the header.
    pub model: Option<ModelId>,
    pub turns: Vec<Turn>,
    pub warnings: Vec<String>,
}

/// The metadata stored in front of the KV state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    pub identity: Identity,
    /// Turns in the log when this state was saved.
    pub turns: u64,
    /// Index of the oldest turn still in the context (after compactions).
    pub first_turn: u64,
    /// The context's tokens, in order.
    pub tokens: Vec<i32>,
    pub state_len: u64,
    pub state_crc32: u32,
}

/// Why a state file was not used (logged; the session then comes from the log).
#[derive(Debug, thiserror::Error)]
pub enum StateReject {
    #[error("no state file")]
    Missing,
    #[error("state file is corrupt: {0}")]
    Corrupt(String),
    #[error("state file belongs to another model or ctx ({0})")]
    OtherModel(String),
    #[error("state file covers {state} turns but the log has {log}")]
    Stale { state: u64, log: u64 },
    #[error("cannot read state file: {0}")]
    Io(#[from] std::io::Error),
}

/// The session files of one instance.
#[derive(Debug, Clone)]
pub struct SessionFiles {
    dir: PathBuf,
    /// The model a new log is written for.
    model: ModelId,
}

impl SessionFiles {
    pub fn new(dir: &Path, model: ModelId) -> std::io::Result<SessionFiles> {
        std::fs::create_dir_all(dir)?;
        Ok(SessionFiles {
            dir: dir.to_path_buf(),
            model,
        })
    }

    pub fn model(&self) -> ModelId {
        self.model
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Reads the header and every turn. A torn last line is cut off the file; a bad line
    /// elsewhere is skipped and reported in the returned warnings.
    pub fn load_log(&self) -> std::io::Result<LogRead> {
        let path = self.log_path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LogRead::default());
            }
            Err(e) => return Err(e),
        };
        let mut model = None;
        let mut turns = Vec::new();
        let mut warnings = Vec::new();
        let mut good_end = 0u64;
        let mut offset = 0u64;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut n = 0;
        loop {
            line.clear();
            let len = reader.read_until(b'\n', &mut line)? as u64;
            if len == 0 {
                break;
            }
            n += 1;
            offset += len;
            let complete = line.last() == Some(&b'\n');
            if n == 1 && complete {
                if let Ok(h) = serde_json::from_slice::<LogHeader>(&line) {
                    if h.session_log != LOG_FORMAT {
                        return Err(std::io::Error::other(format!(
                            "{}: log format {} is not {LOG_FORMAT}",
                            path.display(),
                            h.session_log
                        )));
                    }
                    model = Some(h.model);
                    good_end = offset;
                    continue;
                }
            }
            match serde_json::from_slice::<Turn>(&line) {
                Ok(t) if complete => {
                    turns.push(t);
                    good_end = offset;
                }
                _ if !complete => {
                    warnings.push(format!(
                        "{}: cut off a torn last line (line {n})",
                        path.display()
                    ));
                }
                _ => {
                    warnings.push(format!("{}: skipped unreadable line {n}", path.display()));
                    good_end = offset;
                }
            }
        }
        if good_end < offset {
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(good_end)?;
        }
        Ok(LogRead {
            model,
            turns,
            warnings,
        })
    }

    fn header_line(&self) -> std::io::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(&LogHeader {
            session_log: LOG_FORMAT,
            model: self.model,
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        Ok(line)
    }

    /// Appends one turn and fsyncs it; a new log gets its header line first (in the same write).
    pub fn append(&self, turn: &Turn) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut bytes = if f.metadata()?.len() == 0 {
            self.header_line()?
        } else {
            Vec::new()
        };
        bytes.extend(serde_json::to_vec(turn).map_err(std::io::Error::other)?);
        bytes.push(b'\n');
        f.write_all(&bytes)?;
        f.sync_data()
    }

    /// Rewrites the log with a header for this model and `turns` (a log from before the header
    /// existed, once it restored): temp file, fsync, rename, fsync of the directory.
    pub fn rewrite_log(&self, turns: &[Turn]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{LOG}.tmp"));
        {
            let mut f = std::io::BufWriter::new(File::create(&tmp)?);
            f.write_all(&self.header_line()?)?;
            for t in turns {
                serde_json::to_writer(&mut f, t).map_err(std::io::Error::other)?;
                f.write_all(b"\n")?;
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, self.log_path())?;
        File::open(&self.dir)?.sync_all()
    }

    /// Removes the temp files a kill during a save left behind (`.session.*.tmp`); returns how
    /// many there were. Nothing else writes in this directory while the worker runs.
    pub fn clean_temp(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".session.") && name.ends_with(".tmp") {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Moves the session files aside, each to `<name>.<UTC stamp>.stale` (never replacing one),
    /// so that a new session starts and the old one can still be read; returns the new names.
    pub fn move_aside(&self, at: std::time::SystemTime) -> std::io::Result<Vec<String>> {
        let stamp = belljar_host::safe_fs::stamp(at);
        let mut moved = Vec::new();
        for name in [LOG, STATE, KV] {
            let from = self.dir.join(name);
            if std::fs::symlink_metadata(&from).is_err() {
                continue;
            }
            let mut to = format!("{name}.{stamp}.stale");
            let mut n = 0;
            while std::fs::symlink_metadata(self.dir.join(&to)).is_ok() {
                n += 1;
                to = format!("{name}.{stamp}-{n}.stale");
            }
            std::fs::rename(&from, self.dir.join(&to))?;
            moved.push(to);
        }
        if !moved.is_empty() {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(moved)
    }

    /// Where llama.cpp writes the KV state before [`SessionFiles::commit_state`] puts it in place.
    pub fn kv_tmp_path(&self) -> PathBuf {
        self.dir.join(format!(".{KV}.tmp"))
    }

    pub fn kv_path(&self) -> PathBuf {
        self.dir.join(KV)
    }

    /// After llama.cpp has streamed the KV state to [`SessionFiles::kv_tmp_path`]: fsyncs it,
    /// checksums it (dropping its pages from the page cache as it goes, so a long context is never
    /// held twice in the worker's cgroup), writes the metadata, and renames both into place, then
    /// fsyncs the directory. A crash between the renames leaves a checksum mismatch: the session
    /// then comes from the log.
    pub fn commit_state(&self, mut meta: StateMeta) -> std::io::Result<()> {
        let tmp_kv = self.kv_tmp_path();
        File::open(&tmp_kv)?.sync_all()?;
        let (len, crc) = checksum_dropping_cache(&tmp_kv)?;
        meta.state_len = len;
        meta.state_crc32 = crc;
        let meta_json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{STATE}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(STATE_MAGIC)?;
            f.write_all(&(meta_json.len() as u32).to_le_bytes())?;
            f.write_all(&meta_json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp_kv, self.kv_path())?;
        std::fs::rename(&tmp, self.state_path())?;
        File::open(&self.dir)?.sync_all()
    }

    /// The state's metadata if it is intact, belongs to `identity` and covers `log_turns` turns,
    /// and the KV file it describes has its length and checksum. The caller then has llama.cpp
    /// read [`SessionFiles::kv_path`].
    pub fn check_state(
        &self,
        identity: &Identity,
        log_turns: u64,
    ) -> Result<StateMeta, StateReject> {
        let mut f = match File::open(self.state_path()) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateReject::Missing),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |m: &str| StateReject::Corrupt(m.to_owned());
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic).map_err(|_| corrupt("too short"))?;
        if &magic != STATE_MAGIC {
            return Err(corrupt("bad magic (an older format, or not a state file)"));
        }
        let mut len = [0u8; 4];
        f.read_exact(&mut len).map_err(|_| corrupt("too short"))?;
        let len = u32::from_le_bytes(len);
        let file_len = f.metadata()?.len();
        if len > MAX_META || u64::from(len) + 12 != file_len {
            return Err(corrupt("metadata length out of range"));
        }
        let mut meta = vec![0u8; len as usize];
        f.read_exact(&mut meta)
            .map_err(|_| corrupt("truncated metadata"))?;
        let meta: StateMeta = serde_json::from_slice(&meta)
            .map_err(|e| StateReject::Corrupt(format!("metadata: {e}")))?;
        if meta.identity != *identity {
            return Err(StateReject::OtherModel(describe_difference(
                &meta.identity,
                identity,
            )));
        }
        if meta.turns != log_turns {
            return Err(StateReject::Stale {
                state: meta.turns,
                log: log_turns,
            });
        }
        let kv_len = match std::fs::metadata(self.kv_path()) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt("the KV file is missing"));
            }
            Err(e) => return Err(e.into()),
        };
        if kv_len != meta.state_len {
            return Err(corrupt("state length does not match"));
        }
        if checksum_dropping_cache(&self.kv_path())? != (meta.state_len, meta.state_crc32) {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(meta)
    }
}

/// Drops a file's pages from the page cache (clean pages only: call after fsync). The session's
/// files are read once per start and written once per turn; keeping them cached would charge a
/// second copy of the context to the worker's cgroup.
pub fn drop_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// Length and CRC-32 of a file, read in 8 MiB pieces whose pages are dropped behind the read.
fn checksum_dropping_cache(path: &Path) -> std::io::Result<(u64, u32)> {
    const CHUNK: usize = 8 << 20;
    let mut f = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len: u64 = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        let _ = nix::fcntl::posix_fadvise(
            &f,
            len as i64,
            n as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        len += n as u64;
    }
    Ok((len, hasher.finalize()))
}

fn describe_difference(saved: &Identity, now: &Identity) -> String {
    if saved.ctx != now.ctx {
        format!("saved for ctx {}, now {}", saved.ctx, now.ctx)
    } else if saved.model_path != now.model_path {
        format!("saved for {}", saved.model_path.display())
    } else {
        "the model file changed".to_owned()
    }
}

/// Compaction: the index of the oldest turn to keep so that the newest whole turns fit in
/// `budget` tokens. Returns `turns.len()` when not even the newest turn fits.
pub fn keep_newest(turns: &[Turn], budget: usize) -> usize {
    let mut used = 0usize;
    let mut first = turns.len();
    for (i, t) in turns.iter().enumerate().rev() {
        used += t.tokens.len();
        if used > budget {
            break;
        }
        first = i;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(n: usize) -> Turn {
        Turn {
            prompt: format!("p{n}"),
            reply: "r".into(),
            tokens: vec![1; n],
        }
    }

    #[test]
    fn keeps_the_newest_turns_that_fit() {
        let turns = vec![turn(5), turn(3), turn(4)];
        assert_eq!(keep_newest(&turns, 100), 0, "all fit");
        assert_eq!(keep_newest(&turns, 7), 1, "3 + 4");
        assert_eq!(keep_newest(&turns, 6), 2, "only the newest");
        assert_eq!(keep_newest(&turns, 3), 3, "nothing fits");
        assert_eq!(keep_newest(&[], 3), 0);
    }

    fn identity(ctx: u32) -> Identity {
        Identity {
            model_path: "/m".into(),
            model_size: 1,
            model_mtime_ns: 2,
            model_prefix_crc32: 3,
            ctx,
        }
    }

    #[test]
    fn state_round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let files = SessionFiles::new(dir.path(), identity(8).model_id()).unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 0),
            Err(StateReject::Missing)
        ));
        // What llama.cpp would have streamed to the temp file.
        let kv = vec![7u8; 100_000];
        std::fs::write(files.kv_tmp_path(), &kv).unwrap();
        let meta = StateMeta {
            identity: identity(8),
            turns: 2,
            first_turn: 0,
            tokens: vec![1, 2, 3],
            state_len: 0,
            state_crc32: 0,
        };
        files.commit_state(meta.clone()).unwrap();
        assert!(!files.kv_tmp_path().exists(), "renamed into place");
        assert_eq!(std::fs::read(files.kv_path()).unwrap(), kv);
        let m = files.check_state(&identity(8), 2).unwrap();
        assert_eq!(
            m,
            StateMeta {
                state_len: kv.len() as u64,
                state_crc32: crc32fast::hash(&kv),
                ..meta
            }
        );
        assert!(matches!(
            files.check_state(&identity(9), 2),
            Err(StateReject::OtherModel(_))
        ));
        assert!(matches!(
            files.check_state(&identity(8), 3),
            Err(StateReject::Stale { .. })
        ));
        // Flip one byte of the KV data.
        let mut bytes = kv.clone();
        bytes[77_777] ^= 0xff;
        std::fs::write(files.kv_path(), &bytes).unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 2),
            Err(StateReject::Corrupt(m)) if m.contains("checksum")
        ));
        std::fs::write(files.kv_path(), &kv[..1000]).unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 2),
            Err(StateReject::Corrupt(m)) if m.contains("length")
        ));
        std::fs::remove_file(files.kv_path()).unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 2),
            Err(StateReject::Corrupt(m)) if m.contains("missing")
        ));
        std::fs::write(files.state_path(), b"BJSESS01 an older format").unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 2),
            Err(StateReject::Corrupt(_))
        ));
        std::fs::write(files.state_path(), b"garbage").unwrap();
        assert!(matches!(
            files.check_state(&identity(8), 2),
            Err(StateReject::Corrupt(_))
        ));
    }

    #[test]
    fn log_appends_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let files = SessionFiles::new(dir.path(), identity(8).model_id()).unwrap();
        files.append(&turn(2)).unwrap();
        files.append(&turn(3)).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(files.log_path())
            .unwrap();
        f.write_all(br#"{"prompt":"half"#).unwrap();
        let log = files.load_log().unwrap();
        assert_eq!(log.model, Some(identity(8).model_id()), "the header");
        assert_eq!(log.turns, vec![turn(2), turn(3)]);
        assert_eq!(log.warnings.len(), 1);
        files.append(&turn(4)).unwrap();
        let log = files.load_log().unwrap();
        assert_eq!(
            log.turns.len(),
            3,
            "the torn tail was cut, the next append is clean"
        );
        assert!(log.warnings.is_empty());
        let text = std::fs::read_to_string(files.log_path()).unwrap();
        assert_eq!(text.matches("session_log").count(), 1, "one header: {text}");
    }

    #[test]
    fn a_log_from_before_the_header_is_read_and_can_be_rewritten_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = SessionFiles::new(dir.path(), identity(8).model_id()).unwrap();
        let old = [turn(1), turn(2)]
            .iter()
            .map(|t| serde_json::to_string(t).unwrap() + "\n")
            .collect::<String>();
        std::fs::write(files.log_path(), old).unwrap();
        let log = files.load_log().unwrap();
        assert_eq!((log.model, log.turns.len()), (None, 2));
        files.rewrite_log(&log.turns).unwrap();
        let log = files.load_log().unwrap();
        assert_eq!(log.model, Some(identity(8).model_id()));
        assert_eq!(log.turns, vec![turn(1), turn(2)]);
    }

    #[test]
    fn temp_files_are_cleaned_and_old_files_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let files = SessionFiles::new(dir.path(), identity(8).model_id()).unwrap();
        std::fs::write(files.kv_tmp_path(), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join(".session.state.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("keep.tmp"), b"not ours").unwrap();
        assert_eq!(files.clean_temp().unwrap(), 2);
        assert!(!files.kv_tmp_path().exists());
        assert!(dir.path().join("keep.tmp").exists());

        files.append(&turn(1)).unwrap();
        std::fs::write(files.state_path(), b"state").unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let moved = files.move_aside(at).unwrap();
        assert_eq!(
            moved,
            [
                "session.log.20231114T221320Z.stale",
                "session.state.20231114T221320Z.stale"
            ]
        );
        assert!(!files.log_path().exists() && !files.state_path().exists());
        files.append(&turn(2)).unwrap();
        let again = files.move_aside(at).unwrap();
        assert_eq!(
            again,
            ["session.log.20231114T221320Z-1.stale"],
            "none replaced"
        );
    }
}
