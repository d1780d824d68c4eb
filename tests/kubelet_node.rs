//! disklet with the real kubelet: one node of the test cluster is this
//! machine's own kubelet of the pinned version, with containerd, runc and a
//! CNI bridge (`scripts/test-cluster.sh up DIR --kubelet`), beside the real
//! control plane. Pods really run there (busybox), kubelet itself mounts
//! disklet's PVs into them and unmounts them, and the agent (a process of the
//! test, configured for the test's loop devices only) sees kubelet's own
//! mounts, not an imitation of them.
#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;
use serde_json::json;
use support::cluster::*;
use support::kubelet::*;
use support::*;

/// A claim of `sc` and a busybox pod on it running `script` (`sh -c`), with
/// the volume at /data (Filesystem) or /dev/xvda (Block).
async fn claim_and_pod(s: &Scope, ns: &str, name: &str, sc: &str, block: bool, script: &str) {
    let mut spec = json!({"storageClassName": sc, "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": "100Mi"}}});
    let mut c = json!({"name": "app", "image": s.kubelet_node().image,
                       "imagePullPolicy": "Never", "command": ["sh", "-c", script]});
    if block {
        spec["volumeMode"] = json!("Block");
        c["volumeDevices"] = json!([{"name": "data", "devicePath": "/dev/xvda"}]);
    } else {
        c["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    }
    s.apply_json(&json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .await;
    s.apply_json(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [c], "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}
    }))
    .await;
}

/// A token only this run can have written.
fn proof() -> String {
    let u = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    format!("written-by-the-pod-{}", u.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_writes_to_its_disklet_disk_and_kubelet_gives_the_volume_back() {
    if skip_unless_root("a_pod_writes_to_its_disklet_disk_and_kubelet_gives_the_volume_back") {
        return;
    }
    let s = Scope::with_kubelet("fs-pod").await;
    let k = s.kubelet_node();
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .kubelet_rig(|d| loop_config(d, "", &[("fast", &sc, "disks", "")]))
        .await;
    rig.disk("disks", "d1", 320);
    available(&s, &[&k.name], 1).await;
    let ns = s.namespace("app").await;
    let token = proof();
    claim_and_pod(
        &s,
        &ns,
        "writer",
        &sc,
        false,
        &format!("echo {token} > /data/proof && sync && exec sleep 3600"),
    )
    .await;
    let pod = running_pod(&s, &ns, "writer").await;
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(k.name.as_str())
    );
    let pv = bound_pv(&s, &ns, "writer").await;

    // The pod's write is on disklet's disk: read from the host's mount of it.
    let vol = local_path(&pv);
    let file = vol.join("proof");
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_to_string(&file)
        .map(|t| t.trim().to_string())
        .ok()
        != Some(token.clone())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never held the pod's write",
            file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Through kubelet's own bind mount of the volume into the pod.
    let mounted = pod_volume_dir(k, &pod, &pv);
    assert!(
        is_mount_point(&mounted),
        "kubelet did not mount {}",
        mounted.display()
    );
    assert_eq!(
        std::fs::read_to_string(mounted.join("proof"))
            .unwrap()
            .trim(),
        token
    );

    // Deleting the pod: kubelet unmounts before the pod object goes.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "writer").await;
    wait_gone(&pods, "writer", "the writer pod gone", WAIT).await;
    assert!(
        !is_mount_point(&mounted),
        "kubelet left {} mounted",
        mounted.display()
    );

    // Deleting the claim: the PV is released and recycled; the fresh volume
    // on the same disk is empty.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "writer").await;
    wait_gone(&pvs(&s), &name_of(&pv), "the released PV recycled", WAIT).await;
    let fresh = available(&s, &[&k.name], 1).await.remove(0);
    assert_ne!(name_of(&fresh), name_of(&pv));
    assert_eq!(
        std::fs::read_dir(local_path(&fresh)).unwrap().count(),
        0,
        "the fresh volume is empty"
    );
    let ev = events_about(&s, &name_of(&pv)).await;
    let ev_node = events_about(&s, &k.name).await;
    assert!(
        ev.iter().chain(&ev_node).any(|(_, r, _)| r == "Recycled"),
        "{ev:?} {ev_node:?}"
    );
    drop(rig);
}
