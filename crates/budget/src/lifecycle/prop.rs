//! Property tests over random input sequences for three instances sharing one ledger:
//! - the ledger's total always equals the sum over instances whose state holds an allocation;
//! - never two live runs of one instance;
//! - every reserve is matched by exactly one release (after a full shutdown, nothing is held).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::restart::RestartMode;

const MB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Step(usize, In),
    Advance(u64),
}

#[derive(Debug, Clone)]
enum In {
    Admit,
    Spawned,
    SpawnFailed,
    Hello(bool),
    Loading(u8),
    Ready,
    Said(bool),
    Heartbeat,
    Oom,
    Exit(Exit, u64, bool),
    Timer,
    Check(u64, bool, bool),
    MemoryFreed,
    Stop(u8),
    Shutdown,
    Restore(u64),
    GpuFallback(Option<u64>),
    GpuRestore,
    Load,
    Evict,
}

fn an_input() -> impl Strategy<Value = In> {
    prop_oneof![
        Just(In::Admit),
        Just(In::Spawned),
        Just(In::SpawnFailed),
        any::<bool>().prop_map(In::Hello),
        any::<u8>().prop_map(In::Loading),
        Just(In::Ready),
        any::<bool>().prop_map(In::Said),
        Just(In::Heartbeat),
        Just(In::Oom),
        (
            prop_oneof![
                Just(Exit::Code(0)),
                Just(Exit::Code(1)),
                Just(Exit::Code(65)),
                Just(Exit::Code(71)),
                Just(Exit::Code(75)),
                Just(Exit::Signal(9)),
                Just(Exit::Signal(11)),
            ],
            0u64..3,
            any::<bool>()
        )
            .prop_map(|(e, k, p)| In::Exit(e, k, p)),
        Just(In::Timer),
        (0u64..400, any::<bool>(), any::<bool>()).prop_map(|(a, c, g)| In::Check(a, c, g)),
        Just(In::MemoryFreed),
        (0u8..6).prop_map(In::Stop),
        Just(In::Shutdown),
        (0u64..400).prop_map(In::Restore),
        proptest::option::of(0u64..400).prop_map(In::GpuFallback),
        Just(In::GpuRestore),
        Just(In::Load),
        Just(In::Evict),
    ]
}

fn an_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..3, an_input()).prop_map(|(i, x)| Op::Step(i, x)),
        1 => (0u64..40_000).prop_map(Op::Advance),
    ]
}

fn mem(available_mb: u64) -> HostMemory {
    HostMemory {
        total: 1024 * MB,
        available: available_mb * MB,
    }
}

/// Three instances, a shared ledger and what the OS would know: which runs are alive.
struct World {
    machines: BTreeMap<String, Machine>,
    ledger: Ledger,
    /// Instance -> whether its process exists (a spawn succeeded and it was not reaped).
    live: BTreeMap<String, bool>,
    reserves: u64,
    releases: u64,
    now: Instant,
    stopping: bool,
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        let mut machines = BTreeMap::new();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let settings = Settings {
                restart: RestartConfig {
                    mode: if i == 0 {
                        RestartMode::Always
                    } else {
                        RestartMode::OnFailure
                    },
                    backoff_initial: Duration::from_millis(100),
                    backoff_factor: 2.0,
                    backoff_max: Duration::from_secs(5),
                    backoff_reset_after: Duration::from_secs(10),
                    start_limit_burst: 4,
                    start_limit_interval: Duration::from_secs(30),
                },
                stop_timeout: Duration::from_secs(2),
                heartbeat_interval: Duration::from_secs(1),
                load_stall_timeout: Duration::from_secs(5),
                gpu_layers: (i as u32) * 10,
                swap_max: 0,
                // "c" loads on demand: the invariants hold for both kinds.
                on_demand: i == 2,
            };
            let r = Reservation {
                required: 100 * MB,
                estimate: 80 * MB,
                protected: 50 * MB,
            };
            machines.insert(name.to_owned(), Machine::new(name, settings, r, now));
        }
        World {
            machines,
            // Room for two of the three at their first size, and for some growth.
            ledger: Ledger::new(260 * MB),
            live: BTreeMap::new(),
            reserves: 0,
            releases: 0,
            now,
            stopping: false,
        }
    }

    fn input(&self, name: &str, x: In) -> Option<Input> {
        let live = self.live.get(name).copied().unwrap_or(false);
        let m = self.machines.get(name)?;
        let pending = m.run.as_ref().is_some_and(|r| r.pid.is_none());
        let stats = |k: u64, p: bool| RunStats {
            limit: Some(m.reservation.required),
            peak: p.then_some(m.reservation.required),
            oom_kill: k,
        };
        Some(match x {
            In::Admit => Input::Admit,
            // The OS answers a spawn only while one is pending.
            In::Spawned if pending => Input::Spawned { pid: 1000 },
            In::SpawnFailed if pending => Input::SpawnFailed("no".into()),
            In::Spawned | In::SpawnFailed => return None,
            In::Hello(v) => Input::Hello { valid: v },
            In::Loading(f) => Input::Loading(f32::from(f) / 255.0),
            In::Ready => Input::Ready {
                load_ms: 1,
                turns: 0,
                restored_from: "none".into(),
            },
            In::Said(g) => Input::Said {
                reason: "x".into(),
                gpu_alloc: g,
            },
            In::Heartbeat => Input::Heartbeat,
            In::Oom => Input::Oom(stats(1, true)),
            // Only a live process exits.
            In::Exit(e, k, p) if live => Input::Exited {
                exit: e,
                stats: Some(stats(k, p)),
            },
            In::Exit(..) => return None,
            In::Timer => Input::Timer,
            In::Check(a, c, g) => Input::RestartCheck {
                memory: Ok(mem(a)),
                critical: c,
                gpu_released: g,
            },
            In::MemoryFreed => Input::MemoryFreed,
            In::Stop(k) => Input::Stop(match k {
                0 => AfterStop::Remove,
                1 => AfterStop::Restart,
                2 => AfterStop::Shed,
                3 => AfterStop::Relaunch,
                4 => AfterStop::Unload(Unload::Requested),
                _ => AfterStop::Unload(Unload::Idle),
            }),
            In::Shutdown => Input::Shutdown,
            In::Restore(a) => Input::Restore { memory: mem(a) },
            In::GpuFallback(a) => Input::GpuFallback {
                message: "gpu".into(),
                memory: a.map(mem),
            },
            In::GpuRestore => Input::GpuRestore {
                message: "gpu".into(),
            },
            In::Load => Input::Load,
            In::Evict => Input::Evict { by: "x".into() },
        })
    }

    fn step(&mut self, name: &str, input: Input) -> Result<(), TestCaseError> {
        let spawned = matches!(input, Input::Spawned { .. });
        let exited = matches!(input, Input::Exited { .. });
        let Some(m) = self.machines.get_mut(name) else {
            return Ok(());
        };
        let ctx = Ctx {
            ledger: &self.ledger,
            stopping: self.stopping,
            cap: 200 * MB,
            headroom: 10 * MB,
            jitter: 0.3,
        };
        let actions = m.step(input, self.now, &ctx);
        if spawned {
            self.live.insert(name.to_owned(), true);
        }
        if exited {
            self.live.insert(name.to_owned(), false);
        }
        for a in &actions {
            match a {
                Action::Reserve(b) => {
                    prop_assert!(self.ledger.allocate(name, *b).is_ok(), "{name}: {a:?}");
                    self.reserves += 1;
                }
                Action::Resize(b) => {
                    prop_assert!(self.ledger.get(name).is_some(), "resize without a hold");
                    prop_assert!(self.ledger.set(name, *b).is_ok(), "{name}: {a:?}");
                }
                Action::Release => {
                    prop_assert!(
                        self.ledger.release(name).is_some(),
                        "{name}: double release"
                    );
                    self.releases += 1;
                }
                Action::Spawn { .. } => {
                    let live = self.live.get(name).copied().unwrap_or(false);
                    prop_assert!(!live, "{name}: a second live run");
                }
                Action::Forget => {
                    self.machines.remove(name);
                    self.live.remove(name);
                }
                _ => {}
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let mut sum = 0;
        for (name, m) in &self.machines {
            let holds = m.state.holds_allocation();
            prop_assert_eq!(
                self.ledger.get(name).is_some(),
                holds,
                "{} is {:?}",
                name,
                m.state
            );
            if holds {
                prop_assert_eq!(self.ledger.get(name), Some(m.reservation.required));
                sum += m.reservation.required;
            }
            prop_assert_eq!(m.held(), self.ledger.get(name));
            // A live process always has its run; a run without a process is a pending spawn.
            if self.live.get(name).copied().unwrap_or(false) {
                prop_assert!(m.run.as_ref().is_some_and(|r| r.pid.is_some()));
            }
        }
        prop_assert_eq!(self.ledger.allocated(), sum);
        Ok(())
    }

    /// Shut everything down the way the daemon does: Shutdown, then every live process exits
    /// and pending spawns fail.
    fn shut_down(&mut self) -> Result<(), TestCaseError> {
        self.stopping = true;
        let names: Vec<String> = self.machines.keys().cloned().collect();
        for name in &names {
            self.step(name, Input::Shutdown)?;
            let pending = self
                .machines
                .get(name)
                .and_then(|m| m.run.as_ref())
                .is_some_and(|r| r.pid.is_none());
            if pending {
                self.step(name, Input::SpawnFailed("stopping".into()))?;
            }
            if self.live.get(name).copied().unwrap_or(false) {
                self.step(
                    name,
                    Input::Exited {
                        exit: Exit::Code(0),
                        stats: None,
                    },
                )?;
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_ledger_follows_the_states_and_runs_never_overlap(ops in proptest::collection::vec(an_op(), 1..120)) {
        let mut w = World::new();
        for op in ops {
            match op {
                Op::Advance(ms) => w.now += Duration::from_millis(ms),
                Op::Step(i, x) => {
                    let name = ["a", "b", "c"][i];
                    if let Some(input) = w.input(name, x) {
                        w.step(name, input)?;
                    }
                }
            }
        }
        w.shut_down()?;
        prop_assert_eq!(w.ledger.allocated(), 0, "all released after a shutdown");
        prop_assert_eq!(w.reserves, w.releases, "every reserve has exactly one release");
        for m in w.machines.values() {
            prop_assert!(m.run.is_none());
            prop_assert!(!m.state.holds_allocation(), "{:?}", m.state);
            prop_assert_eq!(m.next_deadline(), None);
        }
    }
}
