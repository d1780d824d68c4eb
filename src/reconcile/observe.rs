//! Observation: devices, decisions (with settle times), mount facts,
//! discovery dirs, and the StorageClasses the plan needs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Agent, Observed};
use crate::host::{dirs, HostError};
use crate::k8s::client::KubeError;
use crate::model::{DirEntry, Fingerprint, Inventory, PendingReason, ScInfo};
use crate::plan::Verdict;

impl Agent {
    /// Devices, decisions (with settle times), mount facts and discovery dirs.
    pub fn observe(&mut self) -> Result<Observed, HostError> {
        let started = Instant::now();
        let (mut inv, entries) = self.snapshot()?;
        let now = Instant::now();
        let listed = now;
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
        let probes = self.probes.over(&self.prober);
        let decisions =
            crate::scan::decide_all_aged(&mut inv, &self.cfg, &self.classes, &probes, &|d| {
                Some(now.saturating_duration_since(since(d)))
            });
        let decided = Instant::now();
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
        let mounts = self.mount_facts(&inv);
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        debug!(
            devices = inv.devices.len(),
            snapshot_ms = ms(started, listed),
            decide_ms = ms(listed, decided),
            rest_ms = ms(decided, Instant::now()),
            "observe timing"
        );
        Ok(Observed {
            inv,
            decisions,
            mounts,
            dirs: entries,
            wake_at,
        })
    }

    /// The facts of every mount of hostDir's filesystems.
    fn mount_facts(
        &self,
        inv: &Inventory,
    ) -> BTreeMap<std::path::PathBuf, crate::model::MountFact> {
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
        mounts
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
                &self.probes.over(&self.prober),
                &self.tables,
                Some(&self.classes),
            )?;
            let names: Vec<&str> = inv.devices.iter().map(|d| d.name.as_str()).collect();
            self.probes.retain(&names);
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

    pub(super) async fn storage_classes(
        &self,
    ) -> Result<BTreeMap<String, Option<ScInfo>>, KubeError> {
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
}
