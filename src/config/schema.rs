//! The configuration's types and their defaults: what the file may say.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{AccessMode, VolumeMode};
use crate::model::{DeviceKind, Quantity};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Where disklet mounts the disks it formats: `<hostDir>/<class>/<id>`.
    #[serde(default = "default_host_dir")]
    pub host_dir: PathBuf,
    /// kubelet's root directory; the disk holding it is an OS disk.
    #[serde(default = "default_kubelet_dir")]
    pub kubelet_dir: PathBuf,
    /// The host's mount table. With `hostPID: true` in the pod, `/proc/1/mountinfo`
    /// is the host's even when disklet runs in a container.
    #[serde(default = "default_mount_info")]
    pub mount_info: PathBuf,
    /// Node labels copied into every PV's node affinity besides
    /// `kubernetes.io/hostname`, e.g. `topology.kubernetes.io/zone`.
    #[serde(default)]
    pub topology_keys: Vec<String>,
    /// Full reconcile at least this often, whatever the events say.
    #[serde(default = "default_resync")]
    pub resync_seconds: u64,
    #[serde(default)]
    pub classes: Vec<Class>,
}

fn default_resync() -> u64 {
    60
}

fn default_host_dir() -> PathBuf {
    PathBuf::from("/var/lib/disklet")
}
fn default_kubelet_dir() -> PathBuf {
    PathBuf::from("/var/lib/kubelet")
}
fn default_mount_info() -> PathBuf {
    PathBuf::from("/proc/1/mountinfo")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host_dir: default_host_dir(),
            kubelet_dir: default_kubelet_dir(),
            mount_info: default_mount_info(),
            topology_keys: Vec::new(),
            resync_seconds: default_resync(),
            classes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Xfs,
    Ext4,
}

impl FsType {
    /// The smallest device mkfs accepts (mkfs.xfs refuses under 300 MB).
    pub fn min_size(self) -> u64 {
        match self {
            FsType::Xfs => 300 << 20,
            FsType::Ext4 => 16 << 20,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// How a released volume (reclaim policy Delete) is cleaned before its disk
/// is offered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupMethod {
    /// Unmount, wipe, mkfs with a new UUID, mount: cost independent of the
    /// number of files. Default for disks disklet formatted.
    Reformat,
    /// BLKDISCARD the whole device (zeroout where unsupported). Default for raw
    /// (Block, publishFsType) volumes.
    Discard,
    /// BLKZEROOUT the whole device.
    Zeroout,
    /// Delete the contents in place, never following symlinks or crossing
    /// mounts. Default for discovery-dir mount points.
    Files,
    /// Publish again as is.
    None,
}

impl CleanupMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupMethod::Reformat => "reformat",
            CleanupMethod::Discard => "discard",
            CleanupMethod::Zeroout => "zeroout",
            CleanupMethod::Files => "files",
            CleanupMethod::None => "none",
        }
    }
}

/// How a disk is judged blank before disklet may format it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum BlankCheck {
    /// No signature anywhere libblkid looks *and* the first and last MiB read
    /// back as zeroes (the default: a disk wiped only with `wipefs -a` still
    /// holds data and is refused as `unknown-data`).
    #[default]
    Zeroed,
    /// No signature anywhere libblkid looks.
    Signatures,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Class {
    pub name: String,
    /// StorageClass of the PVs; defaults to `name`.
    #[serde(default)]
    pub storage_class_name: Option<String>,
    #[serde(default)]
    pub volume_mode: VolumeMode,
    /// The PVs' access mode: ReadWriteOnce, or ReadWriteOncePod for claims
    /// that ask for it.
    #[serde(default)]
    pub access_mode: AccessMode,
    #[serde(default)]
    pub fs_type: FsType,
    /// A device must look the same for this long before disklet acts on it.
    #[serde(default = "default_settle")]
    pub settle_seconds: u64,
    #[serde(default)]
    pub blank_check: BlankCheck,
    /// Which disks are dedicated to the class. May be omitted only by a class
    /// that publishes discovery dirs alone.
    #[serde(default)]
    pub selector: Selector,
    /// Static-provisioner style directories: each first-level entry that is a
    /// mount point (Filesystem) or a symlink to a block device (Block) is
    /// published as is, never formatted.
    #[serde(default)]
    pub discovery_dirs: Vec<PathBuf>,
    /// Options for disklet's own mount of the disks it formats.
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// Publish blank disks raw with `spec.local.fsType` set, so that kubelet
    /// formats them on first use (as the static provisioner can), instead of
    /// formatting them here.
    #[serde(default)]
    pub publish_fs_type: bool,
    /// How released volumes are cleaned; where a method does not apply to a
    /// volume (reformat on a discovery-dir mount), that kind's default is used.
    #[serde(default)]
    pub cleanup: Option<CleanupMethod>,
}

fn default_settle() -> u64 {
    5
}

impl Class {
    pub fn storage_class(&self) -> &str {
        self.storage_class_name.as_deref().unwrap_or(&self.name)
    }
}

/// Which disks the admin dedicates to a class. All given fields must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Globs on the device node and all its `/dev/disk/by-*` links; `*` does not
    /// cross `/`.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Globs on udev properties (requires udevd).
    #[serde(default)]
    pub udev: BTreeMap<String, String>,
    /// Globs on the backing file of loop devices (loop-backed test and lab
    /// setups); needs `loop` in `types`.
    #[serde(default)]
    pub backing_files: Vec<String>,
    /// Device kinds accepted; `disk` only by default.
    #[serde(default = "default_types")]
    pub types: Vec<DeviceKind>,
    #[serde(default, deserialize_with = "quantity_or_null")]
    pub min_size: Option<Quantity>,
    #[serde(default, deserialize_with = "quantity_or_null")]
    pub max_size: Option<Quantity>,
    #[serde(default)]
    pub rotational: Option<bool>,
    /// Accept removable devices (refused by default).
    #[serde(default)]
    pub removable: bool,
}

impl Selector {
    /// True when no field names a disk (types, sizes and rotational only
    /// narrow a selection, they never make one).
    pub fn names_nothing(&self) -> bool {
        self.paths.is_empty() && self.udev.is_empty() && self.backing_files.is_empty()
    }
}

impl Default for Selector {
    fn default() -> Self {
        Selector {
            paths: Vec::new(),
            udev: BTreeMap::new(),
            backing_files: Vec::new(),
            types: default_types(),
            min_size: None,
            max_size: None,
            rotational: None,
            removable: false,
        }
    }
}

fn default_types() -> Vec<DeviceKind> {
    vec![DeviceKind::Disk]
}

/// A size: a whole number of bytes or a quantity string (`500Gi`); `null`
/// means unset. Anything else (a negative or fractional number, a list) gets
/// one message that says what to write, not serde's "no variant matched".
fn quantity_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Quantity>, D::Error> {
    use serde::de::Error;
    const HINT: &str =
        "write a whole number of bytes, or one with a suffix: Ki Mi Gi Ti Pi Ei or k M G T P E, e.g. 500Gi";
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::Null => Ok(None),
        serde_yaml::Value::Number(n) => match n.as_u64() {
            Some(b) => Ok(Some(Quantity(b))),
            None => Err(D::Error::custom(format!(
                "invalid size {n}: not a whole number of bytes ({HINT})"
            ))),
        },
        serde_yaml::Value::String(s) => s.parse().map(Some).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "invalid size: {} ({HINT})",
            yaml_kind(&other)
        ))),
    }
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "no value",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}
