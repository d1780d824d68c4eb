//! Parsers for `/proc/<pid>/mountinfo` and `/proc/swaps`: pure functions over
//! text, plus a reader that re-reads until two reads agree (the kernel does
//! not give a consistent snapshot of a table that changes while it is read).

use std::path::{Path, PathBuf};

use crate::model::{DevNo, MountEntry, SwapEntry};

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash) in mountinfo and swaps fields.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text. Malformed lines are skipped (the kernel does not
/// write them; a truncated last line can appear when reading a changing file).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let mount_id = l.next()?.parse().ok()?;
    let parent_id = l.next()?.parse().ok()?;
    let devno = DevNo::parse(l.next()?)?;
    let root = PathBuf::from(unescape(l.next()?));
    let mount_point = PathBuf::from(unescape(l.next()?));
    let options = l.next()?.to_string();
    let mut r = right.split(' ');
    let fs_type = unescape(r.next()?);
    let source = unescape(r.next()?);
    Some(MountEntry {
        mount_id,
        parent_id,
        devno,
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

/// The propagation tags (`shared:N`, `master:N`, or empty for private) of
/// the mount that holds `path` (longest mount point prefix, last one wins).
pub fn propagation_of(text: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in text.lines() {
        let Some((left, _)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        if fields.len() < 6 {
            continue;
        }
        let mp = PathBuf::from(unescape(fields[4]));
        if !path.starts_with(&mp) {
            continue;
        }
        let depth = mp.components().count();
        if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((depth, fields[6..].join(" ")));
        }
    }
    best.map(|(_, tags)| tags)
}

/// A kernel table as text. Paths in it are bytes, not UTF-8: one mount
/// point named with other bytes anywhere on the host (any user can make one
/// with FUSE) must not make the whole table unreadable. Such a path reads
/// with U+FFFD in it, so it can never equal a path disklet was configured
/// with (those are UTF-8).
pub fn read_lossy(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Reads a mountinfo file until two consecutive reads agree (at most 5 reads;
/// the last one wins if the table never stops changing).
pub fn read_consistent(path: &Path) -> std::io::Result<Vec<MountEntry>> {
    let mut prev = read_lossy(path)?;
    for _ in 0..4 {
        let next = read_lossy(path)?;
        if next == prev {
            break;
        }
        prev = next;
    }
    Ok(parse_mountinfo(&prev))
}

/// Parses `/proc/swaps` (header line first).
pub fn parse_swaps(text: &str) -> Vec<SwapEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let path = PathBuf::from(unescape(f.next()?));
            let kind = f.next()?.to_string();
            Some(SwapEntry {
                path,
                kind,
                devno: None,
            })
        })
        .collect()
}

/// The device number of a block device node, `None` for anything else.
pub fn block_devno(path: &Path) -> Option<DevNo> {
    let st = nix::sys::stat::stat(path).ok()?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFBLK {
        return None;
    }
    Some(DevNo::new(
        nix::sys::stat::major(st.st_rdev) as u32,
        nix::sys::stat::minor(st.st_rdev) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/mountinfo.txt");

    #[test]
    fn parses_the_fixture() {
        let m = parse_mountinfo(FIXTURE);
        assert_eq!(m.len(), 9);
        let root = &m[0];
        assert_eq!(root.mount_point, PathBuf::from("/"));
        assert_eq!(root.devno, DevNo::new(254, 0));
        assert_eq!(root.source, "/dev/vda");
        assert_eq!(root.fs_type, "ext4");
        let odd = m.iter().find(|e| e.source == "/dev/loop7").unwrap();
        assert_eq!(
            odd.mount_point,
            PathBuf::from("/mnt/with space\tand\nnewline\\slash")
        );
        let bind = m.iter().find(|e| e.root != Path::new("/")).unwrap();
        assert_eq!(bind.root, PathBuf::from("/vol"));
        assert!(bind.mount_point.starts_with("/var/lib/kubelet/pods"));
        let btrfs = m.iter().find(|e| e.fs_type == "btrfs").unwrap();
        assert_eq!(
            btrfs.devno,
            DevNo::new(0, 45),
            "btrfs reports an anonymous devno"
        );
        assert_eq!(btrfs.source, "/dev/loop9");
    }

    #[test]
    fn optional_fields_do_not_shift_columns() {
        let line = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue";
        let m = parse_mountinfo(line);
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt2"));
    }

    #[test]
    fn propagation_of_the_mount_holding_a_path() {
        let t = "22 1 254:0 / / rw shared:1 - ext4 /dev/vda rw\n30 22 0:40 / /var/lib/disklet rw - tmpfs tmpfs rw\n31 22 0:41 / /var/lib/kubelet rw master:3 - tmpfs tmpfs rw\n";
        assert_eq!(
            propagation_of(t, Path::new("/var/lib/disklet/fast")).as_deref(),
            Some(""),
            "private"
        );
        assert_eq!(
            propagation_of(t, Path::new("/srv")).as_deref(),
            Some("shared:1")
        );
        assert_eq!(
            propagation_of(t, Path::new("/var/lib/kubelet")).as_deref(),
            Some("master:3")
        );
    }

    #[test]
    fn garbage_lines_are_skipped_not_fatal() {
        let m = parse_mountinfo("garbage\n1 2 x:y / / rw - ext4 /dev/a rw\n\n22 1 8:1 / /boot rw - vfat /dev/sda1 rw\n22 1 8:1 / /trunc");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, PathBuf::from("/boot"));
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape(r"a\040b"), "a b");
        assert_eq!(unescape(r"end\04"), r"end\04");
        assert_eq!(unescape(r"\134"), "\\");
        assert_eq!(unescape(r"\999"), r"\999");
        assert_eq!(unescape(r"\"), r"\");
    }

    #[test]
    fn parses_swaps() {
        let s = parse_swaps("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/loop3                              partition\t327676\t\t0\t\t-2\n/swap\\040file file 1024 0 -3\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].path, PathBuf::from("/dev/loop3"));
        assert_eq!(s[0].kind, "partition");
        assert_eq!(s[1].path, PathBuf::from("/swap file"));
    }

    #[test]
    fn reads_this_hosts_table() {
        let m = read_consistent(Path::new("/proc/self/mountinfo")).unwrap();
        assert!(
            m.iter().any(|e| e.mount_point == Path::new("/")),
            "every mount namespace has a root"
        );
    }
}
