use super::*;
use std::fs;
use std::os::unix::fs::MetadataExt;

fn record(name: &[u8], dtype: u8, reclen: usize) -> Vec<u8> {
    let mut r = vec![0u8; reclen];
    r[..8].copy_from_slice(&42u64.to_ne_bytes());
    r[16..18].copy_from_slice(&u16::try_from(reclen).unwrap().to_ne_bytes());
    r[18] = dtype;
    r[19..19 + name.len()].copy_from_slice(name);
    r
}

#[test]
fn dirents_decode_and_skip_dot_entries() {
    let mut b = record(b".", libc::DT_DIR, 24);
    b.extend(record(b"..", libc::DT_DIR, 24));
    b.extend(record(b"a\nb\xff", libc::DT_REG, 32));
    b.extend(record(b"sub", libc::DT_DIR, 24));
    let mut out = Vec::new();
    parse_dirents(&b, &mut out);
    assert_eq!(
        out,
        vec![
            (OsStr::from_bytes(b"a\nb\xff").to_os_string(), libc::DT_REG),
            (OsString::from("sub"), libc::DT_DIR),
        ]
    );
}

#[test]
fn truncated_or_corrupt_dirents_stop_decoding() {
    let mut out = Vec::new();
    let mut b = record(b"ok", libc::DT_REG, 24);
    b.extend(record(b"zero", libc::DT_REG, 24));
    b[24 + 16..24 + 18].copy_from_slice(&0u16.to_ne_bytes());
    parse_dirents(&b, &mut out);
    let mut short = record(b"x", libc::DT_REG, 24);
    short.truncate(20);
    parse_dirents(&short, &mut out);
    assert_eq!(out, vec![(OsString::from("ok"), libc::DT_REG)]);
}

/// A concurrent rename moves the directory the walk is in out of the
/// volume: going back up, `..` is not where it came from, and it stops.
/// Only the moved subtree (volume data) is touched outside.
#[test]
fn a_directory_moved_out_of_the_volume_stops_the_walk() {
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    let outside = t.path().join("outside");
    fs::create_dir_all(vol.join("a/b/c")).unwrap();
    fs::write(vol.join("a/b/c/f"), "x").unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), "keep me").unwrap();

    let fd = open_root(&vol).unwrap();
    let (v, o) = (vol.clone(), outside.clone());
    let mut hook = |rel: &Path| {
        if rel == Path::new("a/b") {
            fs::rename(v.join("a/b"), o.join("b")).unwrap();
        }
    };
    let e = walk(fd, &vol, Kernel::Probe, &mut hook).unwrap_err();
    assert!(matches!(e, FilesError::ParentChanged { .. }), "{e}");
    assert!(e.to_string().contains("vol/a/b"), "{e}");
    assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep me");
    assert!(outside.join("b").is_dir());
    assert!(vol.join("a").is_dir());
}

/// Unmounts on drop, even when the test panics.
struct Bind(PathBuf);

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn without_openat2_a_bind_mount_of_the_same_filesystem_is_still_skipped() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED without_openat2_a_bind_mount_of_the_same_filesystem_is_still_skipped: needs root to bind mount");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    let outside = t.path().join("outside");
    fs::create_dir_all(vol.join("x/b")).unwrap();
    fs::write(vol.join("x/f"), "x").unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), "keep me").unwrap();
    nix::mount::mount(
        Some(&outside),
        &vol.join("x/b"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _bind = Bind(vol.join("x/b"));
    assert_eq!(
        fs::metadata(vol.join("x/b")).unwrap().dev(),
        fs::metadata(&vol).unwrap().dev(),
        "the bind mount must share the volume's st_dev for this test"
    );

    for kernel in [Kernel::NoOpenat2, Kernel::Probe] {
        let r = walk(open_root(&vol).unwrap(), &vol, kernel, &mut |_| {}).unwrap();
        assert_eq!(r.skipped_mounts, vec![vol.join("x/b")], "{kernel:?}");
        assert!(r.failures.is_empty(), "{kernel:?}: {r:?}");
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep me");
    }
}

#[test]
fn a_renamed_parent_inside_the_volume_also_stops_the_walk() {
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    fs::create_dir_all(vol.join("a/b")).unwrap();
    let fd = open_root(&vol).unwrap();
    let v = vol.clone();
    let mut hook = |rel: &Path| {
        if rel == Path::new("a/b") {
            fs::rename(v.join("a/b"), v.join("b")).unwrap();
        }
    };
    let e = walk(fd, &vol, Kernel::Probe, &mut hook).unwrap_err();
    assert_eq!(e.kind(), "parent-changed", "{e}");
}
