//! What a tenant of a CSI volume can check, through the real `disklet csi`
//! binary driven over its socket the way kubelet and the sidecars drive it
//! (CreateVolume, NodeStage, NodePublish, ...), on a pool of the test's own
//! (an XFS loop device mounted where the agent would mount it): a snapshot
//! restored and a clone hold the data of their moment and not later writes,
//! checked by content; an online expansion shows in the filesystem's size;
//! a deleted volume's space reads zeroes in the next volume; capacity goes
//! down by what is created and back up on delete.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disklet::csi::proto::controller_client::ControllerClient;
use disklet::csi::proto::node_client::NodeClient;
use disklet::csi::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use disklet::csi::proto::volume_content_source::{SnapshotSource, Type as Src, VolumeSource};
use disklet::csi::proto::*;
use support::csi::create;
use support::*;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

/// A pool mounted at `<dir>/hostdir/pool/<uuid>` and `disklet csi` serving
/// it. Drops in order: the driver, the test's stage and publish mounts, the
/// volumes' loops, the pool's mount, its disk.
struct Rig {
    driver: Child,
    dir: PathBuf,
    _pool_mount: Mounted,
    _disk: Loop,
    _tmp: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        support::agent::MountSweeper(self.dir.join("k")).sweep();
        detach_loops_under(&self.dir.join("hostdir"));
    }
}

async fn rig(
    test: &str,
    mib: u64,
) -> Option<(Rig, ControllerClient<Channel>, NodeClient<Channel>)> {
    if skip_unless_root(test) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let disk = Loop::new(&dir.join("disks"), "pool", mib);
    disk.assert_ours();
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    sh(&[
        "mkfs.xfs",
        "-q",
        "-m",
        "reflink=1",
        "-m",
        &format!("uuid={}", uuid.trim()),
        disk.path(),
    ]);
    let pool_mount = Mounted::new(disk.path(), &dir.join("hostdir/pool").join(uuid.trim()));
    let cfg = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: pool\n    kind: pool\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("csi.yaml"), cfg).unwrap();
    let sock = dir.join("csi.sock");
    let driver = Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args(["csi", "--no-api", "--node-name", "n1"])
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .arg("--config")
        .arg(dir.join("csi.yaml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("csi.log")).unwrap())
        .spawn()
        .unwrap();
    let rig = Rig {
        driver,
        dir: dir.clone(),
        _pool_mount: pool_mount,
        _disk: disk,
        _tmp: tmp,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket: {}",
            std::fs::read_to_string(dir.join("csi.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = support::csi::channel(sock).await;
    Some((
        rig,
        ControllerClient::new(channel.clone()),
        NodeClient::new(channel),
    ))
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

async fn available(c: &mut ControllerClient<Channel>) -> (u64, u64) {
    let r = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    (
        r.available_capacity as u64,
        r.maximum_volume_size.unwrap() as u64,
    )
}

/// Stages and publishes like kubelet: `<dir>/k/<name>/{staging,target}`.
async fn attach(
    n: &mut NodeClient<Channel>,
    dir: &Path,
    v: &Volume,
    cap: &VolumeCapability,
) -> PathBuf {
    let base = dir.join("k").join(&v.volume_id);
    let staging = base.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let target = base.join("target");
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    target
}

async fn detach(n: &mut NodeClient<Channel>, dir: &Path, v: &Volume) {
    let base = dir.join("k").join(&v.volume_id);
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: base.join("target").display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: base.join("staging").display().to_string(),
    })
    .await
    .unwrap();
}

/// Writes `text` to `<target>/data` and makes it durable, as a database would.
fn write(target: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::File::create(target.join("data")).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

fn read(target: &Path) -> String {
    std::fs::read_to_string(target.join("data")).unwrap()
}

fn fs_bytes(target: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(target).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// Grows a published volume to `bytes` as the resizer and kubelet would, and
/// checks the filesystem shows it: through ControllerExpandVolume then
/// NodeExpandVolume, or (`on_node`, the driver's default under per-node
/// resizers) through NodeExpandVolume alone with the new size.
async fn grow(
    c: &mut ControllerClient<Channel>,
    n: &mut NodeClient<Channel>,
    v: &Volume,
    target: &Path,
    cap: &VolumeCapability,
    bytes: u64,
    on_node: bool,
) {
    let small = fs_bytes(target);
    let range = CapacityRange {
        required_bytes: bytes as i64,
        limit_bytes: 0,
    };
    if !on_node {
        let grown = c
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(range),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(grown.node_expansion_required);
        assert_eq!(grown.capacity_bytes as u64, bytes);
    }
    let grown = n
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            capacity_range: on_node.then_some(range),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes as u64, bytes);
    let big = fs_bytes(target);
    let added = bytes - v.capacity_bytes as u64;
    assert!(
        big >= small + added * 9 / 10,
        "filesystem {small} -> {big} bytes after growing by {added}"
    );
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_and_clones_hold_their_moment_and_growth_shows_online() {
    let Some((rig, mut c, mut n)) = rig(
        "snapshots_and_clones_hold_their_moment_and_growth_shows_online",
        1000,
    )
    .await
    else {
        return;
    };
    let (before, _) = available(&mut c).await;
    let cap = mount_cap();
    let a = create(&mut c, "pvc-a", 64 * MIB, cap.clone(), None).await;
    assert_eq!(a.capacity_bytes as u64, 64 * MIB);
    assert_eq!(
        a.accessible_topology[0].segments["kubernetes.io/hostname"],
        "n1"
    );
    let (after, _) = available(&mut c).await;
    assert!(
        before - after >= 64 * MIB,
        "capacity fell by {} only",
        before - after
    );
    let ta = attach(&mut n, &rig.dir, &a, &cap).await;
    write(&ta, "moment one");
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: "snap-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    write(&ta, "written later");

    let restored = create(
        &mut c,
        "pvc-restored",
        64 * MIB,
        cap.clone(),
        Some(Src::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    )
    .await;
    let tr = attach(&mut n, &rig.dir, &restored, &cap).await;
    assert_eq!(
        read(&tr),
        "moment one",
        "the restored snapshot must hold the data of its moment"
    );

    let clone = create(
        &mut c,
        "pvc-clone",
        64 * MIB,
        cap.clone(),
        Some(Src::Volume(VolumeSource {
            volume_id: a.volume_id.clone(),
        })),
    )
    .await;
    let tc = attach(&mut n, &rig.dir, &clone, &cap).await;
    assert_eq!(read(&tc), "written later");
    write(&tc, "the clone's own");
    assert_eq!(
        read(&ta),
        "written later",
        "a write to the clone must not reach its source"
    );
    assert_eq!(read(&tr), "moment one");

    // Online growth: the controller grows the file and the loop device, the
    // node grows the mounted filesystem. XFS (xfs_growfs needs
    // CAP_SYS_ADMIN); ext4's online resize needs CAP_SYS_RESOURCE too,
    // which root lacks on some machines (this CI's VMs): tried when present.
    let xcap = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "xfs".into(),
            ..Default::default()
        })),
    };
    let x = create(&mut c, "pvc-x", 320 * MIB, xcap.clone(), None).await;
    let tx = attach(&mut n, &rig.dir, &x, &xcap).await;
    write(&tx, "before growth");
    grow(&mut c, &mut n, &x, &tx, &xcap, 384 * MIB, false).await;
    assert_eq!(read(&tx), "before growth");
    // And on the node alone, as under the DaemonSet's per-node resizers.
    let x = Volume {
        capacity_bytes: (384 * MIB) as i64,
        ..x
    };
    grow(&mut c, &mut n, &x, &tx, &xcap, 448 * MIB, true).await;
    assert_eq!(read(&tx), "before growth");
    if has_cap_sys_resource() {
        grow(&mut c, &mut n, &a, &ta, &cap, 128 * MIB, true).await;
    } else {
        eprintln!("SKIPPED part of snapshots_and_clones_hold_their_moment_and_growth_shows_online: growing ext4 online: root here lacks CAP_SYS_RESOURCE, which the kernel's ext4 online resize requires (XFS was grown)");
    }
    assert_eq!(read(&ta), "written later");
    let big = fs_bytes(&ta);

    let stats = n
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: a.volume_id.clone(),
            volume_path: ta.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert_eq!(stats.usage[0].total as u64, big);
    assert!(
        stats.usage[0].used > 0 && stats.usage[1].used > 0,
        "{:?}",
        stats.usage
    );

    // Deleting a volume still published is refused: the data is in use.
    let busy = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(busy.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(read(&ta), "written later");

    for v in [&a, &restored, &clone, &x] {
        detach(&mut n, &rig.dir, v).await;
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (end, _) = available(&mut c).await;
    assert!(
        end.abs_diff(before) <= MIB,
        "capacity {before} before, {end} after everything was deleted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volumes_space_reads_zeroes_in_the_next_volume() {
    let Some((rig, mut c, mut n)) = rig(
        "a_deleted_volumes_space_reads_zeroes_in_the_next_volume",
        400,
    )
    .await
    else {
        return;
    };
    // A StorageClass parameter the driver does not know is refused by name,
    // and nothing is taken from the pool.
    let (free, _) = available(&mut c).await;
    let e = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-typo".into(),
            volume_capabilities: vec![block_cap()],
            parameters: [("fsType".to_string(), "xfs".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("\"fsType\""), "{e}");
    assert_eq!(available(&mut c).await.0, free);
    // A restore whose snapshot is in another node's pool (the scheduler put
    // the pod elsewhere): NOT_FOUND, saying where a restore is made.
    let elsewhere = "00000000-0000-4000-8000-000000000000_snap-x";
    let e = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-stray".into(),
            volume_capabilities: vec![block_cap()],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(Src::Snapshot(SnapshotSource {
                    snapshot_id: elsewhere.into(),
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(
        e.message().contains("is not on node n1")
            && e.message()
                .contains("made on the node that holds its source"),
        "{e}"
    );
    assert_eq!(available(&mut c).await.0, free);
    // As big as the pool allows: the next volume must reuse these blocks.
    let (_, max) = available(&mut c).await;
    let size = max / MIB * MIB;
    let cap = block_cap();
    let v = create(&mut c, "pvc-first", size, cap.clone(), None).await;
    let dev = attach(&mut n, &rig.dir, &v, &cap).await;
    let pattern = vec![0xA5u8; MIB as usize];
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        for _ in 0..size / MIB {
            f.write_all(&pattern).unwrap();
        }
        f.sync_all().unwrap();
    }
    detach(&mut n, &rig.dir, &v).await;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, max_again) = available(&mut c).await;
    assert!(
        max_again >= size,
        "the space did not come back: {max_again} < {size}"
    );

    let w = create(&mut c, "pvc-second", size, cap.clone(), None).await;
    let dev = attach(&mut n, &rig.dir, &w, &cap).await;
    let mut f = std::fs::File::open(&dev).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut read_bytes = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        assert!(
            buf[..k].iter().all(|b| *b == 0),
            "the new volume reads old data at {read_bytes}"
        );
        read_bytes += k as u64;
    }
    assert_eq!(read_bytes, size);
}

/// NodeStage makes a filesystem only on a blank volume: one that holds a
/// Block tenant's data, or another filesystem, is refused and left as it is.
#[tokio::test(flavor = "multi_thread")]
async fn stage_never_formats_a_volume_that_holds_data() {
    let Some((rig, mut c, mut n)) = rig("stage_never_formats_a_volume_that_holds_data", 400).await
    else {
        return;
    };
    let block = block_cap();
    let v = create(&mut c, "pvc-raw", 16 * MIB, block.clone(), None).await;
    let dev = attach(&mut n, &rig.dir, &v, &block).await;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        // Data in the middle, no signature anywhere libblkid looks.
        f.seek(SeekFrom::Start(8 * MIB)).unwrap();
        f.write_all(&[0x5Au8; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    let raw = std::fs::read(&dev).unwrap();
    detach(&mut n, &rig.dir, &v).await;
    let staging = rig.dir.join("k").join("raw-as-fs");
    std::fs::create_dir_all(&staging).unwrap();
    let mount = mount_cap();
    let refused = n
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("holds data"),
        "{}",
        refused.message()
    );
    let dev = attach(&mut n, &rig.dir, &v, &block).await;
    assert!(std::fs::read(&dev).unwrap() == raw, "the raw data changed");
    detach(&mut n, &rig.dir, &v).await;

    // Another filesystem than the one asked: refused too.
    let x = create(&mut c, "pvc-ext4", 16 * MIB, mount.clone(), None).await;
    let t = attach(&mut n, &rig.dir, &x, &mount).await;
    write(&t, "ext4 tenant");
    detach(&mut n, &rig.dir, &x).await;
    let xfs = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "xfs".into(),
            ..Default::default()
        })),
    };
    let refused = n
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: x.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(xfs),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let t = attach(&mut n, &rig.dir, &x, &mount).await;
    assert_eq!(read(&t), "ext4 tenant");
}
