//! Pure decisions over observed data. Nothing in here does I/O.

pub mod action;
pub mod eligibility;
pub mod provision;
pub mod pv;
pub mod recycle;
pub mod selector;

pub use action::{Action, PlanInput, Recycle, Subject, Target};
pub use eligibility::{evaluate, Decision, NodeFacts, Verdict};
pub use selector::{Classes, CompiledClass};

/// Everything to be done, given what was observed: the recycle plan (the
/// life of published volumes) first, then provisioning (format, mount,
/// publish, withdraw).
pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut actions = recycle::recycle_plan(input);
    actions.extend(provision::provision_plan(input));
    actions
}
