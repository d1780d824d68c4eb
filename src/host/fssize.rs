//! A mounted filesystem's own size, as its superblock records it.
//!
//! `statvfs` leaves out what the filesystem keeps for itself (the xfs log,
//! ext4's group descriptors and inode tables): a 320 MiB xfs reports 256 MiB.
//! A disk shrunk to somewhere in between holds less than its filesystem (the
//! kernel fails every access past its end), and only the exact size shows it.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::model::MountEntry;

/// How long a read of a superblock may take before the device counts as
/// unreadable for this pass (a dead disk can block a read for ever).
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// The size in bytes of the filesystem mounted by `m` from `devnode`, for the
/// filesystems disklet makes (xfs, ext2/3/4); `None` when it cannot be told.
pub fn fs_size(m: &MountEntry, devnode: &Path) -> Option<u64> {
    match m.fs_type.as_str() {
        "xfs" => xfs_size(&m.mount_point),
        "ext2" | "ext3" | "ext4" => ext_size_bounded(devnode),
        _ => None,
    }
}

/// [`ext_size`] within [`READ_DEADLINE`]; `None` past it.
fn ext_size_bounded(devnode: &Path) -> Option<u64> {
    let dev = devnode.to_path_buf();
    crate::host::probe::one_read_within(devnode, READ_DEADLINE, move || ext_size(&dev))
}

/// `struct xfs_fsop_geom_v1` of `<xfs/xfs_fs.h>` (version 1 of the geometry
/// ioctl, which every kernel with xfs answers).
#[repr(C)]
#[derive(Default)]
struct XfsGeomV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
}

nix::ioctl_read!(xfs_fsgeometry_v1, b'X', 100, XfsGeomV1);

/// The data section of a mounted xfs (`XFS_IOC_FSGEOMETRY_V1` on its root):
/// what the filesystem itself holds now, growfs included.
fn xfs_size(mount_point: &Path) -> Option<u64> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;
    let fd = open(
        mount_point,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .ok()?;
    let mut g = XfsGeomV1::default();
    // SAFETY: `fd` is an open descriptor we own for the whole call, and `g` is
    // a properly aligned, writable `xfs_fsop_geom_v1` whose size is the one the
    // request number encodes; the kernel writes only within it.
    unsafe { xfs_fsgeometry_v1(fd.as_raw_fd(), &mut g) }.ok()?;
    u64::from(g.blocksize).checked_mul(g.datablocks)
}

/// The size an ext2/3/4 superblock (1024 bytes at offset 1024) records.
/// ext4 keeps its metadata in the block device's page cache, so a buffered
/// read sees an online resize at once.
pub fn ext_size(dev: &Path) -> Option<u64> {
    let f = std::fs::File::open(dev).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024).ok()?;
    ext_superblock_size(&sb)
}

fn ext_superblock_size(sb: &[u8; 1024]) -> Option<u64> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    const MAGIC: u16 = 0xEF53;
    const INCOMPAT_64BIT: u32 = 0x80;
    if u16_at(0x38) != MAGIC {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None; // blocks above 64 KiB: not a superblock we understand
    }
    let block = 1024u64 << log;
    let hi = if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    let blocks = (hi << 32) | u64::from(u32_at(0x04));
    blocks.checked_mul(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_geometry_struct_has_the_kernels_size() {
        // _IOR('X', 100, struct xfs_fsop_geom_v1): 112 bytes on every
        // 64-bit and 32-bit ABI with 8-byte aligned u64.
        assert_eq!(std::mem::size_of::<XfsGeomV1>(), 112);
    }

    #[test]
    fn ext_superblocks_are_read_exactly() {
        if std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("skipped: mkfs.ext4 is not installed (apt-get install e2fsprogs)");
            return;
        }
        let t = tempfile::tempdir().expect("tempdir");
        let img = t.path().join("fs.img");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("spawn");
            assert!(out.status.success(), "{args:?}: {out:?}");
        };
        let f = std::fs::File::create(&img).expect("create");
        f.set_len(64 << 20).expect("set_len");
        let p = img.to_str().expect("utf-8");
        run(&["mkfs.ext4", "-q", "-F", p]);
        assert_eq!(ext_size(&img), Some(64 << 20), "the whole image");
        run(&["resize2fs", "-f", p, "40M"]);
        assert_eq!(
            ext_size(&img),
            Some(40 << 20),
            "what resize2fs left, not the file"
        );
        run(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "1024",
            "-O",
            "64bit",
            p,
            "20M",
        ]);
        assert_eq!(ext_size(&img), Some(20 << 20), "1 KiB blocks, 64bit");
        std::fs::write(&img, vec![0u8; 4096]).expect("write");
        assert_eq!(ext_size(&img), None, "no superblock");
    }

    #[test]
    fn odd_superblocks_are_refused() {
        let mut sb = [0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(ext_superblock_size(&sb), Some(1000 * 4096));
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            ext_superblock_size(&sb),
            Some(1000 * 4096),
            "the high word counts only with the 64bit feature"
        );
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(ext_superblock_size(&sb), Some(((1 << 32) + 1000) * 4096));
        sb[0x18..0x1c].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(ext_superblock_size(&sb), None, "a block size of 2^50");
    }
}
