//! The format interlocks, attacked on real loop devices: whatever changes
//! between planning and formatting, mkfs must not run.
#![allow(clippy::unwrap_used)]

mod support;

use disklet::config::{Config, FsType};
use disklet::host::format::{
    format_safely, FormatError, FormatRequest, Formatter, Host, MkfsFormatter, RecordingFormatter,
};
use disklet::host::{BlkidProber, ProcTables, SysfsDevices};
use disklet::model::Fingerprint;
use disklet::plan::{Classes, Verdict};
use disklet::reconcile::format_recheck;
use support::agent::blkid;
use support::*;

struct Setup {
    cfg: Config,
    classes: Classes,
    devices: SysfsDevices,
    prober: BlkidProber,
    tables: ProcTables,
    /// The devices of the last plan, as the agent hands them to the format.
    seen: std::cell::RefCell<Vec<disklet::model::Device>>,
}

fn setup(dir: &std::path::Path) -> Setup {
    let cfg = Config::parse(&format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: t\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/*.img\"], types: [loop]}}\n",
        d = dir.display()
    ))
    .unwrap();
    let classes = Classes::compile(&cfg).unwrap();
    Setup {
        tables: ProcTables::new(&cfg.mount_info),
        cfg,
        classes,
        devices: SysfsDevices::default(),
        prober: BlkidProber::default(),
        seen: Default::default(),
    }
}

impl Setup {
    fn host(&self) -> Host<'_> {
        Host {
            devices: &self.devices,
            prober: &self.prober,
            tables: &self.tables,
        }
    }

    /// What the plan would see now: the device's fingerprint and verdict.
    fn plan(&self, lp: &Loop) -> (Fingerprint, Verdict) {
        // Only the devices the class names are probed, as the agent does:
        // a probe of every device would read the loops of the tests running
        // beside this one, and a read in flight makes their own probe fail.
        let mut inv = disklet::scan::observe_named(
            &self.devices,
            &self.prober,
            &self.tables,
            Some(&self.classes),
        )
        .unwrap();
        let decisions = disklet::scan::decide_all(&mut inv, &self.cfg, &self.classes, &self.prober);
        let i = inv
            .devices
            .iter()
            .position(|d| d.devnode == lp.dev)
            .unwrap();
        self.seen.replace(inv.devices.clone());
        (
            Fingerprint::of(&inv.devices[i], &inv),
            decisions[i].verdict.clone(),
        )
    }

    fn format(
        &self,
        lp: &Loop,
        fp: &Fingerprint,
        f: &dyn Formatter,
    ) -> Result<String, FormatError> {
        let name = lp.name();
        let seen = self.seen.borrow();
        let req = FormatRequest {
            device: &name,
            seen: &seen,
            planned: fp,
            fs: FsType::Xfs,
            host_dir: &self.cfg.host_dir,
        };
        let recheck = format_recheck(&self.cfg, &self.classes, "t");
        format_safely(&req, &self.host(), f, &recheck)
    }
}

fn blank(dir: &std::path::Path, name: &str) -> Loop {
    let lp = Loop::new(dir, name, 320);
    lp.assert_ours();
    lp
}

#[test]
fn a_blank_disk_is_formatted_with_our_label_and_the_returned_uuid() {
    if skip_unless_root("format happy path") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path());
    let lp = blank(dir.path(), "ok");
    let (fp, v) = s.plan(&lp);
    assert_eq!(v, Verdict::Eligible);
    let uuid = s.format(&lp, &fp, &MkfsFormatter::default()).unwrap();
    assert_eq!(blkid(lp.path(), "UUID"), uuid);
    assert_eq!(blkid(lp.path(), "LABEL"), "disklet");
    assert!(
        matches!(s.plan(&lp).1, Verdict::Ours { .. }),
        "now ours, never eligible again"
    );
}

#[test]
fn every_change_after_planning_stops_the_format() {
    if skip_unless_root("format interlocks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path());
    let rec = RecordingFormatter::default();

    // Someone puts a filesystem on it after the plan.
    let a = blank(dir.path(), "a");
    let (fp, _) = s.plan(&a);
    sh(&["mkfs.ext4", "-q", a.path()]);
    let uuid_a = blkid(a.path(), "UUID");
    let e = s.format(&a, &fp, &rec).unwrap_err();
    assert_eq!(e.kind(), "device-changed", "{e}");
    assert!(e.to_string().contains("signatures"), "{e}");

    // Someone mounts it (a filesystem they created: the signature changes too,
    // so plan after mkfs, then mount).
    let b = blank(dir.path(), "b");
    sh(&["mkfs.ext4", "-q", b.path()]);
    let (fp_b, _) = s.plan(&b);
    let _m = Mounted::new(b.path(), &dir.path().join("mnt-b"));
    let e = s.format(&b, &fp_b, &rec).unwrap_err();
    assert_eq!(e.kind(), "device-changed", "{e}");
    assert!(e.to_string().contains("mounted"), "{e}");

    // Another process opens it exclusively.
    let c = blank(dir.path(), "c");
    let (fp_c, _) = s.plan(&c);
    let holder = ExclusiveHolder::new(c.path());
    let e = s.format(&c, &fp_c, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");
    assert!(e.to_string().contains("busy"), "{e}");
    drop(holder);

    // Another tool holds the device lock (as udevd does while probing).
    let d = blank(dir.path(), "d");
    let (fp_d, _) = s.plan(&d);
    let mut locker = std::process::Command::new("flock")
        .args(["--exclusive", d.path(), "sh", "-c", "echo locked; read x"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let e = s.format(&d, &fp_d, &rec).unwrap_err();
    assert_eq!(e.kind(), "locked", "{e}");
    let _ = locker.kill();
    let _ = locker.wait();

    // The kernel name now belongs to a different disk.
    let e_file = dir.path().join("e.img");
    let e1 = blank(dir.path(), "e");
    let (fp_e, _) = s.plan(&e1);
    let name = e1.path().to_string();
    drop(e1);
    std::fs::rename(&e_file, dir.path().join("e-old.img")).unwrap();
    let other = Loop::new(dir.path(), "e", 320); // a new file, same path pattern
    if other.path() == name {
        let e = s.format(&other, &fp_e, &rec).unwrap_err();
        assert_eq!(e.kind(), "device-changed", "{e}");
    } else {
        eprintln!("note: the kernel gave the replacement another loop name; the stale plan targets a gone device");
        let seen = s.seen.borrow();
        let req = FormatRequest {
            device: name.trim_start_matches("/dev/"),
            seen: &seen,
            planned: &fp_e,
            fs: FsType::Xfs,
            host_dir: &s.cfg.host_dir,
        };
        let recheck = format_recheck(&s.cfg, &s.classes, "t");
        let e = format_safely(&req, &s.host(), &rec, &recheck).unwrap_err();
        assert!(
            matches!(e.kind(), "device-changed" | "open" | "not-eligible"),
            "{e}"
        );
    }

    // A device that was never eligible, with a forged fingerprint that matches.
    let f = Loop::new(dir.path(), "f", 320);
    sh(&["mkfs.btrfs", "-q", f.path()]);
    let (fp_f, v) = s.plan(&f);
    assert_eq!(v.refused().map(|r| r.as_str()), Some("foreign-filesystem"));
    let e = s.format(&f, &fp_f, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");

    assert!(
        rec.calls().is_empty(),
        "mkfs must never have been called: {:?}",
        rec.calls()
    );
    assert_eq!(
        blkid(a.path(), "UUID"),
        uuid_a,
        "the ext4 put there after planning is intact"
    );
    assert_eq!(blkid(f.path(), "TYPE"), "btrfs");
}

#[test]
fn a_twin_that_appears_after_the_plan_stops_the_format() {
    if skip_unless_root("format interlocks: twins") {
        return;
    }
    // The format reuses the plan's listing for devices that did not change;
    // a copy of the disk appearing in between must still be seen.
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path());
    let rec = RecordingFormatter::default();

    // A second loop over the same file: a new kernel name.
    let a = blank(dir.path(), "a");
    let (fp, v) = s.plan(&a);
    assert_eq!(v, Verdict::Eligible);
    let twin = Loop::new(dir.path(), "a", 320);
    twin.assert_ours();
    let e = s.format(&a, &fp, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");
    assert!(
        e.to_string().contains("duplicate-identity") && e.to_string().contains(twin.path()),
        "{e}"
    );
    drop(twin);

    // A device the plan listed, detached and attached again to the same file
    // under its old name: a name the listing knew, with a new medium.
    let b = blank(dir.path(), "b");
    let mut reattached = None;
    for attempt in 0..5 {
        let other = blank(dir.path(), &format!("other{attempt}"));
        let (fp_b, v) = s.plan(&b);
        assert_eq!(v, Verdict::Eligible);
        let name = other.path().to_string();
        drop(other);
        if let Some(twin) = Loop::attach_at(&name, &b.file) {
            reattached = Some((twin, fp_b));
            break;
        }
        eprintln!("note: {name} was taken by another test between detach and attach; again");
    }
    let (twin, fp_b) = reattached.expect("no loop node could be re-attached in 5 tries");
    twin.assert_ours();
    let e = s.format(&b, &fp_b, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");
    assert!(
        e.to_string().contains("duplicate-identity") && e.to_string().contains(twin.path()),
        "{e}"
    );

    assert!(
        rec.calls().is_empty(),
        "mkfs must never have been called: {:?}",
        rec.calls()
    );
}

/// Makes `lp` what a mkfs.xfs cut short leaves: an xfs with `label`, its
/// superblock still marked "in progress". Returns its UUID.
fn cut_short_mkfs(lp: &Loop, label: &str) -> String {
    sh(&["mkfs.xfs", "-q", "-L", label, lp.path()]);
    in_progress(lp, true);
    blkid(lp.path(), "UUID")
}

fn in_progress(lp: &Loop, on: bool) {
    lp.xfs_sb_write(&format!("inprogress {}", u8::from(on)));
}

impl Setup {
    /// What the agent wrote before the mkfs that left `uuid` on `on`.
    fn record(&self, uuid: &str, on: &Loop) {
        let key = format!("loop-file:{}", on.file.display());
        disklet::host::intents::record(&self.cfg.host_dir, uuid, &key).unwrap();
    }

    fn records(&self) -> Vec<String> {
        disklet::host::intents::read(&self.cfg.host_dir)
            .into_iter()
            .map(|i| i.uuid)
            .collect()
    }
}

#[test]
fn a_mkfs_of_ours_cut_short_is_formatted_again_and_nothing_that_resembles_it() {
    if skip_unless_root("format over an unfinished mkfs") {
        return;
    }
    if !have("xfs_db") || !have("xfs_copy") {
        eprintln!("skipped: xfs_db or xfs_copy is not installed (scripts/setup-debian.sh installs xfsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path());
    let unfinished = |lp: &Loop| disklet::host::probe::xfs_in_progress(&lp.dev).unwrap();

    // Ours, cut short, its start recorded: formatted again, records gone.
    let a = blank(dir.path(), "a");
    let torn = cut_short_mkfs(&a, "disklet");
    s.record(&torn, &a);
    let (fp, v) = s.plan(&a);
    assert_eq!(v, Verdict::Eligible);
    assert_eq!(fp.signatures, [("xfs".to_string(), 0)]);
    let uuid = s.format(&a, &fp, &MkfsFormatter::default()).unwrap();
    assert_ne!(uuid, torn);
    assert_eq!(blkid(a.path(), "UUID"), uuid);
    assert_eq!(blkid(a.path(), "LABEL"), "disklet");
    assert!(!unfinished(&a), "a finished filesystem");
    assert!(matches!(s.plan(&a).1, Verdict::Ours { .. }));
    assert!(s.records().is_empty(), "{:?}", s.records());

    let rec = RecordingFormatter::default();
    // An xfs_copy of a disk of ours that aborted: our label, "in progress",
    // and the data. No record: never touched.
    let src = blank(dir.path(), "src");
    sh(&["mkfs.xfs", "-q", "-L", "disklet", src.path()]);
    let mnt = dir.path().join("mnt-src");
    {
        let _m = Mounted::new(src.path(), &mnt);
        std::fs::create_dir_all(mnt.join("vol")).unwrap();
        std::fs::write(mnt.join("vol/tenant.db"), "tenant data").unwrap();
    }
    let copy = blank(dir.path(), "copy");
    sh(&["xfs_copy", "-d", src.path(), copy.path()]);
    drop(src); // the copy is all there is now
    in_progress(&copy, true);
    let uuid_copy = blkid(copy.path(), "UUID");
    let (fp_copy, v) = s.plan(&copy);
    assert_eq!(
        v.refused().map(|r| r.as_str()),
        Some("foreign-filesystem"),
        "{v:?}"
    );
    let e = s.format(&copy, &fp_copy, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");

    // A record of that very UUID, but made for another disk.
    s.record(&uuid_copy, &a);
    let e = s.format(&copy, &s.plan(&copy).0, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");

    // Ours, recorded, but the mkfs finishes after the plan (a killed agent's
    // mkfs still ran).
    let b = blank(dir.path(), "b");
    let uuid_b = cut_short_mkfs(&b, "disklet");
    s.record(&uuid_b, &b);
    let (fp_b, v) = s.plan(&b);
    assert_eq!(v, Verdict::Eligible);
    in_progress(&b, false);
    let e = s.format(&b, &fp_b, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");

    // That mkfs still holds the disk.
    let c = blank(dir.path(), "c");
    let uuid_c = cut_short_mkfs(&c, "disklet");
    s.record(&uuid_c, &c);
    let (fp_c, _) = s.plan(&c);
    let holder = ExclusiveHolder::new(c.path());
    let e = s.format(&c, &fp_c, &rec).unwrap_err();
    assert_eq!(e.kind(), "not-eligible", "{e}");
    let erase = disklet::host::format::erase_unfinished_mkfs;
    assert!(
        erase(&c.dev, 320 << 20, &uuid_c).is_err(),
        "the erase itself opens the disk exclusively"
    );
    drop(holder);

    // The erase alone refuses anything but the unfinished xfs it was told of.
    assert!(erase(&c.dev, 320 << 20, &uuid_b).is_err(), "another UUID");
    assert!(erase(&a.dev, 320 << 20, &uuid).is_err(), "a finished one");
    let d = blank(dir.path(), "d");
    let uuid_d = cut_short_mkfs(&d, "data");
    s.record(&uuid_d, &d);
    assert!(erase(&d.dev, 320 << 20, &uuid_d).is_err(), "another label");
    let (fp_d, v) = s.plan(&d);
    assert_eq!(v.refused().map(|r| r.as_str()), Some("foreign-filesystem"));
    assert_eq!(
        s.format(&d, &fp_d, &rec).unwrap_err().kind(),
        "not-eligible"
    );

    assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    for (lp, u) in [
        (&a, &uuid),
        (&b, &uuid_b),
        (&c, &uuid_c),
        (&d, &uuid_d),
        (&copy, &uuid_copy),
    ] {
        assert_eq!(&blkid(lp.path(), "UUID"), u, "{} untouched", lp.path());
    }
    // The copy still holds its data.
    in_progress(&copy, false);
    let mnt = dir.path().join("mnt-copy");
    let _m = Mounted::new(copy.path(), &mnt);
    assert_eq!(
        std::fs::read_to_string(mnt.join("vol/tenant.db")).unwrap(),
        "tenant data"
    );
}

#[test]
fn mkfs_itself_never_overwrites_a_filesystem() {
    if skip_unless_root("mkfs without force") {
        return;
    }
    // The last line of defence: even called directly, past every interlock,
    // our mkfs command lines carry no force flag and refuse.
    let dir = tempfile::tempdir().unwrap();
    for (fs, existing) in [(FsType::Xfs, "mkfs.ext4"), (FsType::Ext4, "mkfs.xfs")] {
        let lp = Loop::new(dir.path(), existing, 320);
        sh(&[existing, "-q", lp.path()]);
        let before = blkid(lp.path(), "UUID");
        let e = MkfsFormatter::default().mkfs(&lp.dev, fs, "6a1f3c84-3c39-4c8e-a5f0-8b1d2b7f0c11");
        assert!(e.is_err(), "mkfs {} overwrote {existing}", fs.as_str());
        assert_eq!(blkid(lp.path(), "UUID"), before);
    }
}
