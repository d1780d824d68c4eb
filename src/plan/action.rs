//! What the plan decides and the agent carries out: one `Action` per step,
//! and what the plan decides on (`PlanInput`). Pure data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::config::{CleanupMethod, Config, FsType};
use crate::model::{DevNo, DirEntry, Fingerprint, Inventory, MountFact, NodeInfo, ScInfo};
use crate::plan::{Classes, Decision};

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
    Recycle(Recycle),
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

/// A cleanup: which PV, where its volume is, how to clean it, and what the
/// volume must still be when the cleanup starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Recycle {
    pub pv: String,
    pub uid: String,
    pub class: String,
    pub method: CleanupMethod,
    pub target: Target,
    /// The device identity the PV names (`disklet.io/device-id`).
    pub expected_device_id: Option<String>,
    /// The filesystem the PV names (`disklet.io/fs-uuid`).
    pub expected_fs_uuid: Option<String>,
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
