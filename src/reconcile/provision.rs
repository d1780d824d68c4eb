//! Provisioning handlers: format a blank disk behind the interlocks, mount
//! a filesystem of ours, make the volume directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use super::{Agent, Observed};
use crate::config::Config;
use crate::config::FsType;
use crate::host::format::{format_safely, FormatRequest, Host, NotEligible};
use crate::host::Prober;
use crate::model::reasons::event;
use crate::model::{ownership, Fingerprint};
use crate::model::{Device, Inventory};
use crate::plan::eligibility::still_eligible;
use crate::plan::{Classes, NodeFacts};

impl Agent {
    /// `Action::Format`; returns whether the host changed.
    pub(super) async fn format(
        &mut self,
        device: String,
        class: String,
        fs: FsType,
        fingerprint: Fingerprint,
        observed: &Observed,
        node_obj: &Node,
    ) -> bool {
        let started = Instant::now();
        let host = Host {
            devices: &self.devices,
            prober: &self.prober,
            tables: &self.tables,
        };
        let recheck = format_recheck(&self.cfg, &self.classes, &class);
        let req = FormatRequest {
            device: &device,
            seen: &observed.inv.devices,
            planned: &fingerprint,
            fs,
            host_dir: &self.cfg.host_dir,
        };
        let r = tokio::task::block_in_place(|| {
            format_safely(&req, &host, self.formatter.as_ref(), &recheck)
        });
        // Formatted or refused on fresh data: either way what the cache
        // holds of the device is no longer to be trusted.
        self.probes.forget(&device);
        self.metrics
            .format_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(uuid) => {
                info!(
                    device,
                    class,
                    fs = fs.as_str(),
                    uuid,
                    ms = started.elapsed().as_millis() as u64,
                    "formatted"
                );
                self.kube
                    .event(
                        node_obj,
                        false,
                        event::FORMATTED,
                        "Format",
                        format!(
                            "formatted /dev/{device} for class {class} as {} (uuid {uuid}){}",
                            fs.as_str(),
                            if fingerprint.signatures.is_empty() {
                                ""
                            } else {
                                ", again: disklet's earlier mkfs of it never finished"
                            }
                        ),
                    )
                    .await;
                true
            }
            Err(e) => {
                self.metrics.error(&format!("format-{}", e.kind()));
                warn!(device, class, error = %e, "format refused or failed");
                self.kube
                    .event(
                        node_obj,
                        true,
                        event::FORMAT_FAILED,
                        "Format",
                        e.to_string(),
                    )
                    .await;
                false
            }
        }
    }

    /// `Action::Mount`, after probing the device again; returns whether the
    /// host changed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn mount(
        &mut self,
        device: String,
        devnode: PathBuf,
        fs_type: String,
        target: PathBuf,
        options: Vec<String>,
        observed: &Observed,
        node_obj: &Node,
    ) -> bool {
        // Re-probe immediately before mounting: it must still be the
        // filesystem the plan saw, and ours.
        let planned = observed
            .inv
            .device(&device)
            .and_then(|d| ownership(d.signatures()))
            .and_then(|s| s.uuid.clone());
        let Some(dev) = observed.inv.device(&device) else {
            return false;
        };
        let now = tokio::task::block_in_place(|| self.prober.probe(dev));
        let current = match &now {
            crate::model::Probe::Done { signatures, .. } => {
                ownership(signatures).and_then(|s| s.uuid.clone())
            }
            _ => None,
        };
        if current.is_none() || current != planned {
            warn!(device, "device changed before mount; not mounting");
            return false;
        }
        let started = Instant::now();
        let r = tokio::task::block_in_place(|| {
            self.mounter.mount(&devnode, &target, &fs_type, &options)?;
            crate::failpoint::hit("mount-after-mount");
            // The host must see it (mountPropagation: Bidirectional on
            // hostDir), or kubelet cannot use it and every pass would
            // stack another mount.
            if !self.host_sees_mount(&target, dev) {
                let _ = self.mounter.umount(&target);
                return Err(crate::host::mounter::MountError::NotPropagated {
                    target: target.clone(),
                    table: self.cfg.mount_info.clone(),
                });
            }
            make_vol_dir(&target)?;
            crate::failpoint::hit("mount-after-voldir");
            Ok(())
        });
        self.metrics
            .mount_seconds
            .observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.error("mount");
        }
        match r {
            Ok(()) => {
                info!(device, target = %target.display(), "mounted");
                self.kube
                    .event(
                        node_obj,
                        false,
                        event::MOUNTED,
                        "Mount",
                        format!("mounted /dev/{device} ({fs_type}) at {}", target.display()),
                    )
                    .await;
                true
            }
            Err(e) => {
                warn!(device, error = %e, "mount failed");
                self.kube
                    .event(node_obj, true, event::MOUNT_FAILED, "Mount", e.to_string())
                    .await;
                false
            }
        }
    }

    /// Whether the configured (host) mount table shows `dev` at `target`.
    pub(super) fn host_sees_mount(&self, target: &Path, dev: &crate::model::Device) -> bool {
        use crate::host::HostTables;
        self.tables
            .mounts()
            .map(|ms| {
                ms.iter()
                    .any(|m| m.mount_point == target && m.devno == dev.devno)
            })
            .unwrap_or(false)
    }
}

/// The decision the format interlock makes again on its fresh observation:
/// the plan's eligibility rules, on the node as just read (its format
/// records included), for `class`.
pub fn format_recheck<'a>(
    cfg: &'a Config,
    classes: &'a Classes,
    class: &'a str,
) -> impl Fn(&Device, &Inventory) -> Result<(), NotEligible> + 'a {
    move |dev, inv| {
        let facts = NodeFacts::new(inv, &cfg.host_dir, &cfg.kubelet_dir)
            .with_intents(crate::host::intents::read(&cfg.host_dir));
        still_eligible(dev, inv, classes, &facts, class)
            .map_err(|(verdict, detail)| NotEligible { verdict, detail })
    }
}

/// Creates `<mount>/vol`, but only if `mount_point` really is a mount point
/// right now: otherwise the directory would land on the root disk and a pod
/// could write there after a reboot (DESIGN.md §3.6).
pub fn make_vol_dir(mount_point: &Path) -> Result<(), crate::host::mounter::MountError> {
    use std::os::unix::fs::MetadataExt;
    let not_mounted = |what: &str| crate::host::mounter::MountError::MkDir {
        path: mount_point.into(),
        source: std::io::Error::other(what.to_string()),
    };
    let here = std::fs::metadata(mount_point).map_err(|source| {
        crate::host::mounter::MountError::MkDir {
            path: mount_point.into(),
            source,
        }
    })?;
    let parent = mount_point
        .parent()
        .ok_or_else(|| not_mounted("no parent directory"))?;
    let up =
        std::fs::metadata(parent).map_err(|source| crate::host::mounter::MountError::MkDir {
            path: parent.into(),
            source,
        })?;
    if here.dev() == up.dev() {
        return Err(not_mounted("is not a mount point; refusing to create the volume directory on the parent filesystem"));
    }
    let vol = crate::model::volume::vol_dir(mount_point);
    match std::fs::create_dir(&vol) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(crate::host::mounter::MountError::MkDir { path: vol, source }),
    }
}
