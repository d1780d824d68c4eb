//! `cargo bench --bench csi` (root): the CSI driver's own costs, each as a
//! ratio against the physical floor measured in the same run, on a 24 GiB
//! XFS pool (reflink on: a snapshot holds room for every block the volume
//! may still overwrite, so 10 GiB more than the volume) on a loop device of the bench's own, with the
//! driver served in-process over a unix socket and called over gRPC as the
//! sidecars call it.
//!
//! - CreateVolume of 1 GiB (median of 20) against one `fallocate` of 1 GiB
//!   in the same pool (what a create must do at least);
//! - CreateSnapshot of a 10 GiB volume with 5 GiB written (expected O(1))
//!   against a full copy of that volume file (`cp --reflink=never`).
//!
//! - fio through a 2 GiB Block volume (its loop device, direct I/O, as the
//!   driver attaches it) against the raw pool device on the very blocks the
//!   volume's file occupies (the pool unmounted for those rounds):
//!   sequential read and write (1 MiB, depth 8), random read and write
//!   (4 KiB, depth 32), written over once first; raw and volume rounds
//!   alternate, their order flipped every round, `DISKLET_BENCH_FIO_ROUNDS`
//!   (9) rounds of `DISKLET_BENCH_FIO_SECS` (3) s a job, and the ratio
//!   printed is the median of the rounds' own ratios. A host file's speed
//!   drifts by 10% and more within a minute on this machine; one raw run
//!   at the start against one volume run at the end measured the drift.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use disklet::csi::proto::controller_client::ControllerClient;
use disklet::csi::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume,
};
use disklet::csi::proto::*;
use support::*;
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmedian(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The fio jobs: (label, rw, block size, depth).
const FIO_JOBS: [(&str, &str, &str, u32); 4] = [
    ("seq write 1M", "write", "1M", 8),
    ("seq read 1M", "read", "1M", 8),
    ("rand write 4k", "randwrite", "4k", 32),
    ("rand read 4k", "randread", "4k", 32),
];

/// One fio job on `target`, over `bytes` from byte `offset`: MiB/s and IOPS.
fn fio(target: &Path, offset: u64, (rw, bs, depth): (&str, &str, u32), bytes: u64) -> (f64, f64) {
    let secs = std::env::var("DISKLET_BENCH_FIO_SECS").unwrap_or_else(|_| "3".into());
    let out = sh(&[
        "fio",
        "--name=j",
        &format!("--filename={}", target.display()),
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={depth}"),
        &format!("--offset={offset}"),
        &format!("--size={bytes}"),
        "--ioengine=libaio",
        "--direct=1",
        "--time_based",
        &format!("--runtime={secs}"),
        "--output-format=json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let job = &j["jobs"][0];
    let r = if job["read"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
        &job["read"]
    } else {
        &job["write"]
    };
    (
        r["bw"].as_f64().unwrap() / 1024.0,
        r["iops"].as_f64().unwrap(),
    )
}

/// Every fio job on `target` from `offset`: one figure each (MiB/s for the
/// sequential jobs, IOPS for the random ones).
fn fio_round(target: &Path, offset: u64, bytes: u64) -> Vec<f64> {
    FIO_JOBS
        .iter()
        .map(|(label, rw, bs, depth)| {
            let (mib, iops) = fio(target, offset, (rw, bs, *depth), bytes);
            if label.starts_with("seq") {
                mib
            } else {
                iops
            }
        })
        .collect()
}

/// Where the bytes of `file` (on an XFS pool) lie on the pool's device:
/// the byte offset of its one extent.
fn one_extent(file: &Path) -> u64 {
    let out = sh(&["xfs_bmap", file.to_str().unwrap()]);
    let extents: Vec<&str> = out.lines().skip(1).collect();
    // "0: [0..4194303]: 192..4194495", in 512-byte blocks.
    assert!(
        extents.len() == 1 && !extents[0].contains("hole"),
        "the fio volume's file is not one extent, so the raw device cannot be measured on the same blocks: {out}"
    );
    let phys = extents[0].rsplit(": ").next().unwrap();
    let (start, end) = phys.split_once("..").unwrap();
    let (start, end): (u64, u64) = (start.trim().parse().unwrap(), end.trim().parse().unwrap());
    assert!(
        (end + 1 - start) * 512 >= 2 * GIB,
        "the extent is shorter than the volume: {out}"
    );
    start * 512
}

fn cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

async fn client(sock: PathBuf) -> ControllerClient<Channel> {
    ControllerClient::new(support::csi::channel(sock).await)
}

async fn create(c: &mut ControllerClient<Channel>, name: &str, bytes: u64) -> Volume {
    support::csi::create(c, name, bytes, cap(), None).await
}

/// Detaches every loop backed by a file under `dir` (the volumes), on drop.
struct Volumes(PathBuf);

impl Drop for Volumes {
    fn drop(&mut self) {
        detach_loops_under(&self.0);
    }
}

#[tokio::main]
async fn main() {
    if skip_unless_root("bench csi") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk = Loop::new(&dir.join("disks"), "pool", 24 * 1024);
    disk.assert_ours();
    // Direct I/O on the pool disk's own loop too: a real disk has no page
    // cache in front of it, and without it the "raw device" here would be
    // the host's RAM, flattering nothing but the extra layer's CPU cost.
    sh(&["losetup", "--direct-io=on", disk.path()]);
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    let uuid = uuid.trim();
    sh(&[
        "mkfs.xfs",
        "-q",
        "-m",
        "reflink=1",
        "-m",
        &format!("uuid={uuid}"),
        disk.path(),
    ]);
    let mount = dir.join("hostdir/pool").join(uuid);
    let _mounted = Mounted::new(disk.path(), &mount);
    let _volumes = Volumes(dir.join("hostdir"));
    let cfg = disklet::config::Config::parse(&format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: pool\n    kind: pool\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    ))
    .unwrap();
    let node = disklet::csi::NodeFacts {
        name: "bench".into(),
        topology: [("kubernetes.io/hostname".to_string(), "bench".to_string())].into(),
        max_volumes: 1000,
    };
    let driver = disklet::csi::Driver::new(
        "csi.disklet.io".into(),
        cfg,
        node,
        disklet::csi::Expansion::Controller,
    );
    let sock = dir.join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        disklet::csi::serve(driver, &endpoint, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = client(sock).await;

    // CreateVolume against fallocate, alternated.
    let (mut creates, mut floors) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let t = Instant::now();
        let v = create(&mut c, &format!("pvc-{i}"), GIB).await;
        creates.push(t.elapsed());
        let f = mount.join(format!("floor-{i}"));
        let t = Instant::now();
        sh(&["fallocate", "-l", &GIB.to_string(), f.to_str().unwrap()]);
        floors.push(t.elapsed());
        std::fs::remove_file(&f).unwrap();
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (cv, fl) = (median(creates), median(floors));
    println!(
        "CreateVolume 1 GiB: median {:.2} ms; fallocate 1 GiB (the floor, a process like the driver's own steps): {:.2} ms; ratio {:.2}",
        ms(cv),
        ms(fl),
        cv.as_secs_f64() / fl.as_secs_f64()
    );

    // A 10 GiB volume with 5 GiB written, then its snapshot against a copy.
    let v = create(&mut c, "pvc-big", 10 * GIB).await;
    let id = v.volume_id.split_once('_').unwrap().1.to_string();
    let file = mount.join("pool/volumes").join(&id);
    let dev = disklet::host::pool::attach(&file).unwrap();
    sh(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={}", dev.display()),
        "bs=4M",
        "count=1280",
        "oflag=direct",
        "status=none",
    ]);
    disklet::host::pool::detach(&dev).unwrap();
    // The pool's own disk is a buffered loop on the host: its 5 GiB of dirty
    // pages would otherwise be flushed by whichever fsync comes next.
    sh(&["sync"]);
    let t = Instant::now();
    c.create_snapshot(CreateSnapshotRequest {
        source_volume_id: v.volume_id.clone(),
        name: "snap-big".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = t.elapsed();
    let copy = mount.join("copy");
    let t = Instant::now();
    sh(&[
        "cp",
        "--reflink=never",
        "--sparse=always",
        file.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    sh(&["sync", "-f", copy.to_str().unwrap()]);
    let full = t.elapsed();
    println!(
        "CreateSnapshot of 10 GiB with 5 GiB written: {:.2} ms; full copy (cp --reflink=never): {:.0} ms; ratio {:.4}",
        ms(snap),
        ms(full),
        snap.as_secs_f64() / full.as_secs_f64()
    );
    std::fs::remove_file(&copy).unwrap();
    // The kernel's own reflink of the same file: the floor of a snapshot.
    let rl = mount.join("reflink");
    let t = Instant::now();
    sh(&[
        "cp",
        "--reflink=always",
        file.to_str().unwrap(),
        rl.to_str().unwrap(),
    ]);
    sh(&["sync", "-f", rl.to_str().unwrap()]);
    let floor = t.elapsed();
    let extents = sh(&["xfs_bmap", file.to_str().unwrap()])
        .lines()
        .count()
        .saturating_sub(1);
    println!(
        "  the kernel's reflink of the same file (cp --reflink=always): {:.2} ms, {extents} extents; CreateSnapshot / reflink {:.2}",
        ms(floor),
        snap.as_secs_f64() / floor.as_secs_f64()
    );
    std::fs::remove_file(&rl).unwrap();

    // A volume's I/O against the raw pool device's on the same blocks.
    if Command::new("fio").arg("--version").output().is_ok() {
        let v = create(&mut c, "pvc-fio", 2 * GIB).await;
        let id = v.volume_id.split_once('_').unwrap().1.to_string();
        let file = mount.join("pool/volumes").join(&id);
        let dev = disklet::host::pool::attach(&file).unwrap();
        sh(&[
            "dd",
            "if=/dev/zero",
            &format!("of={}", dev.display()),
            "bs=4M",
            &format!("count={}", (2 * GIB) >> 22),
            "oflag=direct",
            "status=none",
        ]);
        disklet::host::pool::detach(&dev).unwrap();
        let offset = one_extent(&file);
        let rounds: usize = std::env::var("DISKLET_BENCH_FIO_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(9)
            .max(1);
        let (mut raw, mut vol) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for raw_now in [round % 2 == 0, round % 2 == 1] {
                if raw_now {
                    sh(&["umount", mount.to_str().unwrap()]);
                    raw.push(fio_round(Path::new(disk.path()), offset, 2 * GIB));
                    sh(&["mount", disk.path(), mount.to_str().unwrap()]);
                } else {
                    let dev = disklet::host::pool::attach(&file).unwrap();
                    vol.push(fio_round(&dev, 0, 2 * GIB));
                    disklet::host::pool::detach(&dev).unwrap();
                }
            }
        }
        println!(
            "fio, a 2 GiB volume (loop on a pool file, direct I/O) against the raw pool device on the same blocks, {rounds} alternating rounds (medians):"
        );
        for (j, (label, ..)) in FIO_JOBS.iter().enumerate() {
            let unit = if label.starts_with("seq") {
                "MiB/s"
            } else {
                "IOPS"
            };
            let col = |m: &[Vec<f64>]| m.iter().map(|r| r[j]).collect::<Vec<_>>();
            let mut ratios: Vec<f64> = raw.iter().zip(&vol).map(|(r, v)| v[j] / r[j]).collect();
            ratios.sort_by(f64::total_cmp);
            println!(
                "  {label}: volume {:.0} {unit}, raw {:.0} {unit}; ratio {:.2} (rounds {:.2} to {:.2})",
                fmedian(col(&vol)),
                fmedian(col(&raw)),
                fmedian(ratios.clone()),
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
    } else {
        println!("SKIPPED fio: fio is not installed (scripts/setup-debian.sh installs it)");
    }
    let _ = stop.send(());
    server.await.unwrap();
}
