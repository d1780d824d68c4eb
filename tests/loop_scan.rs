//! Root tests: `disklet scan` on real loop devices, each prepared the way an
//! admin's disk might be (filesystems, swap, LUKS, partition tables, mounts,
//! exclusive holders, read-only, too small...), once without udevd and once
//! with a real udevd. Selectors name only the loops these tests attached, and
//! each one is checked to be backed by the test's own file before the scan.
#![allow(clippy::unwrap_used)]

mod support;

use std::any::Any;
use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;
use support::*;

/// udevd is machine-wide: the two modes must not overlap.
static MODE: Mutex<()> = Mutex::new(());

struct Expect {
    device: String,
    verdict: &'static str,
    reason: Option<&'static str>,
    signature: Option<&'static str>,
    /// Which class is expected to name the device (None: no class).
    class: Option<&'static str>,
}

/// One prepared device. Guards drop before the loop (field order).
struct Scenario {
    name: &'static str,
    _guards: Vec<Box<dyn Any>>,
    lp: Loop,
    expect: Vec<Expect>,
}

fn expect(
    lp: &Loop,
    class: Option<&'static str>,
    verdict: &'static str,
    reason: Option<&'static str>,
    signature: Option<&'static str>,
) -> Expect {
    Expect {
        device: lp.path().to_string(),
        verdict,
        reason,
        signature,
        class,
    }
}

fn scenario(
    name: &'static str,
    lp: Loop,
    guards: Vec<Box<dyn Any>>,
    e: impl FnOnce(&Loop) -> Vec<Expect>,
) -> Scenario {
    let expect = e(&lp);
    Scenario {
        name,
        _guards: guards,
        lp,
        expect,
    }
}

const MAIN: &str = "t-main";
const DISKS_ONLY: &str = "t-disks-only";
const UDEV: &str = "t-udev";

/// Prepares every scenario in `dir`. Returns them with the extra lines of
/// config their selectors need.
fn prepare(dir: &Path, with_udev: bool) -> (Vec<Scenario>, Vec<Box<dyn Any>>) {
    let mut s = Vec::new();
    let mut global: Vec<Box<dyn Any>> = Vec::new();
    let img = |n: &str| n.to_string();

    let lp = Loop::new(dir, &img("blank"), 320);
    s.push(scenario("blank", lp, vec![], |l| {
        vec![expect(l, Some(MAIN), "eligible", None, None)]
    }));

    for (name, mkfs, sig) in [
        ("ext4", vec!["mkfs.ext4", "-q"], "ext4"),
        ("xfs", vec!["mkfs.xfs", "-q"], "xfs"),
        ("btrfs", vec!["mkfs.btrfs", "-q"], "btrfs"),
        ("swap-signature", vec!["mkswap"], "swap"),
    ] {
        let lp = Loop::new(dir, name, 320);
        let mut args = mkfs.clone();
        args.push(lp.path());
        sh(&args);
        s.push(scenario(name, lp, vec![], |l| {
            vec![expect(
                l,
                Some(MAIN),
                "refused",
                Some("foreign-filesystem"),
                Some(sig),
            )]
        }));
    }

    let lp = Loop::new(dir, "luks", 320);
    luks_format(lp.path(), dir);
    s.push(scenario("luks", lp, vec![], |l| {
        vec![expect(
            l,
            Some(MAIN),
            "refused",
            Some("foreign-filesystem"),
            Some("crypto_LUKS"),
        )]
    }));

    for (name, label, want) in [("gpt", "gpt", "gpt"), ("mbr", "dos", "dos")] {
        let lp = Loop::new(dir, name, 320);
        sfdisk(lp.path(), &format!("label: {label}\n,64M\n"));
        s.push(scenario(name, lp, vec![], |l| {
            vec![expect(
                l,
                Some(MAIN),
                "refused",
                Some("partition-table"),
                Some(want),
            )]
        }));
    }

    // Partition nodes exist only when asked for: losetup -P, then partx.
    let file = dir.join("parts.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    {
        let tmp = Loop::new(dir, "parts", 320);
        sfdisk(tmp.path(), "label: gpt\n,64M\n");
    }
    let lp = Loop::with_flags(dir, "parts", 320, &["-P"]);
    let _ = std::process::Command::new("partx")
        .args(["-a", lp.path()])
        .status();
    let part = format!("{}p1", lp.path());
    assert!(Path::new(&part).exists(), "partx did not create {part}");
    s.push(scenario("has-partitions", lp, vec![], |l| {
        vec![
            expect(
                l,
                Some(MAIN),
                "refused",
                Some("has-partitions"),
                Some("gpt"),
            ),
            Expect {
                device: format!("{}p1", l.path()),
                verdict: "refused",
                reason: Some("partition"),
                signature: None,
                class: Some(MAIN),
            },
        ]
    }));

    let lp = Loop::new(dir, "mounted", 320);
    sh(&["mkfs.ext4", "-q", lp.path()]);
    let m = Mounted::new(lp.path(), &dir.join("mnt/mounted"));
    s.push(scenario("mounted", lp, vec![Box::new(m)], |l| {
        vec![expect(
            l,
            Some(MAIN),
            "refused",
            Some("mounted"),
            Some("ext4"),
        )]
    }));

    let lp = Loop::new(dir, "swapon", 320);
    sh(&["mkswap", lp.path()]);
    let sw = Swapon::new(lp.path());
    s.push(scenario("active swap", lp, vec![Box::new(sw)], |l| {
        vec![expect(l, Some(MAIN), "refused", Some("swap"), Some("swap"))]
    }));

    let lp = Loop::new(dir, "held", 320);
    let h = ExclusiveHolder::new(lp.path());
    s.push(scenario(
        "held O_EXCL by another process",
        lp,
        vec![Box::new(h)],
        |l| vec![expect(l, Some(MAIN), "refused", Some("busy"), None)],
    ));

    let lp = Loop::with_flags(dir, "readonly", 320, &["-r"]);
    s.push(scenario("read-only", lp, vec![], |l| {
        vec![expect(l, Some(MAIN), "refused", Some("read-only"), None)]
    }));

    let lp = Loop::new(dir, "small", 64);
    s.push(scenario("below minSize", lp, vec![], |l| {
        vec![expect(l, Some(MAIN), "refused", Some("too-small"), None)]
    }));

    let lp = Loop::new(dir, "notype", 320);
    s.push(scenario("loop not in types", lp, vec![], |l| {
        vec![expect(
            l,
            Some(DISKS_ONLY),
            "refused",
            Some("type-not-allowed"),
            None,
        )]
    }));

    let lp = Loop::new(dir, "unnamed", 320);
    s.push(scenario("named by no selector", lp, vec![], |l| {
        vec![expect(l, None, "refused", Some("no-class-matches"), None)]
    }));

    let lp = Loop::new(dir, "junk", 320);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(lp.path())
            .unwrap();
        f.write_all_at(b"some bytes no probe knows", 8192).unwrap();
        f.sync_all().unwrap();
    }
    s.push(scenario("data without a signature", lp, vec![], |l| {
        vec![expect(l, Some(MAIN), "refused", Some("unknown-data"), None)]
    }));

    let lp = Loop::new(dir, "kubelet", 320);
    sh(&["mkfs.ext4", "-q", lp.path()]);
    let m = Mounted::new(lp.path(), &dir.join("kubelet"));
    s.push(scenario(
        "holds the kubelet dir",
        lp,
        vec![Box::new(m)],
        |l| {
            vec![expect(
                l,
                Some(MAIN),
                "refused",
                Some("os-disk"),
                Some("ext4"),
            )]
        },
    ));

    let lp = Loop::new(dir, "ours", 320);
    sh(&["mkfs.xfs", "-q", "-L", "disklet", lp.path()]);
    s.push(scenario("disklet filesystem", lp, vec![], |l| {
        vec![expect(l, Some(MAIN), "ours", None, Some("xfs"))]
    }));

    let lp = Loop::new(dir, "ours-mounted", 320);
    sh(&["mkfs.ext4", "-q", "-L", "disklet", lp.path()]);
    let m = Mounted::new(lp.path(), &dir.join("hostdir/t-main/ours"));
    s.push(scenario(
        "disklet filesystem mounted under hostDir",
        lp,
        vec![Box::new(m)],
        |l| vec![expect(l, Some(MAIN), "ours", None, Some("ext4"))],
    ));

    if with_udev {
        let lp = Loop::new(dir, "tagged", 320);
        let rule = UdevRule::new(
            &format!("99-disklet-test-{}.rules", std::process::id()),
            &format!("ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"{}\", ENV{{DISKLET_CLASS}}=\"{}\"\n", lp.name(), udev_tag()),
        );
        sh(&[
            "udevadm",
            "trigger",
            "--action=change",
            "--settle",
            &format!("/sys/class/block/{}", lp.name()),
        ]);
        global.push(Box::new(rule));
        s.push(scenario("tagged by a udev rule", lp, vec![], |l| {
            vec![expect(l, Some(UDEV), "eligible", None, None)]
        }));
    }
    (s, global)
}

fn udev_tag() -> String {
    format!("disklet-test-{}", std::process::id())
}

fn config(dir: &Path, s: &[Scenario], with_udev: bool) -> String {
    let mut main = Vec::new();
    let mut disks_only = Vec::new();
    for sc in s {
        sc.lp.assert_ours();
        for e in &sc.expect {
            match e.class {
                Some(MAIN) => main.push(e.device.clone()),
                Some(DISKS_ONLY) => disks_only.push(e.device.clone()),
                _ => {}
            }
        }
    }
    let q = |v: &[String]| {
        v.iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: {MAIN}\n    settleSeconds: 0\n    selector:\n      paths: [{}]\n      types: [loop]\n      minSize: 300Mi\n  - name: {DISKS_ONLY}\n    selector:\n      paths: [{}]\n",
        q(&main),
        q(&disks_only),
        d = dir.display()
    );
    if with_udev {
        text.push_str(&format!("  - name: {UDEV}\n    selector:\n      udev: {{DISKLET_CLASS: \"{}\"}}\n      types: [loop]\n", udev_tag()));
    }
    text
}

fn check(rows: &[Value], s: &[Scenario], with_udev: bool) -> Vec<String> {
    let mut failures = Vec::new();
    for sc in s {
        for e in &sc.expect {
            let Some(row) = rows.iter().find(|r| r["device"] == e.device.as_str()) else {
                failures.push(format!("{}: {} missing from scan", sc.name, e.device));
                continue;
            };
            let got = (
                row["verdict"].as_str(),
                row["reason"].as_str(),
                row["signature"].as_str(),
                row["class"].as_str(),
            );
            let want = (Some(e.verdict), e.reason, e.signature, e.class);
            if got != want {
                failures.push(format!(
                    "{}: {} got {got:?}, want {want:?} ({})",
                    sc.name, e.device, row["detail"]
                ));
            }
            let want_udev = if with_udev {
                "processed"
            } else {
                "not-running"
            };
            if row["udev"] != want_udev {
                failures.push(format!(
                    "{}: udev state {} want {want_udev}",
                    sc.name, row["udev"]
                ));
            }
        }
        let row = rows.iter().find(|r| r["device"] == sc.lp.path()).unwrap();
        let want_size = std::fs::metadata(&sc.lp.file).unwrap().len();
        if row["size_bytes"] != want_size {
            failures.push(format!(
                "{}: size {} want {want_size}",
                sc.name, row["size_bytes"]
            ));
        }
        let id = format!("loop-file:{}", sc.lp.file.display());
        if row["identity"] != id.as_str() {
            failures.push(format!(
                "{}: identity {} want {id}",
                sc.name, row["identity"]
            ));
        }
    }
    failures
}

fn run(with_udev: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (scenarios, _global) = prepare(dir.path(), with_udev);
    if with_udev {
        Udevd::reprocess(&scenarios.iter().map(|s| &s.lp).collect::<Vec<_>>());
    }
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config(dir.path(), &scenarios, with_udev)).unwrap();
    let rows = scan_json(&cfg);
    let failures = check(&rows, &scenarios, with_udev);
    if with_udev {
        // udev enriches: filesystems get by-uuid links, every disk a by-diskseq link.
        let ext4 = scenarios.iter().find(|s| s.name == "ext4").unwrap();
        let row = rows.iter().find(|r| r["device"] == ext4.lp.path()).unwrap();
        let links: Vec<&str> = row["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l.as_str())
            .collect();
        assert!(
            links.iter().any(|l| l.starts_with("/dev/disk/by-uuid/")),
            "links {links:?}"
        );
    } else {
        assert!(
            rows.iter()
                .all(|r| r["links"].as_array().unwrap().is_empty()),
            "no udevd, no links believed"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        scenarios.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} scenarios checked ({} devices)",
        scenarios.len(),
        scenarios.iter().map(|s| s.expect.len()).sum::<usize>()
    );
}

#[test]
fn scan_verdicts_on_loop_devices_without_udevd() {
    if skip_unless_root("scan_verdicts_on_loop_devices_without_udevd") {
        return;
    }
    let _mode = MODE.lock().unwrap_or_else(|e| e.into_inner());
    if udevd_alive() {
        eprintln!("SKIPPED scan_verdicts_on_loop_devices_without_udevd: a udevd not started by this test runs on this machine");
        return;
    }
    run(false);
}

#[test]
fn scan_verdicts_on_loop_devices_with_udevd() {
    if skip_unless_root("scan_verdicts_on_loop_devices_with_udevd") {
        return;
    }
    let _mode = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_udevd) = Udevd::start() else {
        eprintln!("SKIPPED scan_verdicts_on_loop_devices_with_udevd: systemd-udevd is not installed (apt-get install udev)");
        return;
    };
    run(true);
}
