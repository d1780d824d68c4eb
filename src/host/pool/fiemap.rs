//! Which bytes of a file share their extents with another file (for the
//! pool's capacity), and which were ever written (whether a volume is
//! blank): FIEMAP (linux/fiemap.h).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{errno, io, PoolError};

// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap): the header is 32 bytes,
// followed by the extent array the caller sized.
nix::ioctl_readwrite_bad!(
    fiemap,
    nix::request_code_readwrite!(b'f', 11, 32),
    FiemapBuf
);

/// `struct fiemap` with room for `EXTENTS` extents (linux/fiemap.h).
#[repr(C)]
pub(super) struct FiemapBuf {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const EXTENTS: usize = 128;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// The bytes of the file in extents it shares with another file.
pub(super) fn shared_bytes(path: &Path) -> Result<u64, PoolError> {
    extent_bytes(path, |flags| flags & FIEMAP_EXTENT_SHARED != 0)
}

/// The bytes of the file in written extents: allocated by `fallocate` and
/// never written since, an extent is unwritten (and reads as zeroes).
pub(super) fn written_bytes(path: &Path) -> Result<u64, PoolError> {
    extent_bytes(path, |flags| flags & FIEMAP_EXTENT_UNWRITTEN == 0)
}

/// The bytes of the file in extents whose flags pass `counts`.
fn extent_bytes(path: &Path, counts: impl Fn(u32) -> bool) -> Result<u64, PoolError> {
    let f = File::open(path).map_err(io("open", path))?;
    let mut buf = Box::new(FiemapBuf {
        start: 0,
        length: u64::MAX,
        flags: FIEMAP_FLAG_SYNC,
        mapped_extents: 0,
        extent_count: EXTENTS as u32,
        reserved: 0,
        extents: [FiemapExtent::default(); EXTENTS],
    });
    let mut shared = 0;
    loop {
        // SAFETY: the fd is open; `buf` is a live, properly laid out
        // `struct fiemap` whose extent_count matches the array behind it.
        unsafe { fiemap(f.as_raw_fd(), &mut *buf) }.map_err(errno("FIEMAP", path))?;
        let n = (buf.mapped_extents as usize).min(EXTENTS);
        if n == 0 {
            return Ok(shared);
        }
        let mut last = false;
        let mut next = buf.start;
        for e in &buf.extents[..n] {
            if counts(e.flags) {
                shared += e.length;
            }
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            next = e.logical + e.length;
        }
        if last {
            return Ok(shared);
        }
        buf.start = next;
        buf.length = u64::MAX - next;
        buf.mapped_extents = 0;
    }
}
