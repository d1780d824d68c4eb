//! The configuration's types and their defaults: what the file may say.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::Unexpected;
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
    #[serde(default = "default_resync", deserialize_with = "whole_number")]
    pub resync_seconds: u64,
    /// Every device's contents read again at least this often, even when
    /// nothing about it changed (`host::probecache`).
    #[serde(default = "default_reprobe", deserialize_with = "whole_number")]
    pub reprobe_seconds: u64,
    /// At most this many disks formatted at once (each under every
    /// interlock of a single format).
    #[serde(
        default = "default_format_concurrency",
        deserialize_with = "whole_number"
    )]
    pub format_concurrency: u64,
    #[serde(default)]
    pub classes: Vec<Class>,
}

fn default_resync() -> u64 {
    60
}

fn default_reprobe() -> u64 {
    600
}

fn default_format_concurrency() -> u64 {
    8
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
            reprobe_seconds: default_reprobe(),
            format_concurrency: default_format_concurrency(),
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

/// What a class makes of its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClassKind {
    /// Each disk (or discovery-dir entry) one Local PV, published by the
    /// agent.
    #[default]
    Static,
    /// The disks are formatted (XFS, reflink on) and mounted like a static
    /// class's, under the same safety rules, but never published: the CSI
    /// driver (`disklet csi`) carves volumes of the requested size out of
    /// them.
    Pool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Class {
    pub name: String,
    #[serde(default)]
    pub kind: ClassKind,
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
    #[serde(default = "default_settle", deserialize_with = "whole_number")]
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

    pub fn is_pool(&self) -> bool {
        self.kind == ClassKind::Pool
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
    /// Globs on udev properties (requires udevd). A property given no value
    /// (`{DISKLET_CLASS: }`) holds the empty glob, which validation refuses.
    #[serde(default, deserialize_with = "globs_or_null")]
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

/// A count of seconds: a plain whole number. A quoted `"60"`, a fraction or
/// a negative number is refused in serde's words (`invalid type: string "60",
/// expected a whole number`), whatever the decoder would coerce.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    const TOO_BIG: Unexpected<'static> = Unexpected::Other("a number over 18446744073709551615");
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::invalid_type(Unexpected::Signed(n), &self))
        }
        fn visit_u128<E: serde::de::Error>(self, n: u128) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::invalid_value(TOO_BIG, &self))
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<u64, E> {
            if n.fract() == 0.0 && n >= u64::MAX as f64 {
                Err(E::invalid_value(TOO_BIG, &self))
            } else {
                Err(E::invalid_type(Unexpected::Float(n), &self))
            }
        }
    }
    d.deserialize_any(Whole)
}

/// udev property globs, where a property given no value holds `""`.
fn globs_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let m = BTreeMap::<String, Option<String>>::deserialize(d)?;
    Ok(m.into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

/// A size: a whole number of bytes or a quantity string (`500Gi`); `null`
/// means unset. Anything else (a negative or fractional number, a list) gets
/// one message that says what to write, not serde's "no variant matched".
fn quantity_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Quantity>, D::Error> {
    d.deserialize_any(SizeVisitor)
}

const SIZE_HINT: &str =
    "write a whole number of bytes, or one with a suffix: Ki Mi Gi Ti Pi Ei or k M G T P E, e.g. 500Gi";

struct SizeVisitor;

impl SizeVisitor {
    fn not_whole<E: serde::de::Error>(n: impl std::fmt::Display) -> E {
        E::custom(format!(
            "invalid size {n}: not a whole number of bytes ({SIZE_HINT})"
        ))
    }

    /// An integer of any width: a size when it fits in bytes.
    fn bytes<E, N>(n: N) -> Result<Option<Quantity>, E>
    where
        E: serde::de::Error,
        N: TryInto<u64> + Copy + std::fmt::Display,
    {
        n.try_into()
            .map(|b| Some(Quantity(b)))
            .map_err(|_| Self::not_whole(n))
    }

    fn not_a_size<E: serde::de::Error>(kind: &str) -> E {
        E::custom(format!("invalid size: {kind} ({SIZE_HINT})"))
    }
}

impl<'de> serde::de::Visitor<'de> for SizeVisitor {
    type Value = Option<Quantity>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a size ({SIZE_HINT})")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
    fn visit_u64<E: serde::de::Error>(self, b: u64) -> Result<Self::Value, E> {
        Ok(Some(Quantity(b)))
    }
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Self::bytes(n)
    }
    fn visit_u128<E: serde::de::Error>(self, n: u128) -> Result<Self::Value, E> {
        Self::bytes(n)
    }
    fn visit_i128<E: serde::de::Error>(self, n: i128) -> Result<Self::Value, E> {
        Self::bytes(n)
    }
    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
        Err(Self::not_whole(n))
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        s.parse().map(Some).map_err(E::custom)
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(Self::not_a_size("a boolean"))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(Self::not_a_size("a list"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(Self::not_a_size("a mapping"))
    }
}
