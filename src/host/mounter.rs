//! mount(2) and umount(2), idempotent, behind a trait with a recording fake.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {path}: {source}")]
    MkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount {dev} on {target} ({fs}) failed: {source}{}", mount_hint(.source, .dev))]
    Mount {
        dev: PathBuf,
        target: PathBuf,
        fs: String,
        source: nix::errno::Errno,
    },
    #[error("mounted {target}, but the host mount table {table} does not show it: hostDir needs mountPropagation: Bidirectional (unmounted again)")]
    NotPropagated { target: PathBuf, table: PathBuf },
    #[error("umount {target} failed: {source}")]
    Umount {
        target: PathBuf,
        source: nix::errno::Errno,
    },
}

/// What the admin can do about a mount(2) error that needs one.
fn mount_hint(e: &nix::errno::Errno, dev: &Path) -> String {
    let damaged = |what: &str| {
        format!(
            " ({what}: repair it with xfs_repair or e2fsck; if no claim ever used \
             this disk, zero it (`blkdiscard -z -f {}`) and disklet formats it again)",
            dev.display()
        )
    };
    match e {
        nix::errno::Errno::EUCLEAN => damaged("the filesystem is damaged"),
        nix::errno::Errno::EINVAL => damaged(
            "a damaged superblock, or a mount option the filesystem rejects \
             (see the StorageClass's mountOptions)",
        ),
        _ => String::new(),
    }
}

pub trait Mounter: Send + Sync {
    /// Mounts `dev` on `target` (created if missing).
    fn mount(
        &self,
        dev: &Path,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), MountError>;
    fn umount(&self, target: &Path) -> Result<(), MountError>;
}

/// Splits `mount -o` style options into kernel flags and filesystem data.
pub fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

#[derive(Debug, Default, Clone)]
pub struct SysMounter;

impl Mounter for SysMounter {
    fn mount(
        &self,
        dev: &Path,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        std::fs::create_dir_all(target).map_err(|source| MountError::MkDir {
            path: target.into(),
            source,
        })?;
        let (flags, data) = split_options(options);
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(dev), target, Some(fs), flags, data).map_err(|source| {
            MountError::Mount {
                dev: dev.into(),
                target: target.into(),
                fs: fs.into(),
                source,
            }
        })
    }

    fn umount(&self, target: &Path) -> Result<(), MountError> {
        nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(|source| {
            MountError::Umount {
                target: target.into(),
                source,
            }
        })
    }
}

/// Records calls, mounts nothing.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<String>>,
}

impl Mounter for RecordingMounter {
    fn mount(
        &self,
        dev: &Path,
        target: &Path,
        fs: &str,
        _options: &[String],
    ) -> Result<(), MountError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("mount {} {} {fs}", dev.display(), target.display()));
        }
        Ok(())
    }
    fn umount(&self, target: &Path) -> Result<(), MountError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("umount {}", target.display()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = split_options(&[
            "noatime".into(),
            "nodev".into(),
            "inode64".into(),
            "logbsize=256k".into(),
        ]);
        assert!(f.contains(MsFlags::MS_NOATIME | MsFlags::MS_NODEV));
        assert_eq!(d, "inode64,logbsize=256k");
        assert_eq!(split_options(&[]), (MsFlags::empty(), String::new()));
    }
}
