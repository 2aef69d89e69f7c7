//! `run --metrics ADDR`: Prometheus metrics over HTTP (hyper), encoded by `prometheus-client`
//! in the OpenMetrics text format that Prometheus scrapes.
//!
//! Every scrape asks the event loop for the same report `status --json` prints and renders it,
//! so the two never disagree and no second copy of the state is kept.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;

use belljar_protocol::control::{GpuStatus, InstanceStatus, StatusReport};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::Event;

/// Every state an instance can be in, so that `belljar_instance_state` has one series per state
/// (1 for the current one) and `sum by (state)` works without gaps.
const STATES: [&str; 10] = [
    "starting",
    "loading",
    "ready",
    "backoff",
    "waiting-for-memory",
    "failed",
    "stopping",
    "stopped",
    "shed",
    "unloaded",
];
const LEVELS: [&str; 4] = ["normal", "warning", "critical", "emergency"];

/// How long a scrape waits for the event loop.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Slow or idle HTTP clients are dropped after this long.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabel {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    instance: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabel {
    instance: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLevelLabel {
    gpu: String,
    level: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An instance gauge: its name, help and value (None: not exported for this instance).
type InstanceGauge = (
    &'static str,
    &'static str,
    fn(&InstanceStatus) -> Option<u64>,
);

const INSTANCE_GAUGES: [InstanceGauge; 12] = [
    (
        "instance_memory_current_bytes",
        "Memory charged to the instance's cgroup now",
        |i| i.memory.current,
    ),
    (
        "instance_memory_limit_bytes",
        "The instance cgroup's hard limit (memory.max / limit_in_bytes)",
        |i| i.memory.limit,
    ),
    (
        "instance_memory_reservation_bytes",
        "The instance cgroup's protected reservation (memory.low / soft limit)",
        |i| i.memory.reservation,
    ),
    (
        "instance_memory_peak_bytes",
        "The current run's peak memory",
        |i| i.memory.peak,
    ),
    (
        "instance_allocated_bytes",
        "The budget ledger's allocation held by the instance (0 when none)",
        |i| Some(i.allocated),
    ),
    (
        "instance_thrashing",
        "1 while the instance's major-fault rate says its limit is too small",
        |i| Some(u64::from(i.thrashing)),
    ),
    (
        "instance_gpu_memory_bytes",
        "VRAM attributed to the instance's processes (NVML)",
        |i| i.gpu_memory,
    ),
    (
        "instance_cpu_fallback",
        "1 while an instance with gpu_layers runs on the CPU",
        |i| Some(u64::from(i.cpu_fallback)),
    ),
    (
        "instance_uptime_seconds",
        "Seconds since the current worker was spawned",
        |i| i.uptime_s,
    ),
    (
        "instance_last_used_timestamp_seconds",
        "When the instance last took or finished a request (Unix time)",
        |i| i.last_used_unix,
    ),
    (
        "instance_on_demand",
        "1 for an on-demand instance (load = \"on-demand\"), 0 for an always-loaded one",
        |i| Some(u64::from(i.load == "on-demand")),
    ),
    (
        "instance_pinned",
        "1 for a pinned instance (never evicted nor unloaded when idle)",
        |i| Some(u64::from(i.pinned)),
    ),
];

/// An instance counter (`_total` is appended): its name, help and value.
type InstanceCounter = (&'static str, &'static str, fn(&InstanceStatus) -> u64);

const INSTANCE_COUNTERS: [InstanceCounter; 4] = [
    (
        "instance_restarts",
        "Starts of the instance after its first",
        |i| i.restarts,
    ),
    (
        "instance_oom_kills",
        "OOM kills in the instance's cgroups",
        |i| i.oom_kills,
    ),
    (
        "instance_loads",
        "Loads on demand (by a request or `supervisor load`) since the supervisor started",
        |i| i.loads,
    ),
    (
        "instance_evictions",
        "Times the instance was unloaded to make room for another",
        |i| i.evictions,
    ),
];

/// Renders a status report as OpenMetrics text.
pub fn render(report: &StatusReport) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("belljar");
    register_instances(&mut reg, &report.instances);
    register_host(&mut reg, report);
    register_gpus(&mut reg, &report.gpus);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

fn register_instances(reg: &mut Registry, instances: &[InstanceStatus]) {
    for (name, help, value) in INSTANCE_GAUGES {
        let f = Family::<InstanceLabel, Gauge>::default();
        reg.register(name, help, f.clone());
        for i in instances {
            if let Some(v) = value(i) {
                let l = InstanceLabel {
                    instance: i.name.clone(),
                };
                f.get_or_create(&l).set(bytes(v));
            }
        }
    }
    let progress = Family::<InstanceLabel, FloatGauge>::default();
    reg.register(
        "instance_load_progress_ratio",
        "Model load progress, 0 to 1 (1 once ready)",
        progress.clone(),
    );
    let state = Family::<StateLabel, Gauge>::default();
    reg.register(
        "instance_state",
        "1 for the instance's current state, 0 for the others",
        state.clone(),
    );
    let last_exit = Family::<ExitLabel, Gauge>::default();
    reg.register(
        "instance_last_exit",
        "1, labelled with how the instance's last worker ended (status's last_exit)",
        last_exit.clone(),
    );
    for (name, help, value) in INSTANCE_COUNTERS {
        let f = Family::<InstanceLabel, Counter>::default();
        reg.register(name, help, f.clone());
        for i in instances {
            let l = InstanceLabel {
                instance: i.name.clone(),
            };
            f.get_or_create(&l).inc_by(value(i));
        }
    }
    let queued = Family::<InstanceLabel, Gauge>::default();
    reg.register(
        "instance_queued_requests",
        "Requests (HTTP and ask) waiting for the instance's worker, not counting the one it serves",
        queued.clone(),
    );
    for i in instances {
        let l = InstanceLabel {
            instance: i.name.clone(),
        };
        progress.get_or_create(&l).set(f64::from(i.load_progress));
        queued
            .get_or_create(&l)
            .set(i64::try_from(i.queued).unwrap_or(i64::MAX));
        for s in STATES {
            let labels = StateLabel {
                instance: i.name.clone(),
                state: s.to_owned(),
            };
            state.get_or_create(&labels).set(i64::from(i.state == s));
        }
        if let Some(reason) = &i.last_exit {
            let labels = ExitLabel {
                instance: i.name.clone(),
                reason: reason.clone(),
            };
            last_exit.get_or_create(&labels).set(1);
        }
    }
}

fn register_host(reg: &mut Registry, report: &StatusReport) {
    let host_total = Gauge::<i64>::default();
    reg.register(
        "host_memory_total_bytes",
        "Effective memory total (host or the tightest limited ancestor cgroup)",
        host_total.clone(),
    );
    host_total.set(bytes(report.host.total));
    let host_available = Gauge::<i64>::default();
    reg.register(
        "host_memory_available_bytes",
        "Effective memory available",
        host_available.clone(),
    );
    host_available.set(bytes(report.host.available));
    let level = Family::<LevelLabel, Gauge>::default();
    reg.register(
        "host_pressure_level",
        "1 for the pressure guard's current level, 0 for the others",
        level.clone(),
    );
    for l in LEVELS {
        level
            .get_or_create(&LevelLabel {
                level: l.to_owned(),
            })
            .set(i64::from(report.host.level == l));
    }
    if let Some(psi) = report.host.psi_some_avg10 {
        let g = FloatGauge::default();
        reg.register(
            "host_psi_memory_some_avg10",
            "Memory PSI: percent of the last 10 s in which some task stalled on memory",
            g.clone(),
        );
        g.set(f64::from(psi));
    }
    let usable = Gauge::<i64>::default();
    reg.register(
        "budget_usable_bytes",
        "The budget: total x (1 - safety_margin)",
        usable.clone(),
    );
    usable.set(bytes(report.budget.usable));
    let alloc = Gauge::<i64>::default();
    reg.register(
        "budget_allocated_bytes",
        "The sum of the instances' ledger allocations",
        alloc.clone(),
    );
    alloc.set(bytes(report.budget.allocated));
}

fn register_gpus(reg: &mut Registry, gpus: &[GpuStatus]) {
    let gpu_used = Family::<GpuLabel, Gauge>::default();
    reg.register(
        "gpu_memory_used_bytes",
        "GPU memory in use (NVML)",
        gpu_used.clone(),
    );
    let gpu_total = Family::<GpuLabel, Gauge>::default();
    reg.register(
        "gpu_memory_total_bytes",
        "GPU memory installed (NVML)",
        gpu_total.clone(),
    );
    let gpu_level = Family::<GpuLevelLabel, Gauge>::default();
    reg.register(
        "gpu_pressure_level",
        "1 for the GPU guard's current level of the GPU, 0 for the others",
        gpu_level.clone(),
    );
    for g in gpus {
        let l = GpuLabel {
            gpu: g.index.to_string(),
            name: g.name.clone(),
        };
        gpu_used.get_or_create(&l).set(bytes(g.used));
        gpu_total.get_or_create(&l).set(bytes(g.total));
        for lv in LEVELS {
            gpu_level
                .get_or_create(&GpuLevelLabel {
                    gpu: g.index.to_string(),
                    level: lv.to_owned(),
                })
                .set(i64::from(g.level == lv));
        }
    }
}

type Reply = hyper::Response<Full<Bytes>>;

fn reply(code: StatusCode, content_type: &str, body: String) -> Reply {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn scrape(events: &mpsc::UnboundedSender<Event>) -> Result<String, String> {
    let report = super::status_snapshot(events, SCRAPE_TIMEOUT).await?;
    render(&report).map_err(|e| e.to_string())
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Reply, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "belljar serves Prometheus metrics at /metrics\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "use GET\n".into(),
        ));
    }
    Ok(match scrape(&events).await {
        Ok(body) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
    })
}

/// At most this many metrics connections are served at once; further ones wait in the kernel's
/// listen queue (costing the supervisor no file descriptor) until one ends. A client that sends
/// no request is dropped after [`HEADER_TIMEOUT`].
pub const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves until the runtime stops; one task per connection, HTTP/1.1.
pub(super) async fn serve(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    let caps = super::listen::Caps {
        name: "metrics",
        connections: MAX_METRICS_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
        max_buf: None,
    };
    let service = hyper::service::service_fn(move |req| handle(req, events.clone()));
    super::listen::serve(listener, caps, service).await;
}

#[cfg(test)]
mod tests {
    use belljar_protocol::control::{
        BudgetStatus, GpuStatus, HostStatus, InstanceStatus, MemoryStatus, StatusReport,
    };

    #[test]
    fn renders_gpus_and_an_instances_vram_and_fallback() {
        let r = StatusReport {
            host: HostStatus {
                total: 100,
                available: 50,
                level: "warning".into(),
                psi_some_avg10: Some(1.5),
                source: "host".into(),
            },
            budget: BudgetStatus {
                usable: 90,
                allocated: 10,
            },
            instances: vec![InstanceStatus {
                name: "a".into(),
                state: "ready".into(),
                thrashing: false,
                reason: String::new(),
                pid: Some(1),
                restarts: 2,
                oom_kills: 1,
                last_exit: Some("oom-kill".into()),
                load_progress: 1.0,
                allocated: 10,
                estimate_source: "file".into(),
                memory: MemoryStatus {
                    current: Some(5),
                    limit: Some(10),
                    reservation: Some(8),
                    peak: Some(9),
                    last_peak: None,
                },
                uptime_s: Some(3),
                gpu_memory: Some(4 << 30),
                cpu_fallback: true,
                gpu_release: None,
                queued: 0,
                aliases: vec![],
                chat_template: None,
                last_used_unix: None,
                load: "always".into(),
                pinned: false,
                loads: 0,
                evictions: 0,
            }],
            metrics_addr: None,
            http_addr: None,
            gpus: vec![GpuStatus {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                used: 5 << 30,
                total: 80 << 30,
                level: "normal".into(),
            }],
            omitted: 0,
        };
        let text = super::render(&r).unwrap();
        for line in [
            "belljar_gpu_memory_used_bytes{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 5368709120",
            "belljar_gpu_memory_total_bytes{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 85899345920",
            "belljar_gpu_pressure_level{gpu=\"0\",level=\"normal\"} 1",
            "belljar_instance_gpu_memory_bytes{instance=\"a\"} 4294967296",
            "belljar_instance_cpu_fallback{instance=\"a\"} 1",
            "belljar_instance_restarts_total{instance=\"a\"} 2",
            "belljar_instance_last_exit{instance=\"a\",reason=\"oom-kill\"} 1",
            "belljar_host_pressure_level{level=\"warning\"} 1",
            "belljar_host_psi_memory_some_avg10 1.5",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    }

    /// Every lifecycle state has its series; the match breaks the build when a state is added
    /// without being listed here (and then in `STATES`).
    #[test]
    fn every_state_has_a_series() {
        use belljar_budget::lifecycle::State;
        let listed = |s: State| match s {
            State::Starting
            | State::Loading
            | State::Ready
            | State::Backoff
            | State::WaitingForMemory
            | State::Failed
            | State::Stopping
            | State::Stopped
            | State::Shed
            | State::Unloaded => s.as_str(),
        };
        let all = [
            State::Starting,
            State::Loading,
            State::Ready,
            State::Backoff,
            State::WaitingForMemory,
            State::Failed,
            State::Stopping,
            State::Stopped,
            State::Shed,
            State::Unloaded,
        ];
        let words: Vec<&str> = all.into_iter().map(listed).collect();
        assert_eq!(words, super::STATES);
    }

    #[test]
    fn renders_an_on_demand_instances_state_loads_and_evictions() {
        let inst =
            |name: &str, state: &str, load: &str, loads: u64, evictions: u64| InstanceStatus {
                name: name.into(),
                state: state.into(),
                thrashing: false,
                reason: String::new(),
                pid: None,
                restarts: 0,
                oom_kills: 0,
                last_exit: None,
                load_progress: 0.0,
                allocated: 0,
                estimate_source: "gguf".into(),
                memory: MemoryStatus {
                    current: None,
                    limit: None,
                    reservation: None,
                    peak: None,
                    last_peak: None,
                },
                uptime_s: None,
                gpu_memory: None,
                cpu_fallback: false,
                gpu_release: None,
                queued: 0,
                aliases: vec![],
                chat_template: None,
                last_used_unix: None,
                load: load.into(),
                pinned: name == "p",
                loads,
                evictions,
            };
        let r = StatusReport {
            host: HostStatus {
                total: 100,
                available: 50,
                level: "normal".into(),
                psi_some_avg10: None,
                source: "host".into(),
            },
            budget: BudgetStatus {
                usable: 90,
                allocated: 0,
            },
            instances: vec![
                inst("od", "unloaded", "on-demand", 3, 2),
                inst("p", "ready", "on-demand", 1, 0),
                inst("al", "ready", "always", 0, 0),
            ],
            metrics_addr: None,
            http_addr: None,
            gpus: vec![],
            omitted: 0,
        };
        let text = super::render(&r).unwrap();
        for line in [
            "belljar_instance_state{instance=\"od\",state=\"unloaded\"} 1",
            "belljar_instance_state{instance=\"od\",state=\"ready\"} 0",
            "belljar_instance_state{instance=\"al\",state=\"unloaded\"} 0",
            "belljar_instance_loads_total{instance=\"od\"} 3",
            "belljar_instance_evictions_total{instance=\"od\"} 2",
            "belljar_instance_loads_total{instance=\"al\"} 0",
            "belljar_instance_evictions_total{instance=\"p\"} 0",
            "belljar_instance_on_demand{instance=\"od\"} 1",
            "belljar_instance_on_demand{instance=\"al\"} 0",
            "belljar_instance_pinned{instance=\"p\"} 1",
            "belljar_instance_pinned{instance=\"od\"} 0",
            "# TYPE belljar_instance_loads counter",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
