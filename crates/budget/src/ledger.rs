//! Layer 2: the allocation ledger. Every running instance holds exactly one allocation; the
//! ledger's total is always the sum of its live allocations, and never exceeds its capacity.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::grammar::Size;

/// Why an allocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("instance {name} already holds an allocation of {}", Size(*.held))]
    AlreadyAllocated { name: String, held: u64 },
    #[error(
        "instance {name} needs {}, but only {} of the budget's {} is free ({} allocated to {others} other instance(s)); stop or shrink another instance, or raise the budget",
        Size(*.required), Size(*.free), Size(*.capacity), Size(*.allocated)
    )]
    OverBudget {
        name: String,
        required: u64,
        free: u64,
        capacity: u64,
        allocated: u64,
        others: usize,
    },
}

/// The budget's book of reservations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    capacity: u64,
    allocations: BTreeMap<String, u64>,
    allocated: u64,
}

/// One row of [`Ledger::report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllocationRow {
    pub name: String,
    pub bytes: u64,
}

/// The ledger at a point in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllocationReport {
    pub capacity: u64,
    pub allocated: u64,
    pub free: u64,
    pub allocations: Vec<AllocationRow>,
}

impl Ledger {
    pub fn new(capacity: u64) -> Ledger {
        Ledger {
            capacity,
            allocations: BTreeMap::new(),
            allocated: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    pub fn free(&self) -> u64 {
        self.capacity - self.allocated
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.allocations.get(name).copied()
    }

    /// Reserves `required` bytes for `name`, or says why not. Nothing changes on denial.
    pub fn allocate(&mut self, name: &str, required: u64) -> Result<(), Denied> {
        if let Some(&held) = self.allocations.get(name) {
            return Err(Denied::AlreadyAllocated {
                name: name.to_owned(),
                held,
            });
        }
        if required > self.free() {
            return Err(Denied::OverBudget {
                name: name.to_owned(),
                required,
                free: self.free(),
                capacity: self.capacity,
                allocated: self.allocated,
                others: self.allocations.len(),
            });
        }
        self.allocations.insert(name.to_owned(), required);
        self.allocated += required;
        Ok(())
    }

    /// Whether `name` could hold `required` bytes, counting what it holds now as free: the
    /// question the lifecycle asks before it reserves or grows. Changes nothing.
    pub fn check(&self, name: &str, required: u64) -> Result<(), Denied> {
        let own = self.get(name).unwrap_or(0);
        let allocated = self.allocated - own;
        let free = self.capacity - allocated;
        if required > free {
            let others = self.allocations.len() - usize::from(self.allocations.contains_key(name));
            return Err(Denied::OverBudget {
                name: name.to_owned(),
                required,
                free,
                capacity: self.capacity,
                allocated,
                others,
            });
        }
        Ok(())
    }

    /// Sets `name`'s allocation to `bytes` (an allocation or a resize), or says why not.
    /// Nothing changes on denial.
    pub fn set(&mut self, name: &str, bytes: u64) -> Result<(), Denied> {
        self.check(name, bytes)?;
        self.release(name);
        self.allocate(name, bytes)
    }

    /// Gives `name`'s allocation back; returns what it held.
    pub fn release(&mut self, name: &str) -> Option<u64> {
        let bytes = self.allocations.remove(name)?;
        self.allocated -= bytes;
        Some(bytes)
    }

    pub fn report(&self) -> AllocationReport {
        AllocationReport {
            capacity: self.capacity,
            allocated: self.allocated,
            free: self.free(),
            allocations: self
                .allocations
                .iter()
                .map(|(name, &bytes)| AllocationRow {
                    name: name.clone(),
                    bytes,
                })
                .collect(),
        }
    }
}

impl fmt::Display for AllocationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "allocated {} of {} ({} free)",
            Size(self.allocated),
            Size(self.capacity),
            Size(self.free)
        )?;
        for row in &self.allocations {
            writeln!(f, "  {:<20} {:>12}", row.name, Size(row.bytes).to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_release_and_deny() {
        let mut l = Ledger::new(100);
        l.allocate("a", 60).unwrap();
        assert_eq!(
            l.allocate("a", 1),
            Err(Denied::AlreadyAllocated {
                name: "a".into(),
                held: 60
            })
        );
        let e = l.allocate("b", 41).unwrap_err();
        assert!(matches!(e, Denied::OverBudget { free: 40, .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("only 40 B of the budget's 100 B is free"),
            "{e}"
        );
        l.allocate("b", 40).unwrap();
        assert_eq!(l.free(), 0);
        assert_eq!(l.release("a"), Some(60));
        assert_eq!(l.release("a"), None);
        assert_eq!(
            l.report().allocations,
            vec![AllocationRow {
                name: "b".into(),
                bytes: 40
            }]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u8, u64),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u64..400).prop_map(|(n, b)| Op::Alloc(n, b)),
            (0u8..6).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Against a plain map model: no instance is allocated twice, the total always equals
        /// the sum of live allocations, and capacity is never exceeded.
        #[test]
        fn ledger_matches_model(cap in 0u64..1000, ops in proptest::collection::vec(op(), 0..64)) {
            let mut l = Ledger::new(cap);
            let mut model: BTreeMap<String, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc(n, b) => {
                        let name = format!("i{n}");
                        let sum: u64 = model.values().sum();
                        let ok = !model.contains_key(&name) && sum + b <= cap;
                        prop_assert_eq!(l.allocate(&name, b).is_ok(), ok);
                        if ok { model.insert(name, b); }
                    }
                    Op::Release(n) => {
                        let name = format!("i{n}");
                        prop_assert_eq!(l.release(&name), model.remove(&name));
                    }
                }
                let sum: u64 = model.values().sum();
                prop_assert_eq!(l.allocated(), sum);
                prop_assert!(l.allocated() <= cap);
                let report = l.report();
                prop_assert_eq!(report.allocations.iter().map(|r| r.bytes).sum::<u64>(), sum);
            }
        }
    }
}
