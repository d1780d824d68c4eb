//! disklet: turns dedicated local disks into Kubernetes Local PersistentVolumes,
//! without ever touching a disk that holds data.
//!
//! Layers (see DESIGN.md): `model` is plain observed data, `plan` decides on
//! it without I/O, `host` talks to Linux behind traits with recording fakes,
//! and `scan` wires them for the `disklet scan` command.

pub mod config;
pub mod csi;
pub mod doctor;
pub mod failpoint;
pub mod host;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod scan;
pub mod server;
