//! disklet against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok, built from pinned Go
//! modules by `scripts/test-cluster.sh`): deploy/ applied by the real
//! apiserver, agents as real processes on kwok Nodes with tokens of deploy/'s
//! own ServiceAccount (so RBAC is the real authorizer's decision), claims
//! placed by the real scheduler and bound by the real PV controller.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;
use support::cluster::*;
use support::*;

const T: Duration = Duration::from_secs(90);

/// The example StatefulSet (deploy/examples/statefulset.yaml) as a JSON
/// object, moved to `ns`, claiming from `sc`, with `replicas`.
fn example_statefulset(ns: &str, sc: &str, replicas: i32) -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("deploy/examples/statefulset.yaml")).unwrap();
    let mut sts = None;
    for v in serde_saphyr::from_multiple::<serde_json::Value>(&text).unwrap() {
        if v["kind"] == "StatefulSet" {
            sts = Some(v);
        }
    }
    let mut sts = sts.expect("a StatefulSet in deploy/examples/statefulset.yaml");
    sts["metadata"]["namespace"] = json!(ns);
    sts["spec"]["replicas"] = json!(replicas);
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] = json!(sc);
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
        json!("100Mi");
    sts
}

/// A claim and a pod using it, the pod pinned to `node` when given.
async fn claim_and_pod(
    s: &Scope,
    ns: &str,
    name: &str,
    sc: &str,
    node: Option<&str>,
    extra_claim: serde_json::Value,
) {
    let mut pvc = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"storageClassName": sc, "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "100Mi"}}}
    });
    if let Some(e) = extra_claim.as_object() {
        for (k, v) in e {
            pvc["spec"][k] = v.clone();
        }
    }
    s.apply_json(&pvc).await;
    let block = pvc["spec"]["volumeMode"] == "Block";
    let mut container = json!({"name": "app", "image": "busybox:1.36.1"});
    if block {
        container["volumeDevices"] = json!([{"name": "data", "devicePath": "/dev/xvda"}]);
    } else {
        container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [container],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}
    });
    if let Some(n) = node {
        pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": n});
    }
    s.apply_json(&pod).await;
}

fn node_of(p: &Pod) -> String {
    p.spec.as_ref().unwrap().node_name.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_and_its_overlays_are_accepted_and_its_rbac_is_what_the_agent_needs() {
    if skip_unless_root("deploy_and_its_overlays_are_accepted_and_its_rbac_is_what_the_agent_needs")
    {
        return;
    }
    let s = Scope::new("deploy").await;
    s.apply_deploy();
    // Every overlay, through the real apiserver's validation and admission.
    for overlay in ["deploy/overlays/block", "deploy/overlays/udev-events"] {
        let out = s
            .cluster
            .kubectl_output(&["apply", "-k", overlay, "--dry-run=server"]);
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The DaemonSet's own pod exists on the node, and the agent runs with a
    // token bound to it: every request it makes is judged by the real RBAC.
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("fast", &sc, "disks", "")])
        })
        .await;
    rig.disk("disks", "d1", 320);
    let pv = available(&s, &[&rig.node], 1).await;
    assert_eq!(
        affinity(&pv[0], "kubernetes.io/hostname"),
        [rig.node.clone()]
    );

    // doctor, with the same token, finds every permission granted.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args(["doctor", "--node-name", &rig.node, "--config"])
        .arg(rig.path().join("agent.yaml"))
        .env("KUBECONFIG", &rig.kubeconfig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("OK") && l.contains("RBAC")),
        "doctor: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("OK") && l.contains("Node")),
        "doctor: {text}"
    );
    // A pull withdraws the PV (delete), the watch saw it go.
    rig.pull(|_| true);
    wait_list(
        &pvs(&s),
        &nodes_selector(&[&rig.node]),
        "the PV withdrawn",
        T,
        |p| p.is_empty(),
    )
    .await;
    // Nothing the agent asked for was refused.
    let log = std::fs::read_to_string(&rig.agent().log).unwrap();
    assert!(
        !log.contains("forbidden"),
        "the agent was refused something:\n{log}"
    );
    // The apiserver's own record of the agents' requests (by the node each
    // token is bound to): none refused, and each grant of deploy/ used.
    let audit: Vec<_> = s
        .cluster
        .audit()
        .into_iter()
        // (not the test's own dry-run probe of the policy)
        .filter(|a| a.node == rig.node && a.name != "disklet-policy-probe")
        .collect();
    let refused: Vec<String> = audit
        .iter()
        .filter(|a| a.code == 401 || a.code == 403)
        .map(|a| format!("{} {} {}", a.code, a.verb, a.uri))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    let used: std::collections::BTreeSet<String> = audit
        .iter()
        .map(|a| format!("{} {}", a.verb, a.resource))
        .collect();
    eprintln!("the agent's requests: {used:?}");
    for want in [
        "get nodes",
        "list persistentvolumes",
        "watch persistentvolumes",
        "patch persistentvolumes",
        "delete persistentvolumes",
        "get storageclasses",
        "create events",
    ] {
        assert!(used.contains(want), "never used: {want} (used: {used:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_statefulset_lands_one_replica_per_node_on_disklet_pvs() {
    if skip_unless_root("the_example_statefulset_lands_one_replica_per_node_on_disklet_pvs") {
        return;
    }
    let s = Scope::new("sts").await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rigs = Vec::new();
    for n in ["a", "b", "c"] {
        let mut rig = s
            .rig(n, &[], |d| {
                loop_config(d, "", &[("fast", &sc, "disks", "")])
            })
            .await;
        rig.disk("disks", "d1", 320);
        rig.disk("disks", "d2", 320);
        rigs.push(rig);
    }
    let nodes: Vec<&str> = rigs.iter().map(|r| r.node.as_str()).collect();
    available(&s, &nodes, 6).await;

    let ns = s.namespace("demo").await;
    s.apply_json(&example_statefulset(&ns, &sc, 3)).await;
    let mut used = Vec::new();
    for i in 0..3 {
        let pod = running_pod(&s, &ns, &format!("local-demo-{i}")).await;
        let pv = bound_pv(&s, &ns, &format!("data-local-demo-{i}")).await;
        let node = node_of(&pod);
        assert!(
            nodes.contains(&node.as_str()),
            "{node} is not one of {nodes:?}"
        );
        assert_eq!(
            affinity(&pv, "kubernetes.io/hostname"),
            std::slice::from_ref(&node),
            "the PV's node is its pod's"
        );
        assert_eq!(
            pv.metadata.labels.as_ref().unwrap()["disklet.io/node"],
            node
        );
        used.push(node);
    }
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3, "one replica per node (anti-affinity)");

    // Node a's second disk goes to a pod pinned there; a third pinned pod
    // finds no free disk on a and stays Pending with the scheduler's reason.
    claim_and_pod(&s, &ns, "extra-1", &sc, Some(nodes[0]), json!({})).await;
    let pv = bound_pv(&s, &ns, "extra-1").await;
    assert_eq!(
        affinity(&pv, "kubernetes.io/hostname"),
        [nodes[0].to_string()]
    );
    claim_and_pod(&s, &ns, "extra-2", &sc, Some(nodes[0]), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let p = wait_for(&pods, "extra-2", "extra-2 unschedulable", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await;
    let cond = p.status.unwrap().conditions.unwrap();
    let msg = cond
        .iter()
        .find(|c| c.type_ == "PodScheduled")
        .and_then(|c| c.message.clone())
        .unwrap();
    assert!(
        msg.contains("didn't find available persistent volumes to bind"),
        "the scheduler's own reason: {msg}"
    );
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    let c = pvcs.get("extra-2").await.unwrap();
    assert_eq!(c.status.unwrap().phase.as_deref(), Some("Pending"));
    let _ = pvcs.list(&ListParams::default()).await.unwrap();
}

async fn scale(s: &Scope, ns: &str, sts: &str, replicas: i32) {
    let api: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(s.client.clone(), ns);
    api.patch_scale(
        sts,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_and_delete_the_claim_recycles_after_kubelets_unmount() {
    if skip_unless_root("scale_down_and_delete_the_claim_recycles_after_kubelets_unmount") {
        return;
    }
    let s = Scope::new("recycle").await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("fast", &sc, "disks", "")])
        })
        .await;
    rig.disk("disks", "d1", 320);
    available(&s, &[&rig.node], 1).await;
    let ns = s.namespace("db").await;
    s.apply_json(&example_statefulset(&ns, &sc, 1)).await;
    let pod = running_pod(&s, &ns, "local-demo-0").await;
    let first = bound_pv(&s, &ns, "data-local-demo-0").await;
    let vol = local_path(&first);
    std::fs::write(vol.join("boots.log"), "tenant one").unwrap();

    // kubelet's bind mount of the volume into the pod, as kubelet makes it.
    let pod_mount = rig
        .path()
        .join("kubelet/pods")
        .join(pod.metadata.uid.as_deref().unwrap())
        .join("volumes/kubernetes.io~local-volume")
        .join(name_of(&first));
    std::fs::create_dir_all(&pod_mount).unwrap();
    sh(&[
        "mount",
        "--bind",
        vol.to_str().unwrap(),
        pod_mount.to_str().unwrap(),
    ]);
    let _unmount = Mounted(pod_mount.clone());

    // Scale down, delete the claim: the real PV controller releases the PV.
    scale(&s, &ns, "local-demo", 0).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    wait_gone(&pods, "local-demo-0", "the pod gone", T).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "data-local-demo-0").await;
    wait_for(&pvs(&s), &name_of(&first), "the PV Released", T, |pv| {
        phase(pv) == "Released"
    })
    .await;
    rig.agent().wait_log("VolumeInUse");
    assert_eq!(
        std::fs::read_to_string(vol.join("boots.log")).unwrap(),
        "tenant one",
        "never wiped while mounted"
    );
    let ev = events_about(&s, &name_of(&first)).await;
    assert!(
        ev.iter().any(|(t, r, n)| t == "Warning"
            && r == "VolumeInUse"
            && n.contains(pod_mount.to_str().unwrap())),
        "{ev:?}"
    );

    // kubelet unmounts: cleaned, the old PV deleted, a fresh one published.
    sh(&["umount", pod_mount.to_str().unwrap()]);
    wait_gone(&pvs(&s), &name_of(&first), "the released PV deleted", T).await;
    let fresh = available(&s, &[&rig.node], 1).await.remove(0);
    assert_ne!(name_of(&fresh), name_of(&first));
    assert_ne!(
        ann(&fresh, "disklet.io/fs-uuid"),
        ann(&first, "disklet.io/fs-uuid")
    );
    assert_eq!(
        std::fs::read_dir(local_path(&fresh)).unwrap().count(),
        0,
        "the fresh volume is empty"
    );
    assert!(!vol.exists(), "the old path is gone with the old mount");
    assert_eq!(
        support::agent::blkid(rig.loops[0].path(), "UUID"),
        ann(&fresh, "disklet.io/fs-uuid").unwrap(),
        "the fresh PV names the disk's new filesystem"
    );
    let ev = events_about(&s, &rig.node).await;
    let ev_pv = events_about(&s, &name_of(&first)).await;
    assert!(
        ev.iter().chain(&ev_pv).any(|(_, r, _)| r == "Recycled"),
        "{ev:?} {ev_pv:?}"
    );

    // Scaling up binds the fresh, empty volume.
    scale(&s, &ns, "local-demo", 1).await;
    running_pod(&s, &ns, "local-demo-0").await;
    let again = bound_pv(&s, &ns, "data-local-demo-0").await;
    assert_eq!(name_of(&again), name_of(&fresh));
    assert!(!local_path(&again).join("boots.log").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_a_released_volume_and_its_data() {
    if skip_unless_root("retain_keeps_a_released_volume_and_its_data") {
        return;
    }
    let s = Scope::new("retain").await;
    let sc = s
        .storage_class("keep", json!({"reclaimPolicy": "Retain"}))
        .await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("keep", &sc, "disks", "")])
        })
        .await;
    rig.disk("disks", "k1", 320);
    let pv = available(&s, &[&rig.node], 1).await.remove(0);
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .persistent_volume_reclaim_policy
            .as_deref(),
        Some("Retain")
    );
    let ns = s.namespace("app").await;
    claim_and_pod(&s, &ns, "keep-0", &sc, None, json!({})).await;
    running_pod(&s, &ns, "keep-0").await;
    let bound = bound_pv(&s, &ns, "keep-0").await;
    std::fs::write(local_path(&bound).join("keepme"), "x").unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "keep-0").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "keep-0").await;
    wait_for(&pvs(&s), &name_of(&bound), "Released", T, |pv| {
        phase(pv) == "Released"
    })
    .await;
    let pv = wait_for(&pvs(&s), &name_of(&bound), "marked retained", T, |pv| {
        ann(pv, "disklet.io/reclaim") == Some("retained")
    })
    .await;
    assert_eq!(phase(&pv), "Released");
    assert_eq!(
        std::fs::read_to_string(local_path(&pv).join("keepme")).unwrap(),
        "x"
    );
    let ev = events_about(&s, &name_of(&pv)).await;
    assert!(ev.iter().any(|(_, r, _)| r == "Retained"), "{ev:?}");
    // Nothing else is published on the disk.
    let now = list(&pvs(&s), &nodes_selector(&[&rig.node])).await;
    assert_eq!(now.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pv_an_admin_deletes_waits_behind_pv_protection_and_its_data_stays() {
    if skip_unless_root("a_bound_pv_an_admin_deletes_waits_behind_pv_protection_and_its_data_stays")
    {
        return;
    }
    let s = Scope::new("pvprot").await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("fast", &sc, "disks", "")])
        })
        .await;
    rig.disk("disks", "d1", 320);
    available(&s, &[&rig.node], 1).await;
    let ns = s.namespace("app").await;
    claim_and_pod(&s, &ns, "c0", &sc, None, json!({})).await;
    running_pod(&s, &ns, "c0").await;
    let bound = bound_pv(&s, &ns, "c0").await;
    std::fs::write(local_path(&bound).join("data"), "precious").unwrap();

    // The admin deletes the Bound PV: Terminating behind pv-protection.
    delete(&pvs(&s), &name_of(&bound)).await;
    let pv = wait_for(&pvs(&s), &name_of(&bound), "Terminating", T, |pv| {
        pv.metadata.deletion_timestamp.is_some()
    })
    .await;
    assert!(pv
        .metadata
        .finalizers
        .as_ref()
        .unwrap()
        .iter()
        .any(|f| f == "kubernetes.io/pv-protection"));
    assert_eq!(phase(&pv), "Bound");
    // disklet leaves it alone: restart the agent; a full pass later the PV is
    // still there, unchanged, and the data too.
    rig.restart();
    rig.agent().wait_log("ready: first reconcile done");
    let now = pvs(&s).get(&name_of(&bound)).await.unwrap();
    assert_eq!(
        now.metadata.resource_version, pv.metadata.resource_version,
        "disklet wrote nothing to it"
    );
    assert_eq!(
        std::fs::read_to_string(local_path(&bound).join("data")).unwrap(),
        "precious"
    );

    // The claim goes: the PV is gone for good; the data stays on the disk,
    // and disklet publishes nothing over it (VolumeNotClean on the Node).
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "c0").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "c0").await;
    wait_gone(&pvs(&s), &name_of(&bound), "the PV deleted", T).await;
    rig.agent().wait_log("VolumeNotClean");
    assert_eq!(
        std::fs::read_to_string(local_path(&bound).join("data")).unwrap(),
        "precious"
    );
    assert!(list(&pvs(&s), &nodes_selector(&[&rig.node]))
        .await
        .is_empty());
    let ev = events_about(&s, &rig.node).await;
    assert!(
        ev.iter()
            .any(|(t, r, _)| t == "Warning" && r == "VolumeNotClean"),
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_disks_an_available_pv_is_withdrawn_and_a_bound_one_marked() {
    if skip_unless_root("pulled_disks_an_available_pv_is_withdrawn_and_a_bound_one_marked") {
        return;
    }
    let s = Scope::new("pull").await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("fast", &sc, "disks", "")])
        })
        .await;
    rig.disk("disks", "a", 320);
    rig.disk("disks", "b", 320);
    available(&s, &[&rig.node], 2).await;
    let ns = s.namespace("app").await;
    claim_and_pod(&s, &ns, "c0", &sc, None, json!({})).await;
    let bound = bound_pv(&s, &ns, "c0").await;
    let avail_name = all_names(&list(&pvs(&s), &nodes_selector(&[&rig.node])).await)
        .into_iter()
        .find(|n| *n != name_of(&bound))
        .unwrap();
    // Both disks go.
    let files = rig.pull(|_| true);
    let left = wait_list(
        &pvs(&s),
        &nodes_selector(&[&rig.node]),
        "the Available PV withdrawn, the Bound one marked",
        T,
        |p| p.len() == 1 && ann(&p[0], "disklet.io/device-state") == Some("missing"),
    )
    .await;
    assert_eq!(
        name_of(&left[0]),
        name_of(&bound),
        "a Bound PV is never deleted"
    );
    assert_eq!(phase(&left[0]), "Bound");
    // The scheduler puts nothing new on the node: a new claim's pod stays Pending.
    claim_and_pod(&s, &ns, "c1", &sc, Some(&rig.node), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let p = wait_for(&pods, "c1", "c1 unschedulable", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await;
    assert!(p.spec.unwrap().node_name.is_none());
    let ev = events_about(&s, &name_of(&bound)).await;
    assert!(
        ev.iter()
            .any(|(t, r, _)| t == "Warning" && r == "DeviceMissing"),
        "{ev:?}"
    );

    // The same disks come back (under whatever loop numbers): the withdrawn
    // PV is published again under its old name, the mark is cleared, and the
    // waiting pod gets it.
    for f in &files {
        rig.plug(f);
    }
    let back = wait_list(
        &pvs(&s),
        &nodes_selector(&[&rig.node]),
        "the PVs back, unmarked",
        T,
        |p| {
            p.len() == 2
                && p.iter()
                    .all(|pv| ann(pv, "disklet.io/device-state").is_none())
        },
    )
    .await;
    assert!(
        all_names(&back).contains(&avail_name),
        "same disk, same PV name"
    );
    let got = bound_pv(&s, &ns, "c1").await;
    assert_eq!(name_of(&got), avail_name);
}

fn all_names(pvs: &[PersistentVolume]) -> Vec<String> {
    pvs.iter().map(name_of).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_dir_volume_is_cleaned_file_by_file_and_published_again() {
    if skip_unless_root("a_discovery_dir_volume_is_cleaned_file_by_file_and_published_again") {
        return;
    }
    let s = Scope::new("discovery").await;
    let sc = s.storage_class("dirs", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            std::fs::create_dir_all(d.join("discovery")).unwrap();
            format!(
                "hostDir: {0}/hostdir\nkubeletDir: {0}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: dirs\n    storageClassName: {sc}\n    discoveryDirs: [{0}/discovery]\n",
                d.display()
            )
        })
        .await;
    // The admin prepares a filesystem and mounts it in the discovery dir.
    let dev = rig.disk("prepared", "p1", 128).path().to_string();
    let file = rig.loops[0].file.clone();
    sh(&["mkfs.ext4", "-q", &dev]);
    let entry = rig.path().join("discovery/vol1");
    let _m = Mounted::new(&dev, &entry);
    let first = available(&s, &[&rig.node], 1).await.remove(0);
    assert_eq!(local_path(&first), entry);
    assert_eq!(
        ann(&first, "disklet.io/device-id"),
        Some(format!("loop-file:{}", file.display()).as_str())
    );
    let ns = s.namespace("app").await;
    claim_and_pod(&s, &ns, "d-0", &sc, None, json!({})).await;
    let bound = bound_pv(&s, &ns, "d-0").await;
    std::fs::create_dir_all(entry.join("a/b")).unwrap();
    std::fs::write(entry.join("a/b/old"), "old tenant").unwrap();
    // A symlink out of the volume: the cleanup must unlink it, not follow it.
    let outside = rig.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "not the volume's").unwrap();
    std::os::unix::fs::symlink(&outside, entry.join("escape")).unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "d-0").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "d-0").await;
    wait_for(
        &pvs(&s),
        &name_of(&bound),
        "published again, a new object",
        T,
        |pv| pv.metadata.uid != bound.metadata.uid && phase(pv) == "Available",
    )
    .await;
    let left: Vec<_> = std::fs::read_dir(&entry)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| n == "lost+found"),
        "only what mkfs made may stay: {left:?}"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("keep")).unwrap(),
        "not the volume's"
    );
    drop(rig.agent.take());
}

/// A PV as disklet builds it for `node` (hostname label = node name).
fn pv_for(node: &str, key: &str) -> PersistentVolume {
    use disklet::model::{NodeInfo, ScInfo, Volume};
    let info = NodeInfo {
        name: node.into(),
        uid: "00000000-0000-4000-8000-000000000001".into(),
        hostname: node.into(),
        labels: Default::default(),
    };
    let v = Volume {
        key: format!("fs:{key}"),
        class: "fast".into(),
        mode: disklet::config::VolumeMode::Filesystem,
        access_mode: Default::default(),
        path: format!("/var/lib/disklet/fast/{key}/vol").into(),
        capacity_bytes: 1 << 30,
        fs_type: None,
        annotations: Default::default(),
        create_blocked: None,
    };
    let sc = ScInfo {
        reclaim_policy: "Delete".into(),
        mount_options: vec![],
        ..Default::default()
    };
    disklet::plan::pv::build_pv(&v, &info, "local-fast", &sc, &[])
}

fn apply_pp() -> kube::api::PatchParams {
    kube::api::PatchParams::apply("disklet").force()
}

async fn ssa(
    api: &Api<PersistentVolume>,
    pv: &PersistentVolume,
) -> Result<PersistentVolume, kube::Error> {
    let mut body = serde_json::to_value(pv).unwrap();
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("PersistentVolume");
    api.patch(&name_of(pv), &apply_pp(), &kube::api::Patch::Apply(body))
        .await
}

/// Asserts the call was refused by disklet's admission policy (not RBAC).
fn refused_by_policy<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{what}: {e:?}");
            assert!(
                e.message
                    .contains("ValidatingAdmissionPolicy 'disklet-node-scoped-pvs'"),
                "{what}: refused, but not by the policy: {}",
                e.message
            );
        }
        other => panic!("{what}: not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_token_writes_only_that_nodes_pvs() {
    let s = Scope::new("authz").await;
    s.apply_deploy();
    let (a, b) = (s.node("a", &[]).await, s.node("b", &[]).await);
    let dir = tempfile::tempdir().unwrap();
    let client_as = |n: &str| dir.path().join(format!("{n}.kubeconfig"));
    s.agent_kubeconfig(&a, &client_as("a")).await;
    s.agent_kubeconfig(&b, &client_as("b")).await;
    let as_a: Api<PersistentVolume> = Api::all(client_from(&client_as("a")).await);
    let as_b: Api<PersistentVolume> = Api::all(client_from(&client_as("b")).await);

    wait_policy_effective(&client_as("a")).await;
    // Node b's agent writes its own PV.
    let pv_b = pv_for(&b, &s.name("b1"));
    ssa(&as_b, &pv_b).await.unwrap();
    // Node a's token cannot change, relabel, or delete it.
    let mut changed = pv_b.clone();
    changed
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("disklet.io/x".into(), "y".into());
    refused_by_policy(ssa(&as_a, &changed).await, "a patches b's PV");
    refused_by_policy(
        as_a.delete(&name_of(&pv_b), &Default::default()).await,
        "a deletes b's PV",
    );
    // Nor create a PV for node b, under either label, or one labelled a that
    // sends pods to b.
    refused_by_policy(
        ssa(&as_a, &pv_for(&b, &s.name("b2"))).await,
        "a creates a PV of b",
    );
    let mut disguised = pv_for(&b, &s.name("b3"));
    disguised
        .metadata
        .labels
        .get_or_insert_default()
        .insert("disklet.io/node".into(), a.clone());
    refused_by_policy(
        ssa(&as_a, &disguised).await,
        "a creates a PV labelled a with b's affinity",
    );
    // Its own PVs, a may write and delete; moving one to b it may not.
    let pv_a = pv_for(&a, &s.name("a1"));
    ssa(&as_a, &pv_a).await.unwrap();
    let mut moved = pv_a.clone();
    moved
        .metadata
        .labels
        .get_or_insert_default()
        .insert("disklet.io/node".into(), b.clone());
    refused_by_policy(ssa(&as_a, &moved).await, "a relabels its PV to b");
    as_a.delete(&name_of(&pv_a), &Default::default())
        .await
        .unwrap();
    // A token bound to no pod (so to no node) writes no PV at all.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(s.client.clone(), "disklet-system");
    let tr: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 600}
    }))
    .unwrap();
    let out: k8s_openapi::api::authentication::v1::TokenRequest = sas
        .create_subresource("token", "disklet", &Default::default(), &tr)
        .await
        .unwrap();
    let unbound = out.status.unwrap().token;
    s.cluster
        .kubeconfig_with_token(&client_as("none"), &unbound);
    let as_none: Api<PersistentVolume> = Api::all(client_from(&client_as("none")).await);
    refused_by_policy(
        ssa(&as_none, &pv_for(&a, &s.name("a2"))).await,
        "an unbound token creates a PV",
    );
    // What the policy does not cover, RBAC still allows: reading.
    assert!(as_a.get(&name_of(&pv_b)).await.is_ok());
    // The admin is not affected.
    pvs(&s)
        .delete(&name_of(&pv_b), &Default::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_keys_and_allowed_topologies_keep_the_pods_in_their_zone() {
    if skip_unless_root("topology_keys_and_allowed_topologies_keep_the_pods_in_their_zone") {
        return;
    }
    const ZONE: &str = "topology.kubernetes.io/zone";
    let s = Scope::new("zones").await;
    let (z1, z2) = (s.name("z1"), s.name("z2"));
    let sc = s
        .storage_class(
            "zonal",
            json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": [z1]}]}]}),
        )
        .await;
    let mut rigs = Vec::new();
    for (n, z) in [("a", &z1), ("b", &z1), ("c", &z2)] {
        let mut rig = s
            .rig(n, &[(ZONE, z.as_str())], |d| {
                loop_config(
                    d,
                    "topologyKeys: [topology.kubernetes.io/zone]",
                    &[("fast", &sc, "disks", "")],
                )
            })
            .await;
        rig.disk("disks", "d1", 320);
        rigs.push(rig);
    }
    let in_z1 = [rigs[0].node.as_str(), rigs[1].node.as_str()];
    // Published where the class allows it, with the zone in the affinity.
    let pvs_z1 = available(&s, &in_z1, 2).await;
    for pv in &pvs_z1 {
        assert_eq!(affinity(pv, ZONE), std::slice::from_ref(&z1), "{pv:#?}");
    }
    // Node c lies outside the StorageClass's allowedTopologies: its disk is
    // not published (a PV there would take claims of this class out of the
    // zone: the scheduler checks allowedTopologies only when it provisions).
    rigs[2].agent().wait_log("OutsideAllowedTopologies");
    assert!(list(&pvs(&s), &nodes_selector(&[&rigs[2].node]))
        .await
        .is_empty());
    let ev = events_about(&s, &rigs[2].node).await;
    assert!(
        ev.iter()
            .any(|(t, r, _)| t == "Warning" && r == "OutsideAllowedTopologies"),
        "{ev:?}"
    );

    let ns = s.namespace("zonal").await;
    s.apply_json(&example_statefulset(&ns, &sc, 3)).await;
    for i in 0..2 {
        let pod = running_pod(&s, &ns, &format!("local-demo-{i}")).await;
        assert!(
            in_z1.contains(&node_of(&pod).as_str()),
            "replica {i} on {}",
            node_of(&pod)
        );
        let pv = bound_pv(&s, &ns, &format!("data-local-demo-{i}")).await;
        assert_eq!(affinity(&pv, ZONE), std::slice::from_ref(&z1));
    }
    // The third replica finds no volume in the zone: Pending, never on c.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let p = wait_for(
        &pods,
        "local-demo-2",
        "local-demo-2 unschedulable",
        T,
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await;
    assert!(p.spec.unwrap().node_name.is_none());
}

fn unschedulable_because(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))
        .and_then(|c| c.message.clone())
}

async fn wait_unschedulable(s: &Scope, ns: &str, pod: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), ns);
    let p = wait_for(&pods, pod, &format!("{pod} unschedulable"), T, |p| {
        unschedulable_because(p).is_some()
    })
    .await;
    unschedulable_because(&p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_claims_and_read_write_once_pod_claims_get_what_the_readme_says() {
    if skip_unless_root("block_claims_and_read_write_once_pod_claims_get_what_the_readme_says") {
        return;
    }
    let s = Scope::new("modes").await;
    let sc_raw = s.storage_class("raw", json!({})).await;
    let sc_rwo = s.storage_class("rwo", json!({})).await;
    let sc_rwop = s.storage_class("rwop", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            std::fs::create_dir_all(d.join("blockdir")).unwrap();
            let base = loop_config(
                d,
                "",
                &[("rwo", &sc_rwo, "rwo", ""), ("rwop", &sc_rwop, "rwop", "accessMode: ReadWriteOncePod")],
            );
            format!(
                "{base}  - name: raw\n    storageClassName: {sc_raw}\n    volumeMode: Block\n    discoveryDirs: [{}/blockdir]\n",
                d.display()
            )
        })
        .await;
    rig.disk("rwo", "o1", 320);
    rig.disk("rwop", "p1", 320);
    let raw_dev = rig.disk("raw", "r1", 128).path().to_string();
    let link = rig.path().join("blockdir/r1");
    std::os::unix::fs::symlink(&raw_dev, &link).unwrap();
    let all = available(&s, &[&rig.node], 3).await;
    let class =
        |pv: &PersistentVolume| pv.metadata.labels.as_ref().unwrap()["disklet.io/class"].clone();
    for pv in &all {
        let spec = pv.spec.as_ref().unwrap();
        match class(pv).as_str() {
            "rwo" => assert_eq!(
                spec.access_modes.as_deref(),
                Some(&["ReadWriteOnce".to_string()][..])
            ),
            "rwop" => assert_eq!(
                spec.access_modes.as_deref(),
                Some(&["ReadWriteOncePod".to_string()][..])
            ),
            "raw" => {
                assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
                assert_eq!(local_path(pv), link);
            }
            c => panic!("class {c}"),
        }
    }
    let raw_pv = all.iter().find(|p| class(p) == "raw").unwrap().clone();
    let ns = s.namespace("modes").await;

    // Block: a Filesystem claim does not bind the raw PV; a Block claim does.
    claim_and_pod(&s, &ns, "fs-on-raw", &sc_raw, None, json!({})).await;
    let why = wait_unschedulable(&s, &ns, "fs-on-raw").await;
    assert!(
        why.contains("didn't find available persistent volumes to bind"),
        "{why}"
    );
    claim_and_pod(
        &s,
        &ns,
        "blk",
        &sc_raw,
        None,
        json!({"volumeMode": "Block"}),
    )
    .await;
    let bound = bound_pv(&s, &ns, "blk").await;
    assert_eq!(name_of(&bound), name_of(&raw_pv));
    // The container writes to the device; released, it is cleaned before the
    // volume is offered again (same entry, same name, a new PV).
    sh(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={raw_dev}"),
        "bs=1M",
        "count=1",
        "oflag=direct",
        "status=none",
    ]);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "blk").await;
    delete(&pods, "fs-on-raw").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "blk").await;
    delete(&pvcs, "fs-on-raw").await;
    wait_for(
        &pvs(&s),
        &name_of(&raw_pv),
        "the raw PV published again, a new object",
        T,
        |pv| pv.metadata.uid != raw_pv.metadata.uid && phase(pv) == "Available",
    )
    .await;
    let head = std::fs::read(&raw_dev).unwrap();
    assert!(
        head[..1 << 20].iter().all(|b| *b == 0),
        "the first tenant's bytes are gone"
    );

    // ReadWriteOncePod: a claim for it never binds a ReadWriteOnce PV (the PV
    // controller matches access modes), and binds one of a class that
    // publishes ReadWriteOncePod; the scheduler keeps a second pod off it.
    claim_and_pod(
        &s,
        &ns,
        "rwop-on-rwo",
        &sc_rwo,
        None,
        json!({"accessModes": ["ReadWriteOncePod"]}),
    )
    .await;
    let why = wait_unschedulable(&s, &ns, "rwop-on-rwo").await;
    assert!(
        why.contains("didn't find available persistent volumes to bind"),
        "{why}"
    );
    claim_and_pod(
        &s,
        &ns,
        "solo",
        &sc_rwop,
        None,
        json!({"accessModes": ["ReadWriteOncePod"]}),
    )
    .await;
    running_pod(&s, &ns, "solo").await;
    let pv = bound_pv(&s, &ns, "solo").await;
    assert_eq!(class(&pv), "rwop");
    s.apply_json(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "second", "namespace": ns},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.36.1"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "solo"}}]}
    }))
    .await;
    let why = wait_unschedulable(&s, &ns, "second").await;
    assert!(
        why.contains("ReadWriteOncePod access mode already in-use"),
        "{why}"
    );
}
