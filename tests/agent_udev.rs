//! The agent with a real udevd: a udev rule tags a loop backed by this test's
//! file and gives it a /dev/disk/by-id link; a Block class selected by that
//! udev property publishes the stable by-id path. Own binary, because udevd
//! is machine-wide.
#![allow(clippy::unwrap_used)]

mod support;

use support::agent::{Agent, MountSweeper};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_publishes_the_by_id_path_udev_made() {
    if skip_unless_root("block_mode_publishes_the_by_id_path_udev_made") {
        return;
    }
    let Some(_udevd) = Udevd::start() else {
        eprintln!("SKIPPED block_mode_publishes_the_by_id_path_udev_made: systemd-udevd is not installed (apt-get install udev)");
        return;
    };
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let raw_dir = env.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let tag = format!("disklet-e2e-{}", std::process::id());
    let _rule = UdevRule::new(
        &format!("99-{tag}.rules"),
        &format!(
            "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"loop*\", ATTR{{loop/backing_file}}==\"{}/*\", ENV{{DISKLET_CLASS}}=\"{tag}\", SYMLINK+=\"disk/by-id/{tag}-$kernel\"\n",
            raw_dir.display()
        ),
    );
    let cfg = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: raw\n    storageClassName: local-fast\n    volumeMode: Block\n    settleSeconds: 0\n    selector: {{udev: {{DISKLET_CLASS: \"{tag}\"}}, types: [loop]}}\n",
        d = env.path().display()
    );
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    agent.wait_log("ready: first reconcile done");
    let lp = Loop::new(&raw_dir, "r1", 64);
    lp.assert_ours();
    let link = format!("/dev/disk/by-id/{tag}-{}", lp.name());
    let pvs = env
        .wait_pvs("disklet.io/node=node-a", "the Block PV", |p| p.len() == 1)
        .await;
    let s = pvs[0].spec.as_ref().unwrap();
    assert_eq!(s.volume_mode.as_deref(), Some("Block"));
    assert_eq!(
        s.local.as_ref().unwrap().path,
        link,
        "the stable by-id path, not /dev/loopN"
    );
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        lp.dev,
        "udev made the link to our loop"
    );
    let ann = pvs[0].metadata.annotations.as_ref().unwrap();
    assert_eq!(ann["disklet.io/by-id"], link);
    assert_eq!(
        s.capacity.as_ref().unwrap()["storage"].0,
        disklet::model::quantity::exact(64u64 << 20)
    );
    drop(agent);
}
