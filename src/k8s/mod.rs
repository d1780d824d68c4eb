//! Kubernetes: the PVs disklet publishes and the API calls it makes.

pub mod client;
pub mod pv;
pub mod throttle;
