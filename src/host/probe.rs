//! Our own read-only probe of device contents: every signature libblkid knows
//! (in-process, listed as `wipefs --no-act` lists them: superblocks *and*
//! partition tables, overlapping ones included; see `host::blkid`), a zero
//! check of the first and last MiB, and the kernel's exclusive-open test.
//! `wipefs --no-act --json` itself remains a source, for the comparison
//! with it (`tests/probe_parity.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::host::{Cmd, Prober};
use crate::model::{Device, Exclusive, Probe, Signature};

/// How much of each end of the device must read back as zeroes.
pub const ZERO_CHECK_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("wipefs printed JSON disklet does not understand: {0}")]
    Json(#[from] serde_json::Error),
    #[error("wipefs printed an offset that is not a number: {0:?}")]
    Offset(String),
}

#[derive(Deserialize)]
struct WipefsOut {
    #[serde(default)]
    signatures: Vec<WipefsSig>,
}

#[derive(Deserialize)]
struct WipefsSig {
    offset: String,
    #[serde(rename = "type")]
    kind: String,
    uuid: Option<String>,
    label: Option<String>,
}

/// Parses `wipefs --no-act --json` output. Empty output means no signature.
pub fn parse_wipefs(text: &str) -> Result<Vec<Signature>, ParseError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let out: WipefsOut = serde_json::from_str(text)?;
    out.signatures
        .into_iter()
        .map(|s| {
            let hex = s.offset.trim_start_matches("0x");
            let offset =
                u64::from_str_radix(hex, 16).map_err(|_| ParseError::Offset(s.offset.clone()))?;
            Ok(Signature {
                kind: s.kind,
                offset,
                uuid: s.uuid.filter(|u| !u.is_empty()),
                label: s.label.filter(|l| !l.is_empty()),
                in_progress: false,
            })
        })
        .collect()
}

/// Whether the first and last `ZERO_CHECK_BYTES` of the device are zero.
pub fn ends_are_zero(path: &Path, size: u64) -> std::io::Result<bool> {
    let f = File::open(path)?;
    let n = ZERO_CHECK_BYTES.min(size);
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
    for off in [0, size.saturating_sub(n)] {
        f.read_exact_at(&mut buf, off)?;
        if buf.iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The primary xfs superblock: sector 0 of the device open as `f`.
pub fn read_xfs_sb(f: &File) -> std::io::Result<[u8; 512]> {
    let mut sb = [0u8; 512];
    f.read_exact_at(&mut sb, 0)?;
    Ok(sb)
}

/// Whether `sb` is an xfs superblock (magic `XFSB`) marked "mkfs in
/// progress": `sb_inprogress`, byte 126, set by mkfs.xfs when it starts
/// writing and cleared as its last step.
pub fn xfs_sb_in_progress(sb: &[u8; 512]) -> bool {
    &sb[..4] == b"XFSB" && sb[126] != 0
}

/// Whether the primary xfs superblock of `path` is marked "mkfs in
/// progress". `false` when there is no xfs superblock.
pub fn xfs_in_progress(path: &Path) -> std::io::Result<bool> {
    Ok(xfs_sb_in_progress(&read_xfs_sb(&File::open(path)?)?))
}

/// `O_RDONLY|O_EXCL` open: for a block device the kernel refuses it with EBUSY
/// while the device is mounted, held by dm/md, or opened exclusively by anyone.
/// Read-only, so closing it triggers no udev re-probe.
pub fn try_exclusive(path: &Path) -> Exclusive {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    match open(
        path,
        OFlag::O_RDONLY | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => {
            drop(fd);
            Exclusive::Free
        }
        Err(nix::errno::Errno::EBUSY) => Exclusive::Busy,
        Err(e) => Exclusive::Failed {
            error: format!("{}: {e}", path.display()),
        },
    }
}

/// Runs a read of a device on a thread of its own and waits for it at most
/// `timeout`: a read from a dead device can block for ever, and must not take
/// the agent with it (the thread is left to finish or hang alone). `None`
/// when the deadline passed.
fn with_deadline<T: Send + 'static>(
    timeout: Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read());
    });
    rx.recv_timeout(timeout).ok()
}

/// Devices with a read started by [`one_read_within`] that has not returned.
static READING: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Runs `read` of `dev` on a thread with a deadline, unless the last read
/// of `dev` has not returned yet: one stuck thread (and one open
/// descriptor) per dead disk however many passes run, and no pass waits
/// for it twice.
pub fn one_read_within<T: Send + 'static>(
    dev: &Path,
    deadline: Duration,
    read: impl FnOnce() -> Option<T> + Send + 'static,
) -> Option<T> {
    let key = dev.to_path_buf();
    let first = READING.lock().is_ok_and(|mut r| r.insert(key.clone()));
    if !first {
        return None;
    }
    with_deadline(deadline, move || {
        let out = read();
        if let Ok(mut r) = READING.lock() {
            r.remove(&key);
        }
        out
    })
    .flatten()
}

/// Where the signatures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signatures {
    /// libblkid in this process (`host::blkid`), the default.
    Libblkid,
    /// `wipefs --no-act --json` run as this program: a process per probe.
    Wipefs(String),
}

impl Signatures {
    /// Reads the signatures of `dev` within `timeout`: a read of a dead
    /// device that does not return fails the probe (in-process, its thread
    /// is left to hang alone and the device is not read again until it
    /// returns; a `wipefs` is killed).
    pub fn read(&self, dev: &Path, timeout: Duration) -> Result<Vec<Signature>, String> {
        match self {
            Signatures::Libblkid => {
                let path = dev.to_path_buf();
                one_read_within(dev, timeout, move || Some(super::blkid::signatures(&path)))
                    .unwrap_or_else(|| {
                        Err(format!(
                            "reading the signatures of {} did not finish within {timeout:?} (or an earlier read of it still hangs)",
                            dev.display()
                        ))
                    })
            }
            Signatures::Wipefs(prog) => Cmd::new(prog)
                .arg("--no-act")
                .arg("--json")
                .arg(dev)
                .timeout(timeout)
                .output()
                .map_err(|e| e.to_string())
                .and_then(|t| parse_wipefs(&t).map_err(|e| e.to_string())),
        }
    }
}

/// The real prober.
#[derive(Debug, Clone)]
pub struct BlkidProber {
    pub signatures: Signatures,
    pub timeout: Duration,
}

impl Default for BlkidProber {
    fn default() -> Self {
        BlkidProber {
            signatures: Signatures::Libblkid,
            timeout: Duration::from_secs(30),
        }
    }
}

impl BlkidProber {
    /// The prober that reads signatures with the `wipefs` program.
    pub fn wipefs(prog: &str) -> Self {
        BlkidProber {
            signatures: Signatures::Wipefs(prog.into()),
            ..BlkidProber::default()
        }
    }
}

impl Prober for BlkidProber {
    fn probe(&self, dev: &Device) -> Probe {
        if dev.size_bytes == 0 {
            return Probe::NotProbed;
        }
        let mut signatures = match self.signatures.read(&dev.devnode, self.timeout) {
            Ok(s) => s,
            Err(error) => return Probe::Failed { error },
        };
        // wipefs does not say whether an xfs was ever finished; its
        // superblock does. Unread, it counts as finished (and a mount of it
        // fails, which is reported).
        for s in signatures
            .iter_mut()
            .filter(|s| s.kind == "xfs" && s.offset == 0)
        {
            let path = dev.devnode.clone();
            s.in_progress = one_read_within(&dev.devnode, self.timeout, move || {
                xfs_in_progress(&path).ok()
            })
            .unwrap_or(false);
        }
        let zeroed = if signatures.is_empty() {
            let (path, size) = (dev.devnode.clone(), dev.size_bytes);
            match one_read_within(&dev.devnode, self.timeout, move || {
                Some(ends_are_zero(&path, size))
            }) {
                Some(Ok(z)) => Some(z),
                Some(Err(e)) => {
                    return Probe::Failed {
                        error: format!("reading {}: {e}", dev.devnode.display()),
                    }
                }
                None => {
                    return Probe::Failed {
                        error: format!(
                            "reading {} did not finish within {:?} (or an earlier read of it still hangs)",
                            dev.devnode.display(),
                            self.timeout
                        ),
                    }
                }
            }
        } else {
            None
        };
        Probe::Done { signatures, zeroed }
    }

    fn exclusive(&self, dev: &Device) -> Exclusive {
        try_exclusive(&dev.devnode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_that_hangs_is_not_started_again_until_it_returns() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dev = Path::new("/dev/disklet-test-hanging");
        let started = Arc::new(AtomicUsize::new(0));
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let s = started.clone();
        let r = one_read_within(dev, Duration::from_millis(20), move || {
            s.fetch_add(1, Ordering::SeqCst);
            hung.recv().ok().map(|_| 1u64)
        });
        assert_eq!(r, None, "past the deadline");
        let s = started.clone();
        let r = one_read_within(dev, Duration::from_secs(5), move || {
            s.fetch_add(1, Ordering::SeqCst);
            Some(2u64)
        });
        assert_eq!(r, None, "still hanging: not read again");
        assert_eq!(started.load(Ordering::SeqCst), 1, "no second thread");
        release.send(()).unwrap();
        // The hung read returns on its thread; then the device is read again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while READING.lock().unwrap().contains(dev) {
            assert!(std::time::Instant::now() < deadline, "never returned");
            std::thread::yield_now();
        }
        let r = one_read_within(dev, Duration::from_secs(5), || Some(3u64));
        assert_eq!(r, Some(3));
    }

    #[test]
    fn parses_wipefs_json() {
        let s = parse_wipefs(include_str!("../../tests/fixtures/wipefs-gpt-ext4.json")).unwrap();
        let kinds: Vec<&str> = s.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["ext4", "gpt", "gpt", "PMBR"]);
        assert_eq!(s[0].offset, 0x438);
        assert_eq!(
            s[0].uuid.as_deref(),
            Some("c0cffb20-4165-4e5d-b102-fd88a3caea52")
        );
        assert_eq!(s[0].label.as_deref(), Some("disklet"));
        assert_eq!(s[2].offset, 0x13fffe00);
        assert_eq!(s[1].uuid, None);
    }

    #[test]
    fn empty_output_means_blank() {
        assert_eq!(parse_wipefs("").unwrap(), vec![]);
        assert_eq!(
            parse_wipefs("{\n \"signatures\": [\n\n ]\n}\n").unwrap(),
            vec![]
        );
    }

    #[test]
    fn odd_output_is_an_error_not_blank() {
        assert!(parse_wipefs("garbage").is_err());
        let e = parse_wipefs(r#"{"signatures":[{"offset":"zz","type":"xfs"}]}"#).unwrap_err();
        assert!(e.to_string().contains("zz"));
    }

    #[test]
    fn zero_check_sees_data_at_either_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let size = 4 * ZERO_CHECK_BYTES;
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        assert!(ends_are_zero(&p, size).unwrap());
        f.write_all_at(b"x", size - 1).unwrap();
        assert!(!ends_are_zero(&p, size).unwrap(), "last byte");
        f.write_all_at(b"\0", size - 1).unwrap();
        f.write_all_at(b"x", 17).unwrap();
        assert!(!ends_are_zero(&p, size).unwrap(), "head");
        f.write_all_at(b"\0", 17).unwrap();
        f.write_all_at(b"x", 2 * ZERO_CHECK_BYTES).unwrap();
        assert!(
            ends_are_zero(&p, size).unwrap(),
            "the middle is not checked"
        );
        let mut small = File::create(dir.path().join("small")).unwrap();
        small.write_all(&[0; 100]).unwrap();
        assert!(ends_are_zero(&dir.path().join("small"), 100).unwrap());
    }
}
