//! Agents under load against the real control plane: N agents (real
//! processes, each on its own kwok Node with one loop device and a token
//! bound to the DaemonSet's pod there), measured over a window with 0
//! foreign PVs, then again, restarted, with F PVs of other nodes in etcd.
//! tests/real_cluster_load.rs asserts on it, benches/load.rs prints it.
//!
//! Requests are counted from the apiserver's audit log, by the node each
//! token is bound to: `apiserver_request_total` has no label for the user or
//! the user agent, the audit log is the apiserver's own record per request.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::agent::proc_mem_kib;
use super::cluster::{cluster, loop_config, nodes_selector, wait_list, NodeRig, Scope};

/// One agent over one window.
#[derive(Debug, Clone)]
pub struct Fig {
    pub node: String,
    /// Restart (volumes published) → "ready: first reconcile done", seconds.
    pub ready_s: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// Reconcile passes in the window.
    pub passes: f64,
    /// Its requests in the window, by "verb resource".
    pub kinds: BTreeMap<String, usize>,
}

impl Fig {
    pub fn requests(&self) -> usize {
        self.kinds.values().sum()
    }

    pub fn requests_per_pass(&self) -> f64 {
        self.requests() as f64 / self.passes.max(1.0)
    }
}

pub struct Report {
    pub agents: usize,
    pub foreign: usize,
    pub window: Duration,
    pub base: Vec<Fig>,
    pub loaded: Vec<Fig>,
    /// Creating the foreign PVs, seconds.
    pub seed_s: f64,
    /// Every list or watch of PVs an agent made without its own node's
    /// label selector (must be none).
    pub unscoped: Vec<String>,
    /// Every request of an agent the apiserver refused: unauthenticated,
    /// forbidden by RBAC or the admission policy, invalid (must be none).
    pub refused: Vec<String>,
    /// Requests that failed on the server's side (5xx), with its message.
    pub failed: Vec<String>,
}

pub fn mean(v: &[Fig], f: impl Fn(&Fig) -> f64) -> f64 {
    v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
}

pub fn max(v: &[Fig], f: impl Fn(&Fig) -> f64) -> f64 {
    v.iter().map(f).fold(f64::MIN, f64::max)
}

const RESYNC_S: u64 = 2;

/// Runs the whole measurement (its own Scope: nodes, class, agents).
pub async fn run(agents: usize, foreign: usize, window: Duration) -> Report {
    let s = Scope::new(&format!("load-{agents}-{foreign}")).await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rigs: Vec<NodeRig> = Vec::new();
    let mut started = Vec::new();
    for i in 0..agents {
        let t = Instant::now();
        let mut rig = s
            .rig(&format!("n{i}"), &[], |d| {
                loop_config(
                    d,
                    &format!("resyncSeconds: {RESYNC_S}"),
                    &[("fast", &sc, "disks", "fsType: ext4")],
                )
            })
            .await;
        rig.disk("disks", "d1", 32);
        rigs.push(rig);
        started.push(t);
    }
    let ready = |rigs: &[NodeRig], started: &[Instant]| -> Vec<f64> {
        rigs.iter()
            .zip(started)
            .map(|(r, t)| {
                r.agent()
                    .wait_log_within("ready: first reconcile done", Duration::from_secs(300));
                t.elapsed().as_secs_f64()
            })
            .collect()
    };
    ready(&rigs, &started);
    let nodes: Vec<String> = rigs.iter().map(|r| r.node.clone()).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    wait_list(
        &pvs,
        &nodes_selector(&node_refs),
        "one PV per agent",
        Duration::from_secs(300),
        |p| p.len() == agents,
    )
    .await;
    // Both phases measure agents restarted with their volumes published, so
    // a start is the same work in both.
    let restart = |rigs: &mut Vec<NodeRig>| {
        let mut started = Vec::new();
        for r in rigs.iter_mut() {
            started.push(Instant::now());
            r.restart();
        }
        started
    };
    let started = restart(&mut rigs);
    let ready_base = ready(&rigs, &started);
    let base = measure(&rigs, &ready_base, window).await;

    let t = Instant::now();
    seed(&s, &pvs, &sc, foreign).await;
    let seed_s = t.elapsed().as_secs_f64();
    // Fresh agents: their first list is made with the foreign PVs in etcd.
    let started = restart(&mut rigs);
    let ready_loaded = ready(&rigs, &started);
    let loaded = measure(&rigs, &ready_loaded, window).await;

    let mine: std::collections::HashSet<&str> = node_refs.iter().copied().collect();
    let audit: Vec<_> = cluster()
        .audit()
        .into_iter()
        // (not the test's own dry-run probe of the policy)
        .filter(|a| mine.contains(a.node.as_str()) && a.name != "disklet-policy-probe")
        .collect();
    let unscoped = audit
        .iter()
        .filter(|a| {
            a.resource == "persistentvolumes" && matches!(a.verb.as_str(), "list" | "watch")
        })
        .filter(|a| {
            let own = format!(
                "disklet.io/node={}",
                disklet::model::keys::node_label_value(&a.node)
            );
            !a.query("labelSelector")
                .is_some_and(|sel| sel.split(',').any(|t| t == own))
        })
        .map(|a| format!("{} {} (node {})", a.verb, a.uri, a.node))
        .collect();
    let refused = audit
        .iter()
        // (a 500 is what the audit log says of a request whose client went
        // away: the restarts kill agents in the middle of a pass)
        .filter(|a| matches!(a.code, 401 | 403 | 422))
        .map(|a| format!("{} {} {} (node {})", a.code, a.verb, a.uri, a.node))
        .collect();
    let failed = audit
        .iter()
        .filter(|a| a.code >= 500)
        .map(|a| {
            format!(
                "{} {} {}: {} (node {})",
                a.code, a.verb, a.uri, a.message, a.node
            )
        })
        .collect();
    drop(rigs);
    Report {
        failed,
        agents,
        foreign,
        window,
        base,
        loaded,
        seed_s,
        unscoped,
        refused,
    }
}

/// Every agent over one window (wall time): passes from its own metrics,
/// requests from the audit log.
async fn measure(rigs: &[NodeRig], ready: &[f64], window: Duration) -> Vec<Fig> {
    let count = || {
        let mut by: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for a in cluster().audit() {
            *by.entry(a.node.clone())
                .or_default()
                .entry(format!("{} {}", a.verb, a.resource))
                .or_insert(0) += 1;
        }
        by
    };
    let passes = |r: &NodeRig| r.agent().metric("disklet_reconciles_total").unwrap_or(0.0);
    let p0: Vec<f64> = rigs.iter().map(passes).collect();
    let c0 = count();
    // The window itself: a measurement, not a wait for anything.
    tokio::time::sleep(window).await;
    let p1: Vec<f64> = rigs.iter().map(passes).collect();
    let c1 = count();
    rigs.iter()
        .enumerate()
        .map(|(i, r)| {
            let empty = BTreeMap::new();
            let before = c0.get(&r.node).unwrap_or(&empty);
            let kinds = c1
                .get(&r.node)
                .unwrap_or(&empty)
                .iter()
                .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect();
            let (rss, hwm) = proc_mem_kib(r.agent().pid());
            Fig {
                node: r.node.clone(),
                ready_s: ready[i],
                rss_mib: rss as f64 / 1024.0,
                hwm_mib: hwm as f64 / 1024.0,
                passes: p1[i] - p0[i],
                kinds,
            }
        })
        .collect()
}

/// `n` PVs of 100 other nodes, as disklet agents there would publish them
/// (their node label, their hostname in nodeAffinity, the same class).
async fn seed(s: &Scope, pvs: &Api<PersistentVolume>, sc: &str, n: usize) {
    let id = s.name("foreign");
    let made = futures::stream::iter(0..n)
        .map(|i| {
            let node = format!("{id}-{}", i % 100);
            let pv: PersistentVolume = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("{id}-{i}"),
                    "labels": {"disklet.io/node": node, "disklet.io/class": "fast"},
                    "annotations": {"disklet.io/key": format!("{i:032x}")}},
                "spec": {
                    "capacity": {"storage": "100Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": sc,
                    "volumeMode": "Filesystem",
                    "local": {"path": format!("/var/lib/disklet/fast/{i:032x}")},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}
                }
            }))
            .unwrap();
            async move { pvs.create(&PostParams::default(), &pv).await.map(|_| ()) }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    if let Some(Err(e)) = made.iter().find(|r| r.is_err()) {
        panic!("creating the foreign PVs: {e}");
    }
}
