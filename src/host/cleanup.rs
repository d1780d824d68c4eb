//! Destructive block-level steps of volume recycling: wiping disklet's own
//! filesystem before a reformat, BLKDISCARD and BLKZEROOUT. Callers verify
//! identity and that nothing uses the volume first; these functions add the
//! kernel's own guard: the device is opened `O_EXCL`, which fails while
//! anything (a mount, a holder, another exclusive opener) uses it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::host::{Cmd, CmdError};

/// `_IO(0x12, 119)` and `_IO(0x12, 127)` from linux/fs.h; the argument is
/// `u64[2]` = {start, length} in bytes.
mod ioctls {
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot open {path} exclusively: {source} (still mounted or in use?)")]
    Open {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("{op} on {path} failed: {source}")]
    Ioctl {
        op: &'static str,
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot read the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

impl CleanupError {
    /// Whether the device cannot do it at all (so another method may).
    pub fn unsupported(&self) -> bool {
        matches!(
            self,
            CleanupError::Ioctl {
                source: nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::ENOTTY
                    | nix::errno::Errno::EINVAL,
                ..
            }
        )
    }
}

fn open_excl(dev: &Path) -> Result<OwnedFd, CleanupError> {
    use nix::fcntl::{open, OFlag};
    open(
        dev,
        OFlag::O_RDWR | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| CleanupError::Open {
        path: dev.into(),
        source,
    })
}

fn device_size(dev: &Path) -> Result<u64, CleanupError> {
    use std::io::Seek;
    let mut f = std::fs::File::open(dev).map_err(|source| CleanupError::Size {
        path: dev.into(),
        source,
    })?;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|source| CleanupError::Size {
            path: dev.into(),
            source,
        })
}

fn range_ioctl(
    dev: &Path,
    fd: &OwnedFd,
    op: &'static str,
    start: u64,
    len: u64,
) -> Result<(), CleanupError> {
    let range = [start, len];
    // SAFETY: the fd is an open block device we own for the whole call, and
    // `range` is a live [u64; 2], exactly the argument BLKDISCARD/BLKZEROOUT
    // read; the kernel does not keep the pointer.
    let r = unsafe {
        if op == "BLKDISCARD" {
            ioctls::blkdiscard(fd.as_raw_fd(), &range)
        } else {
            ioctls::blkzeroout(fd.as_raw_fd(), &range)
        }
    };
    r.map(|_| ()).map_err(|source| CleanupError::Ioctl {
        op,
        path: dev.into(),
        source,
    })
}

/// Discards the whole device (fast; the blocks read back as zeroes on most
/// SSDs and on loop devices, but the kernel does not promise it).
pub fn blk_discard(dev: &Path) -> Result<(), CleanupError> {
    let fd = open_excl(dev)?;
    let size = device_size(dev)?;
    range_ioctl(dev, &fd, "BLKDISCARD", 0, size)
}

/// Discards the whole device, or zeroes it where the device cannot discard.
pub fn discard_or_zeroout(dev: &Path) -> Result<(), CleanupError> {
    match blk_discard(dev) {
        Err(e) if e.unsupported() => blk_zeroout(dev),
        r => r,
    }
}

/// Writes zeroes over the whole device (the kernel offloads it when it can;
/// slow on large spinning disks). In 1 GiB steps so a failure says where.
pub fn blk_zeroout(dev: &Path) -> Result<(), CleanupError> {
    let fd = open_excl(dev)?;
    let size = device_size(dev)?;
    let step = 1u64 << 30;
    let mut at = 0;
    while at < size {
        let len = step.min(size - at);
        range_ioctl(dev, &fd, "BLKZEROOUT", at, len)?;
        at += len;
    }
    Ok(())
}

/// Before a reformat: removes every signature (`wipefs -a`, which itself
/// opens the device exclusively) and zeroes the first and last MiB, so the
/// disk is blank by disklet's own test and mkfs (which never forces) accepts
/// it. Only ever called on a disk verified to carry disklet's filesystem.
pub fn wipe_for_reformat(dev: &Path) -> Result<(), CleanupError> {
    Cmd::new("wipefs")
        .arg("--all")
        .arg("--quiet")
        .arg(dev)
        .output()?;
    let fd = open_excl(dev)?;
    let size = device_size(dev)?;
    let n = crate::host::probe::ZERO_CHECK_BYTES.min(size);
    range_ioctl(dev, &fd, "BLKZEROOUT", 0, n)?;
    range_ioctl(dev, &fd, "BLKZEROOUT", size - n, n)?;
    Ok(())
}
