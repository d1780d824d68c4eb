//! From what is on the node to what must be done: format eligible disks, mount
//! ours, publish volumes as PVs. Pure: the reconciler observes, this decides,
//! the reconciler acts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{Class, Config, FsType, VolumeMode};
use crate::k8s::pv::{build_pv, up_to_date, ANN_BY_ID, ANN_DEVICE_ID, ANN_FS_UUID, ANN_SERIAL};
use crate::model::{
    Device, DirEntry, DirEntryKind, Fingerprint, Inventory, MountFact, NodeInfo, ScInfo, Volume,
};
use crate::plan::{Classes, Decision, Verdict};

/// What a report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node,
    Pv(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// mkfs after the interlocks; the next pass mounts and publishes.
    Format {
        device: String,
        class: String,
        fs: FsType,
        fingerprint: Fingerprint,
    },
    Mount {
        device: String,
        devnode: PathBuf,
        fs_type: String,
        target: PathBuf,
        options: Vec<String>,
    },
    /// Creates `<mount>/vol`, the PV path, inside the mounted filesystem.
    MakeVolDir { mount_point: PathBuf },
    ApplyPv {
        pv: Box<PersistentVolume>,
        create: bool,
    },
    Report {
        warning: bool,
        reason: &'static str,
        message: String,
        subject: Subject,
    },
}

/// Everything the plan decides on.
pub struct PlanInput<'a> {
    pub cfg: &'a Config,
    pub classes: &'a Classes,
    pub inv: &'a Inventory,
    /// One per device of `inv`, same order.
    pub decisions: &'a [Decision],
    /// Facts about mount points under hostDir, by mount point.
    pub mounts: &'a BTreeMap<PathBuf, MountFact>,
    pub dirs: &'a [DirEntry],
    /// This node's PVs (the label-scoped reflector's view).
    pub pvs: &'a [PersistentVolume],
    pub node: &'a NodeInfo,
    /// StorageClasses by name; `None` when missing.
    pub scs: &'a BTreeMap<String, Option<ScInfo>>,
}

/// Where disklet mounts a filesystem it owns.
pub fn mount_target(host_dir: &Path, class: &str, uuid: &str) -> PathBuf {
    host_dir.join(class).join(uuid)
}

/// The PV path inside a mount: exists only while the filesystem is mounted.
pub fn vol_dir(mount_point: &Path) -> PathBuf {
    mount_point.join("vol")
}

/// A device path that survives reboots, best first: by-id, by-path, the node.
pub fn stable_dev_path(dev: &Device) -> PathBuf {
    let pick = |prefix: &str| dev.links.iter().find(|l| l.starts_with(prefix)).cloned();
    pick("/dev/disk/by-id/")
        .or_else(|| pick("/dev/disk/by-path/"))
        .unwrap_or_else(|| dev.devnode.clone())
}

fn class_of<'a>(classes: &'a Classes, name: &str) -> Option<&'a Class> {
    classes
        .classes
        .iter()
        .map(|c| &c.class)
        .find(|c| c.name == name)
}

fn identity_annotations(dev: &Device) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    if let Some(id) = dev.identity() {
        a.insert(ANN_DEVICE_ID.to_string(), id);
    }
    if let Some(l) = dev.links.iter().find(|l| l.starts_with("/dev/disk/by-id/")) {
        a.insert(ANN_BY_ID.to_string(), l.to_string_lossy().into_owned());
    }
    let serial = dev.serial.clone().or_else(|| {
        dev.udev_properties()
            .and_then(|p| p.get("ID_SERIAL").cloned())
    });
    if let Some(s) = serial {
        a.insert(ANN_SERIAL.to_string(), s);
    }
    a
}

pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut volumes: Vec<Volume> = Vec::new();
    // Classes with work to publish whose StorageClass is missing.
    let mut unpublishable: Vec<&Class> = Vec::new();
    let host_dir = &input.cfg.host_dir;

    for (dev, d) in input.inv.devices.iter().zip(input.decisions) {
        let Some(class) = d.class.as_deref().and_then(|n| class_of(input.classes, n)) else {
            continue;
        };
        let raw = class.volume_mode == VolumeMode::Block || class.publish_fs_type;
        let publishable = matches!(input.scs.get(class.storage_class()), Some(Some(_)));
        match &d.verdict {
            // A disk is only worth formatting for a class that can publish it:
            // the missing StorageClass is reported below.
            Verdict::Eligible if !raw && !publishable => unpublishable.push(class),
            Verdict::Eligible if !raw => actions.push(Action::Format {
                device: dev.name.clone(),
                class: class.name.clone(),
                fs: class.fs_type,
                fingerprint: Fingerprint::of(dev, input.inv),
            }),
            Verdict::Eligible => {
                let Some(id) = dev.identity() else {
                    actions.push(Action::Report {
                        warning: true,
                        reason: "NoStableIdentity",
                        message: format!(
                            "{}: no WWN, serial, by-id link or backing file; not publishing it raw",
                            dev.devnode.display()
                        ),
                        subject: Subject::Node,
                    });
                    continue;
                };
                volumes.push(Volume {
                    key: format!("dev:{id}"),
                    class: class.name.clone(),
                    mode: class.volume_mode,
                    path: stable_dev_path(dev),
                    capacity_bytes: dev.size_bytes,
                    fs_type: class
                        .publish_fs_type
                        .then(|| class.fs_type.as_str().to_string()),
                    annotations: identity_annotations(dev),
                });
            }
            Verdict::Ours { fs_type, uuid } => {
                let Some(uuid) = uuid else { continue };
                let target = mount_target(host_dir, &class.name, uuid);
                let mounts: Vec<_> = input.inv.mounts_of(dev).collect();
                let at_target = mounts
                    .iter()
                    .any(|m| m.mount_point == target && m.root == Path::new("/"));
                if !at_target {
                    if let Some(m) = mounts.iter().find(|m| m.mount_point.starts_with(host_dir)) {
                        actions.push(Action::Report {
                            warning: true,
                            reason: "MountedElsewhere",
                            message: format!(
                                "{} is mounted at {}, expected {}; not publishing it",
                                dev.devnode.display(),
                                m.mount_point.display(),
                                target.display()
                            ),
                            subject: Subject::Node,
                        });
                    } else {
                        actions.push(Action::Mount {
                            device: dev.name.clone(),
                            devnode: dev.devnode.clone(),
                            fs_type: fs_type.clone(),
                            target,
                            options: class.mount_options.clone(),
                        });
                    }
                    continue;
                }
                match input.mounts.get(&target) {
                    Some(f) if f.vol_dir => {
                        let mut annotations = identity_annotations(dev);
                        annotations.insert(ANN_FS_UUID.to_string(), uuid.clone());
                        volumes.push(Volume {
                            key: format!("fs:{uuid}"),
                            class: class.name.clone(),
                            mode: VolumeMode::Filesystem,
                            path: vol_dir(&target),
                            capacity_bytes: f.capacity_bytes,
                            fs_type: None,
                            annotations,
                        });
                    }
                    _ => actions.push(Action::MakeVolDir {
                        mount_point: target,
                    }),
                }
            }
            _ => {}
        }
    }

    for e in input.dirs {
        let Some(class) = class_of(input.classes, &e.class) else {
            continue;
        };
        let capacity = match (&e.kind, class.volume_mode) {
            (DirEntryKind::MountPoint { capacity_bytes, .. }, VolumeMode::Filesystem) => {
                *capacity_bytes
            }
            (DirEntryKind::BlockLink { size_bytes, .. }, VolumeMode::Block) => *size_bytes,
            _ => continue,
        };
        volumes.push(Volume {
            key: format!("dir:{}", e.path.display()),
            class: class.name.clone(),
            mode: class.volume_mode,
            path: e.path.clone(),
            capacity_bytes: capacity,
            fs_type: None,
            annotations: BTreeMap::new(),
        });
    }

    let existing: BTreeMap<&str, &PersistentVolume> = input
        .pvs
        .iter()
        .filter_map(|p| p.metadata.name.as_deref().map(|n| (n, p)))
        .collect();
    for v in volumes {
        let Some(class) = class_of(input.classes, &v.class) else {
            continue;
        };
        let sc_name = class.storage_class();
        let Some(Some(sc)) = input.scs.get(sc_name) else {
            unpublishable.push(class);
            continue;
        };
        let desired = build_pv(&v, input.node, sc_name, sc, &input.cfg.topology_keys);
        let name = desired.metadata.name.clone().unwrap_or_default();
        match existing.get(name.as_str()) {
            None => actions.push(Action::ApplyPv {
                pv: Box::new(desired),
                create: true,
            }),
            Some(pv) => {
                let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
                let settled = pv.metadata.deletion_timestamp.is_some()
                    || matches!(phase, Some("Released" | "Failed"));
                if !settled && !up_to_date(pv, &desired) {
                    actions.push(Action::ApplyPv {
                        pv: Box::new(desired),
                        create: false,
                    });
                }
            }
        }
    }
    let mut reported = BTreeSet::new();
    for class in unpublishable {
        let sc_name = class.storage_class();
        if reported.insert(sc_name) {
            actions.push(Action::Report {
                warning: true,
                reason: "StorageClassMissing",
                message: format!("StorageClass {sc_name:?} of class {:?} does not exist; its disks are neither formatted nor published until it does (create it with provisioner kubernetes.io/no-provisioner)", class.name),
                subject: Subject::Node,
            });
        }
    }
    actions
}
