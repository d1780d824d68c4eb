//! Reason codes: why a device is refused or not decided yet (`disklet
//! scan`, metrics, Events), and the reasons of the Events disklet writes.

use serde::Serialize;

/// Why a device is refused. The kebab-case names are a stable interface: they
/// appear in `disklet scan`, Events and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No class selector names the device: disklet never touches it.
    NoClassMatches,
    /// A partition, and the class does not list `part` in `types`.
    Partition,
    /// A loop/dm/md/rbd/nbd/zram/ram/rom device whose kind the class does not list.
    TypeNotAllowed,
    Hidden,
    ReadOnly,
    Removable,
    /// Holds `/`, `/boot`, `/boot/efi`, the kubelet dir or disklet's hostDir.
    OsDisk,
    HasHolders,
    HasPartitions,
    /// Another device has the same WWN, serial, loop backing file or
    /// filesystem UUID: two paths to one disk, or a clone. Both are refused.
    DuplicateIdentity,
    /// Active swap on the device or one of its partitions.
    Swap,
    Mounted,
    /// Our probe could not read the device, so nothing is known about its contents.
    ProbeFailed,
    PartitionTable,
    ForeignFilesystem,
    /// No known signature, but the first or last MiB holds data.
    UnknownData,
    TooSmall,
    TooLarge,
    /// The kernel refused an exclusive open: somebody is using the device.
    Busy,
}

impl Reason {
    pub const ALL: [Reason; 19] = [
        Reason::NoClassMatches,
        Reason::Partition,
        Reason::TypeNotAllowed,
        Reason::Hidden,
        Reason::ReadOnly,
        Reason::Removable,
        Reason::OsDisk,
        Reason::HasHolders,
        Reason::HasPartitions,
        Reason::DuplicateIdentity,
        Reason::Swap,
        Reason::Mounted,
        Reason::ProbeFailed,
        Reason::PartitionTable,
        Reason::ForeignFilesystem,
        Reason::UnknownData,
        Reason::TooSmall,
        Reason::TooLarge,
        Reason::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoClassMatches => "no-class-matches",
            Reason::Partition => "partition",
            Reason::TypeNotAllowed => "type-not-allowed",
            Reason::Hidden => "hidden",
            Reason::ReadOnly => "read-only",
            Reason::Removable => "removable",
            Reason::OsDisk => "os-disk",
            Reason::HasHolders => "has-holders",
            Reason::HasPartitions => "has-partitions",
            Reason::DuplicateIdentity => "duplicate-identity",
            Reason::Swap => "swap",
            Reason::Mounted => "mounted",
            Reason::ProbeFailed => "probe-failed",
            Reason::PartitionTable => "partition-table",
            Reason::ForeignFilesystem => "foreign-filesystem",
            Reason::UnknownData => "unknown-data",
            Reason::TooSmall => "too-small",
            Reason::TooLarge => "too-large",
            Reason::Busy => "busy",
        }
    }
}

/// Why a device is not decided yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingReason {
    /// udevd runs but has not written its record for the device yet.
    UdevNotProcessed,
    /// The device has not been stable for the class's `settleSeconds`.
    Settling,
    /// Everything else qualifies; the exclusive-open test has not been made.
    ExclusiveNotChecked,
}

impl PendingReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PendingReason::UdevNotProcessed => "udev-not-processed",
            PendingReason::Settling => "settling",
            PendingReason::ExclusiveNotChecked => "exclusive-not-checked",
        }
    }
}

/// The `reason` of every Event disklet writes (README, "Events").
pub mod event {
    pub const ADOPTED: &str = "Adopted";
    pub const CLEANUP_FAILED: &str = "CleanupFailed";
    pub const DEVICE_HAS_PV: &str = "DeviceHasPv";
    pub const DEVICE_MISSING: &str = "DeviceMissing";
    pub const DEVICE_READ_ONLY: &str = "DeviceReadOnly";
    pub const DEVICE_RETURNED: &str = "DeviceReturned";
    pub const DEVICE_SHRUNK: &str = "DeviceShrunk";
    pub const DEVICE_UNFIT: &str = "DeviceUnfit";
    pub const DISCOVERY_ENTRY_REFUSED: &str = "DiscoveryEntryRefused";
    pub const DISCOVERY_LINK_REFUSED: &str = "DiscoveryLinkRefused";
    pub const DISK_SKIPPED: &str = "DiskSkipped";
    pub const FORMAT_FAILED: &str = "FormatFailed";
    pub const FORMATTED: &str = "Formatted";
    pub const HOST_MOUNT_TABLE_BLIND: &str = "HostMountTableBlind";
    pub const MOUNT_FAILED: &str = "MountFailed";
    pub const MOUNTED: &str = "Mounted";
    pub const MOUNTED_ELSEWHERE: &str = "MountedElsewhere";
    pub const NO_STABLE_IDENTITY: &str = "NoStableIdentity";
    pub const ORPHANED_PV: &str = "OrphanedPv";
    pub const OUTSIDE_ALLOWED_TOPOLOGIES: &str = "OutsideAllowedTopologies";
    pub const PUBLISHED: &str = "Published";
    pub const PV_MODIFIED: &str = "PvModified";
    pub const RECLAIM_POLICY_UNSUPPORTED: &str = "ReclaimPolicyUnsupported";
    pub const RECYCLED: &str = "Recycled";
    pub const RETAINED: &str = "Retained";
    pub const STORAGE_CLASS_MISSING: &str = "StorageClassMissing";
    pub const UNMANAGED_PV: &str = "UnmanagedPv";
    pub const VOLUME_IN_USE: &str = "VolumeInUse";
    pub const VOLUME_IO_ERROR: &str = "VolumeIoError";
    pub const VOLUME_NOT_CLEAN: &str = "VolumeNotClean";
    pub const VOLUME_REPLACED: &str = "VolumeReplaced";
    pub const VOLUME_WITHDRAWN: &str = "VolumeWithdrawn";

    /// Every Event reason, a table of data.
    pub const ALL: [&str; 32] = [
        ADOPTED,
        CLEANUP_FAILED,
        DEVICE_HAS_PV,
        DEVICE_MISSING,
        DEVICE_READ_ONLY,
        DEVICE_RETURNED,
        DEVICE_SHRUNK,
        DEVICE_UNFIT,
        DISCOVERY_ENTRY_REFUSED,
        DISCOVERY_LINK_REFUSED,
        DISK_SKIPPED,
        FORMAT_FAILED,
        FORMATTED,
        HOST_MOUNT_TABLE_BLIND,
        MOUNT_FAILED,
        MOUNTED,
        MOUNTED_ELSEWHERE,
        NO_STABLE_IDENTITY,
        ORPHANED_PV,
        OUTSIDE_ALLOWED_TOPOLOGIES,
        PUBLISHED,
        PV_MODIFIED,
        RECLAIM_POLICY_UNSUPPORTED,
        RECYCLED,
        RETAINED,
        STORAGE_CLASS_MISSING,
        UNMANAGED_PV,
        VOLUME_IN_USE,
        VOLUME_IO_ERROR,
        VOLUME_NOT_CLEAN,
        VOLUME_REPLACED,
        VOLUME_WITHDRAWN,
    ];
}
