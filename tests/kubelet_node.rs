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
use kube::api::{Api, DeleteParams};
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
    let _node = exclusive().await;
    let s = Scope::with_kubelet("fs-pod").await;
    let k = s.kubelet_node();
    let (sc, rig, ns) = fast_disk(&s).await;
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
    wait_file(&vol.join("proof"), &token);
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
    let fresh = available_of(&s, &k.name, &sc, 1).await.remove(0);
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
    clear_pods(&s, &ns).await;
    drop(rig);
}

/// Polls `f` every 100 ms until it gives `Ok`; after WAIT, fails with the
/// last `Err` it gave (what is still not so).
fn until<T>(mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match f() {
            Ok(v) => return v,
            Err(why) => assert!(std::time::Instant::now() < deadline, "{why}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The pod's log once it has two lines (kubelet's own `kubectl logs` path).
fn wait_logs(s: &Scope, ns: &str, pod: &str) -> String {
    until(|| {
        let out = s.cluster.kubectl(&["-n", ns, "logs", pod]);
        if out.lines().count() >= 2 {
            Ok(out)
        } else {
            Err(format!("pod {pod} logged only {out:?}"))
        }
    })
}

/// Polls until `file` holds `want` (the pod's write reaching the disk).
fn wait_file(file: &std::path::Path, want: &str) {
    until(|| {
        let now = std::fs::read_to_string(file).map(|t| t.trim().to_string());
        match now {
            Ok(t) if t == want => Ok(()),
            _ => Err(format!("{} never held {want}", file.display())),
        }
    })
}

/// Polls until `file`'s content is no longer `old` (a running writer).
fn wait_changed(file: &std::path::Path, old: &str) -> String {
    until(|| {
        let now = std::fs::read_to_string(file).unwrap_or_default();
        if now != old {
            Ok(now)
        } else {
            Err(format!("{} stopped changing", file.display()))
        }
    })
}

/// A class `fast` with one 320 MiB loop on the kubelet node and its agent,
/// the disk's PV Available, and a namespace for the test's pods: (class,
/// rig, namespace).
async fn fast_disk(s: &Scope) -> (String, NodeRig, String) {
    let k = s.kubelet_node();
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .kubelet_rig(|d| loop_config(d, "", &[("fast", &sc, "disks", "")]))
        .await;
    rig.disk("disks", "d1", 320);
    available_of(s, &k.name, &sc, 1).await;
    let ns = s.namespace("app").await;
    (sc, rig, ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_volume_kubelet_still_mounts_is_wiped_only_after_kubelets_unmount() {
    if skip_unless_root(
        "a_released_volume_kubelet_still_mounts_is_wiped_only_after_kubelets_unmount",
    ) {
        return;
    }
    let _node = exclusive().await;
    let s = Scope::with_kubelet("held").await;
    let k = s.kubelet_node();
    let (sc, rig, ns) = fast_disk(&s).await;
    let token = proof();
    claim_and_pod(
        &s,
        &ns,
        "holder",
        &sc,
        false,
        &format!("echo {token} > /data/proof && sync && while true; do date +%s%N > /data/beat; sleep 0.1; done"),
    )
    .await;
    let pod = running_pod(&s, &ns, "holder").await;
    let pv = bound_pv(&s, &ns, "holder").await;
    let vol = local_path(&pv);
    wait_file(&vol.join("proof"), &token);
    let mounted = pod_volume_dir(k, &pod, &pv);
    assert!(is_mount_point(&mounted));

    // kubelet frozen: the pod is force-deleted from the API and its claim
    // deleted, so the PV is Released while kubelet's mount of it stays and
    // the container still writes through it.
    let frozen = Frozen::new(k);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    pods.delete(
        "holder",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    wait_gone(&pods, "holder", "the holder pod gone from the API", WAIT).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "holder").await;
    wait_for(&pvs(&s), &name_of(&pv), "the PV Released", WAIT, |p| {
        phase(p) == "Released"
    })
    .await;
    rig.agent().wait_log("VolumeInUse");
    let beat = std::fs::read_to_string(vol.join("beat")).unwrap();
    wait_changed(&vol.join("beat"), &beat);
    assert_eq!(
        std::fs::read_to_string(vol.join("proof")).unwrap().trim(),
        token,
        "a volume kubelet still mounts is never wiped"
    );
    assert!(is_mount_point(&mounted));
    let ev = events_about(&s, &name_of(&pv)).await;
    assert!(
        ev.iter().any(|(t, r, n)| t == "Warning"
            && r == "VolumeInUse"
            && n.contains(mounted.to_str().unwrap())),
        "{ev:?}"
    );

    // kubelet resumes: it kills the orphaned container and unmounts; only
    // then is the volume recycled.
    drop(frozen);
    wait_gone(&pvs(&s), &name_of(&pv), "the released PV recycled", WAIT).await;
    assert!(
        !is_mount_point(&mounted),
        "recycled while {} was mounted",
        mounted.display()
    );
    let fresh = available_of(&s, &k.name, &sc, 1).await.remove(0);
    assert_eq!(
        std::fs::read_dir(local_path(&fresh)).unwrap().count(),
        0,
        "the fresh volume is empty"
    );
    clear_pods(&s, &ns).await;
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_pod_writes_the_raw_disk_and_the_next_tenant_reads_zeroes() {
    if skip_unless_root("a_block_pod_writes_the_raw_disk_and_the_next_tenant_reads_zeroes") {
        return;
    }
    let _node = exclusive().await;
    let s = Scope::with_kubelet("block-pod").await;
    let k = s.kubelet_node();
    let sc = s.storage_class("raw", json!({})).await;
    let mut rig = s
        .kubelet_rig(|d| {
            std::fs::create_dir_all(d.join("blockdir")).unwrap();
            format!(
                "{}  - name: raw\n    storageClassName: {sc}\n    volumeMode: Block\n    discoveryDirs: [{}/blockdir]\n",
                loop_config(d, "", &[]),
                d.display()
            )
        })
        .await;
    let raw_dev = rig.disk("raw", "r1", 128).path().to_string();
    std::os::unix::fs::symlink(&raw_dev, rig.path().join("blockdir/r1")).unwrap();
    let first = available_of(&s, &k.name, &sc, 1).await.remove(0);
    assert_eq!(
        first.spec.as_ref().unwrap().volume_mode.as_deref(),
        Some("Block")
    );
    let ns = s.namespace("app").await;
    let token = proof();
    // The container sees the device at /dev/xvda and writes the token at
    // offset 0, one 4 KiB block, flushed to the disk.
    claim_and_pod(
        &s,
        &ns,
        "blk",
        &sc,
        true,
        &format!("printf %s {token} | dd of=/dev/xvda bs=4096 conv=sync,fsync && exec sleep 3600"),
    )
    .await;
    running_pod(&s, &ns, "blk").await;
    let pv = bound_pv(&s, &ns, "blk").await;
    assert_eq!(name_of(&pv), name_of(&first));
    until(|| {
        let head = std::fs::read(&raw_dev).unwrap();
        if head.starts_with(token.as_bytes()) {
            Ok(())
        } else {
            Err(format!("the pod's bytes never reached {raw_dev}"))
        }
    });

    // Pod and claim deleted: kubelet unmaps the device, disklet cleans it
    // and publishes it again; the next tenant reads zeroes where the first
    // one wrote.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "blk").await;
    wait_gone(&pods, "blk", "the block pod gone", WAIT).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "blk").await;
    wait_for(
        &pvs(&s),
        &name_of(&first),
        "the raw PV published again, a new object",
        WAIT,
        |p| p.metadata.uid != first.metadata.uid && phase(p) == "Available",
    )
    .await;
    let head = std::fs::read(&raw_dev).unwrap();
    assert!(
        head[..1 << 20].iter().all(|b| *b == 0),
        "the first tenant's bytes are gone"
    );
    claim_and_pod(
        &s,
        &ns,
        "next",
        &sc,
        true,
        "dd if=/dev/xvda bs=4096 count=1 2>/dev/null | od -An -c | head -2; exec sleep 3600",
    )
    .await;
    running_pod(&s, &ns, "next").await;
    let out = wait_logs(&s, &ns, "next");
    // od -c of 4 KiB of zeroes: one line of sixteen \0, then "*".
    assert!(
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .all(|c| c == "\\0"),
        "the next tenant reads: {out}"
    );
    clear_pods(&s, &ns).await;
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_and_agent_restarts_and_a_reboot_bring_the_pod_back_with_its_data() {
    if skip_unless_root("kubelet_and_agent_restarts_and_a_reboot_bring_the_pod_back_with_its_data")
    {
        return;
    }
    let _node = exclusive().await;
    let s = Scope::with_kubelet("reboot-pod").await;
    let k = s.kubelet_node();
    let (sc, mut rig, ns) = fast_disk(&s).await;
    // Every start of the container appends one line: the first one is the
    // first boot's, and stays only if the data does.
    claim_and_pod(
        &s,
        &ns,
        "db",
        &sc,
        false,
        "date +%s%N >> /data/boots && sync && exec sleep 3600",
    )
    .await;
    let pod = running_pod(&s, &ns, "db").await;
    let pv = bound_pv(&s, &ns, "db").await;
    let boots = local_path(&pv).join("boots");
    wait_changed(&boots, "");
    let first = std::fs::read_to_string(&boots).unwrap();
    let mounted = pod_volume_dir(k, &pod, &pv);

    // kubelet and the agent restarted, as after a container restart: the
    // mounts stay, the pod runs on untouched.
    node_script(s.cluster, "kubelet-restart");
    rig.restart();
    rig.agent().wait_log("ready: first reconcile done");
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let now = pods.get("db").await.unwrap();
    let status = now.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(
        status.container_statuses.as_ref().unwrap()[0].restart_count,
        0
    );
    assert!(is_mount_point(&mounted));
    assert_eq!(std::fs::read_to_string(&boots).unwrap(), first);
    let same = pvs(&s).get(&name_of(&pv)).await.unwrap();
    assert_eq!(
        (same.metadata.uid.clone(), phase(&same)),
        (pv.metadata.uid.clone(), "Bound")
    );

    // A reboot: the agent, pods, kubelet and containerd gone with every
    // mount (the agent's of the disk too); then all start again. The agent
    // mounts the disk at the same path, kubelet starts the pod again on it.
    drop(rig.agent.take());
    support::agent::MountSweeper(rig.path().join("hostdir")).sweep();
    assert!(!boots.exists(), "the disk is unmounted as by a reboot");
    node_script(s.cluster, "node-reboot");
    rig.restart();
    let again = until(|| {
        let text = std::fs::read_to_string(&boots).unwrap_or_default();
        if text.lines().count() >= 2 {
            Ok(text)
        } else {
            Err(format!("the pod never started again on its data: {text:?}"))
        }
    });
    assert!(
        again.starts_with(&first),
        "the first boot's line is kept: {again:?}"
    );
    let pod = running_pod(&s, &ns, "db").await;
    assert!(is_mount_point(&pod_volume_dir(k, &pod, &pv)));
    let same = pvs(&s).get(&name_of(&pv)).await.unwrap();
    assert_eq!(same.metadata.uid, pv.metadata.uid, "the same PV throughout");
    clear_pods(&s, &ns).await;
    drop(rig);
}

/// The mount points of `dev` in this process's mount table.
fn mounts_of(dev: &str) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    let id = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some(id.as_str()))
        .map(|l| l.split(' ').nth(4).unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_formats_a_publish_fs_type_disk_and_disklet_keeps_then_wipes_it() {
    if skip_unless_root("kubelet_formats_a_publish_fs_type_disk_and_disklet_keeps_then_wipes_it") {
        return;
    }
    // A raw publish needs a path that survives reboots, a /dev/disk/by-id
    // link: udevd makes one for this test's loop, by a rule of the test's.
    let Some(_udevd) = Udevd::start() else {
        eprintln!("SKIPPED kubelet_formats_a_publish_fs_type_disk_and_disklet_keeps_then_wipes_it: systemd-udevd is not installed (apt-get install udev)");
        return;
    };
    let _node = exclusive().await;
    let s = Scope::with_kubelet("fstype-pod").await;
    let k = s.kubelet_node();
    let sc = s.storage_class("byk", json!({})).await;
    let mut rig = s
        .kubelet_rig(|d| {
            loop_config(
                d,
                "",
                &[("byk", &sc, "disks", "fsType: ext4\npublishFsType: true")],
            )
        })
        .await;
    let tag = format!("disklet-kubelet-{}", std::process::id());
    let _rule = UdevRule::new(
        &format!("99-{tag}.rules"),
        &format!(
            "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"loop*\", ATTR{{loop/backing_file}}==\"{}/*\", SYMLINK+=\"disk/by-id/{tag}-$kernel\"\n",
            rig.path().join("disks").display()
        ),
    );
    let lp = rig.disk("disks", "k1", 320);
    let (dev, link) = (
        lp.path().to_string(),
        format!("/dev/disk/by-id/{tag}-{}", lp.name()),
    );
    let first = available_of(&s, &k.name, &sc, 1).await.remove(0);
    let local = first.spec.as_ref().unwrap().local.as_ref().unwrap();
    assert_eq!(
        (local.path.as_str(), local.fs_type.as_deref()),
        (link.as_str(), Some("ext4"))
    );
    assert_eq!(
        support::agent::blkid(&dev, "TYPE"),
        "",
        "disklet published it raw"
    );
    let ns = s.namespace("app").await;
    let token = proof();
    claim_and_pod(
        &s,
        &ns,
        "w",
        &sc,
        false,
        &format!("echo {token} > /data/proof && sync && exec sleep 3600"),
    )
    .await;
    running_pod(&s, &ns, "w").await;
    let pv = bound_pv(&s, &ns, "w").await;
    assert_eq!(name_of(&pv), name_of(&first));
    // kubelet made the filesystem and mounted the disk itself.
    assert_eq!(
        support::agent::blkid(&dev, "TYPE"),
        "ext4",
        "kubelet formatted it"
    );
    let at = mounts_of(&dev);
    let global = at
        .iter()
        .find(|m| m.starts_with(k.root.to_str().unwrap()))
        .unwrap_or_else(|| panic!("kubelet has no mount of {dev}: {at:?}"));
    wait_file(&std::path::Path::new(global).join("proof"), &token);

    // A new agent finds the disk with kubelet's filesystem on it: the PV's,
    // kept as it is (not withdrawn, not refused as foreign, not touched).
    let uuid = support::agent::blkid(&dev, "UUID");
    rig.restart();
    rig.agent().wait_log("ready: first reconcile done");
    let still = pvs(&s).get(&name_of(&pv)).await.unwrap();
    assert_eq!(
        (still.metadata.uid.clone(), phase(&still)),
        (pv.metadata.uid.clone(), "Bound")
    );
    assert_eq!(
        support::agent::blkid(&dev, "UUID"),
        uuid,
        "kubelet's filesystem untouched"
    );

    // Released: kubelet unmounts, disklet wipes kubelet's filesystem and
    // publishes the disk raw again; the next claim gets a fresh one.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "w").await;
    wait_gone(&pods, "w", "the pod gone", WAIT).await;
    // kubelet unmounts the device's global mount after the pod object goes.
    until(|| match mounts_of(&dev) {
        m if m.is_empty() => Ok(()),
        m => Err(format!("kubelet left {dev} mounted: {m:?}")),
    });
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "w").await;
    wait_for(
        &pvs(&s),
        &name_of(&first),
        "the PV published again, a new object",
        WAIT,
        |p| p.metadata.uid != first.metadata.uid && phase(p) == "Available",
    )
    .await;
    assert_eq!(
        support::agent::blkid(&dev, "TYPE"),
        "",
        "kubelet's filesystem wiped"
    );
    claim_and_pod(
        &s,
        &ns,
        "n",
        &sc,
        false,
        "ls -A /data; echo end; exec sleep 3600",
    )
    .await;
    running_pod(&s, &ns, "n").await;
    let out = wait_logs(&s, &ns, "n");
    assert!(
        !out.contains("proof"),
        "the next tenant sees the first one's file: {out}"
    );
    assert_ne!(
        support::agent::blkid(&dev, "UUID"),
        uuid,
        "a filesystem of its own"
    );
    clear_pods(&s, &ns).await;
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csi_volume_is_staged_and_published_by_the_real_kubelet() {
    if skip_unless_root("a_csi_volume_is_staged_and_published_by_the_real_kubelet") {
        return;
    }
    use k8s_openapi::api::storage::v1::CSINode;
    use support::csi_cluster::*;
    let _node = exclusive().await;
    let s = Scope::with_kubelet("csi-pod").await;
    let k = s.kubelet_node();
    let sc = csi_class(
        &s,
        "csi",
        json!({"volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    let pool_sc = s.storage_class("pool", json!({})).await;
    let node = csi_kubelet_node(&s, &pool_sc, 1024).await;
    // kubelet registered the driver (through the registrar) and asked it
    // for its node info: the CSINode is kubelet's.
    let csinodes: Api<CSINode> = Api::all(s.client.clone());
    let cn = wait_for(
        &csinodes,
        &k.name,
        "kubelet's CSINode with disklet's driver",
        WAIT,
        |n| n.spec.drivers.iter().any(|d| d.name == DRIVER),
    )
    .await;
    let d = cn.spec.drivers.iter().find(|d| d.name == DRIVER).unwrap();
    assert_eq!(d.node_id, k.name);
    assert_eq!(
        d.topology_keys.as_deref(),
        Some(&["kubernetes.io/hostname".to_string()][..])
    );
    let free = wait_capacity(&s, &sc, &k.name, |c| c > 0).await;

    let ns = s.namespace("app").await;
    let token = proof();
    claim_and_pod(
        &s,
        &ns,
        "c",
        &sc,
        false,
        &format!("echo {token} > /data/proof && sync && exec sleep 3600"),
    )
    .await;
    let pod = running_pod(&s, &ns, "c").await;
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(k.name.as_str())
    );
    let pv = bound_pv(&s, &ns, "c").await;
    assert_eq!(
        pv.spec.as_ref().unwrap().csi.as_ref().unwrap().driver,
        DRIVER
    );
    // kubelet's own staging and publish mounts, and the pod's write in the
    // volume as the host sees it there.
    let target = k
        .root
        .join("pods")
        .join(pod.metadata.uid.as_deref().unwrap())
        .join("volumes/kubernetes.io~csi")
        .join(name_of(&pv))
        .join("mount");
    assert!(
        is_mount_point(&target),
        "kubelet did not publish at {}",
        target.display()
    );
    wait_file(&target.join("proof"), &token);
    let staged = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(k.root.join("plugins/kubernetes.io/csi").to_str().unwrap()))
        .count();
    assert!(
        staged >= 1,
        "kubelet staged nothing under plugins/kubernetes.io/csi"
    );
    let used = wait_capacity(&s, &sc, &k.name, |c| c < free).await;
    assert!(used < free);

    // The pod deleted: kubelet unpublishes and unstages through the driver;
    // the claim deleted: csi-provisioner deletes the volume, capacity is back.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    delete(&pods, "c").await;
    wait_gone(&pods, "c", "the pod gone", WAIT).await;
    assert!(
        !is_mount_point(&target),
        "kubelet left {} published",
        target.display()
    );
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "c").await;
    wait_gone(&pvs(&s), &name_of(&pv), "the CSI PV deleted", WAIT).await;
    wait_capacity(&s, &sc, &k.name, |c| c == free).await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_held_terminating_keeps_its_volume_until_the_pod_is_gone() {
    if skip_unless_root("a_pod_held_terminating_keeps_its_volume_until_the_pod_is_gone") {
        return;
    }
    use kube::api::{Patch, PatchParams};
    let _node = exclusive().await;
    let s = Scope::with_kubelet("terminating").await;
    let k = s.kubelet_node();
    let (sc, mut rig, ns) = fast_disk(&s).await;
    let token = proof();
    claim_and_pod(
        &s,
        &ns,
        "held",
        &sc,
        false,
        &format!("echo {token} > /data/proof && sync && exec sleep 3600"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let hold = |on: bool| {
        let f: Vec<&str> = if on {
            vec!["disklet.test/hold"]
        } else {
            vec![]
        };
        json!({"metadata": {"finalizers": f}})
    };
    pods.patch("held", &PatchParams::default(), &Patch::Merge(hold(true)))
        .await
        .unwrap();
    let pod = running_pod(&s, &ns, "held").await;
    let pv = bound_pv(&s, &ns, "held").await;
    let vol = local_path(&pv);
    wait_file(&vol.join("proof"), &token);
    let mounted = pod_volume_dir(k, &pod, &pv);

    // The claim deleted, then the pod: the pod object stays Terminating (the
    // finalizer), kubelet stops its container and unmounts the volume, and
    // the claim stays too (pvc-protection counts every pod object naming
    // it), so the PV stays Bound and disklet leaves the data alone.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    delete(&pvcs, "held").await;
    delete(&pods, "held").await;
    until(|| match is_mount_point(&mounted) {
        false => Ok(()),
        true => Err(format!("kubelet never unmounted {}", mounted.display())),
    });
    let p = pods.get("held").await.unwrap();
    assert!(
        p.metadata.deletion_timestamp.is_some(),
        "the pod is held Terminating"
    );
    rig.restart();
    rig.agent().wait_log("ready: first reconcile done");
    let now = pvs(&s).get(&name_of(&pv)).await.unwrap();
    assert_eq!(phase(&now), "Bound", "released while its pod still exists");
    assert_eq!(
        std::fs::read_to_string(vol.join("proof")).unwrap().trim(),
        token
    );

    // The finalizer removed: the pod goes, then the claim; the PV is released
    // and recycled.
    pods.patch("held", &PatchParams::default(), &Patch::Merge(hold(false)))
        .await
        .unwrap();
    wait_gone(&pods, "held", "the held pod gone", WAIT).await;
    wait_gone(&pvs(&s), &name_of(&pv), "the released PV recycled", WAIT).await;
    let fresh = available_of(&s, &k.name, &sc, 1).await.remove(0);
    assert_eq!(
        std::fs::read_dir(local_path(&fresh)).unwrap().count(),
        0,
        "the fresh volume is empty"
    );
    clear_pods(&s, &ns).await;
    drop(rig);
}
