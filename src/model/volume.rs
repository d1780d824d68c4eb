//! Volumes, the node, and StorageClasses as the plan sees them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DevNo, Device, Inventory};

/// How a PV presents its volume (`spec.volumeMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
}

/// The access mode of a class's PVs. A ReadWriteOncePod claim binds only to a
/// PV that lists ReadWriteOncePod (which the API lets stand alone); the
/// scheduler then keeps a second pod off the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AccessMode {
    #[default]
    ReadWriteOnce,
    ReadWriteOncePod,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

/// What must not change between planning a format and running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fingerprint {
    pub devno: DevNo,
    pub size_bytes: u64,
    pub diskseq: Option<u64>,
    pub read_only: bool,
    pub holders: Vec<String>,
    pub partitions: Vec<String>,
    pub serial: Option<String>,
    pub wwid: Option<String>,
    pub loop_backing_file: Option<std::path::PathBuf>,
    /// (type, offset) of every signature.
    pub signatures: Vec<(String, u64)>,
    pub mounted: bool,
}

impl Fingerprint {
    pub fn of(dev: &Device, inv: &Inventory) -> Fingerprint {
        Fingerprint {
            devno: dev.devno,
            size_bytes: dev.size_bytes,
            diskseq: dev.diskseq,
            read_only: dev.read_only,
            holders: dev.holders.clone(),
            partitions: dev.partitions.clone(),
            serial: dev.serial.clone(),
            wwid: dev.wwid.clone(),
            loop_backing_file: dev.loop_backing_file.clone(),
            signatures: dev
                .signatures()
                .iter()
                .map(|s| (s.kind.clone(), s.offset))
                .collect(),
            mounted: inv.mounts_of(dev).next().is_some(),
        }
    }
}

/// The Node object's facts the PVs need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
    /// The value of the Node's `kubernetes.io/hostname` label (the node name
    /// when the label is missing): what the scheduler matches PVs against.
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
}

pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The StorageClass fields copied onto PVs, and where its volumes may be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScInfo {
    pub reclaim_policy: String,
    pub mount_options: Vec<String>,
    /// `allowedTopologies`: terms ORed, each a list of (label key, values)
    /// ANDed. Empty: everywhere.
    pub allowed_topologies: Vec<Vec<(String, Vec<String>)>>,
}

impl ScInfo {
    /// Whether a node with these labels lies inside the class's
    /// `allowedTopologies`. The scheduler checks them only when a volume is
    /// provisioned, never for an existing PV, so a PV published outside them
    /// would take claims of the class out of its topology.
    pub fn allows(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.allowed_topologies.is_empty()
            || self.allowed_topologies.iter().any(|term| {
                term.iter()
                    .all(|(k, vals)| node_labels.get(k).is_some_and(|v| vals.contains(v)))
            })
    }
}

/// What was found at a mount point under hostDir or a discovery dir.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountFact {
    /// `<mount>/vol` exists (only possible while mounted).
    pub vol_dir: bool,
    /// Filesystem size in bytes (statvfs): what a PV offers.
    pub capacity_bytes: u64,
    /// The filesystem's own size as its superblock records it (larger than
    /// `capacity_bytes` by the log and metadata), when it can be read.
    pub fs_bytes: Option<u64>,
    /// The device's size, read after `fs_bytes`: a disk grown and then its
    /// filesystem grown while the pass ran (an online grow) is never taken
    /// for a disk smaller than its filesystem.
    pub device_bytes: Option<u64>,
    /// `<mount>/vol` holds nothing: a new PV may be created for it.
    pub vol_empty: bool,
    /// The filesystem answers with errors (an xfs that shut down, a disk
    /// failing under it): nothing is published on it, and its PV is
    /// withdrawn (Available) or marked (claimed).
    pub io_error: Option<String>,
}

/// A record that disklet started a mkfs of filesystem `uuid` on the disk
/// `device_key` ([`Device::intent_key`]); see `host::intents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatIntent {
    pub uuid: String,
    pub device_key: String,
}

impl MountFact {
    /// The filesystem's size: the superblock's when known, else what
    /// `statvfs` counts (less, by the log and metadata).
    pub fn fs_size(&self) -> u64 {
        self.fs_bytes.unwrap_or(self.capacity_bytes)
    }
}

/// An entry of a discovery dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEntryKind {
    /// A mount point: its filesystem's size.
    MountPoint { capacity_bytes: u64, devno: DevNo },
    /// A symlink to a block device, with the device's size.
    BlockLink { target: PathBuf, size_bytes: u64 },
    /// Anything else: ignored.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub class: String,
    pub path: PathBuf,
    pub kind: DirEntryKind,
    /// Why an entry that looks like an admin's mistake (a symlink loop, a
    /// dangling symlink, a name kubelet cannot carry) is not published: the
    /// agent reports it as a Warning Event. `None` for good entries and for
    /// plain ones (a directory not mounted yet).
    pub warning: Option<String>,
}

/// A volume ready to be published as a PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// What the PV name is derived from: `fs:<uuid>`, `dev:<identity>` or
    /// `dir:<path>`.
    pub key: String,
    pub class: String,
    pub mode: VolumeMode,
    pub access_mode: AccessMode,
    /// `spec.local.path`.
    pub path: PathBuf,
    pub capacity_bytes: u64,
    /// `spec.local.fsType` (kubelet formats the raw device on first use).
    pub fs_type: Option<String>,
    /// Identity annotations (`disklet.io/...`).
    pub annotations: BTreeMap<String, String>,
    /// Why no *new* PV may be created for it (an existing one is kept).
    pub create_blocked: Option<String>,
}

/// Where disklet mounts a filesystem it owns.
pub fn mount_target(host_dir: &Path, class: &str, uuid: &str) -> PathBuf {
    host_dir.join(class).join(uuid)
}

/// The PV path inside a mount: exists only while the filesystem is mounted.
pub fn vol_dir(mount_point: &Path) -> PathBuf {
    mount_point.join("vol")
}

/// Whether a device is smaller than the filesystem mounted from it: the
/// kernel then fails every access beyond the device's end (and refuses to
/// mount it again). The superblock's size when known; otherwise `statvfs`,
/// which undercounts (the xfs log, ext4 metadata), so that only a shrink
/// below what it reports is seen.
pub fn shrunk(dev: &crate::model::Device, fact: &MountFact) -> bool {
    fact.fs_size() > fact.device_bytes.unwrap_or(dev.size_bytes)
}
