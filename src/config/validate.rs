//! The checks a well-formed file must still pass before anything is touched.
//! Every problem is collected, in the order of the file, so one run names
//! them all.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::schema::{Class, Config, FsType, Selector};
use super::{Problem, VolumeMode};
use crate::model::DeviceKind;

/// Every problem of `cfg`, in the order of the file; empty when it is valid.
pub(super) fn validate(cfg: &Config) -> Vec<Problem> {
    let mut out = Problems::default();
    host_paths(cfg, &mut out);
    if cfg.resync_seconds == 0 || cfg.resync_seconds > 86400 {
        out.bad(
            "resyncSeconds".into(),
            format!("{} is out of range; use 1..86400", cfg.resync_seconds),
        );
    }
    if cfg.reprobe_seconds == 0 || cfg.reprobe_seconds > 86400 {
        out.bad(
            "reprobeSeconds".into(),
            format!("{} is out of range; use 1..86400", cfg.reprobe_seconds),
        );
    }
    if cfg.format_concurrency == 0 || cfg.format_concurrency > 64 {
        out.bad(
            "formatConcurrency".into(),
            format!("{} is out of range; use 1..64", cfg.format_concurrency),
        );
    }
    topology_keys(&cfg.topology_keys, &mut out);
    if cfg.host_dir == Path::new("/")
        || cfg.host_dir.starts_with(&cfg.kubelet_dir)
        || cfg.kubelet_dir.starts_with(&cfg.host_dir)
    {
        out.bad(
            "hostDir".into(),
            format!(
                "{} must be a directory of its own, neither / nor inside or around kubeletDir {}",
                cfg.host_dir.display(),
                cfg.kubelet_dir.display()
            ),
        );
    }
    let mut names = BTreeSet::new();
    let mut dirs_seen = Vec::new();
    for (i, c) in cfg.classes.iter().enumerate() {
        let at = At(i);
        class_fields(at, c, &mut names, &mut out);
        selector_names(at, c, &mut out);
        mount_options(at, c, &mut out);
        selector_globs(at, &c.selector, &mut out);
        selector_narrowing(at, &c.selector, &mut out);
        discovery_dirs(cfg, at, c, &mut dirs_seen, &mut out);
        pool_fields(at, c, &mut out);
    }
    out.0
}

/// A pool class formats its disks XFS for reflink snapshots and publishes
/// nothing itself: the fields that shape a static PV do not apply.
fn pool_fields(at: At, c: &Class, out: &mut Problems) {
    if !c.is_pool() {
        return;
    }
    let why = "does not apply to kind: pool (the CSI driver's StorageClass and claims decide it per volume); remove it";
    if c.fs_type != FsType::Xfs {
        out.bad(at.k("fsType"), "a pool is XFS (its snapshots and clones are reflink copies); remove fsType or set xfs. A volume's own filesystem is the StorageClass's csi.storage.k8s.io/fstype".into());
    }
    if c.volume_mode != VolumeMode::Filesystem {
        out.bad(at.k("volumeMode"), why.into());
    }
    if c.publish_fs_type {
        out.bad(at.k("publishFsType"), why.into());
    }
    if !c.discovery_dirs.is_empty() {
        out.bad(at.k("discoveryDirs"), "a pool takes whole disks it formats itself, not discovery dirs; list the dirs in a static class".into());
    }
    if c.cleanup.is_some() {
        out.bad(at.k("cleanup"), "does not apply to kind: pool: a deleted volume's space is always punched out of the pool before it is reused; remove it".into());
    }
}

/// The problems found so far.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn bad(&mut self, key: String, message: String) {
        self.0.push(Problem { key, message });
    }
}

/// The index of a class, which names its keys: `classes[0].fsType`.
#[derive(Clone, Copy)]
struct At(usize);

impl At {
    fn k(self, field: &str) -> String {
        format!("classes[{}].{field}", self.0)
    }
}

/// A discovery dir already checked: its key, path and the class's mode.
type SeenDir = (String, PathBuf, VolumeMode);

fn host_paths(cfg: &Config, out: &mut Problems) {
    for (key, p) in [
        ("hostDir", &cfg.host_dir),
        ("kubeletDir", &cfg.kubelet_dir),
        ("mountInfo", &cfg.mount_info),
    ] {
        if !p.is_absolute() {
            out.bad(
                key.into(),
                format!("{} is not an absolute path; write it from /", p.display()),
            );
        } else if has_dotdot(p) {
            out.bad(key.into(), format!("{} contains `..`; write the path without it (disklet compares paths as written)", p.display()));
        }
    }
}

fn topology_keys(keys: &[String], out: &mut Problems) {
    for (i, k) in keys.iter().enumerate() {
        if let Err(why) = label_key(k) {
            out.bad(
                format!("topologyKeys[{i}]"),
                format!("{k:?} is not a label key: {why} (e.g. topology.kubernetes.io/zone)"),
            );
        } else if keys[..i].contains(k) {
            out.bad(
                format!("topologyKeys[{i}]"),
                format!("{k:?} is listed twice; give each key once"),
            );
        }
    }
}

/// The class's own fields: name, storage class, mode and timing.
fn class_fields<'a>(at: At, c: &'a Class, names: &mut BTreeSet<&'a str>, out: &mut Problems) {
    if let Err(why) = dns1123_label(&c.name) {
        out.bad(
            at.k("name"),
            format!(
                "{:?} {why}; class names are used in paths and labels",
                c.name
            ),
        );
    }
    if !names.insert(c.name.as_str()) {
        out.bad(
            at.k("name"),
            format!("class {:?} is defined twice; names must be unique", c.name),
        );
    }
    if let Some(sc) = &c.storage_class_name {
        if let Err(why) = dns1123_subdomain(sc) {
            out.bad(at.k("storageClassName"), format!("{sc:?} {why}"));
        }
    }
    if c.publish_fs_type && c.volume_mode == VolumeMode::Block {
        out.bad(
            at.k("publishFsType"),
            "only applies to volumeMode: Filesystem".into(),
        );
    }
    if c.settle_seconds > 3600 {
        out.bad(
            at.k("settleSeconds"),
            format!("{} is more than an hour; use 0..3600", c.settle_seconds),
        );
    }
}

/// The selector must name the disks dedicated to disklet, and a backing-file
/// glob must not let any loop device on the host match.
fn selector_names(at: At, c: &Class, out: &mut Problems) {
    let s = &c.selector;
    if s.names_nothing() && c.discovery_dirs.is_empty() {
        out.bad(
            at.k("selector"),
            "names no disks: give `paths`, `udev` or `backingFiles` so that only disks you dedicated to disklet can match (disklet formats what matches), or `discoveryDirs`".into(),
        );
    }
    for (j, g) in s.backing_files.iter().enumerate() {
        let key = at.k(&format!("selector.backingFiles[{j}]"));
        let first = g.trim_start_matches('/').split('/').next().unwrap_or("");
        if !g.starts_with('/') {
            out.bad(
                key,
                format!("{g:?} must be an absolute path glob, e.g. /var/lib/disklet-images/*.img"),
            );
        } else if first.is_empty() || first.contains(GLOB_CHARS) {
            out.bad(
                key,
                format!("{g:?} lets any loop device on the host match; start it with the directory that holds your images, e.g. /var/lib/disklet-images/*.img"),
            );
        } else if dot_component(g) {
            out.bad(
                key,
                format!("{g:?} contains a `.` or `..` component and never matches (the kernel reports canonical paths); write the path without it"),
            );
        } else if let Err(e) = globset::Glob::new(g) {
            out.bad(key, format!("bad glob {g:?}: {e}"));
        }
    }
    if !s.backing_files.is_empty() && !s.types.contains(&DeviceKind::Loop) {
        out.bad(
            at.k("selector.backingFiles"),
            "selects loop devices: add `loop` to types".into(),
        );
    }
}

fn mount_options(at: At, c: &Class, out: &mut Problems) {
    for (j, o) in c.mount_options.iter().enumerate() {
        let key = at.k(&format!("mountOptions[{j}]"));
        // mount(2) takes one comma-separated string: every part counts.
        let parts: Vec<&str> = o.split(',').collect();
        if parts.iter().any(|p| p.is_empty()) {
            out.bad(key, format!("{o:?} holds an empty option; write one option per entry, e.g. [noatime, nodiscard]"));
        } else if o.chars().any(|c| c.is_whitespace() || c.is_control()) {
            out.bad(key, format!("{o:?} contains whitespace or a control character; write one option per entry, e.g. [noatime, nodiscard]"));
        } else if let Some(p) = parts.iter().find(|p| **p == "nouuid" || **p == "ro") {
            out.bad(key, format!("{p:?} is not allowed (nouuid disables xfs's duplicate-UUID guard; ro volumes cannot be used); remove it"));
        }
    }
    if !c.mount_options.is_empty() && (c.volume_mode == VolumeMode::Block || c.publish_fs_type) {
        out.bad(
            at.k("mountOptions"),
            "only applies when disklet mounts the disks (volumeMode: Filesystem without publishFsType); kubelet's own mount takes the StorageClass's mountOptions: remove it here".into(),
        );
    }
}

/// Device path globs and udev property globs.
fn selector_globs(at: At, s: &Selector, out: &mut Problems) {
    for (j, g) in s.paths.iter().enumerate() {
        let key = at.k(&format!("selector.paths[{j}]"));
        let last = g.rsplit('/').next().unwrap_or("");
        if !last.is_empty() && last.chars().all(|c| "*?[]!{},".contains(c)) {
            out.bad(
                key.clone(),
                format!("{g:?} matches every device there; name the disks, e.g. /dev/disk/by-id/nvme-Samsung_SSD_980*"),
            );
        }
        if !g.starts_with("/dev/") {
            out.bad(key, format!("{g:?} must start with /dev/ (globs match device nodes and their /dev/disk/by-* links)"));
        } else if dot_component(g) {
            out.bad(key, format!("{g:?} contains a `.` or `..` component and never matches; write the path without it"));
        } else if let Err(e) = globset::Glob::new(g) {
            out.bad(key, format!("bad glob {g:?}: {e}"));
        }
    }
    for (name, g) in &s.udev {
        let key = at.k(&format!("selector.udev.{name}"));
        if name.is_empty() {
            out.bad(
                at.k("selector.udev"),
                "empty property name; write the udev property, e.g. DISKLET_CLASS".into(),
            );
        } else if name.contains(|c: char| c == '=' || c.is_whitespace() || c.is_control()) {
            out.bad(key.clone(), format!("{name:?} is not a udev property name (no '=', whitespace or control characters); e.g. DISKLET_CLASS"));
        }
        if g.is_empty() {
            out.bad(key, "an empty glob matches only a property set to nothing; write the value to match, or \"*\" for any".into());
        } else if let Err(e) = globset::Glob::new(g) {
            out.bad(key, format!("bad glob {g:?}: {e}"));
        }
    }
}

/// Types and sizes narrow a selection: they must leave something to match.
fn selector_narrowing(at: At, s: &Selector, out: &mut Problems) {
    if s.types.is_empty() {
        out.bad(
            at.k("selector.types"),
            "is empty; omit it for [disk] or list the kinds to accept".into(),
        );
    }
    if let (Some(min), Some(max)) = (s.min_size, s.max_size) {
        if min > max {
            out.bad(
                at.k("selector.minSize"),
                format!("{min} is larger than maxSize {max}"),
            );
        }
    }
}

/// Each discovery dir is absolute, and overlaps neither another class's dir
/// of the same mode, nor kubelet's directory, nor hostDir.
fn discovery_dirs(
    cfg: &Config,
    at: At,
    c: &Class,
    dirs_seen: &mut Vec<SeenDir>,
    out: &mut Problems,
) {
    for (j, d) in c.discovery_dirs.iter().enumerate() {
        let here = at.k(&format!("discoveryDirs[{j}]"));
        if !d.is_absolute() {
            out.bad(
                here,
                format!("{} is not an absolute path; write it from /", d.display()),
            );
            continue;
        }
        if has_dotdot(d) {
            out.bad(
                here.clone(),
                format!("{} contains `..`; write the path without it", d.display()),
            );
        } else if let Some(other) = dirs_seen.iter().find(|(_, o, mode)| {
            // A Filesystem class publishes the mount points of a
            // dir, a Block class its device links: one dir may
            // serve one of each.
            *mode == c.volume_mode && (d.starts_with(o) || o.starts_with(d))
        }) {
            out.bad(
                here.clone(),
                format!("{} overlaps {} {}: one volume would be published twice; list each directory once, in one class", d.display(), other.0, other.1.display()),
            );
        }
        dirs_seen.push((here.clone(), d.clone(), c.volume_mode));
        if d.starts_with(&cfg.kubelet_dir) || cfg.kubelet_dir.starts_with(d) {
            out.bad(
                here,
                format!("{} overlaps kubeletDir {}: kubelet's own mounts would be published; use a directory of its own, e.g. /mnt/disks", d.display(), cfg.kubelet_dir.display()),
            );
        } else if d.starts_with(&cfg.host_dir) || cfg.host_dir.starts_with(d) {
            out.bad(
                here,
                format!(
                    "{} overlaps hostDir {}: a volume would be published twice; use a directory of its own, e.g. /mnt/disks",
                    d.display(),
                    cfg.host_dir.display()
                ),
            );
        }
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
