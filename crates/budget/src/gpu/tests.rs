//! The GPU policy on readings in NVML's shape. No device was lent to the session that wrote
//! these, so they are not recordings from one: they use an H100 80GB HBM3's total as NVML
//! reports it (81559 MiB, as published e.g. on modal.com's "Why does an NVIDIA H100 80GB card
//! offer 85.52 GB?") and per-process figures of the size a PyTorch allocation and llama.cpp's
//! CUDA context take. Replace them with recordings from `supervisor status --json` (`gpus`) on
//! real hardware when one is at hand.

use super::*;
use crate::pressure::Threshold;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const H100_TOTAL: u64 = 81559 * MIB;

fn h100(used: u64, processes: &[(u32, u64)]) -> GpuReading {
    GpuReading {
        index: 0,
        name: "NVIDIA H100 80GB HBM3".into(),
        total: H100_TOTAL,
        used,
        utilization: Some(0),
        processes: processes
            .iter()
            .map(|&(pid, used)| GpuProcess {
                pid,
                used: Some(used),
            })
            .collect(),
    }
}

/// The seed's levels: 80/90/95%, restore below 60%.
fn levels() -> Levels {
    Levels {
        warning: Threshold::PercentUsed(80.0),
        critical: Threshold::PercentUsed(90.0),
        emergency: Threshold::PercentUsed(95.0),
        restore: Threshold::PercentUsed(60.0),
    }
}

fn cand(name: &str, priority: i64, running: bool, fallback: Fallback) -> GpuCandidate {
    GpuCandidate {
        name: name.into(),
        priority,
        device: 0,
        wants_gpu: true,
        running,
        state: GpuState {
            fallback,
            failures: 0,
        },
    }
}

/// A model of `layers` layers and `file` bytes with `kv_heads` KV heads of `head_dim`.
fn facts(layers: u32, file: u64, kv_heads: u32, head_dim: u32) -> crate::estimate::ModelFacts {
    crate::estimate::ModelFacts {
        file_size: file,
        tensor_bytes: file,
        block_count: layers,
        embedding: kv_heads * head_dim,
        heads: kv_heads,
        kv_heads,
        key_length: head_dim,
        value_length: head_dim,
        ..Default::default()
    }
}

#[test]
fn readings_in_nvml_shape_round_trip_through_json() {
    let r = h100(4 * GIB, &[(4242, 4 * GIB - 600 * MIB)]);
    let text = serde_json::to_string(&r).unwrap();
    let back: GpuReading = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
    assert_eq!(r.memory().available, H100_TOTAL - 4 * GIB);
}

#[test]
fn attribution_sums_each_instances_processes_and_skips_strangers() {
    // A PyTorch process holding 4 GiB and the worker's own CUDA context in instance a; one of
    // b's; and a process outside belljar.
    let r = h100(
        10 * GIB,
        &[(100, 4 * GIB), (101, 520 * MIB), (200, GIB), (999, 3 * GIB)],
    );
    let owner = |pid: u32| match pid {
        100 | 101 => Some("a"),
        200 => Some("b"),
        _ => None,
    };
    let got = attribute(&r, owner);
    assert_eq!(got.get("a"), Some(&(4 * GIB + 520 * MIB)));
    assert_eq!(got.get("b"), Some(&GIB));
    assert_eq!(got.len(), 2);
}

#[test]
fn a_process_whose_memory_the_driver_hides_counts_as_zero() {
    let mut r = h100(GIB, &[(100, GIB)]);
    r.processes[0].used = None;
    assert_eq!(attribute(&r, |_| Some("a")).get("a"), Some(&0));
}

#[test]
fn gpu_levels_follow_the_host_rules_with_hysteresis() {
    let l = levels();
    let at = |pct: f64| h100((H100_TOTAL as f64 * pct / 100.0) as u64, &[]).memory();
    assert_eq!(l.next(Level::Normal, at(79.0)), Level::Normal);
    assert_eq!(l.next(Level::Normal, at(81.0)), Level::Warning);
    assert_eq!(
        l.next(Level::Normal, at(96.0)),
        Level::Emergency,
        "levels rise at once"
    );
    // Falling: one level at a time, 5 points below, to normal only below restore.
    assert_eq!(l.next(Level::Emergency, at(93.0)), Level::Emergency);
    assert_eq!(l.next(Level::Emergency, at(89.0)), Level::Critical);
    assert_eq!(l.next(Level::Warning, at(70.0)), Level::Warning);
    assert_eq!(l.next(Level::Warning, at(59.0)), Level::Normal);
}

#[test]
fn emergency_moves_the_lowest_priority_gpu_instance_to_the_cpu() {
    let r = h100(H100_TOTAL / 100 * 97, &[]);
    let cands = [
        cand("high", 5, true, Fallback::None),
        cand("low", 0, true, Fallback::None),
        cand("lowest-but-stopped", -3, false, Fallback::None),
        cand("already-on-cpu", -5, true, Fallback::Pressure),
    ];
    let settle = Duration::from_secs(10);
    assert_eq!(
        decide(&levels(), Level::Emergency, &r, &cands, None, settle),
        Some(GpuAction::FallBack("low".into()))
    );
    assert_eq!(
        decide(
            &levels(),
            Level::Emergency,
            &r,
            &cands,
            Some(Duration::from_secs(3)),
            settle
        ),
        None,
        "one move per settle"
    );
    // Instances on another GPU or without gpu_layers are never chosen.
    let mut other = cands.clone();
    other[1].device = 1;
    other[0].wants_gpu = false;
    assert_eq!(
        decide(&levels(), Level::Emergency, &r, &other, None, settle),
        None
    );
}

#[test]
fn below_restore_the_highest_priority_fallback_comes_back_but_never_a_failed_one() {
    let cands = [
        cand("p1", 1, true, Fallback::Pressure),
        cand("p7", 7, true, Fallback::Pressure),
        cand("broken", 9, true, Fallback::Failures),
    ];
    let settle = Duration::from_secs(10);
    let low = h100(H100_TOTAL / 2, &[]);
    assert_eq!(
        decide(&levels(), Level::Normal, &low, &cands, None, settle),
        Some(GpuAction::Restore("p7".into()))
    );
    // Normal but not yet below restore (65% > 60%): wait.
    let mid = h100(H100_TOTAL / 100 * 65, &[]);
    assert_eq!(
        decide(&levels(), Level::Normal, &mid, &cands, None, settle),
        None
    );
    assert_eq!(
        decide(&levels(), Level::Warning, &low, &cands, None, settle),
        None
    );
    let only_broken = [cands[2].clone()];
    assert_eq!(
        decide(&levels(), Level::Normal, &low, &only_broken, None, settle),
        None
    );
}

#[test]
fn three_gpu_allocation_failures_keep_an_instance_on_the_cpu_until_reset() {
    let mut s = GpuState::default();
    assert_eq!(s.layers(33), 33);
    assert!(!s.alloc_failed());
    assert!(!s.alloc_failed());
    assert_eq!(s.layers(33), 33, "two failures: still on the GPU");
    assert!(s.alloc_failed(), "the third moves it");
    assert_eq!(s.fallback, Fallback::Failures);
    assert_eq!(s.layers(33), 0);
    assert!(!s.alloc_failed(), "already moved: reported once");
    s.reset();
    assert_eq!(s, GpuState::default());
    assert_eq!(s.layers(33), 33);
}

#[test]
fn pressure_fallback_runs_on_the_cpu() {
    let s = GpuState {
        fallback: Fallback::Pressure,
        failures: 0,
    };
    assert_eq!(s.layers(20), 0);
}

#[test]
fn vram_estimate_is_the_offloaded_share_plus_its_kv() {
    // 32 layers, 4 GiB of weights, KV f16 at ctx 4096 with 8 KV heads of 128: 16 MiB per layer.
    let m = facts(32, 4 * GIB, 8, 128);
    let kv = crate::estimate::kv_cache(&m, 4096).unwrap() / 32;
    assert_eq!(kv, 16 * MIB);
    assert_eq!(
        model_vram(&m, 16, 4096).unwrap(),
        vram_estimate(4 * GIB, 32, 16, kv)
    );
    let half = vram_estimate(4 * GIB, 32, 16, kv);
    assert_eq!(half.offloaded_layers, 16);
    assert_eq!(half.weights, 2 * GIB);
    assert_eq!(half.kv, 256 * MIB);
    assert_eq!(half.total, 2 * GIB + 256 * MIB);
    let all = vram_estimate(4 * GIB, 32, 99, kv);
    assert_eq!(all.offloaded_layers, 32);
    assert_eq!(
        all.weights,
        4 * GIB,
        "more layers than the model has: all of it"
    );
    assert_eq!(vram_estimate(4 * GIB, 32, 0, kv).total, 0);
    assert_eq!(half.total % crate::estimate::GRANULE, 0);
}

#[test]
fn vram_estimate_grows_with_layers() {
    let kv = crate::estimate::kv_cache(&facts(32, GIB, 4, 64), 2048).unwrap() / 32;
    let mut last = 0;
    for layers in 0..=40 {
        let e = vram_estimate(GIB, 32, layers, kv).total;
        assert!(e >= last, "{layers}");
        last = e;
    }
}

#[test]
fn vram_is_validated_per_device_against_total_times_one_minus_margin() {
    let demands = [
        VramDemand {
            name: "a".into(),
            device: 0,
            vram: 40 * GIB,
        },
        VramDemand {
            name: "b".into(),
            device: 0,
            vram: 30 * GIB,
        },
        VramDemand {
            name: "c".into(),
            device: 1,
            vram: GIB,
        },
        VramDemand {
            name: "cpu".into(),
            device: 0,
            vram: 0,
        },
    ];
    let gpus = [(0, H100_TOTAL), (1, H100_TOTAL)];
    let v = validate_vram(&demands, &gpus, 0.10);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].device, 0);
    assert_eq!(v[0].required, 70 * GIB);
    assert_eq!(v[0].usable, (H100_TOTAL as f64 * 0.9) as u64);
    assert!(v[0].fits, "70 GiB <= 71.7 GiB");
    assert_eq!(v[0].instances, ["a", "b"]);
    let tight = validate_vram(&demands, &gpus, 0.15);
    assert!(!tight[0].fits, "70 GiB > 67.7 GiB");
    assert!(tight[1].fits);
    // A device that does not exist never fits.
    let missing = validate_vram(&demands, &[(0, H100_TOTAL)], 0.10);
    assert_eq!(missing[1].total, None);
    assert!(!missing[1].fits);
}

#[test]
fn release_is_verified_by_the_pids_leaving_the_gpu() {
    let before = h100(5 * GIB, &[(100, 4 * GIB), (300, GIB)]);
    assert!(!released(&[100], &before));
    let after = h100(GIB, &[(300, GIB)]);
    assert!(released(&[100], &after));
    assert!(released(&[], &before), "nothing to wait for");
}
