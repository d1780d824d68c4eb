//! The CSI v1.12 messages and services, generated at build time from
//! proto/csi.proto (build.rs).
#![allow(clippy::all, clippy::pedantic, missing_docs)]
tonic::include_proto!("csi.v1");
