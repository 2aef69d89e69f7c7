//! Learned corrections: every run's observed peak, recorded in `<state dir>/observations.json`
//! with the model's identity (path, size, mtime and a checksum of its GGUF header: never a hash
//! of the whole file), ctx and mmap, so the next admission of the same model at the same ctx can
//! use `max(estimate, p95 observed peak x 1.1)` (`belljar_budget::estimate::learned`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::daemon::persist::write_atomic;

pub const OBSERVATIONS_FILE: &str = "observations.json";
/// At most this many observations per model+ctx+mmap, and in all (oldest dropped first).
const PER_KEY: usize = 20;
const TOTAL: usize = 2000;

/// Which model file, exactly: a changed file (size, mtime or header) starts afresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
    pub header_crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub model: ModelIdentity,
    pub ctx: u32,
    pub mmap: bool,
    /// The estimate the run was admitted with, and its peak in its cgroup.
    pub estimate: u64,
    pub peak: u64,
}

/// The identity of a probed model file: its size and mtime from the probe's open descriptor
/// and the checksum of the header it read.
pub fn identity(file: &belljar_host::ModelFile) -> ModelIdentity {
    ModelIdentity {
        path: std::fs::canonicalize(&file.path)
            .unwrap_or_else(|_| file.path.clone())
            .display()
            .to_string(),
        size: file.size,
        mtime_ns: file.mtime_ns,
        header_crc32: file.header_crc32,
    }
}

/// Why observations.json could not be used.
#[derive(Debug)]
pub struct Corrupt {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// The recorded observations, read only: none when the file is missing or unreadable; `Err`
/// when it is not valid (the caller decides what to do: `validate` reports it and leaves it).
pub fn read(state_dir: &Path) -> Result<Vec<Observation>, Corrupt> {
    let Ok(text) = belljar_host::safe_fs::read_own_file(state_dir, OBSERVATIONS_FILE) else {
        return Ok(Vec::new());
    };
    serde_json::from_str(&text).map_err(|e| Corrupt {
        path: state_dir.join(OBSERVATIONS_FILE),
        reason: e.to_string(),
    })
}

/// The recorded observations for `run` (and its writer): a corrupt file is moved aside and
/// learning starts afresh (nothing else depends on it). Only `run` changes the state dir.
pub fn load(state_dir: &Path) -> Vec<Observation> {
    read(state_dir).unwrap_or_else(|c| {
        tracing::warn!(
            "{} is not valid ({}); moved aside, learning starts afresh",
            c.path.display(),
            c.reason
        );
        let _ = std::fs::rename(&c.path, c.path.with_extension("json.corrupt"));
        Vec::new()
    })
}

/// The peaks recorded for this model+ctx+mmap.
pub fn peaks(all: &[Observation], model: &ModelIdentity, ctx: u32, mmap: bool) -> Vec<u64> {
    all.iter()
        .filter(|o| &o.model == model && o.ctx == ctx && o.mmap == mmap)
        .map(|o| o.peak)
        .collect()
}

/// Records observations off the event loop: one thread owns `observations.json` and appends
/// each observation in the order they came (a worker's exit must not wait for a file's fsync
/// before its restart). Dropping the recorder waits for the pending writes.
#[derive(Debug)]
pub struct Recorder {
    tx: Option<std::sync::mpsc::Sender<Observation>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn spawn(state_dir: std::path::PathBuf) -> Recorder {
        let (tx, rx) = std::sync::mpsc::channel::<Observation>();
        let thread = std::thread::Builder::new()
            .name("learn".into())
            .spawn(move || {
                for obs in rx {
                    if let Err(e) = record(&state_dir, obs) {
                        tracing::warn!("cannot record a run's peak: {e}");
                    }
                }
            })
            .map_err(|e| tracing::warn!("cannot start the observation writer: {e}"))
            .ok();
        Recorder {
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }

    pub fn record(&self, obs: Observation) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(obs);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Appends one observation, keeping the newest per key and in all.
pub fn record(state_dir: &Path, obs: Observation) -> std::io::Result<()> {
    let mut all = load(state_dir);
    let same = |o: &Observation| o.model == obs.model && o.ctx == obs.ctx && o.mmap == obs.mmap;
    let n = all.iter().filter(|o| same(o)).count();
    if n >= PER_KEY {
        let mut drop = n + 1 - PER_KEY;
        all.retain(|o| {
            if drop > 0 && same(o) {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
    all.push(obs);
    if all.len() > TOTAL {
        all.drain(..all.len() - TOTAL);
    }
    write_atomic(
        state_dir,
        OBSERVATIONS_FILE,
        &serde_json::to_vec(&all).map_err(std::io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ctx: u32, peak: u64) -> Observation {
        Observation {
            model: ModelIdentity {
                path: "/m.gguf".into(),
                size: 1,
                mtime_ns: 2,
                header_crc32: 3,
            },
            ctx,
            mmap: true,
            estimate: 10,
            peak,
        }
    }

    #[test]
    fn records_and_keeps_the_newest_per_key() {
        let dir = tempfile::tempdir().unwrap();
        for p in 0..25 {
            record(dir.path(), obs(512, p)).unwrap();
        }
        record(dir.path(), obs(4096, 99)).unwrap();
        let all = load(dir.path());
        let m = obs(0, 0).model;
        assert_eq!(peaks(&all, &m, 512, true), (5..25).collect::<Vec<u64>>());
        assert_eq!(peaks(&all, &m, 4096, true), [99]);
        assert!(peaks(&all, &m, 4096, false).is_empty());
        let other = ModelIdentity {
            header_crc32: 4,
            ..m
        };
        assert!(
            peaks(&all, &other, 512, true).is_empty(),
            "a changed file starts afresh"
        );
    }

    #[test]
    fn a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(OBSERVATIONS_FILE), "{not json").unwrap();
        assert!(read(dir.path()).is_err(), "read reports it");
        assert!(
            dir.path().join(OBSERVATIONS_FILE).exists(),
            "and leaves it where it is"
        );
        assert!(load(dir.path()).is_empty());
        assert!(dir.path().join("observations.json.corrupt").exists());
    }
}
