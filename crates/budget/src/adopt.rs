//! Surviving the supervisor ([adopt], groundwork; the daemon does not use it yet): what the
//! supervisor records about each live run, and the verdict on a recorded run that a starting
//! supervisor finds. Pure: the daemon reads `/proc`, the cgroup and the worker's answer, and
//! carries the verdict out.
//!
//! A run is adopted only when everything agrees: the pid is alive with the start time recorded
//! for it (a recycled pid has another), it is in the instance's cgroup, and on its adoption
//! socket it answers with the instance's name, the run's secret id and a protocol the supervisor
//! speaks. Anything less is not trusted: its cgroup is killed and removed, never a bare pid.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The version of the records file; a file of another version is not trusted.
pub const RECORDS_VERSION: u32 = 1;

/// A run's secret id: 128 random bits, given to the worker at its start and presented by it
/// when a supervisor reconnects. Printed as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunId(pub [u8; 16]);

impl RunId {
    /// Parses 32 lowercase hex digits; anything else is an error naming what is wrong.
    pub fn parse(s: &str) -> Result<RunId, String> {
        if s.len() != 32 {
            return Err(format!(
                "a run id is 32 hex digits, not {} characters",
                s.len()
            ));
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(format!(
                    "a run id has lowercase hex digits only, not {:?}",
                    char::from(c)
                )),
            };
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(RunId(out))
    }
}

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RunId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What the supervisor records about one live run, off the restart path, so that a supervisor
/// starting after a crash (or an exec of itself) can verify and adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    pub instance: String,
    pub pid: u32,
    /// The process's start time (`/proc/PID/stat` field 22, clock ticks since boot).
    pub start_ticks: u64,
    pub cgroup: PathBuf,
    pub run_id: RunId,
    /// What the worker was started with, key by key (model and its identity, ctx, limits, GPU
    /// layers, template...: the keys that shape a run): a run whose instance's config changed
    /// meanwhile is replaced, not adopted, and the reason names what changed.
    pub spec: BTreeMap<String, String>,
    /// Its ledger allocation, restored exactly on adoption.
    pub allocated: u64,
    pub restarts: u64,
    pub oom_kills: u64,
    /// When the worker was spawned (Unix ms): uptime continues from it.
    pub started_unix_ms: u64,
    /// [swap] counters and the last use (Unix ms).
    pub loads: u64,
    pub evictions: u64,
    pub last_used_unix_ms: Option<u64>,
}

/// The records file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Records {
    pub version: u32,
    pub runs: Vec<RunRecord>,
}

/// What the worker says on its adoption socket when a supervisor reconnects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptHello {
    pub instance: String,
    pub run_id: RunId,
    pub protocol_version: u32,
}

/// What a starting supervisor finds of a recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pid exists and started at the recorded time.
    pub alive: bool,
    /// The pid is in the recorded cgroup (`cgroup.procs`).
    pub in_cgroup: bool,
    /// Its answer on the adoption socket (None: none within the wait).
    pub hello: Option<AdoptHello>,
}

/// What becomes of a recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Verified and wanted as it is: watch it through its pidfd, restore its allocation and
    /// counters.
    Adopt,
    /// Verified, but its instance's config changed: stop it, then start it with the new one.
    Replace(String),
    /// Verified, but its instance is no longer in the mode: stop it.
    Stop(String),
    /// Not verified: kill its cgroup's processes (through the cgroup, never the pid) and remove
    /// the cgroup.
    Kill(String),
    /// The process is gone: remove its cgroup if it is left behind.
    Gone,
}

/// The verdict on `r` from what was found, `wanted`: the run keys its instance has in the
/// current config (None: not in the mode), and the protocol the supervisor speaks.
pub fn judge(
    r: &RunRecord,
    f: &Found,
    wanted: Option<&BTreeMap<String, String>>,
    protocol: u32,
) -> Verdict {
    if !f.alive {
        return Verdict::Gone;
    }
    if !f.in_cgroup {
        return Verdict::Kill(format!(
            "pid {} is no longer in {}: not adopted (nothing outside the cgroup is signalled)",
            r.pid,
            r.cgroup.display()
        ));
    }
    let Some(h) = &f.hello else {
        return Verdict::Kill(format!(
            "pid {} did not answer on its adoption socket",
            r.pid
        ));
    };
    if h.instance != r.instance || h.run_id != r.run_id {
        return Verdict::Kill(format!(
            "pid {} did not present {}'s run id: not a worker of this supervisor",
            r.pid, r.instance
        ));
    }
    if h.protocol_version != protocol {
        return Verdict::Kill(format!(
            "pid {} speaks protocol {}, this supervisor {protocol}",
            r.pid, h.protocol_version
        ));
    }
    let Some(wanted) = wanted else {
        return Verdict::Stop(format!("{} is no longer in the mode", r.instance));
    };
    let changed = changed_keys(&r.spec, wanted);
    if changed.is_empty() {
        Verdict::Adopt
    } else {
        Verdict::Replace(format!(
            "{}'s config changed while the supervisor was down ({}): restarting it with the new one",
            r.instance,
            changed.join("; ")
        ))
    }
}

/// What differs between the keys a run was started with and the wanted ones, as
/// `key OLD -> NEW` (`(unset)` for a key one side lacks), sorted by key.
pub fn changed_keys(was: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let unset = "(unset)".to_owned();
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (was.get(k).unwrap_or(&unset), now.get(k).unwrap_or(&unset));
            (a != b).then(|| format!("{k} {a} -> {b}"))
        })
        .collect()
}

/// At most one run per instance: when the records name an instance twice (a crash between two
/// writes), the newest start is kept and the others are returned to be judged untrusted.
pub fn one_per_instance(runs: Vec<RunRecord>) -> (Vec<RunRecord>, Vec<RunRecord>) {
    let mut newest: BTreeMap<String, RunRecord> = BTreeMap::new();
    let mut dropped = Vec::new();
    for r in runs {
        match newest.get(&r.instance) {
            Some(kept)
                if (kept.started_unix_ms, kept.start_ticks)
                    >= (r.started_unix_ms, r.start_ticks) =>
            {
                dropped.push(r);
            }
            _ => {
                if let Some(old) = newest.insert(r.instance.clone(), r) {
                    dropped.push(old);
                }
            }
        }
    }
    (newest.into_values().collect(), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RunRecord {
        RunRecord {
            instance: "a".into(),
            pid: 4242,
            start_ticks: 1000,
            cgroup: "/sys/fs/cgroup/belljar/a".into(),
            run_id: RunId([7; 16]),
            spec: spec(2048),
            allocated: 64 << 20,
            restarts: 2,
            oom_kills: 1,
            started_unix_ms: 1_764_300_000_000,
            loads: 3,
            evictions: 1,
            last_used_unix_ms: Some(1_764_300_001_000),
        }
    }

    fn spec(ctx: u32) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("ctx".to_owned(), ctx.to_string()),
            ("model".to_owned(), "/m.gguf".to_owned()),
        ])
    }

    fn found(hello: Option<AdoptHello>) -> Found {
        Found {
            alive: true,
            in_cgroup: true,
            hello,
        }
    }

    fn hello(instance: &str, run_id: RunId, protocol_version: u32) -> Option<AdoptHello> {
        Some(AdoptHello {
            instance: instance.into(),
            run_id,
            protocol_version,
        })
    }

    #[test]
    fn a_verified_wanted_run_is_adopted() {
        let r = record();
        let f = found(hello("a", r.run_id, 3));
        assert_eq!(judge(&r, &f, Some(&spec(2048)), 3), Verdict::Adopt);
    }

    #[test]
    fn anything_unverified_is_killed_through_its_cgroup() {
        let r = record();
        let gone = Found {
            alive: false,
            in_cgroup: false,
            hello: None,
        };
        assert_eq!(judge(&r, &gone, Some(&spec(2048)), 3), Verdict::Gone);
        let moved = Found {
            in_cgroup: false,
            ..found(hello("a", r.run_id, 3))
        };
        assert!(
            matches!(judge(&r, &moved, Some(&spec(2048)), 3), Verdict::Kill(m) if m.contains("no longer in"))
        );
        assert!(
            matches!(judge(&r, &found(None), Some(&spec(2048)), 3), Verdict::Kill(m) if m.contains("did not answer"))
        );
        for h in [hello("b", r.run_id, 3), hello("a", RunId([8; 16]), 3)] {
            assert!(
                matches!(judge(&r, &found(h), Some(&spec(2048)), 3), Verdict::Kill(m) if m.contains("run id"))
            );
        }
        assert!(
            matches!(judge(&r, &found(hello("a", r.run_id, 2)), Some(&spec(2048)), 3), Verdict::Kill(m) if m.contains("protocol 2"))
        );
    }

    #[test]
    fn a_changed_or_removed_instance_is_replaced_or_stopped() {
        let r = record();
        let f = found(hello("a", r.run_id, 3));
        assert_eq!(
            judge(&r, &f, Some(&spec(4096)), 3),
            Verdict::Replace(
                "a's config changed while the supervisor was down (ctx 2048 -> 4096): restarting it with the new one"
                    .into()
            )
        );
        assert!(matches!(judge(&r, &f, None, 3), Verdict::Stop(_)));
        let mut more = spec(2048);
        more.insert("gpu_layers".into(), "8".into());
        more.remove("model");
        assert_eq!(
            changed_keys(&spec(2048), &more),
            ["gpu_layers (unset) -> 8", "model /m.gguf -> (unset)"]
        );
    }

    #[test]
    fn run_ids_round_trip_and_bad_ones_are_refused_clearly() {
        let id = RunId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(RunId::parse(&id.to_string()), Ok(id));
        assert!(RunId::parse("ab").unwrap_err().contains("32 hex digits"));
        assert!(
            RunId::parse(&"AB".repeat(16))
                .unwrap_err()
                .contains("lowercase")
        );
        assert!(RunId::parse(&"zz".repeat(16)).unwrap_err().contains("'z'"));
        // Multi-byte characters are refused by length or digit, never by a panic.
        assert!(RunId::parse(&"é".repeat(16)).is_err());
    }

    #[test]
    fn the_records_file_round_trips_and_refuses_unknown_keys() {
        let recs = Records {
            version: RECORDS_VERSION,
            runs: vec![record()],
        };
        let text = serde_json::to_string(&recs).unwrap();
        assert_eq!(serde_json::from_str::<Records>(&text).unwrap(), recs);
        let extra = text.replacen("\"pid\"", "\"pidx\":1,\"pid\"", 1);
        assert!(serde_json::from_str::<Records>(&extra).is_err());
        let bad_id = text.replace(&RunId([7; 16]).to_string(), "nope");
        let e = serde_json::from_str::<Records>(&bad_id)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 hex digits"), "{e}");
    }

    #[test]
    fn one_run_per_instance_keeps_the_newest() {
        let old = record();
        let mut new = record();
        new.pid = 5000;
        new.started_unix_ms += 10;
        let mut b = record();
        b.instance = "b".into();
        let (keep, drop) = one_per_instance(vec![new.clone(), b.clone(), old.clone()]);
        assert_eq!(keep, vec![new.clone(), b.clone()]);
        assert_eq!(drop, vec![old.clone()]);
        let (keep, drop) = one_per_instance(vec![old.clone(), new.clone()]);
        assert_eq!((keep, drop), (vec![new], vec![old]));
    }
}
