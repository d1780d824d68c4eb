//! The `files` cleanup method (DESIGN.md §5): deletes the *contents* of a
//! volume directory in place, for volumes disklet did not format itself
//! (static-provisioner style directories), where a reformat is not ours to do.
//!
//! It is written against the escapes of §3.4, each one tested in
//! `tests/files_cleanup.rs`:
//! - every operation is relative to a directory fd and one name from that
//!   directory's own listing, so no path is ever resolved twice;
//! - symlinks are unlinked as links, never followed (`O_NOFOLLOW`,
//!   `RESOLVE_NO_SYMLINKS`), the root included;
//! - a directory on another mount is never entered nor removed:
//!   `openat2(RESOLVE_NO_XDEV)` refuses every mount crossing, bind mounts of
//!   the same filesystem included, and its `st_dev` must equal the root's.
//!   Without openat2 (Linux < 5.6, or a seccomp profile that refuses it) the
//!   identities of the mounts below the root, read from
//!   `/proc/self/mountinfo` at the start, take its place;
//! - non-directories are only ever unlinked, never opened (a FIFO would block,
//!   a device node would act), and unlinking a name never changes the file
//!   behind another hard link;
//! - the walk is iterative and holds one directory fd at a time, so depth is
//!   bounded by neither the stack nor the fd limit. Going up it opens `..` and
//!   checks that it is the very directory (dev, ino) it came down from: if a
//!   concurrent rename moved the walk elsewhere, it stops with an error.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::libc;
use nix::sys::stat::{fstat, lstat, FileStat, Mode, SFlag};
use nix::unistd::{lseek, unlinkat, UnlinkatFlags, Whence};

/// What one cleanup did. After it, the entries left inside the root are the
/// `skipped_mounts`, the `failures`, and the directories on the way to them
/// (those are kept without being listed: they cannot be empty).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilesReport {
    /// Entries unlinked: files, directories, symlinks, FIFOs, sockets and
    /// device nodes.
    pub removed: u64,
    /// Other mounts met inside the root: never entered, never removed.
    /// Mostly directories; a file bind mount (unlink says `EBUSY`) is here too.
    pub skipped_mounts: Vec<PathBuf>,
    /// Entries that could not be removed (an immutable file: `EPERM`), with
    /// the errno text.
    pub failures: Vec<(PathBuf, String)>,
}

impl FilesReport {
    /// Whether the root is empty now (as far as this walk could see).
    pub fn is_clean(&self) -> bool {
        self.skipped_mounts.is_empty() && self.failures.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path} is a symlink; the files cleanup never follows one, not even at the root")]
    RootIsSymlink { path: PathBuf },
    #[error("{path} is not a directory")]
    RootNotDirectory { path: PathBuf },
    #[error("cannot open {path} as a directory (O_DIRECTORY|O_NOFOLLOW): {source}")]
    OpenRoot { path: PathBuf, source: Errno },
    #[error("{path}: the last component must be a plain name (not '.' or '..'), or O_NOFOLLOW would not apply to it")]
    RootNotPlain { path: PathBuf },
    #[error("{path} is the host's / ; the files cleanup refuses it")]
    RootIsSystemRoot { path: PathBuf },
    #[error("cannot stat {path}: {source}")]
    StatRoot { path: PathBuf, source: Errno },
    #[error("cannot list {path}: {source}")]
    ListRoot { path: PathBuf, source: Errno },
    #[error("cannot go back up from {path} to its parent: {source}; cleanup stopped")]
    Ascend { path: PathBuf, source: Errno },
    #[error("the parent of {path} is no longer the directory the cleanup came down from (moved during the cleanup?); stopped so the walk cannot leave the volume")]
    ParentChanged { path: PathBuf },
}

impl FilesError {
    /// Short stable label for metrics, Events and backoff.
    pub fn kind(&self) -> &'static str {
        match self {
            FilesError::RootIsSymlink { .. } => "root-symlink",
            FilesError::RootNotDirectory { .. } => "root-not-directory",
            FilesError::OpenRoot { .. } => "open-root",
            FilesError::RootNotPlain { .. } => "root-not-plain",
            FilesError::RootIsSystemRoot { .. } => "system-root",
            FilesError::StatRoot { .. } => "stat-root",
            FilesError::ListRoot { .. } => "list-root",
            FilesError::Ascend { .. } => "ascend",
            FilesError::ParentChanged { .. } => "parent-changed",
        }
    }
}

/// Deletes everything inside `root`, which stays. `root` is opened with
/// `O_DIRECTORY|O_NOFOLLOW`: a symlink there is an error. Entries that cannot
/// be removed and other mounts are reported, and everything else is still
/// removed; an `Err` means the walk could not start, or stopped because the
/// tree moved under it.
pub fn clean_files(root: &Path) -> Result<FilesReport, FilesError> {
    let fd = open_root(root)?;
    walk(fd, root, Kernel::Probe, &mut |_| {})
}

/// [`clean_files`] on a directory the caller has already opened (and checked,
/// e.g. that it is the mount of the expected filesystem), so that no path
/// lookup comes between the check and the cleanup. `root` names it in the
/// report and errors only.
pub fn clean_files_at(dir: OwnedFd, root: &Path) -> Result<FilesReport, FilesError> {
    walk(dir, root, Kernel::Probe, &mut |_| {})
}

/// Opens the root without following a symlink in its last component. The
/// kernel resolves a symlink followed by `/`, `/.` or `/..` whatever
/// `O_NOFOLLOW` says, so trailing slashes are dropped and a last component
/// `.` or `..` is refused.
fn open_root(root: &Path) -> Result<OwnedFd, FilesError> {
    let raw = root.as_os_str().as_bytes();
    let trimmed = match raw.iter().rposition(|&c| c != b'/') {
        Some(i) => &raw[..=i],
        None => raw,
    };
    let last = trimmed.rsplit(|&c| c == b'/').next().unwrap_or_default();
    if last.is_empty() || last == b"." || last == b".." {
        return Err(FilesError::RootNotPlain { path: root.into() });
    }
    let name = Path::new(OsStr::from_bytes(trimmed));
    match openat(AT_FDCWD, name, dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(source @ (Errno::ELOOP | Errno::ENOTDIR)) => match lstat(name) {
            Ok(st) if file_type(&st) == SFlag::S_IFLNK => {
                Err(FilesError::RootIsSymlink { path: root.into() })
            }
            Ok(_) if source == Errno::ENOTDIR => {
                Err(FilesError::RootNotDirectory { path: root.into() })
            }
            _ => Err(FilesError::OpenRoot {
                path: root.into(),
                source,
            }),
        },
        Err(source) => Err(FilesError::OpenRoot {
            path: root.into(),
            source,
        }),
    }
}

/// Flags for every directory the walk opens. `O_NONBLOCK` is defence in
/// depth: `O_DIRECTORY` already refuses a FIFO before it could block.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY
        | OFlag::O_DIRECTORY
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// A directory's identity, stable across renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Id {
    dev: u64,
    ino: u64,
}

impl Id {
    fn of(st: &FileStat) -> Id {
        Id {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// How many times a directory is listed again when entries keep appearing
/// in it while it is being emptied (something still writes into the volume).
const MAX_PASSES: u32 = 4;

/// One directory on the way down from the root. Only the deepest one has an
/// open fd (the walker's `cur`).
struct Frame {
    id: Id,
    /// Its name in the parent; empty for the root.
    name: OsString,
    /// Entries listed but not handled yet.
    pending: Vec<(OsString, u8)>,
    /// Names that stay (failures, mounts, directories holding those): a new
    /// listing skips them, and this directory is not removed.
    kept: HashSet<OsString>,
    passes: u32,
    /// Entries kept appearing: reported, not removed.
    busy: bool,
}

impl Frame {
    fn new(id: Id, name: OsString, pending: Vec<(OsString, u8)>) -> Frame {
        Frame {
            id,
            name,
            pending,
            kept: HashSet::new(),
            passes: 1,
            busy: false,
        }
    }
}

/// What became of one entry.
enum Step {
    Gone,
    Kept,
    Descend(OwnedFd, Id),
}

/// What opening a listed directory entry found.
enum Opened {
    Dir(OwnedFd, Id),
    Mount,
    NotDir,
}

/// Whether to use openat2; tests force the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Probe,
    #[cfg(test)]
    NoOpenat2,
}

struct Walker<'a> {
    root: &'a Path,
    root_dev: u64,
    /// Path of the current directory below the root, for reports only.
    rel: PathBuf,
    buf: Vec<u8>,
    openat2: bool,
    /// Without openat2: identities of the roots of the mounts below the root.
    mounted: HashSet<Id>,
    report: FilesReport,
}

fn openat2_how() -> OpenHow {
    OpenHow::new().flags(dir_flags()).resolve(
        ResolveFlag::RESOLVE_NO_XDEV
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_BENEATH,
    )
}

/// Without openat2, what tells a bind mount of the same filesystem apart:
/// stat(2) through each mount point below `root` shows the identity of the
/// mounted directory, which the walk then refuses to enter. Mounts made
/// after this look are caught only by the st_dev check.
fn mounted_below(root: BorrowedFd<'_>) -> HashSet<Id> {
    let mut ids = HashSet::new();
    let at = match std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd())) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("files cleanup without openat2: cannot name the volume root ({e}); only st_dev tells mounts apart");
            return ids;
        }
    };
    let table = Path::new("/proc/self/mountinfo");
    match crate::host::mountinfo::read_consistent(table) {
        Ok(mounts) => {
            for m in mounts {
                if m.mount_point != at && m.mount_point.starts_with(&at) {
                    if let Ok(st) = nix::sys::stat::stat(&m.mount_point) {
                        ids.insert(Id::of(&st));
                    }
                }
            }
        }
        Err(e) => tracing::warn!(
            "files cleanup without openat2: cannot read {}: {e}; only st_dev tells mounts apart",
            table.display()
        ),
    }
    ids
}

/// The walk itself. `hook` is called with the relative path of each directory
/// just entered (tests use it to move the tree under the walk).
fn walk(
    mut cur: OwnedFd,
    root: &Path,
    kernel: Kernel,
    hook: &mut dyn FnMut(&Path),
) -> Result<FilesReport, FilesError> {
    let st = fstat(&cur).map_err(|source| FilesError::StatRoot {
        path: root.into(),
        source,
    })?;
    if file_type(&st) != SFlag::S_IFDIR {
        return Err(FilesError::RootNotDirectory { path: root.into() });
    }
    if lstat("/").is_ok_and(|slash| Id::of(&slash) == Id::of(&st)) {
        return Err(FilesError::RootIsSystemRoot { path: root.into() });
    }
    // ENOSYS before Linux 5.6; EPERM from a seccomp profile that predates it.
    let openat2 = kernel == Kernel::Probe
        && !matches!(
            openat2(cur.as_fd(), ".", openat2_how()),
            Err(Errno::ENOSYS | Errno::EPERM)
        );
    let mounted = if openat2 {
        HashSet::new()
    } else {
        tracing::warn!("no openat2 (Linux < 5.6 or seccomp): the files cleanup tells mounts apart by st_dev and the mount table");
        mounted_below(cur.as_fd())
    };
    let mut w = Walker {
        root,
        root_dev: st.st_dev,
        rel: PathBuf::new(),
        buf: vec![0; 64 << 10],
        openat2,
        mounted,
        report: FilesReport::default(),
    };
    let listed = read_entries(cur.as_fd(), &mut w.buf).map_err(|source| FilesError::ListRoot {
        path: root.into(),
        source,
    })?;
    let mut stack = vec![Frame::new(Id::of(&st), OsString::new(), listed)];
    while let Some(top) = stack.last_mut() {
        if let Some((name, dtype)) = top.pending.pop() {
            match w.entry(cur.as_fd(), &name, dtype) {
                Step::Gone => {}
                Step::Kept => {
                    top.kept.insert(name);
                }
                Step::Descend(child, id) => match read_entries(child.as_fd(), &mut w.buf) {
                    Ok(listed) => {
                        cur = child;
                        w.rel.push(&name);
                        hook(&w.rel);
                        stack.push(Frame::new(id, name, listed));
                    }
                    Err(e) => {
                        w.fail(&name, e);
                        top.kept.insert(name);
                    }
                },
            }
            continue;
        }
        // Listed through: look again for entries that appeared meanwhile.
        if !top.busy {
            match read_entries(cur.as_fd(), &mut w.buf) {
                Ok(mut again) => {
                    again.retain(|(n, _)| !top.kept.contains(n));
                    if !again.is_empty() {
                        if top.passes < MAX_PASSES {
                            top.passes += 1;
                            top.pending = again;
                            continue;
                        }
                        top.busy = true;
                        let path = w.root.join(&w.rel);
                        w.report.failures.push((
                            path,
                            format!(
                                "new entries kept appearing over {MAX_PASSES} passes: something still writes into the volume"
                            ),
                        ));
                    }
                }
                Err(e) => {
                    top.busy = true;
                    let path = w.root.join(&w.rel);
                    w.report.failures.push((path, e.to_string()));
                }
            }
        }
        let Some(done) = stack.pop() else { break };
        let Some(parent) = stack.last_mut() else {
            // The root itself: done, and it stays.
            break;
        };
        cur = w.ascend(cur.as_fd(), parent.id)?;
        w.rel.pop();
        if done.kept.is_empty() && !done.busy {
            if !w.remove_dir(cur.as_fd(), &done.name) {
                parent.kept.insert(done.name);
            }
        } else {
            // Holds a mount or a failure: not even tried, not listed again.
            parent.kept.insert(done.name);
        }
    }
    Ok(w.report)
}

impl Walker<'_> {
    fn path_of(&self, name: &OsStr) -> PathBuf {
        self.root.join(&self.rel).join(name)
    }

    fn fail(&mut self, name: &OsStr, e: Errno) {
        let path = self.path_of(name);
        self.report.failures.push((path, e.to_string()));
    }

    fn mount(&mut self, name: &OsStr) {
        let path = self.path_of(name);
        self.report.skipped_mounts.push(path);
    }

    /// Unlinks a non-directory, or opens a directory to descend into. Retries
    /// once when the entry turns out to be of the other kind.
    fn entry(&mut self, dir: BorrowedFd<'_>, name: &OsStr, dtype: u8) -> Step {
        let mut as_dir = dtype == libc::DT_DIR;
        for _ in 0..3 {
            if !as_dir {
                match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => {
                        self.report.removed += 1;
                        // Armed, the first file unlinked is the last.
                        crate::failpoint::hit("files-mid-clean");
                        return Step::Gone;
                    }
                    Err(Errno::ENOENT) => return Step::Gone,
                    // A directory after all: open it below.
                    Err(Errno::EISDIR) => {}
                    Err(Errno::EBUSY) => {
                        self.mount(name);
                        return Step::Kept;
                    }
                    Err(e) => {
                        self.fail(name, e);
                        return Step::Kept;
                    }
                }
            }
            match self.open_dir(dir, name) {
                Ok(Opened::Dir(fd, id)) => return Step::Descend(fd, id),
                Ok(Opened::Mount) => {
                    self.mount(name);
                    return Step::Kept;
                }
                Ok(Opened::NotDir) => as_dir = false,
                Err(Errno::ENOENT) => return Step::Gone,
                Err(e) => {
                    self.fail(name, e);
                    return Step::Kept;
                }
            }
        }
        let path = self.path_of(name);
        self.report.failures.push((
            path,
            "kept changing between a directory and a non-directory".into(),
        ));
        Step::Kept
    }

    /// Opens `name` in `dir` as a directory without following a symlink or
    /// crossing a mount.
    fn open_dir(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<Opened, Errno> {
        let opened = if self.openat2 {
            openat2(dir, name, openat2_how())
        } else {
            openat(dir, name, dir_flags(), Mode::empty())
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(Errno::EXDEV) => return Ok(Opened::Mount),
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Ok(Opened::NotDir),
            Err(e) => return Err(e),
        };
        let st = fstat(&fd)?;
        if file_type(&st) != SFlag::S_IFDIR {
            return Ok(Opened::NotDir);
        }
        let id = Id::of(&st);
        if st.st_dev != self.root_dev || self.mounted.contains(&id) {
            return Ok(Opened::Mount);
        }
        Ok(Opened::Dir(fd, id))
    }

    /// Goes up from the current directory, and checks that `..` is the
    /// directory the walk came down from.
    fn ascend(&mut self, cur: BorrowedFd<'_>, expected: Id) -> Result<OwnedFd, FilesError> {
        let path = self.root.join(&self.rel);
        let up =
            openat(cur, "..", dir_flags(), Mode::empty()).map_err(|source| FilesError::Ascend {
                path: path.clone(),
                source,
            })?;
        let st = fstat(&up).map_err(|source| FilesError::Ascend {
            path: path.clone(),
            source,
        })?;
        if Id::of(&st) != expected {
            return Err(FilesError::ParentChanged { path });
        }
        Ok(up)
    }

    /// Removes an emptied directory; false if it stays.
    fn remove_dir(&mut self, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
            Ok(()) => {
                self.report.removed += 1;
                true
            }
            Err(Errno::ENOENT) => true,
            // Mounted on since the walk went in (it emptied what was below).
            Err(Errno::EBUSY) => {
                self.mount(name);
                false
            }
            Err(e) => {
                self.fail(name, e);
                false
            }
        }
    }
}

/// Lists the directory `fd` from its start: every name but `.` and `..`,
/// with its `d_type` (`DT_UNKNOWN` on filesystems that do not fill it in).
fn read_entries(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Vec<(OsString, u8)>, Errno> {
    lseek(fd, 0, Whence::SeekSet)?;
    let mut out = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`, an
        // initialised allocation exclusively borrowed for the call, and `fd`
        // is an open descriptor borrowed for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let n = usize::try_from(Errno::result(n)?).map_err(|_| Errno::EOVERFLOW)?;
        if n == 0 {
            return Ok(out);
        }
        parse_dirents(buf.get(..n).ok_or(Errno::EOVERFLOW)?, &mut out);
    }
}

/// Decodes `struct linux_dirent64` records: `d_ino` u64, `d_off` i64,
/// `d_reclen` u16, `d_type` u8, then the NUL-terminated name.
fn parse_dirents(mut b: &[u8], out: &mut Vec<(OsString, u8)>) {
    const NAME: usize = 19;
    while b.len() >= NAME {
        let reclen = usize::from(u16::from_ne_bytes([b[16], b[17]]));
        if reclen < NAME || reclen > b.len() {
            return;
        }
        let dtype = b[18];
        let name = &b[NAME..reclen];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        if !name.is_empty() && name != b"." && name != b".." {
            out.push((OsStr::from_bytes(name).to_os_string(), dtype));
        }
        b = &b[reclen..];
    }
}

#[cfg(test)]
mod tests;
