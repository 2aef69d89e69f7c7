//! Layer 1: global validation of a whole mode before anything starts, and its report.
//!
//! PASS only if every instance fits the per-instance cap, the sum of reservations fits the
//! usable memory, and the sum fits what is available right now. A negative margin can never
//! pass: the predecessor printed "PASSED" with a margin of -3.45 GB.
//!
//! With on-demand instances ([swap]) the sums are over the always-loaded instances (what
//! starts with the mode); each on-demand instance must fit beside them on its own
//! ([`on_demand_plan`]), and the report says which of them can be loaded at the same time. Their
//! sum may exceed the budget: the daemon evicts by the ledger to load one.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::estimate::{EstimateRule, Origin, required};
use crate::grammar::Size;
use crate::priority::lowest_priority_first;
use crate::swap::{LoadMode, OnDemandPlan, on_demand_plan};

/// A memory reading, taken by the caller (crates/host) and passed in as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostMemory {
    pub total: u64,
    pub available: u64,
}

impl HostMemory {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    /// Percent of total memory in use (0 when total is 0).
    pub fn usage_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used() as f64 * 100.0 / self.total as f64
        }
    }
}

/// The `[budget]` keys that layer 1 uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPolicy {
    pub safety_margin: f64,
    pub per_instance_max: f64,
    pub total: Option<Size>,
    pub rule: EstimateRule,
    pub source: crate::estimate::EstimateSource,
}

impl BudgetPolicy {
    /// `MemTotal x (1 - safety_margin)`, or exactly `budget.total` when set.
    pub fn usable(&self, host_total: u64) -> u64 {
        match self.total {
            Some(t) => t.bytes(),
            None => (host_total as f64 * (1.0 - self.safety_margin)).floor() as u64,
        }
    }

    pub fn per_instance_cap(&self, usable: u64) -> u64 {
        (usable as f64 * self.per_instance_max).floor() as u64
    }
}

/// One instance of the mode, as layer 1 sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedInstance {
    pub name: String,
    /// The model path as shown to the user.
    pub model: String,
    pub file_size: u64,
    pub ram_limit: Option<Size>,
    pub priority: i64,
    /// The GGUF-aware estimate at the instance's ctx and mmap; None when the header could not
    /// be read (the file rule is used then).
    pub gguf: Option<u64>,
    /// p95 of the observed peaks x 1.1, when earlier runs of this model+ctx+mmap were recorded.
    pub learned: Option<u64>,
    /// `load =`: an on-demand instance does not start with the mode.
    pub load: LoadMode,
}

impl PlannedInstance {
    /// The estimate under `policy` and the rule it came from (`file`, `gguf`, `max`, or
    /// `learned` when observations raised it).
    pub fn estimate(&self, policy: &BudgetPolicy) -> (u64, Origin) {
        use crate::estimate::EstimateSource as S;
        let file = policy.rule.estimate(self.file_size);
        let (base, source) = match (policy.source, self.gguf) {
            (S::File, _) | (_, None) => (file, Origin::File),
            (S::Gguf, Some(g)) => (g, Origin::Gguf),
            (S::Max, Some(g)) if g >= file => (g, Origin::Gguf),
            (S::Max, Some(_)) => (file, Origin::File),
        };
        match self.learned {
            Some(l) if l > base => (l, Origin::Learned),
            _ => (base, source),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostSummary {
    pub total: u64,
    pub used: u64,
    pub available: u64,
    pub usage_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRow {
    pub path: String,
    pub file_size: u64,
    pub estimate: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceRow {
    pub name: String,
    pub model: String,
    pub priority: i64,
    pub ram_limit: Option<u64>,
    pub estimate: u64,
    pub required: u64,
    /// Both rules side by side, and what the estimate came from.
    pub file_rule: u64,
    pub gguf: Option<u64>,
    pub learned: Option<u64>,
    pub estimate_source: Origin,
    /// `always` (counted in the mode's total) or `on-demand` (each must fit beside them).
    pub load: LoadMode,
}

/// Where `usable` came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum UsableSource {
    /// `MemTotal x (1 - safety_margin)`.
    MemTotal { safety_margin: f64 },
    /// `[budget] total`, used as is.
    BudgetTotal,
}

/// The layer-1 verdict with everything needed to act on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationReport {
    pub mode: String,
    pub passed: bool,
    pub host: HostSummary,
    pub usable: u64,
    pub usable_source: UsableSource,
    pub per_instance_max: f64,
    pub per_instance_cap: u64,
    pub models: Vec<ModelRow>,
    pub instances: Vec<InstanceRow>,
    /// The always-loaded instances' reservations together (every instance's without on-demand
    /// ones).
    pub total_required: u64,
    /// `usable - total_required`; negative means the mode does not fit.
    pub margin: i128,
    /// `available - total_required`; negative means memory must be freed first.
    pub available_margin: i128,
    pub issues: Vec<String>,
    pub recommendations: Vec<String>,
    /// VRAM per GPU for instances with `gpu_layers > 0` ([`ValidationReport::apply_vram`]).
    pub gpus: Vec<crate::gpu::DeviceVerdict>,
    /// With on-demand instances: the room beside the always-loaded ones, which on-demand
    /// instances can be loaded at the same time, and those that never fit. Absent without any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<OnDemandPlan>,
}

impl ValidationReport {
    /// Adds the VRAM check of the GPUs the mode's instances use: a device that does not hold
    /// its instances' reservations fails the report like RAM does.
    pub fn apply_vram(&mut self, verdicts: Vec<crate::gpu::DeviceVerdict>) {
        for v in verdicts.iter().filter(|v| !v.fits) {
            let names = v.instances.join(", ");
            match v.total {
                None => {
                    self.issues.push(format!(
                        "GPU {} does not exist, but {names} offload layers to it",
                        v.device
                    ));
                    self.recommendations.push(format!(
                        "set gpu_device of {names} to an existing GPU (nvidia-smi -L), or gpu_layers = 0 to run on the CPU"
                    ));
                }
                Some(total) => {
                    self.issues.push(format!(
                        "GPU {}: the VRAM reservations of {names} ({}) exceed its usable VRAM ({} of {}) by {}",
                        v.device,
                        Size(v.required),
                        Size(v.usable),
                        Size(total),
                        Size(v.required - v.usable)
                    ));
                    self.recommendations.push(format!(
                        "lower gpu_layers or ctx of {names} on GPU {} by at least {} of VRAM, or move one to another GPU (gpu_device)",
                        v.device,
                        Size(v.required - v.usable)
                    ));
                }
            }
        }
        self.passed = self.passed && verdicts.iter().all(|v| v.fits);
        self.gpus = verdicts;
    }
}

/// Runs layer 1 over a mode's instances.
pub fn validate(
    mode: &str,
    policy: &BudgetPolicy,
    host: HostMemory,
    planned: &[PlannedInstance],
) -> ValidationReport {
    let usable = policy.usable(host.total);
    let cap = policy.per_instance_cap(usable);
    let (instances, models) = rows(policy, planned);
    let always: Vec<&InstanceRow> = instances
        .iter()
        .filter(|i| i.load == LoadMode::Always)
        .collect();
    // Summed in u128: reservations that add up past u64 fail below, never wrap to a small total.
    let sum: u128 = always.iter().map(|i| u128::from(i.required)).sum();
    let total_required = u64::try_from(sum).unwrap_or(u64::MAX);
    let margin = i128::from(usable) - sum as i128;
    let available_margin = i128::from(host.available) - sum as i128;
    let totals = Totals {
        usable,
        cap,
        total_required,
        margin,
        available_margin,
    };
    let on_demand = instances
        .iter()
        .any(|i| i.load == LoadMode::OnDemand)
        .then(|| {
            let pairs = |load: LoadMode| -> Vec<(&str, u64)> {
                instances
                    .iter()
                    .filter(|i| i.load == load)
                    .map(|i| (i.name.as_str(), i.required))
                    .collect()
            };
            on_demand_plan(&pairs(LoadMode::Always), &pairs(LoadMode::OnDemand), usable)
        });
    let (mut issues, mut recommendations) = findings(policy, host, &instances, &totals);
    if let Some(plan) = on_demand.as_ref().filter(|_| margin >= 0) {
        never_fit(policy, &instances, plan, &mut issues, &mut recommendations);
    }
    if sum > u128::from(u64::MAX) {
        issues.insert(
            0,
            format!(
                "the reservations add up to more than 16 EiB ({sum} bytes), more than any machine has: lower the ram_limit of {}",
                always
                    .iter()
                    .filter(|i| i.required > i.estimate)
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    ValidationReport {
        mode: mode.to_owned(),
        passed: issues.is_empty(),
        host: HostSummary {
            total: host.total,
            used: host.used(),
            available: host.available,
            usage_percent: host.usage_percent(),
        },
        usable,
        usable_source: match policy.total {
            Some(_) => UsableSource::BudgetTotal,
            None => UsableSource::MemTotal {
                safety_margin: policy.safety_margin,
            },
        },
        per_instance_max: policy.per_instance_max,
        per_instance_cap: cap,
        models,
        instances,
        total_required,
        margin,
        available_margin,
        issues,
        recommendations,
        gpus: Vec::new(),
        on_demand,
    }
}

/// The on-demand instances that cannot load even beside the always-loaded ones alone: each is
/// an issue, with the fixes (a smaller reservation, a larger budget, fewer always-loaded
/// instances).
fn never_fit(
    policy: &BudgetPolicy,
    instances: &[InstanceRow],
    plan: &OnDemandPlan,
    issues: &mut Vec<String>,
    recommendations: &mut Vec<String>,
) {
    let always: Vec<&str> = instances
        .iter()
        .filter(|i| i.load == LoadMode::Always)
        .map(|i| i.name.as_str())
        .collect();
    for i in instances
        .iter()
        .filter(|i| plan.never_fit.contains(&i.name))
    {
        let beside = if always.is_empty() {
            String::new()
        } else {
            format!(
                " beside the always-loaded instances ({})",
                Size(plan.always)
            )
        };
        issues.push(format!(
            "on-demand instance {} requires {}, but only {} of the usable {} is left{beside}: it could never be loaded",
            i.name,
            Size(i.required),
            Size(plan.room),
            Size(plan.always.saturating_add(plan.room)),
        ));
        let shrink = if i.estimate <= plan.room {
            format!(
                "lower instances.{}.ram_limit from {} to at most {}",
                i.name,
                Size(i.required),
                Size(plan.room)
            )
        } else {
            format!(
                "lower instances.{}'s ctx or use a smaller model (it needs {}, at most {} fits)",
                i.name,
                Size(i.estimate),
                Size(plan.room)
            )
        };
        let need = plan.always.saturating_add(i.required);
        let grow = match policy.total {
            Some(_) => format!("raise [budget] total to at least {}", Size(need)),
            None => format!(
                "run on a machine with at least {} of memory",
                Size((need as f64 / (1.0 - policy.safety_margin)).ceil() as u64)
            ),
        };
        let fewer = if always.is_empty() {
            String::new()
        } else {
            format!(
                ", or load fewer instances always (load = \"on-demand\" on some of {})",
                always.join(", ")
            )
        };
        recommendations.push(format!("{shrink}, {grow}{fewer}"));
    }
}

/// The mode's totals against its budget.
struct Totals {
    usable: u64,
    cap: u64,
    total_required: u64,
    margin: i128,
    available_margin: i128,
}

/// One row per instance (its estimate and reservation) and one per model file.
fn rows(policy: &BudgetPolicy, planned: &[PlannedInstance]) -> (Vec<InstanceRow>, Vec<ModelRow>) {
    let mut models = BTreeMap::new();
    let instances: Vec<InstanceRow> = planned
        .iter()
        .map(|p| {
            let (estimate, source) = p.estimate(policy);
            let file_rule = policy.rule.estimate(p.file_size);
            models.entry(p.model.clone()).or_insert(ModelRow {
                path: p.model.clone(),
                file_size: p.file_size,
                estimate: file_rule,
            });
            InstanceRow {
                name: p.name.clone(),
                model: p.model.clone(),
                priority: p.priority,
                ram_limit: p.ram_limit.map(Size::bytes),
                estimate,
                required: required(p.ram_limit, estimate),
                file_rule,
                gguf: p.gguf,
                learned: p.learned,
                estimate_source: source,
                load: p.load,
            }
        })
        .collect();
    (instances, models.into_values().collect())
}

/// What does not fit, and what would make it fit.
fn findings(
    policy: &BudgetPolicy,
    host: HostMemory,
    instances: &[InstanceRow],
    t: &Totals,
) -> (Vec<String>, Vec<String>) {
    let Totals {
        usable,
        cap,
        total_required,
        margin,
        available_margin,
    } = *t;
    let mut issues = Vec::new();
    let mut recommendations = Vec::new();
    for i in instances.iter().filter(|i| i.required > cap) {
        issues.push(format!(
            "instance {} requires {}, over the per-instance cap of {} ({}% of usable) by {}",
            i.name,
            Size(i.required),
            Size(cap),
            policy.per_instance_max * 100.0,
            Size(i.required - cap)
        ));
        recommendations.push(cap_recommendation(i, cap, policy));
    }
    // Only the always-loaded instances start with the mode and must fit together.
    let any_on_demand = instances.iter().any(|i| i.load == LoadMode::OnDemand);
    let the_mode = if any_on_demand {
        "the always-loaded instances require"
    } else {
        "the mode requires"
    };
    if margin < 0 {
        issues.push(format!(
            "{the_mode} {} in total, over the usable {} by {}",
            Size(total_required),
            Size(usable),
            Size(clamp64(margin.unsigned_abs()))
        ));
    }
    if available_margin < 0 {
        issues.push(format!(
            "{the_mode} {} but only {} is available now: short by {}",
            Size(total_required),
            Size(host.available),
            Size(clamp64(available_margin.unsigned_abs()))
        ));
    }
    recommendations.extend(cuts(policy, host, instances, t));
    (issues, recommendations)
}

/// The cuts that make the always-loaded instances fit the budget and the memory available now
/// (none when they fit).
fn cuts(
    policy: &BudgetPolicy,
    host: HostMemory,
    instances: &[InstanceRow],
    t: &Totals,
) -> Vec<String> {
    let Totals {
        cap,
        total_required,
        margin,
        available_margin,
        ..
    } = *t;
    let mut recommendations = Vec::new();
    // The totals as they would be after the cap recommendations are applied, so the cuts
    // below are not asked for twice.
    let capped: Vec<InstanceRow> = instances
        .iter()
        .filter(|i| i.load == LoadMode::Always)
        .map(|i| InstanceRow {
            required: if i.estimate <= cap {
                i.required.min(cap)
            } else {
                i.required
            },
            ..i.clone()
        })
        .collect();
    let capped_sum: u128 = capped.iter().map(|i| u128::from(i.required)).sum();
    let freed_by_caps = instances
        .iter()
        .filter(|i| i.load == LoadMode::Always)
        .map(|i| u128::from(i.required))
        .sum::<u128>()
        - capped_sum;
    let deficit = margin.min(available_margin) + freed_by_caps as i128;
    if deficit < 0 {
        let deficit = clamp64(deficit.unsigned_abs());
        recommendations.extend(reduction_plan(&capped, deficit));
        if available_margin < 0 {
            recommendations.push(format!(
                "or free at least {} of memory on this machine (other processes use {})",
                Size(clamp64(available_margin.unsigned_abs())),
                Size(host.used())
            ));
        }
        if margin < 0 {
            recommendations.push(match policy.total {
                Some(_) => format!(
                    "or raise [budget] total to at least {}",
                    Size(total_required)
                ),
                None => format!(
                    "or run on a machine with at least {} of memory (the mode's total / (1 - safety_margin {}))",
                    Size((total_required as f64 / (1.0 - policy.safety_margin)).ceil() as u64),
                    policy.safety_margin
                ),
            });
            if capped.len() > 1 {
                recommendations.push(
                    "or load some of them on demand (load = \"on-demand\"): only the always-loaded instances must fit together, each on-demand one beside them".to_owned(),
                );
            }
        }
    }
    recommendations
}

fn cap_recommendation(i: &InstanceRow, cap: u64, policy: &BudgetPolicy) -> String {
    if i.estimate <= cap {
        format!(
            "lower instances.{}.ram_limit from {} to at most {}",
            i.name,
            Size(i.required),
            Size(cap)
        )
    } else {
        if i.estimate_source != Origin::File {
            return format!(
                "instance {}'s model needs {} at its ctx ({} estimate): lower its ctx, use a smaller model, or raise [budget] per_instance_max (now {})",
                i.name,
                Size(i.estimate),
                i.estimate_source,
                policy.per_instance_max
            );
        }
        let largest_model = (cap as f64 / policy.rule.factor).floor() as u64;
        format!(
            "instance {}'s model alone needs {} (file size x {}): use a model of at most {}, or raise [budget] per_instance_max (now {})",
            i.name,
            Size(i.estimate),
            policy.rule.factor,
            Size(largest_model),
            policy.per_instance_max
        )
    }
}

/// Concrete cuts that cover `deficit`: first lower the ram_limits that sit above their estimate
/// (lowest priority first), then drop whole instances (lowest priority first).
fn reduction_plan(instances: &[InstanceRow], deficit: u64) -> Vec<String> {
    let mut order: Vec<&InstanceRow> = instances.iter().collect();
    order.sort_by(|a, b| lowest_priority_first((a.priority, &a.name), (b.priority, &b.name)));
    let mut out = Vec::new();
    let mut remaining = deficit;
    for i in &order {
        if remaining == 0 {
            break;
        }
        let slack = i.required - i.estimate;
        if slack == 0 {
            continue;
        }
        let cut = slack.min(remaining);
        remaining -= cut;
        out.push(format!(
            "lower instances.{}.ram_limit from {} to {} (frees {}; its model needs {})",
            i.name,
            Size(i.required),
            Size(i.required - cut),
            Size(cut),
            Size(i.estimate)
        ));
    }
    if remaining > 0 {
        let mut drops = Vec::new();
        let mut freed = 0;
        for i in &order {
            if freed >= remaining {
                break;
            }
            freed = i.estimate.saturating_add(freed);
            drops.push(format!("{} (frees {})", i.name, Size(i.estimate)));
        }
        let lead = if out.is_empty() { "" } else { "and " };
        out.push(format!(
            "{lead}remove instances from the mode, lowest priority first: {}; or use a smaller model",
            drops.join(", ")
        ));
    }
    out
}

/// A byte count past u64 shown as the largest (only reservations that already failed get there).
fn clamp64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn size(b: u64) -> String {
    Size(b).to_string()
}

fn signed(m: i128) -> String {
    let v = Size(clamp64(m.unsigned_abs()));
    if m < 0 {
        format!("-{v}")
    } else {
        v.to_string()
    }
}

impl ValidationReport {
    fn fmt_host_and_models(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = size;
        writeln!(f, "belljar memory budget: mode {:?}", self.mode)?;
        writeln!(f)?;
        writeln!(f, "Host memory")?;
        writeln!(f, "  total      {:>12}", s(self.host.total))?;
        writeln!(
            f,
            "  used       {:>12}  ({:.1}%)",
            s(self.host.used),
            self.host.usage_percent
        )?;
        writeln!(f, "  available  {:>12}", s(self.host.available))?;
        writeln!(f)?;
        writeln!(f, "Models")?;
        for m in &self.models {
            writeln!(
                f,
                "  {}  file {}, file rule {}",
                m.path,
                s(m.file_size),
                s(m.estimate)
            )?;
        }
        writeln!(f)
    }

    fn fmt_instances(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = size;
        writeln!(
            f,
            "  {:<16} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "instance", "prio", "ram_limit", "file rule", "gguf", "learned", "estimate", "required"
        )?;
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), s);
        for i in &self.instances {
            writeln!(
                f,
                "  {:<16} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  ({}{})",
                i.name,
                i.priority,
                opt(i.ram_limit),
                s(i.file_rule),
                opt(i.gguf),
                opt(i.learned),
                s(i.estimate),
                s(i.required),
                i.estimate_source,
                if i.load == LoadMode::OnDemand {
                    ", on demand"
                } else {
                    ""
                }
            )?;
        }
        writeln!(f)
    }

    fn fmt_budget(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = size;
        writeln!(f, "Budget")?;
        let source = match self.usable_source {
            UsableSource::MemTotal { safety_margin } => {
                format!("total x (1 - safety_margin {safety_margin})")
            }
            UsableSource::BudgetTotal => "[budget] total".to_owned(),
        };
        writeln!(f, "  usable            {:>12}  ({source})", s(self.usable))?;
        writeln!(
            f,
            "  per-instance cap  {:>12}  (per_instance_max {} x usable)",
            s(self.per_instance_cap),
            self.per_instance_max
        )?;
        let always = if self.on_demand.is_some() {
            "  (the always-loaded instances)"
        } else {
            ""
        };
        writeln!(
            f,
            "  total required    {:>12}{always}",
            s(self.total_required)
        )?;
        writeln!(
            f,
            "  margin            {:>12}  (usable - required)",
            signed(self.margin)
        )?;
        writeln!(
            f,
            "  available margin  {:>12}  (available - required)",
            signed(self.available_margin)
        )?;
        for g in &self.gpus {
            let total = g.total.map_or_else(|| "missing".to_owned(), s);
            writeln!(
                f,
                "  GPU {}            {:>12} required of {} usable ({total} total): {}",
                g.device,
                s(g.required),
                s(g.usable),
                if g.fits { "fits" } else { "DOES NOT FIT" }
            )?;
        }
        writeln!(f)
    }

    /// Which on-demand instances can be loaded together beside the always-loaded ones.
    fn fmt_on_demand(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(p) = &self.on_demand else {
            return Ok(());
        };
        let names: Vec<&str> = self
            .instances
            .iter()
            .filter(|i| i.load == LoadMode::OnDemand)
            .map(|i| i.name.as_str())
            .collect();
        writeln!(f, "On demand (loaded by a request, evicted to make room)")?;
        writeln!(
            f,
            "  room              {:>12}  (usable - the always-loaded instances)",
            size(p.room)
        )?;
        if p.any > 0 {
            writeln!(
                f,
                "  any {} of the {} on-demand instances fit together",
                p.any,
                names.len()
            )?;
        }
        if names.len() > crate::swap::MAX_LISTED {
            writeln!(
                f,
                "  (the sets that fit together are listed for up to {} on-demand instances)",
                crate::swap::MAX_LISTED
            )?;
        } else if !p.together.is_empty() {
            writeln!(f, "  loaded at the same time, at most:")?;
            for set in &p.together {
                writeln!(f, "    {}", set.join(" + "))?;
            }
        }
        if !p.never_fit.is_empty() {
            writeln!(f, "  never fits: {}", p.never_fit.join(", "))?;
        }
        writeln!(f)
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_host_and_models(f)?;
        self.fmt_instances(f)?;
        self.fmt_budget(f)?;
        self.fmt_on_demand(f)?;
        if self.passed && self.on_demand.is_some() {
            writeln!(
                f,
                "PASSED: the mode fits (the always-loaded instances together, each on-demand instance beside them)"
            )?;
        } else if self.passed {
            writeln!(f, "PASSED: the mode fits")?;
        } else {
            writeln!(f, "FAILED: the mode does not fit")?;
            writeln!(f, "Issues:")?;
            for (n, issue) in self.issues.iter().enumerate() {
                writeln!(f, "  {}. {issue}", n + 1)?;
            }
            writeln!(f, "Recommendations:")?;
            for r in &self.recommendations {
                writeln!(f, "  - {r}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn policy() -> BudgetPolicy {
        BudgetPolicy {
            safety_margin: 0.15,
            per_instance_max: 0.5,
            total: None,
            rule: EstimateRule {
                factor: 1.5,
                min_required: Size(64 * MIB),
            },
            source: crate::estimate::EstimateSource::File,
        }
    }

    fn inst(name: &str, file: u64, limit: Option<u64>, priority: i64) -> PlannedInstance {
        PlannedInstance {
            name: name.into(),
            model: "m.gguf".into(),
            file_size: file,
            ram_limit: limit.map(Size),
            priority,
            gguf: None,
            learned: None,
            load: LoadMode::Always,
        }
    }

    /// Two 8 EiB reservations add up past u64: the total must not wrap to 0 B and pass.
    #[test]
    fn totals_that_overflow_fail_instead_of_wrapping() {
        let p = BudgetPolicy {
            per_instance_max: 1.0,
            total: Some(Size(u64::MAX)),
            ..policy()
        };
        let host = HostMemory {
            total: u64::MAX,
            available: u64::MAX,
        };
        let eight_eib = 8u64 << 60;
        let r = validate(
            "m",
            &p,
            host,
            &[
                inst("a", MIB, Some(eight_eib), 0),
                inst("b", MIB, Some(eight_eib), 0),
            ],
        );
        assert!(!r.passed, "{r}");
        assert!(r.total_required >= eight_eib, "{r}");
        assert!(
            r.issues.iter().any(|i| i.contains("more than 16 EiB")),
            "{:?}",
            r.issues
        );
    }

    #[test]
    fn the_estimate_follows_the_source_and_learned_peaks_raise_it() {
        use crate::estimate::EstimateSource as S;
        let mut p = inst("a", GIB, None, 0);
        let with = |s: S| BudgetPolicy {
            source: s,
            ..policy()
        };
        assert_eq!(
            p.estimate(&with(S::Gguf)),
            (3 * GIB / 2, Origin::File),
            "no header: file rule"
        );
        p.gguf = Some(4 * GIB);
        assert_eq!(p.estimate(&with(S::File)), (3 * GIB / 2, Origin::File));
        assert_eq!(p.estimate(&with(S::Gguf)), (4 * GIB, Origin::Gguf));
        assert_eq!(p.estimate(&with(S::Max)), (4 * GIB, Origin::Gguf));
        p.gguf = Some(GIB + MIB);
        assert_eq!(p.estimate(&with(S::Gguf)), (GIB + MIB, Origin::Gguf));
        assert_eq!(
            p.estimate(&with(S::Max)),
            (3 * GIB / 2, Origin::File),
            "never below x1.5"
        );
        p.learned = Some(2 * GIB);
        assert_eq!(p.estimate(&with(S::Gguf)), (2 * GIB, Origin::Learned));
        p.learned = Some(GIB);
        assert_eq!(
            p.estimate(&with(S::Gguf)),
            (GIB + MIB, Origin::Gguf),
            "learned only raises"
        );
        let r = validate(
            "m",
            &with(S::Gguf),
            HostMemory {
                total: 64 * GIB,
                available: 60 * GIB,
            },
            &[p],
        );
        let row = &r.instances[0];
        assert_eq!(
            (row.file_rule, row.gguf, row.estimate_source.as_str()),
            (3 * GIB / 2, Some(GIB + MIB), "gguf")
        );
    }

    /// The predecessor's example: 31.24 GB machine, limits 8/10/12 GB. It printed PASSED with a
    /// margin of -3.45 GB; it must fail.
    #[test]
    fn the_seed_example_fails() {
        let host = HostMemory {
            total: (31.24 * GIB as f64) as u64,
            available: (22.74 * GIB as f64) as u64,
        };
        let model = (0.98 * GIB as f64) as u64;
        let r = validate(
            "matrix",
            &policy(),
            host,
            &[
                inst("subject", model, Some(8 * GIB), 0),
                inst("observer", model, Some(10 * GIB), 1),
                inst("god", model, Some(12 * GIB), 2),
            ],
        );
        assert!(!r.passed);
        assert!(r.margin < 0);
        assert_eq!(r.total_required, 30 * GIB);
        assert_eq!(r.models.len(), 1, "one model row per distinct file");
        assert!(r.issues.iter().any(|i| i.contains("over the usable")));
        assert!(r.issues.iter().any(|i| i.contains("available now")));
        // The lowest-priority instance is cut first.
        assert!(r.recommendations[0].starts_with("lower instances.subject.ram_limit"));
        assert!(
            r.recommendations
                .iter()
                .any(|i| i.contains("free at least"))
        );
        let text = r.to_string();
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("margin") && text.contains("-3."), "{text}");
    }

    #[test]
    fn fits_when_everything_fits() {
        let host = HostMemory {
            total: 24 * GIB,
            available: 23 * GIB,
        };
        let r = validate(
            "matrix",
            &policy(),
            host,
            &[
                inst("a", 20 * MIB, Some(256 * MIB), 0),
                inst("b", 20 * MIB, None, 0),
            ],
        );
        assert!(r.passed, "{r}");
        assert_eq!(r.instances[1].required, 64 * MIB, "floor applies");
        assert!(r.issues.is_empty() && r.recommendations.is_empty());
        assert!(r.to_string().contains("PASSED"));
    }

    #[test]
    fn per_instance_cap_names_the_instance() {
        let host = HostMemory {
            total: 16 * GIB,
            available: 16 * GIB,
        };
        // usable 13.6 GiB, cap 6.8 GiB.
        let r = validate("m", &policy(), host, &[inst("big", MIB, Some(8 * GIB), 0)]);
        assert!(!r.passed);
        assert!(
            r.issues[0].contains("instance big requires 8.0 GiB"),
            "{:?}",
            r.issues
        );
        assert!(
            r.recommendations[0]
                .contains("lower instances.big.ram_limit from 8.0 GiB to at most 6.8 GiB")
        );
        // A model that alone exceeds the cap gets a smaller-model recommendation.
        let r = validate("m", &policy(), host, &[inst("huge", 5 * GIB, None, 0)]);
        assert!(!r.passed);
        assert!(
            r.recommendations[0].contains("use a model of at most"),
            "{:?}",
            r.recommendations
        );
    }

    #[test]
    fn budget_total_is_used_without_margin() {
        let mut p = policy();
        p.total = Some(Size(GIB));
        let host = HostMemory {
            total: 64 * GIB,
            available: 64 * GIB,
        };
        let r = validate("m", &p, host, &[inst("a", MIB, Some(400 * MIB), 0)]);
        assert_eq!(r.usable, GIB);
        assert_eq!(r.per_instance_cap, GIB / 2);
        assert!(r.passed);
        let r = validate(
            "m",
            &p,
            host,
            &[
                inst("a", MIB, Some(400 * MIB), 0),
                inst("b", MIB, Some(400 * MIB), 0),
                inst("c", MIB, Some(400 * MIB), 0),
            ],
        );
        assert!(!r.passed);
        assert!(
            r.recommendations
                .iter()
                .any(|r| r.contains("raise [budget] total"))
        );
    }

    #[test]
    fn reductions_fall_back_to_removing_instances() {
        let host = HostMemory {
            total: GIB,
            available: GIB,
        };
        // usable ~870 MiB, cap ~435 MiB; three estimate-bound instances of 300 MiB each.
        let file = 200 * MIB;
        let r = validate(
            "m",
            &policy(),
            host,
            &[
                inst("hi", file, None, 9),
                inst("lo", file, None, -1),
                inst("mid", file, None, 3),
            ],
        );
        assert!(!r.passed);
        let rec = r.recommendations.join("\n");
        assert!(
            rec.contains("remove instances from the mode, lowest priority first: lo"),
            "{rec}"
        );
    }

    fn on_demand(name: &str, limit: u64) -> PlannedInstance {
        PlannedInstance {
            load: LoadMode::OnDemand,
            ..inst(name, MIB, Some(limit), 0)
        }
    }

    fn one_gib_total() -> BudgetPolicy {
        BudgetPolicy {
            total: Some(Size(GIB)),
            ..policy()
        }
    }

    const PLENTY: HostMemory = HostMemory {
        total: 64 * GIB,
        available: 64 * GIB,
    };

    /// Three on-demand instances of which any two fit beside the always-loaded one: the mode
    /// passes although all of them together exceed the budget, and the report lists the pairs.
    #[test]
    fn on_demand_instances_need_only_fit_each_beside_the_always_loaded_ones() {
        let planned = [
            inst("a", MIB, Some(200 * MIB), 0),
            on_demand("x", 350 * MIB),
            on_demand("y", 350 * MIB),
            on_demand("z", 350 * MIB),
        ];
        let r = validate("m", &one_gib_total(), PLENTY, &planned);
        assert!(r.passed, "{r}");
        assert_eq!(r.total_required, 200 * MIB, "only the always-loaded one");
        assert_eq!(r.margin, i128::from(824 * MIB));
        let p = r.on_demand.as_ref().unwrap();
        assert_eq!((p.always, p.room, p.any), (200 * MIB, 824 * MIB, 2));
        assert!(p.never_fit.is_empty());
        let pairs: Vec<Vec<&str>> = p
            .together
            .iter()
            .map(|s| s.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(pairs, vec![vec!["x", "y"], vec!["x", "z"], vec!["y", "z"]]);
        let text = r.to_string();
        for want in [
            "any 2 of the 3 on-demand instances fit together",
            "    x + y\n",
            "    x + z\n",
            "    y + z\n",
            "(file, on demand)",
            "PASSED: the mode fits (the always-loaded instances together",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["on_demand"]["any"], 2);
        assert_eq!(json["on_demand"]["together"][0][1], "y");
        assert_eq!(json["instances"][1]["load"], "on-demand");
        // Loaded always, the same four do not fit: the old rule still holds for them.
        let always: Vec<PlannedInstance> = planned
            .iter()
            .map(|p| PlannedInstance {
                load: LoadMode::Always,
                ..p.clone()
            })
            .collect();
        let r = validate("m", &one_gib_total(), PLENTY, &always);
        assert!(!r.passed);
        assert!(r.on_demand.is_none());
        assert!(
            r.recommendations
                .iter()
                .any(|r| r.contains("load some of them on demand")),
            "{:?}",
            r.recommendations
        );
        assert!(serde_json::to_value(&r).unwrap().get("on_demand").is_none());
    }

    #[test]
    fn an_on_demand_instance_that_can_never_fit_is_refused_with_the_fixes() {
        let p = BudgetPolicy {
            per_instance_max: 1.0,
            ..one_gib_total()
        };
        let r = validate(
            "m",
            &p,
            PLENTY,
            &[
                inst("a", MIB, Some(500 * MIB), 0),
                on_demand("big", 600 * MIB),
                on_demand("small", 100 * MIB),
            ],
        );
        assert!(!r.passed, "{r}");
        assert_eq!(r.on_demand.as_ref().unwrap().never_fit, vec!["big"]);
        assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
        assert!(
            r.issues[0].contains("on-demand instance big requires 600.0 MiB")
                && r.issues[0].contains("only 524.0 MiB")
                && r.issues[0].contains("could never be loaded"),
            "{:?}",
            r.issues
        );
        let rec = &r.recommendations[0];
        for want in [
            "lower instances.big.ram_limit from 600.0 MiB to at most 524.0 MiB",
            "raise [budget] total to at least 1.1 GiB",
            "load fewer instances always (load = \"on-demand\" on some of a)",
        ] {
            assert!(rec.contains(want), "{want:?} in {rec}");
        }
        let text = r.to_string();
        assert!(text.contains("never fits: big"), "{text}");
        assert!(text.contains("FAILED"), "{text}");
        // A model that alone needs more than the room: a smaller model or ctx, not a limit.
        let huge = PlannedInstance {
            load: LoadMode::OnDemand,
            ..inst("huge", 400 * MIB, None, 0)
        };
        let r = validate("m", &p, PLENTY, &[inst("a", MIB, Some(500 * MIB), 0), huge]);
        assert!(!r.passed);
        assert!(
            r.recommendations[0].contains("lower instances.huge's ctx or use a smaller model"),
            "{:?}",
            r.recommendations
        );
        // With no always-loaded instance there is nobody to load on demand instead.
        let r = validate("m", &p, PLENTY, &[on_demand("big", 2 * GIB)]);
        assert!(!r.passed);
        assert!(
            !r.issues.iter().any(|i| i.contains("beside")),
            "{:?}",
            r.issues
        );
        assert!(
            !r.recommendations.iter().any(|i| i.contains("load fewer")),
            "{:?}",
            r.recommendations
        );
    }

    proptest! {
        /// The verdict is exactly the three conditions, and a negative margin never passes.
        #[test]
        fn verdict_matches_definition(
            total in 1u64..(64 * GIB),
            avail_frac in 0.0f64..1.0,
            files in proptest::collection::vec((0u64..(4 * GIB), proptest::option::of(1u64..(8 * GIB)), any::<bool>()), 1..6),
        ) {
            let host = HostMemory { total, available: (total as f64 * avail_frac) as u64 };
            let planned: Vec<_> = files.iter().enumerate()
                .map(|(n, (f, l, od))| PlannedInstance {
                    load: if *od { LoadMode::OnDemand } else { LoadMode::Always },
                    ..inst(&format!("i{n}"), *f, *l, 0)
                }).collect();
            let p = policy();
            let r = validate("m", &p, host, &planned);
            let usable = p.usable(total);
            let cap = p.per_instance_cap(usable);
            let always: u64 = r.instances.iter()
                .filter(|i| i.load == LoadMode::Always).map(|i| i.required).sum();
            prop_assert_eq!(r.total_required, always);
            let expected = r.instances.iter().all(|i| i.required <= cap)
                && always <= usable
                && always <= host.available
                && r.instances.iter()
                    .filter(|i| i.load == LoadMode::OnDemand)
                    .all(|i| always + i.required <= usable);
            prop_assert_eq!(r.passed, expected);
            if r.margin < 0 { prop_assert!(!r.passed); }
            prop_assert_eq!(r.passed, r.recommendations.is_empty());
        }
    }
}
