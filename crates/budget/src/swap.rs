//! More models than fit ([swap], groundwork): which loaded instances give way to a model that
//! must load, chosen from the ledger's exact allocations, and which on-demand instances can be
//! loaded together beside the always-loaded ones (layer 1). Pure: the daemon supplies the
//! allocations and the clock, and carries out the choice.

use std::cmp::Ordering;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `load =`: whether an instance runs from the start of its mode (`always`) or only while
/// requests want it (`on-demand`: loaded by its first request, unloaded when idle or evicted to
/// make room for another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadMode {
    #[default]
    Always,
    OnDemand,
}

impl LoadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadMode::Always => "always",
            LoadMode::OnDemand => "on-demand",
        }
    }

    /// The word of the config and the CLI; the error names the accepted words and what each
    /// means.
    pub fn parse(v: &str) -> Result<LoadMode, String> {
        match v {
            "always" => Ok(LoadMode::Always),
            "on-demand" => Ok(LoadMode::OnDemand),
            other => Err(format!(
                "{other:?} is not a load mode: use \"always\" (loaded from the start) or \"on-demand\" (loaded by its first request, unloaded when idle)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for LoadMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LoadMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"always\" or \"on-demand\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LoadMode, E> {
                LoadMode::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// `idle_unload =`: how long an on-demand instance stays loaded with nothing to do, or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdleUnload {
    Never,
    After(Duration),
}

impl IdleUnload {
    /// The built-in default: 10 minutes.
    pub const DEFAULT: IdleUnload = IdleUnload::After(Duration::from_secs(600));

    pub fn after(self) -> Option<Duration> {
        match self {
            IdleUnload::Never => None,
            IdleUnload::After(d) => Some(d),
        }
    }
}

impl fmt::Display for IdleUnload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdleUnload::Never => f.write_str("never"),
            IdleUnload::After(d) => write!(f, "{}", crate::HumanDuration(*d)),
        }
    }
}

impl Serialize for IdleUnload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdleUnload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IdleUnload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"never\" or a duration string like \"10min\" or \"30s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IdleUnload, E> {
                if v.trim() == "never" {
                    return Ok(IdleUnload::Never);
                }
                let d = crate::HumanDuration::parse(v).map_err(|e| {
                    E::custom(format!("{e}; or \"never\" to keep it loaded while idle"))
                })?;
                if d.0.is_zero() {
                    return Err(E::custom(
                        "\"0s\" would unload it between requests: give a duration above zero, or \"never\"",
                    ));
                }
                Ok(IdleUnload::After(d.0))
            }
        }
        d.deserialize_str(V)
    }
}

/// One loaded instance as eviction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded<'a> {
    pub name: &'a str,
    pub priority: i64,
    /// When it last served a request (ms on the supervisor's monotonic clock); `None`: never.
    pub last_used_ms: Option<u64>,
    /// When its current load finished (ms, same clock).
    pub loaded_at_ms: u64,
    /// Its ledger allocation: what its eviction frees.
    pub allocated: u64,
    /// Only on-demand instances are ever evicted.
    pub on_demand: bool,
    pub pinned: bool,
    /// Generating, or holding requests it has accepted. A just-loaded instance is busy until
    /// the request that triggered its load has been dispatched.
    pub busy: bool,
    /// `min_loaded`: no eviction sooner than this after a load (ms).
    pub min_loaded_ms: u64,
}

/// The one order in which instances give way, for eviction and for shedding under pressure:
/// lowest priority first, then least recently used (never used first), then name.
pub fn give_way_first(a: (i64, Option<u64>, &str), b: (i64, Option<u64>, &str)) -> Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.cmp(&b.1))
        .then_with(|| a.2.cmp(b.2))
}

/// What making room for `need` bytes takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room<'a> {
    /// It fits as things are.
    Fits,
    /// Evict these, in this order: together they free enough.
    Evict(Vec<&'a str>),
    /// Not now: only instances that are busy or were loaded less than `min_loaded` ago could
    /// make room. Ask again when one of them becomes evictable (the earliest `min_loaded` end
    /// is given when that is what waits).
    Wait { until_ms: Option<u64> },
    /// Never: evicting every on-demand, unpinned instance would not free enough.
    Never,
}

impl Loaded<'_> {
    fn key(&self) -> (i64, Option<u64>, &str) {
        (self.priority, self.last_used_ms, self.name)
    }

    fn may_ever_go(&self) -> bool {
        self.on_demand && !self.pinned
    }

    fn may_go_now(&self, now_ms: u64) -> bool {
        self.may_ever_go()
            && !self.busy
            && now_ms.saturating_sub(self.loaded_at_ms) >= self.min_loaded_ms
    }
}

/// The victims that make room for `need` bytes when `free` bytes of the budget are free: the
/// evictable instances in [`give_way_first`] order, as few as that order allows (it stops as
/// soon as enough is freed).
pub fn make_room<'a>(need: u64, free: u64, loaded: &[Loaded<'a>], now_ms: u64) -> Room<'a> {
    if need <= free {
        return Room::Fits;
    }
    let short = need - free;
    let mut order: Vec<&Loaded<'a>> = loaded.iter().filter(|l| l.may_ever_go()).collect();
    order.sort_by(|a, b| give_way_first(a.key(), b.key()));
    let mut freed = 0u64;
    let mut victims = Vec::new();
    for l in order.iter().filter(|l| l.may_go_now(now_ms)) {
        victims.push(l.name);
        freed = freed.saturating_add(l.allocated);
        if freed >= short {
            return Room::Evict(victims);
        }
    }
    let could = order
        .iter()
        .fold(0u64, |sum, l| sum.saturating_add(l.allocated));
    if could < short {
        return Room::Never;
    }
    // Only the busy or the recently loaded stand between: the earliest of the latter to become
    // evictable (a busy one is woken by its own completion instead).
    let until_ms = order
        .iter()
        .filter(|l| !l.busy && !l.may_go_now(now_ms))
        .map(|l| l.loaded_at_ms.saturating_add(l.min_loaded_ms))
        .min();
    Room::Wait { until_ms }
}

/// Whether an idle on-demand instance is due to be unloaded (`idle_unload`; `None`: never). A
/// pinned one stays loaded.
pub fn idle_due(l: &Loaded<'_>, idle_unload_ms: Option<u64>, now_ms: u64) -> bool {
    let Some(idle) = idle_unload_ms else {
        return false;
    };
    let since = l.last_used_ms.unwrap_or(l.loaded_at_ms).max(l.loaded_at_ms);
    l.on_demand && !l.pinned && !l.busy && now_ms.saturating_sub(since) >= idle
}

/// Layer 1 for a mode with on-demand instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnDemandPlan {
    /// The always-loaded instances' reservations together.
    pub always: u64,
    /// What is left of the usable memory beside them (0 when they do not fit).
    pub room: u64,
    /// On-demand instances that cannot load even beside the always-loaded ones alone.
    pub never_fit: Vec<String>,
    /// The largest k such that any k of the on-demand instances fit together.
    pub any: usize,
    /// The maximal sets of on-demand instances that fit together (each sorted by name; the sets
    /// by size, largest first, then by names). Listed for up to [`MAX_LISTED`] instances.
    pub together: Vec<Vec<String>>,
}

/// Beyond this many on-demand instances the maximal sets are not listed (2^n subsets).
pub const MAX_LISTED: usize = 12;

impl OnDemandPlan {
    /// Whether the mode can run: the always-loaded instances fit, and so does each on-demand
    /// one beside them.
    pub fn fits(&self, usable: u64) -> bool {
        self.always <= usable && self.never_fit.is_empty()
    }
}

/// Which on-demand instances can be loaded together beside the always-loaded ones, within
/// `usable` bytes (the reservations are each instance's `required`).
pub fn on_demand_plan(
    always: &[(&str, u64)],
    on_demand: &[(&str, u64)],
    usable: u64,
) -> OnDemandPlan {
    let total_always = always.iter().fold(0u64, |s, (_, r)| s.saturating_add(*r));
    let room = usable.saturating_sub(total_always);
    let mut never_fit: Vec<String> = on_demand
        .iter()
        .filter(|(_, r)| *r > room)
        .map(|(n, _)| (*n).to_owned())
        .collect();
    never_fit.sort();
    let mut largest: Vec<u64> = on_demand.iter().map(|(_, r)| *r).collect();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let mut any = 0;
    let mut sum = 0u64;
    for r in &largest {
        sum = sum.saturating_add(*r);
        if sum > room {
            break;
        }
        any += 1;
    }
    let mut together = Vec::new();
    if on_demand.len() <= MAX_LISTED {
        let n = on_demand.len();
        let fits = |mask: usize| {
            (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .fold(0u64, |s, i| s.saturating_add(on_demand[i].1))
                <= room
        };
        for mask in 1..(1usize << n) {
            // Maximal: it fits, and adding any one more does not.
            if fits(mask) && (0..n).all(|i| mask & (1 << i) != 0 || !fits(mask | (1 << i))) {
                let mut set: Vec<String> = (0..n)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| on_demand[i].0.to_owned())
                    .collect();
                set.sort();
                together.push(set);
            }
        }
        together.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }
    OnDemandPlan {
        always: total_always,
        room,
        never_fit,
        any,
        together,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn inst(name: &str, allocated_mib: u64, last_used_ms: Option<u64>) -> Loaded<'_> {
        Loaded {
            name,
            priority: 0,
            last_used_ms,
            loaded_at_ms: 0,
            allocated: allocated_mib * MIB,
            on_demand: true,
            pinned: false,
            busy: false,
            min_loaded_ms: 30_000,
        }
    }

    #[test]
    fn the_order_is_priority_then_least_recently_used_then_name() {
        let mut v = vec![
            (1, Some(5), "a"),
            (0, Some(9), "b"),
            (0, Some(2), "c"),
            (0, None, "d"),
            (0, Some(2), "a"),
        ];
        v.sort_by(|a, b| give_way_first(*a, *b));
        assert_eq!(
            v,
            vec![
                (0, None, "d"),
                (0, Some(2), "a"),
                (0, Some(2), "c"),
                (0, Some(9), "b"),
                (1, Some(5), "a"),
            ]
        );
    }

    #[test]
    fn it_evicts_as_few_as_the_order_allows() {
        let loaded = [
            inst("old", 100, Some(1_000)),
            inst("new", 300, Some(50_000)),
            inst("mid", 200, Some(20_000)),
        ];
        let now = 60_000;
        assert_eq!(make_room(50 * MIB, 60 * MIB, &loaded, now), Room::Fits);
        assert_eq!(
            make_room(150 * MIB, 60 * MIB, &loaded, now),
            Room::Evict(vec!["old"]),
            "least recently used first"
        );
        assert_eq!(
            make_room(300 * MIB, 60 * MIB, &loaded, now),
            Room::Evict(vec!["old", "mid"])
        );
        assert_eq!(make_room(700 * MIB, 60 * MIB, &loaded, now), Room::Never);
    }

    #[test]
    fn always_loaded_pinned_busy_and_fresh_instances_are_not_victims() {
        let now = 60_000;
        let always = Loaded {
            on_demand: false,
            ..inst("always", 500, None)
        };
        let pinned = Loaded {
            pinned: true,
            ..inst("pinned", 500, None)
        };
        assert_eq!(make_room(100 * MIB, 0, &[always, pinned], now), Room::Never);
        let busy = Loaded {
            busy: true,
            ..inst("busy", 500, None)
        };
        assert_eq!(
            make_room(100 * MIB, 0, &[busy], now),
            Room::Wait { until_ms: None },
            "a busy one is waited for, never evicted"
        );
        let fresh = Loaded {
            loaded_at_ms: 50_000,
            ..inst("fresh", 500, None)
        };
        assert_eq!(
            make_room(100 * MIB, 0, &[fresh], now),
            Room::Wait {
                until_ms: Some(80_000)
            },
            "min_loaded: not before 30 s after its load"
        );
        assert_eq!(
            make_room(100 * MIB, 0, &[fresh], 80_000),
            Room::Evict(vec!["fresh"])
        );
        // An evictable one that suffices goes even when a busy one sorts first.
        let idle = inst("idle", 200, Some(59_000));
        assert_eq!(
            make_room(100 * MIB, 0, &[busy, idle], now),
            Room::Evict(vec!["idle"])
        );
    }

    #[test]
    fn idle_unload_counts_from_the_last_use_or_the_load() {
        let mut l = inst("m", 100, None);
        l.loaded_at_ms = 1_000;
        assert!(!idle_due(&l, Some(600_000), 600_000));
        assert!(idle_due(&l, Some(600_000), 601_000));
        l.last_used_ms = Some(300_000);
        assert!(!idle_due(&l, Some(600_000), 601_000));
        assert!(idle_due(&l, Some(600_000), 900_000));
        assert!(!idle_due(&l, None, u64::MAX), "\"never\"");
        l.busy = true;
        assert!(!idle_due(&l, Some(600_000), 900_000));
        let always = Loaded {
            on_demand: false,
            ..inst("a", 100, None)
        };
        assert!(!idle_due(&always, Some(1), 900_000));
        let pinned = Loaded {
            pinned: true,
            ..inst("p", 100, None)
        };
        assert!(!idle_due(&pinned, Some(1), 900_000));
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the instances: a victim is always an on-demand, unpinned, idle instance
        /// past its `min_loaded`; the victims free enough; "never" only when every evictable
        /// byte would not suffice.
        #[test]
        fn victims_are_eligible_and_enough(
            specs in proptest::collection::vec(
                (0u64..500, -2i64..3, proptest::option::of(0u64..100_000), 0u64..100_000,
                 any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
            need in 0u64..3000, free in 0u64..1000, now in 0u64..200_000,
        ) {
            let names: Vec<String> = (0..specs.len()).map(|i| format!("i{i}")).collect();
            let loaded: Vec<Loaded<'_>> = specs.iter().zip(&names).map(|(s, n)| Loaded {
                name: n,
                allocated: s.0 * MIB,
                priority: s.1,
                last_used_ms: s.2,
                loaded_at_ms: s.3,
                on_demand: s.4,
                pinned: s.5,
                busy: s.6,
                min_loaded_ms: 30_000,
            }).collect();
            let (need, free) = (need * MIB, free * MIB);
            let by_name = |n: &str| loaded.iter().find(|l| l.name == n).unwrap();
            let evictable: u64 = loaded.iter().filter(|l| l.may_ever_go()).map(|l| l.allocated).sum();
            match make_room(need, free, &loaded, now) {
                Room::Fits => prop_assert!(need <= free),
                Room::Evict(v) => {
                    let freed: u64 = v.iter().map(|n| by_name(n).allocated).sum();
                    prop_assert!(free + freed >= need);
                    for n in &v {
                        prop_assert!(by_name(n).may_go_now(now), "{n} was not evictable");
                    }
                }
                Room::Wait { .. } => prop_assert!(need > free && evictable >= need - free),
                Room::Never => prop_assert!(need > free && evictable < need - free),
            }
        }
    }

    #[test]
    fn the_plan_says_which_on_demand_instances_load_together() {
        // 1000 usable, 400 always: 600 of room for three of 300, 250 and 200.
        let plan = on_demand_plan(
            &[("base", 400 * MIB)],
            &[("a", 300 * MIB), ("b", 250 * MIB), ("c", 200 * MIB)],
            1000 * MIB,
        );
        assert_eq!(plan.always, 400 * MIB);
        assert_eq!(plan.room, 600 * MIB);
        assert!(plan.never_fit.is_empty());
        assert!(plan.fits(1000 * MIB));
        assert_eq!(plan.any, 2, "any 2 fit: 300 + 250 <= 600; all 3 do not");
        assert_eq!(
            plan.together,
            vec![
                vec!["a".to_owned(), "b".to_owned()],
                vec!["a".to_owned(), "c".to_owned()],
                vec!["b".to_owned(), "c".to_owned()],
            ]
        );
        let tight = on_demand_plan(&[("base", 400 * MIB)], &[("big", 700 * MIB)], 1000 * MIB);
        assert_eq!(tight.never_fit, vec!["big".to_owned()]);
        assert!(!tight.fits(1000 * MIB));
        assert!(tight.together.is_empty());
        let none = on_demand_plan(&[("x", 2000 * MIB)], &[], 1000 * MIB);
        assert!(
            !none.fits(1000 * MIB),
            "the always-loaded ones must fit together"
        );
    }
}
