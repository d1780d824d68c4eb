//! The reconcile loop: observe (devices, mounts, discovery dirs, own PVs) →
//! pure plan → act → repeat. `reconcile` is one pass; `act` hands each
//! Action to its handler, grouped by concern: `provision` (format, mount),
//! `publish` (PVs), `recycle` (cleanups), `report` (Events). `observe` reads
//! the node, `run` is the loop around the passes (ARCHITECTURE.md).

mod observe;
mod provision;
mod publish;
mod recycle;
mod report;
mod run;

pub use provision::{format_recheck, make_vol_dir};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::runtime::reflector::Store;
use tracing::{debug, warn};

use crate::config::Config;
use crate::host::format::Formatter;
use crate::host::mounter::Mounter;
use crate::host::probecache::{DeviceEvents, ProbeCache};
use crate::host::{BlkidProber, HostError, ProcTables, SysfsDevices};
use crate::k8s::client::{Kube, KubeError};
use crate::model::{DirEntry, Fingerprint, Inventory, MountFact};
use crate::plan::{plan, Action, Classes, Decision, PlanInput, Subject};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("this node's PersistentVolumes could not be listed yet (see the PV watch errors above); nothing is done until they are: a disk one of them names must never look free")]
    PvsNotListed,
}

/// Shared, read by health endpoints and tests.
#[derive(Debug, Default)]
pub struct Status {
    pub ready: AtomicBool,
    pub reconciles: AtomicU64,
    pub errors: AtomicU64,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub actions: usize,
    /// A format or mount happened: reconcile again at once to publish.
    pub host_changed: bool,
    /// The earliest moment a settling device will have settled.
    pub wake_at: Option<Instant>,
}

/// The observed state of the node.
pub struct Observed {
    pub inv: Inventory,
    pub decisions: Vec<Decision>,
    pub mounts: std::collections::BTreeMap<PathBuf, MountFact>,
    pub dirs: Vec<DirEntry>,
    pub wake_at: Option<Instant>,
}

pub struct Agent {
    pub cfg: Config,
    pub classes: Classes,
    pub kube: Kube,
    pub devices: SysfsDevices,
    pub prober: BlkidProber,
    /// The passes' probes, kept while a device has not changed
    /// (`host::probecache`); destructive steps use `prober` afresh.
    pub probes: ProbeCache,
    pub tables: ProcTables,
    pub formatter: Box<dyn Formatter>,
    pub mounter: Box<dyn Mounter>,
    pub status: Arc<Status>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Per device: what it looked like and since when.
    stable: HashMap<String, (Fingerprint, Instant)>,
    /// Reports already published, to keep Events from repeating every pass.
    reported: HashMap<String, Instant>,
    /// Per PV: failed cleanups so far and when the next try is due.
    retry: HashMap<String, (u32, Instant)>,
    /// PVs this agent created or deleted that its watch may not show yet:
    /// the next pass waits for them (a bounded wait), so that it does not
    /// decide again on a view without its own writes.
    written: Vec<Written>,
}

/// A write of this agent the PV watch has to show before the next pass.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Written {
    /// Created with this uid.
    Created { name: String, uid: String },
    /// Deleted (the object of this uid).
    Deleted { name: String, uid: String },
}

impl Written {
    /// Whether `store` shows the write.
    fn seen(&self, store: &Store<PersistentVolume>) -> bool {
        let uid_in_store = |name: &str| {
            store
                .get(&kube::runtime::reflector::ObjectRef::new(name))
                .and_then(|p| p.metadata.uid.clone())
        };
        match self {
            Written::Created { name, uid } => uid_in_store(name).as_deref() == Some(uid.as_str()),
            Written::Deleted { name, uid } => uid_in_store(name).as_deref() != Some(uid.as_str()),
        }
    }
}

/// How long a pass waits for the watch to show the last pass's writes; past
/// it the pass goes on (what it may then redo is idempotent: an apply of the
/// same object, a delete with preconditions).
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

const REPORT_EVERY: Duration = Duration::from_secs(600);
/// How long the events of a burst that came during a pass are gathered
/// before the next (`run::wait_for_kick`); a pass itself takes longer, so a
/// burst of any size still makes a few passes, not one per event.
const DEBOUNCE: Duration = Duration::from_millis(5);

impl Agent {
    pub fn new(
        cfg: Config,
        classes: Classes,
        kube: Kube,
        formatter: Box<dyn Formatter>,
        mounter: Box<dyn Mounter>,
    ) -> Agent {
        let tables = ProcTables::new(&cfg.mount_info);
        let probes = ProbeCache::new(
            Duration::from_secs(cfg.reprobe_seconds),
            Arc::new(DeviceEvents::default()),
        );
        Agent {
            cfg,
            classes,
            kube,
            devices: SysfsDevices::default(),
            prober: BlkidProber::default(),
            probes,
            tables,
            formatter,
            mounter,
            status: Arc::new(Status::default()),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            stable: HashMap::new(),
            reported: HashMap::new(),
            retry: HashMap::new(),
            written: Vec::new(),
        }
    }

    /// One pass: observe, plan, act.
    pub async fn reconcile(&mut self, pvs: &[PersistentVolume]) -> Result<Outcome, ReconcileError> {
        let started = Instant::now();
        let node = self.kube.node_info().await;
        self.metrics.api("get-node", node.is_ok());
        let (node, node_obj) = node?;
        let scs = self.storage_classes().await?;
        let api_done = Instant::now();
        let observed = tokio::task::block_in_place(|| self.observe())?;
        let observed_at = Instant::now();
        for (source, n) in [
            ("read", self.probes.reads.swap(0, Ordering::Relaxed)),
            ("cached", self.probes.hits.swap(0, Ordering::Relaxed)),
        ] {
            self.metrics.probed(source, n);
        }
        self.metrics.devices.clear();
        for d in &observed.decisions {
            let l = crate::metrics::DeviceLabels {
                verdict: d.verdict.name().into(),
                reason: d.verdict.reason_code().unwrap_or("").into(),
            };
            self.metrics.devices.get_or_create(&l).inc();
        }
        self.metrics.pvs.clear();
        for p in pvs {
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into());
            self.metrics
                .pvs
                .get_or_create(&crate::metrics::PhaseLabels { phase })
                .inc();
        }
        let actions = plan(&PlanInput {
            cfg: &self.cfg,
            classes: &self.classes,
            inv: &observed.inv,
            decisions: &observed.decisions,
            mounts: &observed.mounts,
            dirs: &observed.dirs,
            pvs,
            node: &node,
            scs: &scs,
        });
        let mut out = Outcome {
            actions: actions.len(),
            wake_at: observed.wake_at,
            ..Outcome::default()
        };
        let planned_at = Instant::now();
        out.host_changed = self.act_all(actions, &observed, &node_obj).await;
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let end = Instant::now();
        debug!(
            actions = out.actions,
            api_ms = ms(started, api_done),
            observe_ms = ms(api_done, observed_at),
            plan_ms = ms(observed_at, planned_at),
            act_ms = ms(planned_at, end),
            "pass timing"
        );
        self.status.reconciles.fetch_add(1, Ordering::Relaxed);
        self.metrics.reconciles.inc();
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Carries out a pass's actions in the plan's order, but the formats all
    /// at once (where the first of them stands) and the PV applies all at
    /// once (where the first of them stands): the plan never asks for two
    /// things of one device in a pass. Returns whether the host changed.
    async fn act_all(
        &mut self,
        actions: Vec<Action>,
        observed: &Observed,
        node_obj: &Node,
    ) -> bool {
        let mut formats = Vec::new();
        let mut applies = Vec::new();
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Format {
                    device,
                    class,
                    fs,
                    fingerprint,
                } => {
                    if formats.is_empty() {
                        rest.push(Batch::Formats);
                    }
                    formats.push(provision::FormatJob {
                        device,
                        class,
                        fs,
                        fingerprint,
                    });
                }
                Action::ApplyPv { pv, create } => {
                    if applies.is_empty() {
                        rest.push(Batch::Applies);
                    }
                    applies.push((pv, create));
                }
                a => rest.push(Batch::One(Box::new(a))),
            }
        }
        let mut changed = false;
        for b in rest {
            changed |= match b {
                Batch::Formats => {
                    self.formats(std::mem::take(&mut formats), observed, node_obj)
                        .await
                }
                Batch::Applies => self.apply_pvs(std::mem::take(&mut applies)).await,
                Batch::One(a) => self.act(*a, observed, node_obj).await,
            };
        }
        changed
    }

    /// Carries out one action by its handler; returns whether the host
    /// changed.
    async fn act(&mut self, a: Action, observed: &Observed, node_obj: &Node) -> bool {
        match a {
            // `act_all` runs these as batches and never hands them here; a
            // lone one is a batch of one.
            a @ (Action::Format { .. } | Action::ApplyPv { .. }) => {
                Box::pin(self.act_all(vec![a], observed, node_obj)).await
            }
            Action::Mount {
                device,
                devnode,
                fs_type,
                target,
                options,
            } => {
                self.mount(
                    device, devnode, fs_type, target, options, observed, node_obj,
                )
                .await
            }
            Action::MakeVolDir { mount_point } => match provision::make_vol_dir(&mount_point) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "cannot create the volume directory");
                    false
                }
            },
            Action::DeletePv {
                name,
                uid,
                resource_version,
                reason,
                note,
            } => {
                self.delete_pv(name, uid, resource_version, reason, note, node_obj)
                    .await
            }
            Action::Readopt { pv, otherwise } => self.readopt(pv, otherwise, node_obj).await,
            Action::AnnotatePv { name, set } => self.annotate_pv(name, set).await,
            Action::Wait {
                pv,
                reason,
                message,
            } => {
                self.report_pv(&pv, true, reason, message).await;
                false
            }
            Action::Recycle(job) => self.recycle(job, node_obj).await,
            Action::Report {
                warning,
                reason,
                message,
                subject,
            } => {
                match subject {
                    Subject::Pv(pv) => self.report_pv(&pv, warning, reason, message).await,
                    Subject::Node => self.report_node(node_obj, warning, reason, message).await,
                }
                false
            }
        }
    }
}

/// A step of `Agent::act_all`: one action, or where a pass's batch runs.
enum Batch {
    Formats,
    Applies,
    One(Box<Action>),
}

#[cfg(test)]
mod tests {
    use super::provision::make_vol_dir;

    #[test]
    fn the_volume_dir_is_never_created_on_an_unmounted_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("fast/uuid");
        std::fs::create_dir_all(&mp).unwrap();
        let e = make_vol_dir(&mp).unwrap_err();
        assert!(e.to_string().contains("not a mount point"), "{e}");
        assert!(!mp.join("vol").exists());
        assert!(make_vol_dir(&dir.path().join("missing")).is_err());
    }
}
