//! Discovery from sysfs, the ground truth, enriched by the udev database
//! (properties and `/dev/disk/by-*` links) when udevd runs.

use std::fs;
use std::path::{Path, PathBuf};

use crate::host::udevdb::UdevDb;
use crate::host::{BlockDevices, HostError};
use crate::model::{DevNo, Device, DeviceKind, UdevState};

/// Real discovery. The roots are configurable so tests can point them at a
/// fixture tree.
#[derive(Debug, Clone)]
pub struct SysfsDevices {
    /// `/sys`
    pub sys: PathBuf,
    /// `/dev`
    pub dev: PathBuf,
    pub udev: UdevDb,
}

impl Default for SysfsDevices {
    fn default() -> Self {
        SysfsDevices {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            udev: UdevDb::default(),
        }
    }
}

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_flag(p: &Path) -> bool {
    read(p).is_some_and(|s| s == "1")
}

fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether a device that looks like a disk is built by the kernel from other
/// devices or from nothing. NVMe native multipath heads live under
/// `virtual/nvme-subsystem` and are real disks.
pub fn is_virtual_stack(canonical_sysfs_path: &str, has_slaves: bool) -> bool {
    has_slaves
        || (canonical_sysfs_path.contains("/devices/virtual/")
            && !canonical_sysfs_path.contains("/devices/virtual/nvme-subsystem/"))
}

/// The kind of a device from its sysfs directory and kernel name.
pub fn kind_of(dir: &Path, name: &str) -> DeviceKind {
    let prefixed = |p: &str| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    if dir.join("partition").exists() {
        DeviceKind::Partition
    } else if dir.join("loop").exists() || prefixed("loop") {
        DeviceKind::Loop
    } else if dir.join("dm").exists() || name.starts_with("dm-") {
        DeviceKind::Dm
    } else if dir.join("md").exists() || prefixed("md") {
        DeviceKind::Md
    } else if prefixed("rbd") {
        DeviceKind::Rbd
    } else if prefixed("nbd") {
        DeviceKind::Nbd
    } else if prefixed("zram") {
        DeviceKind::Zram
    } else if prefixed("ram") {
        DeviceKind::Ram
    } else if prefixed("sr") {
        DeviceKind::Rom
    } else {
        DeviceKind::Disk
    }
}

impl SysfsDevices {
    /// Reads one device's facts from its sysfs directory.
    fn read_device(&self, name: &str) -> Option<Device> {
        let dir = self.sys.join("class/block").join(name);
        let devno = DevNo::parse(&read(&dir.join("dev"))?)?;
        let kind = kind_of(&dir, name);
        // A "disk" that the kernel builds from other devices or from nothing
        // (bcache, drbd, zvols, ublk, pmem...) is not a disk an admin can
        // dedicate: it is `other`, which no selector accepts by default.
        let virtual_stack = is_virtual_stack(
            &fs::canonicalize(&dir)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            !dir_names(&dir.join("slaves")).is_empty(),
        );
        let kind = if kind == DeviceKind::Disk && virtual_stack {
            DeviceKind::Other
        } else {
            kind
        };
        let mut d = Device::new(name, devno, kind);
        d.devnode = self.dev.join(name);
        // `size` is always in 512-byte sectors, whatever the logical block size.
        d.size_bytes = read(&dir.join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(0, |s| s.saturating_mul(512));
        d.read_only = read_flag(&dir.join("ro"));
        d.removable = read_flag(&dir.join("removable"));
        d.hidden = read_flag(&dir.join("hidden"));
        d.holders = dir_names(&dir.join("holders"));
        d.slaves = dir_names(&dir.join("slaves"));
        d.diskseq = read(&dir.join("diskseq")).and_then(|s| s.parse().ok());

        // A partition's facts about the hardware live on its disk.
        let hw = if kind == DeviceKind::Partition {
            let real = fs::canonicalize(&dir).ok()?;
            let parent_dir = real.parent()?.to_path_buf();
            d.parent = parent_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            parent_dir
        } else {
            // The kernel names a partition after its disk (`sda1`,
            // `nvme0n1p1`): only those entries are worth a stat.
            d.partitions = dir_names(&dir)
                .into_iter()
                .filter(|n| n.starts_with(name) && dir.join(n).join("partition").exists())
                .collect();
            dir.clone()
        };
        d.rotational = read(&hw.join("queue/rotational")).map(|s| s == "1");
        d.model = read(&hw.join("device/model"));
        d.vendor = read(&hw.join("device/vendor"));
        d.serial = read(&hw.join("serial")).or_else(|| read(&hw.join("device/serial")));
        d.wwid = read(&hw.join("wwid")).or_else(|| read(&hw.join("device/wwid")));
        d.loop_backing_file = read(&dir.join("loop/backing_file")).map(PathBuf::from);
        Some(d)
    }
}

impl SysfsDevices {
    fn names(&self) -> Result<Vec<String>, HostError> {
        let class = self.sys.join("class/block");
        let names = fs::read_dir(&class).map_err(|source| HostError::ListDevices {
            path: class.clone(),
            source,
        })?;
        let mut names: Vec<String> = names
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// One device as [`list`](BlockDevices::list) shows it, or `None` when
    /// it is gone or is no disk at all (a loop with nothing attached).
    fn device(&self, name: &str, udev_active: bool) -> Option<Device> {
        // A loop device with nothing attached is not a disk at all. Told
        // first, from three attributes: a node keeps every loop the kernel
        // ever made, and reading all their facts each pass (over 20 reads
        // each) cost a pass 27 ms with 200 of them.
        let dir = self.sys.join("class/block").join(name);
        if kind_of(&dir, name) == DeviceKind::Loop
            && read(&dir.join("size")).is_none_or(|s| s == "0")
            && read(&dir.join("loop/backing_file")).is_none()
        {
            return None;
        }
        let mut d = self.read_device(name)?;
        if d.kind == DeviceKind::Loop && d.size_bytes == 0 && d.loop_backing_file.is_none() {
            return None;
        }
        // Links come only from udevd's record of this very device: the
        // symlinks under /dev/disk outlive a dead udevd and can name a
        // device that has since taken over the kernel name.
        d.udev = if !udev_active {
            UdevState::NotRunning
        } else {
            match self.udev.record(d.devno) {
                None => UdevState::NotProcessed,
                // A record of an earlier medium under the same number
                // (a loop re-attached, media changed) is not this device's.
                Some(rec)
                    if d.diskseq.is_some()
                        && rec
                            .properties
                            .get("DISKSEQ")
                            .is_some_and(|s| s.parse::<u64>().ok() != d.diskseq) =>
                {
                    UdevState::NotProcessed
                }
                Some(rec) => {
                    // Keep only links that lead to this very device now.
                    d.links = rec
                        .links
                        .into_iter()
                        .filter(|l| {
                            let here = self.dev.join(l.strip_prefix("/dev").unwrap_or(l));
                            fs::canonicalize(here).is_ok_and(|t| t == d.devnode)
                        })
                        .collect();
                    UdevState::Processed {
                        properties: rec.properties,
                    }
                }
            }
        };
        d.links.sort();
        Some(d)
    }

    /// Whether the kernel name still holds the medium `d` was read from: the
    /// same diskseq (every attach, media change or new disk gets a new one;
    /// a device number and a kernel name are handed out again at once), and
    /// for a loop the same backing file. A device without a diskseq (a
    /// partition, whose identity is its disk's; any device before Linux
    /// 5.15) cannot be told by anything short of reading it again: never.
    fn same_medium(&self, d: &Device) -> bool {
        let dir = self.sys.join("class/block").join(&d.name);
        let Some(seq) = d.diskseq else {
            return false;
        };
        read(&dir.join("diskseq")).and_then(|s| s.parse::<u64>().ok()) == Some(seq)
            && (d.kind != DeviceKind::Loop
                || read(&dir.join("loop/backing_file")).map(PathBuf::from) == d.loop_backing_file)
    }
}

impl BlockDevices for SysfsDevices {
    fn list(&self) -> Result<Vec<Device>, HostError> {
        let udev_active = self.udev.active();
        Ok(self
            .names()?
            .iter()
            .filter_map(|name| self.device(name, udev_active))
            .collect())
    }

    fn size_now(&self, name: &str) -> Option<u64> {
        read(&self.sys.join("class/block").join(name).join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .map(|s| s.saturating_mul(512))
    }

    fn relist(&self, previous: &[Device], fresh: &str) -> Result<Vec<Device>, HostError> {
        let udev_active = self.udev.active();
        let previous: std::collections::HashMap<&str, &Device> =
            previous.iter().map(|d| (d.name.as_str(), d)).collect();
        Ok(self
            .names()?
            .iter()
            .filter_map(|name| match previous.get(name.as_str()) {
                Some(d) if name != fresh && self.same_medium(d) => Some((*d).clone()),
                _ => self.device(name, udev_active),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A miniature /sys and /dev: one NVMe disk with a partition, a loop with a
    /// backing file, an unattached loop, and a dm device on the partition.
    fn fixture() -> (tempfile::TempDir, SysfsDevices) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let w = |p: &str, s: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        let nv = "sys/devices/pci0000:00/nvme/nvme0/nvme0n1";
        w(&format!("{nv}/dev"), "259:0\n");
        w(&format!("{nv}/size"), "2000409264\n");
        w(&format!("{nv}/ro"), "0\n");
        w(&format!("{nv}/removable"), "0\n");
        w(&format!("{nv}/queue/rotational"), "0\n");
        w(&format!("{nv}/wwid"), "eui.002538b111b22222\n");
        w(&format!("{nv}/device/model"), "Samsung SSD 980 1TB     \n");
        w(&format!("{nv}/device/serial"), "S64ANS0T123456\n");
        w(&format!("{nv}/nvme0n1p1/dev"), "259:1\n");
        w(&format!("{nv}/nvme0n1p1/size"), "1024\n");
        w(&format!("{nv}/nvme0n1p1/partition"), "1\n");
        fs::create_dir_all(root.join(format!("{nv}/nvme0n1p1/holders/dm-0"))).unwrap();
        let lp = "sys/devices/virtual/block/loop3";
        w(&format!("{lp}/dev"), "7:3\n");
        w(&format!("{lp}/size"), "655360\n");
        w(&format!("{lp}/ro"), "1\n");
        w(&format!("{lp}/queue/rotational"), "1\n");
        w(
            &format!("{lp}/loop/backing_file"),
            "/tmp/disk with space.img\n",
        );
        w(&format!("{lp}/diskseq"), "42\n");
        let bc = "sys/devices/virtual/block/bcache0";
        w(&format!("{bc}/dev"), "252:0\n");
        w(&format!("{bc}/size"), "1024\n");
        let l0 = "sys/devices/virtual/block/loop0";
        w(&format!("{l0}/dev"), "7:0\n");
        w(&format!("{l0}/size"), "0\n");
        let dm = "sys/devices/virtual/block/dm-0";
        w(&format!("{dm}/dev"), "253:0\n");
        w(&format!("{dm}/size"), "1024\n");
        w(&format!("{dm}/dm/name"), "vg-lv\n");
        w(&format!("{dm}/diskseq"), "7\n");
        fs::create_dir_all(root.join(format!("{dm}/slaves/nvme0n1p1"))).unwrap();
        fs::create_dir_all(root.join("sys/class/block")).unwrap();
        for (n, target) in [
            ("nvme0n1", nv.to_string()),
            ("nvme0n1p1", format!("{nv}/nvme0n1p1")),
            ("loop3", lp.to_string()),
            ("loop0", l0.to_string()),
            ("dm-0", dm.to_string()),
            ("bcache0", bc.to_string()),
        ] {
            symlink(root.join(target), root.join("sys/class/block").join(n)).unwrap();
            fs::create_dir_all(root.join("dev")).unwrap();
            fs::write(root.join("dev").join(n), "").unwrap();
        }
        // A stale link, as a dead udevd leaves behind: never trusted.
        fs::create_dir_all(root.join("dev/disk/by-id")).unwrap();
        fs::create_dir_all(root.join("dev/mapper")).unwrap();
        symlink("../../loop3", root.join("dev/disk/by-id/stale")).unwrap();
        symlink(
            "../../nvme0n1",
            root.join("dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456"),
        )
        .unwrap();
        symlink(
            "../../nvme0n1p1",
            root.join("dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456-part1"),
        )
        .unwrap();
        symlink("../dm-0", root.join("dev/mapper/vg-lv")).unwrap();
        // udev's record names this link, but on disk it leads elsewhere.
        symlink("../../nvme0n1", root.join("dev/disk/by-id/dm-name-vg-lv")).unwrap();
        w("run/udev/data/b259:0", "S:disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456\nE:ID_SERIAL=Samsung_SSD_980_1TB_S64ANS0T123456\nE:DISKLET_CLASS=fast\n");
        w(
            "run/udev/data/b259:1",
            "S:disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456-part1\n",
        );
        w(
            "run/udev/data/b253:0",
            "S:mapper/vg-lv\nS:disk/by-id/dm-name-vg-lv\n",
        );
        let s = SysfsDevices {
            sys: root.join("sys"),
            dev: root.join("dev"),
            udev: UdevDb {
                run_dir: root.join("run/udev"),
            },
        };
        (t, s)
    }

    /// Makes the fixture's udevd look alive: a listening control socket.
    fn listen(s: &SysfsDevices) -> std::os::fd::OwnedFd {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::AsRawFd;
        let addr = UnixAddr::new(&s.udev.run_dir.join("control")).unwrap();
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &addr).unwrap();
        listen(&fd, Backlog::new(4).unwrap()).unwrap();
        fd
    }

    #[test]
    fn without_udevd_no_links_and_no_properties() {
        let (_t, s) = fixture();
        let devs = s.list().unwrap();
        assert!(
            devs.iter()
                .all(|d| d.links.is_empty() && d.udev == UdevState::NotRunning),
            "{devs:#?}"
        );
    }

    #[test]
    fn reads_every_fact_from_sysfs() {
        let (_t, s) = fixture();
        let _udevd = listen(&s);
        let devs = s.list().unwrap();
        let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["bcache0", "dm-0", "loop3", "nvme0n1", "nvme0n1p1"],
            "unattached loop0 is skipped"
        );
        assert_eq!(
            devs[0].kind,
            DeviceKind::Other,
            "a virtual disk is not a disk"
        );

        let nv = &devs[3];
        assert_eq!(nv.kind, DeviceKind::Disk);
        assert_eq!(nv.size_bytes, 2000409264 * 512);
        assert_eq!(nv.rotational, Some(false));
        assert_eq!(nv.model.as_deref(), Some("Samsung SSD 980 1TB"));
        assert_eq!(nv.serial.as_deref(), Some("S64ANS0T123456"));
        assert_eq!(nv.wwid.as_deref(), Some("eui.002538b111b22222"));
        assert_eq!(nv.partitions, ["nvme0n1p1"]);
        assert_eq!(nv.links.len(), 1);
        assert_eq!(nv.identity().unwrap(), "wwn:eui.002538b111b22222");
        assert_eq!(nv.udev_properties().unwrap()["DISKLET_CLASS"], "fast");

        let p = &devs[4];
        assert_eq!(p.kind, DeviceKind::Partition);
        assert_eq!(p.parent.as_deref(), Some("nvme0n1"));
        assert_eq!(p.holders, ["dm-0"]);
        assert_eq!(p.rotational, Some(false), "inherited from the disk");
        assert_eq!(p.serial.as_deref(), Some("S64ANS0T123456"));

        let l = &devs[2];
        assert_eq!(l.kind, DeviceKind::Loop);
        assert!(l.read_only);
        assert_eq!(l.diskseq, Some(42));
        assert_eq!(
            l.loop_backing_file,
            Some(PathBuf::from("/tmp/disk with space.img"))
        );
        assert_eq!(l.identity().unwrap(), "loop-file:/tmp/disk with space.img");
        assert_eq!(
            l.udev,
            UdevState::NotProcessed,
            "the record is of the previous attachment"
        );
        assert!(
            l.links.is_empty(),
            "the stale /dev/disk link is not believed"
        );

        let dm = &devs[1];
        assert_eq!(dm.kind, DeviceKind::Dm);
        assert_eq!(dm.slaves, ["nvme0n1p1"]);
        assert_eq!(
            dm.links.len(),
            1,
            "a link that leads to another device is dropped: {:?}",
            dm.links
        );
        assert!(dm.links[0].ends_with("mapper/vg-lv"));
    }

    #[test]
    fn a_relisting_reads_again_exactly_what_may_have_changed() {
        let (t, s) = fixture();
        let root = t.path();
        let mut previous = s.list().unwrap();
        assert_eq!(s.relist(&previous, "loop3").unwrap(), previous);
        // Mark every entry, so a reused one can be told from one read again.
        for d in &mut previous {
            d.model = Some("from the plan".into());
        }
        let model = |devs: &[Device], name: &str| {
            devs.iter()
                .find(|d| d.name == name)
                .map(|d| d.model.clone())
        };
        let again = s.relist(&previous, "nvme0n1").unwrap();
        assert_eq!(
            model(&again, "nvme0n1"),
            Some(Some("Samsung SSD 980 1TB".into())),
            "the device to format is always read again"
        );
        assert_eq!(model(&again, "dm-0"), Some(Some("from the plan".into())));

        // New media under known names, a new device, a gone one.
        let lp = root.join("sys/devices/virtual/block/loop3");
        fs::write(lp.join("diskseq"), "43\n").unwrap();
        let part = root.join("sys/devices/pci0000:00/nvme/nvme0/nvme0n1/nvme0n1p1");
        fs::write(part.join("dev"), "259:7\n").unwrap();
        let l0 = root.join("sys/devices/virtual/block/loop0");
        fs::write(l0.join("size"), "2048\n").unwrap();
        fs::create_dir_all(l0.join("loop")).unwrap();
        fs::write(l0.join("loop/backing_file"), "/tmp/new.img\n").unwrap();
        fs::remove_file(root.join("sys/class/block/bcache0")).unwrap();
        let again = s.relist(&previous, "nvme0n1").unwrap();
        assert_eq!(
            model(&again, "loop3"),
            Some(None),
            "new diskseq: read again"
        );
        let p = again.iter().find(|d| d.name == "nvme0n1p1").unwrap();
        assert_eq!(p.devno.to_string(), "259:7");
        assert_eq!(
            p.model.as_deref(),
            Some("Samsung SSD 980 1TB"),
            "no diskseq (a partition): always read again"
        );
        assert_eq!(
            again
                .iter()
                .find(|d| d.name == "loop0")
                .unwrap()
                .loop_backing_file,
            Some(PathBuf::from("/tmp/new.img")),
            "a loop attached since is listed"
        );
        assert_eq!(model(&again, "bcache0"), None, "a gone device is gone");
        assert_eq!(model(&again, "dm-0"), Some(Some("from the plan".into())));

        // A loop given another file without a new diskseq is read again too.
        let previous = s.list().unwrap();
        fs::write(lp.join("loop/backing_file"), "/tmp/other.img\n").unwrap();
        let again = s.relist(&previous, "nvme0n1").unwrap();
        assert_eq!(
            again
                .iter()
                .find(|d| d.name == "loop3")
                .unwrap()
                .loop_backing_file,
            Some(PathBuf::from("/tmp/other.img"))
        );
        assert_eq!(again, s.list().unwrap());
    }

    #[test]
    fn virtual_disks_are_told_from_real_ones() {
        assert!(is_virtual_stack(
            "/sys/devices/virtual/block/bcache0",
            false
        ));
        assert!(is_virtual_stack("/sys/devices/virtual/block/drbd1", false));
        assert!(!is_virtual_stack(
            "/sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1",
            false
        ));
        assert!(!is_virtual_stack(
            "/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda",
            false
        ));
        assert!(
            is_virtual_stack("/sys/devices/pci0000:00/x/block/sdz", true),
            "built from other devices"
        );
    }

    #[test]
    fn kinds_by_name() {
        let nowhere = Path::new("/nonexistent");
        assert_eq!(kind_of(nowhere, "sda"), DeviceKind::Disk);
        assert_eq!(kind_of(nowhere, "md127"), DeviceKind::Md);
        assert_eq!(kind_of(nowhere, "mdx"), DeviceKind::Disk);
        assert_eq!(kind_of(nowhere, "zram0"), DeviceKind::Zram);
        assert_eq!(kind_of(nowhere, "nbd3"), DeviceKind::Nbd);
        assert_eq!(kind_of(nowhere, "rbd0"), DeviceKind::Rbd);
        assert_eq!(kind_of(nowhere, "sr0"), DeviceKind::Rom);
        assert_eq!(kind_of(nowhere, "ram0"), DeviceKind::Ram);
        assert_eq!(kind_of(nowhere, "loop12"), DeviceKind::Loop);
    }

    #[test]
    fn a_missing_sysfs_is_a_clear_error() {
        let s = SysfsDevices {
            sys: "/nonexistent".into(),
            ..SysfsDevices::default()
        };
        let e = s.list().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/class/block"), "{e}");
    }

    #[test]
    fn lists_this_machine() {
        let devs = SysfsDevices::default().list().unwrap();
        assert!(!devs.is_empty(), "a VM has at least its root disk");
        assert!(devs.iter().all(|d| d.devnode.starts_with("/dev")));
    }
}
