//! `cargo bench --bench claims` (root; Go for the control plane, as for the
//! tests): a claim's time from creation to Bound on the real control plane,
//! a CSI claim (csi-provisioner → `disklet csi` CreateVolume → PV) against a
//! claim of a static disklet PV published beforehand (only the scheduler and
//! the PV controller's binding), alternated in the same run, median of 8
//! each. Both claims come with their pod (WaitForFirstConsumer); the
//! difference is what dynamic provisioning costs.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use serde_json::json;
use support::cluster::*;
use support::csi_cluster::*;

const ROUNDS: usize = 8;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Creates claim `name` and its pod; the time until the claim is Bound.
async fn claim_to_bound(s: &Scope, ns: &str, name: &str, sc: &str, node: &str) -> Duration {
    let t = Instant::now();
    create_in(s, ns, claim(name, sc, 64, json!({}))).await;
    create_in(s, ns, pod_with(name, name, Some(node))).await;
    bound(s, ns, name).await;
    t.elapsed()
}

#[tokio::main]
async fn main() {
    if support::skip_unless_root("bench claims") {
        return;
    }
    let s = Scope::new("bench-claims").await;
    // Static: one disklet PV per 320 MiB disk, all Available before the clock.
    let st_sc = s.storage_class("static", json!({})).await;
    let mut st = s
        .rig("st", &[], |d| {
            loop_config(d, "", &[("fast", &st_sc, "disks", "")])
        })
        .await;
    for i in 0..ROUNDS {
        st.disk("disks", &format!("d{i}"), 320);
    }
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    wait_list(
        &pvs,
        &format!("disklet.io/node={}", st.node),
        "the static PVs Available",
        Duration::from_secs(120),
        |ps| ps.iter().filter(|p| phase(p) == "Available").count() == ROUNDS,
    )
    .await;
    // CSI: one pool of 2 GiB.
    let csi_sc = s
        .storage_class(
            "csi",
            json!({"provisioner": DRIVER, "allowVolumeExpansion": true}),
        )
        .await;
    let csi = csi_node(&s, "cs", &csi_sc, 2048).await;
    wait_capacity(&s, &csi_sc, &csi.rig.node, |c| c > 0).await;
    let ns = s.namespace("claims").await;

    let (mut dynamic, mut fixed) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        fixed.push(claim_to_bound(&s, &ns, &format!("st-{i}"), &st_sc, &st.node).await);
        dynamic.push(claim_to_bound(&s, &ns, &format!("csi-{i}"), &csi_sc, &csi.rig.node).await);
    }
    let (d, f) = (median(dynamic), median(fixed));
    println!(
        "claim to Bound (with its pod, WaitForFirstConsumer), median of {ROUNDS}: CSI volume {:.0} ms; static disklet PV {:.0} ms; ratio {:.2}",
        d.as_secs_f64() * 1e3,
        f.as_secs_f64() * 1e3,
        d.as_secs_f64() / f.as_secs_f64()
    );
}
