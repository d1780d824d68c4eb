//! Kubernetes: the API calls disklet makes.

pub mod client;
pub mod throttle;
