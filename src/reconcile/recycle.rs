//! The recycle handler: record the start, re-verify the volume, clean it
//! by its method, delete the PV so the next pass publishes it afresh.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use super::provision::make_vol_dir;
use super::Agent;
use crate::config::{CleanupMethod as M, FsType};
use crate::host::{cleanup, BlockDevices, HostTables, Prober};
use crate::model::keys::ANN_CLEANUP;
use crate::model::reasons::event;
use crate::model::{ownership, DevNo, Device, Inventory};
use crate::plan::recycle::kubelet_users;
use crate::plan::{Recycle, Target};

/// A cleanup's failure, as the `CleanupFailed` Event words it.
type Why = String;

fn why(e: impl std::fmt::Display) -> Why {
    e.to_string()
}

impl Agent {
    /// `Action::Recycle`; returns whether the host changed.
    pub(super) async fn recycle(&mut self, job: Recycle, node_obj: &Node) -> bool {
        let pv = job.pv.as_str();
        if self
            .retry
            .get(pv)
            .is_some_and(|(_, next)| Instant::now() < *next)
        {
            return false;
        }
        let started_mark = [(ANN_CLEANUP.to_string(), Some("started".to_string()))];
        if let Err(e) = self.kube.annotate_pv(pv, &started_mark).await {
            warn!(pv, error = %e, "cannot record the cleanup start; not cleaning");
            return false;
        }
        crate::failpoint::hit("recycle-after-annotate");
        let started = Instant::now();
        let r = tokio::task::block_in_place(|| self.recycle_blocking(&job));
        self.metrics
            .cleanup_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(summary) => {
                self.recycled(&job, &summary, started, node_obj).await;
                true
            }
            Err(why) => {
                self.recycle_failed(&job, why).await;
                false
            }
        }
    }

    /// After a cleanup: the PV goes, so the next pass publishes afresh.
    async fn recycled(&mut self, job: &Recycle, summary: &str, started: Instant, node_obj: &Node) {
        let (pv, method) = (job.pv.as_str(), job.method.as_str());
        self.retry.remove(pv);
        info!(
            pv,
            method,
            ms = started.elapsed().as_millis() as u64,
            "volume cleaned"
        );
        let d = self.kube.delete_pv(pv, &job.uid, None).await;
        self.metrics.api("delete-pv", d.is_ok());
        if d.is_ok() {
            crate::failpoint::hit("recycle-after-delete");
        }
        if let Err(e) = d {
            warn!(pv, error = %e, "cleaned, but the PV delete failed; retried next pass");
        }
        let note = format!(
            "{pv}: cleaned ({method}: {summary}); the PV is deleted and the volume published afresh"
        );
        self.kube
            .event(node_obj, false, event::RECYCLED, "Cleanup", note)
            .await;
    }

    /// A failed cleanup: retried with backoff (5 s doubling, at most 10 min).
    async fn recycle_failed(&mut self, job: &Recycle, why: Why) {
        let (pv, method) = (job.pv.as_str(), job.method.as_str());
        let (n, _) = self.retry.get(pv).copied().unwrap_or((0, Instant::now()));
        let delay = Duration::from_secs(5)
            .saturating_mul(1 << n.min(7))
            .min(Duration::from_secs(600));
        self.retry
            .insert(pv.to_string(), (n + 1, Instant::now() + delay));
        self.metrics.error(&format!("cleanup-{method}"));
        warn!(pv, error = %why, retry_in_s = delay.as_secs(), "cleanup failed");
        let note = format!(
            "{pv}: {method} cleanup failed: {why}; retrying in {}s",
            delay.as_secs()
        );
        self.report_pv(pv, true, event::CLEANUP_FAILED, note).await;
    }

    /// Re-verifies, right before acting, that the volume is the one the PV
    /// names and that no pod uses it, then cleans it. Returns a summary.
    fn recycle_blocking(&self, job: &Recycle) -> Result<String, Why> {
        let inv = Inventory {
            devices: self.devices.list().map_err(why)?,
            mounts: self.tables.mounts().map_err(why)?,
            swaps: Vec::new(),
        };
        let target = &job.target;
        if let Some(u) = kubelet_users(target, &inv, &self.cfg.kubelet_dir).first() {
            return Err(format!("still mounted by kubelet at {}", u.display()));
        }
        let dev = inv.devices.iter().find(|d| d.devno == target.devno());
        if let Some(want) = job.expected_device_id.as_deref() {
            let have = dev.and_then(|d| d.identity());
            if have.as_deref() != Some(want) {
                return Err(format!(
                    "identity mismatch: the PV names {want}, the device is {}",
                    have.unwrap_or_else(|| "unknown".into())
                ));
            }
        }
        match target {
            Target::Fs {
                devnode, fs_type, ..
            } => {
                let dev = dev.ok_or_else(|| why("the device is gone"))?;
                self.clean_fs(job, &inv, dev, devnode, *fs_type)
            }
            Target::Raw { devnode, .. } => clean_raw(job.method, devnode),
            Target::Dir { path, devno } => clean_dir(job.method, &inv, path, *devno),
        }
    }

    /// A filesystem disklet made: still the one the PV names, mounted only
    /// under hostDir; unmounted, wiped by the method, and for `reformat`
    /// made anew and mounted.
    fn clean_fs(
        &self,
        job: &Recycle,
        inv: &Inventory,
        dev: &Device,
        devnode: &Path,
        fs_type: FsType,
    ) -> Result<String, Why> {
        let expected = job.expected_fs_uuid.as_deref();
        let uuid = match &self.prober.probe(dev) {
            crate::model::Probe::Done { signatures, .. } => {
                ownership(signatures).and_then(|s| s.uuid.clone())
            }
            _ => None,
        };
        if uuid.is_none() || uuid.as_deref() != expected {
            return Err(format!(
                "{} no longer carries disklet filesystem {}",
                devnode.display(),
                expected.unwrap_or("?")
            ));
        }
        // Only disklet's own mounts may be taken away.
        if let Some(m) = inv
            .mounts_of(dev)
            .find(|m| !m.mount_point.starts_with(&self.cfg.host_dir))
        {
            return Err(format!(
                "mounted at {} outside disklet's hostDir",
                m.mount_point.display()
            ));
        }
        crate::failpoint::hit("recycle-before-clean");
        let mut ours: Vec<PathBuf> = inv.mounts_of(dev).map(|m| m.mount_point.clone()).collect();
        ours.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &ours {
            self.mounter.umount(m).map_err(why)?;
        }
        match job.method {
            M::Discard => cleanup::discard_or_zeroout(devnode).map_err(why)?,
            M::Zeroout => cleanup::blk_zeroout(devnode).map_err(why)?,
            _ => cleanup::wipe_for_reformat(devnode).map_err(why)?,
        }
        crate::failpoint::hit("recycle-after-wipe");
        if job.method != M::Reformat {
            return Ok(format!("{} wiped", devnode.display()));
        }
        self.reformat(job, dev, devnode, fs_type)
    }

    /// mkfs (recorded, like a first format) and mount at the new UUID's path.
    fn reformat(
        &self,
        job: &Recycle,
        dev: &Device,
        devnode: &Path,
        fs_type: FsType,
    ) -> Result<String, Why> {
        let new_uuid = uuid::Uuid::new_v4().to_string();
        crate::host::format::mkfs_recorded(
            self.formatter.as_ref(),
            &self.cfg.host_dir,
            devnode,
            fs_type,
            &new_uuid,
            &dev.intent_key(),
        )
        .map_err(why)?;
        crate::failpoint::hit("recycle-after-mkfs");
        let target = crate::model::volume::mount_target(&self.cfg.host_dir, &job.class, &new_uuid);
        let options = self
            .classes
            .classes
            .iter()
            .find(|c| c.class.name == job.class)
            .map(|c| c.class.mount_options.clone())
            .unwrap_or_default();
        self.mounter
            .mount(devnode, &target, fs_type.as_str(), &options)
            .map_err(why)?;
        make_vol_dir(&target).map_err(why)?;
        crate::failpoint::hit("recycle-after-mount");
        Ok(format!("new filesystem {new_uuid}"))
    }
}

/// A raw device (Block, or published with fsType): discarded or zeroed.
fn clean_raw(method: M, devnode: &Path) -> Result<String, Why> {
    match method {
        M::None => {}
        M::Zeroout => cleanup::blk_zeroout(devnode).map_err(why)?,
        _ => cleanup::discard_or_zeroout(devnode).map_err(why)?,
    }
    Ok(format!("{} {}", devnode.display(), method.as_str()))
}

/// A discovery-dir mount point: still the same filesystem, held open, and
/// its files removed through the held descriptor.
fn clean_dir(method: M, inv: &Inventory, path: &Path, devno: DevNo) -> Result<String, Why> {
    let still = inv
        .mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == path)
        .is_some_and(|m| m.devno == devno);
    if !still {
        return Err(format!(
            "{} is no longer the mount point the PV was published for",
            path.display()
        ));
    }
    if method == M::None {
        return Ok("nothing cleaned".into());
    }
    // Hold the directory, then check it is on the device the table said:
    // nothing can be swapped in between.
    use nix::fcntl::{open, OFlag};
    let at = |e: nix::errno::Errno| format!("{}: {e}", path.display());
    let fd = open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(at)?;
    let st = nix::sys::stat::fstat(&fd).map_err(at)?;
    let held = DevNo::new(
        nix::sys::stat::major(st.st_dev) as u32,
        nix::sys::stat::minor(st.st_dev) as u32,
    );
    if held != devno {
        return Err(format!(
            "{} is on {held}, not {devno}: not the volume the PV was published for",
            path.display()
        ));
    }
    let report = crate::host::files::clean_files_at(fd, path).map_err(why)?;
    if report.failures.is_empty() && report.skipped_mounts.is_empty() {
        return Ok(format!("{} entries removed", report.removed));
    }
    let first = report
        .failures
        .first()
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .or_else(|| {
            report
                .skipped_mounts
                .first()
                .map(|p| format!("{} is another mount", p.display()))
        })
        .unwrap_or_default();
    Err(format!(
        "{} entries removed, {} not removable, {} nested mounts left; first: {first}",
        report.removed,
        report.failures.len(),
        report.skipped_mounts.len()
    ))
}
