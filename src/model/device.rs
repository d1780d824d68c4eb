//! A block device as disklet sees it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The filesystem label disklet writes when it formats a disk, and by which it
/// recognises its own filesystems without mounting them (xfs allows 12 bytes,
/// ext4 16). A disk is ours only if it carries exactly one signature, an xfs or
/// ext4 superblock, with this label.
pub const OWNER_LABEL: &str = "disklet";

/// Kernel device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DevNo {
    pub major: u32,
    pub minor: u32,
}

impl DevNo {
    pub fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses the `MAJ:MIN` form used by sysfs `dev` files and mountinfo.
    pub fn parse(s: &str) -> Option<Self> {
        let (maj, min) = s.trim().split_once(':')?;
        Some(Self::new(maj.parse().ok()?, min.parse().ok()?))
    }
}

impl fmt::Display for DevNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// What sort of block device this is. Selectors list the kinds they accept
/// (`types:`); only `disk` is accepted unless the admin lists more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Disk,
    #[serde(rename = "part")]
    Partition,
    Loop,
    Dm,
    Md,
    Rbd,
    Nbd,
    Zram,
    Ram,
    /// Optical drives (`sr*`).
    Rom,
    Other,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Partition => "part",
            DeviceKind::Loop => "loop",
            DeviceKind::Dm => "dm",
            DeviceKind::Md => "md",
            DeviceKind::Rbd => "rbd",
            DeviceKind::Nbd => "nbd",
            DeviceKind::Zram => "zram",
            DeviceKind::Ram => "ram",
            DeviceKind::Rom => "rom",
            DeviceKind::Other => "other",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One on-disk signature found by our probe (superblock, partition table,
/// RAID/LVM/LUKS header...), named as libblkid names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// libblkid's name: `ext4`, `xfs`, `btrfs`, `swap`, `crypto_LUKS`,
    /// `LVM2_member`, `linux_raid_member`, `gpt`, `dos`, `PMBR`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: u64,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// An xfs whose superblock still says "mkfs in progress"
    /// (`sb_inprogress`): its mkfs never finished, the kernel refuses to
    /// mount it, so nothing was ever stored in it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_progress: bool,
}

/// The coarse class of a signature, which decides the refusal reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureKind {
    PartitionTable,
    Other,
}

impl Signature {
    pub fn class(&self) -> SignatureKind {
        match self.kind.as_str() {
            "gpt" | "dos" | "PMBR" | "sun" | "sgi" | "bsd" | "mac" | "atari" | "aix"
            | "unixware" | "solaris" | "minix" | "ultrix" => SignatureKind::PartitionTable,
            _ => SignatureKind::Other,
        }
    }
}

/// Result of our own read-only probe of the device contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Probe {
    /// Not probed (for instance a device with no media).
    NotProbed,
    /// The probe could not read the device; nothing is known about its contents.
    Failed { error: String },
    Done {
        signatures: Vec<Signature>,
        /// Whether the first and last MiB read back as zeroes. `None` when the
        /// check was not made (it is only made when no signature was found).
        zeroed: Option<bool>,
    },
}

/// Outcome of an `O_EXCL` open, the kernel's own "is anybody using this" test
/// (mounts, device-mapper, md and other exclusive openers all make it fail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Exclusive {
    NotChecked,
    Free,
    Busy,
    Failed { error: String },
}

/// What the udev database says about the device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum UdevState {
    /// udevd is not running: sysfs and our probe are all we have.
    #[default]
    NotRunning,
    /// udevd is running but has not written a record for this device yet.
    NotProcessed,
    Processed {
        properties: BTreeMap<String, String>,
    },
}

/// A block device with everything discovery learnt about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Kernel name, e.g. `nvme0n1`, `loop3`, `sda1`.
    pub name: String,
    /// `/dev/<name>`.
    pub devnode: PathBuf,
    pub devno: DevNo,
    pub kind: DeviceKind,
    pub size_bytes: u64,
    pub read_only: bool,
    pub removable: bool,
    pub hidden: bool,
    pub rotational: Option<bool>,
    /// Kernel names of devices stacked on this one (`holders/`).
    pub holders: Vec<String>,
    /// Kernel names of devices this one is stacked on (`slaves/`, for dm and md).
    pub slaves: Vec<String>,
    /// Kernel names of this device's partitions.
    pub partitions: Vec<String>,
    /// For a partition, the kernel name of its disk.
    pub parent: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub wwid: Option<String>,
    /// Disk sequence number (changes every time a loop is attached or media changes).
    pub diskseq: Option<u64>,
    pub loop_backing_file: Option<PathBuf>,
    /// Every symlink under `/dev/disk/by-*` and `/dev/mapper` that points here.
    pub links: Vec<PathBuf>,
    pub udev: UdevState,
    pub probe: Probe,
    pub exclusive: Exclusive,
}

impl Device {
    /// A device with only its identity filled in: everything else blank and
    /// unprobed. Discovery and tests start from this.
    pub fn new(name: &str, devno: DevNo, kind: DeviceKind) -> Self {
        Device {
            name: name.to_string(),
            devnode: PathBuf::from("/dev").join(name),
            devno,
            kind,
            size_bytes: 0,
            read_only: false,
            removable: false,
            hidden: false,
            rotational: None,
            holders: Vec::new(),
            slaves: Vec::new(),
            partitions: Vec::new(),
            parent: None,
            model: None,
            vendor: None,
            serial: None,
            wwid: None,
            diskseq: None,
            loop_backing_file: None,
            links: Vec::new(),
            udev: UdevState::NotRunning,
            probe: Probe::NotProbed,
            exclusive: Exclusive::NotChecked,
        }
    }

    pub fn udev_properties(&self) -> Option<&BTreeMap<String, String>> {
        match &self.udev {
            UdevState::Processed { properties } => Some(properties),
            _ => None,
        }
    }

    /// How a format record names this disk: its identity, else its kernel
    /// name (`name:`), which a reboot can give to another disk, so a record
    /// by name never allows a format again.
    pub fn intent_key(&self) -> String {
        self.identity()
            .unwrap_or_else(|| format!("name:{}", self.name))
    }

    /// The most stable identity we know, best first: WWN, then serial (sysfs or
    /// udev), then the `/dev/disk/by-id` link, then, for a loop, its backing file.
    pub fn identity(&self) -> Option<String> {
        let prop = |k: &str| self.udev_properties().and_then(|p| p.get(k)).cloned();
        if let Some(w) = self.wwid.clone().or_else(|| prop("ID_WWN")) {
            return Some(format!("wwn:{w}"));
        }
        if let Some(s) = self.serial.clone().or_else(|| prop("ID_SERIAL")) {
            return Some(format!("serial:{s}"));
        }
        if let Some(l) = self.links.iter().find(|l| l.starts_with("/dev/disk/by-id")) {
            return Some(format!("by-id:{}", l.display()));
        }
        self.loop_backing_file
            .as_ref()
            .map(|f| format!("loop-file:{}", f.display()))
    }

    /// Signatures found by the probe, empty if it did not run or failed.
    pub fn signatures(&self) -> &[Signature] {
        match &self.probe {
            Probe::Done { signatures, .. } => signatures,
            _ => &[],
        }
    }
}

/// Whether the signatures are exactly one disklet-owned filesystem (one
/// whose mkfs finished: the kernel refuses to mount any other).
pub fn ownership(sigs: &[Signature]) -> Option<&Signature> {
    match sigs {
        [s] if (s.kind == "xfs" || s.kind == "ext4")
            && s.label.as_deref() == Some(OWNER_LABEL)
            && !s.in_progress =>
        {
            Some(s)
        }
        _ => None,
    }
}

/// Whether the signatures look like the remains of a mkfs.xfs of disklet's
/// that never finished (the agent or its container killed while it wrote):
/// our label on an xfs whose superblock is still "in progress". The kernel
/// never mounts such a filesystem. An aborted xfs_copy of one of our disks
/// looks the same and holds data: only a record that disklet started this
/// very mkfs on this very disk (`NodeFacts::started_here`) tells them apart.
pub fn unfinished_mkfs(sigs: &[Signature]) -> Option<&Signature> {
    match sigs {
        [s] if s.kind == "xfs"
            && s.offset == 0
            && s.in_progress
            && s.label.as_deref() == Some(OWNER_LABEL) =>
        {
            Some(s)
        }
        _ => None,
    }
}
