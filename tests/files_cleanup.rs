//! The `files` cleanup method attacked with every escape we know: symlinks,
//! hard links, FIFOs, sockets, device nodes, a 10,000-level tree under a low fd
//! limit, open files, other mounts (bind mounts of the same filesystem
//! included) and immutable files. Every test sets up an `outside` directory
//! next to the volume and checks afterwards that its contents and mtimes did
//! not change.
//!
//! Most tests run without root in a temp dir; the mount and immutable tests
//! need root and loop devices and say so when skipped.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use disklet::host::files::{clean_files, clean_files_at, FilesError, FilesReport};
use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{mkdirat, Mode};
use support::*;

/// Runs the cleanup on another thread with a deadline, so that a regression
/// that opens a FIFO fails the test instead of hanging it.
fn clean(root: &Path) -> Result<FilesReport, FilesError> {
    let (tx, rx) = mpsc::channel();
    let r = root.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(clean_files(&r));
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("clean_files did not return within 120 s (did it open a FIFO?)")
}

/// What a tree looks like, without following symlinks: per entry its type,
/// mode, size, link count, mtime (ns), and content or link target.
type Snapshot = BTreeMap<PathBuf, String>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let what = if ft.is_symlink() {
            format!("link -> {}", fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            format!("file {:?}", fs::read(&p).unwrap())
        } else if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            "dir".to_string()
        } else {
            "other".to_string()
        };
        out.insert(
            p.strip_prefix(dir).unwrap().to_path_buf(),
            format!(
                "{what} mode={:o} size={} nlink={} mtime={}.{:09}",
                m.mode(),
                m.size(),
                m.nlink(),
                m.mtime(),
                m.mtime_nsec()
            ),
        );
    }
    out
}

fn names(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| PathBuf::from(e.unwrap().file_name()))
        .collect()
}

/// A volume directory and, next to it, an `outside` directory that must come
/// out of every cleanup exactly as it went in.
struct Side {
    base: PathBuf,
    vol: PathBuf,
    outside: PathBuf,
    before: Snapshot,
    base_names: BTreeSet<PathBuf>,
}

impl Side {
    fn new(base: &Path) -> Side {
        let vol = base.join("vol");
        let outside = base.join("outside");
        fs::create_dir_all(&vol).unwrap();
        fs::create_dir_all(outside.join("sub/deeper")).unwrap();
        fs::create_dir_all(outside.join("empty")).unwrap();
        fs::write(outside.join("a.txt"), "outside a").unwrap();
        fs::write(outside.join("b.bin"), [0u8, 1, 2, 255]).unwrap();
        fs::write(outside.join("sub/c.txt"), "outside c").unwrap();
        fs::write(outside.join("sub/deeper/d"), "outside d").unwrap();
        symlink("a.txt", outside.join("link")).unwrap();
        nix::unistd::mkfifo(&outside.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        Side {
            base: base.to_path_buf(),
            before: snapshot(&outside),
            base_names: names(base),
            vol,
            outside,
        }
    }

    fn assert_outside_unchanged(&self) {
        assert_eq!(
            snapshot(&self.outside),
            self.before,
            "the cleanup changed something outside the volume"
        );
        assert_eq!(names(&self.base), self.base_names, "next to the volume");
    }

    fn assert_vol_empty(&self) {
        assert!(self.vol.is_dir(), "the volume root itself must stay");
        assert_eq!(names(&self.vol), BTreeSet::new(), "left in the volume");
    }
}

fn write(p: &Path, s: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, s).unwrap();
}

#[test]
fn everything_inside_is_removed_and_the_root_stays() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    let v = &s.vol;
    let ino = fs::metadata(v).unwrap().ino();
    write(&v.join("top"), "1");
    write(&v.join(".hidden"), "2");
    write(&v.join("-rf"), "3");
    write(&v.join("a/b/c/deep"), "4");
    write(&v.join("a/b/sibling"), "5");
    fs::create_dir_all(v.join("empty/nested/empty")).unwrap();
    write(&v.join("with space/and\nnewline"), "6");
    write(&v.join(OsStr::from_bytes(b"not-utf8-\xff\xfe")), "7");
    write(&v.join("x".repeat(255)), "8");
    write(&v.join("ro/file"), "9");
    fs::set_permissions(v.join("ro/file"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(v.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let root = nix::unistd::geteuid().is_root();
    // Without root a read-only directory cannot be emptied: not part of the test.
    if !root {
        fs::set_permissions(v.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    let r = clean(v).unwrap();
    // files 9, dirs: a a/b a/b/c empty empty/nested empty/nested/empty "with space" ro
    assert_eq!(
        r,
        FilesReport {
            removed: 17,
            ..Default::default()
        }
    );
    assert!(r.is_clean());
    s.assert_vol_empty();
    assert_eq!(fs::metadata(v).unwrap().ino(), ino, "the root was replaced");
    s.assert_outside_unchanged();

    // Idempotent: a second run on an empty volume does nothing.
    assert_eq!(clean(v).unwrap(), FilesReport::default());
}

#[test]
fn wide_directories_are_listed_completely() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    // Long names, so one directory needs several getdents64 calls.
    for i in 0..5000 {
        write(&s.vol.join(format!("wide/{i:0>200}")), "x");
    }
    for d in 0..50 {
        write(&s.vol.join(format!("d{d}/f")), "x");
    }
    let r = clean(&s.vol).unwrap();
    assert_eq!(r.removed, 5000 + 1 + 50 * 2);
    assert!(r.is_clean(), "{r:?}");
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}

#[test]
fn symlinks_are_unlinked_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    let v = &s.vol;
    fs::create_dir_all(v.join("sub")).unwrap();
    symlink("../outside", v.join("to_outside_rel")).unwrap();
    symlink(&s.outside, v.join("to_outside_abs")).unwrap();
    symlink(s.outside.join("a.txt"), v.join("to_file")).unwrap();
    symlink(s.outside.join("sub"), v.join("sub/to_subdir")).unwrap();
    symlink("../..", v.join("sub/up_two")).unwrap();
    symlink(".", v.join("self")).unwrap();
    symlink("loop", v.join("loop")).unwrap();
    symlink("/nonexistent/disklet-test", v.join("dangling")).unwrap();
    symlink(&s.base, v.join("to_base")).unwrap();

    let r = clean(v).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: 10,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}

#[test]
fn a_root_that_is_a_symlink_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let links = t.path().join("links");
    fs::create_dir(&links).unwrap();
    let s = Side::new(t.path());
    write(&s.vol.join("keep"), "keep");
    for (name, target) in [("vol", &s.vol), ("out", &s.outside)] {
        let l = links.join(name);
        symlink(target, &l).unwrap();
        let e = clean(&l).unwrap_err();
        assert!(matches!(e, FilesError::RootIsSymlink { .. }), "{e}");
        assert!(e.to_string().contains(&*l.to_string_lossy()), "{e}");
    }
    // The kernel follows a symlink before `/`, `/.` or `/..` whatever
    // O_NOFOLLOW says: trailing slashes are dropped, dot names refused.
    for p in ["vol/", "vol//", "out/"] {
        let e = clean(&links.join(p)).unwrap_err();
        assert!(matches!(e, FilesError::RootIsSymlink { .. }), "{p}: {e}");
    }
    for p in ["vol/.", "vol/..", "out/./", "."] {
        let e = clean(&links.join(p)).unwrap_err();
        assert!(matches!(e, FilesError::RootNotPlain { .. }), "{p}: {e}");
    }
    assert_eq!(fs::read_to_string(s.vol.join("keep")).unwrap(), "keep");
    s.assert_outside_unchanged();
}

#[test]
fn a_root_that_is_not_a_directory_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    let file = s.vol.join("file");
    write(&file, "keep");
    let e = clean(&file).unwrap_err();
    assert!(matches!(e, FilesError::RootNotDirectory { .. }), "{e}");

    let fifo = s.vol.join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let e = clean(&fifo).unwrap_err();
    assert!(matches!(e, FilesError::RootNotDirectory { .. }), "{e}");

    let missing = s.vol.join("missing");
    let e = clean(&missing).unwrap_err();
    assert!(
        matches!(
            e,
            FilesError::OpenRoot {
                source: nix::errno::Errno::ENOENT,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("vol/missing"), "{e}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    s.assert_outside_unchanged();
}

#[test]
fn hard_links_to_outside_files_leave_them_intact() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    fs::create_dir_all(s.vol.join("sub")).unwrap();
    fs::hard_link(s.outside.join("a.txt"), s.vol.join("hl")).unwrap();
    fs::hard_link(s.outside.join("sub/c.txt"), s.vol.join("sub/hl")).unwrap();
    fs::hard_link(s.outside.join("sub/c.txt"), s.vol.join("sub/hl2")).unwrap();
    assert_eq!(
        fs::metadata(s.outside.join("sub/c.txt")).unwrap().nlink(),
        3
    );

    let r = clean(&s.vol).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: 4,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    // Same content, same mtime, link count back to 1.
    s.assert_outside_unchanged();
    assert_eq!(
        fs::metadata(s.outside.join("sub/c.txt")).unwrap().nlink(),
        1
    );
}

#[test]
fn fifos_sockets_and_device_nodes_are_unlinked_never_opened() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    let v = &s.vol;
    fs::create_dir_all(v.join("sub")).unwrap();
    let mode = Mode::from_bits_truncate(0o600);
    nix::unistd::mkfifo(&v.join("fifo"), mode).unwrap();
    nix::unistd::mkfifo(&v.join("sub/fifo"), mode).unwrap();
    // A listening socket: its name goes, the listener keeps working.
    let _listener = std::os::unix::net::UnixListener::bind(v.join("sock")).unwrap();
    // fifo, sub/fifo, sock, sub, and a hard link to the FIFO outside
    let mut expected = 5;
    fs::hard_link(s.outside.join("fifo"), v.join("fifo-link")).unwrap();
    if nix::unistd::geteuid().is_root() {
        use nix::sys::stat::{makedev, mknod, SFlag};
        // Character devices null and zero: harmless even if opened, but a
        // regression would show as a hang or an error, not as damage.
        mknod(&v.join("null"), SFlag::S_IFCHR, mode, makedev(1, 3)).unwrap();
        mknod(&v.join("sub/zero"), SFlag::S_IFCHR, mode, makedev(1, 5)).unwrap();
        expected += 2;
    } else {
        eprintln!("device nodes not tested: mknod needs root");
    }

    let r = clean(v).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: expected,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}

/// RLIMIT_NOFILE's soft limit lowered for the whole test process, restored on
/// drop: a walk holding one fd per level would fail with EMFILE.
struct FdLimit(nix::libc::rlimit);

impl FdLimit {
    fn lower_to(soft: u64) -> FdLimit {
        let mut old = nix::libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the valid, exclusively
        // borrowed `old`.
        let rc = unsafe { nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut old) };
        assert_eq!(rc, 0, "getrlimit");
        let new = nix::libc::rlimit {
            rlim_cur: soft.min(old.rlim_cur),
            rlim_max: old.rlim_max,
        };
        // SAFETY: setrlimit only reads the valid `new`.
        let rc = unsafe { nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &new) };
        assert_eq!(rc, 0, "setrlimit");
        FdLimit(old)
    }
}

impl Drop for FdLimit {
    fn drop(&mut self) {
        // SAFETY: setrlimit only reads the valid saved limit.
        let _ = unsafe { nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &self.0) };
    }
}

#[test]
fn a_tree_10000_levels_deep_under_a_low_fd_limit() {
    const DEPTH: u64 = 10_000;
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    // Built with one fd at a time: the path is far beyond PATH_MAX.
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd = openat(AT_FDCWD, &s.vol, dflags, Mode::empty()).unwrap();
    let mut files = 0;
    for i in 0..DEPTH {
        mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        if i % 1000 == 0 {
            let f = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
            drop(openat(fd.as_fd(), "f", f, Mode::from_bits_truncate(0o644)).unwrap());
            files += 1;
        }
        fd = openat(fd.as_fd(), "d", dflags, Mode::empty()).unwrap();
    }
    nix::unistd::symlinkat(&s.outside, fd.as_fd(), "to_outside").unwrap();
    drop(fd);

    let limit = FdLimit::lower_to(128);
    let r = clean(&s.vol).unwrap();
    drop(limit);
    assert_eq!(
        r,
        FilesReport {
            removed: DEPTH + files + 1,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}

#[test]
fn a_file_being_written_is_still_removed() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    fs::create_dir_all(s.vol.join("app")).unwrap();
    let mut f = fs::File::create(s.vol.join("app/log")).unwrap();
    f.write_all(b"before\n").unwrap();

    let r = clean(&s.vol).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: 2,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    // The writer keeps its (now nameless) file; nothing reappears.
    f.write_all(b"after\n").unwrap();
    f.sync_all().unwrap();
    let m = f.metadata().unwrap();
    assert_eq!(m.nlink(), 0);
    assert_eq!(m.len(), 13);
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}

#[test]
fn an_already_open_root_is_cleaned_through_its_fd() {
    let t = tempfile::tempdir().unwrap();
    let s = Side::new(t.path());
    write(&s.vol.join("a/b"), "x");
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = openat(AT_FDCWD, &s.vol, dflags, Mode::empty()).unwrap();
    // Whatever the path names now, the fd is what gets cleaned.
    let moved = t.path().join("moved");
    fs::rename(&s.vol, &moved).unwrap();
    fs::create_dir(&s.vol).unwrap();
    write(&s.vol.join("new"), "not the volume that was opened");
    let r = clean_files_at(fd, &s.vol).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: 2,
            ..Default::default()
        }
    );
    assert_eq!(names(&moved), BTreeSet::new());
    assert_eq!(names(&s.vol), [PathBuf::from("new")].into());
    fs::remove_file(s.vol.join("new")).unwrap();
    fs::remove_dir(&moved).unwrap();
    s.assert_outside_unchanged();
}

/// An ext4 filesystem on a loop device of our own, mounted in our temp dir.
/// Declared in this order, the mount goes before the loop.
struct Ext4 {
    _mount: Mounted,
    _lp: Loop,
}

fn ext4(dir: &Path, name: &str, at: &Path) -> Ext4 {
    let lp = Loop::new(dir, name, 64);
    lp.assert_ours();
    sh(&["mkfs.ext4", "-q", lp.path()]);
    Ext4 {
        _mount: Mounted::new(lp.path(), at),
        _lp: lp,
    }
}

/// A bind or tmpfs mount made with `mount(8)`, undone on drop.
fn mount(args: &[&str], at: &Path) -> Mounted {
    let mut v = vec!["mount"];
    v.extend_from_slice(args);
    v.push(at.to_str().unwrap());
    sh(&v);
    Mounted(at.to_path_buf())
}

#[test]
fn other_mounts_inside_are_skipped_never_entered() {
    if skip_unless_root("other_mounts_inside_are_skipped_never_entered") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let fsdir = t.path().join("fs");
    let _outer = ext4(t.path(), "outer", &fsdir);
    // Volume and outside on the same filesystem, so a bind mount of outside
    // into the volume has the volume's st_dev.
    let s = Side::new(&fsdir);
    let v = &s.vol;
    write(&v.join("data/file"), "x");
    write(&v.join("x/y/file"), "x");
    write(&v.join("x/file"), "x");
    write(&v.join("plain/file"), "x");
    write(&v.join("fbind"), "placeholder");
    fs::create_dir_all(v.join("data/inner")).unwrap();
    fs::create_dir_all(v.join("x/y/bind")).unwrap();
    fs::create_dir_all(v.join("t")).unwrap();

    // Another filesystem (a loop of our own), a bind mount of outside (same
    // device!), a file bind mount, and a tmpfs.
    let _inner = ext4(t.path(), "inner", &v.join("data/inner"));
    write(&v.join("data/inner/precious"), "inner data");
    let inner_before = snapshot(&v.join("data/inner"));
    let _bind = mount(
        &["--bind", s.outside.to_str().unwrap()],
        &v.join("x/y/bind"),
    );
    let _fbind = mount(
        &["--bind", s.outside.join("a.txt").to_str().unwrap()],
        &v.join("fbind"),
    );
    let _tmpfs = mount(&["-t", "tmpfs", "disklet-test"], &v.join("t"));
    write(&v.join("t/precious"), "tmpfs data");

    let r = clean(v).unwrap();
    let skipped: BTreeSet<_> = r.skipped_mounts.iter().cloned().collect();
    let expect: BTreeSet<_> = ["data/inner", "x/y/bind", "fbind", "t"]
        .iter()
        .map(|p| v.join(p))
        .collect();
    assert_eq!(skipped, expect, "{r:?}");
    assert_eq!(r.skipped_mounts.len(), 4);
    assert_eq!(r.failures, vec![], "ancestors of mounts are kept silently");
    // Removed: 4 files, plain/, and nothing on the way to a mount.
    assert_eq!(r.removed, 5);
    assert_eq!(
        names(v),
        ["data", "fbind", "t", "x"]
            .iter()
            .map(PathBuf::from)
            .collect()
    );
    assert_eq!(names(&v.join("data")), [PathBuf::from("inner")].into());
    assert_eq!(names(&v.join("x")), [PathBuf::from("y")].into());
    assert_eq!(names(&v.join("x/y")), [PathBuf::from("bind")].into());
    assert_eq!(snapshot(&v.join("data/inner")), inner_before);
    assert_eq!(
        fs::read_to_string(v.join("t/precious")).unwrap(),
        "tmpfs data"
    );
    assert_eq!(fs::read_to_string(v.join("fbind")).unwrap(), "outside a");
    s.assert_outside_unchanged();
}

/// Clears `chattr +i` on drop, before the filesystem is unmounted.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        let mut g = Immutable(Vec::new());
        for p in paths {
            sh(&["chattr", "+i", p.to_str().unwrap()]);
            g.0.push(p.clone());
        }
        g
    }

    fn clear(&mut self) {
        for p in self.0.drain(..) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&p)
                .status();
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.clear();
    }
}

#[test]
fn immutable_files_are_reported_and_everything_else_removed() {
    if skip_unless_root("immutable_files_are_reported_and_everything_else_removed") {
        return;
    }
    if !have("chattr") {
        eprintln!("SKIPPED immutable_files_are_reported_and_everything_else_removed: chattr not installed");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let fsdir = t.path().join("fs");
    let _fs = ext4(t.path(), "imm", &fsdir);
    let s = Side::new(&fsdir);
    let v = &s.vol;
    write(&v.join("a/imm"), "stuck");
    write(&v.join("a/other"), "x");
    write(&v.join("a/b/c/other"), "x");
    write(&v.join("top-imm"), "stuck");
    write(&v.join("idir/inside"), "x");
    write(&v.join("z/other"), "x");
    let mut imm = Immutable::set(&[v.join("a/imm"), v.join("top-imm"), v.join("idir")]);

    let r = clean(v).unwrap();
    let failed: BTreeMap<_, _> = r.failures.iter().cloned().collect();
    assert_eq!(
        failed.keys().cloned().collect::<Vec<_>>(),
        vec![v.join("a/imm"), v.join("idir/inside"), v.join("top-imm")],
        "{r:?}"
    );
    for why in failed.values() {
        assert!(
            why.contains("EPERM") && why.contains("Operation not permitted"),
            "{why}"
        );
    }
    assert!(r.skipped_mounts.is_empty());
    // a/other a/b/c/other a/b/c a/b z/other z
    assert_eq!(r.removed, 6);
    assert_eq!(
        names(v),
        ["a", "idir", "top-imm"].iter().map(PathBuf::from).collect()
    );
    assert_eq!(names(&v.join("a")), [PathBuf::from("imm")].into());
    assert_eq!(fs::read_to_string(v.join("a/imm")).unwrap(), "stuck");
    s.assert_outside_unchanged();

    // Once the attribute is cleared, a second run finishes the job.
    imm.clear();
    let r = clean(v).unwrap();
    assert_eq!(
        r,
        FilesReport {
            removed: 5,
            ..Default::default()
        }
    );
    s.assert_vol_empty();
    s.assert_outside_unchanged();
}
