//! End to end: the real `disklet run` binary against the fake API server, on
//! real loop devices. Every selector names only loops backed by files in the
//! test's own temp dir (`backingFiles`), checked before use.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;
use support::agent::{blkid, metric_sum, proc_mem_kib, Agent, MountSweeper};
use support::*;

fn spec(pv: &PersistentVolume) -> &k8s_openapi::api::core::v1::PersistentVolumeSpec {
    pv.spec.as_ref().unwrap()
}

fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> &'a str {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(k))
        .map(String::as_str)
        .unwrap_or("")
}

fn label<'a>(pv: &'a PersistentVolume, k: &str) -> &'a str {
    pv.metadata
        .labels
        .as_ref()
        .and_then(|a| a.get(k))
        .map(String::as_str)
        .unwrap_or("")
}

fn affinity(pv: &PersistentVolume) -> Vec<(String, Vec<String>)> {
    spec(pv)
        .node_affinity
        .as_ref()
        .unwrap()
        .required
        .as_ref()
        .unwrap()
        .node_selector_terms[0]
        .match_expressions
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e.operator, "In");
            (e.key.clone(), e.values.clone().unwrap())
        })
        .collect()
}

fn config(dir: &Path, extra_classes: &str) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\ntopologyKeys: [topology.kubernetes.io/zone]\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: xfs\n    settleSeconds: 1\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n{extra_classes}",
        d = dir.display()
    )
}

fn mount_of(target: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    disklet::host::mountinfo::parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
        .map(|m| m.source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_publishes_a_correct_pv_that_survives_kill_and_reboot() {
    if skip_unless_root("hot_add_publishes_a_correct_pv_that_survives_kill_and_reboot") {
        return;
    }
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    std::fs::create_dir_all(env.path().join("disks")).unwrap();
    let cfg = config(env.path(), "");
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    agent.wait_log("ready: first reconcile done");

    // Attach while the agent runs.
    let lp = Loop::new(&env.path().join("disks"), "d1", 320);
    lp.assert_ours();
    let sel = "disklet.io/node=node-a";
    let pvs = env
        .wait_pvs(sel, "a PV for the hot-added loop", |p| p.len() == 1)
        .await;
    let pv = &pvs[0];
    let s = spec(pv);

    // The disk now carries our filesystem, mounted where the PV points.
    let uuid = blkid(lp.path(), "UUID");
    assert_eq!(blkid(lp.path(), "TYPE"), "xfs");
    assert_eq!(blkid(lp.path(), "LABEL"), "disklet");
    let target = env.path().join("hostdir/fast").join(&uuid);
    assert_eq!(
        mount_of(&target).as_deref(),
        Some(lp.path()),
        "mounted at <hostDir>/<class>/<uuid>"
    );
    let name = pv.metadata.name.clone().unwrap();
    assert!(
        name.starts_with("disklet-fast-") && name.len() <= 253,
        "{name}"
    );
    assert_eq!(label(pv, "disklet.io/node"), "node-a");
    assert_eq!(label(pv, "disklet.io/class"), "fast");
    assert_eq!(label(pv, "kubernetes.io/hostname"), "host-a-label");
    assert_eq!(ann(pv, "pv.kubernetes.io/provisioned-by"), "disklet");
    assert_eq!(ann(pv, "disklet.io/fs-uuid"), uuid);
    assert_eq!(
        ann(pv, "disklet.io/device-id"),
        format!("loop-file:{}", lp.file.display())
    );
    assert_eq!(
        s.local.as_ref().unwrap().path,
        target.join("vol").to_str().unwrap()
    );
    assert!(target.join("vol").is_dir());
    assert_eq!(s.local.as_ref().unwrap().fs_type, None);
    let fs_size = disklet::host::dirs::fs_capacity(&target).unwrap();
    assert_eq!(
        s.capacity.as_ref().unwrap()["storage"].0,
        disklet::model::quantity::exact(fs_size),
        "capacity is the filesystem's size"
    );
    assert!(fs_size > 250 << 20 && fs_size < 320 << 20);
    assert_eq!(
        s.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    assert_eq!(s.volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(s.storage_class_name.as_deref(), Some("local-fast"));
    assert_eq!(
        s.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete"),
        "from the StorageClass"
    );
    assert_eq!(
        s.mount_options.as_deref(),
        Some(&["noatime".to_string()][..]),
        "from the StorageClass"
    );
    assert_eq!(
        affinity(pv),
        vec![
            (
                "kubernetes.io/hostname".to_string(),
                vec!["host-a-label".to_string()]
            ),
            (
                "topology.kubernetes.io/zone".to_string(),
                vec!["z1".to_string()]
            ),
        ],
        "the hostname *label*, not the node name, plus the topology key"
    );
    let uid = pv.metadata.uid.clone();
    let rv = pv.metadata.resource_version.clone();

    // What a platform team's Prometheus and probes see. Format and mount are
    // recorded before the PV is applied, so they are there now.
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(agent.get("/readyz").0, 200);
    let (code, metrics) = agent.get("/metrics");
    assert_eq!(code, 200);
    for want in [
        "disklet_devices{verdict=\"ours\",reason=\"\"} 1",
        "disklet_format_duration_seconds_count 1",
        "disklet_mount_duration_seconds_count 1",
        "disklet_storageclass_missing{storageclass=\"local-fast\"} 0",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    let events = env.events().await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Normal" && r == "Formatted"),
        "{events:?}"
    );

    // A disk the class names but that holds a filesystem: skipped, and said so.
    // (formatted as a file first: a blank disk here would be disklet's at once)
    let img = env.path().join("disks/foreign.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    sh(&["mkfs.ext4", "-q", "-F", img.to_str().unwrap()]);
    let foreign = Loop::new(&env.path().join("disks"), "foreign", 320);
    agent.wait_log("DiskSkipped");
    let events = env.events().await;
    assert!(
        events.iter().any(|(t, r, n)| t == "Normal"
            && r == "DiskSkipped"
            && n.contains(foreign.path())
            && n.contains("foreign-filesystem: ext4")),
        "{events:?}"
    );
    assert_eq!(
        blkid(foreign.path(), "TYPE"),
        "ext4",
        "never formatted over"
    );

    // SIGKILL and restart: same PV, untouched, disk not reformatted.
    agent.kill();
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    agent.wait_log("ready: first reconcile done");
    let pvs = env
        .wait_pvs(sel, "the same single PV", |p| p.len() == 1)
        .await;
    assert_eq!(pvs[0].metadata.uid, uid);
    assert_eq!(pvs[0].metadata.resource_version, rv, "nothing rewritten");
    assert_eq!(blkid(lp.path(), "UUID"), uuid, "not reformatted");
    // The first reconcile after a restart starts from the listed PVs.
    let (_, metrics) = agent.get("/metrics");
    for want in [
        "disklet_pvs{phase=\"Pending\"} 1",
        "disklet_format_duration_seconds_count 0",
        "disklet_api_calls_total{call=\"get-node\",result=\"ok\"}",
        "disklet_reconciles_total",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    // Every family the README documents is exported, even before it has data.
    for family in [
        "disklet_devices",
        "disklet_pvs",
        "disklet_format_duration_seconds",
        "disklet_mount_duration_seconds",
        "disklet_cleanup_duration_seconds",
        "disklet_reconcile_duration_seconds",
        "disklet_reconciles",
        "disklet_reconcile_errors",
        "disklet_storageclass_missing",
        "disklet_api_calls",
        "disklet_node_info",
        "disklet_node_memory_total_bytes",
        "disklet_node_memory_available_bytes",
        "disklet_node_boot_time_seconds",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family} not exported:\n{metrics}"
        );
    }
    // The process series are the agent's own (its VmRSS, its start), the node
    // series the kernel's.
    let (_, metrics) = agent.get("/metrics");
    let (rss_kib, _) = proc_mem_kib(agent.pid());
    let rss = metric_sum(&metrics, "process_resident_memory_bytes").unwrap();
    assert!(
        (rss - (rss_kib * 1024) as f64).abs() < (16u64 << 20) as f64,
        "process_resident_memory_bytes {rss} against the agent's VmRSS {rss_kib} KiB"
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let info = format!("disklet_node_info{{kernel_version=\"{}\"", release.trim());
    assert!(metrics.contains(&info), "{info} missing from:\n{metrics}");
    assert!(metric_sum(&metrics, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(
        !metrics.contains("apply-pv"),
        "nothing re-applied after a restart:\n{metrics}"
    );

    // Simulated reboot: the agent is gone and so are its mounts.
    agent.kill();
    MountSweeper(env.path().join("hostdir")).sweep();
    assert_eq!(mount_of(&target), None);
    assert!(
        !target.join("vol").exists(),
        "the PV path exists only while mounted"
    );
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    agent.wait_log("mounted");
    agent.wait_log("ready: first reconcile done");
    assert_eq!(mount_of(&target).as_deref(), Some(lp.path()), "remounted");
    assert!(target.join("vol").is_dir());
    let pvs = env
        .wait_pvs(sel, "the same PV after reboot", |p| p.len() == 1)
        .await;
    assert_eq!(pvs[0].metadata.uid, uid);
    assert_eq!(blkid(lp.path(), "UUID"), uuid);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_dirs_raw_without_udev_and_a_missing_storage_class() {
    if skip_unless_root("discovery_dirs_raw_without_udev_and_a_missing_storage_class") {
        return;
    }
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().display().to_string();
    for sub in ["disks", "raw", "nosc", "discovery"] {
        std::fs::create_dir_all(env.path().join(sub)).unwrap();
    }
    let extra = format!(
        "  - name: dirs\n    storageClassName: local-fast\n    discoveryDirs: [{d}/discovery]\n  - name: raw\n    storageClassName: local-fast\n    volumeMode: Block\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/raw/*.img\"], types: [loop]}}\n  - name: nosc\n    storageClassName: missing-sc\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/nosc/*.img\"], types: [loop]}}\n"
    );
    let agent = Agent::start(&env, "agent", "node-a", &config(env.path(), &extra));
    agent.wait_log("ready: first reconcile done");

    // A raw disk for the Block class (no udev here, so no by-id link), and one
    // whose StorageClass is missing; then an admin-prepared mount point
    // appears in the discovery dir.
    let raw = Loop::new(&env.path().join("raw"), "r1", 100);
    let nosc = Loop::new(&env.path().join("nosc"), "n1", 320);
    let pre = Loop::new(&env.path().join("prepared"), "p1", 320);
    sh(&["mkfs.ext4", "-q", pre.path()]);
    let uuid_before = blkid(pre.path(), "UUID");
    let entry = env.path().join("discovery/vol1");
    let _m = Mounted::new(pre.path(), &entry);

    let pvs = env
        .wait_pvs("disklet.io/node=node-a", "the discovery-dir PV", |p| {
            p.iter().any(|pv| label(pv, "disklet.io/class") == "dirs")
        })
        .await;
    let dir_pv = pvs
        .iter()
        .find(|p| label(p, "disklet.io/class") == "dirs")
        .unwrap();
    assert_eq!(
        spec(dir_pv).local.as_ref().unwrap().path,
        entry.to_str().unwrap()
    );
    assert_eq!(spec(dir_pv).volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(
        spec(dir_pv).capacity.as_ref().unwrap()["storage"].0,
        disklet::model::quantity::exact(disklet::host::dirs::fs_capacity(&entry).unwrap())
    );
    assert_eq!(
        ann(dir_pv, "disklet.io/volume-key"),
        format!("dir:{}", entry.display())
    );
    assert_eq!(
        blkid(pre.path(), "UUID"),
        uuid_before,
        "a discovery-dir volume is never formatted"
    );

    // Reports of a pass are published before its PV writes.
    let events = env.events().await;
    assert!(
        pvs.iter().all(|p| label(p, "disklet.io/class") != "raw"),
        "no raw PV by kernel name"
    );
    assert!(
        events
            .iter()
            .any(|(t, r, n)| t == "Warning" && r == "NoStableIdentity" && n.contains(raw.path())),
        "{events:?}"
    );
    assert_eq!(
        blkid(raw.path(), "TYPE"),
        "",
        "a Block volume is not formatted"
    );
    assert!(pvs.iter().all(|p| label(p, "disklet.io/class") != "nosc"));
    assert!(
        events.iter().any(|(t, r, n)| t == "Warning"
            && r == "StorageClassMissing"
            && n.contains("missing-sc")),
        "{events:?}"
    );
    assert_eq!(
        blkid(nosc.path(), "TYPE"),
        "",
        "nothing is formatted for a class that cannot publish"
    );
    assert!(
        !events.iter().any(|(_, r, _)| r == "FormatFailed"),
        "{events:?}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_never_touches_the_first_ones_pvs() {
    if skip_unless_root("a_second_agent_never_touches_the_first_ones_pvs") {
        return;
    }
    let env = support::agent::env().await;
    env.node("node-b", "node-b").await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    std::fs::create_dir_all(env.path().join("disks")).unwrap();
    let a = Agent::start(&env, "a", "node-a", &config(env.path(), ""));
    let la = Loop::new(&env.path().join("disks"), "a1", 320);
    let pa = env
        .wait_pvs("disklet.io/node=node-a", "node-a's PV", |p| p.len() == 1)
        .await;
    let rv_a = pa[0].metadata.resource_version.clone();

    let b_dir = env.path().join("b");
    std::fs::create_dir_all(b_dir.join("disks")).unwrap();
    let b = Agent::start(&env, "b", "node-b", &config(&b_dir, ""));
    let lb = Loop::new(&b_dir.join("disks"), "b1", 320);
    let pb = env
        .wait_pvs("disklet.io/node=node-b", "node-b's PV", |p| p.len() == 1)
        .await;
    assert_ne!(pb[0].metadata.name, pa[0].metadata.name);
    assert_eq!(affinity(&pb[0])[0].1, vec!["node-b".to_string()]);
    b.wait_log("ready: first reconcile done");

    // What the agents asked, before this test makes its own unscoped list.
    let reqs = env.server.requests();
    let all: Vec<PersistentVolume> = env.pvs().list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 2);
    let a_now = all
        .iter()
        .find(|p| p.metadata.name == pa[0].metadata.name)
        .unwrap();
    assert_eq!(
        a_now.metadata.resource_version, rv_a,
        "node-b's agent left node-a's PV alone"
    );
    // Every PV list and watch either agent made was scoped to its node.
    let pv_reads: Vec<_> = reqs
        .iter()
        .filter(|r| {
            r.resource.as_deref() == Some("persistentvolumes")
                && matches!(
                    r.verb,
                    Some(disklet_fakeapi::Verb::List | disklet_fakeapi::Verb::Watch)
                )
        })
        .collect();
    assert!(!pv_reads.is_empty());
    for r in &pv_reads {
        let sel = r.label_selector.as_deref().unwrap_or("");
        assert!(
            sel.starts_with("disklet.io/node=node-"),
            "unscoped PV read: {} {:?}",
            r.path,
            r.query
        );
    }
    let b_name = pb[0].metadata.name.clone().unwrap();
    let a_name = pa[0].metadata.name.clone().unwrap();
    let writes_to_a_after_b: Vec<_> = reqs
        .iter()
        .filter(|r| {
            r.resource.as_deref() == Some("persistentvolumes")
                && r.name.as_deref() == Some(a_name.as_str())
        })
        .filter(|r| {
            matches!(
                r.verb,
                Some(
                    disklet_fakeapi::Verb::Patch
                        | disklet_fakeapi::Verb::Update
                        | disklet_fakeapi::Verb::Delete
                )
            )
        })
        .collect();
    assert_eq!(
        writes_to_a_after_b.len(),
        1,
        "only node-a's own first apply wrote its PV"
    );
    assert!(!b_name.is_empty());
    drop((a, b, la, lb));
}

#[allow(dead_code)]
fn unused(_: PathBuf) {}
