//! The life of a published volume after provisioning: recycle Released PVs
//! per reclaim policy, withdraw or mark PVs whose disk vanished, clear the mark
//! when the same disk returns, and keep away from PVs of an earlier
//! incarnation of the node. Pure, like the provisioning plan.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::FsType;
use crate::model::keys::{
    pv_name, ANN_CLEANUP, ANN_DEVICE_ID, ANN_DEVICE_STATE, ANN_FS_UUID, ANN_KEY, ANN_NODE_UID,
    ANN_RECLAIM, LABEL_CLASS,
};
use crate::model::reasons::event;
use crate::model::volume::{mount_target, shrunk};
use crate::model::{ownership, Device, DirEntryKind, Inventory, Probe, Reason};
use crate::plan::action::{Action, PlanInput, Recycle, Subject, Target};
use crate::plan::Verdict;

/// What the node says about a PV's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    Present(Target),
    /// The volume is here but cannot serve a pod: its disk turned read-only,
    /// is smaller than its filesystem, is mounted by someone else, was
    /// cloned... Nothing new goes onto it and nothing on it is cleaned.
    Unfit {
        device: String,
        /// The `disklet.io/device-state` value: `shrunk`, or the disk's
        /// refusal reason code.
        state: String,
        why: String,
    },
    /// What the disk holds cannot be known now (its probe failed, udev has
    /// not processed it): nothing is decided until it can.
    Unknown {
        device: String,
    },
    /// The disk is here, but the filesystem the PV names is not on it any
    /// more (a reformat that finished, or somebody else's mkfs).
    ContentChanged {
        device: String,
    },
    Missing,
}

fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> Option<&'a str> {
    pv.metadata.annotations.as_ref()?.get(k).map(String::as_str)
}

/// Finds a PV's volume among what was observed.
/// The class a PV was published for (its label), or "" when it has none.
fn class_label(pv: &PersistentVolume) -> String {
    pv.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLASS))
        .cloned()
        .unwrap_or_default()
}

pub fn locate(pv: &PersistentVolume, input: &PlanInput<'_>) -> Located {
    let key = ann(pv, ANN_KEY).unwrap_or_default();
    let device_id = ann(pv, ANN_DEVICE_ID);
    if let Some(uuid) = key.strip_prefix("fs:") {
        let class = class_label(pv);
        return locate_fs(input, &class, uuid, device_id);
    }
    if key.starts_with("dev:") {
        return locate_raw(input, device_id);
    }
    if let Some(path) = key.strip_prefix("dir:") {
        return locate_dir(input, Path::new(path));
    }
    Located::Missing
}

/// The device whose identity the PV names.
fn by_identity<'a>(inv: &'a Inventory, device_id: Option<&str>) -> Option<&'a Device> {
    device_id?;
    inv.devices
        .iter()
        .find(|d| d.identity().as_deref() == device_id)
}

/// A filesystem disklet made: where the probe finds it, whatever the
/// verdict (a disk refused for now, read-only or with a foreign mount,
/// still holds it).
fn locate_fs(input: &PlanInput<'_>, class: &str, uuid: &str, device_id: Option<&str>) -> Located {
    let inv: &Inventory = input.inv;
    let holders: Vec<_> = inv
        .devices
        .iter()
        .zip(input.decisions)
        .filter(|(dev, _)| {
            ownership(dev.signatures()).and_then(|s| s.uuid.as_deref()) == Some(uuid)
        })
        .collect();
    let Some((dev, d)) = holders.first() else {
        // Not found: a positive answer only from a probe that ran.
        return match by_identity(inv, device_id) {
            Some(d) if matches!(d.probe, Probe::Done { .. }) => Located::ContentChanged {
                device: d.name.clone(),
            },
            Some(d) => Located::Unknown {
                device: d.name.clone(),
            },
            None => Located::Missing,
        };
    };
    let unfit = |state: &str, why: String| Located::Unfit {
        device: dev.name.clone(),
        state: state.to_string(),
        why,
    };
    if holders.len() > 1 {
        let all: Vec<String> = holders.iter().map(|(d, _)| d.name.clone()).collect();
        return unfit(
            Reason::DuplicateIdentity.as_str(),
            format!("the filesystem is on {} at once", all.join(", ")),
        );
    }
    match &d.verdict {
        Verdict::Ours { fs_type, .. } => {
            let target = mount_target(&input.cfg.host_dir, class, uuid);
            ours_at(input, dev, fs_type, uuid, target)
                .unwrap_or_else(|(state, why)| unfit(state, why))
        }
        Verdict::Refused { reason } => unfit(
            reason.as_str(),
            format!(
                "/dev/{} is {}{}",
                dev.name,
                reason.as_str(),
                d.detail
                    .as_deref()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            ),
        ),
        Verdict::Pending { .. } | Verdict::Eligible => Located::Unknown {
            device: dev.name.clone(),
        },
    }
}

/// A filesystem of ours on `dev`: present, or unfit (state and why) when
/// its mount fails or the disk shrank under it.
fn ours_at(
    input: &PlanInput<'_>,
    dev: &Device,
    fs_type: &str,
    uuid: &str,
    target: PathBuf,
) -> Result<Located, (&'static str, String)> {
    let mounted = input.inv.mounts_of(dev).any(|m| m.mount_point == target);
    let fact = input.mounts.get(&target).filter(|_| mounted);
    if let Some(e) = fact.and_then(|f| f.io_error.as_deref()) {
        return Err((
            "io-error",
            format!("the filesystem of /dev/{} fails ({e})", dev.name),
        ));
    }
    if let Some(f) = fact.filter(|f| shrunk(dev, f)) {
        return Err((
            "shrunk",
            format!(
                "/dev/{} ({} bytes) is smaller than its filesystem ({} bytes)",
                dev.name,
                f.device_bytes.unwrap_or(dev.size_bytes),
                f.fs_size()
            ),
        ));
    }
    Ok(Located::Present(Target::Fs {
        device: dev.name.clone(),
        devnode: dev.devnode.clone(),
        devno: dev.devno,
        fs_uuid: uuid.to_string(),
        fs_type: if fs_type == "ext4" {
            FsType::Ext4
        } else {
            FsType::Xfs
        },
        mount_point: mounted.then_some(target),
    }))
}

/// A raw volume: the disk of its identity. It holds whatever its pod
/// wrote, so only a disk that cannot be written is unfit.
fn locate_raw(input: &PlanInput<'_>, device_id: Option<&str>) -> Located {
    let inv: &Inventory = input.inv;
    let Some(d) = by_identity(inv, device_id) else {
        return Located::Missing;
    };
    let read_only = inv
        .devices
        .iter()
        .zip(input.decisions)
        .find(|(x, _)| x.name == d.name)
        .is_some_and(|(_, x)| {
            x.verdict
                == Verdict::Refused {
                    reason: Reason::ReadOnly,
                }
        });
    if read_only {
        return Located::Unfit {
            device: d.name.clone(),
            state: Reason::ReadOnly.as_str().to_string(),
            why: format!("/dev/{} is read-only", d.name),
        };
    }
    Located::Present(Target::Raw {
        device: d.name.clone(),
        devnode: d.devnode.clone(),
        devno: d.devno,
    })
}

/// A discovery-dir entry: the mount point, or the device a link names.
fn locate_dir(input: &PlanInput<'_>, path: &Path) -> Located {
    match input.dirs.iter().find(|e| e.path == path).map(|e| &e.kind) {
        Some(DirEntryKind::MountPoint { devno, .. }) => Located::Present(Target::Dir {
            path: path.to_path_buf(),
            devno: *devno,
        }),
        Some(DirEntryKind::BlockLink { target, .. }) => {
            match input.inv.devices.iter().find(|d| &d.devnode == target) {
                Some(d) => Located::Present(Target::Raw {
                    device: d.name.clone(),
                    devnode: d.devnode.clone(),
                    devno: d.devno,
                }),
                None => Located::Missing,
            }
        }
        _ => Located::Missing,
    }
}

/// Mounts under the kubelet dir that use this volume: kubelet's bind mounts
/// of a filesystem volume (same device) and its bind mounts of a raw device
/// node (devtmpfs, root `/<name>`).
pub fn kubelet_users(target: &Target, inv: &Inventory, kubelet_dir: &Path) -> Vec<PathBuf> {
    let raw_name = match target {
        Target::Raw { device, .. } => Some(format!("/{device}")),
        _ => None,
    };
    inv.mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(kubelet_dir))
        .filter(|m| match &raw_name {
            Some(n) => {
                m.devno == target.devno() || (m.fs_type == "devtmpfs" && m.root == Path::new(n))
            }
            None => m.devno == target.devno(),
        })
        .map(|m| m.mount_point.clone())
        .collect()
}

fn report(warning: bool, reason: &'static str, message: String, pv: &str) -> Action {
    Action::Report {
        warning,
        reason,
        message,
        subject: Subject::Pv(pv.to_string()),
    }
}

fn annotate(name: &str, k: &str, v: Option<&str>) -> Action {
    Action::AnnotatePv {
        name: name.to_string(),
        set: vec![(k.to_string(), v.map(str::to_string))],
    }
}

/// Identity annotations of a PV that disagree with its key (the filesystem
/// UUID) or with the device that holds its volume, with the right values.
fn identity_restore(
    pv: &PersistentVolume,
    target: &Target,
    input: &PlanInput<'_>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Target::Fs { fs_uuid, devno, .. } = target {
        if ann(pv, ANN_FS_UUID).is_some_and(|u| u != fs_uuid) {
            out.push((ANN_FS_UUID, fs_uuid.clone()));
        }
        let have = input
            .inv
            .devices
            .iter()
            .find(|d| d.devno == *devno)
            .and_then(|d| d.identity());
        if let (Some(want), Some(have)) = (ann(pv, ANN_DEVICE_ID), have) {
            if want != have {
                out.push((ANN_DEVICE_ID, have));
            }
        }
    }
    out
}

/// Lifecycle actions for this node's PVs.
pub fn recycle_plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut out = Vec::new();
    for pv in input.pvs {
        if let Some(view) = managed(pv, input, &mut out) {
            lifecycle(&view, input, &mut out);
        }
    }
    out
}

/// One of this node's PVs, as the lifecycle plan reads it.
struct PvView<'p> {
    pv: &'p PersistentVolume,
    name: &'p str,
    /// The phase, with a claimed PV counted Bound.
    phase: &'p str,
    located: Located,
    /// `disklet.io/device-state`.
    mark: Option<&'p str>,
}

/// The PV if disklet may act on it: not being deleted, written by disklet
/// under the name its key gives, of this incarnation of the node (or of an
/// earlier one whose volume is here, adopted). Reports the others.
fn managed<'p>(
    pv: &'p PersistentVolume,
    input: &PlanInput<'_>,
    out: &mut Vec<Action>,
) -> Option<PvView<'p>> {
    let name = pv.metadata.name.as_deref()?;
    if pv.metadata.deletion_timestamp.is_some() {
        return None;
    }
    // A PV of ours without the key disklet wrote (edited by hand, or
    // written by something else with our label) is never acted on.
    if ann(pv, ANN_KEY)
        .is_none_or(|k| !(k.starts_with("fs:") || k.starts_with("dev:") || k.starts_with("dir:")))
    {
        out.push(report(true, event::UNMANAGED_PV, format!("{name} carries disklet's node label but no disklet.io/volume-key disklet wrote; left alone"), name));
        return None;
    }
    // disklet derives a PV's name from its node, class and key, and a name
    // never changes: a PV whose key or class label says otherwise was
    // edited by hand or copied under another name. Acting on it could clean
    // another volume; it is left alone. Checked on PVs with a local source:
    // every PV disklet writes has one and the API never removes it (the
    // lifecycle table tests build PVs without one, under names disklet
    // would never give them).
    let key = ann(pv, ANN_KEY).unwrap_or_default();
    let class = pv
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLASS))
        .map(String::as_str)
        .unwrap_or_default();
    let has_local = pv.spec.as_ref().is_some_and(|s| s.local.is_some());
    if has_local && pv_name(&input.node.name, class, key) != name {
        out.push(report(true, event::UNMANAGED_PV, format!("{name}: its name is not the one disklet gives the volume its disklet.io/volume-key ({key}) and disklet.io/class ({class:?}) name (edited by hand, or a copy of another PV); left alone"), name));
        return None;
    }
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    // A bind writes claimRef first and the phase in a second update: a PV
    // seen in between is claimed already, and is never withdrawn.
    let claimed = pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_some());
    let phase = if claimed && matches!(phase, "Available" | "Pending") {
        "Bound"
    } else {
        phase
    };
    let located = locate(pv, input);
    // A PV of an earlier incarnation of this node (deleted and recreated
    // under the same name): adopted only if its volume is here, else left
    // alone — never withdrawn or recycled on the word of another Node.
    let pv_node_uid = ann(pv, ANN_NODE_UID).unwrap_or_default();
    if !input.node.uid.is_empty() && !pv_node_uid.is_empty() && pv_node_uid != input.node.uid {
        if !matches!(located, Located::Present(_) | Located::Unfit { .. }) {
            out.push(report(true, event::ORPHANED_PV, format!("{name} belongs to an earlier Node {} (uid {pv_node_uid}) and its volume is not on this node; left alone (delete it if the disk is gone for good)", input.node.name), name));
            return None;
        }
        out.push(report(false, event::ADOPTED, format!("{name} was published by an earlier Node {} (uid {pv_node_uid}); its volume is here, so this node adopts it", input.node.name), name));
        out.push(annotate(name, ANN_NODE_UID, Some(&input.node.uid)));
    }
    Some(PvView {
        pv,
        name,
        phase,
        located,
        mark: ann(pv, ANN_DEVICE_STATE),
    })
}

/// A withdrawal of an unclaimed PV, with the plan's preconditions.
fn withdraw(v: &PvView<'_>, reason: &'static str, note: String) -> Action {
    Action::DeletePv {
        name: v.name.to_string(),
        uid: v.pv.metadata.uid.clone().unwrap_or_default(),
        resource_version: v.pv.metadata.resource_version.clone().unwrap_or_default(),
        reason,
        note,
    }
}

/// What the PV's phase and where its volume is call for.
fn lifecycle(v: &PvView<'_>, input: &PlanInput<'_>, out: &mut Vec<Action>) {
    let (name, phase, mark) = (v.name, v.phase, v.mark);
    let cleanup_started = ann(v.pv, ANN_CLEANUP) == Some("started");
    match (&v.located, phase) {
        // Nothing is known: nothing is decided.
        (Located::Unknown { .. }, _) => {}
        // A pod could not use it: nothing new is scheduled onto it.
        (Located::Unfit { device, why, .. }, "Available" | "Pending") => out.push(withdraw(
            v,
            event::VOLUME_WITHDRAWN,
            format!("{name}: {why}; withdrawn so nothing new is scheduled onto it (published again once /dev/{device} is fit)"),
        )),
        // A claimed one is kept, marked and never cleaned.
        (Located::Unfit { state, why, .. }, _) => {
            if mark != Some(state.as_str()) {
                let reason = match state.as_str() {
                    "shrunk" => event::DEVICE_SHRUNK,
                    "read-only" => event::DEVICE_READ_ONLY,
                    "io-error" => event::VOLUME_IO_ERROR,
                    _ => event::DEVICE_UNFIT,
                };
                out.push(report(true, reason, format!("{name} ({phase}): {why}; the PV is kept and marked, nothing on the disk is cleaned or formatted"), name));
                out.push(annotate(name, ANN_DEVICE_STATE, Some(state)));
            }
        }
        // Nothing new may be scheduled onto a volume that is not there.
        (Located::Missing, "Available" | "Pending") => out.push(withdraw(
            v,
            event::VOLUME_WITHDRAWN,
            format!("{name}: its disk is not on the node; withdrawn so nothing new is scheduled onto it (it is published again when the same disk returns)"),
        )),
        // A claimed volume is never deleted because its disk vanished.
        (Located::Missing, _) => {
            if mark != Some("missing") {
                out.push(report(true, event::DEVICE_MISSING, format!("{name} ({phase}): its disk is not on the node; the PV is kept and marked"), name));
                out.push(annotate(name, ANN_DEVICE_STATE, Some("missing")));
            }
        }
        (Located::ContentChanged { device }, "Released") if cleanup_started => out.push(withdraw(
            v,
            event::RECYCLED,
            format!("{name}: the cleanup of /dev/{device} had finished before a restart; the old PV is deleted"),
        )),
        (Located::ContentChanged { device }, _) => out.push(report(
            true,
            event::VOLUME_REPLACED,
            format!("{name}: /dev/{device} no longer carries the filesystem this PV names; left alone"),
            name,
        )),
        (Located::Present(target), _) => present(v, target, input, out),
    }
}

/// The PV's volume is here: a mark cleared, and a Released PV recycled per
/// its reclaim policy.
fn present(v: &PvView<'_>, target: &Target, input: &PlanInput<'_>, out: &mut Vec<Action>) {
    let (pv, name) = (v.pv, v.name);
    if let Some(m) = v.mark {
        let msg = if m == "missing" {
            format!("{name}: its disk is back")
        } else {
            format!("{name}: its disk is fit again (was {m})")
        };
        out.push(report(false, event::DEVICE_RETURNED, msg, name));
        out.push(annotate(name, ANN_DEVICE_STATE, None));
    }
    if v.phase != "Released" {
        return;
    }
    // Server-side apply keeps the annotations of a claimed PV as disklet
    // wrote them, but not a Released one's. A cleanup is verified against
    // them, so they are first restored from what the name vouches for (the
    // key) and what the disk says.
    let restore = identity_restore(pv, target, input);
    if !restore.is_empty() {
        let what: Vec<String> = restore
            .iter()
            .map(|(k, val)| format!("{k}: {:?} -> {val}", ann(pv, k).unwrap_or_default()))
            .collect();
        out.push(report(true, event::PV_MODIFIED, format!("{name}: identity annotations differ from its key and its disk ({}); restored before any cleanup", what.join(", ")), name));
        out.push(Action::AnnotatePv {
            name: name.to_string(),
            set: restore
                .into_iter()
                .map(|(k, val)| (k.to_string(), Some(val)))
                .collect(),
        });
        return;
    }
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain");
    match policy {
        "Retain" => {
            if ann(pv, ANN_RECLAIM) != Some("retained") {
                out.push(report(false, event::RETAINED, format!("{name} is Released with reclaim policy Retain: its data is kept; delete the PV to free the disk"), name));
                out.push(annotate(name, ANN_RECLAIM, Some("retained")));
            }
        }
        "Delete" => out.push(release(v, target, input)),
        other => out.push(report(
            true,
            event::RECLAIM_POLICY_UNSUPPORTED,
            format!("{name} is Released with reclaim policy {other:?}; disklet recycles only Delete and keeps Retain, so it does nothing"),
            name,
        )),
    }
}

/// A Released PV of reclaim policy Delete: cleaned, unless kubelet still
/// mounts its volume.
fn release(v: &PvView<'_>, target: &Target, input: &PlanInput<'_>) -> Action {
    let (pv, name) = (v.pv, v.name);
    let users = kubelet_users(target, input.inv, &input.cfg.kubelet_dir);
    if let Some(u) = users.first() {
        return Action::Wait {
            pv: name.to_string(),
            reason: event::VOLUME_IN_USE,
            message: format!("{name} is Released but still mounted by kubelet at {}; not cleaning it until the pod lets go", u.display()),
        };
    }
    let class = class_label(pv);
    let configured = input
        .classes
        .classes
        .iter()
        .find(|c| c.class.name == class)
        .and_then(|c| c.class.cleanup);
    Action::Recycle(Recycle {
        pv: name.to_string(),
        uid: pv.metadata.uid.clone().unwrap_or_default(),
        class,
        method: target.method(configured),
        target: target.clone(),
        expected_device_id: ann(pv, ANN_DEVICE_ID).map(str::to_string),
        expected_fs_uuid: ann(pv, ANN_FS_UUID).map(str::to_string),
    })
}
