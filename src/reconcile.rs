//! The reconcile loop: observe (devices, mounts, discovery dirs, own PVs) →
//! pure plan → act → repeat. Events only kick it; a resync timer is the safety
//! net; a settle timer wakes it when a device has been stable long enough.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::runtime::reflector::Store;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::host::events::{self, Kick};
use crate::host::format::{format_safely, Formatter, Host};
use crate::host::mounter::Mounter;
use crate::host::{dirs, BlkidProber, HostError, Prober, ProcTables, SysfsDevices};
use crate::k8s::client::{Kube, KubeError};
use crate::model::{DevNo, DirEntry, Fingerprint, Inventory, MountFact, NodeInfo, ScInfo};
use crate::plan::eligibility::ownership;
use crate::plan::{plan, Action, Classes, Decision, PendingReason, PlanInput, Subject, Verdict};

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
    pub mounts: BTreeMap<PathBuf, MountFact>,
    pub dirs: Vec<DirEntry>,
    pub wake_at: Option<Instant>,
}

pub struct Agent {
    pub cfg: Config,
    pub classes: Classes,
    pub kube: Kube,
    pub devices: SysfsDevices,
    pub prober: BlkidProber,
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
const DEBOUNCE: Duration = Duration::from_millis(20);

impl Agent {
    pub fn new(
        cfg: Config,
        classes: Classes,
        kube: Kube,
        formatter: Box<dyn Formatter>,
        mounter: Box<dyn Mounter>,
    ) -> Agent {
        let tables = ProcTables::new(&cfg.mount_info);
        Agent {
            cfg,
            classes,
            kube,
            devices: SysfsDevices::default(),
            prober: BlkidProber::default(),
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

    /// Devices, decisions (with settle times), mount facts and discovery dirs.
    pub fn observe(&mut self) -> Result<Observed, HostError> {
        let (mut inv, entries) = self.snapshot()?;
        let now = Instant::now();
        let mut seen = HashMap::new();
        for d in &inv.devices {
            let fp = Fingerprint::of(d, &inv);
            let since = match self.stable.get(&d.name) {
                Some((old, since)) if *old == fp => *since,
                _ => now,
            };
            seen.insert(d.name.clone(), (fp, since));
        }
        self.stable = seen;
        let since = |d: &crate::model::Device| self.stable.get(&d.name).map_or(now, |s| s.1);
        let decisions =
            crate::scan::decide_all_aged(&mut inv, &self.cfg, &self.classes, &self.prober, &|d| {
                Some(now.saturating_duration_since(since(d)))
            });
        // Wake when the first settling device will have settled.
        let mut wake_at: Option<Instant> = None;
        for (dev, d) in inv.devices.iter().zip(&decisions) {
            if d.verdict
                != (Verdict::Pending {
                    reason: PendingReason::Settling,
                })
            {
                continue;
            }
            if let Some(c) = d
                .class
                .as_deref()
                .and_then(|n| self.classes.classes.iter().find(|c| c.class.name == n))
            {
                let at = since(dev) + Duration::from_secs(c.class.settle_seconds);
                wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            }
        }
        // A record of a mkfs whose filesystem is finished after all (the
        // mkfs of a killed agent ran on to its end) has nothing left to allow.
        for i in crate::host::intents::read(&self.cfg.host_dir) {
            let finished = inv.devices.iter().any(|d| {
                d.signatures()
                    .iter()
                    .any(|s| s.uuid.as_deref() == Some(i.uuid.as_str()) && !s.in_progress)
            });
            if finished {
                if let Err(e) = crate::host::intents::clear(&self.cfg.host_dir, &i.uuid) {
                    warn!(uuid = i.uuid, error = %e, "cannot remove the record of a finished mkfs");
                }
            }
        }
        let mut mounts = BTreeMap::new();
        for m in &inv.mounts {
            if m.mount_point.starts_with(&self.cfg.host_dir) && m.root == Path::new("/") {
                let dev = inv.mount_device(m);
                let mut fact = dirs::mount_fact(m, dev.map(|d| d.devnode.as_path()));
                // After the filesystem's size, so that an online grow in
                // between (disk, then filesystem) never looks like a shrink.
                fact.device_bytes =
                    dev.and_then(|d| crate::host::BlockDevices::size_now(&self.devices, &d.name));
                mounts.insert(m.mount_point.clone(), fact);
            }
        }
        Ok(Observed {
            inv,
            decisions,
            mounts,
            dirs: entries,
            wake_at,
        })
    }

    /// The devices, the mount table and the discovery dirs, read in that
    /// order: a device that is mounted is then always seen mounted. An entry
    /// that appeared in between (a disk attached, formatted and mounted by
    /// the admin while the devices were being listed) names a device the
    /// list lacks; it would be published without the identity its cleanup
    /// checks, or refused as an unknown device. The snapshot is then read
    /// once more, and a device still missing is left to the plan.
    fn snapshot(&self) -> Result<(Inventory, Vec<DirEntry>), HostError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let inv = crate::scan::observe_named(
                &self.devices,
                &self.prober,
                &self.tables,
                Some(&self.classes),
            )?;
            let mut entries = Vec::new();
            for c in &self.cfg.classes {
                for d in &c.discovery_dirs {
                    entries.extend(dirs::scan_dir(&c.name, d, &inv.mounts));
                }
            }
            let missing = dirs::devices_missing(&entries, &inv.devices);
            if missing.is_empty() || tries == 2 {
                return Ok((inv, entries));
            }
            debug!(entries = ?missing, "discovery entries name devices the listing lacked; reading again");
        }
    }

    async fn storage_classes(&self) -> Result<BTreeMap<String, Option<ScInfo>>, KubeError> {
        let mut scs = BTreeMap::new();
        for c in &self.cfg.classes {
            let n = c.storage_class();
            if let std::collections::btree_map::Entry::Vacant(e) = scs.entry(n.to_string()) {
                let sc = self.kube.storage_class(n).await;
                self.metrics.api("get-storageclass", sc.is_ok());
                let sc = sc?;
                let missing = crate::metrics::ScLabels {
                    storageclass: n.to_string(),
                };
                self.metrics
                    .storageclass_missing
                    .get_or_create(&missing)
                    .set(i64::from(sc.is_none()));
                e.insert(sc);
            }
        }
        Ok(scs)
    }

    /// One pass: observe, plan, act.
    pub async fn reconcile(&mut self, pvs: &[PersistentVolume]) -> Result<Outcome, ReconcileError> {
        let started = Instant::now();
        let node = self.kube.node_info().await;
        self.metrics.api("get-node", node.is_ok());
        let (node, node_obj) = node?;
        let scs = self.storage_classes().await?;
        let observed = tokio::task::block_in_place(|| self.observe())?;
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
        for a in actions {
            if self.act(a, &observed, &node, &node_obj).await {
                out.host_changed = true;
            }
        }
        self.status.reconciles.fetch_add(1, Ordering::Relaxed);
        self.metrics.reconciles.inc();
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Carries out one action; returns whether the host changed.
    async fn act(
        &mut self,
        a: Action,
        observed: &Observed,
        _node: &NodeInfo,
        node_obj: &Node,
    ) -> bool {
        match a {
            Action::Format {
                device,
                class,
                fs,
                fingerprint,
            } => {
                let started = Instant::now();
                let host = Host {
                    devices: &self.devices,
                    prober: &self.prober,
                    tables: &self.tables,
                };
                let r = tokio::task::block_in_place(|| {
                    format_safely(
                        &device,
                        &observed.inv.devices,
                        &fingerprint,
                        &class,
                        fs,
                        &self.cfg,
                        &self.classes,
                        &host,
                        self.formatter.as_ref(),
                    )
                });
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
                                "Formatted",
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
                            .event(node_obj, true, "FormatFailed", "Format", e.to_string())
                            .await;
                        false
                    }
                }
            }
            Action::Mount {
                device,
                devnode,
                fs_type,
                target,
                options,
            } => {
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
                                "Mounted",
                                "Mount",
                                format!(
                                    "mounted /dev/{device} ({fs_type}) at {}",
                                    target.display()
                                ),
                            )
                            .await;
                        true
                    }
                    Err(e) => {
                        warn!(device, error = %e, "mount failed");
                        self.kube
                            .event(node_obj, true, "MountFailed", "Mount", e.to_string())
                            .await;
                        false
                    }
                }
            }
            Action::MakeVolDir { mount_point } => match make_vol_dir(&mount_point) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "cannot create the volume directory");
                    false
                }
            },
            Action::ApplyPv { pv, create } => {
                let name = pv.metadata.name.clone().unwrap_or_default();
                crate::failpoint::hit("apply-before");
                let applied = self.kube.apply_pv(&pv).await;
                if applied.is_ok() {
                    crate::failpoint::hit("apply-after");
                }
                self.metrics.api("apply-pv", applied.is_ok());
                match applied {
                    Ok(applied) => {
                        info!(pv = name, create, "PV applied");
                        if create {
                            if let Some(uid) = applied.metadata.uid.clone() {
                                self.written.push(Written::Created {
                                    name: name.clone(),
                                    uid,
                                });
                            }
                            let path = pv
                                .spec
                                .as_ref()
                                .and_then(|s| s.local.as_ref())
                                .map(|l| l.path.clone())
                                .unwrap_or_default();
                            self.kube
                                .event(
                                    &applied,
                                    false,
                                    "Published",
                                    "Publish",
                                    format!("published {path} on node {}", self.kube.node),
                                )
                                .await;
                        }
                    }
                    Err(e) => {
                        self.status.errors.fetch_add(1, Ordering::Relaxed);
                        warn!(pv = name, error = %e, "PV apply failed");
                    }
                }
                false
            }
            Action::DeletePv {
                name,
                uid,
                resource_version,
                reason,
                note,
            } => {
                let r = self
                    .kube
                    .delete_pv(&name, &uid, Some(&resource_version))
                    .await;
                self.metrics.api("delete-pv", r.is_ok());
                match r {
                    Ok(()) => {
                        crate::failpoint::hit("delete-after");
                        info!(pv = name, reason, "PV deleted");
                        self.written.push(Written::Deleted {
                            name: name.clone(),
                            uid: uid.clone(),
                        });
                        self.kube
                            .event(
                                node_obj,
                                reason == "VolumeWithdrawn",
                                reason,
                                "Delete",
                                note,
                            )
                            .await;
                    }
                    // The change reaches the watch, whose event kicks the
                    // next pass; no pass is rerun on a stale view.
                    Err(e) if e.is_conflict() => info!(
                        pv = name,
                        "PV changed since the plan saw it; not deleted, decided again"
                    ),
                    Err(e) => warn!(pv = name, error = %e, "PV delete failed"),
                }
                false
            }
            Action::Readopt { pv, otherwise } => {
                let name = pv.metadata.name.clone().unwrap_or_default();
                let want = |p: &PersistentVolume, k: &str| {
                    p.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(k).cloned())
                };
                let found = self.kube.get_pv(&name).await;
                // The same name, key and node: ours, only out of sight.
                let ours = found.as_ref().is_some_and(|f| {
                    [crate::k8s::pv::ANN_KEY, crate::k8s::pv::ANN_NODE_UID]
                        .iter()
                        .all(|k| want(f, k).is_some() && want(f, k) == want(&pv, k))
                });
                if !ours {
                    self.report_node(node_obj, true, "VolumeNotClean", otherwise)
                        .await;
                    return false;
                }
                let Some(found) = found else { return false };
                let phase = found.status.as_ref().and_then(|s| s.phase.as_deref());
                if found.metadata.deletion_timestamp.is_some()
                    || matches!(phase, Some("Released" | "Failed"))
                {
                    // A released volume taken out of disklet's hands (its
                    // labels removed) stays out: labelling it again would
                    // hand its data to the reclaim policy.
                    let note = format!("{name} ({}) has no disklet labels, so disklet leaves it and its data alone; label it disklet.io/node={} to hand it back", phase.unwrap_or("deleting"), crate::k8s::pv::node_label_value(&self.kube.node));
                    if self.due("PvModified", &note) {
                        self.kube
                            .event(&found, true, "PvModified", "Reconcile", note.clone())
                            .await;
                        warn!(pv = name, "{note}");
                    }
                    return false;
                }
                // Only the labels: the PV's spec stays as it is.
                let labels = pv.metadata.labels.clone().unwrap_or_default();
                let labelled = self.kube.label_pv(&name, &labels).await;
                self.metrics.api("label-pv", labelled.is_ok());
                match labelled {
                    Ok(labelled) => {
                        let note = format!("{name} had lost disklet's labels (edited by hand?), so this node no longer saw it; labels restored");
                        warn!(pv = name, "{note}");
                        self.kube
                            .event(&labelled, true, "PvModified", "Publish", note)
                            .await;
                    }
                    Err(e) => {
                        warn!(pv = name, error = %e, "cannot restore the labels of a PV of this node")
                    }
                }
                false
            }
            Action::AnnotatePv { name, set } => {
                let r = self.kube.annotate_pv(&name, &set).await;
                self.metrics.api("annotate-pv", r.is_ok());
                if let Err(e) = r {
                    warn!(pv = name, error = %e, "PV annotation failed");
                }
                false
            }
            Action::Wait {
                pv,
                reason,
                message,
            } => {
                self.report_pv(&pv, true, reason, message).await;
                false
            }
            Action::Recycle {
                pv,
                uid,
                class,
                method,
                target,
                expected_device_id,
                expected_fs_uuid,
            } => {
                if self
                    .retry
                    .get(&pv)
                    .is_some_and(|(_, next)| Instant::now() < *next)
                {
                    return false;
                }
                if let Err(e) = self
                    .kube
                    .annotate_pv(
                        &pv,
                        &[(
                            crate::plan::recycle::ANN_CLEANUP.to_string(),
                            Some("started".to_string()),
                        )],
                    )
                    .await
                {
                    warn!(pv, error = %e, "cannot record the cleanup start; not cleaning");
                    return false;
                }
                crate::failpoint::hit("recycle-after-annotate");
                let started = Instant::now();
                let r = tokio::task::block_in_place(|| {
                    self.recycle_blocking(
                        &class,
                        method,
                        &target,
                        expected_device_id.as_deref(),
                        expected_fs_uuid.as_deref(),
                    )
                });
                self.metrics
                    .cleanup_seconds
                    .observe(started.elapsed().as_secs_f64());
                match r {
                    Ok(summary) => {
                        self.retry.remove(&pv);
                        info!(
                            pv,
                            method = method.as_str(),
                            ms = started.elapsed().as_millis() as u64,
                            "volume cleaned"
                        );
                        let d = self.kube.delete_pv(&pv, &uid, None).await;
                        self.metrics.api("delete-pv", d.is_ok());
                        if d.is_ok() {
                            crate::failpoint::hit("recycle-after-delete");
                        }
                        if let Err(e) = d {
                            warn!(pv, error = %e, "cleaned, but the PV delete failed; retried next pass");
                        }
                        self.kube.event(node_obj, false, "Recycled", "Cleanup", format!("{pv}: cleaned ({}: {summary}); the PV is deleted and the volume published afresh", method.as_str())).await;
                        true
                    }
                    Err(why) => {
                        let (n, _) = self.retry.get(&pv).copied().unwrap_or((0, Instant::now()));
                        let delay = Duration::from_secs(5)
                            .saturating_mul(1 << n.min(7))
                            .min(Duration::from_secs(600));
                        self.retry
                            .insert(pv.clone(), (n + 1, Instant::now() + delay));
                        self.metrics.error(&format!("cleanup-{}", method.as_str()));
                        warn!(pv, error = %why, retry_in_s = delay.as_secs(), "cleanup failed");
                        self.report_pv(
                            &pv,
                            true,
                            "CleanupFailed",
                            format!(
                                "{pv}: {} cleanup failed: {why}; retrying in {}s",
                                method.as_str(),
                                delay.as_secs()
                            ),
                        )
                        .await;
                        false
                    }
                }
            }
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

    /// Whether a report is due: not published in the last `REPORT_EVERY`.
    /// Records it as published when it is.
    fn due(&mut self, reason: &str, message: &str) -> bool {
        let key = format!("{reason}\0{message}");
        if self
            .reported
            .get(&key)
            .is_some_and(|t| t.elapsed() < REPORT_EVERY)
        {
            return false;
        }
        self.reported.insert(key, Instant::now());
        true
    }

    /// A deduplicated Event on the Node, then its log line.
    async fn report_node(
        &mut self,
        node_obj: &Node,
        warning: bool,
        reason: &'static str,
        message: String,
    ) {
        if !self.due(reason, &message) {
            return;
        }
        // The Event first, then the log line.
        self.kube
            .event(node_obj, warning, reason, "Reconcile", message.clone())
            .await;
        if warning {
            warn!(reason, "{message}");
        } else {
            info!(reason, "{message}");
        }
    }

    /// A deduplicated Event on a PV (skipped if the PV is gone).
    async fn report_pv(&mut self, pv: &str, warning: bool, reason: &'static str, message: String) {
        if !self.due(reason, &message) {
            return;
        }
        // The Event first, then the log line: whoever reads the log can rely
        // on the Event being there.
        if let Some(obj) = self.kube.get_pv(pv).await {
            self.kube
                .event(&obj, warning, reason, "Reconcile", message.clone())
                .await;
        }
        if warning {
            warn!(pv, reason, "{message}");
        } else {
            info!(pv, reason, "{message}");
        }
    }

    /// Re-verifies, right before acting, that the volume is the one the PV
    /// names and that no pod uses it, then cleans it. Returns a summary.
    fn recycle_blocking(
        &self,
        class: &str,
        method: crate::config::CleanupMethod,
        target: &crate::plan::recycle::Target,
        expected_device_id: Option<&str>,
        expected_fs_uuid: Option<&str>,
    ) -> Result<String, String> {
        use crate::config::CleanupMethod as M;
        use crate::host::{cleanup, BlockDevices, HostTables};
        use crate::plan::recycle::{kubelet_users, Target};

        let inv = Inventory {
            devices: self.devices.list().map_err(|e| e.to_string())?,
            mounts: self.tables.mounts().map_err(|e| e.to_string())?,
            swaps: Vec::new(),
        };
        let users = kubelet_users(target, &inv, &self.cfg.kubelet_dir);
        if let Some(u) = users.first() {
            return Err(format!("still mounted by kubelet at {}", u.display()));
        }
        let dev = inv.devices.iter().find(|d| d.devno == target.devno());
        if let Some(want) = expected_device_id {
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
                devnode,
                fs_type,
                mount_point,
                ..
            } => {
                let Some(dev) = dev else {
                    return Err("the device is gone".into());
                };
                let probe = self.prober.probe(dev);
                let uuid = match &probe {
                    crate::model::Probe::Done { signatures, .. } => {
                        ownership(signatures).and_then(|s| s.uuid.clone())
                    }
                    _ => None,
                };
                if uuid.is_none() || uuid.as_deref() != expected_fs_uuid {
                    return Err(format!(
                        "{} no longer carries disklet filesystem {}",
                        devnode.display(),
                        expected_fs_uuid.unwrap_or("?")
                    ));
                }
                // Only disklet's own mounts may be taken away.
                for m in inv.mounts_of(dev) {
                    if !m.mount_point.starts_with(&self.cfg.host_dir) {
                        return Err(format!(
                            "mounted at {} outside disklet's hostDir",
                            m.mount_point.display()
                        ));
                    }
                }
                crate::failpoint::hit("recycle-before-clean");
                let mut ours: Vec<PathBuf> =
                    inv.mounts_of(dev).map(|m| m.mount_point.clone()).collect();
                ours.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
                for m in &ours {
                    self.mounter.umount(m).map_err(|e| e.to_string())?;
                }
                let _ = mount_point;
                match method {
                    M::Discard => {
                        cleanup::discard_or_zeroout(devnode).map_err(|e| e.to_string())?
                    }
                    M::Zeroout => cleanup::blk_zeroout(devnode).map_err(|e| e.to_string())?,
                    _ => cleanup::wipe_for_reformat(devnode).map_err(|e| e.to_string())?,
                }
                crate::failpoint::hit("recycle-after-wipe");
                if matches!(method, M::Reformat) {
                    let new_uuid = uuid::Uuid::new_v4().to_string();
                    crate::host::format::mkfs_recorded(
                        self.formatter.as_ref(),
                        &self.cfg.host_dir,
                        devnode,
                        *fs_type,
                        &new_uuid,
                        &dev.intent_key(),
                    )
                    .map_err(|e| e.to_string())?;
                    crate::failpoint::hit("recycle-after-mkfs");
                    let target =
                        crate::plan::provision::mount_target(&self.cfg.host_dir, class, &new_uuid);
                    let options = self
                        .classes
                        .classes
                        .iter()
                        .find(|c| c.class.name == class)
                        .map(|c| c.class.mount_options.clone())
                        .unwrap_or_default();
                    self.mounter
                        .mount(devnode, &target, fs_type.as_str(), &options)
                        .map_err(|e| e.to_string())?;
                    make_vol_dir(&target).map_err(|e| e.to_string())?;
                    crate::failpoint::hit("recycle-after-mount");
                    return Ok(format!("new filesystem {new_uuid}"));
                }
                Ok(format!("{} wiped", devnode.display()))
            }
            Target::Raw { devnode, .. } => {
                match method {
                    M::None => {}
                    M::Zeroout => cleanup::blk_zeroout(devnode).map_err(|e| e.to_string())?,
                    _ => cleanup::discard_or_zeroout(devnode).map_err(|e| e.to_string())?,
                }
                Ok(format!("{} {}", devnode.display(), method.as_str()))
            }
            Target::Dir { path, devno } => {
                // Still the mount point of the same filesystem?
                let still = inv
                    .mounts
                    .iter()
                    .rev()
                    .find(|m| &m.mount_point == path)
                    .is_some_and(|m| m.devno == *devno);
                if !still {
                    return Err(format!(
                        "{} is no longer the mount point the PV was published for",
                        path.display()
                    ));
                }
                if method == M::None {
                    return Ok("nothing cleaned".into());
                }
                // Hold the directory, then check it is on the device the
                // table said: nothing can be swapped in between.
                use nix::fcntl::{open, OFlag};
                let fd = open(
                    path.as_path(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
                let st =
                    nix::sys::stat::fstat(&fd).map_err(|e| format!("{}: {e}", path.display()))?;
                let held = DevNo::new(
                    nix::sys::stat::major(st.st_dev) as u32,
                    nix::sys::stat::minor(st.st_dev) as u32,
                );
                if held != *devno {
                    return Err(format!(
                        "{} is on {held}, not {devno}: not the volume the PV was published for",
                        path.display()
                    ));
                }
                let report =
                    crate::host::files::clean_files_at(fd, path).map_err(|e| e.to_string())?;
                if !report.failures.is_empty() || !report.skipped_mounts.is_empty() {
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
                    return Err(format!("{} entries removed, {} not removable, {} nested mounts left; first: {first}", report.removed, report.failures.len(), report.skipped_mounts.len()));
                }
                Ok(format!("{} entries removed", report.removed))
            }
        }
    }

    /// Whether the configured (host) mount table shows `dev` at `target`.
    fn host_sees_mount(&self, target: &Path, dev: &crate::model::Device) -> bool {
        use crate::host::HostTables;
        self.tables
            .mounts()
            .map(|ms| {
                ms.iter()
                    .any(|m| m.mount_point == target && m.devno == dev.devno)
            })
            .unwrap_or(false)
    }

    /// Runs until `shutdown` resolves. Mounts stay in place on exit: pods use them.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ReconcileError> {
        let (tx, mut rx) = mpsc::channel::<Kick>(256);
        events::spawn_device_monitors(&tx);
        if let Err(e) = events::spawn_mount_watch(&self.cfg.mount_info, tx.clone()) {
            warn!(error = %e, "cannot watch the mount table; relying on resync");
        }
        let dirs: Vec<PathBuf> = self
            .cfg
            .classes
            .iter()
            .flat_map(|c| c.discovery_dirs.clone())
            .collect();
        let _dir_watch = events::watch_dirs(&dirs, tx.clone());
        let (pv_tx, mut pv_rx) = mpsc::channel::<()>(16);
        let seen = Arc::new(tokio::sync::Notify::new());
        let (store, drive) = self.kube.pv_reflector(pv_tx, seen.clone());
        let watch = tokio::spawn(drive);
        let fwd_tx = tx.clone();
        let fwd = tokio::spawn(async move {
            while pv_rx.recv().await.is_some() {
                if fwd_tx.send(Kick::Pv).await.is_err() {
                    return;
                }
            }
        });
        // Decisions need the PVs: a pass waits a little for the first list,
        // and fails (with backoff) while there is none.
        let pvs_listed = || async {
            use futures::FutureExt;
            // (a dropped writer is no list either)
            matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
                || matches!(
                    tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready()).await,
                    Ok(Ok(()))
                )
        };

        let resync = Duration::from_secs(self.cfg.resync_seconds);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut wake_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(200);
        let mut kicked = true;
        let mut failures: u32 = 0;
        loop {
            if !kicked {
                let settle = async {
                    match wake_at {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let mut settle = std::pin::pin!(settle);
                let stop = loop {
                    tokio::select! {
                        _ = &mut shutdown => break true,
                        k = rx.recv() => {
                            if k.is_none() { break true }
                            // While backing off after a failure, events do
                            // not cut the wait short: the next pass is due at
                            // `wake_at` anyway and sees them all, and an API
                            // in trouble is not asked again per event.
                            if failures == 0 { break false }
                        }
                        _ = tokio::time::sleep(resync) => break false,
                        _ = &mut settle => break false,
                    }
                };
                if stop {
                    break;
                }
                // Debounce: a burst of events makes one reconcile.
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            kicked = false;
            let mut passes = 0;
            let stopped = loop {
                passes += 1;
                let pass = async {
                    if pvs_listed().await {
                        self.await_own_writes(&store, &seen).await;
                        let pvs: Vec<PersistentVolume> =
                            store.state().iter().map(|p| (**p).clone()).collect();
                        self.reconcile(&pvs).await
                    } else {
                        Err(ReconcileError::PvsNotListed)
                    }
                };
                // A stop is not made to wait for the pass: with a hung API
                // each of its calls would wait out its 60 s deadline, past
                // any grace period. The pass is dropped at its next await,
                // which is always between steps: a host step (mkfs, wipe,
                // mount) runs to its end inside one poll (`block_in_place`).
                // What is left undone is what a SIGKILL would leave, and the
                // next agent finishes it (tests/crash_points.rs).
                let result = tokio::select! {
                    r = pass => r,
                    _ = &mut shutdown => {
                        info!("stopping in the middle of a pass; the next start finishes its work");
                        break true;
                    }
                };
                match result {
                    Ok(o) => {
                        wake_at = o.wake_at;
                        backoff = Duration::from_millis(200);
                        if failures > 0 {
                            info!(failures, "reconcile recovered");
                            failures = 0;
                        }
                        if !self.status.ready.swap(true, Ordering::Relaxed) {
                            info!(actions = o.actions, "ready: first reconcile done");
                        }
                        if !o.host_changed || passes >= 5 {
                            break false;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        self.status.errors.fetch_add(1, Ordering::Relaxed);
                        self.metrics.error(match &e {
                            ReconcileError::Kube(k) => k.kind(),
                            ReconcileError::Host(_) => "host",
                            ReconcileError::PvsNotListed => "pvs-not-listed",
                        });
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconcile failed");
                        wake_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        break false;
                    }
                }
            };
            if stopped {
                break;
            }
        }
        watch.abort();
        fwd.abort();
        Ok(())
    }
}

impl Agent {
    /// Waits (at most `READ_YOUR_WRITES`) until the PV watch shows the PVs
    /// this agent created or deleted in its last pass. Without it a pass
    /// right after one that created a PV may not see it and apply it again
    /// (seen with a slow API server: tests/agent_api_faults.rs).
    async fn await_own_writes(
        &mut self,
        store: &Store<PersistentVolume>,
        seen: &tokio::sync::Notify,
    ) {
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES;
        loop {
            // Registered before the check, so no change is missed between.
            let notified = seen.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            self.written.retain(|w| !w.seen(store));
            if self.written.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                debug!(writes = ?self.written, "the PV watch does not show this agent's last writes yet; deciding without them");
                self.written.clear();
                return;
            }
        }
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
    let vol = crate::plan::provision::vol_dir(mount_point);
    match std::fs::create_dir(&vol) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(crate::host::mounter::MountError::MkDir { path: vol, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
