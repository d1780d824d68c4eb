//! The host's mount table and swap list, and the snapshot that eligibility
//! decides on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DevNo, Device};

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `st_dev` of the filesystem. For a block filesystem this is the device;
    /// btrfs and overlay report an anonymous `0:N` instead.
    pub devno: DevNo,
    /// Path inside the filesystem that is mounted here (`/` unless a bind mount
    /// of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    /// The mount source, e.g. `/dev/sda1`, `overlay`, `tmpfs`.
    pub source: String,
}

/// One line of `/proc/swaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapEntry {
    pub path: PathBuf,
    /// `partition` or `file`.
    pub kind: String,
    /// Device number of the swap device when it is a block device.
    pub devno: Option<DevNo>,
}

/// Everything eligibility needs to know about the node, observed in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub devices: Vec<Device>,
    pub mounts: Vec<MountEntry>,
    pub swaps: Vec<SwapEntry>,
}

impl Inventory {
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The kernel name of the device a mount lives on, if it is one of ours to
    /// know: by device number, else by source path (btrfs reports an anonymous
    /// device number but names the device in the source).
    pub fn mount_device(&self, m: &MountEntry) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.devno == m.devno)
            .or_else(|| {
                // Most mounts matching no device number are virtual (proc,
                // tmpfs, cgroup), with a source that is no path at all. A
                // relative path never equals an absolute one, and that test is
                // one byte where `Path`'s equality parses components: this
                // runs for every mount, of every device, in every pass.
                let src = std::path::Path::new(&m.source);
                let abs = src.is_absolute();
                let same = |p: &std::path::Path| p.is_absolute() == abs && p == src;
                self.devices
                    .iter()
                    .find(|d| same(&d.devnode) || d.links.iter().any(|l| same(l)))
            })
    }

    /// Mounts of this device or of any of its partitions, bind mounts included.
    pub fn mounts_of<'a>(&'a self, dev: &'a Device) -> impl Iterator<Item = &'a MountEntry> + 'a {
        self.mounts.iter().filter(move |m| {
            self.mount_device(m)
                .is_some_and(|md| md.name == dev.name || md.parent.as_deref() == Some(&dev.name))
        })
    }

    /// Active swap on this device or one of its partitions.
    pub fn swaps_of<'a>(&'a self, dev: &'a Device) -> impl Iterator<Item = &'a SwapEntry> + 'a {
        let parts: Vec<DevNo> = self
            .devices
            .iter()
            .filter(|d| d.parent.as_deref() == Some(&dev.name))
            .map(|d| d.devno)
            .collect();
        self.swaps.iter().filter(move |s| {
            s.devno
                .is_some_and(|n| n == dev.devno || parts.contains(&n))
                || s.path == dev.devnode
        })
    }

    /// Every device that lies under the filesystem mounted at one of `paths`:
    /// the device itself, the disk of a partition, and the devices beneath a
    /// dm or md device, transitively. These are the node's OS disks.
    pub fn devices_under_paths(&self, paths: &[PathBuf]) -> Vec<String> {
        let mut todo: Vec<String> = Vec::new();
        for p in paths {
            if let Some(m) = self.mount_containing(p) {
                if let Some(d) = self.mount_device(m) {
                    todo.push(d.name.clone());
                }
            }
        }
        let mut seen: Vec<String> = Vec::new();
        while let Some(name) = todo.pop() {
            if seen.contains(&name) {
                continue;
            }
            if let Some(d) = self.device(&name) {
                if let Some(parent) = &d.parent {
                    todo.push(parent.clone());
                }
                todo.extend(d.slaves.iter().cloned());
            }
            seen.push(name);
        }
        seen.sort();
        seen
    }

    /// The mount whose mount point is the longest prefix of `path` (the last
    /// one mounted wins when several are stacked on the same point).
    pub fn mount_containing(&self, path: &std::path::Path) -> Option<&MountEntry> {
        self.mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.components().count())
    }
}

#[cfg(test)]
mod tests {
    use super::{Inventory, MountEntry};
    use crate::model::{DevNo, Device, DeviceKind};

    fn mount(devno: DevNo, source: &str, at: &str) -> MountEntry {
        MountEntry {
            mount_id: 1,
            parent_id: 0,
            devno,
            root: "/".into(),
            mount_point: at.into(),
            options: "rw".into(),
            fs_type: "btrfs".into(),
            source: source.into(),
        }
    }

    #[test]
    fn a_mount_is_the_device_of_its_number_else_of_its_source_path() {
        let mut sdb = Device::new(
            "sdb",
            DevNo {
                major: 8,
                minor: 16,
            },
            DeviceKind::Disk,
        );
        sdb.devnode = "/dev/sdb".into();
        sdb.links = vec!["/dev/disk/by-id/wwn-1".into()];
        let mut sdc = Device::new(
            "sdc",
            DevNo {
                major: 8,
                minor: 32,
            },
            DeviceKind::Disk,
        );
        sdc.devnode = "/dev/sdc".into();
        let anon = DevNo {
            major: 0,
            minor: 42,
        };
        let inv = Inventory {
            devices: vec![sdb, sdc],
            mounts: vec![
                mount(
                    DevNo {
                        major: 8,
                        minor: 32,
                    },
                    "/dev/whatever",
                    "/a",
                ),
                mount(anon, "/dev/sdb", "/b"),
                mount(anon, "/dev//disk/by-id/wwn-1/", "/c"),
                mount(anon, "sdb", "/d"),
                mount(anon, "tmpfs", "/e"),
            ],
            ..Inventory::default()
        };
        let owner: Vec<Option<&str>> = inv
            .mounts
            .iter()
            .map(|m| inv.mount_device(m).map(|d| d.name.as_str()))
            .collect();
        // By number first; by path (as Path equality has it: a doubled or
        // trailing slash is the same path, a relative name is no device).
        assert_eq!(owner, [Some("sdc"), Some("sdb"), Some("sdb"), None, None]);
        let sdb_mounts: Vec<_> = inv
            .mounts_of(&inv.devices[0])
            .map(|m| m.mount_point.to_str().unwrap())
            .collect();
        assert_eq!(sdb_mounts, ["/b", "/c"]);
    }
}
