//! The configuration's unit tests; tests/hostile_inputs.rs drives the binary
//! with every key wrong in turn.

use super::messages::edit_distance;
use super::*;
use crate::model::{DeviceKind, Quantity};

const GOOD: &str = r#"
hostDir: /var/lib/disklet
classes:
  - name: fast
    storageClassName: local-fast
    volumeMode: Filesystem
    fsType: xfs
    settleSeconds: 5
    selector:
      paths: ["/dev/disk/by-id/nvme-*"]
      udev: {DISKLET_CLASS: "fast"}
      types: [disk]
      minSize: 1Gi
      maxSize: 8Ti
      rotational: false
    discoveryDirs: []
"#;

fn problems(text: &str) -> Vec<Problem> {
    Config::parse(text).unwrap_err()
}

#[test]
fn the_readme_example_parses() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.classes[0].storage_class(), "local-fast");
    assert_eq!(c.classes[0].selector.min_size, Some(Quantity(1 << 30)));
    assert_eq!(c.classes[0].selector.types, vec![DeviceKind::Disk]);
    assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
    assert_eq!(c.classes[0].blank_check, BlankCheck::Zeroed);
}

#[test]
fn defaults_fill_in() {
    let c = Config::parse("classes: [{name: a, selector: {paths: [/dev/sdz]}}]").unwrap();
    let a = &c.classes[0];
    assert_eq!(a.storage_class(), "a");
    assert_eq!(a.volume_mode, VolumeMode::Filesystem);
    assert_eq!(a.fs_type, FsType::Xfs);
    assert_eq!(a.settle_seconds, 5);
    assert_eq!(c.host_dir, PathBuf::from("/var/lib/disklet"));
}

#[test]
fn unknown_key_names_the_path_and_suggests() {
    let p = problems(&GOOD.replace("minSize", "minsize"));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "classes[0].selector.minsize");
    assert!(
        p[0].message.contains("did you mean `minSize`?"),
        "{}",
        p[0].message
    );
    assert!(
        p[0].message.contains("line"),
        "location given: {}",
        p[0].message
    );
}

#[test]
fn bad_values_name_the_key() {
    let p = problems(&GOOD.replace("fsType: xfs", "fsType: zfs"));
    assert_eq!(p[0].key, "classes[0].fsType");
    assert!(
        p[0].message.contains("xfs") && p[0].message.contains("ext4"),
        "{}",
        p[0].message
    );

    let p = problems(&GOOD.replace("minSize: 1Gi", "minSize: 1GB"));
    assert_eq!(p[0].key, "classes[0].selector.minSize");
    assert!(p[0].message.contains("500Gi"), "{}", p[0].message);

    let p = problems(&GOOD.replace("types: [disk]", "types: [floppy]"));
    assert_eq!(p[0].key, "classes[0].selector.types[0]");

    let p = problems(&GOOD.replace("volumeMode: Filesystem", "volumeMode: filesystem"));
    assert_eq!(p[0].key, "classes[0].volumeMode");
}

#[test]
fn semantic_problems_are_all_reported_together() {
    let text = r#"
hostDir: relative/dir
classes:
  - name: Fast_Class
    storageClassName: "Local Fast"
    settleSeconds: 99999
    selector: {types: [], minSize: 2Gi, maxSize: 1Gi}
  - name: ok
    selector: {paths: ["sda", "/dev/[sd"], udev: {ID_MODEL: "[x"}}
  - name: ok
    selector: {paths: [/dev/sdb]}
    discoveryDirs: [mnt/disks]
"#;
    let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
    for want in [
        "hostDir",
        "classes[0].name",
        "classes[0].storageClassName",
        "classes[0].settleSeconds",
        "classes[0].selector",
        "classes[0].selector.types",
        "classes[0].selector.minSize",
        "classes[2].discoveryDirs[0]",
        "classes[1].selector.paths[0]",
        "classes[1].selector.paths[1]",
        "classes[1].selector.udev.ID_MODEL",
        "classes[2].name",
    ] {
        assert!(keys.iter().any(|k| k == want), "missing {want} in {keys:?}");
    }
}

#[test]
fn dangerous_shapes_are_refused() {
    let keys = |t: &str| problems(t).into_iter().map(|p| p.key).collect::<Vec<_>>();
    assert_eq!(keys("hostDir: /\nclasses: []"), ["hostDir"]);
    assert_eq!(
        keys("hostDir: /var/lib/kubelet/disklet\nclasses: []"),
        ["hostDir"]
    );
    assert_eq!(
        keys("classes: [{name: a, selector: {paths: ['/dev/*']}}]"),
        ["classes[0].selector.paths[0]"]
    );
    assert_eq!(
        keys("classes: [{name: a, selector: {paths: ['/dev/disk/by-id/*']}}]"),
        ["classes[0].selector.paths[0]"]
    );
    assert!(
        Config::parse("classes: [{name: a, selector: {paths: ['/dev/disk/by-id/nvme-*']}}]")
            .is_ok()
    );
    assert_eq!(
        keys("classes: [{name: a, selector: {backingFiles: ['/x/*.img']}}]"),
        ["classes[0].selector.backingFiles"]
    );
    assert_eq!(
        keys("classes: [{name: a, mountOptions: [nouuid], selector: {paths: [/dev/sdb]}}]"),
        ["classes[0].mountOptions[0]"]
    );
    assert_eq!(
        keys("classes: [{name: a, discoveryDirs: [/var/lib/disklet/x]}]"),
        ["classes[0].discoveryDirs[0]"]
    );
}

/// Catches: the guards being bypassed by a second spelling (an option
/// inside a comma list, one directory in two classes, a glob from `/`).
#[test]
fn guards_hold_against_other_spellings() {
    let keys = |t: &str| problems(t).into_iter().map(|p| p.key).collect::<Vec<_>>();
    assert_eq!(
        keys(
            "classes: [{name: a, mountOptions: ['noatime,nouuid'], selector: {paths: [/dev/sdb]}}]"
        ),
        ["classes[0].mountOptions[0]"]
    );
    assert_eq!(
        keys("classes: [{name: a, discoveryDirs: [/mnt/d]}, {name: b, discoveryDirs: [/mnt/d/x]}]"),
        ["classes[1].discoveryDirs[0]"]
    );
    assert!(
        Config::parse("classes: [{name: a, discoveryDirs: [/mnt/d]}, {name: b, volumeMode: Block, discoveryDirs: [/mnt/d]}]").is_ok(),
        "mount points for one, device links for the other"
    );
    assert_eq!(
        keys("classes: [{name: a, selector: {backingFiles: ['/*'], types: [loop]}}]"),
        ["classes[0].selector.backingFiles[0]"]
    );
    assert_eq!(
        keys("hostDir: /var/lib/disklet/../kubelet/x\nclasses: []"),
        ["hostDir"]
    );
    assert_eq!(
        keys("classes: [{name: a, discoveryDirs: [/var/lib/kubelet/pods]}]"),
        ["classes[0].discoveryDirs[0]"]
    );
    let p = problems("classes: [{name: a, selector: {paths: [/dev/sdb], minSize: -1}}]");
    assert_eq!(p[0].key, "classes[0].selector.minSize");
    assert!(p[0].message.contains("500Gi"), "{}", p[0].message);
    assert!(!p[0].message.starts_with("classes"), "{}", p[0].message);
}

#[test]
fn a_selector_that_names_no_disk_is_refused() {
    let p = problems("classes: [{name: all, selector: {types: [disk]}}]");
    assert_eq!(p[0].key, "classes[0].selector");
    assert!(p[0].message.contains("paths"));
}

#[test]
fn wrong_shapes_are_reported() {
    assert_eq!(problems("classes: {name: a}")[0].key, "classes");
    assert_eq!(problems("- a\n- b")[0].key, "(top level)");
    let p = problems("hostdir: /x");
    assert_eq!(p[0].key, "hostdir");
    assert!(
        p[0].message.contains("did you mean `hostDir`?"),
        "{}",
        p[0].message
    );
}

#[test]
fn edit_distance_is_levenshtein() {
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("same", "same"), 0);
}

#[test]
fn a_pool_class_parses_and_refuses_static_only_fields() {
    let c = Config::parse("classes: [{name: pool, kind: pool, selector: {paths: [/dev/sdz]}}]")
        .unwrap();
    assert!(c.classes[0].is_pool());
    assert_eq!(c.classes[0].fs_type, FsType::Xfs);
    let p = problems(
        "classes: [{name: p, kind: pool, fsType: ext4, volumeMode: Block, cleanup: files, discoveryDirs: [/mnt/d], selector: {paths: [/dev/sdz]}}]",
    );
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "classes[0].fsType",
        "classes[0].volumeMode",
        "classes[0].discoveryDirs",
        "classes[0].cleanup",
    ] {
        assert!(keys.contains(&k), "{k} not refused: {p:?}");
    }
    let p = problems("classes: [{name: p, kind: lvm, selector: {paths: [/dev/sdz]}}]");
    assert_eq!(p[0].key, "classes[0].kind", "{p:?}");
    assert!(p[0].message.contains("pool"), "{}", p[0].message);
}
