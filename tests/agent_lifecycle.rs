//! A volume's whole life, end to end: the real `disklet run` binary, the fake
//! API server, the test binder standing in for the PV controller, real loop
//! devices. Bind, write, release, recycle; Retain; a pod's mount blocking the
//! wipe; disks that vanish and return.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use support::agent::{blkid, Agent, Env, MountSweeper};
use support::binder::{self, Binder};
use support::*;

const SEL: &str = "disklet.io/node=node-a";
const T: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n  - name: keep\n    storageClassName: local-keep\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/keep/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

async fn setup() -> (Env, MountSweeper, Binder) {
    let env = support::agent::env().await;
    env.server
        .store()
        .create(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "local-keep"},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain"
        }))
        .await
        .unwrap();
    let sweep = MountSweeper(env.path().to_path_buf());
    let b = Binder::start(env.client.clone());
    (env, sweep, b)
}

fn path_of(pv: &PersistentVolume) -> PathBuf {
    PathBuf::from(&pv.spec.as_ref().unwrap().local.as_ref().unwrap().path)
}

fn name_of(pv: &PersistentVolume) -> String {
    pv.metadata.name.clone().unwrap()
}

fn phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> Option<&'a str> {
    pv.metadata.annotations.as_ref()?.get(k).map(String::as_str)
}

/// Waits for one Available PV of a class and returns it.
async fn available(env: &Env, class: &str, not: &[String]) -> PersistentVolume {
    let pvs = env
        .wait_pvs(SEL, &format!("an Available {class} PV"), |p| {
            p.iter().any(|pv| {
                phase(pv) == "Available"
                    && pv.metadata.labels.as_ref().unwrap()["disklet.io/class"] == class
                    && !not.contains(&name_of(pv))
            })
        })
        .await;
    pvs.into_iter()
        .find(|pv| {
            phase(pv) == "Available"
                && pv.metadata.labels.as_ref().unwrap()["disklet.io/class"] == class
                && !not.contains(&name_of(pv))
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_write_release_recycle_and_a_pod_mount_blocks_the_wipe() {
    if skip_unless_root("bind_write_release_recycle_and_a_pod_mount_blocks_the_wipe") {
        return;
    }
    let (env, _sweep, _binder) = setup().await;
    let agent = Agent::start(&env, "agent", "node-a", &config(env.path()));
    let lp = Loop::new(&env.path().join("disks"), "d1", 320);
    lp.assert_ours();

    // A StatefulSet's claim lands on the disk; its pod writes.
    let first = available(&env, "fast", &[]).await;
    binder::claim(
        &env.client,
        "default",
        "data-db-0",
        "local-fast",
        "200Mi",
        Some("node-a"),
    )
    .await
    .unwrap();
    let bound = binder::wait_bound(&env.client, "default", "data-db-0", T)
        .await
        .unwrap();
    assert_eq!(name_of(&bound), name_of(&first));
    let vol = path_of(&bound);
    std::fs::write(vol.join("secret.db"), "tenant one's data").unwrap();
    std::fs::create_dir_all(vol.join("wal/2026")).unwrap();
    std::fs::write(vol.join("wal/2026/0001"), "more").unwrap();

    // kubelet still has the volume bind-mounted into a pod when the claim goes.
    let pod_mount = env
        .path()
        .join("kubelet/pods/7f1c/volumes/kubernetes.io~local-volume")
        .join(name_of(&bound));
    std::fs::create_dir_all(&pod_mount).unwrap();
    sh(&[
        "mount",
        "--bind",
        vol.to_str().unwrap(),
        pod_mount.to_str().unwrap(),
    ]);
    binder::delete_claim(&env.client, "default", "data-db-0")
        .await
        .unwrap();
    binder::wait_phase(&env.client, &name_of(&bound), "Released", T)
        .await
        .unwrap();
    agent.wait_log("VolumeInUse");
    assert_eq!(
        std::fs::read_to_string(vol.join("secret.db")).unwrap(),
        "tenant one's data",
        "never wiped while a pod uses it"
    );
    let events = env.events().await;
    assert!(
        events.iter().any(|(t, r, n)| t == "Warning"
            && r == "VolumeInUse"
            && n.contains(pod_mount.to_str().unwrap())),
        "{events:?}"
    );

    // The pod lets go: cleaned, the old PV deleted, a fresh one published.
    sh(&["umount", pod_mount.to_str().unwrap()]);
    let fresh = available(&env, "fast", &[name_of(&bound)]).await;
    let all = env.wait_pvs(SEL, "the old PV gone", |p| p.len() == 1).await;
    assert_eq!(name_of(&all[0]), name_of(&fresh));
    assert_ne!(
        ann(&fresh, "disklet.io/fs-uuid"),
        ann(&bound, "disklet.io/fs-uuid"),
        "a new filesystem"
    );
    let new_vol = path_of(&fresh);
    assert!(new_vol.is_dir());
    assert_eq!(
        std::fs::read_dir(&new_vol).unwrap().count(),
        0,
        "no old file visible"
    );
    assert!(!vol.exists(), "the old path is gone with the old mount");
    assert_eq!(
        blkid(lp.path(), "UUID"),
        ann(&fresh, "disklet.io/fs-uuid").unwrap()
    );
    let events = env.events().await;
    assert!(events.iter().any(|(_, r, _)| r == "Recycled"), "{events:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_the_data() {
    if skip_unless_root("retain_keeps_the_data") {
        return;
    }
    let (env, _sweep, _binder) = setup().await;
    let agent = Agent::start(&env, "agent", "node-a", &config(env.path()));
    let _lp = Loop::new(&env.path().join("keep"), "k1", 320);
    available(&env, "keep", &[]).await;
    binder::claim(
        &env.client,
        "default",
        "keep-0",
        "local-keep",
        "100Mi",
        Some("node-a"),
    )
    .await
    .unwrap();
    let bound = binder::wait_bound(&env.client, "default", "keep-0", T)
        .await
        .unwrap();
    std::fs::write(path_of(&bound).join("keepme"), "x").unwrap();
    binder::delete_claim(&env.client, "default", "keep-0")
        .await
        .unwrap();
    binder::wait_phase(&env.client, &name_of(&bound), "Released", T)
        .await
        .unwrap();
    let pvs = env
        .wait_pvs(SEL, "the Retain annotation", |p| {
            p.iter()
                .any(|pv| ann(pv, "disklet.io/reclaim") == Some("retained"))
        })
        .await;
    assert_eq!(pvs.len(), 1, "no fresh PV: the disk is not free");
    assert_eq!(
        std::fs::read_to_string(path_of(&bound).join("keepme")).unwrap(),
        "x"
    );
    let events = env.events().await;
    assert_eq!(
        events.iter().filter(|(_, r, _)| r == "Retained").count(),
        1,
        "{events:?}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_that_vanish_and_return() {
    if skip_unless_root("disks_that_vanish_and_return") {
        return;
    }
    let (env, _sweep, _binder) = setup().await;
    let cfg = config(env.path());
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    let disks = env.path().join("disks");
    let a = Loop::new(&disks, "a", 320);
    let b = Loop::new(&disks, "b", 320);
    let pvs = env
        .wait_pvs(SEL, "two PVs", |p| {
            p.iter().filter(|pv| phase(pv) == "Available").count() == 2
        })
        .await;
    let pv_of = |l: &Loop| {
        pvs.iter()
            .find(|p| {
                ann(p, "disklet.io/device-id") == Some(&format!("loop-file:{}", l.file.display()))
            })
            .cloned()
            .unwrap()
    };
    let (pa, pb) = (pv_of(&a), pv_of(&b));
    binder::claim(
        &env.client,
        "default",
        "c-b",
        "local-fast",
        "100Mi",
        Some("node-a"),
    )
    .await
    .unwrap();
    // The binder picks one of the two equal PVs; find which.
    let bound = binder::wait_bound(&env.client, "default", "c-b", T)
        .await
        .unwrap();
    let (avail_loop, avail_pv, bound_loop) = if name_of(&bound) == name_of(&pb) {
        (a, pa, b)
    } else {
        (b, pb, a)
    };

    // Both disks are pulled while the agent is down (a real pull also takes
    // the mount's device away).
    agent.kill();
    MountSweeper(env.path().join("hostdir")).sweep();
    let (avail_file, bound_file) = (avail_loop.file.clone(), bound_loop.file.clone());
    drop(avail_loop);
    drop(bound_loop);
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    let pvs = env
        .wait_pvs(
            SEL,
            "the Available PV withdrawn, the Bound one marked",
            |p| p.len() == 1 && ann(&p[0], "disklet.io/device-state") == Some("missing"),
        )
        .await;
    assert_eq!(
        name_of(&pvs[0]),
        name_of(&bound),
        "a Bound PV is never deleted for a missing disk"
    );
    let events = env.events().await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "DeviceMissing"),
        "{events:?}"
    );

    // The same disks come back, under whatever loop numbers.
    let back_a = Loop::new(
        avail_file.parent().unwrap(),
        avail_file.file_stem().unwrap().to_str().unwrap(),
        320,
    );
    let back_b = Loop::new(
        bound_file.parent().unwrap(),
        bound_file.file_stem().unwrap().to_str().unwrap(),
        320,
    );
    let pvs = env
        .wait_pvs(SEL, "the withdrawn PV back and the mark cleared", |p| {
            p.len() == 2
                && p.iter()
                    .all(|pv| ann(pv, "disklet.io/device-state").is_none())
        })
        .await;
    assert!(
        pvs.iter().any(|p| name_of(p) == name_of(&avail_pv)),
        "same disk, same PV name"
    );
    assert!(pvs.iter().any(|p| name_of(p) == name_of(&bound)));
    drop((agent, back_a, back_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_dir_volume_is_cleaned_file_by_file_and_published_again() {
    if skip_unless_root("a_discovery_dir_volume_is_cleaned_file_by_file_and_published_again") {
        return;
    }
    let (env, _sweep, _binder) = setup().await;
    let d = env.path().display().to_string();
    let cfg = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: dirs\n    storageClassName: local-fast\n    discoveryDirs: [{d}/discovery]\n"
    );
    std::fs::create_dir_all(env.path().join("discovery")).unwrap();
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    let lp = Loop::new(&env.path().join("prepared"), "p1", 128);
    sh(&["mkfs.ext4", "-q", lp.path()]);
    let entry = env.path().join("discovery/vol1");
    let _m = Mounted::new(lp.path(), &entry);
    let first = available(&env, "dirs", &[]).await;
    assert_eq!(
        ann(&first, "disklet.io/device-id"),
        Some(format!("loop-file:{}", lp.file.display()).as_str())
    );
    binder::claim(
        &env.client,
        "default",
        "d-0",
        "local-fast",
        "50Mi",
        Some("node-a"),
    )
    .await
    .unwrap();
    let bound = binder::wait_bound(&env.client, "default", "d-0", T)
        .await
        .unwrap();
    std::fs::create_dir_all(entry.join("a/b")).unwrap();
    std::fs::write(entry.join("a/b/old"), "old tenant").unwrap();
    // A symlink out of the volume: the cleanup must unlink it, not follow it.
    let outside = env.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "not the volume's").unwrap();
    std::os::unix::fs::symlink(&outside, entry.join("escape")).unwrap();
    binder::delete_claim(&env.client, "default", "d-0")
        .await
        .unwrap();

    let again = env
        .wait_pvs(SEL, "the PV published again with a new uid", |p| {
            p.len() == 1 && p[0].metadata.uid != bound.metadata.uid && phase(&p[0]) == "Available"
        })
        .await;
    assert_eq!(name_of(&again[0]), name_of(&bound), "same entry, same name");
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
    drop(agent);
}
