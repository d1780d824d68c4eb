//! Root test on real loop devices: the size disklet reads from a mounted
//! filesystem is the filesystem's own (what a disk must hold), not what
//! `statvfs` counts, and it follows an online grow at once.
#![allow(clippy::unwrap_used)]

mod support;

use disklet::host::dirs::fs_capacity;
use disklet::host::fssize::fs_size;
use disklet::host::{HostTables, ProcTables};
use support::*;

#[test]
fn the_filesystems_own_size_is_read_while_mounted_and_after_a_grow() {
    if skip_unless_root("fs_size on mounted xfs and ext4") {
        return;
    }
    if !have("mkfs.xfs") {
        eprintln!("skipped: mkfs.xfs is not installed (scripts/setup-debian.sh installs xfsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fs in ["xfs", "ext4"] {
        let lp = Loop::new(dir.path(), fs, 400);
        lp.assert_ours();
        // A filesystem smaller than its disk, as one made before the disk grew.
        match fs {
            "xfs" => sh(&["mkfs.xfs", "-q", "-d", "size=320m", lp.path()]),
            _ => sh(&["mkfs.ext4", "-q", lp.path(), "320M"]),
        };
        let mp = dir.path().join(format!("mnt-{fs}"));
        let _m = Mounted::new(lp.path(), &mp);
        let size = || {
            let mounts = ProcTables::new("/proc/self/mountinfo".as_ref())
                .mounts()
                .unwrap();
            let m = mounts.iter().find(|m| m.mount_point == mp).unwrap();
            fs_size(m, &lp.dev)
        };
        assert_eq!(size(), Some(320 << 20), "{fs}: the superblock's size");
        let counted = fs_capacity(&mp).unwrap();
        assert!(
            counted < 320 << 20,
            "{fs}: statvfs counts {counted}, less than the filesystem"
        );

        if fs == "xfs" {
            sh(&["xfs_growfs", mp.to_str().unwrap()]);
        } else if can_resize_ext4() {
            sh(&["resize2fs", lp.path()]);
        } else {
            eprintln!(
                "note: ext4 grown online not checked: this root lacks CAP_SYS_RESOURCE, \
                 which ext4's online resize needs (the Firecracker test VMs drop it)"
            );
            continue;
        }
        assert_eq!(size(), Some(400 << 20), "{fs}: grown online, seen at once");
    }
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
fn can_resize_ext4() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}
