//! Provisioning handlers: format a blank disk behind the interlocks, mount
//! a filesystem of ours, make the volume directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use super::{Agent, Observed};
use crate::config::Config;
use crate::config::FsType;
use crate::host::format::{format_safely, FormatError, FormatRequest, Host, NotEligible};
use crate::host::Prober;
use crate::model::reasons::event;
use crate::model::{ownership, Fingerprint};
use crate::model::{Device, Inventory};
use crate::plan::eligibility::still_eligible;
use crate::plan::{Classes, NodeFacts};

/// One `Action::Format` of a pass.
pub(super) struct FormatJob {
    pub device: String,
    pub class: String,
    pub fs: FsType,
    pub fingerprint: Fingerprint,
}

impl Agent {
    /// A pass's `Action::Format`s: different disks formatted at once, at
    /// most `formatConcurrency` of them, each under every interlock of
    /// `format_safely` (its flock, fresh probe, fingerprint and eligibility
    /// checks, format record). Devices of one disk (partitions, the disk
    /// itself) are never formatted at once. Returns whether the host changed.
    pub(super) async fn formats(
        &mut self,
        jobs: Vec<FormatJob>,
        observed: &Observed,
        node_obj: &Node,
    ) -> bool {
        let results = tokio::task::block_in_place(|| self.format_all(&jobs, observed));
        let mut changed = false;
        for (job, (r, took)) in jobs.into_iter().zip(results) {
            // Formatted or refused on fresh data: either way what the cache
            // holds of the device is no longer to be trusted.
            self.probes.forget(&job.device);
            self.metrics.format_seconds.observe(took.as_secs_f64());
            changed |= self.formatted(job, r, took, node_obj).await;
        }
        changed
    }

    /// Runs `jobs` on up to `formatConcurrency` threads, one disk's jobs in
    /// order on one thread; the results in the order of `jobs`.
    fn format_all(
        &self,
        jobs: &[FormatJob],
        observed: &Observed,
    ) -> Vec<(Result<String, FormatError>, Duration)> {
        let one = |job: &FormatJob| {
            let started = Instant::now();
            let host = Host {
                devices: &self.devices,
                prober: &self.prober,
                tables: &self.tables,
            };
            let recheck = format_recheck(&self.cfg, &self.classes, &job.class);
            let req = FormatRequest {
                device: &job.device,
                seen: &observed.inv.devices,
                planned: &job.fingerprint,
                fs: job.fs,
                host_dir: &self.cfg.host_dir,
            };
            let r = format_safely(&req, &host, self.formatter.as_ref(), &recheck);
            (r, started.elapsed())
        };
        let groups = by_disk(jobs, &observed.inv);
        let workers = self.cfg.format_concurrency as usize;
        bounded(&groups, workers, |i| one(&jobs[i]))
    }

    /// Logs and reports one format's result; returns whether the host changed.
    async fn formatted(
        &mut self,
        job: FormatJob,
        r: Result<String, FormatError>,
        took: Duration,
        node_obj: &Node,
    ) -> bool {
        let FormatJob {
            device,
            class,
            fs,
            fingerprint,
        } = job;
        match r {
            Ok(uuid) => {
                info!(
                    device,
                    class,
                    fs = fs.as_str(),
                    uuid,
                    ms = took.as_millis() as u64,
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

/// `work(i)` for every index of every group, on at most `workers` threads
/// (none of its own for one worker or one group): one group's indices in
/// order on one thread, groups taken in order as threads come free. The
/// results in index order.
pub(super) fn bounded<R: Send>(
    groups: &[Vec<usize>],
    workers: usize,
    work: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    let workers = workers.clamp(1, groups.len().max(1));
    let mut done: Vec<(usize, R)> = if workers == 1 {
        groups.iter().flatten().map(|&i| (i, work(i))).collect()
    } else {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        while let Some(g) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                            done.extend(g.iter().map(|&i| (i, work(i))));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Indices of `jobs` grouped by the whole disk each device is on (a
/// partition's parent, else the device), in the order of `jobs`.
fn by_disk(jobs: &[FormatJob], inv: &Inventory) -> Vec<Vec<usize>> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let disk = inv
            .device(&job.device)
            .and_then(|d| d.parent.clone())
            .unwrap_or_else(|| job.device.clone());
        match groups.iter_mut().find(|(d, _)| *d == disk) {
            Some((_, g)) => g.push(i),
            None => groups.push((disk, vec![i])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
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

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use super::{bounded, by_disk, FormatJob};
    use crate::config::FsType;
    use crate::model::{DevNo, Device, DeviceKind, Fingerprint, Inventory};

    /// In flight now, most in flight ever, threads seen; `work` holds each
    /// call until `meet` calls have been in flight together (or 10 s pass).
    #[derive(Default)]
    struct Gauge {
        state: Mutex<(usize, usize, Vec<std::thread::ThreadId>)>,
        cv: Condvar,
    }

    impl Gauge {
        fn work(&self, meet: usize) -> bool {
            let mut s = self.state.lock().unwrap();
            s.0 += 1;
            s.1 = s.1.max(s.0);
            let me = std::thread::current().id();
            if !s.2.contains(&me) {
                s.2.push(me);
            }
            self.cv.notify_all();
            let (mut s, waited) = self
                .cv
                .wait_timeout_while(s, Duration::from_secs(10), |s| s.1 < meet)
                .unwrap();
            s.0 -= 1;
            !waited.timed_out()
        }
    }

    #[test]
    fn formats_run_at_once_up_to_the_limit_and_no_further() {
        let g = Gauge::default();
        let groups: Vec<Vec<usize>> = (0..6).map(|i| vec![i]).collect();
        // No call returns before 3 have been in flight together.
        let met = bounded(&groups, 3, |i| (i, g.work(3)));
        assert_eq!(met, (0..6).map(|i| (i, true)).collect::<Vec<_>>());
        let s = g.state.lock().unwrap();
        assert_eq!(s.1, 3, "3 in flight at once, never more");
        assert_eq!(s.2.len(), 3, "3 threads");
        // One worker: in order on the caller's own thread.
        let here = std::thread::current().id();
        let order = bounded(&groups, 1, |i| (i, std::thread::current().id() == here));
        assert_eq!(order, (0..6).map(|i| (i, true)).collect::<Vec<_>>());
    }

    #[test]
    fn devices_of_one_disk_are_formatted_one_after_the_other() {
        let part = |name: &str, minor| {
            let mut d = Device::new(name, DevNo { major: 8, minor }, DeviceKind::Partition);
            d.parent = Some("sda".into());
            d
        };
        let inv = Inventory {
            devices: vec![
                Device::new("sda", DevNo { major: 8, minor: 0 }, DeviceKind::Disk),
                part("sda1", 1),
                part("sda2", 2),
                Device::new(
                    "sdb",
                    DevNo {
                        major: 8,
                        minor: 16,
                    },
                    DeviceKind::Disk,
                ),
            ],
            ..Inventory::default()
        };
        let job = |device: &str| FormatJob {
            device: device.into(),
            class: "fast".into(),
            fs: FsType::Xfs,
            fingerprint: Fingerprint::of(inv.device(device).unwrap(), &inv),
        };
        let jobs = vec![job("sda1"), job("sdb"), job("sda2"), job("sda")];
        assert_eq!(by_disk(&jobs, &inv), vec![vec![0, 2, 3], vec![1]]);
        // A group's jobs on one thread, in order, while the other group runs.
        let log = Mutex::new(Vec::new());
        bounded(&by_disk(&jobs, &inv), 8, |i| {
            log.lock().unwrap().push((i, std::thread::current().id()));
        });
        let log = log.into_inner().unwrap();
        let sda: Vec<_> = log.iter().filter(|(i, _)| *i != 1).collect();
        assert_eq!(sda.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2, 3]);
        assert!(sda.iter().all(|(_, t)| *t == sda[0].1));
    }
}
