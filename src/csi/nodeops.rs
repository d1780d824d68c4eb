//! The node's side of a volume: its filesystem made only on a blank volume,
//! its mounts, its freeze for a consistent snapshot, its usage.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::Status;

use crate::host::mountinfo::read_consistent;
use crate::host::pool;
use crate::host::probe::Signatures;
use crate::host::Cmd;
use crate::model::MountEntry;

mod ioctls {
    // FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int).
    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);
}

/// How long the probe of a volume's device may read it.
const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what} {}: {e}", path.display()))
}

/// What is mounted at `path` now (the topmost mount), by the host's table.
pub fn mounted_at(mount_info: &Path, path: &Path) -> Result<Option<MountEntry>, Status> {
    let mounts = read_consistent(mount_info)
        .map_err(|e| internal("cannot read the mount table", mount_info, e))?;
    Ok(mounts.into_iter().rev().find(|m| m.mount_point == path))
}

/// Every mount of the block device `dev` (by its device number).
fn mounts_of(mount_info: &Path, dev: &Path) -> Result<Vec<MountEntry>, Status> {
    let Some(devno) = crate::host::mountinfo::block_devno(dev) else {
        return Ok(Vec::new());
    };
    let mounts = read_consistent(mount_info)
        .map_err(|e| internal("cannot read the mount table", mount_info, e))?;
    Ok(mounts.into_iter().filter(|m| m.devno == devno).collect())
}

/// Where the loop device `dev` is bound or mounted besides `except`: its
/// filesystem's mounts, and bind mounts of the device node itself (a Block
/// volume's publish targets).
pub fn published_at(
    mount_info: &Path,
    dev: &Path,
    except: &[&Path],
) -> Result<Vec<PathBuf>, Status> {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let devno = crate::host::mountinfo::block_devno(dev);
    let mounts = read_consistent(mount_info)
        .map_err(|e| internal("cannot read the mount table", mount_info, e))?;
    Ok(mounts
        .into_iter()
        .filter(|m| {
            Some(m.devno) == devno
                || (m.fs_type == "devtmpfs" && m.root == Path::new("/").join(&name))
        })
        .map(|m| m.mount_point)
        .filter(|p| !except.contains(&p.as_path()))
        .collect())
}

/// The filesystem on a volume's device, `None` when the volume is blank:
/// no signature, and not one byte of its file ever written (FIEMAP: every
/// extent still unwritten). Data without a signature anywhere in the volume,
/// a Block tenant's say, is an error: it is never formatted.
pub fn filesystem(dev: &Path, file: &Path) -> Result<Option<String>, Status> {
    let sigs = Signatures::Libblkid
        .read(dev, PROBE_DEADLINE)
        .map_err(|e| internal("cannot probe", dev, e))?;
    if let Some(s) = sigs.first() {
        return Ok(Some(s.kind.clone()));
    }
    match pool::written_bytes(file) {
        Ok(0) => Ok(None),
        Ok(n) => Err(Status::failed_precondition(format!(
            "{} holds data ({n} bytes written) but no filesystem signature; it is not formatted (a Block volume's data, say)",
            dev.display()
        ))),
        Err(e) => Err(internal("cannot map the extents of", file, e)),
    }
}

/// mkfs on a volume found blank. No discard: that would punch the volume
/// file's reserved space out of the pool.
pub fn mkfs(dev: &Path, fs_type: &str) -> Result<(), Status> {
    let cmd = match fs_type {
        "xfs" => Cmd::new("mkfs.xfs").arg("-q").arg("-K"),
        // 4 KiB blocks: the loop device has 4 KiB sectors (pool::attach),
        // and mke2fs would pick 1 KiB for a small volume.
        _ => Cmd::new("mkfs.ext4")
            .arg("-q")
            .arg("-b")
            .arg("4096")
            .arg("-E")
            .arg("nodiscard"),
    };
    cmd.arg(dev.as_os_str())
        .output()
        .map_err(|e| internal(&format!("mkfs.{fs_type} failed on"), dev, e))?;
    Ok(())
}

/// Mounts a volume's filesystem. XFS with `nouuid`: a restored or cloned
/// volume is a reflink copy of its source, superblock UUID included, and XFS
/// refuses to mount a second filesystem with a mounted one's UUID (EINVAL).
/// The option changes nothing on the disk; the tenant's filesystem is left
/// as it was written.
pub fn mount_fs(dev: &Path, target: &Path, fs_type: &str, flags: &[String]) -> Result<(), Status> {
    std::fs::create_dir_all(target).map_err(|e| internal("cannot create", target, e))?;
    let mut flags = flags.to_vec();
    if fs_type == "xfs" && !flags.iter().any(|o| o == "nouuid") {
        flags.push("nouuid".into());
    }
    let (ms, data) = crate::host::mounter::split_options(&flags);
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(dev), target, Some(fs_type), ms, data)
        .map_err(|e| internal(&format!("cannot mount {} at", dev.display()), target, e))
}

/// Bind-mounts `src` (a directory or a device node) at `target`, read-only
/// when asked.
pub fn bind(src: &Path, target: &Path, readonly: bool) -> Result<(), Status> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| internal(&format!("cannot bind {} at", src.display()), target, e))?;
    if readonly {
        let f = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, f, None::<&str>) {
            let _ = umount2(target, MntFlags::UMOUNT_NOFOLLOW);
            return Err(internal("cannot make read-only", target, e));
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target`.
pub fn umount_all(mount_info: &Path, target: &Path) -> Result<(), Status> {
    while mounted_at(mount_info, target)?.is_some() {
        umount2(target, MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|e| internal("cannot unmount", target, e))?;
    }
    Ok(())
}

/// Runs `f` with every filesystem on the volume's loop device frozen, so a
/// snapshot taken in it holds what the tenant had written, not half of it.
pub fn frozen<T>(volume_file: &Path, f: impl FnOnce() -> T) -> Result<T, Status> {
    let mount_info = Path::new("/proc/self/mountinfo");
    let mounts = match pool::attached(volume_file) {
        Some(dev) => mounts_of(mount_info, &dev)?,
        None => Vec::new(),
    };
    // One freeze per filesystem: the first mount of it (binds share it).
    let mut held: Vec<(PathBuf, std::fs::File)> = Vec::new();
    if let Some(m) = mounts.first() {
        let dir = std::fs::File::open(&m.mount_point)
            .map_err(|e| internal("cannot open", &m.mount_point, e))?;
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: the fd is open for the call; the kernel reads (and may
        // write) one int through the pointer, which lives across the call.
        unsafe { ioctls::fifreeze(dir.as_raw_fd(), &mut arg) }
            .map_err(|e| internal("cannot freeze", &m.mount_point, e))?;
        held.push((m.mount_point.clone(), dir));
    }
    let out = f();
    for (path, dir) in held {
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: as for the freeze above.
        if let Err(e) = unsafe { ioctls::fithaw(dir.as_raw_fd(), &mut arg) } {
            tracing::error!(mount = %path.display(), error = %e, "cannot thaw a filesystem frozen for a snapshot; run fsfreeze -u on it");
        }
    }
    Ok(out)
}

/// Grows the filesystem mounted at `mount_point` from `dev` to the device's
/// size.
pub fn grow_fs(dev: &Path, mount_point: &Path, fs_type: &str) -> Result<(), Status> {
    let cmd = match fs_type {
        "xfs" => Cmd::new("xfs_growfs").arg(mount_point.as_os_str()),
        "ext4" | "ext3" | "ext2" => Cmd::new("resize2fs").arg(dev.as_os_str()),
        other => {
            return Err(Status::failed_precondition(format!(
                "cannot grow a {other} filesystem at {}",
                mount_point.display()
            )))
        }
    };
    cmd.output()
        .map_err(|e| internal("cannot grow the filesystem at", mount_point, e))?;
    Ok(())
}

/// Removes a publish target after its unmount: an empty directory, or the
/// empty file a Block volume was bound onto. Never anything with content.
pub fn remove_target(target: &Path) -> Result<(), Status> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(internal("cannot stat", target, e)),
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir(target).map_err(|e| internal("cannot remove", target, e))
        }
        Ok(m) if m.is_file() && m.len() == 0 => {
            std::fs::remove_file(target).map_err(|e| internal("cannot remove", target, e))
        }
        Ok(_) => Err(Status::failed_precondition(format!(
            "{} is neither an empty directory nor an empty file; it is left in place",
            target.display()
        ))),
    }
}
