//! Formatting, the most dangerous thing disklet does, behind the interlocks of
//! DESIGN.md §3.2: exclusive `flock` on the device node, a fresh observation
//! and a fresh eligibility decision, a fingerprint compared with what the plan
//! saw, and an `O_EXCL` test — all immediately before `mkfs`, which itself
//! opens the device exclusively and refuses to overwrite a filesystem (no
//! `-f`/`-F` is ever passed).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::config::FsType;
use crate::host::{BlockDevices, Cmd, CmdError, HostError, HostTables, Prober};
use crate::model::{unfinished_mkfs, Device, Fingerprint, Inventory, OWNER_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{device}: another process holds the device lock (udev or another tool is working on it); will retry")]
    Locked { device: String },
    #[error("{device}: cannot open for locking: {source}")]
    Open {
        device: String,
        source: nix::errno::Errno,
    },
    #[error("{device}: cannot drop its page cache before the last look (BLKFLSBUF): {source}; not formatting")]
    Flush {
        device: String,
        source: nix::errno::Errno,
    },
    #[error("{device}: device-changed: {what}; not formatting")]
    DeviceChanged { device: String, what: String },
    #[error("{device}: no longer eligible ({verdict}: {detail}); not formatting")]
    NotEligible {
        device: String,
        verdict: String,
        detail: String,
    },
    #[error("{device}: re-observation failed: {source}")]
    Observe { device: String, source: HostError },
    #[error("{device}: mkfs failed: {source}")]
    Mkfs { device: String, source: CmdError },
    #[error(
        "{device}: cannot erase the remains of disklet's unfinished mkfs: {what}; not formatting"
    )]
    Erase { device: String, what: String },
    #[error("{device}: cannot record the start of mkfs ({what}); not formatting (hostDir must be writable)")]
    Record { device: String, what: String },
}

impl FormatError {
    /// Short stable label for metrics, Events and backoff.
    pub fn kind(&self) -> &'static str {
        match self {
            FormatError::Locked { .. } => "locked",
            FormatError::Open { .. } => "open",
            FormatError::Flush { .. } => "flush",
            FormatError::DeviceChanged { .. } => "device-changed",
            FormatError::NotEligible { .. } => "not-eligible",
            FormatError::Observe { .. } => "observe",
            FormatError::Mkfs { .. } => "mkfs",
            FormatError::Erase { .. } => "erase",
            FormatError::Record { .. } => "record",
        }
    }
}

/// Runs mkfs. The real one shells out; the fake records.
pub trait Formatter: Send + Sync {
    fn mkfs(&self, dev: &Path, fs: FsType, uuid: &str) -> Result<(), CmdError>;
}

/// `mkfs.xfs` / `mkfs.ext4` with our label and a fresh UUID, never forced.
#[derive(Debug, Clone)]
pub struct MkfsFormatter {
    pub timeout: Duration,
}

impl Default for MkfsFormatter {
    fn default() -> Self {
        MkfsFormatter {
            timeout: Duration::from_secs(3600),
        }
    }
}

/// The mkfs command line for a filesystem type (no force flag, ever).
pub fn mkfs_command(dev: &Path, fs: FsType, uuid: &str) -> Cmd {
    match fs {
        // -K: no discard on a disk that is already blank, so hot-add stays fast.
        FsType::Xfs => Cmd::new("mkfs.xfs")
            .arg("-q")
            .arg("-K")
            .arg("-L")
            .arg(OWNER_LABEL)
            .arg("-m")
            .arg(format!("uuid={uuid}"))
            .arg(dev),
        FsType::Ext4 => Cmd::new("mkfs.ext4")
            .arg("-q")
            .arg("-L")
            .arg(OWNER_LABEL)
            .arg("-U")
            .arg(uuid)
            .arg("-E")
            .arg("nodiscard")
            .arg(dev),
    }
}

/// How long the last look before mkfs may read the device.
const LAST_LOOK_DEADLINE: Duration = Duration::from_secs(30);

impl Formatter for MkfsFormatter {
    /// Refuses, by itself, a device that carries any signature: mkfs.xfs does
    /// without `-f`, but mke2fs overwrites silently whenever stdin is not a
    /// terminal (found by `tests/format_safety.rs`), so the last look is ours.
    fn mkfs(&self, dev: &Path, fs: FsType, uuid: &str) -> Result<(), CmdError> {
        let found = crate::host::probe::Signatures::Libblkid
            .read(dev, LAST_LOOK_DEADLINE)
            .map_err(|e| CmdError::Failed {
                cmd: mkfs_command(dev, fs, uuid).display(),
                status: "not run: the last probe failed".into(),
                stderr: e,
            })?;
        if let Some(sig) = found.first() {
            return Err(CmdError::Failed {
                cmd: mkfs_command(dev, fs, uuid).display(),
                status: "not run".into(),
                stderr: format!(
                    "{} carries a {} signature; disklet never formats over one",
                    dev.display(),
                    sig.kind
                ),
            });
        }
        mkfs_command(dev, fs, uuid)
            .timeout(self.timeout)
            .output()
            .map(|_| ())
    }
}

/// A formatter that records calls and formats nothing.
#[derive(Debug, Default)]
pub struct RecordingFormatter {
    pub calls: Mutex<Vec<(std::path::PathBuf, FsType, String)>>,
}

impl RecordingFormatter {
    pub fn calls(&self) -> Vec<(std::path::PathBuf, FsType, String)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Formatter for RecordingFormatter {
    fn mkfs(&self, dev: &Path, fs: FsType, uuid: &str) -> Result<(), CmdError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push((dev.to_path_buf(), fs, uuid.to_string()));
        }
        Ok(())
    }
}

/// Everything the interlock needs to observe the host afresh.
pub struct Host<'a> {
    pub devices: &'a dyn BlockDevices,
    pub prober: &'a dyn Prober,
    pub tables: &'a dyn HostTables,
}

/// What the plan asked to format.
pub struct FormatRequest<'a> {
    /// Kernel name, e.g. `sdb`.
    pub device: &'a str,
    /// The listing the plan was made from: other devices whose medium has
    /// not changed since are taken from it ([`BlockDevices::relist`]), so a
    /// batch of formats costs one sysfs read per device each, not a full
    /// listing (200 blank disks: 200 listings of 200 devices before). The
    /// device itself, the mount table and the swaps are always read afresh.
    pub seen: &'a [Device],
    /// What the plan saw of the device.
    pub planned: &'a Fingerprint,
    pub fs: FsType,
    /// Where the format records go (`host::intents`).
    pub host_dir: &'a Path,
}

/// Why the decision made again refused: the verdict and its detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEligible {
    pub verdict: String,
    pub detail: String,
}

/// The eligibility decision, made again by the caller on the fresh
/// observation (the device, as just probed, and the node): the rules are the
/// plan's, not this layer's.
pub type Recheck<'a> = &'a dyn Fn(&Device, &Inventory) -> Result<(), NotEligible>;

/// Formats `req.device` only if, under an exclusive flock, a fresh
/// observation still shows the planned fingerprint and `recheck` still finds
/// it eligible. Returns the new filesystem UUID.
pub fn format_safely(
    req: &FormatRequest<'_>,
    host: &Host<'_>,
    formatter: &dyn Formatter,
    recheck: Recheck<'_>,
) -> Result<String, FormatError> {
    let device = req.device;
    let devnode = Path::new("/dev").join(device);
    // 1. The lock udev and util-linux honour (see systemd's "Locking Block
    //    Device Access"): while we hold it, udevd does not probe the device.
    let lock = lock_device(device, &devnode)?;
    // 2. Observe again, past this host's page cache: what was written to
    //    the disk by another way (another host on a shared disk, a loop's
    //    backing file) is not in it, and a probe served from it would
    //    read the old blank blocks.
    drop_page_cache(device, &*lock)?;
    let (inv, idx) = observe_again(req, host)?;
    let dev = &inv.devices[idx];
    // 3. The fingerprint must be what the plan saw.
    let now = Fingerprint::of(dev, &inv);
    if &now != req.planned {
        return Err(FormatError::DeviceChanged {
            device: device.into(),
            what: diff(req.planned, &now),
        });
    }
    // 4. And the decision, made again on fresh data, must still say so.
    recheck(dev, &inv).map_err(|n| FormatError::NotEligible {
        device: device.into(),
        verdict: n.verdict,
        detail: n.detail,
    })?;
    // 5. The only signature an eligible disk may carry is the remains of a
    //    mkfs of ours that never finished, whose start disklet recorded;
    //    mkfs overwrites no signature, so they are erased first, still under
    //    the lock.
    erase_remains(dev, &devnode)?;
    // 6. mkfs, still under the lock. It opens the device O_EXCL itself.
    crate::failpoint::hit("format-after-lock");
    let uuid = uuid::Uuid::new_v4().to_string();
    mkfs_recorded(
        formatter,
        req.host_dir,
        &devnode,
        req.fs,
        &uuid,
        &dev.intent_key(),
    )?;
    crate::failpoint::hit("format-after-mkfs");
    drop(lock);
    Ok(uuid)
}

mod ioctls {
    // BLKFLSBUF = _IO(0x12, 97): writes back and drops the device's cache.
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
}

/// Writes back and drops the page cache of the device open as `fd`, so that
/// the next read comes from the medium.
fn drop_page_cache(device: &str, fd: &impl std::os::fd::AsRawFd) -> Result<(), FormatError> {
    // SAFETY: BLKFLSBUF takes no argument; `fd` is an open block device
    // (the flocked descriptor) for the duration of the call.
    unsafe { ioctls::blkflsbuf(fd.as_raw_fd()) }.map_err(|source| FormatError::Flush {
        device: device.into(),
        source,
    })?;
    Ok(())
}

/// The exclusive flock on the device node, not waited for.
fn lock_device(
    device: &str,
    devnode: &Path,
) -> Result<nix::fcntl::Flock<std::os::fd::OwnedFd>, FormatError> {
    use nix::fcntl::{open, Flock, FlockArg, OFlag};
    let fd = open(
        devnode,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| FormatError::Open {
        device: device.into(),
        source,
    })?;
    Flock::lock(fd, FlockArg::LockExclusiveNonblock).map_err(|_| FormatError::Locked {
        device: device.into(),
    })
}

/// The device (probed, its exclusive open tried), every device that is new
/// or changed medium, the mount table and the swaps, read afresh; with the
/// device's index.
fn observe_again(
    req: &FormatRequest<'_>,
    host: &Host<'_>,
) -> Result<(Inventory, usize), FormatError> {
    let device = req.device;
    let observe = |e| FormatError::Observe {
        device: device.into(),
        source: e,
    };
    let mut inv = Inventory {
        devices: host.devices.relist(req.seen, device).map_err(observe)?,
        mounts: host.tables.mounts().map_err(observe)?,
        swaps: host.tables.swaps().map_err(observe)?,
    };
    let Some(idx) = inv.devices.iter().position(|d| d.name == device) else {
        return Err(FormatError::DeviceChanged {
            device: device.into(),
            what: "the device is gone".into(),
        });
    };
    let probe = host.prober.probe(&inv.devices[idx]);
    inv.devices[idx].probe = probe;
    let exclusive = host.prober.exclusive(&inv.devices[idx]);
    inv.devices[idx].exclusive = exclusive;
    Ok((inv, idx))
}

/// Erases the remains of disklet's own unfinished mkfs, and refuses any
/// other signature.
fn erase_remains(dev: &Device, devnode: &Path) -> Result<(), FormatError> {
    let sigs = dev.signatures();
    if sigs.is_empty() {
        return Ok(());
    }
    let Some(old) = unfinished_mkfs(sigs).and_then(|s| s.uuid.as_deref()) else {
        return Err(FormatError::NotEligible {
            device: dev.name.clone(),
            verdict: "eligible with signatures".into(),
            detail: format!("{sigs:?}"),
        });
    };
    erase_unfinished_mkfs(devnode, dev.size_bytes, old).map_err(|what| FormatError::Erase {
        device: dev.name.clone(),
        what,
    })
}

/// mkfs of filesystem `uuid` on `devnode`, its start recorded under hostDir
/// first (`host::intents`), and every record of this disk removed once mkfs
/// returned (an older one names remains that are gone now: the disk was
/// blank or erased, and is held by this mkfs). A record left behind names a
/// mkfs that was cut short, the one case in which disklet formats a disk
/// carrying a signature (its own unfinished xfs) again. Call it only while
/// holding the disk, as the format and the cleanup do.
pub fn mkfs_recorded(
    formatter: &dyn Formatter,
    host_dir: &Path,
    devnode: &Path,
    fs: FsType,
    uuid: &str,
    device_key: &str,
) -> Result<(), FormatError> {
    let device = devnode.display().to_string();
    crate::host::intents::record(host_dir, uuid, device_key).map_err(|e| FormatError::Record {
        device: device.clone(),
        what: format!(
            "{}: {e}",
            crate::host::intents::dir(host_dir).join(uuid).display()
        ),
    })?;
    crate::failpoint::hit("format-after-record");
    let made = formatter.mkfs(devnode, fs, uuid);
    for stale in crate::host::intents::read(host_dir)
        .into_iter()
        .filter(|i| i.device_key == device_key)
    {
        if let Err(e) = crate::host::intents::clear(host_dir, &stale.uuid) {
            // Left behind, it can only ever match an unfinished xfs with
            // this UUID on this disk, which only disklet's own mkfs makes.
            tracing::warn!(device, uuid = stale.uuid, error = %e, "cannot remove a format record");
        }
    }
    made.map_err(|source| FormatError::Mkfs { device, source })
}

/// Erases what an unfinished mkfs.xfs of ours left: the first and last MiB
/// (the superblock with it), so that a kill right after this leaves a disk
/// that is blank by every check. Through one `O_EXCL` descriptor (no mount,
/// no holder, no other exclusive opener such as a mkfs still running from a
/// killed agent), and only after reading, through that descriptor, that the
/// superblock is still an xfs labelled `disklet`, marked in progress, with
/// the UUID `uuid` (the one disklet recorded starting).
pub fn erase_unfinished_mkfs(devnode: &Path, size: u64, uuid: &str) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXCL | nix::libc::O_CLOEXEC)
        .open(devnode)
        .map_err(|e| format!("open {} exclusively: {e}", devnode.display()))?;
    let sb = crate::host::probe::read_xfs_sb(&f)
        .map_err(|e| format!("read {}: {e}", devnode.display()))?;
    // sb_fname: 12 bytes at offset 108, NUL-padded.
    let label = &sb[108..120];
    let ours = label.starts_with(OWNER_LABEL.as_bytes())
        && label[OWNER_LABEL.len()..].iter().all(|b| *b == 0);
    // sb_uuid: 16 bytes at offset 32.
    let same_uuid = uuid::Uuid::parse_str(uuid).is_ok_and(|u| sb[32..48] == *u.as_bytes());
    if !crate::host::probe::xfs_sb_in_progress(&sb) || !ours || !same_uuid {
        return Err(format!(
            "{} no longer holds the unfinished xfs {uuid} labelled {OWNER_LABEL}",
            devnode.display()
        ));
    }
    let n = crate::host::probe::ZERO_CHECK_BYTES.min(size);
    let zeros = vec![0u8; usize::try_from(n).unwrap_or(0)];
    for off in [0, size.saturating_sub(n)] {
        f.write_all_at(&zeros, off)
            .map_err(|e| format!("write {}: {e}", devnode.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("sync {}: {e}", devnode.display()))
}

fn diff(a: &Fingerprint, b: &Fingerprint) -> String {
    let (Ok(a), Ok(b)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return "fingerprint differs".into();
    };
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                out.push(format!(
                    "{k} was {va}, now {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                ));
            }
        }
    }
    out.join("; ")
}
