//! The CSI mode end to end, through the real control plane and the real
//! sidecars: kube-scheduler placing pods from CSIStorageCapacity,
//! csi-provisioner (`--node-deployment --enable-capacity`), csi-snapshotter
//! (`--node-deployment`) with snapshot-controller
//! (`--enable-distributed-snapshotting`) and the VolumeSnapshot CRDs, and
//! csi-resizer, all built from their Go modules by `scripts/test-cluster.sh
//! build`. Each kwok Node has its own agent (`disklet run`, which takes the
//! pool disk), its own `disklet csi` and its own sidecars, run with tokens of
//! deploy/overlays/csi's ServiceAccount bound to that node's DaemonSet pod,
//! as in the overlay.
//!
//! kwok runs no kubelet, so the test does kubelet's part where one is needed:
//! it registers the driver in each Node's CSINode (as node-driver-registrar
//! and kubelet would) and calls NodeStageVolume, NodePublishVolume and
//! NodeExpandVolume on the driver's socket with kubelet's paths, to write and
//! read the volumes' contents. (The real kubelet is issue 16.)
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use disklet::csi::proto::NodePublishVolumeRequest;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::cluster::*;
use support::csi_cluster::*;

/// Fills a file of `mib` MiB at `path` with `byte`, synced.
fn fill(path: &Path, byte: u8, mib: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let buf = vec![byte; MIB as usize];
    for _ in 0..mib {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// How many bytes of `path` are not zero.
fn nonzero_bytes(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0;
    loop {
        let got = f.read(&mut buf).unwrap();
        if got == 0 {
            return n;
        }
        n += buf[..got].iter().filter(|b| **b != 0).count() as u64;
    }
}

fn fs_bytes(target: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(target).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// No request of the csi DaemonSet's ServiceAccount was refused.
fn assert_no_refusals(s: &Scope) {
    let refused: Vec<String> = s
        .cluster
        .audit()
        .into_iter()
        .filter(|a| a.user.ends_with(":disklet-csi") && a.code == 403)
        .map(|a| format!("{} {} ({})", a.verb, a.uri, a.user_agent))
        .collect();
    assert!(
        refused.is_empty(),
        "RBAC of deploy/overlays/csi refused: {refused:#?}"
    );
}

/// The volumes and snapshots files in a pool.
fn pool_files(pool: &Path) -> BTreeMap<String, u64> {
    ["volumes", "snapshots"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(pool.join("pool").join(d))
                .unwrap()
                .flatten()
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

async fn delete_claim(s: &Scope, ns: &str, pvc: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), ns);
    claims.delete(pvc, &DeleteParams::default()).await.unwrap();
}

/// Waits until no PV named `pv` exists (csi-provisioner deleted it after
/// DeleteVolume).
async fn wait_pv_gone(s: &Scope, pv: &str) {
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    wait_gone(
        &pvs,
        pv,
        &format!("PV {pv} deleted"),
        Duration::from_secs(120),
    )
    .await;
}

// ------------------------------------------------------------------- tests

/// A StatefulSet's claims land where CSIStorageCapacity says they fit; a
/// full node gets no further pod; deleting a claim gives its capacity back
/// and destroys its data, so the next volume on that space reads zeroes.
#[tokio::test(flavor = "multi_thread")]
async fn claims_go_where_capacity_is_and_a_deleted_claims_space_reads_zeroes() {
    let s = Scope::new("csi-capacity").await;
    let n1 = s.name("c1");
    let n2 = s.name("c2");
    let sc = csi_class(
        &s,
        "cap",
        json!({"allowedTopologies": [{"matchLabelExpressions": [
            {"key": "kubernetes.io/hostname", "values": [n1, n2]}]}]}),
    )
    .await;
    let a = csi_node(&s, "c1", &sc, 1024).await;
    let b = csi_node(&s, "c2", &sc, 1024).await;
    let ca = wait_capacity(&s, &sc, &a.rig.node, |c| c > 0).await;
    let cb = wait_capacity(&s, &sc, &b.rig.node, |c| c > 0).await;
    // One volume of this size fits a node's pool, two do not.
    let size = (ca.min(cb) / 2 / MIB) + 32;
    assert!(size * MIB <= ca.min(cb), "capacity {ca} / {cb}");
    eprintln!(
        "CSIStorageCapacity: {} MiB on {}, {} MiB on {}; claims of {size} MiB",
        ca / MIB,
        a.rig.node,
        cb / MIB,
        b.rig.node
    );

    let ns = s.namespace("cap").await;
    create_in(
        &s,
        &ns,
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 2, "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {
                        "tolerations": [{"operator": "Exists"}],
                        "nodeSelector": {"type": "kwok"},
                        "containers": [{"name": "db", "image": "busybox",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    },
                },
                "volumeClaimTemplates": [claim("data", &sc, size, json!({}))],
            },
        }),
    )
    .await;
    let (_, pv0) = bound(&s, &ns, "data-db-0").await;
    let (_, pv1) = bound(&s, &ns, "data-db-1").await;
    let nodes = [pv_node(&pv0), pv_node(&pv1)];
    assert_ne!(
        nodes[0], nodes[1],
        "both claims on one node, though its pool holds one"
    );
    for (pv, node) in [(&pv0, &nodes[0]), (&pv1, &nodes[1])] {
        assert_eq!(pv_bytes(pv), size * MIB, "{}", name_of(pv));
        // HonorPVReclaimPolicy: the PV is not gone before DeleteVolume ran,
        // whichever of claim and PV is deleted first.
        let fin = pv.metadata.finalizers.clone().unwrap_or_default();
        assert!(
            fin.iter()
                .any(|f| f == "external-provisioner.volume.kubernetes.io/finalizer"),
            "{}: finalizers {fin:?}",
            name_of(pv)
        );
        assert!(node == &a.rig.node || node == &b.rig.node, "{node}");
    }
    // The pods run where their volumes are.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    for (i, node) in nodes.iter().enumerate() {
        let p = wait_for(
            &pods,
            &format!("db-{i}"),
            &format!("db-{i} bound to a node"),
            Duration::from_secs(60),
            |p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
        )
        .await;
        assert_eq!(
            p.spec.unwrap().node_name.as_deref(),
            Some(node.as_str()),
            "db-{i}"
        );
    }
    // Each node's published capacity went down by at least the volume.
    let left_a = wait_capacity(&s, &sc, &a.rig.node, |c| c + size * MIB <= ca).await;
    let left_b = wait_capacity(&s, &sc, &b.rig.node, |c| c + size * MIB <= cb).await;
    assert!(left_a < size * MIB && left_b < size * MIB);

    // Both pools are too full for one more: its pod is not scheduled.
    create_in(
        &s,
        &ns,
        claim("extra", &sc, size, json!({"volumeMode": "Block"})),
    )
    .await;
    create_in(&s, &ns, pod_with("extra", "extra", None)).await;
    let p = wait_for(
        &pods,
        "extra",
        "pod extra unschedulable for lack of storage",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.message
                                .as_deref()
                                .is_some_and(|m| m.contains("enough free storage"))
                    })
                })
        },
    )
    .await;
    assert!(p.spec.unwrap().node_name.is_none());
    // It waits elsewhere while the capacity comes back (else it would take
    // that space at once).
    pods.delete("extra", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_gone(&pods, "extra", "pod extra gone", Duration::from_secs(60)).await;

    // db-1's volume gets data, as its pod would write it; then the claim is
    // deleted (StatefulSet scaled down first, its pod gone).
    let node1 = if nodes[1] == a.rig.node { &a } else { &b };
    let t = kubelet_mount(node1, &pv1).await;
    fill(&t.join("data"), 0xA5, size - 64);
    kubelet_unmount(node1, &pv1, &t).await;
    let before = pool_files(&node1.pool);
    s.cluster
        .kubectl(&["-n", &ns, "scale", "statefulset/db", "--replicas=1"]);
    wait_gone(&pods, "db-1", "db-1 gone", Duration::from_secs(60)).await;
    delete_claim(&s, &ns, "data-db-1").await;
    wait_pv_gone(&s, &name_of(&pv1)).await;

    // Its capacity comes back, and the pod that found no room gets that very
    // space.
    let sc_left = if node1.rig.node == a.rig.node {
        left_a
    } else {
        left_b
    };
    let back = wait_capacity(&s, &sc, &node1.rig.node, |c| c >= sc_left + size * MIB).await;
    eprintln!(
        "capacity on {} after deleting a {size} MiB claim: {} -> {} MiB",
        node1.rig.node,
        sc_left / MIB,
        back / MIB
    );
    create_in(&s, &ns, pod_with("extra", "extra", None)).await;
    let (_, pv_extra) = bound(&s, &ns, "extra").await;
    assert_eq!(pv_node(&pv_extra), node1.rig.node);
    let after = pool_files(&node1.pool);
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(new.len(), 1, "before {before:?}, after {after:?}");
    // Read through the volume as its pod would, the whole device: zeroes.
    let dev = kubelet_mount(node1, &pv_extra).await;
    assert_eq!(
        nonzero_bytes(&dev),
        0,
        "a new volume in a deleted one's space reads old data"
    );
    kubelet_unmount(node1, &pv_extra, &dev).await;
    assert_no_refusals(&s);
}

/// Snapshots and clones through csi-snapshotter and csi-provisioner hold
/// their moment's data; a claim grown through csi-resizer shows the new size
/// in its filesystem, online.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_clones_and_growth_through_the_sidecars() {
    let s = Scope::new("csi-snapshots").await;
    let sc = csi_class(
        &s,
        "snap",
        json!({"parameters": {"csi.storage.k8s.io/fstype": "xfs"}}),
    )
    .await;
    let mut node = csi_node(&s, "s1", &sc, 2048).await;
    let n = node.rig.node.clone();
    let ns = s.namespace("snap").await;

    create_in(&s, &ns, claim("src", &sc, 320, json!({}))).await;
    create_in(&s, &ns, pod_with("src", "src", Some(&n))).await;
    let (_, src) = bound(&s, &ns, "src").await;
    let t = kubelet_mount(&node, &src).await;
    std::fs::write(t.join("data"), "the moment of the snapshot").unwrap();
    nix::unistd::sync();

    // The overlay's VolumeSnapshotClass, through the real snapshot stack.
    create_in(
        &s,
        &ns,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
               "metadata": {"name": "snap"},
               "spec": {"volumeSnapshotClassName": "disklet",
                        "source": {"persistentVolumeClaimName": "src"}}}),
    )
    .await;
    let gvk = kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let (ar, _) = kube::discovery::pinned_kind(&s.client, &gvk).await.unwrap();
    let snaps: Api<kube::api::DynamicObject> = Api::namespaced_with(s.client.clone(), &ns, &ar);
    let snap = wait_for(
        &snaps,
        "snap",
        "VolumeSnapshot snap readyToUse",
        Duration::from_secs(120),
        |o| o.data["status"]["readyToUse"] == json!(true),
    )
    .await;
    eprintln!("snapshot: {}", snap.data["status"]);
    // Written after the snapshot: must not be in the restore.
    std::fs::write(t.join("data"), "written after the snapshot").unwrap();
    nix::unistd::sync();

    create_in(
        &s,
        &ns,
        claim(
            "restored",
            &sc,
            320,
            json!({"dataSource": {"apiGroup": "snapshot.storage.k8s.io",
                                  "kind": "VolumeSnapshot", "name": "snap"}}),
        ),
    )
    .await;
    create_in(&s, &ns, pod_with("restored", "restored", Some(&n))).await;
    create_in(
        &s,
        &ns,
        claim(
            "clone",
            &sc,
            320,
            json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}),
        ),
    )
    .await;
    create_in(&s, &ns, pod_with("clone", "clone", Some(&n))).await;
    let (_, restored) = bound(&s, &ns, "restored").await;
    let (_, clone) = bound(&s, &ns, "clone").await;
    let tr = kubelet_mount(&node, &restored).await;
    let tc = kubelet_mount(&node, &clone).await;
    assert_eq!(
        std::fs::read_to_string(tr.join("data")).unwrap(),
        "the moment of the snapshot"
    );
    assert_eq!(
        std::fs::read_to_string(tc.join("data")).unwrap(),
        "written after the snapshot"
    );
    // Three distinct volumes: writing to one changes no other.
    std::fs::write(tc.join("data"), "the clone's own").unwrap();
    assert_eq!(
        std::fs::read_to_string(t.join("data")).unwrap(),
        "written after the snapshot"
    );

    // Online growth: the claim asks for more; csi-resizer records it (the
    // driver grows on the node), kubelet's NodeExpandVolume grows the file,
    // the device and the mounted filesystem.
    // ReadWriteOncePod through the provisioner: the driver gets
    // SINGLE_NODE_SINGLE_WRITER, and a second publish (another pod) is
    // refused while the first holds it.
    create_in(
        &s,
        &ns,
        claim(
            "solo",
            &sc,
            320,
            json!({"accessModes": ["ReadWriteOncePod"]}),
        ),
    )
    .await;
    create_in(&s, &ns, pod_with("solo", "solo", Some(&n))).await;
    let (_, solo) = bound(&s, &ns, "solo").await;
    assert_eq!(
        solo.spec.as_ref().unwrap().access_modes,
        Some(vec!["ReadWriteOncePod".to_string()])
    );
    let ts = kubelet_mount(&node, &solo).await;
    let (mut nc, cap, id) = node_call(&node, &solo).await;
    let second = ts.parent().unwrap().join("second");
    let e = nc
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id,
            staging_target_path: staging_path(&node, &solo).display().to_string(),
            target_path: second.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    kubelet_unmount(&node, &solo, &ts).await;
    Api::<Pod>::namespaced(s.client.clone(), &ns)
        .delete("solo", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    delete_claim(&s, &ns, "solo").await;
    wait_pv_gone(&s, &name_of(&solo)).await;

    let small = fs_bytes(&t);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    claims
        .patch(
            "src",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "448Mi"}}}})),
        )
        .await
        .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    let grown = wait_for(
        &pvs,
        &name_of(&src),
        "the PV's capacity raised by csi-resizer",
        Duration::from_secs(60),
        |pv| pv_bytes(pv) == 448 * MIB,
    )
    .await;
    let pending = wait_for(
        &claims,
        "src",
        "the claim waiting for kubelet's node expansion",
        Duration::from_secs(60),
        |c| {
            c.status
                .as_ref()
                .and_then(|s| s.allocated_resource_statuses.as_ref())
                .and_then(|m| m.get("storage"))
                .map(String::as_str)
                == Some("NodeResizePending")
        },
    )
    .await;
    assert!(pending.status.is_some());
    let got = kubelet_expand(&node, &grown, &t, 448 * MIB).await;
    assert_eq!(got, 448 * MIB);
    let big = fs_bytes(&t);
    assert!(
        big >= small + 128 * MIB * 9 / 10,
        "filesystem {small} -> {big} bytes after growing by 128 MiB"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("data")).unwrap(),
        "written after the snapshot"
    );

    // The CSI pod restarted (driver, sidecars and agent; mounts kept): the
    // published volume is still there, and kubelet's repeated calls are no-ops.
    node.restart();
    assert_eq!(
        std::fs::read_to_string(t.join("data")).unwrap(),
        "written after the snapshot"
    );
    assert_eq!(kubelet_mount(&node, &grown).await, t);
    // A reboot: every mount and loop device gone, the agent mounts the pool
    // again, and kubelet stages and publishes each volume anew: each holds
    // its data, the grown one its new size.
    node.reboot();
    assert!(
        !t.join("data").exists(),
        "the reboot left {} mounted",
        t.display()
    );
    let t = kubelet_mount(&node, &grown).await;
    let tr = kubelet_mount(&node, &restored).await;
    let tc = kubelet_mount(&node, &clone).await;
    for (target, want) in [
        (&t, "written after the snapshot"),
        (&tr, "the moment of the snapshot"),
        (&tc, "the clone's own"),
    ] {
        assert_eq!(std::fs::read_to_string(target.join("data")).unwrap(), want);
    }
    assert!(fs_bytes(&t) >= big, "the growth did not survive the reboot");

    // Everything given back: the pool holds nothing once the claims and the
    // snapshot are gone.
    for (pv, target) in [(&src, &t), (&restored, &tr), (&clone, &tc)] {
        kubelet_unmount(&node, pv, target).await;
    }
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    for p in ["src", "restored", "clone"] {
        pods.delete(p, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
    snaps
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    for c in ["restored", "clone", "src"] {
        delete_claim(&s, &ns, c).await;
    }
    for pv in [&src, &restored, &clone] {
        wait_pv_gone(&s, &name_of(pv)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pool_files(&node.pool).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in the pool: {:?}",
            pool_files(&node.pool)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_refusals(&s);
}
