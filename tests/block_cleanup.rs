//! Block-level cleanup on real loop devices: discard and zeroout leave no old
//! byte readable, the reformat wipe leaves a disk disklet judges blank, and
//! none of them touches a device that is mounted.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::FileExt;

use disklet::host::cleanup::{blk_discard, blk_zeroout, discard_or_zeroout, wipe_for_reformat};
use disklet::host::probe::BlkidProber;
use disklet::host::Prober;
use support::*;

fn fill(dev: &str, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let chunk = vec![byte; 1 << 20];
    for i in 0..64u64 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    f.sync_all().unwrap();
}

fn all_zero(dev: &str) -> bool {
    let f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    (0..64u64).all(|i| {
        f.read_exact_at(&mut buf, i << 20).unwrap();
        buf.iter().all(|b| *b == 0)
    })
}

#[test]
fn discard_and_zeroout_leave_nothing_readable() {
    if skip_unless_root("discard_and_zeroout_leave_nothing_readable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, f) in [
        ("discard", blk_discard as fn(&std::path::Path) -> _),
        ("zeroout", blk_zeroout),
        ("discard-or-zeroout", discard_or_zeroout),
    ] {
        let lp = Loop::new(dir.path(), name, 64);
        fill(lp.path(), 0xa5);
        assert!(!all_zero(lp.path()));
        f(&lp.dev).unwrap();
        assert!(all_zero(lp.path()), "{name} left data");
    }
}

#[test]
fn nothing_is_wiped_while_mounted() {
    if skip_unless_root("nothing_is_wiped_while_mounted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lp = Loop::new(dir.path(), "m", 64);
    sh(&["mkfs.ext4", "-q", "-L", "disklet", lp.path()]);
    let m = Mounted::new(lp.path(), &dir.path().join("mnt"));
    std::fs::write(m.0.join("precious"), "data").unwrap();
    for (what, r) in [
        ("discard", blk_discard(&lp.dev)),
        ("zeroout", blk_zeroout(&lp.dev)),
    ] {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("exclusively"), "{what}: {e}");
    }
    assert!(wipe_for_reformat(&lp.dev).is_err());
    assert_eq!(
        std::fs::read_to_string(m.0.join("precious")).unwrap(),
        "data"
    );
    drop(m);
    assert_eq!(
        support::agent::blkid(lp.path(), "TYPE"),
        "ext4",
        "signature intact"
    );
}

#[test]
fn the_reformat_wipe_leaves_a_disk_disklet_calls_blank() {
    if skip_unless_root("the_reformat_wipe_leaves_a_disk_disklet_calls_blank") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lp = Loop::new(dir.path(), "w", 320);
    sh(&["mkfs.xfs", "-q", "-L", "disklet", lp.path()]);
    wipe_for_reformat(&lp.dev).unwrap();
    let mut d = disklet::model::Device::new(
        &lp.name(),
        disklet::model::DevNo::new(7, 0),
        disklet::model::DeviceKind::Loop,
    );
    d.devnode = lp.dev.clone();
    d.size_bytes = 320 << 20;
    assert_eq!(
        BlkidProber::default().probe(&d),
        disklet::model::Probe::Done {
            signatures: vec![],
            zeroed: Some(true)
        }
    );
}
