//! Linux adapters. Each capability is a trait returning `model` types, with a
//! real implementation and a recording fake (`fake`).

pub mod blkid;
pub mod cleanup;
pub mod cmd;
pub mod dirs;
pub mod events;
pub mod fake;
pub mod files;
pub mod format;
pub mod fssize;
pub mod intents;
pub mod mounter;
pub mod mountinfo;
pub mod pool;
pub mod probe;
pub mod probecache;
pub mod sysfs;
pub mod system;
pub mod udevdb;

use crate::model::{Device, Exclusive, MountEntry, Probe, SwapEntry};

pub use cmd::{Cmd, CmdError};
pub use probe::BlkidProber;
pub use sysfs::SysfsDevices;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot list block devices under {path}: {source}")]
    ListDevices {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the mount table {path}: {source} (run as root; in a pod set hostPID: true, or point mountInfo at a readable table)")]
    MountTable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Swaps {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Lists block devices with their sysfs facts, udev data and links (no probe
/// of the contents).
pub trait BlockDevices {
    fn list(&self) -> Result<Vec<Device>, HostError>;

    /// A listing as fresh as [`list`](Self::list) where it matters for
    /// `fresh`: that device is read again whole, and so is every other device
    /// that is new, has no diskseq to tell its medium by (partitions, kernels
    /// before 5.15), or whose medium changed since `previous` was listed (a
    /// new diskseq; for a loop, another backing file); the others are taken
    /// from `previous`. A twin that appears (a second path, a loop
    /// attached to the same file) is always seen; what can be stale is only
    /// the state of an unchanged other device, which no decision about
    /// `fresh` rests on (its own holders, partitions, size and udev record
    /// are read again). The default lists everything.
    fn relist(&self, previous: &[Device], fresh: &str) -> Result<Vec<Device>, HostError> {
        let _ = (previous, fresh);
        self.list()
    }

    /// A device's size in bytes as the kernel reports it now (`None`: not
    /// known here; the listing's size is used).
    fn size_now(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
}

/// Reads device contents, read-only.
pub trait Prober: Sync {
    /// Signatures (superblocks, partition tables, RAID/LVM/LUKS headers) and,
    /// when none is found, whether the first and last MiB are zero.
    fn probe(&self, dev: &Device) -> Probe;
    /// Tries an `O_RDONLY|O_EXCL` open and closes it at once.
    fn exclusive(&self, dev: &Device) -> Exclusive;
}

/// The host's mount table and active swaps.
pub trait HostTables {
    fn mounts(&self) -> Result<Vec<MountEntry>, HostError>;
    fn swaps(&self) -> Result<Vec<SwapEntry>, HostError>;
}

/// `/proc/<pid>/mountinfo` and `/proc/swaps`.
#[derive(Debug, Clone)]
pub struct ProcTables {
    pub mountinfo: std::path::PathBuf,
    pub swaps: std::path::PathBuf,
}

impl ProcTables {
    pub fn new(mountinfo: &std::path::Path) -> Self {
        ProcTables {
            mountinfo: mountinfo.to_path_buf(),
            swaps: "/proc/swaps".into(),
        }
    }
}

impl HostTables for ProcTables {
    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        mountinfo::read_consistent(&self.mountinfo).map_err(|source| HostError::MountTable {
            path: self.mountinfo.clone(),
            source,
        })
    }

    fn swaps(&self) -> Result<Vec<SwapEntry>, HostError> {
        let text = mountinfo::read_lossy(&self.swaps).map_err(|source| HostError::Swaps {
            path: self.swaps.clone(),
            source,
        })?;
        Ok(mountinfo::parse_swaps(&text)
            .into_iter()
            .map(|mut s| {
                s.devno = mountinfo::block_devno(&s.path);
                s
            })
            .collect())
    }
}
