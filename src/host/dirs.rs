//! Observation of discovery dirs and of the mounts under hostDir.

use std::path::Path;

use crate::model::{Device, DirEntry, DirEntryKind, MountEntry, MountFact};

/// Filesystem size in bytes.
pub fn fs_capacity(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks().saturating_mul(st.fragment_size()))
}

/// Facts for a mount point disklet made, mounted from `devnode`.
pub fn mount_fact(m: &MountEntry, devnode: Option<&Path>) -> MountFact {
    let mount_point = m.mount_point.as_path();
    let vol = crate::model::volume::vol_dir(mount_point);
    // A missing `vol` is normal (not made yet); any other error reading the
    // mount point or `vol` is the filesystem failing.
    // Only errors of the filesystem itself: running out of file descriptors
    // (EMFILE) must not withdraw every volume of the node.
    let failing = |e: std::io::Error, at: &Path| {
        use nix::errno::Errno;
        let fs_error = e.raw_os_error().is_some_and(|n| {
            [Errno::EIO, Errno::EUCLEAN, Errno::ENOTCONN, Errno::ESTALE]
                .iter()
                .any(|x| *x as i32 == n)
        });
        fs_error.then(|| format!("{}: {e}", at.display()))
    };
    let mut io_error = std::fs::read_dir(mount_point)
        .err()
        .and_then(|e| failing(e, mount_point));
    let vol_empty = match std::fs::read_dir(&vol) {
        Ok(mut d) => match d.next() {
            None => true,
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                io_error = io_error.or_else(|| failing(e, &vol));
                false
            }
        },
        Err(e) => {
            io_error = io_error.or_else(|| failing(e, &vol));
            false
        }
    };
    MountFact {
        vol_dir: vol.is_dir(),
        capacity_bytes: fs_capacity(mount_point).unwrap_or(0),
        fs_bytes: devnode.and_then(|d| crate::host::fssize::fs_size(m, d)),
        device_bytes: None,
        vol_empty,
        io_error,
    }
}

/// First-level entries of a discovery dir: mount points (as listed in the
/// host mount table) and symlinks to block devices. Nothing is followed
/// beyond one symlink hop, and a symlink loop is just `Other`. An entry whose
/// name kubelet and the mount table cannot carry safely (a control character,
/// not UTF-8) is `Other` too, so it is never published. Entries that look
/// like an admin's mistake (such names, symlink loops, dangling symlinks)
/// carry a `warning`, which the agent reports as a Warning Event.
pub fn scan_dir(class: &str, dir: &Path, mounts: &[MountEntry]) -> Vec<DirEntry> {
    let entries = inspect_dir(class, None, dir, mounts);
    entries
        .into_iter()
        .map(|e| {
            let warning = e
                .refusal
                .filter(|(code, _)| WARN.contains(code))
                .map(|(code, detail)| format!("{code}: {detail}"));
            DirEntry { warning, ..e.entry }
        })
        .collect()
}

/// A discovery-dir entry with why it is not published, if it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub entry: DirEntry,
    /// (reason code, detail) when the entry cannot be published.
    pub refusal: Option<(&'static str, String)>,
}

/// Reasons worth a Warning Event: the admin put something there that can
/// never work.
const WARN: &[&str] = &["unsafe-name", "symlink-loop", "dangling-symlink"];

/// Every entry with its verdict. With `mode`, entries of the wrong kind for
/// the class (a mount point in a Block class) are refused as well.
pub fn inspect_dir(
    class: &str,
    mode: Option<crate::config::VolumeMode>,
    dir: &Path,
    mounts: &[MountEntry],
) -> Vec<Inspected> {
    use crate::config::VolumeMode;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Inspected> = rd
        .filter_map(|e| e.ok())
        .map(|e| {
            let path = e.path();
            let (mut kind, mut refusal) = entry_kind(&path, mounts);
            if let Some(why) = unsafe_name(&e.file_name()) {
                kind = DirEntryKind::Other;
                refusal = Some(("unsafe-name", why));
            }
            if refusal.is_none() {
                refusal = match (&kind, mode) {
                    (DirEntryKind::MountPoint { .. }, Some(VolumeMode::Block)) => Some((
                        "wrong-mode",
                        "a mount point; the class publishes Block volumes (symlinks to block devices)".into(),
                    )),
                    (DirEntryKind::BlockLink { .. }, Some(VolumeMode::Filesystem)) => Some((
                        "wrong-mode",
                        "a symlink to a block device; the class publishes Filesystem volumes (mount points)".into(),
                    )),
                    _ => None,
                };
            }
            Inspected {
                entry: DirEntry {
                    class: class.to_string(),
                    path,
                    kind,
                    warning: None,
                },
                refusal,
            }
        })
        .collect();
    out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    out
}

/// Why an entry's name cannot be a PV's `local.path`: the API would take it,
/// but a control character breaks line-based tools (kubelet reads the mount
/// table line by line) and a name that is not UTF-8 cannot be written in a
/// PV at all (it would name another path).
fn unsafe_name(name: &std::ffi::OsStr) -> Option<String> {
    match name.to_str() {
        None => Some(format!(
            "the name {name:?} is not UTF-8 and cannot be written in a PV; rename the entry"
        )),
        Some(n) if n.chars().any(char::is_control) => Some(format!(
            "the name {n:?} holds a control character, which kubelet and the mount table cannot carry safely; rename the entry"
        )),
        Some(_) => None,
    }
}

fn entry_kind(
    path: &Path,
    mounts: &[MountEntry],
) -> (DirEntryKind, Option<(&'static str, String)>) {
    let other = |code: &'static str, detail: String| (DirEntryKind::Other, Some((code, detail)));
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return other("unreadable", format!("{}: {e}", path.display())),
    };
    if meta.file_type().is_symlink() {
        use std::os::unix::fs::FileTypeExt;
        let link = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return match std::fs::canonicalize(path) {
            Ok(target) => match std::fs::metadata(&target) {
                Ok(m) if m.file_type().is_block_device() => (
                    DirEntryKind::BlockLink {
                        size_bytes: block_size(&target).unwrap_or(0),
                        target,
                    },
                    None,
                ),
                _ => other(
                    "not-a-block-device",
                    format!("a symlink to {}, which is not a block device", target.display()),
                ),
            },
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => other(
                "symlink-loop",
                format!("a symlink to {link} whose chain loops; remove it or point it at a block device"),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => other(
                "dangling-symlink",
                format!("a symlink to {link}, which does not exist; remove it or point it at a block device"),
            ),
            Err(e) => other("unreadable", format!("a symlink to {link}: {e}")),
        };
    }
    if meta.is_dir() {
        if let Some(m) = mounts.iter().rev().find(|m| m.mount_point == path) {
            return (
                DirEntryKind::MountPoint {
                    capacity_bytes: fs_capacity(path).unwrap_or(0),
                    devno: m.devno,
                },
                None,
            );
        }
        return other(
            "not-a-mount-point",
            "a plain directory; mount the volume's filesystem on it to publish it".into(),
        );
    }
    other(
        "not-a-directory",
        "neither a mount point nor a symlink to a block device".into(),
    )
}

/// Entries whose device is not among `devices`: a mount point of a block
/// device (major number not 0; 0 is a filesystem with no device, tmpfs or a
/// btrfs subvolume) or a symlink to a device node the listing lacks. Read
/// in the same pass, that means the device appeared after the listing.
pub fn devices_missing<'a>(entries: &'a [DirEntry], devices: &[Device]) -> Vec<&'a Path> {
    entries
        .iter()
        .filter(|e| match &e.kind {
            DirEntryKind::MountPoint { devno, .. } => {
                devno.major != 0 && !devices.iter().any(|d| d.devno == *devno)
            }
            DirEntryKind::BlockLink { target, .. } => !devices.iter().any(|d| &d.devnode == target),
            DirEntryKind::Other => false,
        })
        .map(|e| e.path.as_path())
        .collect()
}

/// A block device's size from sysfs, by its node.
fn block_size(dev: &Path) -> Option<u64> {
    let n = crate::host::mountinfo::block_devno(dev)?;
    let s = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/size", n.major, n.minor)).ok()?;
    s.trim().parse::<u64>().ok().map(|s| s * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn codes(dir: &Path) -> Vec<(String, Option<&'static str>)> {
        inspect_dir("c", None, dir, &[])
            .into_iter()
            .map(|e| {
                (
                    e.entry
                        .path
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    e.refusal.map(|r| r.0),
                )
            })
            .collect()
    }

    /// Catches: symlink loops or dangling links hanging the scan or being
    /// published, and names kubelet cannot carry being let through.
    #[test]
    fn odd_entries_are_refused_with_a_reason() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        symlink("b", d.join("a")).unwrap();
        symlink("a", d.join("b")).unwrap();
        symlink("self", d.join("self")).unwrap();
        symlink("nowhere", d.join("dangling")).unwrap();
        symlink("/dev/null", d.join("chardev")).unwrap();
        std::fs::create_dir(d.join("new\nline")).unwrap();
        std::fs::create_dir(d.join("plain dir")).unwrap();
        std::fs::write(d.join("file"), "").unwrap();
        {
            use std::os::unix::ffi::OsStrExt;
            std::fs::create_dir(d.join(std::ffi::OsStr::from_bytes(b"bad\xff"))).unwrap();
        }
        let got = codes(d);
        let want: Vec<(String, Option<&str>)> = vec![
            ("a".into(), Some("symlink-loop")),
            ("b".into(), Some("symlink-loop")),
            ("bad\u{fffd}".into(), Some("unsafe-name")),
            ("chardev".into(), Some("not-a-block-device")),
            ("dangling".into(), Some("dangling-symlink")),
            ("file".into(), Some("not-a-directory")),
            ("new\nline".into(), Some("unsafe-name")),
            ("plain dir".into(), Some("not-a-mount-point")),
            ("self".into(), Some("symlink-loop")),
        ];
        assert_eq!(got, want);
        // The agent's view: every one of them is Other, never published.
        assert!(scan_dir("c", d, &[])
            .iter()
            .all(|e| e.kind == DirEntryKind::Other));
    }

    /// Catches: an entry whose device the listing lacked going unnoticed
    /// (it would be published without its identity), and a tmpfs or a
    /// btrfs subvolume (major 0, no device at all) being taken for one.
    #[test]
    fn entries_naming_devices_the_listing_lacks_are_found() {
        use crate::model::{DevNo, DeviceKind};
        let entry = |name: &str, kind: DirEntryKind| DirEntry {
            class: "c".into(),
            path: Path::new("/d").join(name),
            kind,
            warning: None,
        };
        let mp = |major, minor| DirEntryKind::MountPoint {
            capacity_bytes: 1,
            devno: DevNo::new(major, minor),
        };
        let link = |node: &str| DirEntryKind::BlockLink {
            target: node.into(),
            size_bytes: 1,
        };
        let entries = vec![
            entry("listed", mp(7, 1)),
            entry("new", mp(7, 2)),
            entry("tmpfs", mp(0, 52)),
            entry("link-listed", link("/dev/loop1")),
            entry("link-new", link("/dev/loop3")),
            entry("other", DirEntryKind::Other),
        ];
        let devices = vec![Device::new("loop1", DevNo::new(7, 1), DeviceKind::Loop)];
        assert_eq!(
            devices_missing(&entries, &devices),
            vec![Path::new("/d/new"), Path::new("/d/link-new")]
        );
        let all = vec![
            Device::new("loop1", DevNo::new(7, 1), DeviceKind::Loop),
            Device::new("loop2", DevNo::new(7, 2), DeviceKind::Loop),
            Device::new("loop3", DevNo::new(7, 3), DeviceKind::Loop),
        ];
        assert!(devices_missing(&entries, &all).is_empty());
    }

    #[test]
    fn a_mount_point_with_a_control_character_is_not_published() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("tab\there");
        std::fs::create_dir(&p).unwrap();
        let m = MountEntry {
            mount_id: 1,
            parent_id: 0,
            devno: crate::model::DevNo::new(0, 99),
            root: "/".into(),
            mount_point: p.clone(),
            options: String::new(),
            fs_type: "tmpfs".into(),
            source: "tmpfs".into(),
        };
        let e = inspect_dir("c", None, t.path(), std::slice::from_ref(&m));
        assert_eq!(e[0].entry.kind, DirEntryKind::Other);
        assert_eq!(e[0].refusal.as_ref().unwrap().0, "unsafe-name");
        std::fs::remove_dir(&p).unwrap();
        let ok = t.path().join("spa ce $(x)");
        std::fs::create_dir(&ok).unwrap();
        let m = MountEntry {
            mount_point: ok.clone(),
            ..m
        };
        let e = inspect_dir("c", None, t.path(), &[m]);
        assert!(
            matches!(e[0].entry.kind, DirEntryKind::MountPoint { .. }),
            "{e:?}"
        );
        assert_eq!(e[0].refusal, None);
    }
}
