//! Is this device ours, blank and eligible, or why not.
//!
//! `evaluate` is a pure function of the observed device, the node's inventory
//! and the config. It returns `Eligible` only when every safety condition of
//! DESIGN.md §3.1 holds; every other outcome carries a reason code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::model::{
    format_bytes, ownership, unfinished_mkfs, Device, DeviceKind, Exclusive, Inventory,
    PendingReason, Probe, Reason, Signature, SignatureKind, UdevState,
};
use crate::plan::selector::{Classes, CompiledClass};

/// What disklet may do with a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Blank, dedicated and unused: disklet may format it.
    Eligible,
    /// Carries a disklet-owned filesystem: adopt and mount, never reformat.
    Ours {
        fs_type: String,
        uuid: Option<String>,
    },
    Pending {
        reason: PendingReason,
    },
    Refused {
        reason: Reason,
    },
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Eligible => "eligible",
            Verdict::Ours { .. } => "ours",
            Verdict::Pending { .. } => "pending",
            Verdict::Refused { .. } => "refused",
        }
    }

    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            Verdict::Refused { reason } => Some(reason.as_str()),
            Verdict::Pending { reason } => Some(reason.as_str()),
            _ => None,
        }
    }

    pub fn refused(&self) -> Option<Reason> {
        match self {
            Verdict::Refused { reason } => Some(*reason),
            _ => None,
        }
    }
}

/// The verdict, the class that named the device, and a human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub class: Option<String>,
    pub verdict: Verdict,
    pub detail: Option<String>,
}

/// Node-wide facts computed once per inventory.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// Kernel names of devices under `/`, `/boot`, `/boot/efi`, the kubelet dir
    /// and the hostDir, with what each one holds.
    os_devices: Vec<(String, PathBuf)>,
    host_dir: PathBuf,
    kubelet_dir: PathBuf,
    /// Records of the mkfs runs disklet started on this node that did not
    /// return (`host::intents`).
    intents: Vec<crate::model::FormatIntent>,
}

impl NodeFacts {
    pub fn new(inv: &Inventory, host_dir: &Path, kubelet_dir: &Path) -> Self {
        let mut os_devices = Vec::new();
        for p in [
            Path::new("/"),
            Path::new("/boot"),
            Path::new("/boot/efi"),
            kubelet_dir,
            host_dir,
        ] {
            for name in inv.devices_under_paths(&[p.to_path_buf()]) {
                if !os_devices.iter().any(|(n, _)| *n == name) {
                    os_devices.push((name, p.to_path_buf()));
                }
            }
        }
        NodeFacts {
            os_devices,
            host_dir: host_dir.to_path_buf(),
            kubelet_dir: kubelet_dir.to_path_buf(),
            intents: Vec::new(),
        }
    }

    /// With the records of the mkfs runs disklet started and that did not
    /// return.
    pub fn with_intents(mut self, intents: Vec<crate::model::FormatIntent>) -> Self {
        self.intents = intents;
        self
    }

    /// Whether disklet itself started the mkfs that left `sig` on `dev`, by
    /// a record naming this filesystem and this disk by a stable identity.
    fn started_here(&self, sig: &Signature, dev: &Device) -> bool {
        let key = dev.intent_key();
        !key.starts_with("name:")
            && self
                .intents
                .iter()
                .any(|i| sig.uuid.as_deref() == Some(i.uuid.as_str()) && i.device_key == key)
    }
}

fn refuse(class: &CompiledClass, reason: Reason, detail: impl Into<String>) -> Decision {
    Decision {
        class: Some(class.class.name.clone()),
        verdict: Verdict::Refused { reason },
        detail: Some(detail.into()),
    }
}

fn pending(
    class: Option<&CompiledClass>,
    reason: PendingReason,
    detail: impl Into<String>,
) -> Decision {
    Decision {
        class: class.map(|c| c.class.name.clone()),
        verdict: Verdict::Pending { reason },
        detail: Some(detail.into()),
    }
}

fn describe(sig: &Signature) -> String {
    let mut s = sig.kind.clone();
    if let Some(l) = &sig.label {
        s.push_str(&format!(" label={l:?}"));
    }
    if let Some(u) = &sig.uuid {
        s.push_str(&format!(" uuid={u}"));
    }
    if sig.in_progress {
        s.push_str(" (its mkfs never finished; disklet formats it again only with its own record of starting that mkfs on this disk, so this may be an aborted xfs_copy or someone's mkfs)");
    }
    s
}

/// The format interlock's decision, made again on a fresh observation
/// right before mkfs: the device must still be eligible, for `class`.
/// `Err` holds the verdict (with its reason code) and the detail.
pub fn still_eligible(
    dev: &Device,
    inv: &Inventory,
    classes: &Classes,
    facts: &NodeFacts,
    class: &str,
) -> Result<(), (String, String)> {
    let d = evaluate(dev, inv, classes, facts, None);
    if d.verdict == Verdict::Eligible && d.class.as_deref() == Some(class) {
        return Ok(());
    }
    Err((
        format!(
            "{} {}",
            d.verdict.name(),
            d.verdict.reason_code().unwrap_or("")
        ),
        d.detail.unwrap_or_default(),
    ))
}

/// Decides one device. `stable_for` is how long the device has looked the
/// same; `None` means the caller does not track it (a one-shot scan), and the
/// settle time is then not applied.
pub fn evaluate(
    dev: &Device,
    inv: &Inventory,
    classes: &Classes,
    facts: &NodeFacts,
    stable_for: Option<Duration>,
) -> Decision {
    match decide(dev, inv, classes, facts, stable_for) {
        Ok(d) | Err(d) => d,
    }
}

/// The checks in order; the first that does not pass (`Err`) decides.
fn decide(
    dev: &Device,
    inv: &Inventory,
    classes: &Classes,
    facts: &NodeFacts,
    stable_for: Option<Duration>,
) -> Result<Decision, Decision> {
    // Until udevd has processed the device, its links and properties are
    // unknown, so no selector can be judged (with no classes, nothing can match).
    if dev.udev == UdevState::NotProcessed && !classes.classes.is_empty() {
        return Err(pending(
            None,
            PendingReason::UdevNotProcessed,
            "udevd has not processed the device yet",
        ));
    }
    let Some(class) = classes.matching(dev) else {
        return Err(Decision {
            class: None,
            verdict: Verdict::Refused {
                reason: Reason::NoClassMatches,
            },
            detail: None,
        });
    };
    check_kind(dev, class)?;
    check_free(dev, inv, class, facts)?;
    let sigs = match &dev.probe {
        Probe::Done { signatures, .. } => signatures.as_slice(),
        Probe::NotProbed => return Err(refuse(class, Reason::ProbeFailed, "contents not probed")),
        Probe::Failed { error } => return Err(refuse(class, Reason::ProbeFailed, error.clone())),
    };
    let owned = ownership(sigs);
    check_mounts(dev, inv, class, facts, owned.is_some())?;
    let mounted_by_us = owned.is_some() && inv.mounts_of(dev).next().is_some();
    let formats = class.class.volume_mode == crate::config::VolumeMode::Filesystem
        && !class.class.publish_fs_type;
    // Only a class that formats redoes a format (a raw class would hand the
    // remains to a pod), and only a format disklet recorded starting here.
    let redo = formats && unfinished_mkfs(sigs).is_some_and(|s| facts.started_here(s, dev));
    if owned.is_none() {
        if !redo {
            check_no_signature(class, sigs)?;
        }
        check_blank(dev, class, formats, redo)?;
    }
    if !mounted_by_us {
        check_exclusive(dev, class)?;
    }
    // Settling guards destructive steps; mounting a disk that is ours is not one.
    let settle = Duration::from_secs(class.class.settle_seconds);
    if let (Some(age), None) = (stable_for, owned) {
        if age < settle {
            return Err(pending(
                Some(class),
                PendingReason::Settling,
                format!(
                    "stable for {:.1}s of {}s",
                    age.as_secs_f64(),
                    settle.as_secs()
                ),
            ));
        }
    }
    Ok(verdict(class, owned, mounted_by_us, redo))
}

/// The device's kind and flags, against the class's selector.
fn check_kind(dev: &Device, class: &CompiledClass) -> Result<(), Decision> {
    let sel = &class.class.selector;
    if !sel.types.contains(&dev.kind) {
        return Err(if dev.kind == DeviceKind::Partition {
            refuse(
                class,
                Reason::Partition,
                format!(
                    "partition of {}; add `part` to types to accept partitions",
                    dev.parent.as_deref().unwrap_or("?")
                ),
            )
        } else {
            refuse(
                class,
                Reason::TypeNotAllowed,
                format!(
                    "{} device; the class accepts {}",
                    dev.kind,
                    kinds(&sel.types)
                ),
            )
        });
    }
    if dev.hidden {
        return Err(refuse(
            class,
            Reason::Hidden,
            "the kernel marks the device hidden",
        ));
    }
    if dev.read_only {
        return Err(refuse(class, Reason::ReadOnly, "the device is read-only"));
    }
    if dev.removable && !sel.removable {
        return Err(refuse(
            class,
            Reason::Removable,
            "removable media; set selector.removable: true to accept",
        ));
    }
    Ok(())
}

/// Nothing of the node's own uses the device: not an OS disk, no holders,
/// partitions or swap, not a second path to another device.
fn check_free(
    dev: &Device,
    inv: &Inventory,
    class: &CompiledClass,
    facts: &NodeFacts,
) -> Result<(), Decision> {
    if let Some((_, what)) = facts.os_devices.iter().find(|(n, _)| *n == dev.name) {
        return Err(refuse(
            class,
            Reason::OsDisk,
            format!("holds {}", what.display()),
        ));
    }
    if !dev.holders.is_empty() {
        return Err(refuse(
            class,
            Reason::HasHolders,
            format!("in use by {}", dev.holders.join(", ")),
        ));
    }
    if !dev.partitions.is_empty() {
        return Err(refuse(
            class,
            Reason::HasPartitions,
            format!("has partitions {}", dev.partitions.join(", ")),
        ));
    }
    if let Some((other, what)) = duplicate_of(dev, inv) {
        return Err(refuse(
            class,
            Reason::DuplicateIdentity,
            format!("same {what} as {}", other.devnode.display()),
        ));
    }
    if let Some(s) = inv.swaps_of(dev).next() {
        return Err(refuse(
            class,
            Reason::Swap,
            format!("active swap {}", s.path.display()),
        ));
    }
    Ok(())
}

/// Our own mounts (under hostDir) and kubelet's bind mounts of our volumes
/// are expected for a disk that is ours; any other mount is not.
fn check_mounts(
    dev: &Device,
    inv: &Inventory,
    class: &CompiledClass,
    facts: &NodeFacts,
    owned: bool,
) -> Result<(), Decision> {
    let foreign_mount = inv
        .mounts_of(dev)
        .find(|m| !owned || !is_disklet_mount(&m.mount_point, &facts.host_dir, &facts.kubelet_dir));
    match foreign_mount {
        Some(m) => Err(refuse(
            class,
            Reason::Mounted,
            format!("mounted at {}", m.mount_point.display()),
        )),
        None => Ok(()),
    }
}

/// A disk not ours carries no signature (the remains of our own recorded
/// mkfs excepted, by the caller).
fn check_no_signature(class: &CompiledClass, sigs: &[Signature]) -> Result<(), Decision> {
    if let Some(pt) = sigs
        .iter()
        .find(|s| s.class() == SignatureKind::PartitionTable)
    {
        // A protective MBR is only the shadow of a GPT: name the GPT.
        let name = sigs
            .iter()
            .find(|s| s.kind == "gpt")
            .unwrap_or(pt)
            .kind
            .clone();
        return Err(refuse(class, Reason::PartitionTable, name));
    }
    match sigs.first() {
        Some(first) => Err(refuse(class, Reason::ForeignFilesystem, describe(first))),
        None => Ok(()),
    }
}

/// A disk to be formatted: big enough for its filesystem, within the
/// selector's sizes, and (with `blankCheck: zeroed`) zero at both ends.
fn check_blank(
    dev: &Device,
    class: &CompiledClass,
    formats: bool,
    redo: bool,
) -> Result<(), Decision> {
    let sel = &class.class.selector;
    let fs_min = class.class.fs_type.min_size();
    if formats && dev.size_bytes < fs_min {
        return Err(refuse(
            class,
            Reason::TooSmall,
            format!(
                "{} < {} ({} needs at least that)",
                format_bytes(dev.size_bytes),
                format_bytes(fs_min),
                class.class.fs_type.as_str()
            ),
        ));
    }
    if let Some(min) = sel.min_size.filter(|min| dev.size_bytes < min.0) {
        return Err(refuse(
            class,
            Reason::TooSmall,
            format!("{} < minSize {}", format_bytes(dev.size_bytes), min),
        ));
    }
    if let Some(max) = sel.max_size.filter(|max| dev.size_bytes > max.0) {
        return Err(refuse(
            class,
            Reason::TooLarge,
            format!("{} > maxSize {}", format_bytes(dev.size_bytes), max),
        ));
    }
    // The remains of our own mkfs are not zero, and need not be.
    if class.class.blank_check == crate::config::BlankCheck::Zeroed && !redo {
        if let Probe::Done { zeroed: z, .. } = &dev.probe {
            if *z != Some(true) {
                return Err(refuse(class, Reason::UnknownData, "no known signature, but the first or last MiB is not zero; zero them (blkdiscard) if the disk is free, or set blankCheck: signatures"));
            }
        }
    }
    Ok(())
}

/// The kernel's exclusive open: nobody else holds the device.
fn check_exclusive(dev: &Device, class: &CompiledClass) -> Result<(), Decision> {
    match &dev.exclusive {
        Exclusive::Free => Ok(()),
        Exclusive::NotChecked => Err(pending(
            Some(class),
            PendingReason::ExclusiveNotChecked,
            "exclusive open not tried yet",
        )),
        Exclusive::Busy => Err(refuse(
            class,
            Reason::Busy,
            "exclusive open refused (EBUSY): another user holds the device",
        )),
        Exclusive::Failed { error } => Err(refuse(
            class,
            Reason::Busy,
            format!("exclusive open failed: {error}"),
        )),
    }
}

/// Every check passed: ours (to mount) or eligible (to format).
fn verdict(
    class: &CompiledClass,
    owned: Option<&Signature>,
    mounted_by_us: bool,
    redo: bool,
) -> Decision {
    match owned {
        Some(s) => Decision {
            class: Some(class.class.name.clone()),
            verdict: Verdict::Ours {
                fs_type: s.kind.clone(),
                uuid: s.uuid.clone(),
            },
            detail: Some(if mounted_by_us {
                "mounted by disklet".into()
            } else {
                "disklet filesystem, not mounted".into()
            }),
        },
        None => Decision {
            class: Some(class.class.name.clone()),
            verdict: Verdict::Eligible,
            detail: redo.then(|| {
                "disklet's own mkfs never finished here (xfs superblock still in progress, the start recorded): formatting it again".into()
            }),
        },
    }
}

/// Mounts a disklet disk may have: its own under hostDir, and kubelet's
/// mounts of a local PV (`pods/<uid>/volumes/kubernetes.io~local-volume/<pv>`
/// and `plugins/kubernetes.io/local-volume/mounts/<pv>`). Anything else under
/// the kubelet dir (another CSI driver's mount) is a foreign mount.
pub fn is_disklet_mount(mp: &Path, host_dir: &Path, kubelet_dir: &Path) -> bool {
    if mp.starts_with(host_dir) {
        return true;
    }
    let Ok(rest) = mp.strip_prefix(kubelet_dir) else {
        return false;
    };
    let c: Vec<&str> = rest.iter().filter_map(|s| s.to_str()).collect();
    matches!(
        c.as_slice(),
        ["pods", _, "volumes", "kubernetes.io~local-volume", _]
            // A container's subPath of a volume: kubelet bind-mounts it here.
            | ["pods", _, "volume-subpaths", _, _, _]
            | ["plugins", "kubernetes.io", "local-volume", "mounts", _]
    )
}

/// Another device that is the same disk or a copy of it, and what they share.
fn duplicate_of<'a>(dev: &Device, inv: &'a Inventory) -> Option<(&'a Device, &'static str)> {
    let fs_uuids = |d: &Device| -> Vec<String> {
        d.signatures()
            .iter()
            .filter_map(|s| s.uuid.clone())
            .collect()
    };
    let mine = fs_uuids(dev);
    inv.devices.iter().find_map(|o| {
        let related = o.name == dev.name
            || o.parent.as_deref() == Some(&dev.name)
            || dev.parent.as_deref() == Some(&o.name)
            // A partition shares its disk's hardware identity with its sibling partitions.
            || (o.parent.is_some() && o.parent == dev.parent);
        if related {
            return None;
        }
        let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
        if same(&dev.wwid, &o.wwid) {
            Some((o, "WWN"))
        } else if same(&dev.serial, &o.serial) && dev.kind == o.kind {
            Some((o, "serial"))
        } else if dev.loop_backing_file.is_some() && dev.loop_backing_file == o.loop_backing_file {
            Some((o, "loop backing file"))
        } else if fs_uuids(o).iter().any(|u| mine.contains(u)) {
            Some((o, "filesystem UUID"))
        } else {
            None
        }
    })
}

fn kinds(k: &[DeviceKind]) -> String {
    k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_volume_mounts_under_the_kubelet_dir_are_ours() {
        let h = Path::new("/var/lib/disklet");
        let k = Path::new("/var/lib/kubelet");
        let ours = |p: &str| is_disklet_mount(Path::new(p), h, k);
        assert!(ours("/var/lib/disklet/fast/u1"));
        assert!(ours(
            "/var/lib/kubelet/pods/0b1c/volumes/kubernetes.io~local-volume/disklet-fast-1"
        ));
        assert!(ours(
            "/var/lib/kubelet/plugins/kubernetes.io/local-volume/mounts/disklet-fast-1"
        ));
        assert!(!ours(
            "/var/lib/kubelet/plugins/kubernetes.io/csi/ebs/globalmount"
        ));
        assert!(!ours(
            "/var/lib/kubelet/pods/0b1c/volumes/kubernetes.io~csi/pvc-1/mount"
        ));
        assert!(!ours("/var/lib/kubelet"));
        assert!(!ours("/mnt/data"));
    }
}
