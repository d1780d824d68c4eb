//! Probe results kept between passes, for devices that have not changed.
//!
//! A result is used again only while everything that could mean new content
//! is as it was when the device was probed: its device number, disk sequence
//! number (a new medium, a loop attached again), size, the kernel's count of
//! writes and discards completed on it (`/sys/class/block/<dev>/stat`; a
//! partition's writes count on its disk too), and the number of udev or
//! kernel events seen for it. The key is read *before* the probe, so a write
//! that lands during the probe changes the key the next pass reads. Entries
//! older than `max_age` (`reprobeSeconds`) are read again, and a failed or
//! skipped probe is never kept.
//!
//! This serves the passes' observation only. Every destructive step still
//! probes afresh, with the device's page cache dropped, under its flock
//! (`host::format`): a cached "blank" can at worst propose a format that the
//! fresh look then refuses, which is what a write past this host's block
//! layer (another host on a shared disk, a loop's backing file written
//! directly) looks like.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::host::Prober;
use crate::model::{DevNo, Device, Exclusive, Probe};

/// Events seen per device (kernel name), bumped by the device monitors.
#[derive(Debug, Default)]
pub struct DeviceEvents(Mutex<HashMap<String, u64>>);

impl DeviceEvents {
    pub fn bump(&self, name: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(name.to_string()).or_default() += 1;
        }
    }

    pub fn count(&self, name: &str) -> u64 {
        self.0
            .lock()
            .map_or(0, |m| m.get(name).copied().unwrap_or(0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    devno: DevNo,
    diskseq: Option<u64>,
    size: u64,
    io: [u64; 3],
    events: u64,
}

/// Writes completed, sectors written and discards completed, from a
/// block device's `stat` (Documentation/block/stat.rst: fields 5, 7, 12;
/// kernels before 4.18 have no discard fields, read as 0).
pub fn write_counters(stat: &str) -> Option<[u64; 3]> {
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    Some([*f.get(4)?, *f.get(6)?, f.get(11).copied().unwrap_or(0)])
}

/// The probe cache; see the module doc.
#[derive(Debug)]
pub struct ProbeCache {
    entries: Mutex<HashMap<String, (Key, Probe, Instant)>>,
    pub max_age: Duration,
    pub events: std::sync::Arc<DeviceEvents>,
    sysfs: std::path::PathBuf,
    /// Probes answered from the cache, and probes that read the device.
    pub hits: AtomicU64,
    pub reads: AtomicU64,
}

impl ProbeCache {
    pub fn new(max_age: Duration, events: std::sync::Arc<DeviceEvents>) -> ProbeCache {
        ProbeCache {
            entries: Mutex::new(HashMap::new()),
            max_age,
            events,
            sysfs: "/sys/class/block".into(),
            hits: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// The same cache over another sysfs block dir (tests).
    pub fn with_sysfs(mut self, dir: &Path) -> ProbeCache {
        self.sysfs = dir.to_path_buf();
        self
    }

    fn key(&self, dev: &Device) -> Option<Key> {
        let stat = std::fs::read_to_string(self.sysfs.join(&dev.name).join("stat")).ok()?;
        Some(Key {
            devno: dev.devno,
            diskseq: dev.diskseq,
            size: dev.size_bytes,
            io: write_counters(&stat)?,
            events: self.events.count(&dev.name),
        })
    }

    /// Drops what is kept of `name` (after a format refused on fresh data:
    /// the next pass reads it again).
    pub fn forget(&self, name: &str) {
        if let Ok(mut m) = self.entries.lock() {
            m.remove(name);
        }
    }

    /// Drops entries of devices not in `names` (gone from the node).
    pub fn retain(&self, names: &[&str]) {
        if let Ok(mut m) = self.entries.lock() {
            m.retain(|k, _| names.contains(&k.as_str()));
        }
    }

    /// `inner`'s probes through this cache.
    pub fn over<'a>(&'a self, inner: &'a dyn Prober) -> Cached<'a> {
        Cached { cache: self, inner }
    }

    fn probe(&self, dev: &Device, inner: &dyn Prober) -> Probe {
        let key = self.key(dev);
        if let (Some(k), Ok(m)) = (&key, self.entries.lock()) {
            if let Some((old, probe, at)) = m.get(&dev.name) {
                if old == k && at.elapsed() < self.max_age {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return probe.clone();
                }
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let probe = inner.probe(dev);
        if let (Some(k), Probe::Done { .. }) = (key, &probe) {
            if let Ok(mut m) = self.entries.lock() {
                m.insert(dev.name.clone(), (k, probe.clone(), Instant::now()));
            }
        } else {
            self.forget(&dev.name);
        }
        probe
    }
}

/// A prober whose probes go through a [`ProbeCache`]; the exclusive-open
/// test is never cached (it follows mounts and holders, and costs one open).
pub struct Cached<'a> {
    cache: &'a ProbeCache,
    inner: &'a dyn Prober,
}

impl Prober for Cached<'_> {
    fn probe(&self, dev: &Device) -> Probe {
        self.cache.probe(dev, self.inner)
    }

    fn exclusive(&self, dev: &Device) -> Exclusive {
        self.inner.exclusive(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeProber, ProberCall};
    use crate::model::{DeviceKind, Signature};
    use std::sync::Arc;

    /// How many times `inner` read a device's contents.
    fn probes(inner: &FakeProber) -> usize {
        inner
            .calls()
            .iter()
            .filter(|c| matches!(c, ProberCall::Probe(_)))
            .count()
    }

    fn stat(dir: &Path, name: &str, writes: u64) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let s = format!("10 0 80 5 {writes} 0 {} 7 0 9 12 0 0 0 0 0 0\n", writes * 8);
        std::fs::write(dir.join(name).join("stat"), s).unwrap();
    }

    #[test]
    fn the_stat_fields_are_writes_sectors_and_discards() {
        let s =
            "  4116  0  303442  1084  1700  1200  98000  5500  0  2000  6600  3  0  24  0  0  0\n";
        assert_eq!(write_counters(s), Some([1700, 98000, 3]));
        assert_eq!(write_counters("1 2 3 4 5 6 7 8 9 10 11\n"), Some([5, 7, 0]));
        assert_eq!(write_counters("1 2 3"), None);
        assert_eq!(write_counters("1 2 3 4 x 6 7"), None);
    }

    #[test]
    fn a_result_is_used_again_only_while_nothing_about_the_device_moved() {
        let dir = tempfile::tempdir().unwrap();
        let events = Arc::new(DeviceEvents::default());
        let cache =
            ProbeCache::new(Duration::from_secs(600), events.clone()).with_sysfs(dir.path());
        let inner = FakeProber::default();
        let p = cache.over(&inner);
        let mut dev = Device::new("loop7", DevNo { major: 7, minor: 7 }, DeviceKind::Loop);
        dev.size_bytes = 1 << 30;
        dev.diskseq = Some(40);
        stat(dir.path(), "loop7", 1);
        let reads = |n| assert_eq!(probes(&inner), n);
        p.probe(&dev);
        p.probe(&dev);
        reads(1);
        stat(dir.path(), "loop7", 2);
        p.probe(&dev);
        reads(2);
        events.bump("loop7");
        p.probe(&dev);
        reads(3);
        dev.diskseq = Some(41);
        p.probe(&dev);
        reads(4);
        dev.size_bytes += 4096;
        p.probe(&dev);
        reads(5);
        dev.devno.minor = 8;
        p.probe(&dev);
        reads(6);
        p.probe(&dev);
        reads(6);
        cache.forget("loop7");
        p.probe(&dev);
        reads(7);
        events.bump("loop8");
        p.probe(&dev);
        reads(7);
        assert_eq!(cache.hits.load(Ordering::SeqCst), 3);
        // No stat to read: never cached.
        let other = Device::new("sdz", DevNo { major: 8, minor: 0 }, DeviceKind::Disk);
        p.probe(&other);
        p.probe(&other);
        reads(9);
    }

    #[test]
    fn failures_are_never_kept_and_old_entries_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ProbeCache::new(Duration::ZERO, Arc::default()).with_sysfs(dir.path());
        let inner = FakeProber::default();
        let p = cache.over(&inner);
        let mut dev = Device::new("loop3", DevNo { major: 7, minor: 3 }, DeviceKind::Loop);
        dev.size_bytes = 1 << 30;
        stat(dir.path(), "loop3", 0);
        p.probe(&dev);
        p.probe(&dev);
        assert_eq!(probes(&inner), 2, "max age 0: always read");
        // The same cache serves whichever prober it is put over: first one
        // whose read fails, then one that finds an xfs.
        let cache =
            ProbeCache::new(Duration::from_secs(600), Arc::default()).with_sysfs(dir.path());
        let failing = FakeProber {
            probes: [(
                "loop3".to_string(),
                Probe::Failed {
                    error: "EIO".into(),
                },
            )]
            .into(),
            ..FakeProber::default()
        };
        cache.over(&failing).probe(&dev);
        let xfs = FakeProber {
            probes: [(
                "loop3".to_string(),
                Probe::Done {
                    signatures: vec![Signature {
                        kind: "xfs".into(),
                        offset: 0,
                        uuid: None,
                        label: None,
                        in_progress: false,
                    }],
                    zeroed: None,
                },
            )]
            .into(),
            ..FakeProber::default()
        };
        let p = cache.over(&xfs);
        assert!(
            matches!(p.probe(&dev), Probe::Done { .. }),
            "the failure was not kept"
        );
        assert_eq!(probes(&failing) + probes(&xfs), 2);
        assert!(matches!(p.probe(&dev), Probe::Done { .. }));
        assert_eq!(probes(&xfs), 1, "the success was");
    }
}
