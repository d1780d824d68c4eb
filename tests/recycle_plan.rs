//! The lifecycle plan, pure: what happens to each of this node's PVs given
//! its phase, reclaim policy, whether its disk is here, and whether kubelet
//! still uses it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use disklet::config::{CleanupMethod, Config};
use disklet::model::*;
use disklet::plan::Target;
use disklet::plan::{evaluate, plan, Action, Classes, NodeFacts, PlanInput};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeSpec, PersistentVolumeStatus};

const CFG: &str = r#"
hostDir: /var/lib/disklet
kubeletDir: /var/lib/kubelet
classes:
  - name: fast
    storageClassName: local-fast
    selector: {paths: ["/dev/sd*"]}
  - name: dirs
    storageClassName: local-fast
    cleanup: reformat
    discoveryDirs: [/mnt/disks]
  - name: raw
    storageClassName: local-fast
    volumeMode: Block
    cleanup: zeroout
    selector: {paths: ["/dev/nvme*"]}
"#;

fn ours(name: &str, minor: u32, uuid: &str) -> Device {
    let mut d = Device::new(name, DevNo::new(8, minor), DeviceKind::Disk);
    d.size_bytes = 100 << 30;
    d.serial = Some(format!("SER-{name}"));
    d.exclusive = Exclusive::Free;
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

fn mount(devno: DevNo, source: &str, at: &str) -> MountEntry {
    MountEntry {
        mount_id: 1,
        parent_id: 0,
        devno,
        root: "/".into(),
        mount_point: at.into(),
        options: "rw".into(),
        fs_type: "xfs".into(),
        source: source.into(),
    }
}

fn pv(
    name: &str,
    class: &str,
    key: &str,
    phase: &str,
    policy: &str,
    anns: &[(&str, &str)],
) -> PersistentVolume {
    let mut a: BTreeMap<String, String> = anns
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    a.insert("disklet.io/volume-key".into(), key.into());
    a.insert("disklet.io/node-uid".into(), "node-uid-1".into());
    let mut p = PersistentVolume::default();
    p.metadata.name = Some(name.into());
    p.metadata.uid = Some(format!("uid-{name}"));
    p.metadata.labels = Some([("disklet.io/class".to_string(), class.to_string())].into());
    p.metadata.annotations = Some(a);
    p.spec = Some(PersistentVolumeSpec {
        persistent_volume_reclaim_policy: Some(policy.into()),
        ..Default::default()
    });
    p.status = Some(PersistentVolumeStatus {
        phase: Some(phase.into()),
        ..Default::default()
    });
    p
}

struct World {
    cfg: Config,
    classes: Classes,
    inv: Inventory,
    dirs: Vec<DirEntry>,
    pvs: Vec<PersistentVolume>,
    node: NodeInfo,
}

fn world(devices: Vec<Device>, mounts: Vec<MountEntry>, pvs: Vec<PersistentVolume>) -> World {
    let cfg = Config::parse(CFG).unwrap();
    let classes = Classes::compile(&cfg).unwrap();
    let mut root = Device::new("vda", DevNo::new(254, 0), DeviceKind::Disk);
    root.size_bytes = 10 << 30;
    let mut all = vec![root];
    all.extend(devices);
    let mut m = vec![mount(DevNo::new(254, 0), "/dev/vda", "/")];
    m.extend(mounts);
    World {
        cfg,
        classes,
        inv: Inventory {
            devices: all,
            mounts: m,
            swaps: vec![],
        },
        dirs: vec![],
        pvs,
        node: NodeInfo {
            name: "n1".into(),
            uid: "node-uid-1".into(),
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
        let scs = [(
            "local-fast".to_string(),
            Some(ScInfo {
                reclaim_policy: "Delete".into(),
                mount_options: vec![],
                ..Default::default()
            }),
        )]
        .into();
        // Only lifecycle actions: provisioning has its own tests.
        plan(&PlanInput {
            cfg: &self.cfg,
            classes: &self.classes,
            inv: &self.inv,
            decisions: &decisions,
            mounts: &BTreeMap::new(),
            dirs: &self.dirs,
            pvs: &self.pvs,
            node: &self.node,
            scs: &scs,
        })
        .into_iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Mount { .. }
                    | Action::MakeVolDir { .. }
                    | Action::ApplyPv { .. }
                    | Action::Format { .. }
            )
        })
        .filter(|a| {
            !matches!(
                a,
                Action::Report {
                    reason: "DiskSkipped",
                    ..
                }
            )
        })
        .collect()
    }
}

fn kinds(a: &[Action]) -> Vec<String> {
    a.iter()
        .map(|a| match a {
            Action::DeletePv { reason, .. } => format!("delete:{reason}"),
            Action::AnnotatePv { set, .. } => format!(
                "annotate:{}={}",
                set[0].0,
                set[0].1.clone().unwrap_or_else(|| "-".into())
            ),
            Action::Recycle(r) => format!("recycle:{}", r.method.as_str()),
            Action::Wait { reason, .. } => format!("wait:{reason}"),
            Action::Report { reason, .. } => reason.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

const TARGET: &str = "/var/lib/disklet/fast/u-1";

#[test]
fn a_released_delete_volume_is_recycled_by_reformat_after_identity_is_known() {
    let d = ours("sda", 0, "u-1");
    let p = pv(
        "pv1",
        "fast",
        "fs:u-1",
        "Released",
        "Delete",
        &[
            ("disklet.io/fs-uuid", "u-1"),
            ("disklet.io/device-id", "serial:SER-sda"),
        ],
    );
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sda", TARGET)],
        vec![p],
    );
    let a = w.plan();
    assert_eq!(kinds(&a), ["recycle:reformat"]);
    let Action::Recycle(disklet::plan::Recycle {
        target,
        expected_device_id,
        expected_fs_uuid,
        uid,
        ..
    }) = &a[0]
    else {
        unreachable!()
    };
    assert!(matches!(target, Target::Fs { device, mount_point: Some(_), .. } if device == "sda"));
    assert_eq!(expected_device_id.as_deref(), Some("serial:SER-sda"));
    assert_eq!(expected_fs_uuid.as_deref(), Some("u-1"));
    assert_eq!(uid, "uid-pv1");
}

#[test]
fn a_volume_kubelet_still_mounts_is_never_cleaned() {
    let d = ours("sda", 0, "u-1");
    let p = pv("pv1", "fast", "fs:u-1", "Released", "Delete", &[]);
    let pod = "/var/lib/kubelet/pods/7f1c/volumes/kubernetes.io~local-volume/pv1";
    let w = world(
        vec![d.clone()],
        vec![
            mount(d.devno, "/dev/sda", TARGET),
            mount(d.devno, "/dev/sda", pod),
        ],
        vec![p],
    );
    let a = w.plan();
    assert_eq!(kinds(&a), ["wait:VolumeInUse"]);
    let Action::Wait { message, .. } = &a[0] else {
        unreachable!()
    };
    assert!(message.contains(pod), "{message}");

    // A raw device that kubelet bind-mounted for a pod (block volume mapping).
    let mut n = Device::new("nvme0n1", DevNo::new(259, 0), DeviceKind::Disk);
    n.wwid = Some("eui.1".into());
    let p = pv(
        "pv2",
        "raw",
        "dev:wwn:eui.1",
        "Released",
        "Delete",
        &[("disklet.io/device-id", "wwn:eui.1")],
    );
    let mut m = mount(
        DevNo::new(0, 5),
        "devtmpfs",
        "/var/lib/kubelet/plugins/kubernetes.io~local-volume/volumeDevices/publish/pv2/7f1c",
    );
    m.fs_type = "devtmpfs".into();
    m.root = "/nvme0n1".into();
    let w = world(vec![n.clone()], vec![m], vec![p.clone()]);
    assert_eq!(kinds(&w.plan()), ["wait:VolumeInUse"]);
    let w = world(vec![n], vec![], vec![p]);
    assert_eq!(
        kinds(&w.plan()),
        ["recycle:zeroout"],
        "the class's configured method"
    );
}

#[test]
fn retain_keeps_data_and_says_so_once() {
    let d = ours("sda", 0, "u-1");
    let p = pv("pv1", "fast", "fs:u-1", "Released", "Retain", &[]);
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sda", TARGET)],
        vec![p],
    );
    assert_eq!(
        kinds(&w.plan()),
        ["Retained", "annotate:disklet.io/reclaim=retained"]
    );
    let p = pv(
        "pv1",
        "fast",
        "fs:u-1",
        "Released",
        "Retain",
        &[("disklet.io/reclaim", "retained")],
    );
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sda", TARGET)],
        vec![p],
    );
    assert!(w.plan().is_empty());
    let p = pv("pv1", "fast", "fs:u-1", "Released", "Recycle", &[]);
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sda", TARGET)],
        vec![p],
    );
    assert_eq!(kinds(&w.plan()), ["ReclaimPolicyUnsupported"]);
}

#[test]
fn vanished_disks_withdraw_available_pvs_and_mark_claimed_ones() {
    let anns = [("disklet.io/device-id", "serial:SER-sda")];
    for phase in ["Available", "Pending"] {
        let w = world(
            vec![],
            vec![],
            vec![pv("pv1", "fast", "fs:u-1", phase, "Delete", &anns)],
        );
        assert_eq!(kinds(&w.plan()), ["delete:VolumeWithdrawn"], "{phase}");
    }
    // Mid-bind: claimRef written, the phase not yet (a bind is two
    // updates): claimed already, never withdrawn.
    let mut mid_bind = pv("pv1", "fast", "fs:u-1", "Available", "Delete", &anns);
    mid_bind.spec.as_mut().unwrap().claim_ref = Some(Default::default());
    assert_eq!(
        kinds(&world(vec![], vec![], vec![mid_bind]).plan()),
        ["DeviceMissing", "annotate:disklet.io/device-state=missing"],
        "a PV with a claimRef is claimed"
    );
    for phase in ["Bound", "Released"] {
        let w = world(
            vec![],
            vec![],
            vec![pv("pv1", "fast", "fs:u-1", phase, "Delete", &anns)],
        );
        assert_eq!(
            kinds(&w.plan()),
            ["DeviceMissing", "annotate:disklet.io/device-state=missing"],
            "{phase}: never deleted"
        );
        let marked = pv(
            "pv1",
            "fast",
            "fs:u-1",
            phase,
            "Delete",
            &[anns[0], ("disklet.io/device-state", "missing")],
        );
        assert!(
            world(vec![], vec![], vec![marked]).plan().is_empty(),
            "marked once"
        );
    }
    // The same disk returns.
    let d = ours("sdb", 16, "u-1");
    let marked = pv(
        "pv1",
        "fast",
        "fs:u-1",
        "Bound",
        "Delete",
        &[("disklet.io/device-state", "missing")],
    );
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sdb", TARGET)],
        vec![marked],
    );
    assert_eq!(
        kinds(&w.plan()),
        ["DeviceReturned", "annotate:disklet.io/device-state=-"],
        "found under another kernel name"
    );
}

#[test]
fn a_different_filesystem_on_the_same_disk_never_inherits_the_pv() {
    let d = ours("sda", 0, "u-NEW");
    let anns = [("disklet.io/device-id", "serial:SER-sda")];
    let w = world(
        vec![d.clone()],
        vec![],
        vec![pv("pv1", "fast", "fs:u-1", "Bound", "Delete", &anns)],
    );
    assert_eq!(kinds(&w.plan()), ["VolumeReplaced"]);
    // After a crash between a finished reformat and the PV delete: resume.
    let started = [anns[0], ("disklet.io/cleanup", "started")];
    let w = world(
        vec![d],
        vec![],
        vec![pv("pv1", "fast", "fs:u-1", "Released", "Delete", &started)],
    );
    assert_eq!(kinds(&w.plan()), ["delete:Recycled"]);
}

#[test]
fn pvs_of_an_earlier_node_incarnation_are_adopted_only_with_their_disk() {
    let d = ours("sda", 0, "u-1");
    let mut p = pv("pv1", "fast", "fs:u-1", "Available", "Delete", &[]);
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("disklet.io/node-uid".into(), "old-uid".into());
    let w = world(vec![], vec![], vec![p.clone()]);
    assert_eq!(
        kinds(&w.plan()),
        ["OrphanedPv"],
        "not withdrawn on another Node's word"
    );
    let w = world(
        vec![d.clone()],
        vec![mount(d.devno, "/dev/sda", TARGET)],
        vec![p],
    );
    assert_eq!(
        kinds(&w.plan()),
        ["Adopted", "annotate:disklet.io/node-uid=node-uid-1"]
    );
}

#[test]
fn discovery_dir_volumes_are_cleaned_file_by_file_whatever_the_class_says() {
    let p = pv("pv3", "dirs", "dir:/mnt/disks/a", "Released", "Delete", &[]);
    let mut w = world(vec![], vec![], vec![p]);
    w.dirs = vec![DirEntry {
        class: "dirs".into(),
        path: "/mnt/disks/a".into(),
        kind: DirEntryKind::MountPoint {
            capacity_bytes: 1,
            devno: DevNo::new(8, 1),
        },
        warning: None,
    }];
    assert_eq!(
        kinds(&w.plan()),
        ["recycle:files"],
        "reformat does not apply to a volume disklet did not format"
    );
    assert_eq!(
        Target::Dir {
            path: "/x".into(),
            devno: DevNo::new(1, 1)
        }
        .method(Some(CleanupMethod::None)),
        CleanupMethod::None
    );
    w.dirs.clear();
    assert_eq!(
        kinds(&w.plan()),
        ["DeviceMissing", "annotate:disklet.io/device-state=missing"],
        "unmounted entry"
    );
}

#[test]
fn a_pv_without_disklets_key_is_left_alone() {
    let mut p = pv("pv9", "fast", "fs:u-1", "Available", "Delete", &[]);
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove("disklet.io/volume-key");
    assert_eq!(
        kinds(&world(vec![], vec![], vec![p.clone()]).plan()),
        ["UnmanagedPv"],
        "an Available PV edited by hand is not withdrawn"
    );
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("disklet.io/volume-key".into(), "../etc".into());
    assert_eq!(
        kinds(&world(vec![], vec![], vec![p]).plan()),
        ["UnmanagedPv"]
    );
}
