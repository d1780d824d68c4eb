//! The agent's configuration file: strict YAML, every problem reported with the
//! key's path and a hint, all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::model::{AccessMode, VolumeMode};
use crate::model::{DeviceKind, Quantity};

/// Exit code for any configuration problem.
pub const EXIT_CONFIG: i32 = 2;

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

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `classes[0].selector.minSize`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass an existing file with --config)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid:\n{}", list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates; returns every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: Config = match serde_path_to_error::deserialize(de) {
            Ok(c) => c,
            Err(e) => {
                let mut key = match e.path().to_string() {
                    p if p == "." || p.is_empty() => "(top level)".to_string(),
                    // Not even a YAML document: the line and column say where.
                    p if p == "?" => "(yaml syntax)".to_string(),
                    p => p,
                };
                let mut message = plain_message(&e.into_inner().to_string());
                // A list or mapping where a plain word is expected: serde_yaml
                // asks for a YAML tag; name the words instead.
                if let Some(words) = message
                    .contains("expected a YAML tag")
                    .then(|| enum_words(&key))
                    .flatten()
                {
                    message = message.replace(
                        "expected a YAML tag starting with '!'",
                        &format!("expected {words}"),
                    );
                }
                let mut field_key = |field: &str| {
                    if key == "(top level)" {
                        key = field.to_string();
                    } else if key != field && !key.ends_with(&format!(".{field}")) {
                        key = format!("{key}.{field}");
                    }
                };
                let named = |prefix: &str| {
                    message
                        .strip_prefix(prefix)
                        .and_then(|r| r.split_once('`'))
                        .map(|(f, _)| f.to_string())
                };
                if let Some(field) = named("duplicate field `") {
                    field_key(&field);
                    message.push_str("; give each key once");
                } else if let Some(field) = named("missing field `") {
                    field_key(&field);
                    message.push_str("; it is required");
                } else if let Some((field, hint)) = unknown_field_hint(&message) {
                    field_key(&field);
                    if let Some(hint) = hint {
                        message.push_str(&format!("; did you mean `{hint}`?"));
                    }
                }
                return Err(vec![Problem { key, message }]);
            }
        };
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: String, message: String| out.push(Problem { key, message });
        for (key, p) in [
            ("hostDir", &self.host_dir),
            ("kubeletDir", &self.kubelet_dir),
            ("mountInfo", &self.mount_info),
        ] {
            if !p.is_absolute() {
                bad(
                    key.into(),
                    format!("{} is not an absolute path; write it from /", p.display()),
                );
            } else if has_dotdot(p) {
                bad(key.into(), format!("{} contains `..`; write the path without it (disklet compares paths as written)", p.display()));
            }
        }
        if self.resync_seconds == 0 || self.resync_seconds > 86400 {
            bad(
                "resyncSeconds".into(),
                format!("{} is out of range; use 1..86400", self.resync_seconds),
            );
        }
        for (i, k) in self.topology_keys.iter().enumerate() {
            if let Err(why) = label_key(k) {
                bad(
                    format!("topologyKeys[{i}]"),
                    format!("{k:?} is not a label key: {why} (e.g. topology.kubernetes.io/zone)"),
                );
            } else if self.topology_keys[..i].contains(k) {
                bad(
                    format!("topologyKeys[{i}]"),
                    format!("{k:?} is listed twice; give each key once"),
                );
            }
        }
        if self.host_dir == Path::new("/")
            || self.host_dir.starts_with(&self.kubelet_dir)
            || self.kubelet_dir.starts_with(&self.host_dir)
        {
            bad(
                "hostDir".into(),
                format!("{} must be a directory of its own, neither / nor inside or around kubeletDir {}", self.host_dir.display(), self.kubelet_dir.display()),
            );
        }
        let mut names = BTreeSet::new();
        let mut dirs_seen: Vec<(String, PathBuf, VolumeMode)> = Vec::new();
        for (i, c) in self.classes.iter().enumerate() {
            let k = |field: &str| format!("classes[{i}].{field}");
            if let Err(why) = dns1123_label(&c.name) {
                bad(
                    k("name"),
                    format!(
                        "{:?} {why}; class names are used in paths and labels",
                        c.name
                    ),
                );
            }
            if !names.insert(c.name.as_str()) {
                bad(
                    k("name"),
                    format!("class {:?} is defined twice; names must be unique", c.name),
                );
            }
            if let Some(sc) = &c.storage_class_name {
                if let Err(why) = dns1123_subdomain(sc) {
                    bad(k("storageClassName"), format!("{sc:?} {why}"));
                }
            }
            if c.publish_fs_type && c.volume_mode == VolumeMode::Block {
                bad(
                    k("publishFsType"),
                    "only applies to volumeMode: Filesystem".into(),
                );
            }
            if c.settle_seconds > 3600 {
                bad(
                    k("settleSeconds"),
                    format!("{} is more than an hour; use 0..3600", c.settle_seconds),
                );
            }
            let s = &c.selector;
            if s.names_nothing() && c.discovery_dirs.is_empty() {
                bad(
                    k("selector"),
                    "names no disks: give `paths`, `udev` or `backingFiles` so that only disks you dedicated to disklet can match (disklet formats what matches), or `discoveryDirs`".into(),
                );
            }
            for (j, g) in s.backing_files.iter().enumerate() {
                let first = g.trim_start_matches('/').split('/').next().unwrap_or("");
                if !g.starts_with('/') {
                    bad(
                        k(&format!("selector.backingFiles[{j}]")),
                        format!("{g:?} must be an absolute path glob, e.g. /var/lib/disklet-images/*.img"),
                    );
                } else if first.is_empty() || first.contains(GLOB_CHARS) {
                    bad(
                        k(&format!("selector.backingFiles[{j}]")),
                        format!("{g:?} lets any loop device on the host match; start it with the directory that holds your images, e.g. /var/lib/disklet-images/*.img"),
                    );
                } else if dot_component(g) {
                    bad(
                        k(&format!("selector.backingFiles[{j}]")),
                        format!("{g:?} contains a `.` or `..` component and never matches (the kernel reports canonical paths); write the path without it"),
                    );
                } else if let Err(e) = globset::Glob::new(g) {
                    bad(
                        k(&format!("selector.backingFiles[{j}]")),
                        format!("bad glob {g:?}: {e}"),
                    );
                }
            }
            if !s.backing_files.is_empty() && !s.types.contains(&DeviceKind::Loop) {
                bad(
                    k("selector.backingFiles"),
                    "selects loop devices: add `loop` to types".into(),
                );
            }
            for (j, o) in c.mount_options.iter().enumerate() {
                // mount(2) takes one comma-separated string: every part counts.
                let parts: Vec<&str> = o.split(',').collect();
                if parts.iter().any(|p| p.is_empty()) {
                    bad(k(&format!("mountOptions[{j}]")), format!("{o:?} holds an empty option; write one option per entry, e.g. [noatime, nodiscard]"));
                } else if o.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    bad(k(&format!("mountOptions[{j}]")), format!("{o:?} contains whitespace or a control character; write one option per entry, e.g. [noatime, nodiscard]"));
                } else if let Some(p) = parts.iter().find(|p| **p == "nouuid" || **p == "ro") {
                    bad(k(&format!("mountOptions[{j}]")), format!("{p:?} is not allowed (nouuid disables xfs's duplicate-UUID guard; ro volumes cannot be used); remove it"));
                }
            }
            if !c.mount_options.is_empty()
                && (c.volume_mode == VolumeMode::Block || c.publish_fs_type)
            {
                bad(
                    k("mountOptions"),
                    "only applies when disklet mounts the disks (volumeMode: Filesystem without publishFsType); kubelet's own mount takes the StorageClass's mountOptions: remove it here".into(),
                );
            }
            for (j, g) in s.paths.iter().enumerate() {
                let last = g.rsplit('/').next().unwrap_or("");
                if !last.is_empty() && last.chars().all(|c| "*?[]!{},".contains(c)) {
                    bad(
                        k(&format!("selector.paths[{j}]")),
                        format!("{g:?} matches every device there; name the disks, e.g. /dev/disk/by-id/nvme-Samsung_SSD_980*"),
                    );
                }
                if !g.starts_with("/dev/") {
                    bad(k(&format!("selector.paths[{j}]")), format!("{g:?} must start with /dev/ (globs match device nodes and their /dev/disk/by-* links)"));
                } else if dot_component(g) {
                    bad(k(&format!("selector.paths[{j}]")), format!("{g:?} contains a `.` or `..` component and never matches; write the path without it"));
                } else if let Err(e) = globset::Glob::new(g) {
                    bad(
                        k(&format!("selector.paths[{j}]")),
                        format!("bad glob {g:?}: {e}"),
                    );
                }
            }
            for (key, g) in &s.udev {
                if key.is_empty() {
                    bad(
                        k("selector.udev"),
                        "empty property name; write the udev property, e.g. DISKLET_CLASS".into(),
                    );
                } else if key.contains(|c: char| c == '=' || c.is_whitespace() || c.is_control()) {
                    bad(k(&format!("selector.udev.{key}")), format!("{key:?} is not a udev property name (no '=', whitespace or control characters); e.g. DISKLET_CLASS"));
                }
                if g.is_empty() {
                    bad(k(&format!("selector.udev.{key}")), "an empty glob matches only a property set to nothing; write the value to match, or \"*\" for any".into());
                } else if let Err(e) = globset::Glob::new(g) {
                    bad(
                        k(&format!("selector.udev.{key}")),
                        format!("bad glob {g:?}: {e}"),
                    );
                }
            }
            if s.types.is_empty() {
                bad(
                    k("selector.types"),
                    "is empty; omit it for [disk] or list the kinds to accept".into(),
                );
            }
            if let (Some(min), Some(max)) = (s.min_size, s.max_size) {
                if min > max {
                    bad(
                        k("selector.minSize"),
                        format!("{min} is larger than maxSize {max}"),
                    );
                }
            }
            for (j, d) in c.discovery_dirs.iter().enumerate() {
                let here = k(&format!("discoveryDirs[{j}]"));
                if !d.is_absolute() {
                    bad(
                        here,
                        format!("{} is not an absolute path; write it from /", d.display()),
                    );
                    continue;
                }
                if has_dotdot(d) {
                    bad(
                        here.clone(),
                        format!("{} contains `..`; write the path without it", d.display()),
                    );
                } else if let Some(other) = dirs_seen.iter().find(|(_, o, mode)| {
                    // A Filesystem class publishes the mount points of a
                    // dir, a Block class its device links: one dir may
                    // serve one of each.
                    *mode == c.volume_mode && (d.starts_with(o) || o.starts_with(d))
                }) {
                    bad(
                        here.clone(),
                        format!("{} overlaps {} {}: one volume would be published twice; list each directory once, in one class", d.display(), other.0, other.1.display()),
                    );
                }
                dirs_seen.push((here.clone(), d.clone(), c.volume_mode));
                if d.starts_with(&self.kubelet_dir) || self.kubelet_dir.starts_with(d) {
                    bad(
                        here,
                        format!("{} overlaps kubeletDir {}: kubelet's own mounts would be published; use a directory of its own, e.g. /mnt/disks", d.display(), self.kubelet_dir.display()),
                    );
                } else if d.starts_with(&self.host_dir) || self.host_dir.starts_with(d) {
                    bad(
                        k(&format!("discoveryDirs[{j}]")),
                        format!(
                            "{} overlaps hostDir {}: a volume would be published twice; use a directory of its own, e.g. /mnt/disks",
                            d.display(),
                            self.host_dir.display()
                        ),
                    );
                }
            }
        }
        out
    }
}

/// The words an enum key accepts, as serde lists them (`` `xfs` or `ext4` ``).
fn enum_words(key: &str) -> Option<String> {
    fn words<T: serde::de::DeserializeOwned>() -> Option<String> {
        let e = serde_yaml::from_str::<T>("\"\"").err()?.to_string();
        let at = e.find("expected ")? + "expected ".len();
        let end = e
            .rfind(" at line")
            .filter(|end| *end > at)
            .unwrap_or(e.len());
        Some(e[at..end].to_string())
    }
    let last = key.rsplit('.').next()?;
    let last = last.split('[').next()?;
    match last {
        "volumeMode" => words::<VolumeMode>(),
        "accessMode" => words::<AccessMode>(),
        "fsType" => words::<FsType>(),
        "blankCheck" => words::<BlankCheck>(),
        "cleanup" => words::<CleanupMethod>(),
        "types" => words::<DeviceKind>(),
        _ => None,
    }
}

/// Characters that make a glob component match more than one name.
const GLOB_CHARS: &[char] = &['*', '?', '[', ']', '{', '}', '!'];

fn has_dotdot(p: &Path) -> bool {
    p.components().any(|c| c == std::path::Component::ParentDir)
}

/// A glob with a `.` or `..` component: never matches a canonical path.
fn dot_component(g: &str) -> bool {
    g.split('/').any(|c| c == "." || c == "..")
}

/// A Kubernetes label key: `[prefix/]name`, prefix a DNS subdomain, name at
/// most 63 characters of alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn label_key(k: &str) -> Result<(), &'static str> {
    let parts: Vec<&str> = k.split('/').collect();
    let name = match parts.as_slice() {
        [name] => name,
        [prefix, name] => {
            dns1123_subdomain(prefix)
                .map_err(|_| "the prefix before '/' must be a lowercase DNS subdomain")?;
            name
        }
        _ => return Err("at most one '/'"),
    };
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err("the name must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    }
}

/// serde_yaml's message without the path it repeats in front (which, for a
/// value refused by a custom deserializer, names the enclosing mapping rather
/// than the key: the key comes from `serde_path_to_error` instead), and with
/// Rust type names replaced by what to write.
fn plain_message(raw: &str) -> String {
    let mut m = raw;
    if let Some((head, rest)) = raw.split_once(": ") {
        let pathlike = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c));
        if pathlike {
            m = rest;
        }
    }
    if let Some(at) = m.find("unknown field `") {
        m = &m[at..];
    }
    m.replace("unit value", "no value")
        .replace("expected u64", "expected a whole number")
        .replace("expected a sequence", "expected a list, e.g. [a, b]")
        .replace("expected a map", "expected a mapping of key: value")
        .replace("expected a boolean", "expected true or false")
}

/// For an "unknown field `x`, expected one of `a`, `b`" message: the unknown
/// field, and the closest known one if it is close enough to be a typo.
fn unknown_field_hint(message: &str) -> Option<(String, Option<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let hint = expected
        .into_iter()
        .map(|cand| {
            (
                edit_distance(&field.to_lowercase(), &cand.to_lowercase()),
                cand,
            )
        })
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c.to_string());
    Some((field.to_string(), hint))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for part in s.split('.') {
        dns1123_label(part).map_err(|_| "must be lowercase DNS labels joined by '.'")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
hostDir: /var/lib/disklet
classes:
  - name: fast
    storageClassName: local-fast
    volumeMode: Filesystem
    fsType: xfs
    settleSeconds: 5
    selector:
      paths: ["/dev/disk/by-id/nvme-*"]
      udev: {DISKLET_CLASS: "fast"}
      types: [disk]
      minSize: 1Gi
      maxSize: 8Ti
      rotational: false
    discoveryDirs: []
"#;

    fn problems(text: &str) -> Vec<Problem> {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn the_readme_example_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.classes[0].storage_class(), "local-fast");
        assert_eq!(c.classes[0].selector.min_size, Some(Quantity(1 << 30)));
        assert_eq!(c.classes[0].selector.types, vec![DeviceKind::Disk]);
        assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        assert_eq!(c.classes[0].blank_check, BlankCheck::Zeroed);
    }

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse("classes: [{name: a, selector: {paths: [/dev/sdz]}}]").unwrap();
        let a = &c.classes[0];
        assert_eq!(a.storage_class(), "a");
        assert_eq!(a.volume_mode, VolumeMode::Filesystem);
        assert_eq!(a.fs_type, FsType::Xfs);
        assert_eq!(a.settle_seconds, 5);
        assert_eq!(c.host_dir, PathBuf::from("/var/lib/disklet"));
    }

    #[test]
    fn unknown_key_names_the_path_and_suggests() {
        let p = problems(&GOOD.replace("minSize", "minsize"));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "classes[0].selector.minsize");
        assert!(
            p[0].message.contains("did you mean `minSize`?"),
            "{}",
            p[0].message
        );
        assert!(
            p[0].message.contains("line"),
            "location given: {}",
            p[0].message
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let p = problems(&GOOD.replace("fsType: xfs", "fsType: zfs"));
        assert_eq!(p[0].key, "classes[0].fsType");
        assert!(
            p[0].message.contains("xfs") && p[0].message.contains("ext4"),
            "{}",
            p[0].message
        );

        let p = problems(&GOOD.replace("minSize: 1Gi", "minSize: 1GB"));
        assert_eq!(p[0].key, "classes[0].selector.minSize");
        assert!(p[0].message.contains("500Gi"), "{}", p[0].message);

        let p = problems(&GOOD.replace("types: [disk]", "types: [floppy]"));
        assert_eq!(p[0].key, "classes[0].selector.types[0]");

        let p = problems(&GOOD.replace("volumeMode: Filesystem", "volumeMode: filesystem"));
        assert_eq!(p[0].key, "classes[0].volumeMode");
    }

    #[test]
    fn semantic_problems_are_all_reported_together() {
        let text = r#"
hostDir: relative/dir
classes:
  - name: Fast_Class
    storageClassName: "Local Fast"
    settleSeconds: 99999
    selector: {types: [], minSize: 2Gi, maxSize: 1Gi}
  - name: ok
    selector: {paths: ["sda", "/dev/[sd"], udev: {ID_MODEL: "[x"}}
  - name: ok
    selector: {paths: [/dev/sdb]}
    discoveryDirs: [mnt/disks]
"#;
        let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
        for want in [
            "hostDir",
            "classes[0].name",
            "classes[0].storageClassName",
            "classes[0].settleSeconds",
            "classes[0].selector",
            "classes[0].selector.types",
            "classes[0].selector.minSize",
            "classes[2].discoveryDirs[0]",
            "classes[1].selector.paths[0]",
            "classes[1].selector.paths[1]",
            "classes[1].selector.udev.ID_MODEL",
            "classes[2].name",
        ] {
            assert!(keys.iter().any(|k| k == want), "missing {want} in {keys:?}");
        }
    }

    #[test]
    fn dangerous_shapes_are_refused() {
        let keys = |t: &str| problems(t).into_iter().map(|p| p.key).collect::<Vec<_>>();
        assert_eq!(keys("hostDir: /\nclasses: []"), ["hostDir"]);
        assert_eq!(
            keys("hostDir: /var/lib/kubelet/disklet\nclasses: []"),
            ["hostDir"]
        );
        assert_eq!(
            keys("classes: [{name: a, selector: {paths: ['/dev/*']}}]"),
            ["classes[0].selector.paths[0]"]
        );
        assert_eq!(
            keys("classes: [{name: a, selector: {paths: ['/dev/disk/by-id/*']}}]"),
            ["classes[0].selector.paths[0]"]
        );
        assert!(Config::parse(
            "classes: [{name: a, selector: {paths: ['/dev/disk/by-id/nvme-*']}}]"
        )
        .is_ok());
        assert_eq!(
            keys("classes: [{name: a, selector: {backingFiles: ['/x/*.img']}}]"),
            ["classes[0].selector.backingFiles"]
        );
        assert_eq!(
            keys("classes: [{name: a, mountOptions: [nouuid], selector: {paths: [/dev/sdb]}}]"),
            ["classes[0].mountOptions[0]"]
        );
        assert_eq!(
            keys("classes: [{name: a, discoveryDirs: [/var/lib/disklet/x]}]"),
            ["classes[0].discoveryDirs[0]"]
        );
    }

    /// Catches: the guards being bypassed by a second spelling (an option
    /// inside a comma list, one directory in two classes, a glob from `/`).
    #[test]
    fn guards_hold_against_other_spellings() {
        let keys = |t: &str| problems(t).into_iter().map(|p| p.key).collect::<Vec<_>>();
        assert_eq!(
            keys("classes: [{name: a, mountOptions: ['noatime,nouuid'], selector: {paths: [/dev/sdb]}}]"),
            ["classes[0].mountOptions[0]"]
        );
        assert_eq!(
            keys("classes: [{name: a, discoveryDirs: [/mnt/d]}, {name: b, discoveryDirs: [/mnt/d/x]}]"),
            ["classes[1].discoveryDirs[0]"]
        );
        assert!(
            Config::parse("classes: [{name: a, discoveryDirs: [/mnt/d]}, {name: b, volumeMode: Block, discoveryDirs: [/mnt/d]}]").is_ok(),
            "mount points for one, device links for the other"
        );
        assert_eq!(
            keys("classes: [{name: a, selector: {backingFiles: ['/*'], types: [loop]}}]"),
            ["classes[0].selector.backingFiles[0]"]
        );
        assert_eq!(
            keys("hostDir: /var/lib/disklet/../kubelet/x\nclasses: []"),
            ["hostDir"]
        );
        assert_eq!(
            keys("classes: [{name: a, discoveryDirs: [/var/lib/kubelet/pods]}]"),
            ["classes[0].discoveryDirs[0]"]
        );
        let p = problems("classes: [{name: a, selector: {paths: [/dev/sdb], minSize: -1}}]");
        assert_eq!(p[0].key, "classes[0].selector.minSize");
        assert!(p[0].message.contains("500Gi"), "{}", p[0].message);
        assert!(!p[0].message.starts_with("classes"), "{}", p[0].message);
    }

    #[test]
    fn a_selector_that_names_no_disk_is_refused() {
        let p = problems("classes: [{name: all, selector: {types: [disk]}}]");
        assert_eq!(p[0].key, "classes[0].selector");
        assert!(p[0].message.contains("paths"));
    }

    #[test]
    fn wrong_shapes_are_reported() {
        assert_eq!(problems("classes: {name: a}")[0].key, "classes");
        assert_eq!(problems("- a\n- b")[0].key, "(top level)");
        let p = problems("hostdir: /x");
        assert_eq!(p[0].key, "hostdir");
        assert!(
            p[0].message.contains("did you mean `hostDir`?"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
