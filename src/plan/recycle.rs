//! The life of a published volume after provisioning: recycle Released PVs
//! per reclaim policy, withdraw or mark PVs whose disk vanished, clear the mark
//! when the same disk returns, and keep away from PVs of an earlier
//! incarnation of the node. Pure, like the provisioning plan.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{CleanupMethod, FsType};
use crate::k8s::pv::{pv_name, ANN_DEVICE_ID, ANN_FS_UUID, ANN_KEY, ANN_NODE_UID, LABEL_CLASS};
use crate::model::{DevNo, DirEntryKind, Inventory, Probe};
use crate::plan::eligibility::{ownership, Reason};
use crate::plan::provision::{mount_target, shrunk, Action, PlanInput};
use crate::plan::Verdict;

/// Annotation: why the PV's disk cannot serve it now: `missing` (not on the
/// node), `shrunk` (smaller than its filesystem), `read-only`, or another
/// refusal reason code of the disk. Removed once the disk is fit again.
pub const ANN_DEVICE_STATE: &str = "disklet.io/device-state";
/// Annotation: a cleanup was started (`started`); survives a crash, so the
/// next agent finishes it.
pub const ANN_CLEANUP: &str = "disklet.io/cleanup";
/// Annotation: the Retain policy was seen and reported once.
pub const ANN_RECLAIM: &str = "disklet.io/reclaim";

/// Where a PV's volume is on this node now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A filesystem disklet made, on `device`.
    Fs {
        device: String,
        devnode: PathBuf,
        devno: DevNo,
        fs_uuid: String,
        fs_type: FsType,
        /// disklet's mount of it, if mounted.
        mount_point: Option<PathBuf>,
    },
    /// A raw device (Block, or published with fsType).
    Raw {
        device: String,
        devnode: PathBuf,
        devno: DevNo,
    },
    /// A discovery-dir entry that is a mount point.
    Dir { path: PathBuf, devno: DevNo },
}

impl Target {
    pub fn devno(&self) -> DevNo {
        match self {
            Target::Fs { devno, .. } | Target::Raw { devno, .. } | Target::Dir { devno, .. } => {
                *devno
            }
        }
    }

    fn default_cleanup(&self) -> CleanupMethod {
        match self {
            Target::Fs { .. } => CleanupMethod::Reformat,
            Target::Raw { .. } => CleanupMethod::Discard,
            Target::Dir { .. } => CleanupMethod::Files,
        }
    }

    /// The configured method where it applies to this kind of volume.
    pub fn method(&self, configured: Option<CleanupMethod>) -> CleanupMethod {
        use CleanupMethod as M;
        match (self, configured) {
            (_, Option::None) => self.default_cleanup(),
            (_, Some(M::None)) => M::None,
            (Target::Fs { .. }, Some(m @ (M::Reformat | M::Discard | M::Zeroout))) => m,
            (Target::Raw { .. }, Some(m @ (M::Discard | M::Zeroout))) => m,
            (Target::Dir { .. }, Some(M::Files)) => M::Files,
            _ => self.default_cleanup(),
        }
    }
}

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
pub fn locate(pv: &PersistentVolume, input: &PlanInput<'_>) -> Located {
    let inv: &Inventory = input.inv;
    let key = ann(pv, ANN_KEY).unwrap_or_default();
    let device_id = ann(pv, ANN_DEVICE_ID);
    let by_identity = || {
        inv.devices
            .iter()
            .find(|d| device_id.is_some() && d.identity().as_deref() == device_id)
    };
    if let Some(uuid) = key.strip_prefix("fs:") {
        let class = pv
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_CLASS))
            .cloned()
            .unwrap_or_default();
        let target = mount_target(&input.cfg.host_dir, &class, uuid);
        // Where the probe finds the filesystem, whatever the verdict: a disk
        // refused for now (read-only, a foreign mount) still holds it.
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
            return match by_identity() {
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
        return match &d.verdict {
            Verdict::Ours { fs_type, .. } => {
                let mounted = inv.mounts_of(dev).any(|m| m.mount_point == target);
                if let Some(e) = input
                    .mounts
                    .get(&target)
                    .filter(|_| mounted)
                    .and_then(|f| f.io_error.as_deref())
                {
                    return unfit(
                        "io-error",
                        format!("the filesystem of /dev/{} fails ({e})", dev.name),
                    );
                }
                if let Some(f) = input
                    .mounts
                    .get(&target)
                    .filter(|f| mounted && shrunk(dev, f))
                {
                    return unfit(
                        "shrunk",
                        format!(
                            "/dev/{} ({} bytes) is smaller than its filesystem ({} bytes)",
                            dev.name,
                            f.device_bytes.unwrap_or(dev.size_bytes),
                            f.fs_size()
                        ),
                    );
                }
                Located::Present(Target::Fs {
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
                })
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
        };
    }
    if key.starts_with("dev:") {
        let decision = |name: &str| {
            inv.devices
                .iter()
                .zip(input.decisions)
                .find(|(d, _)| d.name == name)
                .map(|(_, x)| &x.verdict)
        };
        return match by_identity() {
            // A raw volume holds whatever its pod wrote, so only a disk that
            // cannot be written is unfit.
            Some(d)
                if decision(&d.name)
                    == Some(&Verdict::Refused {
                        reason: Reason::ReadOnly,
                    }) =>
            {
                Located::Unfit {
                    device: d.name.clone(),
                    state: Reason::ReadOnly.as_str().to_string(),
                    why: format!("/dev/{} is read-only", d.name),
                }
            }
            Some(d) => Located::Present(Target::Raw {
                device: d.name.clone(),
                devnode: d.devnode.clone(),
                devno: d.devno,
            }),
            None => Located::Missing,
        };
    }
    if let Some(path) = key.strip_prefix("dir:") {
        let path = Path::new(path);
        return match input.dirs.iter().find(|e| e.path == path).map(|e| &e.kind) {
            Some(DirEntryKind::MountPoint { devno, .. }) => Located::Present(Target::Dir {
                path: path.to_path_buf(),
                devno: *devno,
            }),
            Some(DirEntryKind::BlockLink { target, .. }) => {
                match inv.devices.iter().find(|d| &d.devnode == target) {
                    Some(d) => Located::Present(Target::Raw {
                        device: d.name.clone(),
                        devnode: d.devnode.clone(),
                        devno: d.devno,
                    }),
                    None => Located::Missing,
                }
            }
            _ => Located::Missing,
        };
    }
    Located::Missing
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
        subject: crate::plan::Subject::Pv(pv.to_string()),
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
        let Some(name) = pv.metadata.name.as_deref() else {
            continue;
        };
        let uid = pv.metadata.uid.clone().unwrap_or_default();
        let resource_version = pv.metadata.resource_version.clone().unwrap_or_default();
        if pv.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // A PV of ours without the key disklet wrote (edited by hand, or
        // written by something else with our label) is never acted on.
        if ann(pv, ANN_KEY).is_none_or(|k| {
            !(k.starts_with("fs:") || k.starts_with("dev:") || k.starts_with("dir:"))
        }) {
            out.push(report(true, "UnmanagedPv", format!("{name} carries disklet's node label but no disklet.io/volume-key disklet wrote; left alone"), name));
            continue;
        }
        // disklet derives a PV's name from its node, class and key, and a
        // name never changes: a PV whose key or class label says otherwise
        // was edited by hand or copied under another name. Acting on it
        // could clean another volume; it is left alone. Checked on PVs with
        // a local source: every PV disklet writes has one and the API never
        // removes it (the lifecycle table tests build PVs without one, under
        // names disklet would never give them).
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
            out.push(report(true, "UnmanagedPv", format!("{name}: its name is not the one disklet gives the volume its disklet.io/volume-key ({key}) and disklet.io/class ({class:?}) name (edited by hand, or a copy of another PV); left alone"), name));
            continue;
        }
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        // A bind writes claimRef first and the phase in a second update: a
        // PV seen in between is claimed already, and is never withdrawn.
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
            match &located {
                Located::Present(_) | Located::Unfit { .. } => {
                    out.push(report(false, "Adopted", format!("{name} was published by an earlier Node {} (uid {pv_node_uid}); its volume is here, so this node adopts it", input.node.name), name));
                    out.push(annotate(name, ANN_NODE_UID, Some(&input.node.uid)));
                }
                _ => {
                    out.push(report(true, "OrphanedPv", format!("{name} belongs to an earlier Node {} (uid {pv_node_uid}) and its volume is not on this node; left alone (delete it if the disk is gone for good)", input.node.name), name));
                    continue;
                }
            }
        }

        let mark = ann(pv, ANN_DEVICE_STATE);
        let marked_missing = mark == Some("missing");
        let cleanup_started = ann(pv, ANN_CLEANUP) == Some("started");
        match (&located, phase) {
            // Nothing is known: nothing is decided.
            (Located::Unknown { .. }, _) => {}
            // A pod could not use it: nothing new is scheduled onto it.
            (Located::Unfit { device, why, .. }, "Available" | "Pending") => out.push(Action::DeletePv {
                name: name.to_string(),
                uid,
                resource_version: resource_version.clone(),
                reason: "VolumeWithdrawn",
                note: format!("{name}: {why}; withdrawn so nothing new is scheduled onto it (published again once /dev/{device} is fit)"),
            }),
            // A claimed one is kept, marked and never cleaned.
            (Located::Unfit { state, why, .. }, _) => {
                if mark != Some(state.as_str()) {
                    let reason = match state.as_str() {
                        "shrunk" => "DeviceShrunk",
                        "read-only" => "DeviceReadOnly",
                        "io-error" => "VolumeIoError",
                        _ => "DeviceUnfit",
                    };
                    out.push(report(true, reason, format!("{name} ({phase}): {why}; the PV is kept and marked, nothing on the disk is cleaned or formatted"), name));
                    out.push(annotate(name, ANN_DEVICE_STATE, Some(state)));
                }
            }
            // Nothing new may be scheduled onto a volume that is not there.
            (Located::Missing, "Available" | "Pending") => out.push(Action::DeletePv {
                name: name.to_string(),
                uid,
                resource_version: resource_version.clone(),
                reason: "VolumeWithdrawn",
                note: format!("{name}: its disk is not on the node; withdrawn so nothing new is scheduled onto it (it is published again when the same disk returns)"),
            }),
            // A claimed volume is never deleted because its disk vanished.
            (Located::Missing, _) => {
                if !marked_missing {
                    out.push(report(true, "DeviceMissing", format!("{name} ({phase}): its disk is not on the node; the PV is kept and marked"), name));
                    out.push(annotate(name, ANN_DEVICE_STATE, Some("missing")));
                }
            }
            (Located::ContentChanged { device }, "Released") if cleanup_started => out.push(Action::DeletePv {
                name: name.to_string(),
                uid,
                resource_version: resource_version.clone(),
                reason: "Recycled",
                note: format!("{name}: the cleanup of /dev/{device} had finished before a restart; the old PV is deleted"),
            }),
            (Located::ContentChanged { device }, _) => out.push(report(
                true,
                "VolumeReplaced",
                format!("{name}: /dev/{device} no longer carries the filesystem this PV names; left alone"),
                name,
            )),
            (Located::Present(target), _) => {
                if let Some(m) = mark {
                    let msg = if marked_missing {
                        format!("{name}: its disk is back")
                    } else {
                        format!("{name}: its disk is fit again (was {m})")
                    };
                    out.push(report(false, "DeviceReturned", msg, name));
                    out.push(annotate(name, ANN_DEVICE_STATE, None));
                }
                if phase != "Released" {
                    continue;
                }
                // Server-side apply keeps the annotations of a claimed PV as
                // disklet wrote them, but not a Released one's. A cleanup is
                // verified against them, so they are first restored from what
                // the name vouches for (the key) and what the disk says.
                let restore = identity_restore(pv, target, input);
                if !restore.is_empty() {
                    let what: Vec<String> = restore
                        .iter()
                        .map(|(k, v)| format!("{k}: {:?} -> {v}", ann(pv, k).unwrap_or_default()))
                        .collect();
                    out.push(report(true, "PvModified", format!("{name}: identity annotations differ from its key and its disk ({}); restored before any cleanup", what.join(", ")), name));
                    out.push(Action::AnnotatePv {
                        name: name.to_string(),
                        set: restore.into_iter().map(|(k, v)| (k.to_string(), Some(v))).collect(),
                    });
                    continue;
                }
                let policy = pv.spec.as_ref().and_then(|s| s.persistent_volume_reclaim_policy.as_deref()).unwrap_or("Retain");
                match policy {
                    "Retain" => {
                        if ann(pv, ANN_RECLAIM) != Some("retained") {
                            out.push(report(false, "Retained", format!("{name} is Released with reclaim policy Retain: its data is kept; delete the PV to free the disk"), name));
                            out.push(annotate(name, ANN_RECLAIM, Some("retained")));
                        }
                    }
                    "Delete" => {
                        let users = kubelet_users(target, input.inv, &input.cfg.kubelet_dir);
                        if !users.is_empty() {
                            out.push(Action::Wait {
                                pv: name.to_string(),
                                reason: "VolumeInUse",
                                message: format!("{name} is Released but still mounted by kubelet at {}; not cleaning it until the pod lets go", users[0].display()),
                            });
                            continue;
                        }
                        let class = pv.metadata.labels.as_ref().and_then(|l| l.get(LABEL_CLASS)).cloned().unwrap_or_default();
                        let configured = input.classes.classes.iter().find(|c| c.class.name == class).and_then(|c| c.class.cleanup);
                        out.push(Action::Recycle {
                            pv: name.to_string(),
                            uid,
                            class,
                            method: target.method(configured),
                            target: target.clone(),
                            expected_device_id: ann(pv, ANN_DEVICE_ID).map(str::to_string),
                            expected_fs_uuid: ann(pv, ANN_FS_UUID).map(str::to_string),
                        });
                    }
                    other => out.push(report(
                        true,
                        "ReclaimPolicyUnsupported",
                        format!("{name} is Released with reclaim policy {other:?}; disklet recycles only Delete and keeps Retain, so it does nothing"),
                        name,
                    )),
                }
            }
        }
    }
    out
}
