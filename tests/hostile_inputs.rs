//! Hostile and odd inputs: configs with every key wrong in turn, udev
//! properties and discovery-dir entry names made of spaces, newlines, unicode
//! and shell metacharacters, symlink loops in discovery dirs, and two devices
//! carrying the same filesystem UUID. Each test drives the real binary.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use support::agent::{blkid, Agent, MountSweeper};
use support::*;

/// Runs the binary with a deadline; a run that does not end is killed (by its
/// own pid) and reported as `None`: with a bad config it must end at once.
fn run_bounded(mut cmd: Command, limit: Duration) -> Option<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Some(out.unwrap()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = rx.recv_timeout(Duration::from_secs(10));
            None
        }
    }
}

fn disklet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_disklet"))
}

/// Root tests here share machine-wide state (udevd, udev rules): one at a
/// time. (tokio's Mutex: the guard is held across awaits, and works across
/// the tests' separate runtimes.)
static HOST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// When a udevd runs (ours or another test's), a device it has not processed
/// is pending; make it process ours.
fn udev_settle(loops: &[&Loop]) {
    if udevd_alive() {
        for l in loops {
            sh(&[
                "udevadm",
                "trigger",
                "--action=change",
                "--settle",
                &format!("/sys/class/block/{}", l.name()),
            ]);
        }
    }
}

/// A small tmpfs on `at` (created), unmounted on drop. `at` may hold any byte.
fn tmpfs(at: &Path) -> Mounted {
    std::fs::create_dir_all(at).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "disklet-hostile"])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs on {at:?}");
    Mounted(at.to_path_buf())
}

/// `disklet scan -o json` with a config; the rows.
fn scan_rows(cfg: &Path) -> Vec<serde_json::Value> {
    scan_json(cfg)
}

fn row<'a>(rows: &'a [serde_json::Value], device: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["device"] == device)
        .unwrap_or_else(|| panic!("no row for {device:?}"))
}

/// Kubernetes' label value rule: empty, or at most 63 characters of
/// alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> &'a str {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(k))
        .map(String::as_str)
        .unwrap_or("")
}

fn local_path(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.local.as_ref())
        .map(|l| l.path.clone())
        .unwrap_or_default()
}

/// How many Warning `DiscoveryEntryRefused` Events name `quoted` (the
/// entry's path as `{:?}` prints it) with `reason`, once there is at least
/// one (they come from the pass that saw the entry; repeats are held back,
/// so more than one is a defect).
async fn refusal_events(env: &support::agent::Env, quoted: &str, reason: &str) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = env
            .events()
            .await
            .into_iter()
            .filter(|(t, r, note)| {
                t == "Warning"
                    && r == "DiscoveryEntryRefused"
                    && note.starts_with(&format!("{quoted}: {reason}:"))
            })
            .count();
        if n > 0 || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent_config(d: &Path, classes: &str) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n{classes}",
        d = d.display()
    )
}

// ---------------------------------------------------------------------------
// 1. Configs, every key wrong in turn.

/// A valid config that sets every key the config accepts. Its selector needs
/// a backing file in the test's dir *and* a udev property and a by-id link no
/// device has, so even the valid config names no device.
const BASE: &str = "\
hostDir: {d}/host
kubeletDir: {d}/kubelet
mountInfo: /proc/self/mountinfo
topologyKeys: [topology.kubernetes.io/zone]
resyncSeconds: 60
classes:
  - name: fast
    storageClassName: local-fast
    volumeMode: Filesystem
    accessMode: ReadWriteOnce
    fsType: ext4
    settleSeconds: 1
    blankCheck: zeroed
    selector:
      paths: [\"/dev/disk/by-id/disklet-hostile-none-*\"]
      udev: {DISKLET_CLASS: \"disklet-hostile-none\"}
      backingFiles: [\"{d}/disks/*.img\"]
      types: [loop]
      minSize: 1Mi
      maxSize: 1Ti
      rotational: false
      removable: false
    discoveryDirs: [{d}/disc]
    mountOptions: [noatime]
    publishFsType: false
    cleanup: reformat
";

/// One wrong value: edits of BASE, the key path stderr must name, and a
/// fragment of the hint that says what to do.
struct Case {
    edits: Vec<(&'static str, &'static str)>,
    key: &'static str,
    hint: &'static str,
}

fn case(edits: &[(&'static str, &'static str)], key: &'static str, hint: &'static str) -> Case {
    Case {
        edits: edits.to_vec(),
        key,
        hint,
    }
}

/// Every key, in turn: wrong type, invalid value, unknown and misspelt keys at
/// each level, duplicates.
fn cases() -> Vec<Case> {
    const HOST: &str = "hostDir: {d}/host";
    const KUBELET: &str = "kubeletDir: {d}/kubelet";
    const MI: &str = "mountInfo: /proc/self/mountinfo";
    const TOPO: &str = "topologyKeys: [topology.kubernetes.io/zone]";
    const RESYNC: &str = "resyncSeconds: 60";
    const NAME: &str = "  - name: fast";
    const SC: &str = "    storageClassName: local-fast";
    const VM: &str = "    volumeMode: Filesystem";
    const AM: &str = "    accessMode: ReadWriteOnce";
    const FS: &str = "    fsType: ext4";
    const SETTLE: &str = "    settleSeconds: 1";
    const BLANK: &str = "    blankCheck: zeroed";
    const PATHS: &str = "      paths: [\"/dev/disk/by-id/disklet-hostile-none-*\"]";
    const UDEV: &str = "      udev: {DISKLET_CLASS: \"disklet-hostile-none\"}";
    const BF: &str = "      backingFiles: [\"{d}/disks/*.img\"]";
    const TYPES: &str = "      types: [loop]";
    const MIN: &str = "      minSize: 1Mi";
    const MAX: &str = "      maxSize: 1Ti";
    const ROT: &str = "      rotational: false";
    const REM: &str = "      removable: false";
    const DD: &str = "    discoveryDirs: [{d}/disc]";
    const MO: &str = "    mountOptions: [noatime]";
    const PFT: &str = "    publishFsType: false";
    const CLEAN: &str = "    cleanup: reformat";
    vec![
        // hostDir
        case(&[(HOST, "hostDir: host")], "hostDir", "absolute"),
        case(&[(HOST, "hostDir: \"\"")], "hostDir", "absolute"),
        case(&[(HOST, "hostDir: [a]")], "hostDir", "expected"),
        case(&[(HOST, "hostDir: /")], "hostDir", "of its own"),
        case(&[(HOST, "hostDir: {d}/kubelet/disklet")], "hostDir", "of its own"),
        case(&[(HOST, "hostDir: {d}/x/../kubelet/d")], "hostDir", "without it"),
        case(&[(HOST, "hostdir: {d}/host")], "hostdir", "did you mean `hostDir`"),
        case(&[(HOST, "hostDir: {d}/host\nhostDir: {d}/other")], "hostDir", "once"),
        // kubeletDir
        case(&[(KUBELET, "kubeletDir: var/lib/kubelet")], "kubeletDir", "absolute"),
        case(&[(KUBELET, "kubeletDir: {a: b}")], "kubeletDir", "expected"),
        case(&[(KUBELET, "kubeletDir: {d}/host/k")], "hostDir", "of its own"),
        case(&[(KUBELET, "kubeletDir: {d}/k/..")], "kubeletDir", "without it"),
        case(&[(KUBELET, "kubletDir: {d}/kubelet")], "kubletDir", "did you mean `kubeletDir`"),
        // mountInfo
        case(&[(MI, "mountInfo: proc/1/mountinfo")], "mountInfo", "absolute"),
        case(&[(MI, "mountInfo: [/proc/1/mountinfo]")], "mountInfo", "expected"),
        case(&[(MI, "mountinfo: /proc/1/mountinfo")], "mountinfo", "did you mean `mountInfo`"),
        // topologyKeys
        case(&[(TOPO, "topologyKeys: topology.kubernetes.io/zone")], "topologyKeys", "list"),
        case(&[(TOPO, "topologyKeys: [\"bad key\"]")], "topologyKeys[0]", "e.g. topology.kubernetes.io/zone"),
        case(&[(TOPO, "topologyKeys: [\"\"]")], "topologyKeys[0]", "1 to 63"),
        case(&[(TOPO, "topologyKeys: [UPPER.io/zone]")], "topologyKeys[0]", "DNS subdomain"),
        case(&[(TOPO, "topologyKeys: [a/b/c]")], "topologyKeys[0]", "one '/'"),
        case(&[(TOPO, "topologyKeys: [-zone]")], "topologyKeys[0]", "starting and ending"),
        case(&[(TOPO, "topologyKeys: [zone, zone]")], "topologyKeys[1]", "once"),
        case(&[(TOPO, "topologyKeys: [[zone]]")], "topologyKeys[0]", "expected a string"),
        case(&[(TOPO, "topologykeys: [zone]")], "topologykeys", "did you mean `topologyKeys`"),
        // resyncSeconds
        case(&[(RESYNC, "resyncSeconds: -1")], "resyncSeconds", "whole number"),
        case(&[(RESYNC, "resyncSeconds: 0")], "resyncSeconds", "1..86400"),
        case(&[(RESYNC, "resyncSeconds: 86401")], "resyncSeconds", "1..86400"),
        case(&[(RESYNC, "resyncSeconds: 99999999999999999999999")], "resyncSeconds", "whole number"),
        case(&[(RESYNC, "resyncSeconds: \"60\"")], "resyncSeconds", "whole number"),
        case(&[(RESYNC, "resyncSeconds: 1.5")], "resyncSeconds", "whole number"),
        case(&[(RESYNC, "resyncSeconds: ~")], "resyncSeconds", "whole number"),
        case(&[(RESYNC, "resyncSecs: 60")], "resyncSecs", "did you mean `resyncSeconds`"),
        case(&[(RESYNC, "resyncSeconds: 60\nreprobeSeconds: 0")], "reprobeSeconds", "1..86400"),
        case(&[(RESYNC, "resyncSeconds: 60\nreprobeSeconds: 86401")], "reprobeSeconds", "1..86400"),
        case(&[(RESYNC, "resyncSeconds: 60\nreprobeSeconds: \"600\"")], "reprobeSeconds", "whole number"),
        case(&[(RESYNC, "resyncSeconds: 60\nformatConcurrency: 0")], "formatConcurrency", "1..64"),
        case(&[(RESYNC, "resyncSeconds: 60\nformatConcurrency: 65")], "formatConcurrency", "1..64"),
        case(&[(RESYNC, "resyncSeconds: 60\nformatConcurrency: -1")], "formatConcurrency", "whole number"),
        // classes and unknown top-level keys
        case(&[("classes:\n", "classes: fast\nx:\n")], "classes", "list"),
        case(&[("classes:\n", "clases:\n")], "clases", "did you mean `classes`"),
        case(&[(RESYNC, "resyncSeconds: 60\ncolour: blue")], "colour", "expected one of"),
        case(&[(HOST, "hostDir: \"{d}/host")], "(yaml syntax)", "at line"),
        // classes[].name
        case(&[(NAME, "  - name: \"\"")], "classes[0].name", "1 to 63"),
        case(&[(NAME, "  - name: Fast")], "classes[0].name", "lowercase"),
        case(&[(NAME, "  - name: -fast")], "classes[0].name", "start and end"),
        case(&[(NAME, "  - name: fast_disks")], "classes[0].name", "lowercase"),
        case(
            &[(NAME, "  - name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")],
            "classes[0].name",
            "1 to 63",
        ),
        case(&[(NAME, "  - name: [fast]")], "classes[0].name", "expected a string"),
        case(&[(NAME, "  - nmae: fast")], "classes[0].nmae", "did you mean `name`"),
        case(&[(NAME, "  -")], "classes[0].name", "required"),
        case(&[(NAME, "  - name: fast\n    name: slow")], "classes[0].name", "once"),
        case(&[(CLEAN, "    cleanup: reformat\n  - name: fast\n    selector: {backingFiles: [\"{d}/b/*.img\"], types: [loop]}")], "classes[1].name", "unique"),
        // storageClassName
        case(&[(SC, "    storageClassName: \"\"")], "classes[0].storageClassName", "1 to 253"),
        case(&[(SC, "    storageClassName: Local Fast")], "classes[0].storageClassName", "lowercase DNS"),
        case(&[(SC, "    storageClassName: [local-fast]")], "classes[0].storageClassName", "expected a string"),
        case(&[(SC, "    storageclassname: local-fast")], "classes[0].storageclassname", "did you mean `storageClassName`"),
        // accessMode
        case(&[(AM, "    accessMode: ReadWriteMany")], "classes[0].accessMode", "`ReadWriteOnce` or `ReadWriteOncePod`"),
        case(&[(AM, "    accessMode: RWO")], "classes[0].accessMode", "`ReadWriteOnce` or `ReadWriteOncePod`"),
        // volumeMode
        case(&[(VM, "    volumeMode: Raw")], "classes[0].volumeMode", "`Filesystem` or `Block`"),
        case(&[(VM, "    volumeMode: filesystem")], "classes[0].volumeMode", "`Filesystem` or `Block`"),
        case(&[(VM, "    volumeMode: 1")], "classes[0].volumeMode", "`Filesystem` or `Block`"),
        case(&[(VM, "    volumeMode: Block")], "classes[0].mountOptions", "remove it here"),
        // fsType
        case(&[(FS, "    fsType: btrfs")], "classes[0].fsType", "`xfs` or `ext4`"),
        case(&[(FS, "    fsType: XFS")], "classes[0].fsType", "`xfs` or `ext4`"),
        case(&[(FS, "    fsType: [xfs]")], "classes[0].fsType", "`xfs` or `ext4`"),
        case(&[(FS, "    fs_type: xfs")], "classes[0].fs_type", "did you mean `fsType`"),
        // settleSeconds
        case(&[(SETTLE, "    settleSeconds: -5")], "classes[0].settleSeconds", "whole number"),
        case(&[(SETTLE, "    settleSeconds: 3601")], "classes[0].settleSeconds", "0..3600"),
        case(&[(SETTLE, "    settleSeconds: 99999999999")], "classes[0].settleSeconds", "0..3600"),
        case(&[(SETTLE, "    settleSeconds: 5s")], "classes[0].settleSeconds", "whole number"),
        case(&[(SETTLE, "    settleSeconds: 0.5")], "classes[0].settleSeconds", "whole number"),
        // blankCheck
        case(&[(BLANK, "    blankCheck: paranoid")], "classes[0].blankCheck", "`zeroed` or `signatures`"),
        case(&[(BLANK, "    blankCheck: true")], "classes[0].blankCheck", "`zeroed` or `signatures`"),
        case(&[(BLANK, "    blankcheck: zeroed")], "classes[0].blankcheck", "did you mean `blankCheck`"),
        // selector
        case(&[("    selector:\n", "    selector: all\n    x:\n")], "classes[0].selector", "expected"),
        case(
            &[(PATHS, ""), (UDEV, ""), (BF, ""), (DD, "    discoveryDirs: []")],
            "classes[0].selector",
            "give `paths`, `udev` or `backingFiles`",
        ),
        case(&[(PATHS, "      paths: /dev/sdz")], "classes[0].selector.paths", "list"),
        case(&[(PATHS, "      paths: [sda]")], "classes[0].selector.paths[0]", "must start with /dev/"),
        case(&[(PATHS, "      paths: [\"\"]")], "classes[0].selector.paths[0]", "must start with /dev/"),
        case(&[(PATHS, "      paths: [\"/dev/*\"]")], "classes[0].selector.paths[0]", "name the disks"),
        case(&[(PATHS, "      paths: [\"/dev/disk/by-id/**\"]")], "classes[0].selector.paths[0]", "name the disks"),
        case(&[(PATHS, "      paths: [\"/dev/disk/by-id/{a\"]")], "classes[0].selector.paths[0]", "bad glob"),
        case(&[(PATHS, "      paths: [\"/dev/disk/by-id/../sda\"]")], "classes[0].selector.paths[0]", "without it"),
        case(&[(PATHS, "      path: [/dev/sdz]")], "classes[0].selector.path", "did you mean `paths`"),
        // selector.udev
        case(&[(UDEV, "      udev: [DISKLET_CLASS]")], "classes[0].selector.udev", "mapping"),
        case(&[(UDEV, "      udev: {\"\": x}")], "classes[0].selector.udev", "DISKLET_CLASS"),
        case(&[(UDEV, "      udev: {\"A B\": x}")], "classes[0].selector.udev.A B", "not a udev property name"),
        case(&[(UDEV, "      udev: {\"A=B\": x}")], "classes[0].selector.udev.A=B", "not a udev property name"),
        case(&[(UDEV, "      udev: {DISKLET_CLASS: \"\"}")], "classes[0].selector.udev.DISKLET_CLASS", "for any"),
        case(&[(UDEV, "      udev: {DISKLET_CLASS: }")], "classes[0].selector.udev.DISKLET_CLASS", "for any"),
        case(&[(UDEV, "      udev: {DISKLET_CLASS: \"[x\"}")], "classes[0].selector.udev.DISKLET_CLASS", "bad glob"),
        case(&[(UDEV, "      udev: {DISKLET_CLASS: [a]}")], "classes[0].selector.udev.DISKLET_CLASS", "expected a string"),
        case(&[(UDEV, "      Udev: {DISKLET_CLASS: x}")], "classes[0].selector.Udev", "did you mean `udev`"),
        // selector.backingFiles
        case(&[(BF, "      backingFiles: [disks/*.img]")], "classes[0].selector.backingFiles[0]", "absolute"),
        case(&[(BF, "      backingFiles: [\"/*\"]")], "classes[0].selector.backingFiles[0]", "any loop device"),
        case(&[(BF, "      backingFiles: [\"/**\"]")], "classes[0].selector.backingFiles[0]", "any loop device"),
        case(&[(BF, "      backingFiles: [\"/*/disks/*.img\"]")], "classes[0].selector.backingFiles[0]", "any loop device"),
        case(&[(BF, "      backingFiles: [\"{d}/[disks/*.img\"]")], "classes[0].selector.backingFiles[0]", "bad glob"),
        case(&[(BF, "      backingFiles: [\"{d}/x/../disks/*.img\"]")], "classes[0].selector.backingFiles[0]", "without it"),
        case(&[(BF, "      backingFiles: \"{d}/disks/*.img\"")], "classes[0].selector.backingFiles", "list"),
        case(&[(TYPES, "      types: [disk]")], "classes[0].selector.backingFiles", "add `loop` to types"),
        case(&[(BF, "      backingfiles: [\"{d}/disks/*.img\"]")], "classes[0].selector.backingfiles", "did you mean `backingFiles`"),
        // selector.types
        case(&[(TYPES, "      types: [floppy]")], "classes[0].selector.types[0]", "expected one of"),
        case(&[(TYPES, "      types: [Loop]")], "classes[0].selector.types[0]", "expected one of"),
        case(&[(TYPES, "      types: loop")], "classes[0].selector.types", "list"),
        case(&[(TYPES, "      types: []")], "classes[0].selector.types", "list the kinds"),
        case(&[(TYPES, "      type: [loop]")], "classes[0].selector.type", "did you mean `types`"),
        // selector.minSize / maxSize
        case(&[(MIN, "      minSize: -1")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: 1.5")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: 1.5Gi")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: 10GB")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: 99999999Ei")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: [1Gi]")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: true")], "classes[0].selector.minSize", "e.g. 500Gi"),
        case(&[(MIN, "      minSize: 2Ti")], "classes[0].selector.minSize", "larger than maxSize"),
        case(&[(MAX, "      maxSize: big")], "classes[0].selector.maxSize", "e.g. 500Gi"),
        case(&[(MAX, "      maxSize: -5Gi")], "classes[0].selector.maxSize", "e.g. 500Gi"),
        case(&[(MAX, "      maxsize: 1Ti")], "classes[0].selector.maxsize", "did you mean `maxSize`"),
        // selector.rotational / removable
        case(&[(ROT, "      rotational: maybe")], "classes[0].selector.rotational", "true or false"),
        case(&[(ROT, "      rotational: 1")], "classes[0].selector.rotational", "true or false"),
        case(&[(REM, "      removable: \"no\"")], "classes[0].selector.removable", "true or false"),
        case(&[(REM, "      removable: 1")], "classes[0].selector.removable", "true or false"),
        case(&[(REM, "      removeable: false")], "classes[0].selector.removeable", "did you mean `removable`"),
        case(&[(REM, "      removable: false\n      model: x")], "classes[0].selector.model", "expected one of"),
        case(&[(REM, "      removable: false\n      types: [disk]")], "classes[0].selector.types", "once"),
        // discoveryDirs
        case(&[(DD, "    discoveryDirs: [disc]")], "classes[0].discoveryDirs[0]", "absolute"),
        case(&[(DD, "    discoveryDirs: [\"\"]")], "classes[0].discoveryDirs[0]", "absolute"),
        case(&[(DD, "    discoveryDirs: {d}/disc")], "classes[0].discoveryDirs", "list"),
        case(&[(DD, "    discoveryDirs: [{d}/host/disc]")], "classes[0].discoveryDirs[0]", "of its own"),
        case(&[(DD, "    discoveryDirs: [{d}]")], "classes[0].discoveryDirs[0]", "of its own"),
        case(&[(DD, "    discoveryDirs: [/]")], "classes[0].discoveryDirs[0]", "of its own"),
        case(&[(DD, "    discoveryDirs: [{d}/kubelet]")], "classes[0].discoveryDirs[0]", "of its own"),
        case(&[(DD, "    discoveryDirs: [{d}/kubelet/plugins]")], "classes[0].discoveryDirs[0]", "of its own"),
        case(&[(DD, "    discoveryDirs: [{d}/x/../disc]")], "classes[0].discoveryDirs[0]", "without it"),
        case(&[(DD, "    discoveryDirs: [{d}/disc, {d}/disc]")], "classes[0].discoveryDirs[1]", "list each directory once"),
        case(
            &[(CLEAN, "    cleanup: reformat\n  - name: slow\n    discoveryDirs: [{d}/disc/inner]")],
            "classes[1].discoveryDirs[0]",
            "list each directory once",
        ),
        case(&[(DD, "    discoverydirs: [{d}/disc]")], "classes[0].discoverydirs", "did you mean `discoveryDirs`"),
        // mountOptions
        case(&[(MO, "    mountOptions: noatime")], "classes[0].mountOptions", "list"),
        case(&[(MO, "    mountOptions: [\"\"]")], "classes[0].mountOptions[0]", "one option per entry"),
        case(&[(MO, "    mountOptions: [\"noatime,,nodev\"]")], "classes[0].mountOptions[0]", "one option per entry"),
        case(&[(MO, "    mountOptions: [\"no atime\"]")], "classes[0].mountOptions[0]", "one option per entry"),
        case(&[(MO, "    mountOptions: [nouuid]")], "classes[0].mountOptions[0]", "remove it"),
        case(&[(MO, "    mountOptions: [\"noatime,nouuid\"]")], "classes[0].mountOptions[0]", "remove it"),
        case(&[(MO, "    mountOptions: [noatime, ro]")], "classes[0].mountOptions[1]", "remove it"),
        case(&[(MO, "    mountOptions: [[noatime]]")], "classes[0].mountOptions[0]", "expected a string"),
        case(&[(MO, "    mount_options: [noatime]")], "classes[0].mount_options", "did you mean `mountOptions`"),
        // publishFsType
        case(&[(PFT, "    publishFsType: \"yes\"")], "classes[0].publishFsType", "true or false"),
        case(&[(PFT, "    publishFsType: yes")], "classes[0].publishFsType", "true or false"),
        case(&[(PFT, "    publishFsType: true")], "classes[0].mountOptions", "remove it here"),
        case(&[(PFT, "    publishFsType: true"), (MO, ""), (VM, "    volumeMode: Block")], "classes[0].publishFsType", "volumeMode: Filesystem"),
        case(&[(PFT, "    publishFSType: false")], "classes[0].publishFSType", "did you mean `publishFsType`"),
        // cleanup
        case(&[(CLEAN, "    cleanup: shred")], "classes[0].cleanup", "expected one of"),
        case(&[(CLEAN, "    cleanup: Reformat")], "classes[0].cleanup", "expected one of"),
        case(&[(CLEAN, "    cleanup: [files]")], "classes[0].cleanup", "expected one of"),
        case(&[(CLEAN, "    clean: files")], "classes[0].clean", "did you mean `cleanup`"),
        // unknown class key, duplicates
        case(&[(CLEAN, "    cleanup: reformat\n    reclaimPolicy: Delete")], "classes[0].reclaimPolicy", "expected one of"),
        case(&[(CLEAN, "    cleanup: reformat\n    fsType: xfs")], "classes[0].fsType", "once"),
    ]
}

fn apply(case: &Case, d: &Path) -> String {
    let mut text = BASE.to_string();
    for (from, to) in &case.edits {
        assert!(text.contains(from), "edit {from:?} not in the base config");
        text = text.replacen(from, to, 1);
    }
    text.replace("{d}", d.to_str().unwrap())
}

/// Catches: a wrong value accepted silently (exit 0, or the agent running on
/// it), a problem reported without its key path or without a hint, anything
/// done before the config is checked (hostDir created, a mount, an API call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_config_key_wrong_in_turn_stops_before_touching_anything() {
    let env = support::agent::env().await;
    let d = env.path().to_path_buf();
    let _sweep = MountSweeper(d.clone());
    let cfg = d.join("config.yaml");

    // The base config is valid: every failure below comes from its one edit.
    std::fs::write(&cfg, BASE.replace("{d}", d.to_str().unwrap())).unwrap();
    let out = run_bounded(
        {
            let mut c = disklet();
            c.args(["scan", "--output", "json", "--config"]).arg(&cfg);
            c
        },
        Duration::from_secs(120),
    )
    .expect("scan ends");
    assert!(
        out.status.success(),
        "the base config is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        rows.iter()
            .filter(|r| r["type"] != "dir" && r["type"] != "dir-entry")
            .all(|r| r["class"].is_null()),
        "the base config names no device"
    );

    let cases = cases();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let text = apply(c, &d);
        std::fs::write(&cfg, &text).unwrap();
        let key = c.key.replace("{d}", d.to_str().unwrap());
        let mut scan = disklet();
        scan.args(["scan", "--config"]).arg(&cfg);
        let mut run = disklet();
        run.args(["run", "--config"])
            .arg(&cfg)
            .args(["--node-name", "node-a", "--listen", "127.0.0.1:0"])
            .env("KUBECONFIG", &env.kubeconfig);
        for (what, cmd) in [("scan", scan), ("run", run)] {
            let Some(out) = run_bounded(cmd, Duration::from_secs(30)) else {
                failures.push(format!(
                    "case {i} ({what}) still running after 30s: accepted\n{text}"
                ));
                continue;
            };
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("- {key}: ")));
            if out.status.code() != Some(2) {
                failures.push(format!(
                    "case {i} ({what}): exit {:?}, want 2; stderr: {err}\n{text}",
                    out.status.code()
                ));
            } else if line.is_none() {
                failures.push(format!(
                    "case {i} ({what}): no problem line for key {key:?}: {err}"
                ));
            } else if !line.is_some_and(|l| l.contains(c.hint)) {
                failures.push(format!(
                    "case {i} ({what}): hint {:?} missing for {key}: {err}",
                    c.hint
                ));
            } else if !err.contains(cfg.to_str().unwrap()) {
                failures.push(format!("case {i} ({what}): the file is not named: {err}"));
            }
            if !out.stdout.is_empty() {
                failures.push(format!(
                    "case {i} ({what}): printed a result with a bad config"
                ));
            }
            if d.join("host").exists() {
                failures.push(format!("case {i} ({what}): hostDir was created"));
                let _ = std::fs::remove_dir_all(d.join("host"));
            }
            let mounts = MountSweeper::mounts_under(&d);
            if !mounts.is_empty() {
                failures.push(format!("case {i} ({what}): mounts appeared: {mounts:?}"));
            }
            let reqs = env.server.requests();
            if !reqs.is_empty() {
                failures.push(format!(
                    "case {i} ({what}): {} API requests, first {} {}",
                    reqs.len(),
                    reqs[0].method,
                    reqs[0].path
                ));
                env.server.clear_requests();
            }
        }
    }
    eprintln!(
        "{} wrong configs checked, each with scan and run ({} runs)",
        cases.len(),
        cases.len() * 2
    );
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}",
        failures.len(),
        cases.len() * 2,
        failures.join("\n---\n")
    );
}

/// Catches: the request check above being blind. The same harness, with the
/// valid base config, does reach the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_valid_base_config_does_reach_the_api_server() {
    let env = support::agent::env().await;
    let d = env.path().to_path_buf();
    let _sweep = MountSweeper(d.clone());
    let agent = Agent::start(
        &env,
        "base",
        "node-a",
        &BASE.replace("{d}", d.to_str().unwrap()),
    );
    agent.wait_log("ready: first reconcile done");
    assert!(
        !env.server.requests().is_empty(),
        "the agent talked to the fake API server"
    );
    drop(agent);
}

// ---------------------------------------------------------------------------
// 2. Odd names: udev property values and discovery-dir entry names.

/// Catches: a udev value that makes the device's record unreadable (pending
/// forever: found with `e"\xff"`, the record was read as UTF-8), a value shown
/// other than udev stores it (the table broken by a control character), a
/// value that runs (nothing may execute it), a value put into a PV label
/// (the fake API server refuses invalid labels) or left out of the
/// annotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_udev_values_are_shown_as_stored_published_in_annotations_and_never_run() {
    if skip_unless_root(
        "odd_udev_values_are_shown_as_stored_published_in_annotations_and_never_run",
    ) {
        return;
    }
    let _host = HOST.lock().await;
    let Some(_udevd) = Udevd::start() else {
        eprintln!("SKIPPED odd_udev_values_are_shown_as_stored_published_in_annotations_and_never_run: systemd-udevd is not installed");
        return;
    };
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().to_path_buf();
    let ds = d.display().to_string();
    let odd = d.join("odd");
    // (as written in the rule's e"..." string, what udev stores and disklet reads)
    let values: Vec<(String, String)> = vec![
        ("a b".into(), "a b".into()),
        // udevd writes the newline as is; its database is line-based, so the
        // value ends there (udevadm info shows `x` too).
        (r"x\ny".into(), "x".into()),
        (r"a\tb".into(), "a\tb".into()),
        ("ünï©ødé".into(), "ünï©ødé".into()),
        // `$$` is udev's literal `$`.
        (
            format!("$$(touch {ds}/pwned); rm -rf /"),
            format!("$(touch {ds}/pwned); rm -rf /"),
        ),
        (
            format!(r#"'\";|&<>`touch {ds}/pwned`"#),
            format!(r#"'";|&<>`touch {ds}/pwned`"#),
        ),
        // Not UTF-8: each odd byte shown as `\xNN` (U+FFFD would make two
        // different serials one identity).
        (r"\xff\xfe".into(), r"\xff\xfe".into()),
    ];
    let loops: Vec<Loop> = (0..values.len())
        .map(|i| Loop::new(&odd, &format!("u{i}"), 32))
        .collect();
    let mut rules = String::new();
    for (l, (written, _)) in loops.iter().zip(&values) {
        l.assert_ours();
        rules.push_str(&format!(
            "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"{k}\", ATTR{{loop/backing_file}}==\"{f}\", ENV{{ID_SERIAL}}=e\"{written}\", ENV{{ID_WWN}}=e\"wwn {written}\", ENV{{ID_MODEL}}=e\"model {written}\"\n",
            k = l.name(),
            f = l.file.display(),
        ));
    }
    let _rule = UdevRule::new(
        &format!("99-disklet-hostile-{}.rules", std::process::id()),
        &rules,
    );
    udev_settle(&loops.iter().collect::<Vec<_>>());

    let class = format!(
        "  - name: odd\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{ds}/odd/*.img\"], types: [loop]}}\n"
    );
    let cfg_text = agent_config(&d, &class);
    let cfg = d.join("scan.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();

    let rows = scan_rows(&cfg);
    let mut failures = Vec::new();
    for (l, (_, stored)) in loops.iter().zip(&values) {
        let r = row(&rows, l.path());
        let want = [
            ("udev", "processed".to_string()),
            ("serial", stored.clone()),
            ("wwid", format!("wwn {stored}")),
            ("identity", format!("wwn:wwn {stored}")),
            ("model", format!("model {stored}")),
            ("verdict", "eligible".to_string()),
        ];
        for (k, v) in want {
            if r[k] != v.as_str() {
                failures.push(format!("{}: {k} is {}, want {v:?}", l.path(), r[k]));
            }
        }
    }
    assert!(failures.is_empty(), "scan:\n{}", failures.join("\n"));
    // The table keeps one line per device whatever the values hold.
    let table = Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args(["scan", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert_eq!(table.lines().count(), rows.len() + 1, "{table}");
    assert!(table.contains("model a?b"), "a tab is shown as ?: {table}");
    assert!(!d.join("pwned").exists(), "a udev value was executed");

    // The agent formats, mounts and publishes every one of them.
    let agent = Agent::start(&env, "agent", "node-a", &cfg_text);
    let pvs = env
        .wait_pvs("disklet.io/node=node-a", "a PV per odd loop", |p| {
            p.len() == loops.len()
        })
        .await;
    for (l, (_, stored)) in loops.iter().zip(&values) {
        let file = l.file.display().to_string();
        let Some(pv) = pvs
            .iter()
            .find(|p| ann(p, "disklet.io/device-id") == format!("wwn:wwn {stored}"))
        else {
            failures.push(format!("{file}: no PV with device-id wwn:wwn {stored:?}"));
            continue;
        };
        if ann(pv, "disklet.io/serial") != stored {
            failures.push(format!(
                "{file}: serial annotation {:?}, want {stored:?}",
                ann(pv, "disklet.io/serial")
            ));
        }
        for (k, v) in pv.metadata.labels.as_ref().unwrap() {
            if !valid_label_value(v) {
                failures.push(format!(
                    "{file}: label {k}={v:?} is not a valid label value"
                ));
            }
        }
        if !Path::new(&local_path(pv)).is_dir() {
            failures.push(format!("{file}: PV path {} is not there", local_path(pv)));
        }
    }
    assert!(failures.is_empty(), "PVs:\n{}", failures.join("\n"));
    assert!(!d.join("pwned").exists(), "a udev value was executed");
    drop(agent);
}

/// A discovery dir with entries named with spaces, unicode, shell
/// metacharacters, a leading dash, backslashes and control characters.
///
/// Catches: a path published other than it is (mount table unescaping, a
/// lossy conversion), an entry with a control character published (kubelet
/// reads the mount table line by line), such an entry not reported, or one
/// bad entry keeping the good ones from being published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_discovery_entry_names_are_published_exactly_or_refused_with_a_reason() {
    if skip_unless_root("odd_discovery_entry_names_are_published_exactly_or_refused_with_a_reason")
    {
        return;
    }
    let _host = HOST.lock().await;
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().to_path_buf();
    let ds = d.display().to_string();
    let disc = d.join("disc");
    let good: Vec<String> = vec![
        "with space".into(),
        "ünï©ødé".into(),
        // Relative: whoever ran it would touch it in its working directory.
        "$(touch pwned); rm -rf ~".into(),
        "'\";|&<>`id`".into(),
        "-rf".into(),
        "back\\slash".into(),
        // What the mount table writes for a newline, as a literal name.
        "oct\\012al".into(),
        "*".into(),
    ];
    let bad: Vec<String> = vec!["new\nline".into(), "tab\there".into(), "esc\x1b[31m".into()];
    let mut mounts = Vec::new();
    for n in good.iter().chain(&bad) {
        mounts.push(tmpfs(&disc.join(n)));
    }
    let class = format!(
        "  - name: dirs\n    storageClassName: local-fast\n    discoveryDirs: [{ds}/disc]\n"
    );
    let cfg_text = agent_config(&d, &class);
    let cfg = d.join("scan.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();

    let rows = scan_rows(&cfg);
    let mut failures = Vec::new();
    for n in &good {
        let p = disc.join(n);
        let r = row(&rows, p.to_str().unwrap());
        if r["type"] != "dir-entry" || r["verdict"] != "eligible" || r["class"] != "dirs" {
            failures.push(format!("scan: {n:?} should be an eligible dir-entry: {r}"));
        }
    }
    for n in &bad {
        let p = disc.join(n);
        let r = row(&rows, p.to_str().unwrap());
        if r["verdict"] != "refused"
            || r["reason"] != "unsafe-name"
            || !r["detail"]
                .as_str()
                .unwrap_or("")
                .contains("rename the entry")
        {
            failures.push(format!("scan: {n:?} should be refused as unsafe-name: {r}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let agent = Agent::start(&env, "agent", "node-a", &cfg_text);
    // Every entry is there before the agent starts: its first pass publishes
    // whatever it publishes, and the PVs are written before it says ready.
    agent.wait_log("ready: first reconcile done");
    let pvs = env
        .wait_pvs("disklet.io/class=dirs", "a PV per good entry", |p| {
            p.len() >= good.len()
        })
        .await;
    let published: Vec<String> = pvs.iter().map(local_path).collect();
    for n in &good {
        let p = disc.join(n).to_str().unwrap().to_string();
        if !published.contains(&p) {
            failures.push(format!(
                "{n:?} not published with its exact path; published: {published:?}"
            ));
        }
    }
    for n in &bad {
        let p = disc.join(n).to_str().unwrap().to_string();
        if published.contains(&p) {
            failures.push(format!("{n:?} was published"));
        }
    }
    assert_eq!(pvs.len(), good.len(), "{published:?}");
    for pv in &pvs {
        assert_eq!(
            ann(pv, "disklet.io/volume-key"),
            format!("dir:{}", local_path(pv))
        );
        for (k, v) in pv.metadata.labels.as_ref().unwrap() {
            assert!(valid_label_value(v), "label {k}={v:?}");
        }
    }
    for n in &bad {
        let p = format!("{:?}", disc.join(n));
        let events = refusal_events(&env, &p, "unsafe-name").await;
        if events != 1 {
            failures.push(format!(
                "{n:?}: {events} DiscoveryEntryRefused Events name it, want 1"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!Path::new("pwned").exists(), "a name was executed");
    drop(agent);
    drop(mounts);
}

/// A non-UTF-8 name anywhere in the host's mount table (any mount, not only a
/// discovery dir: with FUSE an unprivileged user can make one) must not stop
/// `disklet scan`, nor the agent, which read the same table.
///
/// Catches `read_to_string` on the whole table (it failed on the one bad
/// line, so scan exited 1 and every reconcile failed): a copy of this host's
/// table plus one such line, through `mountInfo`.
#[test]
fn a_mount_point_name_that_is_not_utf8_does_not_stop_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut table = std::fs::read("/proc/self/mountinfo").unwrap();
    table.extend_from_slice(b"999999 1 0:999 / /home/user/odd\xff\xfe rw - fuse.x x rw\n");
    std::fs::write(d.join("mountinfo"), &table).unwrap();
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "hostDir: {d}/host\nkubeletDir: {d}/kubelet\nmountInfo: {d}/mountinfo\nclasses: []\n",
            d = d.display()
        ),
    )
    .unwrap();
    let rows = scan_rows(&cfg);
    assert!(!rows.is_empty());
}

// ---------------------------------------------------------------------------
// 3. Symlink loops in a discovery dir.

/// Catches: a symlink loop or a dangling symlink hanging or crashing the agent
/// (a good entry added afterwards must still be published), being published,
/// or going unreported; a discovery dir that is itself a symlink loop likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_loops_in_a_discovery_dir_are_reported_and_the_agent_carries_on() {
    if skip_unless_root("symlink_loops_in_a_discovery_dir_are_reported_and_the_agent_carries_on") {
        return;
    }
    let _host = HOST.lock().await;
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().to_path_buf();
    let ds = d.display().to_string();
    let disc = d.join("disc");
    std::fs::create_dir_all(&disc).unwrap();
    let link =
        |target: &str, name: &str| std::os::unix::fs::symlink(target, disc.join(name)).unwrap();
    link("b", "a");
    link("a", "b");
    link("self", "self");
    link(&format!("{ds}/nowhere"), "dangling");
    std::os::unix::fs::symlink(d.join("loopdir"), d.join("loopdir")).unwrap();
    let class = format!(
        "  - name: dirs\n    storageClassName: local-fast\n    discoveryDirs: [{ds}/disc]\n  - name: loopy\n    storageClassName: local-fast\n    discoveryDirs: [{ds}/loopdir]\n"
    );
    let cfg_text = agent_config(&d, &class);
    let cfg = d.join("scan.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();

    let rows = scan_rows(&cfg);
    for (name, reason) in [
        ("a", "symlink-loop"),
        ("b", "symlink-loop"),
        ("self", "symlink-loop"),
        ("dangling", "dangling-symlink"),
    ] {
        let r = row(&rows, disc.join(name).to_str().unwrap());
        assert_eq!(r["reason"], reason, "{r}");
        assert_eq!(r["verdict"], "refused", "{r}");
    }
    let r = row(&rows, d.join("loopdir").to_str().unwrap());
    assert_eq!(r["reason"], "unreadable-dir", "{r}");

    let agent = Agent::start(&env, "agent", "node-a", &cfg_text);
    agent.wait_log("ready: first reconcile done");
    for (name, reason) in [
        ("a", "symlink-loop"),
        ("b", "symlink-loop"),
        ("self", "symlink-loop"),
        ("dangling", "dangling-symlink"),
    ] {
        let p = format!("{:?}", disc.join(name));
        assert_eq!(
            refusal_events(&env, &p, reason).await,
            1,
            "{name}: one Warning DiscoveryEntryRefused Event saying {reason}: {:#?}",
            env.events().await
        );
    }
    let none = env.pvs().list(&Default::default()).await.unwrap();
    assert!(
        none.items.is_empty(),
        "nothing published: {:?}",
        none.items.iter().map(local_path).collect::<Vec<_>>()
    );

    // Still reconciling: a good entry added now is published.
    let good = disc.join("good");
    let _m = tmpfs(&good);
    let pvs = env
        .wait_pvs("disklet.io/class=dirs", "the good entry's PV", |p| {
            !p.is_empty()
        })
        .await;
    assert_eq!(pvs.len(), 1);
    assert_eq!(local_path(&pvs[0]), good.to_str().unwrap());
    drop(agent);
}

/// `disklet scan` and the agent agree on every symlink to a block device in
/// a Block class's discovery dir: scan says `eligible` exactly for the links
/// the agent publishes, and `link-in-use` with the agent's reason for the
/// ones it refuses. Catches: scan showing a link to a mounted disk or to
/// active swap as eligible (the admin rolls out, and the agent refuses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_and_the_agent_agree_on_block_links() {
    if skip_unless_root("scan_and_the_agent_agree_on_block_links") {
        return;
    }
    let _host = HOST.lock().await;
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().to_path_buf();
    let ds = d.display().to_string();
    let links = d.join("links");
    std::fs::create_dir_all(&links).unwrap();
    let free = Loop::new(&d.join("disks"), "free", 64);
    let mounted = Loop::new(&d.join("disks"), "mounted", 64);
    sh(&["mkfs.ext4", "-q", mounted.path()]);
    let _m = Mounted::new(mounted.path(), &d.join("elsewhere"));
    let swap = Loop::new(&d.join("disks"), "swap", 64);
    sh(&["mkswap", "-q", swap.path()]);
    let _sw = Swapon::new(swap.path());
    for (name, l) in [("free", &free), ("mounted", &mounted), ("swap", &swap)] {
        std::os::unix::fs::symlink(l.path(), links.join(name)).unwrap();
    }
    let class = format!(
        "  - name: raw\n    storageClassName: local-fast\n    volumeMode: Block\n    discoveryDirs: [{ds}/links]\n"
    );
    let cfg_text = agent_config(&d, &class);
    let cfg = d.join("scan.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();

    let rows = scan_rows(&cfg);
    let verdict = |name: &str| {
        let r = row(&rows, links.join(name).to_str().unwrap());
        (r["verdict"].as_str().unwrap().to_string(), r.clone())
    };
    assert_eq!(verdict("free").0, "eligible", "{}", verdict("free").1);
    for (name, why) in [("mounted", "mounted"), ("swap", "active swap")] {
        let (v, r) = verdict(name);
        assert_eq!(v, "refused", "{r}");
        assert_eq!(r["reason"], "link-in-use", "{r}");
        assert!(r["detail"].as_str().unwrap().contains(why), "{r}");
    }

    let agent = Agent::start(&env, "agent", "node-a", &cfg_text);
    let pvs = env
        .wait_pvs("disklet.io/class=raw", "the free link's PV", |p| {
            !p.is_empty()
        })
        .await;
    // Both refusals reported, so the agent has decided every link.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let refused: Vec<String> = env
            .events()
            .await
            .into_iter()
            .filter(|(t, r, _)| t == "Warning" && r == "DiscoveryLinkRefused")
            .map(|e| e.2)
            .collect();
        let has = |name: &str, why: &str| {
            refused.iter().any(|n| {
                n.contains(&format!("{} ->", links.join(name).display())) && n.contains(why)
            })
        };
        if has("mounted", "mounted") && has("swap", "active swap") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusals not reported: {refused:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut published: Vec<String> = env
        .pvs()
        .list(&kube::api::ListParams::default().labels("disklet.io/class=raw"))
        .await
        .unwrap()
        .items
        .iter()
        .map(local_path)
        .collect();
    published.sort();
    let mut eligible: Vec<String> = rows
        .iter()
        .filter(|r| r["type"] == "dir-entry" && r["verdict"] == "eligible")
        .map(|r| r["device"].as_str().unwrap().to_string())
        .collect();
    eligible.sort();
    assert_eq!(published, eligible, "scan and the agent disagree");
    assert_eq!(local_path(&pvs[0]), links.join("free").to_str().unwrap());
    drop(agent);
}

// ---------------------------------------------------------------------------
// 4. Two devices, one filesystem UUID.

/// Catches: a clone (same filesystem UUID) mounted or published while its
/// twin is attached (two PVs, or a mount of the wrong copy), the refusal not
/// reported, or the survivor not adopted once the twin is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_with_one_filesystem_uuid_are_both_refused_until_one_goes() {
    if skip_unless_root("two_devices_with_one_filesystem_uuid_are_both_refused_until_one_goes") {
        return;
    }
    let _host = HOST.lock().await;
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().to_path_buf();
    let ds = d.display().to_string();
    let dup = d.join("dup");
    std::fs::create_dir_all(&dup).unwrap();
    // Ours: made the way the agent makes it (label `disklet`), then copied.
    let ours_uuid = "6b1f3f56-0d3c-4c4e-9e57-1f0a2b3c4d01";
    let foreign_uuid = "6b1f3f56-0d3c-4c4e-9e57-1f0a2b3c4d02";
    for (name, uuid, own) in [
        ("ours-a", ours_uuid, true),
        ("foreign-a", foreign_uuid, false),
    ] {
        let f = dup.join(format!("{name}.img"));
        std::fs::File::create(&f)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        if own {
            disklet::host::format::mkfs_command(&f, disklet::config::FsType::Ext4, uuid)
                .output()
                .unwrap();
        } else {
            sh(&["mkfs.ext4", "-q", "-F", "-U", uuid, f.to_str().unwrap()]);
        }
        let copy = dup.join(format!("{}.img", name.replace("-a", "-b")));
        sh(&[
            "cp",
            "--sparse=always",
            f.to_str().unwrap(),
            copy.to_str().unwrap(),
        ]);
    }
    let ours_a = Loop::new(&dup, "ours-a", 64);
    let ours_b = Loop::new(&dup, "ours-b", 64);
    let foreign_a = Loop::new(&dup, "foreign-a", 64);
    let foreign_b = Loop::new(&dup, "foreign-b", 64);
    for l in [&ours_a, &ours_b, &foreign_a, &foreign_b] {
        l.assert_ours();
    }
    udev_settle(&[&ours_a, &ours_b, &foreign_a, &foreign_b]);
    assert_eq!(blkid(ours_b.path(), "UUID"), ours_uuid);
    assert_eq!(blkid(ours_b.path(), "LABEL"), "disklet");
    assert_eq!(blkid(foreign_b.path(), "UUID"), foreign_uuid);

    let class = format!(
        "  - name: dup\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{ds}/dup/*.img\"], types: [loop]}}\n"
    );
    let cfg_text = agent_config(&d, &class);
    let cfg = d.join("scan.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let rows = scan_rows(&cfg);
    for (l, twin) in [
        (&ours_a, &ours_b),
        (&ours_b, &ours_a),
        (&foreign_a, &foreign_b),
        (&foreign_b, &foreign_a),
    ] {
        let r = row(&rows, l.path());
        assert_eq!(r["verdict"], "refused", "{r}");
        assert_eq!(r["reason"], "duplicate-identity", "{r}");
        assert!(
            r["detail"].as_str().unwrap().contains(twin.path()),
            "names its twin: {r}"
        );
    }

    let agent = Agent::start(&env, "agent", "node-a", &cfg_text);
    agent.wait_log("ready: first reconcile done");
    // Each device's refusal is logged, and published as an Event, naming
    // both copies (Events used to collapse into one series that kept the
    // first device's note only).
    let log = std::fs::read_to_string(&agent.log).unwrap();
    let events = env.events().await;
    for (l, twin) in [
        (&ours_a, &ours_b),
        (&ours_b, &ours_a),
        (&foreign_a, &foreign_b),
        (&foreign_b, &foreign_a),
    ] {
        assert!(
            log.lines().any(|n| n
                .contains(&format!("{} (class dup): duplicate-identity", l.path()))
                && n.contains(&format!("same filesystem UUID as {} ", twin.path()))),
            "a log line names {} and its twin {}:\n{log}",
            l.path(),
            twin.path()
        );
        assert!(
            events.iter().any(|(_, r, n)| r == "DiskSkipped"
                && n.contains(&format!("{} (class dup): duplicate-identity", l.path()))
                && n.contains(twin.path())),
            "an Event names {} and its twin: {events:?}",
            l.path()
        );
    }
    assert!(
        MountSweeper::mounts_under(&d.join("hostdir")).is_empty(),
        "neither copy is mounted"
    );
    let pvs = env.pvs().list(&Default::default()).await.unwrap();
    assert!(pvs.items.is_empty(), "no PV for either copy");

    // One copy of each goes: ours is adopted (mounted, published, never
    // reformatted), the foreign one is left alone for what it is.
    drop(ours_b);
    drop(foreign_b);
    let pvs = env
        .wait_pvs("disklet.io/class=dup", "the surviving copy's PV", |p| {
            p.len() == 1
        })
        .await;
    assert_eq!(ann(&pvs[0], "disklet.io/fs-uuid"), ours_uuid);
    assert_eq!(
        ann(&pvs[0], "disklet.io/device-id"),
        format!("loop-file:{}", ours_a.file.display())
    );
    assert_eq!(
        blkid(ours_a.path(), "UUID"),
        ours_uuid,
        "adopted, not reformatted"
    );
    let line = agent.wait_log("foreign-filesystem");
    assert!(line.contains(foreign_a.path()), "{line}");
    assert_eq!(blkid(foreign_a.path(), "UUID"), foreign_uuid);
    let pvs = env.pvs().list(&Default::default()).await.unwrap();
    assert_eq!(pvs.items.len(), 1, "nothing for the foreign copy");
    drop(agent);
}
