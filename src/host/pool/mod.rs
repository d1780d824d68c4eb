//! Pool volumes, the backend of the CSI mode (DESIGN.md, "The CSI pool
//! backend", says why this one): a pool is a disklet-owned XFS filesystem
//! (reflink on) on a disk the pool class took under every safety rule; each
//! volume is one file in it.
//!
//! - A volume is created fully allocated (`fallocate`): its space is
//!   reserved, so capacity is what the filesystem says is free and a tenant
//!   never meets ENOSPC, and its extents are *unwritten*: XFS reads them as
//!   zeroes, never as the blocks' previous contents.
//! - It is attached as a loop device with direct I/O (`losetup`), found again
//!   after a restart by its backing file in sysfs.
//! - Snapshots and clones are reflink copies (`FICLONE`): O(1), sharing
//!   extents until either side writes. What writes to shared extents may
//!   come to need is held back from the capacity (FIEMAP's shared bytes of
//!   each volume).
//! - Growth: `fallocate` of the new size, then `LOOP_SET_CAPACITY`.
//! - Deletion punches every extent out of the file, then unlinks it: the
//!   blocks go back to the filesystem, which never hands them to another file
//!   with their old contents.
//!
//! This module carries the steps out; whether a volume may be deleted or
//! detached (a pod still using it) is decided above it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::host::{Cmd, CmdError};

mod fiemap;
mod meta;
use fiemap::shared_bytes;

mod ioctls {
    // FICLONE = _IOW(0x94, 9, int): the argument is the source's fd.
    nix::ioctl_write_int!(ficlone, 0x94, 9);
    // LOOP_SET_CAPACITY = 0x4C07: re-reads the backing file's size.
    nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
}

/// Names of volumes and snapshots: what CSI calls them, kept to characters
/// that are safe as one path component.
const MAX_ID: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{id:?} is not a valid volume or snapshot name: use 1 to {MAX_ID} of a-z, A-Z, 0-9, '-', '_' and '.', not starting with '.'")]
    BadId { id: String },
    #[error("{what} {id} already exists with size {have} (asked {want})")]
    Exists {
        what: &'static str,
        id: String,
        have: u64,
        want: u64,
    },
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    #[error("the pool has {available} bytes available, {need} asked")]
    NoSpace { need: u64, available: u64 },
    #[error("a volume cannot shrink: {id} is {have} bytes, {want} asked")]
    Shrink { id: String, have: u64, want: u64 },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{id} is attached as {} and still open (mounted, mapped or held by a process): not destroyed", dev.display())]
    InUse { id: String, dev: PathBuf },
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn errno<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::errno::Errno) -> PoolError + 'a {
    move |e| PoolError::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// What the pool can give out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The filesystem's size for data.
    pub total: u64,
    /// Free in the filesystem, minus what reflink copies may come to need.
    pub available: u64,
    /// The sizes of the volumes and snapshots.
    pub provisioned: u64,
}

/// A volume or snapshot file and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub size: u64,
    pub path: PathBuf,
}

/// Where a new volume's contents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    Empty,
    Volume(&'a str),
    Snapshot(&'a str),
}

/// One pool: `<mount point>/pool/{volumes,snapshots}` on a mounted,
/// disklet-owned XFS filesystem.
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
}

/// The two kinds of file a pool holds, each in its own directory.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

fn check_id(id: &str) -> Result<(), PoolError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PoolError::BadId { id: id.to_string() })
    }
}

impl Pool {
    /// The pool on the filesystem mounted at `mount_point` (creating its
    /// directories on first use).
    pub fn open(mount_point: &Path) -> Result<Pool, PoolError> {
        let root = mount_point.join("pool");
        for kind in [Kind::Volume, Kind::Snapshot] {
            let p = root.join(kind.dir());
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        Ok(Pool { root })
    }

    fn path(&self, kind: Kind, id: &str) -> Result<PathBuf, PoolError> {
        check_id(id)?;
        Ok(self.root.join(kind.dir()).join(id))
    }

    pub fn volume_path(&self, id: &str) -> Result<PathBuf, PoolError> {
        self.path(Kind::Volume, id)
    }

    fn entries(&self, kind: Kind) -> Result<Vec<Entry>, PoolError> {
        let d = self.root.join(kind.dir());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&d).map_err(io("read", &d))? {
            let e = e.map_err(io("read", &d))?;
            let meta = e.metadata().map_err(io("stat", &e.path()))?;
            let id = e.file_name().to_string_lossy().into_owned();
            // Temporaries of an interrupted create start with '.'.
            if meta.is_file() && check_id(&id).is_ok() {
                out.push(Entry {
                    id,
                    size: meta.len(),
                    path: e.path(),
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn volumes(&self) -> Result<Vec<Entry>, PoolError> {
        self.entries(Kind::Volume)
    }

    pub fn snapshots(&self) -> Result<Vec<Entry>, PoolError> {
        self.entries(Kind::Snapshot)
    }

    fn find(&self, kind: Kind, id: &str) -> Result<Option<Entry>, PoolError> {
        let path = self.path(kind, id)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => Err(io("open", &path)(std::io::Error::other(
                "not a regular file: the pool holds only disklet's own files",
            ))),
            Ok(m) => Ok(Some(Entry {
                id: id.to_string(),
                size: m.len(),
                path,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("stat", &path)(e)),
        }
    }

    /// Like `find`, where a missing one is an error.
    fn require(&self, kind: Kind, id: &str) -> Result<Entry, PoolError> {
        self.find(kind, id)?.ok_or_else(|| PoolError::NotFound {
            what: kind.what(),
            id: id.to_string(),
        })
    }

    pub fn volume(&self, id: &str) -> Result<Option<Entry>, PoolError> {
        self.find(Kind::Volume, id)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<Entry>, PoolError> {
        self.find(Kind::Snapshot, id)
    }

    /// Total, provisioned and available space. Volumes are fully
    /// allocated, so the filesystem's free space is what is left, less what
    /// writes to shared extents (a volume with a snapshot, a clone) may come
    /// to need: each volume's shared bytes, read with FIEMAP. Snapshots are
    /// never written, so they need nothing more.
    pub fn capacity(&self) -> Result<Capacity, PoolError> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(errno("statvfs", &self.root))?;
        let frag = st.fragment_size() as u64;
        let total = st.blocks() as u64 * frag;
        let free = st.blocks_available() as u64 * frag;
        let mut provisioned = 0;
        let mut shared = 0;
        for e in self.volumes()? {
            provisioned += e.size;
            shared += shared_bytes(&e.path)?;
        }
        for e in self.snapshots()? {
            provisioned += e.size;
        }
        Ok(Capacity {
            total,
            available: free.saturating_sub(shared),
            provisioned,
        })
    }

    /// Refuses `need` bytes more than the capacity has available.
    fn ensure_room(&self, need: u64) -> Result<(), PoolError> {
        let available = self.capacity()?.available;
        if need > available {
            return Err(PoolError::NoSpace { need, available });
        }
        Ok(())
    }

    /// Creates volume `id` of `size` bytes from `source`. Idempotent: a
    /// volume of that name and size is returned as it is.
    pub fn create_volume(
        &self,
        id: &str,
        size: u64,
        source: Source<'_>,
    ) -> Result<Entry, PoolError> {
        if let Some(e) = self.volume(id)? {
            return same_size(Kind::Volume, e, size);
        }
        let from = match source {
            Source::Empty => None,
            Source::Volume(v) => Some(self.require(Kind::Volume, v)?),
            Source::Snapshot(s) => Some(self.require(Kind::Snapshot, s)?),
        };
        // New: allocated now. A copy: shares its extents, and may come to
        // need its size as they are written.
        self.ensure_room(size)?;
        let path = self.volume_path(id)?;
        match from {
            None => self.make(&path, |f, p| allocate(f, p, 0, size)),
            // Reflink shares the written extents only; the rest (the
            // source's holes and unwritten extents, any growth) is
            // allocated here, so the copy is fully allocated like any
            // volume and its first write to those ranges reads zeroes.
            Some(src) => self.make(&path, |f, p| {
                reflink(&src.path, f, p)?;
                allocate(f, p, 0, size)
            }),
        }?;
        self.require(Kind::Volume, id)
    }

    /// Snapshot `id` of volume `volume`: a reflink copy. Idempotent for the
    /// same name and volume size.
    pub fn create_snapshot(&self, id: &str, volume: &str) -> Result<Entry, PoolError> {
        let src = self.require(Kind::Volume, volume)?;
        if let Some(e) = self.snapshot(id)? {
            return same_size(Kind::Snapshot, e, src.size);
        }
        self.ensure_room(src.size)?;
        let path = self.path(Kind::Snapshot, id)?;
        self.make(&path, |f, p| {
            reflink(&src.path, f, p)?;
            meta::set_source(f, p, volume)
        })?;
        self.require(Kind::Snapshot, id)
    }

    /// The volume snapshot `id` was taken of, as recorded with it.
    pub fn snapshot_source(&self, id: &str) -> Result<Option<String>, PoolError> {
        let e = self.require(Kind::Snapshot, id)?;
        meta::source(&e.path)
    }

    /// Writes the file under a temporary name, syncs it, then renames it
    /// into place: a crash leaves either nothing or a whole file.
    fn make(
        &self,
        path: &Path,
        fill: impl FnOnce(&File, &Path) -> Result<(), PoolError>,
    ) -> Result<(), PoolError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{}.new", name.unwrap_or_default()));
        let _ = std::fs::remove_file(&tmp);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let done = fill(&f, &tmp).and_then(|()| f.sync_all().map_err(io("sync", &tmp)));
        if let Err(e) = done {
            let _ = destroy(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
        sync_dir(path)
    }

    /// Grows volume `id` to `size` (a no-op at its size or an equal one);
    /// an attached loop device is told at once.
    pub fn expand_volume(&self, id: &str, size: u64) -> Result<Entry, PoolError> {
        let e = self.require(Kind::Volume, id)?;
        if size < e.size {
            return Err(PoolError::Shrink {
                id: id.to_string(),
                have: e.size,
                want: size,
            });
        }
        if size > e.size {
            self.ensure_room(size - e.size)?;
            let f = OpenOptions::new()
                .write(true)
                .open(&e.path)
                .map_err(io("open", &e.path))?;
            allocate(&f, &e.path, e.size, size - e.size)?;
            f.sync_all().map_err(io("sync", &e.path))?;
            if let Some(dev) = attached(&e.path) {
                set_capacity(&dev)?;
            }
        }
        self.require(Kind::Volume, id)
    }

    /// Destroys volume `id` (idempotent: a missing one is done). An attached
    /// loop device is detached first, unless anything holds it open.
    pub fn delete_volume(&self, id: &str) -> Result<(), PoolError> {
        self.delete(Kind::Volume, id)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), PoolError> {
        self.delete(Kind::Snapshot, id)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<(), PoolError> {
        let Some(e) = self.find(kind, id)? else {
            return Ok(());
        };
        if let Some(dev) = attached(&e.path) {
            // The kernel's answer, right before the step: a loop device
            // anything holds open is never detached under it.
            if in_use(&dev) {
                return Err(PoolError::InUse {
                    id: id.to_string(),
                    dev,
                });
            }
            detach(&dev)?;
            // The kernel detaches a loop device anything still has open
            // only when the last user closes it (autoclear, which finishes
            // after losetup's own close returns): until then the file is in
            // use, and stays whole.
            if !detached_within(&e.path, DETACH_WAIT) {
                return Err(PoolError::InUse {
                    id: id.to_string(),
                    dev,
                });
            }
        }
        destroy(&e.path)
    }
}

fn same_size(kind: Kind, e: Entry, want: u64) -> Result<Entry, PoolError> {
    if e.size == want {
        Ok(e)
    } else {
        Err(PoolError::Exists {
            what: kind.what(),
            id: e.id,
            have: e.size,
            want,
        })
    }
}

/// Reserves `len` bytes from `offset` as unwritten extents (they read as
/// zeroes) and extends the file to cover them.
fn allocate(f: &File, path: &Path, offset: u64, len: u64) -> Result<(), PoolError> {
    let off = i64::try_from(offset).map_err(|e| io("allocate", path)(std::io::Error::other(e)))?;
    let len = i64::try_from(len).map_err(|e| io("allocate", path)(std::io::Error::other(e)))?;
    fallocate(f, FallocateFlags::empty(), off, len).map_err(|e| match e {
        nix::errno::Errno::ENOSPC => PoolError::NoSpace {
            need: len as u64,
            available: 0,
        },
        e => errno("allocate", path)(e),
    })
}

/// Makes `dst` share every extent of `src` (O(1) on XFS with reflink).
fn reflink(src: &Path, dst: &File, dst_path: &Path) -> Result<(), PoolError> {
    let s = File::open(src).map_err(io("open", src))?;
    // SAFETY: both fds are open for the duration of the call; FICLONE takes
    // the source fd by value and touches no memory of ours.
    unsafe { ioctls::ficlone(dst.as_raw_fd(), s.as_raw_fd() as _) }
        .map_err(errno("reflink (FICLONE) into", dst_path))?;
    Ok(())
}

/// Punches every extent out of the file, then unlinks it.
fn destroy(path: &Path) -> Result<(), PoolError> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io("open", path))?;
    let len = f.metadata().map_err(io("stat", path))?.len();
    if len > 0 {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let l = i64::try_from(len).map_err(|e| io("punch", path)(std::io::Error::other(e)))?;
        fallocate(&f, flags, 0, l).map_err(errno("punch", path))?;
        f.sync_all().map_err(io("sync", path))?;
    }
    drop(f);
    std::fs::remove_file(path).map_err(io("unlink", path))?;
    sync_dir(path)
}

/// Makes a rename or unlink in `path`'s directory durable (a reboot right
/// after it must not bring back the old name).
fn sync_dir(path: &Path) -> Result<(), PoolError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// The bytes of a volume file that were ever written: zero for a volume
/// no tenant has written to (its extents all unwritten).
pub fn written_bytes(file: &Path) -> Result<u64, PoolError> {
    fiemap::written_bytes(file)
}

/// The loop device `file` is attached to, by the kernel's record of each
/// loop device's backing file.
pub fn attached(file: &Path) -> Option<PathBuf> {
    let want = std::fs::canonicalize(file).ok()?;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("loop"))
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let backing = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
        (Path::new(backing.trim_end_matches('\n')) == want)
            .then(|| PathBuf::from(format!("/dev/{n}")))
    })
}

/// Attaches `file` as a loop device with direct I/O, or returns the one it
/// is already attached to (after a restart, say).
pub fn attach(file: &Path) -> Result<PathBuf, PoolError> {
    if let Some(dev) = attached(file) {
        return Ok(dev);
    }
    let out = Cmd::new("losetup")
        .arg("--find")
        .arg("--show")
        .arg("--direct-io=on")
        // Always 4 KiB sectors, whatever the kernel would pick for this
        // attach: a filesystem made on one attach must mount on the next.
        .arg("--sector-size=4096")
        .arg("--nooverlap")
        .arg(file.as_os_str())
        .output()?;
    Ok(PathBuf::from(out.trim()))
}

pub fn detach(dev: &Path) -> Result<(), PoolError> {
    Cmd::new("losetup")
        .arg("--detach")
        .arg(dev.as_os_str())
        .output()?;
    Ok(())
}

/// How long a delete waits for the kernel to finish detaching a loop
/// device nothing holds open.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `file` is no longer attached, waiting up to `wait` for the
/// kernel's deferred clear.
fn detached_within(file: &Path, wait: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if attached(file).is_none() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Tells an attached loop device its backing file's new size.
pub fn set_capacity(dev: &Path) -> Result<(), PoolError> {
    let f = File::open(dev).map_err(io("open", dev))?;
    // SAFETY: the fd is open for the call; LOOP_SET_CAPACITY takes no
    // argument.
    unsafe { ioctls::loop_set_capacity(f.as_raw_fd()) }.map_err(errno("LOOP_SET_CAPACITY", dev))?;
    Ok(())
}

/// Whether the loop device is open by anyone (a mount, kubelet's mapping, a
/// process): the kernel's own answer, an `O_EXCL` open.
pub fn in_use(dev: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(dev)
        .is_err()
}
