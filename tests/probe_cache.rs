//! The probe cache never weakens the format interlocks: with the cache warm
//! (blank disks probed, settling), filesystems are written behind the agent's
//! back, one through the device node (its write counters move, no event:
//! there is no udevd) and one into the loop's backing file (nothing on the
//! device moves at all, and its page cache still holds the blank blocks the
//! agent read, kept by a process holding the disk open). Neither is ever
//! formatted; a third, untouched, is.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use support::agent::{blkid, Agent, MountSweeper};
use support::*;

fn config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 4\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

const UUID_FILE: &str = "3b0c8f5e-6f0e-4e59-9d51-0c6f7c1d2a01";
const UUID_DEV: &str = "3b0c8f5e-6f0e-4e59-9d51-0c6f7c1d2a02";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_written_behind_the_agents_back_with_the_cache_warm_is_never_formatted() {
    if skip_unless_root("probe cache vs writes behind the agent's back") {
        return;
    }
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let disks = env.path().join("disks");
    let by_file = Loop::new(&disks, "by-file", 64);
    let by_dev = Loop::new(&disks, "by-dev", 64);
    let control = Loop::new(&disks, "control", 64);
    for l in [&by_file, &by_dev, &control] {
        l.assert_ours();
    }
    // Someone keeps the disk open (a monitoring tool, say; a plain open does
    // not stop an O_EXCL one). Without it the kernel drops a block device's
    // page cache when its last opener closes it, and the agent's next read
    // would come from the medium anyway.
    let _holder = std::fs::File::open(by_file.path()).unwrap();
    let agent = Agent::start(&env, "agent", "node-a", &config(env.path()));
    agent.wait_log("ready: first reconcile done");
    // The first pass read the three blank disks; they settle for 4 s.
    assert!(agent.metric("disklet_device_probes_total").unwrap() >= 3.0);

    // One into the backing file, one through the device node.
    let img = by_file.file.to_str().unwrap();
    for (uuid, target) in [(UUID_FILE, img), (UUID_DEV, by_dev.path())] {
        sh(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard",
            "-U",
            uuid,
            target,
        ]);
    }
    let log = || std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        !log().contains("formatted"),
        "the filesystems must be written before the disks settle: {}",
        log()
    );

    // The control disk is formatted and published when the disks settle.
    let pvs = env
        .wait_pvs("disklet.io/node=node-a", "the control disk's PV", |p| {
            !p.is_empty()
        })
        .await;
    assert_eq!(pvs.len(), 1, "only the control disk is published");
    assert_eq!(blkid(control.path(), "LABEL"), "disklet");
    // The backing-file write is invisible to the device: the cached probe
    // proposed a format, and the last look under the lock (page cache
    // dropped) refused it.
    let refused = agent.wait_log("format refused or failed");
    assert!(
        refused.contains(&by_file.name()) && refused.contains("device-changed"),
        "{refused}"
    );
    // The filesystems written behind the agent's back are as they were.
    sh(&["blockdev", "--flushbufs", by_file.path()]);
    assert_eq!(blkid(by_file.path(), "UUID"), UUID_FILE);
    assert_eq!(blkid(by_dev.path(), "UUID"), UUID_DEV);
    let l = log();
    for d in [&by_file, &by_dev] {
        assert!(
            !l.lines()
                .any(|x| x.contains(" formatted") && x.contains(&d.name())),
            "{} was formatted: {l}",
            d.path()
        );
    }
    // The write through the device moved its counters: read again, refused
    // in the plan, with no format even tried.
    assert!(
        !l.lines()
            .any(|x| x.contains("format refused") && x.contains(&by_dev.name())),
        "{l}"
    );
    assert!(agent.metric("disklet_device_probes_total").unwrap() > 3.0);
}
