//! `cargo bench --bench recycle` (root): how long recycling a Filesystem
//! volume takes with each clean method, on xfs on a loop device over a ~3 GiB
//! sparse file in a temp dir, for two datasets:
//!   100k: 100,000 files of 1 KiB in 100 directories;
//!   2g:   one 2 GiB file of real (written, non-zero) data.
//! Methods, each on freshly populated data:
//!   rm -rf:   `rm -rf -- <vol>/*`, as the static provisioner does (baseline);
//!   files:    `disklet::host::files::clean_files(vol)`;
//!   reformat: umount, `cleanup::wipe_for_reformat`, `mkfs.xfs` with a new
//!             UUID through `MkfsFormatter`, mount, recreate `vol`.
//! Before each measurement the data is synced and, when writable,
//! `/proc/sys/vm/drop_caches` gets 3 (cold caches for every method alike).
//! Each line also gives the `sync` that follows, to count deferred writeback.
//!
//! `RECYCLE_RUNS=n` repeats every measurement n times and prints the median.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use disklet::config::FsType;
use disklet::host::cleanup::wipe_for_reformat;
use disklet::host::files::clean_files;
use disklet::host::format::{Formatter, MkfsFormatter};
use disklet::host::mounter::{Mounter, SysMounter};
use support::{have, skip_unless_root, Loop, Mounted};

const IMAGE_MIB: u64 = 3 * 1024;
const DIRS: usize = 100;
const FILES_PER_DIR: usize = 1000;
const BIG_MIB: usize = 2048;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dataset {
    Small,
    Big,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Small => "100k",
            Dataset::Big => "2g",
        }
    }

    fn entries(self) -> u64 {
        match self {
            Dataset::Small => (DIRS * (FILES_PER_DIR + 1)) as u64,
            Dataset::Big => 1,
        }
    }

    fn populate(self, vol: &Path) {
        match self {
            Dataset::Small => {
                let mut data = [0u8; 1024];
                for d in 0..DIRS {
                    let dir = vol.join(format!("d{d:03}"));
                    fs::create_dir(&dir).unwrap();
                    for f in 0..FILES_PER_DIR {
                        fill(&mut data, (d * FILES_PER_DIR + f) as u64);
                        fs::write(dir.join(format!("f{f:04}")), data).unwrap();
                    }
                }
            }
            Dataset::Big => {
                let mut f = fs::File::create(vol.join("big")).unwrap();
                let mut chunk = vec![0u8; 1 << 20];
                for i in 0..BIG_MIB {
                    fill(&mut chunk, i as u64);
                    f.write_all(&chunk).unwrap();
                }
                f.sync_all().unwrap();
            }
        }
    }
}

/// Non-zero pseudo-random bytes (xorshift64), different per seed.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_ne_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    RmRf,
    Files,
    Reformat,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::RmRf => "rm -rf",
            Method::Files => "files",
            Method::Reformat => "reformat",
        }
    }
}

struct Bench {
    dev: PathBuf,
    mnt: PathBuf,
    vol: PathBuf,
    drop_caches: bool,
}

impl Bench {
    /// `sync`, then drop the page cache, dentries and inodes if allowed.
    fn settle(&self) {
        nix::unistd::sync();
        if self.drop_caches {
            fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
    }

    fn format_and_mount(&self) {
        let uuid = uuid::Uuid::new_v4().to_string();
        MkfsFormatter::default()
            .mkfs(&self.dev, FsType::Xfs, &uuid)
            .unwrap();
        SysMounter.mount(&self.dev, &self.mnt, "xfs", &[]).unwrap();
        fs::create_dir(&self.vol).unwrap();
    }

    /// Populates, settles, and times one method; returns (method, sync after).
    fn measure(&self, ds: Dataset, m: Method) -> (Duration, Duration) {
        ds.populate(&self.vol);
        self.settle();
        let t0 = Instant::now();
        match m {
            Method::RmRf => {
                let entries: Vec<PathBuf> = fs::read_dir(&self.vol)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                let st = Command::new("rm")
                    .arg("-rf")
                    .arg("--")
                    .args(&entries)
                    .status()
                    .unwrap();
                assert!(st.success(), "rm -rf failed");
            }
            Method::Files => {
                let r = clean_files(&self.vol).unwrap();
                assert!(r.is_clean(), "{r:?}");
                assert_eq!(r.removed, ds.entries());
            }
            Method::Reformat => {
                SysMounter.umount(&self.mnt).unwrap();
                wipe_for_reformat(&self.dev).unwrap();
                self.format_and_mount();
            }
        }
        let took = t0.elapsed();
        let t1 = Instant::now();
        nix::unistd::sync();
        let sync = t1.elapsed();
        assert_eq!(fs::read_dir(&self.vol).unwrap().count(), 0, "{}", m.name());
        (took, sync)
    }
}

fn median(mut v: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if skip_unless_root("recycle bench") {
        return;
    }
    for tool in ["mkfs.xfs", "wipefs", "rm"] {
        if !have(tool) {
            eprintln!("SKIPPED recycle bench: {tool} not installed");
            return;
        }
    }
    let runs: usize = std::env::var("RECYCLE_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let dir = tempfile::tempdir().unwrap();
    let lp = Loop::new(dir.path(), "recycle", IMAGE_MIB);
    lp.assert_ours();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let bench = Bench {
        dev: lp.dev.clone(),
        vol: mnt.join("vol"),
        mnt,
        drop_caches: fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/vm/drop_caches")
            .is_ok(),
    };
    // Unmounts before the loop is detached, also on a panic mid-reformat
    // (harmless when nothing is mounted there).
    let _mounted = Mounted(bench.mnt.clone());
    bench.format_and_mount();

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "recycle: xfs on {} over a {} GiB sparse file in {}; Linux {}; {} run(s) per line, median",
        lp.path(),
        IMAGE_MIB / 1024,
        dir.path().display(),
        kernel.trim(),
        runs
    );
    println!(
        "caches: {}",
        if bench.drop_caches {
            "sync + echo 3 > /proc/sys/vm/drop_caches before each measurement (cold dentries, inodes and pages)"
        } else {
            "sync before each measurement; /proc/sys/vm/drop_caches is not writable, so caches are warm"
        }
    );
    let t0 = Instant::now();
    let st = Command::new("rm").arg("-rf").arg("--").status().unwrap();
    assert!(st.success());
    println!(
        "times are until the method returns; '+sync' is the sync(2) right after it; rm -rf includes its fork+exec (an empty `rm -rf --`: {:.4} s)",
        t0.elapsed().as_secs_f64()
    );
    for ds in [Dataset::Small, Dataset::Big] {
        let mut base = None;
        for m in [Method::RmRf, Method::Files, Method::Reformat] {
            let samples: Vec<_> = (0..runs).map(|_| bench.measure(ds, m)).collect();
            let (took, sync) = median(samples);
            let base = *base.get_or_insert(took);
            println!(
                "{} {}: {:.4} s ({:.2}x rm -rf), +sync {:.4} s",
                m.name(),
                ds.name(),
                took.as_secs_f64(),
                took.as_secs_f64() / base.as_secs_f64(),
                sync.as_secs_f64()
            );
        }
    }
}
