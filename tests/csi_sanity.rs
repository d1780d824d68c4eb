//! The CSI driver against csi-sanity, the CSI conformance suite
//! (github.com/kubernetes-csi/csi-test, built from the Go module proxy by
//! `scripts/test-cluster.sh build`), on a pool the real agent took: a
//! kwok Node of the real control plane, `disklet run` with a `kind: pool`
//! class formatting and mounting a loop device under every safety rule, and
//! `disklet csi` serving that pool with the Node's topology read through the
//! agent's own RBAC. Run twice: Filesystem volumes, then Block volumes.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::*;
use support::csi_cluster::{pool_mount, spawn, Proc, VolumeSweeper};

/// `disklet csi` serving the rig's pool on `sock`, with `flags`.
fn driver(rig: &NodeRig, sock: &Path, flags: &[&str]) -> Proc {
    let driver = spawn(
        rig.path(),
        "csi",
        Command::new(env!("CARGO_BIN_EXE_disklet"))
            .args(["csi", "--node-name", &rig.node])
            .arg(format!("--endpoint=unix://{}", sock.display()))
            .arg("--config")
            .arg(rig.path().join("agent.yaml"))
            .args(flags)
            .env("KUBECONFIG", &rig.kubeconfig),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "disklet csi made no socket: {}",
            std::fs::read_to_string(rig.path().join("csi.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
}

/// Runs csi-sanity once; returns its verbose output, asserting it passed.
fn sanity(bin: &Path, sock: &Path, dir: &Path, access: &str) -> String {
    let out = Command::new(bin.join("csi-sanity"))
        .arg(format!("--csi.endpoint={}", sock.display()))
        .arg(format!("--csi.stagingdir={}/sanity/staging", dir.display()))
        .arg(format!("--csi.mountdir={}/sanity/mount", dir.display()))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 128 << 20))
        .arg(format!("--csi.testvolumeaccesstype={access}"))
        .args(["--ginkgo.v", "--ginkgo.no-color", "--ginkgo.timeout=10m"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("Passed |"))
        .unwrap_or("no summary")
        .to_string();
    assert!(
        out.status.success(),
        "csi-sanity ({access}) failed: {summary}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("csi-sanity ({access}): {summary}");
    // What it skipped, with its reasons: the capabilities disklet does not
    // offer (printed so the CI log lists them).
    let mut reasons: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[SKIPPED] "))
        .filter(|l| !l.starts_with("in ") && !l.starts_with('['))
        .collect();
    reasons.sort();
    reasons.dedup();
    println!(
        "csi-sanity ({access}) skipped specs for: {}",
        reasons.join("; ")
    );
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_sanity_passes_on_a_pool_the_agent_took() {
    let s = Scope::new("csi").await;
    let sc = s
        .storage_class("pool", json!({"provisioner": "csi.disklet.io"}))
        .await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("pool", &sc, "disks", "kind: pool")])
        })
        .await;
    rig.disk("disks", "p1", 1024);
    let mount = pool_mount(&rig.path().join("hostdir"));
    assert!(
        mount.starts_with(rig.path().join("hostdir/pool")),
        "{}",
        mount.display()
    );
    // The agent formats a pool disk and publishes nothing of it.
    let fs = support::agent::blkid(rig.loops[0].path(), "TYPE");
    assert_eq!(fs, "xfs");

    let _volumes = VolumeSweeper {
        mounts: rig.path().join("sanity"),
        hostdir: rig.path().join("hostdir"),
    };
    let bin = s.cluster.bin.clone();
    // csi-sanity makes its staging and target dirs itself, but not their
    // parent.
    std::fs::create_dir_all(rig.path().join("sanity")).unwrap();
    // Both expansion paths: Block volumes with the driver as the DaemonSet
    // runs it (they grow in NodeExpandVolume), Filesystem volumes with
    // --controller-expansion (they grow in ControllerExpandVolume; csi-sanity's
    // NodeExpandVolume then finds the file grown already). Not the other way
    // round: csi-sanity's volumes are ext4, whose online growth needs
    // CAP_SYS_RESOURCE, which root lacks on this CI's VMs (tests/csi_volumes.rs
    // and tests/csi_e2e.rs grow XFS on the node).
    for (access, flags, grows) in [
        ("mount", &["--controller-expansion"][..], "ExpandVolume"),
        ("block", &[][..], "NodeExpandVolume"),
    ] {
        let sock = rig.path().join(format!("csi-{access}.sock"));
        let _driver = driver(&rig, &sock, flags);
        let text = sanity(&bin, &sock, rig.path(), access);
        // The suites the issue asks for ran, rather than being skipped.
        for spec in [
            "CreateSnapshot",
            "ListSnapshots",
            grows,
            "NodeGetVolumeStats",
            "single node single writer",
        ] {
            let ran = text
                .lines()
                .any(|l| l.contains(spec) && !l.contains("SKIPPED"))
                && !text.lines().any(|l| {
                    l.contains("[SKIPPED]") && l.contains(spec) && l.contains("not supported")
                });
            assert!(ran, "csi-sanity ({access}) did not run the {spec} specs");
        }
    }
    // Nothing left behind in the pool: every volume and snapshot the suite
    // made was deleted, its space given back.
    let left: Vec<_> = ["volumes", "snapshots"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(mount.join("pool").join(d))
                .unwrap()
                .flatten()
        })
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    let ev = s.cluster.kubectl(&[
        "get",
        "pv",
        "-l",
        &format!("disklet.io/node={}", rig.node),
        "-o",
        "name",
    ]);
    assert_eq!(ev.trim(), "", "a pool disk must never become a static PV");
}
