//! Pure decisions over observed data. Nothing in here does I/O.

pub mod eligibility;
pub mod provision;
pub mod recycle;
pub mod selector;

pub use eligibility::{evaluate, Decision, NodeFacts, PendingReason, Reason, Verdict};
pub use provision::{plan, Action, PlanInput, Subject};
pub use selector::{Classes, CompiledClass};
