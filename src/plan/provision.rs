//! From what is on the node to what must be done: format eligible disks, mount
//! ours, publish volumes as PVs. Pure: the reconciler observes, this decides,
//! the reconciler acts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{Class, Config, VolumeMode};
use crate::model::keys::{ANN_BY_ID, ANN_DEVICE_ID, ANN_FS_UUID, ANN_KEY, ANN_SERIAL};
use crate::model::reasons::event;
use crate::model::volume::{mount_target, shrunk, vol_dir};
use crate::model::{Device, DirEntry, DirEntryKind, Fingerprint, Inventory, Volume};
use crate::plan::action::{Action, PlanInput, Subject};
use crate::plan::pv::{build_pv, immutable_differences, up_to_date};
use crate::plan::{Classes, Decision, Verdict};

/// A device path that survives reboots: a by-id link, else a by-path link.
/// Never the kernel name: after a reboot `/dev/sdb` may be another disk, and a
/// Bound PV's path cannot change.
pub fn stable_dev_path(dev: &Device) -> Option<PathBuf> {
    let pick = |prefix: &str| dev.links.iter().find(|l| l.starts_with(prefix)).cloned();
    pick("/dev/disk/by-id/").or_else(|| pick("/dev/disk/by-path/"))
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

/// Format, mount and publish what is eligible; withdraw what cannot serve.
pub fn provision_plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut p = Provisioning::new(input);
    for (dev, d) in input.inv.devices.iter().zip(input.decisions) {
        p.device(dev, d);
    }
    let os_devices = os_devices(input.inv, input.cfg);
    for e in input.dirs {
        p.discovery_entry(e, &os_devices);
    }
    let existing: BTreeMap<&str, &PersistentVolume> = input
        .pvs
        .iter()
        .filter_map(|p| p.metadata.name.as_deref().map(|n| (n, p)))
        .collect();
    for v in std::mem::take(&mut p.volumes) {
        p.publish(v, &existing);
    }
    p.report_unpublishable();
    // PV writes go last, after every report of this pass: whoever sees a PV
    // appear can rely on the Events of the same pass being there.
    p.actions.extend(p.applies);
    p.actions
}

/// The provisioning plan as it is being made.
struct Provisioning<'i, 'a> {
    input: &'i PlanInput<'a>,
    actions: Vec<Action>,
    /// PV writes, put after every other action.
    applies: Vec<Action>,
    volumes: Vec<Volume>,
    /// Classes with work to publish whose StorageClass is missing, or whose
    /// allowedTopologies leave this node out.
    unpublishable: Vec<&'a Class>,
    /// Without the host's own mount table (no hostPID, a container's
    /// mountinfo), `/` resolves to no device: mounts and OS disks are
    /// invisible, and nothing may be formatted.
    table_sees_root: bool,
    blind_reported: bool,
    /// The device identities this node's PVs name.
    pv_device_ids: BTreeSet<&'a str>,
}

impl<'i, 'a> Provisioning<'i, 'a> {
    fn new(input: &'i PlanInput<'a>) -> Self {
        let pvs: &'a [PersistentVolume] = input.pvs;
        let pv_device_ids = pvs
            .iter()
            .filter_map(|p| {
                p.metadata
                    .annotations
                    .as_ref()?
                    .get(ANN_DEVICE_ID)
                    .map(String::as_str)
            })
            .collect();
        Provisioning {
            input,
            actions: Vec::new(),
            applies: Vec::new(),
            volumes: Vec::new(),
            unpublishable: Vec::new(),
            table_sees_root: !input
                .inv
                .devices_under_paths(&[PathBuf::from("/")])
                .is_empty(),
            blind_reported: false,
            pv_device_ids,
        }
    }

    /// One device of a class, by its verdict.
    fn device(&mut self, dev: &Device, d: &Decision) {
        let classes: &'a Classes = self.input.classes;
        let Some(class) = d.class.as_deref().and_then(|n| class_of(classes, n)) else {
            return;
        };
        match &d.verdict {
            Verdict::Refused { reason } => self.actions.push(report(
                false,
                event::DISK_SKIPPED,
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
            Verdict::Eligible
                if class.volume_mode == VolumeMode::Block || class.publish_fs_type =>
            {
                self.raw_volume(dev, class)
            }
            Verdict::Eligible => self.blank(dev, class),
            Verdict::Ours {
                fs_type,
                uuid: Some(uuid),
            } => self.ours(dev, class, fs_type, uuid),
            _ => {}
        }
    }

    /// A blank disk for a filesystem class: formatted, unless a PV names it,
    /// its class cannot publish, or the mount table is not the host's.
    fn blank(&mut self, dev: &Device, class: &'a Class) {
        let input = self.input;
        let publishable = matches!(input.scs.get(class.storage_class()), Some(Some(sc)) if sc.allows(&input.node.labels));
        let has_pv = dev
            .identity()
            .is_some_and(|id| self.pv_device_ids.contains(id.as_str()));
        if has_pv {
            // A disk behind one of our PVs (a raw volume whose pod has not
            // written yet, a class changed from Block) is never formatted.
            self.actions.push(report(
                true,
                event::DEVICE_HAS_PV,
                format!(
                    "{} looks blank but a PV of this node names it; not formatting it",
                    dev.devnode.display()
                ),
            ));
        } else if !publishable {
            // A disk is only worth formatting for a class that can publish
            // it: the missing StorageClass is reported at the end.
            self.unpublishable.push(class);
        } else if !self.table_sees_root {
            if !self.blind_reported {
                self.blind_reported = true;
                self.actions.push(report(
                    true,
                    event::HOST_MOUNT_TABLE_BLIND,
                    format!("{} shows no device under /: it is not the host's mount table (set hostPID: true, or mountInfo), so nothing is formatted", input.cfg.mount_info.display()),
                ));
            }
        } else {
            self.actions.push(Action::Format {
                device: dev.name.clone(),
                class: class.name.clone(),
                fs: class.fs_type,
                fingerprint: Fingerprint::of(dev, input.inv),
            });
        }
    }

    /// A blank disk of a Block (or publishFsType) class: published as it is,
    /// by a path that survives a reboot.
    fn raw_volume(&mut self, dev: &Device, class: &Class) {
        let (Some(id), Some(path)) = (dev.identity(), stable_dev_path(dev)) else {
            self.actions.push(report(
                true,
                event::NO_STABLE_IDENTITY,
                format!("{}: no /dev/disk/by-id or by-path link (udev), so no path that survives a reboot; not publishing it raw", dev.devnode.display()),
            ));
            return;
        };
        self.volumes.push(Volume {
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

    /// A filesystem of ours: mounted at its path, then published.
    fn ours(&mut self, dev: &Device, class: &Class, fs_type: &str, uuid: &str) {
        let host_dir = &self.input.cfg.host_dir;
        let target = mount_target(host_dir, &class.name, uuid);
        let mounts: Vec<_> = self.input.inv.mounts_of(dev).collect();
        let at_target = mounts
            .iter()
            .any(|m| m.mount_point == target && m.root == Path::new("/"));
        if at_target {
            return self.mounted(dev, class, uuid, target);
        }
        if let Some(m) = mounts.iter().find(|m| m.mount_point.starts_with(host_dir)) {
            self.actions.push(report(
                true,
                event::MOUNTED_ELSEWHERE,
                format!(
                    "{} is mounted at {}, expected {}; not publishing it",
                    dev.devnode.display(),
                    m.mount_point.display(),
                    target.display()
                ),
            ));
        } else {
            self.actions.push(Action::Mount {
                device: dev.name.clone(),
                devnode: dev.devnode.clone(),
                fs_type: fs_type.to_string(),
                target,
                options: class.mount_options.clone(),
            });
        }
    }

    /// A filesystem of ours mounted at `target`: published if it is sound.
    fn mounted(&mut self, dev: &Device, class: &Class, uuid: &str, target: PathBuf) {
        match self.input.mounts.get(&target) {
            // A failing filesystem: nothing is made or published on it; the
            // lifecycle plan withdraws or marks its PV.
            Some(f) if f.io_error.is_some() => {
                self.actions.push(report(
                    true,
                    event::VOLUME_IO_ERROR,
                    format!(
                        "the filesystem of {} at {} fails: {}; not publishing it (unmount it, check it with xfs_repair or e2fsck, and disklet mounts it again)",
                        dev.devnode.display(),
                        target.display(),
                        f.io_error.as_deref().unwrap_or_default()
                    ),
                ));
            }
            // Never offered to a new claim; the lifecycle plan withdraws or
            // marks its PV.
            Some(f) if shrunk(dev, f) => {
                let key = format!("fs:{uuid}");
                let has_pv = self
                    .input
                    .pvs
                    .iter()
                    .any(|p| pv_annotation(p, ANN_KEY) == Some(key.as_str()));
                if !has_pv {
                    self.actions.push(report(
                        true,
                        event::DEVICE_SHRUNK,
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
            // A pool publishes nothing: the CSI driver carves it up.
            _ if class.is_pool() => {}
            Some(f) if f.vol_dir => {
                let mut annotations = identity_annotations(dev);
                annotations.insert(ANN_FS_UUID.to_string(), uuid.to_string());
                self.volumes.push(Volume {
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
            _ => self.actions.push(Action::MakeVolDir {
                mount_point: target,
            }),
        }
    }

    /// An entry of a discovery dir: a mount point (Filesystem class) or a
    /// link to a block device (Block class), published as it is.
    fn discovery_entry(&mut self, e: &DirEntry, os_devices: &[String]) {
        let input = self.input;
        let Some(class) = class_of(input.classes, &e.class) else {
            return;
        };
        if let Some(why) = &e.warning {
            self.actions.push(report(
                true,
                event::DISCOVERY_ENTRY_REFUSED,
                // Quoted: the name may hold the control characters that are
                // the reason.
                format!("{:?}: {why}; not publishing it", e.path),
            ));
            return;
        }
        let capacity = match (&e.kind, class.volume_mode) {
            (DirEntryKind::MountPoint { capacity_bytes, .. }, VolumeMode::Filesystem) => {
                *capacity_bytes
            }
            (DirEntryKind::BlockLink { size_bytes, target }, VolumeMode::Block) => {
                if let Some(why) = link_refusal(input.inv, os_devices, target) {
                    self.actions.push(report(
                        true,
                        event::DISCOVERY_LINK_REFUSED,
                        format!(
                            "{} -> {}: {why}; not publishing it",
                            e.path.display(),
                            target.display()
                        ),
                    ));
                    return;
                }
                *size_bytes
            }
            _ => return,
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
        self.volumes.push(Volume {
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

    /// A volume's PV: created, brought up to date, or withdrawn from a node
    /// outside its class's allowedTopologies.
    fn publish(&mut self, v: Volume, existing: &BTreeMap<&str, &PersistentVolume>) {
        let input = self.input;
        let classes: &'a Classes = input.classes;
        let Some(class) = class_of(classes, &v.class) else {
            return;
        };
        let sc_name = class.storage_class();
        let Some(Some(sc)) = input.scs.get(sc_name) else {
            self.unpublishable.push(class);
            return;
        };
        let desired = build_pv(&v, input.node, sc_name, sc, &input.cfg.topology_keys);
        let name = desired.metadata.name.clone().unwrap_or_default();
        let found = existing.get(name.as_str()).copied();
        if !sc.allows(&input.node.labels) {
            self.unpublishable.push(class);
            // One published before the class or the node's labels changed:
            // while unclaimed, it is withdrawn.
            if let Some(pv) = found.filter(|pv| unclaimed(pv)) {
                self.actions.push(Action::DeletePv {
                    name: name.clone(),
                    uid: pv.metadata.uid.clone().unwrap_or_default(),
                    resource_version: pv.metadata.resource_version.clone().unwrap_or_default(),
                    reason: event::VOLUME_WITHDRAWN,
                    note: format!("{name}: node {} lies outside the allowedTopologies of StorageClass {sc_name:?}; withdrawn so no claim of the class is bound outside them", input.node.name),
                });
            }
            return;
        }
        match (found, v.create_blocked) {
            (None, Some(why)) => self.actions.push(Action::Readopt {
                pv: Box::new(desired),
                otherwise: why,
            }),
            (None, None) => self.applies.push(Action::ApplyPv {
                pv: Box::new(desired),
                create: true,
            }),
            (Some(pv), _) => self.update(pv, desired, name),
        }
    }

    /// An existing PV against what disklet would write now.
    fn update(&mut self, pv: &PersistentVolume, desired: PersistentVolume, name: String) {
        let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        let settled = pv.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Released" | "Failed"));
        if settled {
            return;
        }
        // Fields the API server never lets change (a `kubectl replace
        // --force` with an edited copy): applying them fails on every pass.
        // An unclaimed PV is withdrawn and published again as disklet writes
        // it; a claimed one is left as is.
        let changed = immutable_differences(pv, &desired);
        if changed.is_empty() {
            return self.bring_up_to_date(pv, desired);
        }
        let fields = changed.join(", ");
        if unclaimed(pv) {
            self.applies.push(Action::DeletePv {
                name: name.clone(),
                uid: pv.metadata.uid.clone().unwrap_or_default(),
                resource_version: pv.metadata.resource_version.clone().unwrap_or_default(),
                reason: event::VOLUME_WITHDRAWN,
                note: format!("{name}: {fields} is not what disklet publishes for this volume (edited by hand?); withdrawn so nothing is scheduled onto it, and published again as disklet writes it"),
            });
        } else {
            self.actions.push(Action::Report {
                warning: true,
                reason: event::PV_MODIFIED,
                message: format!("{name} ({}): {fields} is not what disklet publishes for this volume (edited by hand?); a claimed PV is left as is, and a cleanup after its release acts only on the volume its key names, never on its path", phase.unwrap_or("Pending")),
                subject: Subject::Pv(name),
            });
        }
    }

    /// Applies what changed, keeping the PV's reclaim policy: it comes from
    /// the StorageClass at creation only, and an admin who patches a PV to
    /// Retain before deleting its claim (the documented way to keep a
    /// volume's data) must not have it undone, or the release would wipe
    /// the data.
    fn bring_up_to_date(&mut self, pv: &PersistentVolume, mut desired: PersistentVolume) {
        if let (Some(ds), Some(have)) = (
            desired.spec.as_mut(),
            pv.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone()),
        ) {
            ds.persistent_volume_reclaim_policy = Some(have);
        }
        if !up_to_date(pv, &desired) {
            self.applies.push(Action::ApplyPv {
                pv: Box::new(desired),
                create: false,
            });
        }
    }

    /// One report per StorageClass that keeps a class from publishing.
    fn report_unpublishable(&mut self) {
        let input = self.input;
        let mut reported = BTreeSet::new();
        for class in std::mem::take(&mut self.unpublishable) {
            let sc_name = class.storage_class();
            if !reported.insert(sc_name) {
                continue;
            }
            self.actions.push(match input.scs.get(sc_name) {
                Some(Some(_)) => Action::Report {
                    warning: true,
                    reason: event::OUTSIDE_ALLOWED_TOPOLOGIES,
                    message: format!("node {} lies outside the allowedTopologies of StorageClass {sc_name:?} (class {:?}): its disks are neither formatted nor published here, since the scheduler would bind claims of the class to them (it checks allowedTopologies only when it provisions)", input.node.name, class.name),
                    subject: Subject::Node,
                },
                _ => Action::Report {
                    warning: true,
                    reason: event::STORAGE_CLASS_MISSING,
                    message: format!("StorageClass {sc_name:?} of class {:?} does not exist; its disks are neither formatted nor published until it does (create it with provisioner {})", class.name, if class.is_pool() { "csi.disklet.io, deploy/overlays/csi" } else { "kubernetes.io/no-provisioner" }),
                    subject: Subject::Node,
                },
            });
        }
    }
}
