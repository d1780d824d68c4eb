//! From what is on the node to what must be done: format eligible disks, mount
//! ours, publish volumes as PVs. Pure: the reconciler observes, this decides,
//! the reconciler acts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{Class, Config, FsType, VolumeMode};
use crate::k8s::pv::{
    build_pv, immutable_differences, up_to_date, ANN_BY_ID, ANN_DEVICE_ID, ANN_FS_UUID, ANN_KEY,
    ANN_SERIAL,
};
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
    /// Delete one of our PVs (uid as precondition), with an Event.
    DeletePv {
        name: String,
        uid: String,
        /// The version the plan decided on: a PV changed since (bound, say)
        /// is not deleted (409), and the next pass decides again.
        resource_version: String,
        reason: &'static str,
        note: String,
    },
    /// A volume with data and no PV in this node's (label-scoped) view: if
    /// the PV of that name exists after all (its labels were removed by
    /// hand), apply it to restore them; otherwise report `otherwise`
    /// (`VolumeNotClean`) and create nothing.
    Readopt {
        pv: Box<PersistentVolume>,
        otherwise: String,
    },
    /// Set (Some) or remove (None) annotations on one of our PVs.
    AnnotatePv {
        name: String,
        set: Vec<(String, Option<String>)>,
    },
    /// Clean a Released volume (reclaim policy Delete), then delete its PV;
    /// the next pass publishes the volume afresh.
    Recycle {
        pv: String,
        uid: String,
        class: String,
        method: crate::config::CleanupMethod,
        target: crate::plan::recycle::Target,
        expected_device_id: Option<String>,
        expected_fs_uuid: Option<String>,
    },
    /// Nothing may be done yet (a pod still uses the volume): report, retry
    /// with backoff.
    Wait {
        pv: String,
        reason: &'static str,
        message: String,
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

/// A device path that survives reboots: a by-id link, else a by-path link.
/// Never the kernel name: after a reboot `/dev/sdb` may be another disk, and a
/// Bound PV's path cannot change.
pub fn stable_dev_path(dev: &Device) -> Option<PathBuf> {
    let pick = |prefix: &str| dev.links.iter().find(|l| l.starts_with(prefix)).cloned();
    pick("/dev/disk/by-id/").or_else(|| pick("/dev/disk/by-path/"))
}

/// Whether a device is smaller than the filesystem mounted from it: the
/// kernel then fails every access beyond the device's end (and refuses to
/// mount it again). The superblock's size when known; otherwise `statvfs`,
/// which undercounts (the xfs log, ext4 metadata), so that only a shrink
/// below what it reports is seen.
pub fn shrunk(dev: &Device, fact: &MountFact) -> bool {
    fact.fs_size() > fact.device_bytes.unwrap_or(dev.size_bytes)
}

/// The devices the OS runs from (those under `/`, `/boot`, `/boot/efi`,
/// kubelet's dir and hostDir, with the devices they sit on).
pub fn os_devices(inv: &Inventory, cfg: &Config) -> Vec<String> {
    inv.devices_under_paths(&[
        PathBuf::from("/"),
        PathBuf::from("/boot"),
        PathBuf::from("/boot/efi"),
        cfg.kubelet_dir.clone(),
        cfg.host_dir.clone(),
    ])
}

/// Why a discovery-dir symlink to `target` is not published, if it is not.
/// A link is the admin's word, but never for a disk in use. The plan and
/// `disklet scan` both ask this, so scan never shows a link eligible that
/// the agent refuses.
pub fn link_refusal(inv: &Inventory, os_devices: &[String], target: &Path) -> Option<String> {
    match inv.devices.iter().find(|d| d.devnode == target) {
        None => Some("not a known block device".to_string()),
        Some(d) if os_devices.contains(&d.name) => Some("an OS disk".into()),
        Some(d) if !d.holders.is_empty() => Some(format!("held by {}", d.holders.join(", "))),
        Some(d) if !d.partitions.is_empty() => Some("partitioned".into()),
        Some(d) if inv.mounts_of(d).next().is_some() => Some("mounted".into()),
        Some(d) if inv.swaps_of(d).next().is_some() => Some("active swap".into()),
        Some(_) => None,
    }
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

fn pv_annotation<'a>(pv: &'a PersistentVolume, k: &str) -> Option<&'a str> {
    pv.metadata.annotations.as_ref()?.get(k).map(String::as_str)
}

fn report(warning: bool, reason: &'static str, message: String) -> Action {
    Action::Report {
        warning,
        reason,
        message,
        subject: Subject::Node,
    }
}

/// An unclaimed PV, not being deleted: one that may be withdrawn.
fn unclaimed(pv: &PersistentVolume) -> bool {
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    pv.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some("Available" | "Pending"))
        && pv.spec.as_ref().is_none_or(|s| s.claim_ref.is_none())
}

pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut actions = crate::plan::recycle::recycle_plan(input);
    let mut volumes: Vec<Volume> = Vec::new();
    // Classes with work to publish whose StorageClass is missing.
    let mut unpublishable: Vec<&Class> = Vec::new();
    let host_dir = &input.cfg.host_dir;
    // Without the host's own mount table (no hostPID, a container's
    // mountinfo), `/` resolves to no device: mounts and OS disks are invisible,
    // and nothing may be formatted.
    let table_sees_root = !input
        .inv
        .devices_under_paths(&[PathBuf::from("/")])
        .is_empty();
    let mut blind_reported = false;
    let pv_device_ids: BTreeSet<&str> = input
        .pvs
        .iter()
        .filter_map(|p| {
            p.metadata
                .annotations
                .as_ref()?
                .get(ANN_DEVICE_ID)
                .map(String::as_str)
        })
        .collect();

    for (dev, d) in input.inv.devices.iter().zip(input.decisions) {
        let Some(class) = d.class.as_deref().and_then(|n| class_of(input.classes, n)) else {
            continue;
        };
        let raw = class.volume_mode == VolumeMode::Block || class.publish_fs_type;
        let publishable = matches!(input.scs.get(class.storage_class()), Some(Some(sc)) if sc.allows(&input.node.labels));
        let has_pv = dev
            .identity()
            .is_some_and(|id| pv_device_ids.contains(id.as_str()));
        match &d.verdict {
            Verdict::Refused { reason } => actions.push(report(
                false,
                "DiskSkipped",
                format!(
                    "{} (class {}): {}{}",
                    dev.devnode.display(),
                    class.name,
                    reason.as_str(),
                    d.detail
                        .as_deref()
                        .map(|x| format!(": {x}"))
                        .unwrap_or_default()
                ),
            )),
            // A disk behind one of our PVs (a raw volume whose pod has not
            // written yet, a class changed from Block) is never formatted.
            Verdict::Eligible if !raw && has_pv => actions.push(report(
                true,
                "DeviceHasPv",
                format!(
                    "{} looks blank but a PV of this node names it; not formatting it",
                    dev.devnode.display()
                ),
            )),
            // A disk is only worth formatting for a class that can publish it:
            // the missing StorageClass is reported below.
            Verdict::Eligible if !raw && !publishable => unpublishable.push(class),
            Verdict::Eligible if !raw && !table_sees_root && !blind_reported => {
                blind_reported = true;
                actions.push(report(
                    true,
                    "HostMountTableBlind",
                    format!("{} shows no device under /: it is not the host's mount table (set hostPID: true, or mountInfo), so nothing is formatted", input.cfg.mount_info.display()),
                ));
            }
            Verdict::Eligible if !raw && !table_sees_root => {}
            Verdict::Eligible if !raw => actions.push(Action::Format {
                device: dev.name.clone(),
                class: class.name.clone(),
                fs: class.fs_type,
                fingerprint: Fingerprint::of(dev, input.inv),
            }),
            Verdict::Eligible => {
                let (Some(id), Some(path)) = (dev.identity(), stable_dev_path(dev)) else {
                    actions.push(report(
                        true,
                        "NoStableIdentity",
                        format!("{}: no /dev/disk/by-id or by-path link (udev), so no path that survives a reboot; not publishing it raw", dev.devnode.display()),
                    ));
                    continue;
                };
                volumes.push(Volume {
                    key: format!("dev:{id}"),
                    class: class.name.clone(),
                    mode: class.volume_mode,
                    access_mode: class.access_mode,
                    path,
                    capacity_bytes: dev.size_bytes,
                    fs_type: class
                        .publish_fs_type
                        .then(|| class.fs_type.as_str().to_string()),
                    annotations: identity_annotations(dev),
                    create_blocked: None,
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
                        actions.push(report(
                            true,
                            "MountedElsewhere",
                            format!(
                                "{} is mounted at {}, expected {}; not publishing it",
                                dev.devnode.display(),
                                m.mount_point.display(),
                                target.display()
                            ),
                        ));
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
                    // A failing filesystem: nothing is made or published on
                    // it; the lifecycle plan withdraws or marks its PV.
                    Some(f) if f.io_error.is_some() => {
                        actions.push(report(
                            true,
                            "VolumeIoError",
                            format!(
                                "the filesystem of {} at {} fails: {}; not publishing it (unmount it, check it with xfs_repair or e2fsck, and disklet mounts it again)",
                                dev.devnode.display(),
                                target.display(),
                                f.io_error.as_deref().unwrap_or_default()
                            ),
                        ));
                    }
                    // Never offered to a new claim; the lifecycle plan
                    // withdraws or marks its PV.
                    Some(f) if shrunk(dev, f) => {
                        let key = format!("fs:{uuid}");
                        let has_pv = input
                            .pvs
                            .iter()
                            .any(|p| pv_annotation(p, ANN_KEY) == Some(key.as_str()));
                        if !has_pv {
                            actions.push(report(
                                true,
                                "DeviceShrunk",
                                format!(
                                    "{} ({} bytes) is smaller than its filesystem at {} ({} bytes); not publishing it",
                                    dev.devnode.display(),
                                    f.device_bytes.unwrap_or(dev.size_bytes),
                                    target.display(),
                                    f.fs_size()
                                ),
                            ));
                        }
                    }
                    Some(f) if f.vol_dir => {
                        let mut annotations = identity_annotations(dev);
                        annotations.insert(ANN_FS_UUID.to_string(), uuid.clone());
                        volumes.push(Volume {
                            key: format!("fs:{uuid}"),
                            class: class.name.clone(),
                            mode: VolumeMode::Filesystem,
                            access_mode: class.access_mode,
                            path: vol_dir(&target),
                            capacity_bytes: f.capacity_bytes,
                            fs_type: None,
                            annotations,
                            // Data of an earlier tenant (a PV deleted while
                            // Released, a disk moved in from another node) is
                            // never offered to a new claim.
                            create_blocked: (!f.vol_empty).then(|| format!("{} holds data but no PV of this node names it; it is not published until cleaned", vol_dir(&target).display())),
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

    let os_devices = os_devices(input.inv, input.cfg);
    for e in input.dirs {
        let Some(class) = class_of(input.classes, &e.class) else {
            continue;
        };
        if let Some(why) = &e.warning {
            actions.push(report(
                true,
                "DiscoveryEntryRefused",
                // Quoted: the name may hold the control characters that
                // are the reason.
                format!("{:?}: {why}; not publishing it", e.path),
            ));
            continue;
        }
        let capacity = match (&e.kind, class.volume_mode) {
            (DirEntryKind::MountPoint { capacity_bytes, .. }, VolumeMode::Filesystem) => {
                *capacity_bytes
            }
            (DirEntryKind::BlockLink { size_bytes, target }, VolumeMode::Block) => {
                if let Some(why) = link_refusal(input.inv, &os_devices, target) {
                    actions.push(report(
                        true,
                        "DiscoveryLinkRefused",
                        format!(
                            "{} -> {}: {why}; not publishing it",
                            e.path.display(),
                            target.display()
                        ),
                    ));
                    continue;
                }
                *size_bytes
            }
            _ => continue,
        };
        // The device behind the entry, so a cleanup can check it is still
        // the same one.
        let devno = match &e.kind {
            DirEntryKind::MountPoint { devno, .. } => Some(*devno),
            DirEntryKind::BlockLink { target, .. } => input
                .inv
                .devices
                .iter()
                .find(|d| &d.devnode == target)
                .map(|d| d.devno),
            DirEntryKind::Other => None,
        };
        let annotations = input
            .inv
            .devices
            .iter()
            .find(|d| Some(d.devno) == devno)
            .map(identity_annotations)
            .unwrap_or_default();
        volumes.push(Volume {
            key: format!("dir:{}", e.path.display()),
            class: class.name.clone(),
            mode: class.volume_mode,
            access_mode: class.access_mode,
            path: e.path.clone(),
            capacity_bytes: capacity,
            fs_type: None,
            annotations,
            create_blocked: None,
        });
    }

    let existing: BTreeMap<&str, &PersistentVolume> = input
        .pvs
        .iter()
        .filter_map(|p| p.metadata.name.as_deref().map(|n| (n, p)))
        .collect();
    // PV writes go last, after every report of this pass: whoever sees a PV
    // appear can rely on the Events of the same pass being there.
    let mut applies = Vec::new();
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
        if !sc.allows(&input.node.labels) {
            unpublishable.push(class);
            // One published before the class or the node's labels changed:
            // while unclaimed, it is withdrawn.
            if let Some(pv) = existing.get(name.as_str()).filter(|pv| unclaimed(pv)) {
                actions.push(Action::DeletePv {
                    name: name.clone(),
                    uid: pv.metadata.uid.clone().unwrap_or_default(),
                    resource_version: pv.metadata.resource_version.clone().unwrap_or_default(),
                    reason: "VolumeWithdrawn",
                    note: format!("{name}: node {} lies outside the allowedTopologies of StorageClass {sc_name:?}; withdrawn so no claim of the class is bound outside them", input.node.name),
                });
            }
            continue;
        }
        match existing.get(name.as_str()) {
            None => match v.create_blocked {
                Some(why) => actions.push(Action::Readopt {
                    pv: Box::new(desired),
                    otherwise: why,
                }),
                None => applies.push(Action::ApplyPv {
                    pv: Box::new(desired),
                    create: true,
                }),
            },
            Some(pv) => {
                let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
                let settled = pv.metadata.deletion_timestamp.is_some()
                    || matches!(phase, Some("Released" | "Failed"));
                if settled {
                    continue;
                }
                // Fields the API server never lets change (a `kubectl replace
                // --force` with an edited copy): applying them fails on every
                // pass. An unclaimed PV is withdrawn and published again as
                // disklet writes it; a claimed one is left as is.
                let changed = immutable_differences(pv, &desired);
                if !changed.is_empty() {
                    let uid = pv.metadata.uid.clone().unwrap_or_default();
                    let fields = changed.join(", ");
                    if unclaimed(pv) {
                        applies.push(Action::DeletePv {
                            name: name.clone(),
                            uid,
                            resource_version: pv.metadata.resource_version.clone().unwrap_or_default(),
                            reason: "VolumeWithdrawn",
                            note: format!("{name}: {fields} is not what disklet publishes for this volume (edited by hand?); withdrawn so nothing is scheduled onto it, and published again as disklet writes it"),
                        });
                    } else {
                        actions.push(Action::Report {
                            warning: true,
                            reason: "PvModified",
                            message: format!("{name} ({}): {fields} is not what disklet publishes for this volume (edited by hand?); a claimed PV is left as is, and a cleanup after its release acts only on the volume its key names, never on its path", phase.unwrap_or("Pending")),
                            subject: Subject::Pv(name.clone()),
                        });
                    }
                } else {
                    // The reclaim policy comes from the StorageClass at
                    // creation only: an admin who patches a PV to Retain
                    // before deleting its claim (the documented way to keep
                    // a volume's data) must not have it undone, or the
                    // release would wipe the data.
                    let mut desired = desired;
                    if let (Some(ds), Some(have)) = (
                        desired.spec.as_mut(),
                        pv.spec
                            .as_ref()
                            .and_then(|s| s.persistent_volume_reclaim_policy.clone()),
                    ) {
                        ds.persistent_volume_reclaim_policy = Some(have);
                    }
                    if !up_to_date(pv, &desired) {
                        applies.push(Action::ApplyPv {
                            pv: Box::new(desired),
                            create: false,
                        });
                    }
                }
            }
        }
    }
    let mut reported = BTreeSet::new();
    for class in unpublishable {
        let sc_name = class.storage_class();
        if !reported.insert(sc_name) {
            continue;
        }
        actions.push(match input.scs.get(sc_name) {
            Some(Some(_)) => Action::Report {
                warning: true,
                reason: "OutsideAllowedTopologies",
                message: format!("node {} lies outside the allowedTopologies of StorageClass {sc_name:?} (class {:?}): its disks are neither formatted nor published here, since the scheduler would bind claims of the class to them (it checks allowedTopologies only when it provisions)", input.node.name, class.name),
                subject: Subject::Node,
            },
            _ => Action::Report {
                warning: true,
                reason: "StorageClassMissing",
                message: format!("StorageClass {sc_name:?} of class {:?} does not exist; its disks are neither formatted nor published until it does (create it with provisioner kubernetes.io/no-provisioner)", class.name),
                subject: Subject::Node,
            },
        });
    }
    actions.extend(applies);
    actions
}
