//! Formats of different disks run at once, never more than
//! `formatConcurrency` of them: the agent's mkfs.ext4 is a wrapper (first on
//! its PATH) that records how many formats are in flight when each starts,
//! then holds until two have been in flight together (at most 30 s) before
//! running the real mkfs. Run one at a time, the formats would each wait out
//! that hold and the record would never show two; unbounded, it would show
//! more than two.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::agent::{blkid, Agent, MountSweeper};
use support::*;

const DISKS: usize = 5;

fn config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nformatConcurrency: 2\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 1\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

/// The mkfs.ext4 the agent finds first; records into `gate`.
fn wrapper(bin: &Path, gate: &Path, real: &str) {
    std::fs::create_dir_all(bin).unwrap();
    std::fs::create_dir_all(gate.join("in")).unwrap();
    let g = gate.display();
    let script = format!(
        r#"#!/bin/sh
dev=""; for a in "$@"; do dev=$a; done
n=$(basename "$dev")
{{ flock 9; : > "{g}/in/$n"; echo "start $n $(ls "{g}/in" | wc -l)" >> "{g}/log"; }} 9>"{g}/lock"
i=0
while ! grep -q '^start .* 2$' "{g}/log" && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
{real} "$@"; rc=$?
{{ flock 9; rm -f "{g}/in/$n"; echo "end $n $rc" >> "{g}/log"; }} 9>"{g}/lock"
exit $rc
"#
    );
    let path = bin.join("mkfs.ext4");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_disks_are_formatted_at_once_up_to_format_concurrency() {
    if skip_unless_root("concurrent formats on loop devices") {
        return;
    }
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v mkfs.ext4"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(!real.is_empty(), "mkfs.ext4 is not installed (e2fsprogs)");
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let disks: Vec<Loop> = (0..DISKS)
        .map(|i| Loop::new(&env.path().join("disks"), &format!("d{i}"), 64))
        .collect();
    for l in &disks {
        l.assert_ours();
    }
    let bin = env.path().join("bin");
    let gate = env.path().join("gate");
    wrapper(&bin, &gate, &real);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let agent = Agent::start_env(
        &env,
        "agent",
        "node-a",
        &config(env.path()),
        &[("PATH", &path)],
    );
    let pvs = env
        .wait_pvs("disklet.io/node=node-a", "a PV for every disk", |p| {
            p.len() == DISKS
        })
        .await;
    assert_eq!(pvs.len(), DISKS);

    let log = std::fs::read_to_string(gate.join("log")).unwrap();
    let starts: Vec<usize> = log
        .lines()
        .filter_map(|l| l.strip_prefix("start "))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(starts.len(), DISKS, "one mkfs per disk:\n{log}");
    assert_eq!(
        starts.iter().max(),
        Some(&2),
        "two formats in flight together, never more:\n{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("end ") && l.ends_with(" 0"))
            .count(),
        DISKS,
        "every mkfs succeeded:\n{log}"
    );
    // Each disk is ours, with a filesystem of its own, and no format record
    // is left behind.
    let mut uuids: Vec<String> = disks
        .iter()
        .map(|l| {
            assert_eq!(blkid(l.path(), "LABEL"), "disklet", "{}", l.path());
            blkid(l.path(), "UUID")
        })
        .collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), DISKS, "one filesystem per disk");
    let records = env.path().join("hostdir/.mkfs-started");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    drop(agent);
}
