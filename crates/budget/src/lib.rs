//! belljar's pure core: the size/duration/name grammar, the memory estimate, the three
//! validation layers, the ledger and the per-instance lifecycle (a sans-IO state machine). No
//! I/O and no clock: host readings and time come in as values, decisions go out as values.

#![deny(clippy::too_many_lines)]

pub mod adopt;
pub mod estimate;
pub mod gpu;
pub mod grammar;
pub mod ledger;
pub mod lifecycle;
pub mod limits;
pub mod precheck;
pub mod pressure;
pub mod priority;
pub mod queue;
pub mod ratelimit;
pub mod restart;
pub mod swap;
pub mod validate;

pub use estimate::{EstimateRule, required};
pub use grammar::{GrammarError, HumanDuration, InstanceName, Size};
pub use ledger::{AllocationReport, Denied, Ledger};
pub use precheck::{Precheck, precheck};
pub use priority::lowest_priority_first;
pub use validate::{BudgetPolicy, HostMemory, PlannedInstance, ValidationReport, validate};
