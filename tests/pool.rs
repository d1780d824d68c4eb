//! Root tests of the pool backend (src/host/pool/) on a real XFS pool on a
//! loop device of the test's own: what a tenant could check. A new volume
//! reads zeroes where a deleted one wrote; a snapshot and a clone hold the
//! data of their moment; a volume grows online; one in use is never
//! destroyed; attachments are found again after a restart; capacity says
//! what can still be given and comes back on delete.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use disklet::host::pool::{self, Pool, PoolError, Source};
use support::*;

const MIB: u64 = 1 << 20;

/// A pool disk formatted XFS with reflink and mounted; on drop (even on
/// panic) every loop device backed by a file in it is detached first.
struct TestPool {
    pool: Pool,
    mount: PathBuf,
    _mounted: Mounted,
    _disk: Loop,
    _dir: tempfile::TempDir,
}

impl TestPool {
    fn new(test: &str, mib: u64) -> Option<TestPool> {
        if skip_unless_root(test) {
            return None;
        }
        if !have("mkfs.xfs") {
            eprintln!("SKIPPED {test}: mkfs.xfs is not installed (scripts/setup-debian.sh installs xfsprogs)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = Loop::new(dir.path(), "pooldisk", mib);
        disk.assert_ours();
        sh(&["mkfs.xfs", "-q", "-m", "reflink=1", disk.path()]);
        let mount = dir.path().join("mnt");
        let mounted = Mounted::new(disk.path(), &mount);
        let pool = Pool::open(&mount).unwrap();
        Some(TestPool {
            pool,
            mount,
            _mounted: mounted,
            _disk: disk,
            _dir: dir,
        })
    }
}

impl TestPool {
    /// A new empty volume of `mib` MiB, attached: (its file, its device).
    fn attached_volume(&self, id: &str, mib: u64) -> (disklet::host::pool::Entry, PathBuf) {
        let v = self
            .pool
            .create_volume(id, mib << 20, Source::Empty)
            .unwrap();
        let dev = pool::attach(&v.path).unwrap();
        (v, dev)
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        detach_loops_under(&self.mount);
    }
}

fn dev_size(dev: &Path) -> u64 {
    sh(&["blockdev", "--getsize64", dev.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap()
}

/// Writes `len` bytes of `byte` at `offset`, through the device, O_DIRECT.
fn fill(dev: &Path, offset: u64, len: u64, byte: u8) {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let block = aligned(1 << 20, byte);
    let mut left = len;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// A buffer aligned for O_DIRECT (4 KiB).
fn aligned(len: usize, byte: u8) -> &'static mut [u8] {
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: the layout is non-zero; the memory is initialised right below
    // and leaked on purpose (a test's few buffers).
    unsafe {
        let p = std::alloc::alloc(layout);
        assert!(!p.is_null());
        std::ptr::write_bytes(p, byte, len);
        std::slice::from_raw_parts_mut(p, len)
    }
}

/// Every byte of the device in `offset..offset+len` that is not `byte`:
/// (first offset, count).
fn differs(dev: &Path, offset: u64, len: u64, byte: u8) -> Option<(u64, u64)> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let buf = aligned(1 << 20, 0);
    let want = vec![byte; 1 << 20];
    let (mut first, mut count, mut at) = (None, 0u64, offset);
    while at < offset + len {
        let n = ((offset + len - at).min(1 << 20)) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        // memcmp first; byte by byte only where a block differs.
        if buf[..n] != want[..n] {
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != byte {
                    first.get_or_insert(at + i as u64);
                    count += 1;
                }
            }
        }
        at += n as u64;
    }
    first.map(|f| (f, count))
}

#[test]
fn a_new_volume_reads_zeroes_where_a_deleted_one_wrote() {
    let Some(t) = TestPool::new("pool: zeroes after delete", 400) else {
        return;
    };
    let before = t.pool.capacity().unwrap();
    // Nearly the whole pool, so the second volume must reuse the first's
    // blocks.
    let size = (before.available >> 20 << 20) - (16 << 20);
    let a = t.pool.create_volume("vol-a", size, Source::Empty).unwrap();
    let dev = pool::attach(&a.path).unwrap();
    assert_eq!(dev_size(&dev), size);
    assert_eq!(differs(&dev, 0, size, 0), None, "a new volume reads zeroes");
    fill(&dev, 0, size, 0xAB);
    assert_eq!(differs(&dev, 0, size, 0xAB), None);
    let used = t.pool.capacity().unwrap();
    assert!(
        used.available + size <= before.available + MIB,
        "{used:?} after {size} of {before:?}"
    );
    t.pool.delete_volume("vol-a").unwrap();
    assert!(pool::attached(&a.path).is_none(), "detached on delete");
    assert!(!a.path.exists());
    let after = t.pool.capacity().unwrap();
    assert!(
        after.available + MIB >= before.available,
        "space back: {after:?} against {before:?}"
    );

    let b = t.pool.create_volume("vol-b", size, Source::Empty).unwrap();
    let dev = pool::attach(&b.path).unwrap();
    assert_eq!(
        differs(&dev, 0, size, 0),
        None,
        "the next tenant on the same space reads zeroes, not 0xAB"
    );
}

#[test]
fn a_snapshot_and_a_clone_hold_the_data_of_their_moment() {
    let Some(t) = TestPool::new("pool: snapshot and clone", 400) else {
        return;
    };
    let (_, dev) = t.attached_volume("vol", 64);
    fill(&dev, 0, 16 * MIB, b'A');
    let near = |a: u64, b: u64| a.abs_diff(b) <= MIB;
    let c0 = t.pool.capacity().unwrap().available;
    let snap = t.pool.create_snapshot("snap-1", "vol").unwrap();
    assert_eq!(snap.size, 64 * MIB);
    // What the volume may now need: its 16 MiB written and shared.
    let c1 = t.pool.capacity().unwrap().available;
    assert!(
        near(c0 - c1, 16 * MIB),
        "after the snapshot {c1}, before {c0}"
    );
    // Written after the snapshot: over shared extents, so it costs what was
    // held back, nothing more.
    fill(&dev, 0, 8 * MIB, b'B');
    let c2 = t.pool.capacity().unwrap().available;
    assert!(near(c1, c2), "writing over shared extents: {c1} → {c2}");
    let from_snap = t
        .pool
        .create_volume("restored", 64 * MIB, Source::Snapshot("snap-1"))
        .unwrap();
    let c3 = t.pool.capacity().unwrap().available;
    assert!(
        near(c2 - c3, 64 * MIB),
        "a restored volume costs its size: {c2} → {c3}"
    );
    let from_vol = t
        .pool
        .create_volume("clone", 96 * MIB, Source::Volume("vol"))
        .unwrap();
    let r = pool::attach(&from_snap.path).unwrap();
    let c = pool::attach(&from_vol.path).unwrap();
    assert_eq!(
        differs(&r, 0, 16 * MIB, b'A'),
        None,
        "the snapshot's moment"
    );
    assert_eq!(differs(&r, 16 * MIB, 48 * MIB, 0), None);
    assert_eq!(differs(&c, 0, 8 * MIB, b'B'), None, "the clone's moment");
    assert_eq!(differs(&c, 8 * MIB, 8 * MIB, b'A'), None);
    assert_eq!(
        dev_size(&c),
        96 * MIB,
        "a clone may be larger than its source"
    );
    assert_eq!(differs(&c, 64 * MIB, 32 * MIB, 0), None);
    // Writes to the clone reach neither the volume nor the snapshot.
    fill(&c, 0, MIB, b'C');
    assert_eq!(differs(&dev, 0, MIB, b'B'), None);
    assert_eq!(differs(&r, 0, MIB, b'A'), None);
    // The source deleted: the snapshot still holds its data.
    drop(File::open(&dev).unwrap());
    t.pool.delete_volume("vol").unwrap();
    let again = t
        .pool
        .create_volume("restored-2", 64 * MIB, Source::Snapshot("snap-1"))
        .unwrap();
    let r2 = pool::attach(&again.path).unwrap();
    assert_eq!(differs(&r2, 0, 16 * MIB, b'A'), None);
    t.pool.delete_snapshot("snap-1").unwrap();
    assert!(t.pool.snapshots().unwrap().is_empty());
    assert!(matches!(
        t.pool.create_volume("x", MIB, Source::Snapshot("snap-1")),
        Err(PoolError::NotFound { .. })
    ));
}

#[test]
fn a_volume_grows_online_and_never_shrinks() {
    let Some(t) = TestPool::new("pool: online expansion", 400) else {
        return;
    };
    let (_, dev) = t.attached_volume("vol", 32);
    fill(&dev, 0, 32 * MIB, b'D');
    // Held open, as a mounted filesystem would hold it.
    let _held = File::open(&dev).unwrap();
    let grown = t.pool.expand_volume("vol", 80 * MIB).unwrap();
    assert_eq!(grown.size, 80 * MIB);
    assert_eq!(
        dev_size(&dev),
        80 * MIB,
        "the attached device sees it at once"
    );
    assert_eq!(differs(&dev, 0, 32 * MIB, b'D'), None, "data kept");
    assert_eq!(
        differs(&dev, 32 * MIB, 48 * MIB, 0),
        None,
        "the new space reads zeroes"
    );
    assert!(matches!(
        t.pool.expand_volume("vol", 16 * MIB),
        Err(PoolError::Shrink { .. })
    ));
    assert_eq!(
        t.pool.expand_volume("vol", 80 * MIB).unwrap().size,
        80 * MIB
    );
}

#[test]
fn a_volume_in_use_is_never_destroyed() {
    let Some(t) = TestPool::new("pool: in-use volume kept", 400) else {
        return;
    };
    let (v, dev) = t.attached_volume("vol", 32);
    fill(&dev, 0, MIB, b'E');
    let holder = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&dev)
        .unwrap();
    let err = t.pool.delete_volume("vol").unwrap_err();
    assert!(matches!(err, PoolError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("still open"), "{err}");
    assert_eq!(pool::attached(&v.path).as_deref(), Some(dev.as_path()));
    assert_eq!(differs(&dev, 0, MIB, b'E'), None, "nothing destroyed");
    drop(holder);
    // A plain open (a process with the block device open, as a pod's Block
    // volume is) is not exclusive, yet the volume is still not destroyed.
    let plain = File::open(&dev).unwrap();
    let err = t.pool.delete_volume("vol").unwrap_err();
    assert!(matches!(err, PoolError::InUse { .. }), "{err}");
    assert!(
        v.path.exists(),
        "the file is whole while its device is open"
    );
    assert_eq!(differs(&dev, 0, MIB, b'E'), None, "nothing destroyed");
    drop(plain);
    // The last close detaches it (the kernel's autoclear, which runs after
    // the close returns): once it has, the volume goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool::attached(&v.path).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "autoclear never detached {}",
            dev.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    t.pool.delete_volume("vol").unwrap();
    assert!(t.pool.volumes().unwrap().is_empty());
    assert!(pool::attached(&v.path).is_none());
    t.pool.delete_volume("vol").unwrap();
    // A symlink planted in the pool is never followed nor deleted through.
    let victim = t.mount.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, t.mount.join("pool/volumes/planted")).unwrap();
    assert!(t.pool.delete_volume("planted").is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
}

#[test]
fn a_restarted_agent_finds_volumes_and_attachments() {
    let Some(t) = TestPool::new("pool: restart", 400) else {
        return;
    };
    let (v, dev) = t.attached_volume("vol-1", 16);
    // Idempotent: the same name and size is the same volume.
    let again = t
        .pool
        .create_volume("vol-1", 16 * MIB, Source::Empty)
        .unwrap();
    assert_eq!(again, v);
    assert!(matches!(
        t.pool.create_volume("vol-1", 32 * MIB, Source::Empty),
        Err(PoolError::Exists { have, want, .. }) if have == 16 * MIB && want == 32 * MIB
    ));
    // A new Pool over the same mount (the agent restarted).
    let reopened = Pool::open(&t.mount).unwrap();
    let vols = reopened.volumes().unwrap();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].id, "vol-1");
    assert_eq!(
        pool::attach(&vols[0].path).unwrap(),
        dev,
        "the same loop, not a second one"
    );
    // A temporary of an interrupted create is not a volume.
    std::fs::write(t.mount.join("pool/volumes/.vol-2.new"), b"x").unwrap();
    assert_eq!(reopened.volumes().unwrap().len(), 1);
}

#[test]
fn capacity_runs_out_and_comes_back() {
    let Some(t) = TestPool::new("pool: capacity", 400) else {
        return;
    };
    let start = t.pool.capacity().unwrap();
    assert!(
        start.total > 300 * MIB && start.available <= start.total,
        "{start:?}"
    );
    let mut made = 0;
    loop {
        match t
            .pool
            .create_volume(&format!("v{made}"), 50 * MIB, Source::Empty)
        {
            Ok(_) => made += 1,
            Err(PoolError::NoSpace { need, available }) => {
                assert_eq!(need, 50 * MIB);
                assert!(available < 50 * MIB, "refused with {available} available");
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(made < 100, "never ran out");
    }
    // All the space was given out (a file's own metadata may cost one).
    assert!(
        made + 1 >= start.available / (50 * MIB),
        "{made} volumes of {start:?}"
    );
    let full = t.pool.capacity().unwrap();
    assert_eq!(full.provisioned, made * 50 * MIB);
    assert!(t.pool.volumes().unwrap().len() as u64 == made);
    t.pool.delete_volume("v0").unwrap();
    t.pool
        .create_volume("again", 50 * MIB, Source::Empty)
        .unwrap();
}

#[test]
fn bad_names_touch_nothing() {
    let Some(t) = TestPool::new("pool: bad names", 400) else {
        return;
    };
    for id in [
        "",
        "../escape",
        "a/b",
        ".hidden",
        "with space",
        "semi;colon",
        "x".repeat(129).as_str(),
    ] {
        let err = t.pool.create_volume(id, MIB, Source::Empty).unwrap_err();
        assert!(matches!(err, PoolError::BadId { .. }), "{id:?}: {err}");
        assert!(err
            .to_string()
            .contains("not a valid volume or snapshot name"));
        assert!(matches!(
            t.pool.delete_volume(id),
            Err(PoolError::BadId { .. })
        ));
    }
    assert!(t.pool.volumes().unwrap().is_empty());
    assert!(!t.mount.join("escape").exists());
}
