//! Format intents: before each mkfs, disklet records under hostDir which
//! filesystem UUID it is about to make on which disk, fsynced, and removes
//! the record once mkfs returned. A record left behind means that mkfs was
//! cut short (the agent or its container killed while it ran). Only an
//! unfinished xfs whose UUID and disk match such a record is formatted
//! again: the same on-disk state made by someone else (an xfs_copy that
//! aborted, whose target carries our label and an "in progress" superblock)
//! has no record, and is left alone.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory of records, inside hostDir (class names cannot start with
/// a dot, so it never meets a class's mounts).
pub fn dir(host_dir: &Path) -> PathBuf {
    host_dir.join(".mkfs-started")
}

use crate::model::FormatIntent as Intent;

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Records, durably, that a mkfs of `uuid` on the disk `device_key` starts now.
pub fn record(host_dir: &Path, uuid: &str, device_key: &str) -> std::io::Result<()> {
    let d = dir(host_dir);
    std::fs::create_dir_all(&d)?;
    let path = d.join(uuid);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(device_key.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    sync_dir(&d)
}

/// Removes the record of `uuid` (its mkfs returned). A missing one is fine.
pub fn clear(host_dir: &Path, uuid: &str) -> std::io::Result<()> {
    let d = dir(host_dir);
    match std::fs::remove_file(d.join(uuid)) {
        Ok(()) => sync_dir(&d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every record. Unreadable or odd entries are skipped: a record that
/// cannot be read only means a format is not redone.
pub fn read(host_dir: &Path) -> Vec<Intent> {
    let Ok(entries) = std::fs::read_dir(dir(host_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Intent> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let uuid = e.file_name().into_string().ok()?;
            uuid::Uuid::parse_str(&uuid).ok()?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some(Intent {
                uuid,
                device_key: text.trim_end_matches('\n').to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_outlive_the_process_until_cleared() {
        let t = tempfile::tempdir().expect("tempdir");
        let u1 = "6a1f3c84-3c39-4c8e-a5f0-8b1d2b7f0c11";
        let u2 = "0b7c1a2e-9d4f-4e3b-8a61-2f5c7d9e1b33";
        assert!(read(t.path()).is_empty(), "no directory yet");
        record(t.path(), u1, "wwn:0x5000c500a1b2c3d4").expect("record");
        record(t.path(), u2, "loop-file:/tmp/with space\tand tab.img").expect("record");
        std::fs::write(dir(t.path()).join("not-a-uuid"), "x").expect("write");
        assert_eq!(
            read(t.path()),
            [
                Intent {
                    uuid: u2.into(),
                    device_key: "loop-file:/tmp/with space\tand tab.img".into()
                },
                Intent {
                    uuid: u1.into(),
                    device_key: "wwn:0x5000c500a1b2c3d4".into()
                },
            ]
        );
        clear(t.path(), u1).expect("clear");
        clear(t.path(), u1).expect("clearing twice is fine");
        assert_eq!(read(t.path()).len(), 1);
    }
}
