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
///
/// udevd writes values as they are, one `E:KEY=value` line each: a value
/// with a newline (a rule's `e"x\ny"`) is cut at the newline, here as in
/// udevd's own reading (`udevadm info` shows `x`), and the rest of it is no
/// property. Bytes that are not UTF-8 read as `\xNN`.
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
        // Not read_to_string: one property that is not UTF-8 (a device's odd
        // serial, a rule's `e"\xff"`) must not make the whole record, and
        // with it the device, look unprocessed forever.
        std::fs::read(p)
            .ok()
            .map(|b| parse_record(&escape_invalid(&b)))
    }
}

/// Text with every byte that is not UTF-8 written as `\xNN`: two serials
/// that differ only there stay two identities (U+FFFD would merge them).
pub fn escape_invalid(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
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

    /// Catches: a record holding one non-UTF-8 byte read as no record, which
    /// left its device pending (`udev-not-processed`) forever.
    #[test]
    fn a_record_with_bytes_that_are_not_utf8_still_counts() {
        let dir = tempfile::tempdir().unwrap();
        let db = UdevDb {
            run_dir: dir.path().to_path_buf(),
        };
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/b7:1"),
            b"E:ID_SERIAL=\xff\xfe\nE:ID_WWN=x\ny\nE:ID_MODEL=a b\n",
        )
        .unwrap();
        let r = db.record(DevNo::new(7, 1)).unwrap();
        assert_eq!(r.properties["ID_SERIAL"], r"\xff\xfe");
        assert_eq!(r.properties["ID_WWN"], "x", "a newline ends a value");
        assert_eq!(r.properties["ID_MODEL"], "a b");
        assert_eq!(r.properties.len(), 3);
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
