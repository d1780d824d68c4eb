//! The provisioning plan, pure: which disks are formatted, mounted and
//! published, and what is left alone.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disklet::config::Config;
use disklet::model::*;
use disklet::plan::pv::build_pv;
use disklet::plan::{evaluate, plan, Action, Classes, NodeFacts, PlanInput};
use k8s_openapi::api::core::v1::PersistentVolume;

const CFG: &str = r#"
hostDir: /var/lib/disklet
classes:
  - name: fast
    storageClassName: local-fast
    mountOptions: [noatime]
    selector: {paths: ["/dev/sd*"]}
  - name: raw
    storageClassName: local-raw
    volumeMode: Block
    selector: {paths: ["/dev/nvme*"]}
  - name: dirs
    storageClassName: local-fast
    discoveryDirs: [/mnt/disks]
"#;

fn disk(name: &str, minor: u32) -> Device {
    let mut d = Device::new(name, DevNo::new(8, minor), DeviceKind::Disk);
    d.size_bytes = 100 << 30;
    d.probe = Probe::Done {
        signatures: vec![],
        zeroed: Some(true),
    };
    d.exclusive = Exclusive::Free;
    d.serial = Some(format!("SER-{name}"));
    d
}

fn ours(name: &str, minor: u32, uuid: &str) -> Device {
    let mut d = disk(name, minor);
    d.probe = Probe::Done {
        signatures: vec![Signature {
            kind: "xfs".into(),
            offset: 0,
            uuid: Some(uuid.into()),
            label: Some(OWNER_LABEL.into()),
            in_progress: false,
        }],
        zeroed: None,
    };
    d
}

fn mount(d: &Device, at: &str) -> MountEntry {
    MountEntry {
        mount_id: 1,
        parent_id: 0,
        devno: d.devno,
        root: "/".into(),
        mount_point: at.into(),
        options: "rw".into(),
        fs_type: "xfs".into(),
        source: d.devnode.display().to_string(),
    }
}

struct World {
    cfg: Config,
    classes: Classes,
    inv: Inventory,
    mounts: BTreeMap<PathBuf, MountFact>,
    dirs: Vec<DirEntry>,
    pvs: Vec<k8s_openapi::api::core::v1::PersistentVolume>,
    scs: BTreeMap<String, Option<ScInfo>>,
    node: NodeInfo,
}

fn world(devices: Vec<Device>, mounts: Vec<MountEntry>) -> World {
    let cfg = Config::parse(CFG).unwrap();
    let classes = Classes::compile(&cfg).unwrap();
    let mut root = Device::new("vda", DevNo::new(254, 0), DeviceKind::Disk);
    root.size_bytes = 10 << 30;
    let mut all = vec![root.clone()];
    all.extend(devices);
    let mut m = vec![mount(&root, "/")];
    m.extend(mounts);
    let sc = ScInfo {
        reclaim_policy: "Delete".into(),
        mount_options: vec![],
        ..Default::default()
    };
    World {
        cfg,
        classes,
        inv: Inventory {
            devices: all,
            mounts: m,
            swaps: vec![],
        },
        mounts: BTreeMap::new(),
        dirs: vec![],
        pvs: vec![],
        scs: [
            ("local-fast".to_string(), Some(sc.clone())),
            ("local-raw".to_string(), Some(sc)),
        ]
        .into(),
        node: NodeInfo {
            name: "n1".into(),
            uid: "u1".into(),
            hostname: "n1".into(),
            labels: BTreeMap::new(),
        },
    }
}

impl World {
    fn plan(&self) -> Vec<Action> {
        let facts = NodeFacts::new(&self.inv, &self.cfg.host_dir, &self.cfg.kubelet_dir);
        let decisions: Vec<_> = self
            .inv
            .devices
            .iter()
            .map(|d| evaluate(d, &self.inv, &self.classes, &facts, None))
            .collect();
        plan(&PlanInput {
            cfg: &self.cfg,
            classes: &self.classes,
            inv: &self.inv,
            decisions: &decisions,
            mounts: &self.mounts,
            dirs: &self.dirs,
            pvs: &self.pvs,
            node: &self.node,
            scs: &self.scs,
        })
        .into_iter()
        // The lifecycle of existing PVs has its own tests (recycle_plan.rs).
        .filter(|a| {
            !matches!(
                a,
                Action::Recycle(_)
                    | Action::DeletePv { .. }
                    | Action::AnnotatePv { .. }
                    | Action::Wait { .. }
                    | Action::Report {
                        subject: disklet::plan::Subject::Pv(_),
                        ..
                    }
            )
        })
        .collect()
    }
}

impl World {
    /// Every action, the lifecycle's included (for PVs edited by hand and
    /// disks that turned unfit, where provisioning and lifecycle meet).
    fn plan_all(&self) -> Vec<Action> {
        let facts = NodeFacts::new(&self.inv, &self.cfg.host_dir, &self.cfg.kubelet_dir);
        let decisions: Vec<_> = self
            .inv
            .devices
            .iter()
            .map(|d| evaluate(d, &self.inv, &self.classes, &facts, None))
            .collect();
        plan(&PlanInput {
            cfg: &self.cfg,
            classes: &self.classes,
            inv: &self.inv,
            decisions: &decisions,
            mounts: &self.mounts,
            dirs: &self.dirs,
            pvs: &self.pvs,
            node: &self.node,
            scs: &self.scs,
        })
    }
}

fn kinds(a: &[Action]) -> Vec<&'static str> {
    a.iter()
        .map(|a| match a {
            Action::Format { .. } => "format",
            Action::Mount { .. } => "mount",
            Action::MakeVolDir { .. } => "vol-dir",
            Action::ApplyPv { create: true, .. } => "create-pv",
            Action::ApplyPv { create: false, .. } => "update-pv",
            Action::Report { reason, .. } => reason,
            Action::DeletePv { .. } => "delete-pv",
            Action::AnnotatePv { .. } => "annotate-pv",
            Action::Recycle(_) => "recycle",
            Action::Wait { .. } => "wait",
            // Re-apply only a PV that exists (labels removed), else VolumeNotClean.
            Action::Readopt { .. } => "readopt",
        })
        .collect()
}

#[test]
fn eligible_disks_are_formatted_only_when_their_class_can_publish() {
    let mut w = world(vec![disk("sda", 0), disk("sdb", 16)], vec![]);
    let a = w.plan();
    assert_eq!(kinds(&a), ["format", "format"]);
    if let Action::Format {
        device,
        class,
        fingerprint,
        ..
    } = &a[0]
    {
        assert_eq!((device.as_str(), class.as_str()), ("sda", "fast"));
        assert_eq!(fingerprint.devno, DevNo::new(8, 0));
    }
    w.scs.insert("local-fast".into(), None);
    assert_eq!(
        kinds(&w.plan()),
        ["StorageClassMissing"],
        "no format, one report for two disks"
    );
}

/// A StorageClass limited to zone z1.
fn zonal() -> ScInfo {
    ScInfo {
        reclaim_policy: "Delete".into(),
        allowed_topologies: vec![vec![(
            "topology.kubernetes.io/zone".into(),
            vec!["z1".into()],
        )]],
        ..Default::default()
    }
}

#[test]
fn a_node_outside_the_storage_class_allowed_topologies_formats_and_publishes_nothing() {
    let mut w = world(vec![disk("sda", 0), disk("sdb", 16)], vec![]);
    w.scs.insert("local-fast".into(), Some(zonal()));
    assert_eq!(
        kinds(&w.plan()),
        ["OutsideAllowedTopologies"],
        "one report, no format"
    );
    w.node
        .labels
        .insert("topology.kubernetes.io/zone".into(), "z2".into());
    assert_eq!(kinds(&w.plan()), ["OutsideAllowedTopologies"]);
    w.node
        .labels
        .insert("topology.kubernetes.io/zone".into(), "z1".into());
    assert_eq!(
        kinds(&w.plan()),
        ["format", "format"],
        "inside: as without the limit"
    );
    // Any term may match; every expression of a term must.
    let mut sc = zonal();
    sc.allowed_topologies.push(vec![
        ("topology.kubernetes.io/zone".into(), vec!["z2".into()]),
        ("rack".into(), vec!["r7".into()]),
    ]);
    let mut labels = BTreeMap::new();
    labels.insert("topology.kubernetes.io/zone".to_string(), "z2".to_string());
    assert!(!sc.allows(&labels));
    labels.insert("rack".to_string(), "r7".to_string());
    assert!(sc.allows(&labels));
    assert!(
        ScInfo::default().allows(&BTreeMap::new()),
        "no limit: everywhere"
    );
}

#[test]
fn a_pv_published_before_the_node_left_the_allowed_topologies_is_withdrawn_unless_claimed() {
    let d = ours("sda", 0, "u-1");
    let target = "/var/lib/disklet/fast/u-1";
    let mut w = world(vec![d.clone()], vec![mount(&d, target)]);
    w.mounts.insert(
        target.into(),
        MountFact {
            vol_dir: true,
            capacity_bytes: 99 << 30,
            fs_bytes: None,
            device_bytes: None,
            vol_empty: true,
            io_error: None,
        },
    );
    let Some(Action::ApplyPv { pv, .. }) = w.plan().into_iter().next() else {
        panic!("no PV planned")
    };
    let mut pv = *pv;
    pv.metadata.uid = Some("uid-1".into());
    pv.metadata.resource_version = Some("7".into());
    pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
        phase: Some("Available".into()),
        ..Default::default()
    });
    w.pvs = vec![pv.clone()];
    w.scs.insert("local-fast".into(), Some(zonal()));
    let a = w.plan_all();
    assert_eq!(kinds(&a), ["delete-pv", "OutsideAllowedTopologies"]);
    let Action::DeletePv {
        uid,
        resource_version,
        reason,
        ..
    } = &a[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (uid.as_str(), resource_version.as_str(), *reason),
        ("uid-1", "7", "VolumeWithdrawn")
    );
    // A claimed one stays.
    pv.spec.as_mut().unwrap().claim_ref = Some(Default::default());
    pv.status.as_mut().unwrap().phase = Some("Bound".into());
    w.pvs = vec![pv];
    assert_eq!(kinds(&w.plan_all()), ["OutsideAllowedTopologies"]);
}

#[test]
fn ours_is_mounted_then_given_a_vol_dir_then_published() {
    let d = ours("sda", 0, "u-1");
    let target = "/var/lib/disklet/fast/u-1";
    let w = world(vec![d.clone()], vec![]);
    let a = w.plan();
    assert_eq!(kinds(&a), ["mount"]);
    if let Action::Mount {
        target: t,
        fs_type,
        options,
        ..
    } = &a[0]
    {
        assert_eq!(t, &PathBuf::from(target));
        assert_eq!(fs_type, "xfs");
        assert_eq!(options, &vec!["noatime".to_string()]);
    }

    let mut w = world(vec![d.clone()], vec![mount(&d, target)]);
    w.mounts.insert(
        target.into(),
        MountFact {
            vol_dir: false,
            capacity_bytes: 5,
            fs_bytes: None,
            device_bytes: None,
            vol_empty: false,
            io_error: None,
        },
    );
    assert_eq!(kinds(&w.plan()), ["vol-dir"]);

    w.mounts.insert(
        target.into(),
        MountFact {
            vol_dir: true,
            capacity_bytes: 99 << 30,
            fs_bytes: None,
            device_bytes: None,
            vol_empty: false,
            io_error: None,
        },
    );
    assert_eq!(
        kinds(&w.plan()),
        ["readopt"],
        "data with no PV naming it is never offered to a new claim"
    );
    let Some(Action::Readopt { otherwise, .. }) = w.plan().into_iter().next() else {
        unreachable!()
    };
    assert!(otherwise.contains("holds data"), "{otherwise}");
    w.mounts.insert(
        target.into(),
        MountFact {
            vol_dir: true,
            capacity_bytes: 99 << 30,
            fs_bytes: None,
            device_bytes: None,
            vol_empty: true,
            io_error: None,
        },
    );
    let a = w.plan();
    assert_eq!(kinds(&a), ["create-pv"]);
    let Action::ApplyPv { pv, .. } = &a[0] else {
        unreachable!()
    };
    let s = pv.spec.as_ref().unwrap();
    assert_eq!(s.local.as_ref().unwrap().path, format!("{target}/vol"));
    assert_eq!(
        s.capacity.as_ref().unwrap()["storage"].0,
        disklet::model::quantity::exact(99u64 << 30)
    );

    // Published and unchanged: nothing to do. Released: left to the recycler.
    w.pvs = vec![(**pv).clone()];
    assert!(w.plan().is_empty());
    let mut released = (**pv).clone();
    released.spec.as_mut().unwrap().capacity = Some(
        [(
            "storage".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
        )]
        .into(),
    );
    w.pvs = vec![released.clone()];
    assert_eq!(
        kinds(&w.plan()),
        ["update-pv"],
        "a drifted PV is re-applied"
    );
    released.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
        phase: Some("Released".into()),
        ..Default::default()
    });
    w.pvs = vec![released];
    assert!(
        w.plan().is_empty(),
        "a Released PV is not touched by provisioning"
    );
}

#[test]
fn ours_mounted_elsewhere_under_host_dir_is_reported_not_remounted() {
    let d = ours("sda", 0, "u-1");
    let w = world(
        vec![d.clone()],
        vec![mount(&d, "/var/lib/disklet/old-class/u-1")],
    );
    assert_eq!(kinds(&w.plan()), ["MountedElsewhere"]);
}

#[test]
fn block_disks_are_published_raw_by_stable_path() {
    let mut d = Device::new("nvme0n1", DevNo::new(259, 0), DeviceKind::Disk);
    d.size_bytes = 1 << 40;
    d.probe = Probe::Done {
        signatures: vec![],
        zeroed: Some(true),
    };
    d.exclusive = Exclusive::Free;
    d.wwid = Some("eui.1".into());
    d.links = vec![
        "/dev/disk/by-path/pci-0".into(),
        "/dev/disk/by-id/nvme-X".into(),
    ];
    let w = world(vec![d.clone()], vec![]);
    let a = w.plan();
    assert_eq!(kinds(&a), ["create-pv"]);
    let Action::ApplyPv { pv, .. } = &a[0] else {
        unreachable!()
    };
    let s = pv.spec.as_ref().unwrap();
    assert_eq!(s.local.as_ref().unwrap().path, "/dev/disk/by-id/nvme-X");
    assert_eq!(s.volume_mode.as_deref(), Some("Block"));
    assert_eq!(
        s.capacity.as_ref().unwrap()["storage"].0,
        disklet::model::quantity::exact(1u64 << 40)
    );
    assert_eq!(
        pv.metadata.annotations.as_ref().unwrap()["disklet.io/device-id"],
        "wwn:eui.1"
    );

    let mut anon = d;
    anon.wwid = None;
    anon.links.clear();
    assert_eq!(
        kinds(&world(vec![anon], vec![]).plan()),
        ["NoStableIdentity"]
    );
}

#[test]
fn discovery_dir_entries_of_the_right_kind_become_pvs() {
    let mut w = world(vec![], vec![]);
    w.dirs = vec![
        DirEntry {
            class: "dirs".into(),
            path: "/mnt/disks/a".into(),
            kind: DirEntryKind::MountPoint {
                capacity_bytes: 7 << 30,
                devno: DevNo::new(8, 1),
            },
            warning: None,
        },
        DirEntry {
            class: "dirs".into(),
            path: "/mnt/disks/b".into(),
            kind: DirEntryKind::BlockLink {
                target: "/dev/sdq".into(),
                size_bytes: 1,
            },
            warning: None,
        },
        DirEntry {
            class: "dirs".into(),
            path: "/mnt/disks/c".into(),
            kind: DirEntryKind::Other,
            warning: None,
        },
    ];
    let a = w.plan();
    assert_eq!(
        kinds(&a),
        ["create-pv"],
        "only the mount point, in a Filesystem class"
    );
    let Action::ApplyPv { pv, .. } = &a[0] else {
        unreachable!()
    };
    assert_eq!(
        pv.spec.as_ref().unwrap().local.as_ref().unwrap().path,
        "/mnt/disks/a"
    );
}

/// An entry the admin got wrong (here a symlink loop) is reported as a
/// Warning naming it and why, and nothing else happens for it; the good
/// entry next to it is still published. Catches: such entries refused in
/// silence (only `disklet scan` showed them).
#[test]
fn an_entry_with_a_warning_is_reported_not_published() {
    let mut w = world(vec![], vec![]);
    w.dirs = vec![
        DirEntry {
            class: "dirs".into(),
            path: "/mnt/disks/loop".into(),
            kind: DirEntryKind::Other,
            warning: Some("symlink-loop: a symlink to b whose chain loops".into()),
        },
        DirEntry {
            class: "dirs".into(),
            path: "/mnt/disks/a".into(),
            kind: DirEntryKind::MountPoint {
                capacity_bytes: 7 << 30,
                devno: DevNo::new(8, 1),
            },
            warning: None,
        },
    ];
    let a = w.plan();
    assert_eq!(kinds(&a), ["DiscoveryEntryRefused", "create-pv"]);
    let Action::Report {
        warning, message, ..
    } = &a[0]
    else {
        unreachable!()
    };
    assert!(*warning);
    assert_eq!(
        message,
        "\"/mnt/disks/loop\": symlink-loop: a symlink to b whose chain loops; not publishing it"
    );
}

#[test]
fn refused_devices_cause_no_action_only_a_report() {
    let mut foreign = disk("sda", 0);
    foreign.probe = Probe::Done {
        signatures: vec![Signature {
            kind: "ext4".into(),
            offset: 0,
            uuid: None,
            label: None,
            in_progress: false,
        }],
        zeroed: None,
    };
    let busy = {
        let mut d = disk("sdb", 16);
        d.exclusive = Exclusive::Busy;
        d
    };
    let mut held = disk("sdc", 32);
    held.holders = vec!["dm-0".into()];
    let a = world(vec![foreign, busy, held], vec![]).plan();
    assert_eq!(kinds(&a), ["DiskSkipped", "DiskSkipped", "DiskSkipped"]);
    let Action::Report {
        message, warning, ..
    } = &a[0]
    else {
        unreachable!()
    };
    assert!(!warning);
    assert!(
        message.contains("/dev/sda (class fast): foreign-filesystem: ext4"),
        "{message}"
    );
}

#[test]
fn pv_names_do_not_depend_on_kernel_names() {
    // Same filesystem, found under another kernel name after a reboot: same PV.
    let node = NodeInfo {
        name: "n1".into(),
        ..Default::default()
    };
    let v = |path: &str| Volume {
        key: "fs:u-1".into(),
        class: "fast".into(),
        mode: disklet::config::VolumeMode::Filesystem,
        access_mode: Default::default(),
        path: path.into(),
        capacity_bytes: 1,
        fs_type: None,
        annotations: BTreeMap::new(),
        create_blocked: None,
    };
    let sc = ScInfo::default();
    assert_eq!(
        build_pv(&v("/a"), &node, "s", &sc, &[]).metadata.name,
        build_pv(&v("/b"), &node, "s", &sc, &[]).metadata.name
    );
}

#[test]
fn a_blank_disk_named_by_one_of_our_pvs_is_never_formatted() {
    let d = disk("sda", 0);
    let mut w = world(vec![d.clone()], vec![]);
    let mut pv = k8s_openapi::api::core::v1::PersistentVolume::default();
    pv.metadata.name = Some("disklet-raw-1".into());
    pv.metadata.annotations =
        Some([("disklet.io/device-id".to_string(), d.identity().unwrap())].into());
    w.pvs = vec![pv];
    assert_eq!(kinds(&w.plan()), ["DeviceHasPv"]);
}

#[test]
fn nothing_is_formatted_through_a_blind_mount_table() {
    let mut w = world(vec![disk("sda", 0)], vec![]);
    // A container's own table: / is an overlay, no block device under it.
    w.inv.mounts = vec![MountEntry {
        mount_id: 1,
        parent_id: 0,
        devno: DevNo::new(0, 50),
        root: "/".into(),
        mount_point: "/".into(),
        options: "rw".into(),
        fs_type: "overlay".into(),
        source: "overlay".into(),
    }];
    assert_eq!(kinds(&w.plan()), ["HostMountTableBlind"]);
}

#[test]
fn raw_volumes_need_a_link_that_survives_reboots() {
    let mut d = Device::new("nvme0n1", DevNo::new(259, 0), DeviceKind::Disk);
    d.size_bytes = 1 << 40;
    d.probe = Probe::Done {
        signatures: vec![],
        zeroed: Some(true),
    };
    d.exclusive = Exclusive::Free;
    d.wwid = Some("eui.1".into());
    assert_eq!(
        kinds(&world(vec![d.clone()], vec![]).plan()),
        ["NoStableIdentity"],
        "a WWN alone gives no path: /dev/nvme0n1 may be another disk after a reboot"
    );
    d.links = vec!["/dev/disk/by-path/pci-0000:01:00.0-nvme-1".into()];
    let a = world(vec![d], vec![]).plan();
    let Action::ApplyPv { pv, .. } = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(
        pv.spec.as_ref().unwrap().local.as_ref().unwrap().path,
        "/dev/disk/by-path/pci-0000:01:00.0-nvme-1"
    );
}

#[test]
fn a_discovery_link_to_a_disk_in_use_is_refused() {
    let text = "classes:\n  - name: rawdir\n    storageClassName: local-raw\n    volumeMode: Block\n    discoveryDirs: [/mnt/raw]\n";
    let mut w = world(vec![], vec![]);
    w.cfg = Config::parse(text).unwrap();
    w.classes = Classes::compile(&w.cfg).unwrap();
    let mut spare = disk("sdq", 64);
    spare.serial = None;
    w.inv.devices.push(spare);
    w.dirs = vec![
        DirEntry {
            class: "rawdir".into(),
            path: "/mnt/raw/os".into(),
            kind: DirEntryKind::BlockLink {
                target: "/dev/vda".into(),
                size_bytes: 10 << 30,
            },
            warning: None,
        },
        DirEntry {
            class: "rawdir".into(),
            path: "/mnt/raw/spare".into(),
            kind: DirEntryKind::BlockLink {
                target: "/dev/sdq".into(),
                size_bytes: 100 << 30,
            },
            warning: None,
        },
    ];
    let a = w.plan();
    assert_eq!(kinds(&a), ["DiscoveryLinkRefused", "create-pv"]);
    let Action::Report { message, .. } = &a[0] else {
        unreachable!()
    };
    assert!(message.contains("OS disk"), "{message}");
}

const TARGET: &str = "/var/lib/disklet/fast/u-1";

/// A disk disklet formatted, mounted and published, with its PV as disklet
/// wrote it (Available unless `phase` says otherwise; a claim for Bound and
/// Released).
fn published(phase: &str) -> (World, PersistentVolume) {
    let d = ours("sda", 0, "u-1");
    let mut w = world(vec![d.clone()], vec![mount(&d, TARGET)]);
    w.mounts.insert(
        TARGET.into(),
        MountFact {
            vol_dir: true,
            capacity_bytes: 99 << 30,
            fs_bytes: None,
            device_bytes: None,
            vol_empty: true,
            io_error: None,
        },
    );
    let Some(Action::ApplyPv { pv, .. }) = w.plan().pop() else {
        unreachable!()
    };
    let mut pv = *pv;
    pv.metadata.uid = Some("uid-1".into());
    pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
        phase: Some(phase.into()),
        ..Default::default()
    });
    if phase != "Available" {
        pv.spec.as_mut().unwrap().claim_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            name: Some("c1".into()),
            namespace: Some("default".into()),
            uid: Some("claim-uid".into()),
            ..Default::default()
        });
    }
    w.pvs = vec![pv.clone()];
    let a = all_kinds(&w.plan_all());
    let want: &[&str] = if phase == "Released" {
        &["recycle"]
    } else {
        &[]
    };
    assert_eq!(a, want, "{phase}: in sync");
    (w, pv)
}

fn all_kinds(a: &[Action]) -> Vec<String> {
    a.iter()
        .map(|a| match a {
            Action::DeletePv { reason, note, .. } => format!("delete:{reason}:{note}"),
            Action::AnnotatePv { set, .. } => format!(
                "annotate:{}={}",
                set[0].0,
                set[0].1.clone().unwrap_or_else(|| "-".into())
            ),
            Action::Report { reason, .. } => reason.to_string(),
            other => kinds(std::slice::from_ref(other))[0].to_string(),
        })
        .collect()
}

fn set_path(pv: &mut PersistentVolume, path: &str) {
    pv.spec.as_mut().unwrap().local.as_mut().unwrap().path = path.into();
}

fn set_hostname(pv: &mut PersistentVolume, host: &str) {
    let a = pv.spec.as_mut().unwrap().node_affinity.as_mut().unwrap();
    a.required.as_mut().unwrap().node_selector_terms[0]
        .match_expressions
        .as_mut()
        .unwrap()[0]
        .values = Some(vec![host.into()]);
}

#[test]
fn a_pv_whose_immutable_fields_were_edited_is_withdrawn_if_unclaimed_and_kept_if_claimed() {
    // The API server refuses to change spec.local and spec.nodeAffinity, so
    // re-applying them fails on every pass: an unclaimed PV is withdrawn
    // (the next pass publishes it again), a claimed one is reported.
    let (mut w, pv) = published("Available");
    let mut edited = pv.clone();
    set_path(&mut edited, "/root/elsewhere");
    w.pvs = vec![edited.clone()];
    let a = all_kinds(&w.plan_all());
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(
        a[0].starts_with("delete:VolumeWithdrawn:") && a[0].contains("spec.local"),
        "{a:?}"
    );
    set_hostname(&mut edited, "n2");
    w.pvs = vec![edited.clone()];
    let a = all_kinds(&w.plan_all());
    assert!(a[0].contains("spec.local, spec.nodeAffinity"), "{a:?}");

    // Pre-bound by a user (claimRef, still Available): not withdrawn.
    let mut pre = edited.clone();
    pre.spec.as_mut().unwrap().claim_ref = Some(Default::default());
    w.pvs = vec![pre];
    assert_eq!(all_kinds(&w.plan_all()), ["PvModified"]);

    let (mut w, pv) = published("Bound");
    let mut edited = pv.clone();
    set_hostname(&mut edited, "n2");
    w.pvs = vec![edited];
    assert_eq!(
        all_kinds(&w.plan_all()),
        ["PvModified"],
        "never deleted, never re-applied"
    );

    // Released: the cleanup acts on the volume the key names, not the path.
    let (mut w, pv) = published("Released");
    let mut edited = pv.clone();
    set_path(&mut edited, "/root/elsewhere");
    w.pvs = vec![edited];
    let a = w.plan_all();
    assert_eq!(all_kinds(&a), ["recycle"]);
    let Action::Recycle(disklet::plan::Recycle { target, .. }) = &a[0] else {
        unreachable!()
    };
    assert!(
        matches!(target, disklet::plan::Target::Fs { mount_point: Some(m), .. } if m == &PathBuf::from(TARGET))
    );
}

#[test]
fn a_pv_whose_name_does_not_match_its_key_is_never_acted_on() {
    // A copy of another PV under a new name, or a key edited to name another
    // volume: acting on it could clean someone else's data.
    let (mut w, pv) = published("Released");
    let mut copy = pv.clone();
    copy.metadata.name = Some("my-copy".into());
    copy.metadata.uid = Some("uid-2".into());
    w.pvs = vec![copy];
    let a = all_kinds(&w.plan_all());
    assert!(a.contains(&"UnmanagedPv".to_string()), "{a:?}");
    assert!(!a.iter().any(|k| k == "recycle"), "{a:?}");

    // Another volume's key on this PV (every identity annotation matching it).
    let other = ours("sdb", 16, "u-2");
    w.inv.devices.push(other.clone());
    w.inv
        .mounts
        .push(mount(&other, "/var/lib/disklet/fast/u-2"));
    let mut forged = pv.clone();
    let anns = forged.metadata.annotations.as_mut().unwrap();
    anns.insert("disklet.io/volume-key".into(), "fs:u-2".into());
    anns.insert("disklet.io/fs-uuid".into(), "u-2".into());
    anns.insert("disklet.io/device-id".into(), "serial:SER-sdb".into());
    w.pvs = vec![forged];
    let a = all_kinds(&w.plan_all());
    assert!(a.contains(&"UnmanagedPv".to_string()), "{a:?}");
    assert!(!a.iter().any(|k| k == "recycle"), "{a:?}");
}

#[test]
fn forged_identity_annotations_of_a_released_pv_are_restored_before_any_cleanup() {
    let (mut w, pv) = published("Released");
    let mut forged = pv.clone();
    let anns = forged.metadata.annotations.as_mut().unwrap();
    anns.insert("disklet.io/fs-uuid".into(), "u-2".into());
    anns.insert("disklet.io/device-id".into(), "serial:SER-sdb".into());
    w.pvs = vec![forged];
    let a = w.plan_all();
    assert_eq!(all_kinds(&a)[0], "PvModified");
    let Some(Action::AnnotatePv { set, .. }) = a.get(1) else {
        panic!("{a:?}")
    };
    assert_eq!(
        set,
        &vec![
            ("disklet.io/fs-uuid".to_string(), Some("u-1".to_string())),
            (
                "disklet.io/device-id".to_string(),
                Some("serial:SER-sda".to_string())
            ),
        ]
    );
    assert_eq!(a.len(), 2, "no cleanup on forged values: {a:?}");
}

#[test]
fn a_disk_smaller_than_its_filesystem_is_never_offered_and_its_pvs_are_withdrawn_or_marked() {
    let shrink = |w: &mut World| {
        w.inv.devices[1].size_bytes = 50 << 30;
    };
    // No PV yet: not published, reported.
    let (mut w, _) = published("Available");
    w.pvs.clear();
    shrink(&mut w);
    assert_eq!(all_kinds(&w.plan_all()), ["DeviceShrunk"]);
    // Available: withdrawn.
    let (mut w, _) = published("Available");
    shrink(&mut w);
    let a = all_kinds(&w.plan_all());
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(
        a[0].starts_with("delete:VolumeWithdrawn:") && a[0].contains("smaller"),
        "{a:?}"
    );
    // A shrink that statvfs cannot show (it leaves out the filesystem's log
    // and metadata): the superblock's size decides.
    let (mut w, _) = published("Available");
    w.mounts.get_mut(Path::new(TARGET)).unwrap().fs_bytes = Some(100 << 30);
    w.inv.devices[1].size_bytes = 100 << 30;
    assert!(
        w.plan_all().is_empty(),
        "exactly the filesystem's size fits"
    );
    w.inv.devices[1].size_bytes = (100 << 30) - 4096;
    let a = all_kinds(&w.plan_all());
    assert!(
        a.len() == 1 && a[0].starts_with("delete:VolumeWithdrawn:") && a[0].contains("smaller"),
        "one block short of the superblock's size, above statvfs's: {a:?}"
    );
    // Disk and filesystem grown while the pass ran: the listing's size is
    // older than the filesystem's; the size read after it decides.
    w.mounts.get_mut(Path::new(TARGET)).unwrap().device_bytes = Some(120 << 30);
    assert!(w.plan_all().is_empty(), "an online grow is no shrink");
    // Bound, Released (even mid-cleanup): kept, marked, never cleaned.
    for phase in ["Bound", "Released"] {
        let (mut w, pv) = published(phase);
        shrink(&mut w);
        assert_eq!(
            all_kinds(&w.plan_all()),
            ["DeviceShrunk", "annotate:disklet.io/device-state=shrunk"],
            "{phase}"
        );
        let mut marked = pv.clone();
        let anns = marked.metadata.annotations.as_mut().unwrap();
        anns.insert("disklet.io/device-state".into(), "shrunk".into());
        anns.insert("disklet.io/cleanup".into(), "started".into());
        w.pvs = vec![marked.clone()];
        assert!(
            w.plan_all().is_empty(),
            "{phase}: marked once, nothing else"
        );
        // Fit again: the mark is cleared.
        w.inv.devices[1].size_bytes = 100 << 30;
        let a = all_kinds(&w.plan_all());
        assert_eq!(
            a[..2],
            ["DeviceReturned", "annotate:disklet.io/device-state=-"],
            "{phase}"
        );
    }
    // A grown disk changes nothing: the PV has the filesystem's size.
    let (mut w, _) = published("Bound");
    w.inv.devices[1].size_bytes = 200 << 30;
    assert!(w.plan_all().is_empty());
}

#[test]
fn a_read_only_or_unreadable_disk_is_never_taken_for_a_replaced_or_cleaned_one() {
    let read_only = |w: &mut World| w.inv.devices[1].read_only = true;
    let (mut w, _) = published("Available");
    read_only(&mut w);
    let a = all_kinds(&w.plan_all());
    assert!(
        a[0].starts_with("delete:VolumeWithdrawn:") && a[0].contains("read-only"),
        "{a:?}"
    );
    assert!(!a.iter().any(|k| k == "VolumeReplaced"), "{a:?}");
    let (mut w, pv) = published("Bound");
    read_only(&mut w);
    let a = all_kinds(&w.plan_all());
    assert!(a.contains(&"DeviceReadOnly".to_string()), "{a:?}");
    assert!(
        a.contains(&"annotate:disklet.io/device-state=read-only".to_string()),
        "{a:?}"
    );
    assert!(!a.iter().any(|k| k.starts_with("delete")), "{a:?}");

    // A Released PV whose cleanup had started: a read-only disk, or one whose
    // probe failed, is not "the cleanup finished" (the PV would be deleted
    // with the data still on the disk).
    let mut started = pv.clone();
    started.status.as_mut().unwrap().phase = Some("Released".into());
    started
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("disklet.io/cleanup".into(), "started".into());
    w.pvs = vec![started.clone()];
    let a = all_kinds(&w.plan_all());
    assert!(
        !a.iter().any(|k| k.starts_with("delete") || k == "recycle"),
        "{a:?}"
    );
    w.inv.devices[1].read_only = false;
    w.inv.devices[1].probe = Probe::Failed {
        error: "timed out".into(),
    };
    let a = all_kinds(&w.plan_all());
    assert!(
        !a.iter().any(|k| k.starts_with("delete") || k == "recycle"),
        "{a:?}"
    );
    assert!(!a.iter().any(|k| k == "VolumeReplaced"), "{a:?}");
}

/// An admin patches a PV to Retain before deleting its claim (the documented
/// way to keep a volume's data): disklet never puts the StorageClass's
/// Delete back, or the release would wipe the data. Other fields it owns
/// are still restored.
#[test]
fn a_reclaim_policy_changed_on_the_pv_is_kept() {
    for phase in ["Available", "Bound"] {
        let (mut w, mut pv) = published(phase);
        pv.spec.as_mut().unwrap().persistent_volume_reclaim_policy = Some("Retain".into());
        w.pvs = vec![pv.clone()];
        assert!(
            all_kinds(&w.plan_all()).is_empty(),
            "{phase}: the PV's Retain is left as it is"
        );
        pv.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("pv.kubernetes.io/provisioned-by");
        w.pvs = vec![pv];
        let a = w.plan_all();
        let Some(Action::ApplyPv { pv: applied, .. }) = a.first() else {
            panic!(
                "{phase}: a lost annotation is restored: {:?}",
                all_kinds(&a)
            )
        };
        assert_eq!(
            applied
                .spec
                .as_ref()
                .unwrap()
                .persistent_volume_reclaim_policy
                .as_deref(),
            Some("Retain"),
            "{phase}: applied with the PV's own policy"
        );
    }
}
