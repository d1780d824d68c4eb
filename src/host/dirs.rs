//! Observation of discovery dirs and of the mounts under hostDir.

use std::path::Path;

use crate::model::{DirEntry, DirEntryKind, MountEntry, MountFact};

/// Filesystem size in bytes.
pub fn fs_capacity(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks().saturating_mul(st.fragment_size()))
}

/// Facts for a mount point disklet made.
pub fn mount_fact(mount_point: &Path) -> MountFact {
    let vol = crate::plan::provision::vol_dir(mount_point);
    // A missing `vol` is normal (not made yet); any other error reading the
    // mount point or `vol` is the filesystem failing.
    let failing = |e: std::io::Error, at: &Path| {
        (e.kind() != std::io::ErrorKind::NotFound).then(|| format!("{}: {e}", at.display()))
    };
    let mut io_error = std::fs::read_dir(mount_point)
        .err()
        .and_then(|e| failing(e, mount_point));
    let vol_empty = match std::fs::read_dir(&vol) {
        Ok(mut d) => match d.next() {
            None => true,
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                io_error = io_error.or_else(|| failing(e, &vol));
                false
            }
        },
        Err(e) => {
            io_error = io_error.or_else(|| failing(e, &vol));
            false
        }
    };
    MountFact {
        vol_dir: vol.is_dir(),
        capacity_bytes: fs_capacity(mount_point).unwrap_or(0),
        vol_empty,
        io_error,
    }
}

/// First-level entries of a discovery dir: mount points (as listed in the
/// host mount table) and symlinks to block devices. Nothing is followed
/// beyond one symlink hop, and a symlink loop is just `Other`.
pub fn scan_dir(class: &str, dir: &Path, mounts: &[MountEntry]) -> Vec<DirEntry> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<DirEntry> = rd
        .filter_map(|e| e.ok())
        .map(|e| {
            let path = e.path();
            let kind = entry_kind(&path, mounts);
            DirEntry {
                class: class.to_string(),
                path,
                kind,
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn entry_kind(path: &Path, mounts: &[MountEntry]) -> DirEntryKind {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return DirEntryKind::Other;
    };
    if meta.file_type().is_symlink() {
        use std::os::unix::fs::FileTypeExt;
        return match std::fs::canonicalize(path) {
            Ok(target) => match std::fs::metadata(&target) {
                Ok(m) if m.file_type().is_block_device() => DirEntryKind::BlockLink {
                    size_bytes: block_size(&target).unwrap_or(0),
                    target,
                },
                _ => DirEntryKind::Other,
            },
            Err(_) => DirEntryKind::Other,
        };
    }
    if meta.is_dir() {
        if let Some(m) = mounts.iter().rev().find(|m| m.mount_point == path) {
            return DirEntryKind::MountPoint {
                capacity_bytes: fs_capacity(path).unwrap_or(0),
                devno: m.devno,
            };
        }
    }
    DirEntryKind::Other
}

/// A block device's size from sysfs, by its node.
fn block_size(dev: &Path) -> Option<u64> {
    let n = crate::host::mountinfo::block_devno(dev)?;
    let s = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/size", n.major, n.minor)).ok()?;
    s.trim().parse::<u64>().ok().map(|s| s * 512)
}
