//! The udev database (`/run/udev/data/b<maj>:<min>`) and whether udevd runs.
//!
//! disklet reads the database directly rather than trusting it as ground
//! truth: it only *enriches* what sysfs and our probe found (properties such
//! as `ID_SERIAL`, `ID_WWN` and admin-set `DISKLET_CLASS`, and `/dev/disk/by-*`
//! links).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::DevNo;

/// One device's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdevRecord {
    pub properties: BTreeMap<String, String>,
    /// Symlinks udev created, absolute (`/dev/disk/by-id/...`).
    pub links: Vec<PathBuf>,
}

/// Parses a database file: `S:` symlinks (relative to /dev), `E:` properties.
pub fn parse_record(text: &str) -> UdevRecord {
    let mut r = UdevRecord::default();
    for line in text.lines() {
        if let Some(link) = line.strip_prefix("S:") {
            r.links.push(Path::new("/dev").join(link));
        } else if let Some(kv) = line.strip_prefix("E:") {
            if let Some((k, v)) = kv.split_once('=') {
                r.properties.insert(k.to_string(), v.to_string());
            }
        }
    }
    r
}

/// Access to udevd's runtime directory.
#[derive(Debug, Clone)]
pub struct UdevDb {
    pub run_dir: PathBuf,
}

impl Default for UdevDb {
    fn default() -> Self {
        UdevDb {
            run_dir: PathBuf::from("/run/udev"),
        }
    }
}

impl UdevDb {
    /// Whether udevd is alive: its control socket accepts a connection. A
    /// socket file left behind by a dead udevd refuses it, and then the
    /// database (possibly stale) is not used at all.
    pub fn active(&self) -> bool {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let path = self.run_dir.join("control");
        let Ok(addr) = UnixAddr::new(&path) else {
            return false;
        };
        let Ok(fd) = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        ) else {
            return false;
        };
        use std::os::fd::AsRawFd;
        connect(fd.as_raw_fd(), &addr).is_ok()
    }

    /// The record for a block device, `None` if udevd has not written one.
    pub fn record(&self, devno: DevNo) -> Option<UdevRecord> {
        let p = self
            .run_dir
            .join("data")
            .join(format!("b{}:{}", devno.major, devno.minor));
        std::fs::read_to_string(p).ok().map(|t| parse_record(&t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fixture() {
        let r = parse_record(include_str!("../../tests/fixtures/udev-b259-0"));
        assert_eq!(
            r.properties["ID_SERIAL"],
            "Samsung_SSD_980_1TB_S64ANS0T123456"
        );
        assert_eq!(r.properties["ID_WWN"], "eui.002538b111b22222");
        assert_eq!(r.properties["DISKLET_CLASS"], "fast");
        assert_eq!(r.properties["ODD"], "a=b with spaces");
        assert!(r.links.contains(&PathBuf::from(
            "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456"
        )));
        assert!(r.links.iter().all(|l| l.starts_with("/dev/disk")));
        assert!(
            !r.properties.contains_key("I"),
            "non-E lines are not properties"
        );
    }

    #[test]
    fn a_dead_socket_is_not_an_active_udevd() {
        let dir = tempfile::tempdir().unwrap();
        let db = UdevDb {
            run_dir: dir.path().to_path_buf(),
        };
        assert!(!db.active(), "no socket");
        // A socket file whose listener is gone, as a killed udevd leaves it.
        let path = dir.path().join("control");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(!db.active(), "stale socket");
    }

    #[test]
    fn missing_record_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = UdevDb {
            run_dir: dir.path().to_path_buf(),
        };
        assert_eq!(db.record(DevNo::new(7, 0)), None);
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/b7:0"),
            "E:ID_FS_TYPE=\nS:disk/by-diskseq/12\n",
        )
        .unwrap();
        let r = db.record(DevNo::new(7, 0)).unwrap();
        assert_eq!(r.properties["ID_FS_TYPE"], "");
        assert_eq!(r.links, vec![PathBuf::from("/dev/disk/by-diskseq/12")]);
    }
}
