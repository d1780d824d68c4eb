//! The in-process probe (libblkid, `host::blkid`) against `wipefs --no-act
//! --json` on every signature fixture of the suite and a few hostile ones:
//! the same signatures (type, offset, UUID, label, in wipefs's order) and the
//! same verdict for each device. A fixture whose tool is missing is skipped
//! by name; the fixture's own signature is asserted first, so a fixture that
//! silently made nothing fails instead of comparing two empty lists.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use disklet::config::Config;
use disklet::host::probe::Signatures;
use disklet::host::{BlkidProber, ProcTables, SysfsDevices};
use disklet::plan::Classes;
use support::*;

/// How a fixture is made on its loop; `None` when its tool is missing.
type Make = fn(&Loop, &Path) -> Option<()>;

fn run(args: &[&str]) -> Option<()> {
    if !have(args[0]) {
        eprintln!("SKIPPED fixture: {} is not installed", args[0]);
        return None;
    }
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// `sfdisk`, or `None` (the fixture skipped) when it is not installed.
fn table(dev: &str, script: &str) -> Option<()> {
    if !have("sfdisk") {
        eprintln!("SKIPPED fixture: sfdisk is not installed");
        return None;
    }
    sfdisk(dev, script);
    Some(())
}

/// Writes `bytes` at `offset` of the loop's backing file, past the loop
/// (and its page cache: the loop is dropped from it afterwards).
fn poke(lp: &Loop, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lp.file)
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
    sh(&["blockdev", "--flushbufs", lp.path()]);
}

fn fixtures() -> Vec<(&'static str, u64, Option<&'static str>, Make)> {
    vec![
        ("blank", 64, None, |_, _| Some(())),
        ("ext4", 64, Some("ext4"), |l, _| {
            run(&["mkfs.ext4", "-q", "-L", "data", l.path()])
        }),
        ("ext2", 64, Some("ext2"), |l, _| {
            run(&["mkfs.ext2", "-q", l.path()])
        }),
        ("xfs", 320, Some("xfs"), |l, _| {
            run(&["mkfs.xfs", "-q", "-L", "disklet", l.path()])
        }),
        ("xfs-bad-crc", 320, Some("xfs"), |l, _| {
            run(&["mkfs.xfs", "-q", l.path()])?;
            // sb_fname (offset 108), covered by the superblock's CRC: the
            // checksum no longer matches; wipefs still lists it.
            poke(l, 108, b"torn");
            Some(())
        }),
        ("btrfs", 320, Some("btrfs"), |l, _| {
            run(&["mkfs.btrfs", "-q", l.path()])
        }),
        ("swap", 64, Some("swap"), |l, _| {
            run(&["mkswap", "-L", "sw", l.path()])
        }),
        ("vfat", 64, Some("vfat"), |l, _| {
            run(&["mkfs.vfat", "-n", "BOOT", l.path()])
        }),
        ("ntfs", 64, Some("ntfs"), |l, _| {
            run(&["mkntfs", "-Q", "-F", "-q", "-L", "win", l.path()])
        }),
        ("bcache", 64, Some("bcache"), |l, _| {
            run(&["make-bcache", "-B", l.path()])
        }),
        ("lvm2-pv", 64, Some("LVM2_member"), |l, d| {
            // lvm's own config keeps it to this one device and writes no
            // metadata backup outside the test's dir.
            let cfg = format!(
                "devices {{ filter = [\"a|^{}$|\", \"r|.*|\"] obtain_device_list_from_udev = 0 }} backup {{ backup = 0 archive = 0 }} global {{ locking_dir = \"{}\" }}",
                l.path(),
                d.display()
            );
            run(&["pvcreate", "-q", "--config", &cfg, "-y", l.path()])
        }),
        ("squashfs", 64, Some("squashfs"), |l, d| {
            let src = d.join("squash-src");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::write(src.join("f"), "content").unwrap();
            let img = d.join("fs.squash");
            run(&[
                "mksquashfs",
                src.to_str().unwrap(),
                img.to_str().unwrap(),
                "-quiet",
                "-noappend",
            ])?;
            poke(l, 0, &std::fs::read(&img).unwrap());
            Some(())
        }),
        ("luks2", 64, Some("crypto_LUKS"), |l, d| {
            if !have("cryptsetup") {
                eprintln!("SKIPPED fixture: cryptsetup is not installed");
                return None;
            }
            luks_format(l.path(), d);
            Some(())
        }),
        ("gpt", 64, Some("gpt"), |l, _| {
            table(l.path(), "label: gpt\n,16M\n")
        }),
        ("dos", 64, Some("dos"), |l, _| {
            table(l.path(), "label: dos\n,16M\n")
        }),
        ("ext4-over-gpt", 64, Some("ext4"), |l, _| {
            table(l.path(), "label: gpt\n,16M\n")?;
            run(&["mkfs.ext4", "-q", "-F", l.path()])
        }),
        ("gpt-backup-only", 64, Some("gpt"), |l, _| {
            table(l.path(), "label: gpt\n,16M\n")?;
            // The primary header (LBA 1) gone: only the backup at the end
            // and the protective MBR are left.
            poke(l, 512, &[0u8; 512]);
            Some(())
        }),
        ("wiped-ext4", 64, None, |l, _| {
            run(&["mkfs.ext4", "-q", l.path()])?;
            run(&["wipefs", "-q", "-a", l.path()])
        }),
        ("random-head", 64, None, |l, _| {
            // Bytes that are no signature at all (a fixed pattern, so that
            // the run is repeatable).
            let junk: Vec<u8> = (0..1u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            poke(l, 4096, &junk);
            Some(())
        }),
    ]
}

#[test]
fn libblkid_in_process_lists_what_wipefs_lists_and_decides_the_same() {
    if skip_unless_root("probe parity") {
        return;
    }
    if !have("wipefs") {
        eprintln!("SKIPPED probe parity: wipefs (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut loops = Vec::new();
    let mut made = Vec::new();
    for (name, mib, want, make) in fixtures() {
        let lp = Loop::new(d, name, mib);
        lp.assert_ours();
        if make(&lp, d).is_none() {
            continue;
        }
        made.push((name, want, loops.len()));
        loops.push(lp);
    }
    let timeout = Duration::from_secs(30);
    let wipefs = Signatures::Wipefs("wipefs".into());
    for (name, want, i) in &made {
        let dev = &loops[*i].dev;
        let ours = Signatures::Libblkid.read(dev, timeout).unwrap();
        let theirs = wipefs.read(dev, timeout).unwrap();
        match want {
            Some(kind) => assert!(
                ours.first().is_some_and(|s| s.kind == *kind),
                "{name}: the fixture's own {kind} signature is not the first found: {ours:?}"
            ),
            None => assert!(ours.is_empty(), "{name}: {ours:?}"),
        }
        assert_eq!(
            ours, theirs,
            "{name}: libblkid in-process and wipefs differ"
        );
    }
    // The verdicts, each prober's observation decided by the same rules.
    let cfg = Config::parse(&format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: t\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/*.img\"], types: [loop]}}\n",
        d = d.display()
    ))
    .unwrap();
    let classes = Classes::compile(&cfg).unwrap();
    let verdicts = |prober: &BlkidProber| {
        let (devices, tables) = (SysfsDevices::default(), ProcTables::new(&cfg.mount_info));
        let mut inv =
            disklet::scan::observe_named(&devices, prober, &tables, Some(&classes)).unwrap();
        let decisions = disklet::scan::decide_all(&mut inv, &cfg, &classes, prober);
        made.iter()
            .map(|(name, _, i)| {
                let k = inv
                    .devices
                    .iter()
                    .position(|x| x.devnode == loops[*i].dev)
                    .unwrap();
                (
                    *name,
                    decisions[k].verdict.clone(),
                    inv.devices[k].probe.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let ours = verdicts(&BlkidProber::default());
    let theirs = verdicts(&BlkidProber::wipefs("wipefs"));
    assert_eq!(ours, theirs);
    let eligible: Vec<&str> = ours
        .iter()
        .filter(|(_, v, _)| v.name() == "eligible")
        .map(|(n, _, _)| *n)
        .collect();
    assert_eq!(
        eligible,
        ["blank"],
        "only the blank fixture may be eligible: {ours:#?}"
    );
    eprintln!(
        "compared {} fixtures: {:?}",
        made.len(),
        made.iter().map(|m| m.0).collect::<Vec<_>>()
    );
}
