//! The agent's configuration file: strict YAML, every problem reported with the
//! key's path and a hint, all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
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
    #[serde(default)]
    pub min_size: Option<Quantity>,
    #[serde(default)]
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
                let key = match e.path().to_string() {
                    p if p == "." || p.is_empty() => "(top level)".to_string(),
                    p => p,
                };
                let inner = e.into_inner();
                let mut message = inner.to_string();
                let mut key = key;
                if let Some(at) = message.find("unknown field `") {
                    // serde_yaml repeats its own path before the message.
                    message.replace_range(..at, "");
                }
                if let Some((field, hint)) = unknown_field_hint(&message) {
                    if key == "(top level)" {
                        key = field;
                    } else if key != field && !key.ends_with(&format!(".{field}")) {
                        key = format!("{key}.{field}");
                    }
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
                    format!("{} is not an absolute path", p.display()),
                );
            }
        }
        if self.resync_seconds == 0 || self.resync_seconds > 86400 {
            bad(
                "resyncSeconds".into(),
                format!("{} is out of range; use 1..86400", self.resync_seconds),
            );
        }
        for (i, k) in self.topology_keys.iter().enumerate() {
            if k.is_empty() || k.contains(char::is_whitespace) {
                bad(
                    format!("topologyKeys[{i}]"),
                    format!("{k:?} is not a label key"),
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
                if !g.starts_with('/') {
                    bad(
                        k(&format!("selector.backingFiles[{j}]")),
                        format!("{g:?} must be an absolute path glob"),
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
                if o == "nouuid" || o == "ro" {
                    bad(k(&format!("mountOptions[{j}]")), format!("{o:?} is not allowed (nouuid disables xfs's duplicate-UUID guard; ro volumes cannot be used)"));
                }
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
                } else if let Err(e) = globset::Glob::new(g) {
                    bad(
                        k(&format!("selector.paths[{j}]")),
                        format!("bad glob {g:?}: {e}"),
                    );
                }
            }
            for (key, g) in &s.udev {
                if key.is_empty() {
                    bad(k("selector.udev"), "empty property name".into());
                }
                if let Err(e) = globset::Glob::new(g) {
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
                if !d.is_absolute() {
                    bad(
                        k(&format!("discoveryDirs[{j}]")),
                        format!("{} is not an absolute path", d.display()),
                    );
                } else if d.starts_with(&self.host_dir) || self.host_dir.starts_with(d) {
                    bad(
                        k(&format!("discoveryDirs[{j}]")),
                        format!(
                            "{} overlaps hostDir {}: a volume would be published twice",
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
