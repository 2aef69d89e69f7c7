//! The upper bounds of the values a config (or an `add`) may set. Values above them once passed
//! `validate` and then crashed `run` (a duration past what a clock can add, `threads` that
//! llama.cpp aborts on, sizes that wrapped): each bound is far above any sensible setting and
//! far below where arithmetic on it could overflow. docs/configuration.md lists them.

use std::time::Duration;

/// The longest duration of any key (`backoff_max`, `stop_timeout`, `[pressure] interval`, ...):
/// one day. The clock arithmetic on it (`now + stop_timeout`, `heartbeat_interval x 3`, the
/// backoff in f64 seconds) cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The largest `ctx` in tokens: 16 Mi (the longest contexts of published models are ~10M).
pub const MAX_CTX: u32 = 1 << 24;
/// The most `threads` for llama.cpp.
pub const MAX_THREADS: u32 = 1024;
/// `priority` lies in `[-MAX_PRIORITY, MAX_PRIORITY]`: room for any ordering, and
/// `oom_score_adj`'s arithmetic (`500 - priority x 100`) cannot overflow.
pub const MAX_PRIORITY: i64 = 1_000_000;
/// The most `gpu_layers` (llama.cpp takes an i32; more layers than any model has means all).
pub const MAX_GPU_LAYERS: u32 = 65_536;
/// The largest `backoff_factor`.
pub const MAX_BACKOFF_FACTOR: f64 = 100.0;
/// The largest `start_limit_burst` (the breaker remembers that many start times).
pub const MAX_START_LIMIT_BURST: u32 = 1_000_000;
