//! The life of a published volume after provisioning: recycle Released PVs
//! per reclaim policy, withdraw or mark PVs whose disk vanished, clear the mark
//! when the same disk returns, and keep away from PVs of an earlier
//! incarnation of the node. Pure, like the provisioning plan.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{CleanupMethod, FsType};
use crate::k8s::pv::{ANN_DEVICE_ID, ANN_FS_UUID, ANN_KEY, ANN_NODE_UID, LABEL_CLASS};
use crate::model::{DevNo, DirEntryKind, Inventory};
use crate::plan::provision::{mount_target, Action, PlanInput};
use crate::plan::Verdict;

/// Annotation: `missing` while the PV's disk is not on the node.
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
        for (dev, d) in inv.devices.iter().zip(input.decisions) {
            let ours = match &d.verdict {
                Verdict::Ours {
                    uuid: Some(u),
                    fs_type,
                } if u == uuid => Some(fs_type),
                _ => None,
            };
            if let Some(fs_type) = ours {
                let mounted = inv.mounts_of(dev).any(|m| m.mount_point == target);
                return Located::Present(Target::Fs {
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
                });
            }
        }
        return match by_identity() {
            Some(d) => Located::ContentChanged {
                device: d.name.clone(),
            },
            None => Located::Missing,
        };
    }
    if key.starts_with("dev:") {
        return match by_identity() {
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

/// Lifecycle actions for this node's PVs.
pub fn recycle_plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut out = Vec::new();
    for pv in input.pvs {
        let Some(name) = pv.metadata.name.as_deref() else {
            continue;
        };
        let uid = pv.metadata.uid.clone().unwrap_or_default();
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
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let located = locate(pv, input);

        // A PV of an earlier incarnation of this node (deleted and recreated
        // under the same name): adopted only if its volume is here, else left
        // alone — never withdrawn or recycled on the word of another Node.
        let pv_node_uid = ann(pv, ANN_NODE_UID).unwrap_or_default();
        if !input.node.uid.is_empty() && !pv_node_uid.is_empty() && pv_node_uid != input.node.uid {
            match &located {
                Located::Present(_) => {
                    out.push(report(false, "Adopted", format!("{name} was published by an earlier Node {} (uid {pv_node_uid}); its volume is here, so this node adopts it", input.node.name), name));
                    out.push(annotate(name, ANN_NODE_UID, Some(&input.node.uid)));
                }
                _ => {
                    out.push(report(true, "OrphanedPv", format!("{name} belongs to an earlier Node {} (uid {pv_node_uid}) and its volume is not on this node; left alone (delete it if the disk is gone for good)", input.node.name), name));
                    continue;
                }
            }
        }

        let marked_missing = ann(pv, ANN_DEVICE_STATE) == Some("missing");
        let cleanup_started = ann(pv, ANN_CLEANUP) == Some("started");
        match (&located, phase) {
            // Nothing new may be scheduled onto a volume that is not there.
            (Located::Missing, "Available" | "Pending") => out.push(Action::DeletePv {
                name: name.to_string(),
                uid,
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
                if marked_missing {
                    out.push(report(false, "DeviceReturned", format!("{name}: its disk is back"), name));
                    out.push(annotate(name, ANN_DEVICE_STATE, None));
                }
                if phase != "Released" {
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
