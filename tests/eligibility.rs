//! Table and property tests of the eligibility decision (pure: no root, no
//! devices). Every reason code has a row; the properties check that nothing
//! carrying data, in use or undecided is ever `eligible`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use disklet::config::Config;
use disklet::model::{
    DevNo, Device, DeviceKind, Exclusive, FormatIntent, Inventory, MountEntry, Probe, Signature,
    SwapEntry, UdevState, OWNER_LABEL,
};
use disklet::model::{PendingReason, Reason};
use disklet::plan::{evaluate, Classes, Decision, NodeFacts, Verdict};
use proptest::prelude::*;

const CONFIG: &str = r#"
hostDir: /var/lib/disklet
kubeletDir: /var/lib/kubelet
classes:
  - name: fast
    settleSeconds: 5
    selector:
      paths: ["/dev/sdx", "/dev/sdx1", "/dev/disk/by-id/wwn-0x5000*"]
      types: [disk]
      minSize: 1Gi
      maxSize: 1Ti
"#;

fn classes(text: &str) -> (Config, Classes) {
    let cfg = Config::parse(text).unwrap();
    let c = Classes::compile(&cfg).unwrap();
    (cfg, c)
}

/// A blank, unused, dedicated 100 GiB disk: eligible.
fn blank() -> Device {
    let mut d = Device::new("sdx", DevNo::new(8, 16), DeviceKind::Disk);
    d.size_bytes = 100 << 30;
    d.rotational = Some(false);
    d.probe = Probe::Done {
        signatures: vec![],
        zeroed: Some(true),
    };
    d.exclusive = Exclusive::Free;
    d
}

fn sig(kind: &str) -> Signature {
    Signature {
        kind: kind.into(),
        offset: 0,
        uuid: Some("1234".into()),
        label: None,
        in_progress: false,
    }
}

fn mount(devno: DevNo, source: &str, at: &str) -> MountEntry {
    MountEntry {
        mount_id: 100,
        parent_id: 1,
        devno,
        root: "/".into(),
        mount_point: at.into(),
        options: "rw".into(),
        fs_type: "ext4".into(),
        source: source.into(),
    }
}

fn root_on(devno: DevNo, source: &str) -> MountEntry {
    mount(devno, source, "/")
}

/// Root on a separate OS disk, so the inventory is realistic.
fn inventory(devices: Vec<Device>, mut mounts: Vec<MountEntry>) -> Inventory {
    let mut os = Device::new("vda", DevNo::new(254, 0), DeviceKind::Disk);
    os.size_bytes = 50 << 30;
    let mut all = vec![os];
    all.extend(devices);
    if !mounts
        .iter()
        .any(|m| m.mount_point.as_path() == std::path::Path::new("/"))
    {
        mounts.push(root_on(DevNo::new(254, 0), "/dev/vda"));
    }
    Inventory {
        devices: all,
        mounts,
        swaps: vec![],
    }
}

fn decide_in(text: &str, inv: &Inventory, name: &str, stable: Option<Duration>) -> Decision {
    let (cfg, c) = classes(text);
    let facts = NodeFacts::new(inv, &cfg.host_dir, &cfg.kubelet_dir);
    evaluate(inv.device(name).unwrap(), inv, &c, &facts, stable)
}

fn decide(inv: &Inventory) -> Decision {
    decide_in(CONFIG, inv, "sdx", None)
}

fn one(d: Device) -> Inventory {
    inventory(vec![d], vec![])
}

fn refused(r: Reason) -> Verdict {
    Verdict::Refused { reason: r }
}

#[test]
fn a_blank_dedicated_disk_is_eligible() {
    let d = decide(&one(blank()));
    assert_eq!(d.verdict, Verdict::Eligible);
    assert_eq!(d.class.as_deref(), Some("fast"));
}

#[test]
fn every_reason_code_in_a_table() {
    type Case = (
        &'static str,
        Box<dyn Fn() -> Inventory>,
        Reason,
        &'static str,
    );
    let with = |f: fn(&mut Device)| -> Box<dyn Fn() -> Inventory> {
        Box::new(move || {
            let mut d = blank();
            f(&mut d);
            one(d)
        })
    };
    let cases: Vec<Case> = vec![
        (
            "not named by any selector",
            with(|d| d.devnode = "/dev/sdy".into()),
            Reason::NoClassMatches,
            "",
        ),
        (
            "partition",
            Box::new(|| {
                let mut disk = blank();
                disk.name = "sdz".into();
                disk.devnode = "/dev/sdz".into();
                disk.devno = DevNo::new(8, 32);
                disk.partitions = vec!["sdx".into()];
                let mut p = blank();
                p.kind = DeviceKind::Partition;
                p.parent = Some("sdz".into());
                inventory(vec![disk, p], vec![])
            }),
            Reason::Partition,
            "partition of sdz",
        ),
        (
            "loop not listed",
            with(|d| d.kind = DeviceKind::Loop),
            Reason::TypeNotAllowed,
            "loop",
        ),
        (
            "dm not listed",
            with(|d| d.kind = DeviceKind::Dm),
            Reason::TypeNotAllowed,
            "dm",
        ),
        (
            "md not listed",
            with(|d| d.kind = DeviceKind::Md),
            Reason::TypeNotAllowed,
            "md",
        ),
        (
            "rbd not listed",
            with(|d| d.kind = DeviceKind::Rbd),
            Reason::TypeNotAllowed,
            "rbd",
        ),
        (
            "nbd not listed",
            with(|d| d.kind = DeviceKind::Nbd),
            Reason::TypeNotAllowed,
            "nbd",
        ),
        (
            "zram not listed",
            with(|d| d.kind = DeviceKind::Zram),
            Reason::TypeNotAllowed,
            "zram",
        ),
        (
            "sr not listed",
            with(|d| d.kind = DeviceKind::Rom),
            Reason::TypeNotAllowed,
            "rom",
        ),
        ("hidden", with(|d| d.hidden = true), Reason::Hidden, ""),
        (
            "read-only",
            with(|d| d.read_only = true),
            Reason::ReadOnly,
            "",
        ),
        (
            "removable",
            with(|d| d.removable = true),
            Reason::Removable,
            "removable: true",
        ),
        (
            "root on its partition",
            Box::new(|| {
                let mut d = blank();
                d.partitions = vec!["sdx1".into()];
                let mut p = Device::new("sdx1", DevNo::new(8, 17), DeviceKind::Partition);
                p.parent = Some("sdx".into());
                inventory(vec![d, p], vec![root_on(DevNo::new(8, 17), "/dev/sdx1")])
            }),
            Reason::OsDisk,
            "holds /",
        ),
        (
            "root on a dm over the disk",
            Box::new(|| {
                let mut d = blank();
                d.holders = vec!["dm-0".into()];
                let mut dm = Device::new("dm-0", DevNo::new(253, 0), DeviceKind::Dm);
                dm.slaves = vec!["sdx".into()];
                inventory(
                    vec![d, dm],
                    vec![root_on(DevNo::new(253, 0), "/dev/mapper/vg-root")],
                )
            }),
            Reason::OsDisk,
            "holds /",
        ),
        (
            "holds /boot",
            Box::new(|| {
                inventory(
                    vec![blank()],
                    vec![mount(DevNo::new(8, 16), "/dev/sdx", "/boot")],
                )
            }),
            Reason::OsDisk,
            "holds /boot",
        ),
        (
            "holds the kubelet dir",
            Box::new(|| {
                inventory(
                    vec![blank()],
                    vec![mount(DevNo::new(8, 16), "/dev/sdx", "/var/lib")],
                )
            }),
            Reason::OsDisk,
            "/var/lib/kubelet",
        ),
        (
            "holds the hostDir",
            Box::new(|| {
                inventory(
                    vec![blank()],
                    vec![mount(DevNo::new(8, 16), "/dev/sdx", "/var/lib/disklet")],
                )
            }),
            Reason::OsDisk,
            "/var/lib/disklet",
        ),
        (
            "holders",
            with(|d| d.holders = vec!["md0".into()]),
            Reason::HasHolders,
            "md0",
        ),
        (
            "partitions",
            with(|d| d.partitions = vec!["sdx1".into()]),
            Reason::HasPartitions,
            "sdx1",
        ),
        (
            "active swap",
            Box::new(|| {
                let mut inv = one(blank());
                inv.swaps.push(SwapEntry {
                    path: "/dev/sdx".into(),
                    kind: "partition".into(),
                    devno: Some(DevNo::new(8, 16)),
                });
                inv
            }),
            Reason::Swap,
            "",
        ),
        (
            "mounted",
            Box::new(|| {
                inventory(
                    vec![blank()],
                    vec![mount(DevNo::new(8, 16), "/dev/sdx", "/mnt/data")],
                )
            }),
            Reason::Mounted,
            "/mnt/data",
        ),
        (
            "bind-mounted subdirectory",
            Box::new(|| {
                let mut m = mount(DevNo::new(8, 16), "/dev/sdx", "/srv/x");
                m.root = "/sub".into();
                inventory(vec![blank()], vec![m])
            }),
            Reason::Mounted,
            "/srv/x",
        ),
        (
            "btrfs mount with an anonymous devno",
            Box::new(|| {
                inventory(
                    vec![blank()],
                    vec![mount(DevNo::new(0, 45), "/dev/sdx", "/srv/btrfs")],
                )
            }),
            Reason::Mounted,
            "/srv/btrfs",
        ),
        (
            "mounted through a by-id link",
            Box::new(|| {
                let mut d = blank();
                d.links = vec!["/dev/disk/by-id/wwn-0x5000abc".into()];
                inventory(
                    vec![d],
                    vec![mount(
                        DevNo::new(0, 46),
                        "/dev/disk/by-id/wwn-0x5000abc",
                        "/data",
                    )],
                )
            }),
            Reason::Mounted,
            "/data",
        ),
        (
            "same WWN as another disk",
            Box::new(|| {
                let mut a = blank();
                a.wwid = Some("naa.5000c500".into());
                let mut b = blank();
                b.name = "sdy".into();
                b.devnode = "/dev/sdy".into();
                b.devno = DevNo::new(8, 48);
                b.wwid = a.wwid.clone();
                inventory(vec![a, b], vec![])
            }),
            Reason::DuplicateIdentity,
            "same WWN as /dev/sdy",
        ),
        (
            "same filesystem UUID as another device",
            Box::new(|| {
                let mut a = blank();
                a.probe = Probe::Done {
                    signatures: vec![Signature {
                        label: Some(OWNER_LABEL.into()),
                        ..sig("xfs")
                    }],
                    zeroed: None,
                };
                let mut b = a.clone();
                b.name = "loop9".into();
                b.devnode = "/dev/loop9".into();
                b.devno = DevNo::new(7, 9);
                b.kind = DeviceKind::Loop;
                inventory(vec![a, b], vec![])
            }),
            Reason::DuplicateIdentity,
            "filesystem UUID",
        ),
        (
            "two loops over one file",
            Box::new(|| {
                let mut a = blank();
                a.loop_backing_file = Some("/srv/disk.img".into());
                let mut b = a.clone();
                b.name = "loop9".into();
                b.devnode = "/dev/loop9".into();
                b.devno = DevNo::new(7, 9);
                inventory(vec![a, b], vec![])
            }),
            Reason::DuplicateIdentity,
            "loop backing file",
        ),
        (
            "probe failed",
            with(|d| {
                d.probe = Probe::Failed {
                    error: "EIO".into(),
                }
            }),
            Reason::ProbeFailed,
            "EIO",
        ),
        (
            "not probed",
            with(|d| d.probe = Probe::NotProbed),
            Reason::ProbeFailed,
            "",
        ),
        (
            "gpt",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("PMBR"), sig("gpt"), sig("gpt")],
                    zeroed: None,
                }
            }),
            Reason::PartitionTable,
            "gpt",
        ),
        (
            "dos",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("dos")],
                    zeroed: None,
                }
            }),
            Reason::PartitionTable,
            "dos",
        ),
        (
            "ext4",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("ext4")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "ext4",
        ),
        (
            "xfs",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("xfs")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "xfs",
        ),
        (
            "btrfs",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("btrfs")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "btrfs",
        ),
        (
            "swap signature",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("swap")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "swap",
        ),
        (
            "LUKS",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("crypto_LUKS")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "crypto_LUKS",
        ),
        (
            "LVM",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("LVM2_member")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "LVM2_member",
        ),
        (
            "md RAID",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("linux_raid_member")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "linux_raid_member",
        ),
        (
            "ZFS",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![sig("zfs_member")],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "zfs_member",
        ),
        (
            "our label on btrfs is not ours",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![Signature {
                        label: Some(OWNER_LABEL.into()),
                        ..sig("btrfs")
                    }],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "btrfs",
        ),
        (
            "our xfs plus another signature",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![
                        Signature {
                            label: Some(OWNER_LABEL.into()),
                            ..sig("xfs")
                        },
                        sig("LVM2_member"),
                    ],
                    zeroed: None,
                }
            }),
            Reason::ForeignFilesystem,
            "xfs",
        ),
        (
            "data without a signature",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![],
                    zeroed: Some(false),
                }
            }),
            Reason::UnknownData,
            "blkdiscard",
        ),
        (
            "zero check not made",
            with(|d| {
                d.probe = Probe::Done {
                    signatures: vec![],
                    zeroed: None,
                }
            }),
            Reason::UnknownData,
            "",
        ),
        (
            "too small",
            with(|d| d.size_bytes = (1 << 30) - 1),
            Reason::TooSmall,
            "minSize 1.0 GiB",
        ),
        (
            "too large",
            with(|d| d.size_bytes = (1 << 40) + 1),
            Reason::TooLarge,
            "maxSize 1.0 TiB",
        ),
        (
            "busy",
            with(|d| d.exclusive = Exclusive::Busy),
            Reason::Busy,
            "EBUSY",
        ),
        (
            "exclusive open failed",
            with(|d| {
                d.exclusive = Exclusive::Failed {
                    error: "EACCES".into(),
                }
            }),
            Reason::Busy,
            "EACCES",
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (name, inv, want, detail) in cases {
        let d = decide(&inv());
        assert_eq!(d.verdict, refused(want), "case {name:?}: {d:?}");
        let got = d.detail.clone().unwrap_or_default();
        assert!(
            got.contains(detail),
            "case {name:?}: detail {got:?} lacks {detail:?}"
        );
        seen.insert(want);
    }
    for r in Reason::ALL {
        assert!(seen.contains(&r), "no case for {}", r.as_str());
    }
}

#[test]
fn reason_codes_are_kebab_case_and_serialise_as_such() {
    for r in Reason::ALL {
        let s = r.as_str();
        assert!(s.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{s}");
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::Value::String(s.into())
        );
    }
}

#[test]
fn allowed_kinds_and_removable_when_listed() {
    let text = CONFIG
        .replace("types: [disk]", "types: [disk, loop, part]")
        .replace("maxSize: 1Ti", "maxSize: 1Ti\n      removable: true");
    for kind in [DeviceKind::Loop, DeviceKind::Partition] {
        let mut d = blank();
        d.kind = kind;
        d.removable = true;
        assert_eq!(
            decide_in(&text, &one(d), "sdx", None).verdict,
            Verdict::Eligible,
            "{kind}"
        );
    }
}

#[test]
fn blank_check_signatures_accepts_leftover_data() {
    let text = CONFIG.replace(
        "settleSeconds: 5",
        "settleSeconds: 5\n    blankCheck: signatures",
    );
    let mut d = blank();
    d.probe = Probe::Done {
        signatures: vec![],
        zeroed: Some(false),
    };
    assert_eq!(
        decide_in(&text, &one(d), "sdx", None).verdict,
        Verdict::Eligible
    );
}

#[test]
fn pending_states() {
    let mut d = blank();
    d.udev = UdevState::NotProcessed;
    assert_eq!(
        decide(&one(d)).verdict,
        Verdict::Pending {
            reason: PendingReason::UdevNotProcessed
        }
    );

    let mut d = blank();
    d.udev = UdevState::NotProcessed;
    assert_eq!(
        decide_in("classes: []", &one(d), "sdx", None).verdict,
        refused(Reason::NoClassMatches),
        "with no class at all there is nothing to wait for"
    );

    let mut d = blank();
    d.exclusive = Exclusive::NotChecked;
    assert_eq!(
        decide(&one(d)).verdict,
        Verdict::Pending {
            reason: PendingReason::ExclusiveNotChecked
        }
    );

    let inv = one(blank());
    let young = decide_in(CONFIG, &inv, "sdx", Some(Duration::from_secs(4)));
    assert_eq!(
        young.verdict,
        Verdict::Pending {
            reason: PendingReason::Settling
        }
    );
    assert!(young.detail.unwrap().contains("of 5s"));
    assert_eq!(
        decide_in(CONFIG, &inv, "sdx", Some(Duration::from_secs(5))).verdict,
        Verdict::Eligible
    );
}

#[test]
fn udev_properties_select_only_when_udev_processed_the_device() {
    let text = "classes: [{name: tagged, selector: {udev: {DISKLET_CLASS: fast}}}]";
    let mut d = blank();
    assert_eq!(
        decide_in(text, &one(d.clone()), "sdx", None).verdict,
        refused(Reason::NoClassMatches)
    );
    d.udev = UdevState::Processed {
        properties: [("DISKLET_CLASS".into(), "fast".into())].into(),
    };
    assert_eq!(
        decide_in(text, &one(d), "sdx", None).verdict,
        Verdict::Eligible
    );
}

fn ours(uuid: &str) -> Device {
    let mut d = blank();
    d.probe = Probe::Done {
        signatures: vec![Signature {
            kind: "xfs".into(),
            offset: 0,
            uuid: Some(uuid.into()),
            label: Some(OWNER_LABEL.into()),
            in_progress: false,
        }],
        zeroed: None,
    };
    d
}

#[test]
fn a_disklet_filesystem_is_ours_and_never_eligible() {
    let d = decide(&one(ours("u1")));
    assert_eq!(
        d.verdict,
        Verdict::Ours {
            fs_type: "xfs".into(),
            uuid: Some("u1".into())
        }
    );

    // Mounted by us under hostDir, with kubelet's bind mount of it: still ours,
    // and the failing exclusive open (the mount holds it) does not matter.
    let mut d = ours("u1");
    d.exclusive = Exclusive::Busy;
    let inv = inventory(
        vec![d],
        vec![
            mount(DevNo::new(8, 16), "/dev/sdx", "/var/lib/disklet/fast/wwn-1"),
            mount(
                DevNo::new(8, 16),
                "/dev/sdx",
                "/var/lib/kubelet/pods/u/volumes/kubernetes.io~local-volume/pv",
            ),
        ],
    );
    assert!(matches!(decide(&inv).verdict, Verdict::Ours { .. }));

    // Mounted by another CSI driver under the kubelet dir: not ours to use.
    let inv = inventory(
        vec![ours("u1")],
        vec![mount(
            DevNo::new(8, 16),
            "/dev/sdx",
            "/var/lib/kubelet/plugins/kubernetes.io/csi/ebs/globalmount",
        )],
    );
    assert_eq!(decide(&inv).verdict, refused(Reason::Mounted));

    // Mounted anywhere else: refused.
    let inv = inventory(
        vec![ours("u1")],
        vec![mount(DevNo::new(8, 16), "/dev/sdx", "/mnt/elsewhere")],
    );
    assert_eq!(decide(&inv).verdict, refused(Reason::Mounted));

    // Unmounted but someone holds it.
    let mut d = ours("u1");
    d.exclusive = Exclusive::Busy;
    assert_eq!(decide(&one(d)).verdict, refused(Reason::Busy));

    // An ext4 of ours too, and size limits do not withdraw an adopted disk.
    let mut d = ours("u2");
    d.size_bytes = 1 << 20;
    if let Probe::Done { signatures, .. } = &mut d.probe {
        signatures[0].kind = "ext4".into();
    }
    assert!(matches!(decide(&one(d)).verdict, Verdict::Ours { .. }));
}

#[test]
fn first_class_in_config_order_wins() {
    let text = r#"
classes:
  - {name: one, selector: {paths: ["/dev/sd*"], minSize: 200Gi}}
  - {name: two, selector: {paths: ["/dev/sdx"]}}
"#;
    let d = decide_in(text, &one(blank()), "sdx", None);
    assert_eq!(d.class.as_deref(), Some("one"));
    assert_eq!(
        d.verdict,
        refused(Reason::TooSmall),
        "the first class that names a disk decides it"
    );
}

// ---------------------------------------------------------------- properties

fn arb_signature() -> impl Strategy<Value = Signature> {
    (
        prop::sample::select(vec![
            "ext4",
            "xfs",
            "btrfs",
            "swap",
            "crypto_LUKS",
            "LVM2_member",
            "linux_raid_member",
            "gpt",
            "dos",
            "PMBR",
            "zfs_member",
            "bcache",
            "vfat",
            "ntfs",
            "ceph_bluestore",
        ]),
        prop::option::of(prop::sample::select(vec![OWNER_LABEL, "data", ""])),
        any::<bool>(),
    )
        .prop_map(|(k, l, in_progress)| Signature {
            kind: k.into(),
            offset: 0,
            uuid: Some("u".into()),
            label: l.map(Into::into),
            in_progress,
        })
}

#[derive(Debug, Clone)]
struct World {
    dev: Device,
    mounted_at: Option<&'static str>,
    mount_by_source: bool,
    swap: bool,
    stable: Option<u64>,
}

/// Each way a device can be unfit is drawn independently and rarely (about
/// one draw in eight), so most worlds have zero or one fault: the property then
/// sees both eligible devices and every single fault next to them.
fn rarely<T: std::fmt::Debug + Clone + 'static>(
    good: T,
    bad: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![7 => Just(good), 1 => bad].boxed()
}

fn arb_world() -> impl Strategy<Value = World> {
    (
        (
            rarely(
                DeviceKind::Disk,
                prop::sample::select(vec![
                    DeviceKind::Loop,
                    DeviceKind::Partition,
                    DeviceKind::Dm,
                    DeviceKind::Md,
                    DeviceKind::Zram,
                ]),
            ),
            rarely(vec![], prop::collection::vec(arb_signature(), 1..3)),
            rarely(Some(true), prop::sample::select(vec![None, Some(false)])),
            rarely(
                "free",
                prop::sample::select(vec!["busy", "unchecked", "failed"]),
            ),
            rarely("done", prop::sample::select(vec!["failed", "none"])),
            rarely(false, Just(true)),
            rarely(false, Just(true)),
            rarely(false, Just(true)),
        ),
        (
            rarely(vec![], prop::collection::vec("[a-z]{3}[0-9]", 1..2)),
            rarely(vec![], prop::collection::vec("[a-z]{3}[0-9]", 1..2)),
            rarely(
                None,
                prop::option::of(prop::sample::select(vec![
                    "/mnt/x",
                    "/var/lib/disklet/fast/a",
                    "/var/lib/kubelet/pods/p/volumes/v",
                    "/",
                ])),
            ),
            any::<bool>(),
            rarely(false, Just(true)),
            rarely(100u64 << 30, 0u64..(4 << 40)),
            rarely(None, prop::option::of(0u64..10)),
            rarely(
                "not-running",
                prop::sample::select(vec!["not-processed", "processed"]),
            ),
        ),
    )
        .prop_map(
            |(
                (kind, sigs, zeroed, ex, probe, ro, removable, hidden),
                (holders, parts, mounted_at, by_source, swap, size, stable, udev),
            )| {
                let mut d = blank();
                d.kind = kind;
                if kind == DeviceKind::Partition {
                    d.parent = Some("sdq".into());
                }
                d.size_bytes = size;
                d.read_only = ro;
                d.removable = removable;
                d.hidden = hidden;
                d.holders = holders;
                d.partitions = parts;
                d.exclusive = match ex {
                    "free" => Exclusive::Free,
                    "busy" => Exclusive::Busy,
                    "failed" => Exclusive::Failed { error: "x".into() },
                    _ => Exclusive::NotChecked,
                };
                d.probe = match probe {
                    "done" => Probe::Done {
                        signatures: sigs,
                        zeroed,
                    },
                    "failed" => Probe::Failed { error: "x".into() },
                    _ => Probe::NotProbed,
                };
                d.udev = match udev {
                    "not-processed" => UdevState::NotProcessed,
                    "processed" => UdevState::Processed {
                        properties: Default::default(),
                    },
                    _ => UdevState::NotRunning,
                };
                World {
                    dev: d,
                    mounted_at,
                    mount_by_source: by_source,
                    swap,
                    stable,
                }
            },
        )
}

const PERMISSIVE: &str = r#"
classes:
  - name: any
    blankCheck: signatures
    selector:
      paths: ["/dev/sdx"]
      types: [disk, loop, part, dm, md, zram]
      removable: true
"#;

fn world_inventory(w: &World) -> Inventory {
    let mut mounts = vec![];
    if let Some(at) = w.mounted_at {
        let devno = if w.mount_by_source {
            DevNo::new(0, 99)
        } else {
            w.dev.devno
        };
        mounts.push(mount(devno, "/dev/sdx", at));
    }
    let mut inv = inventory(vec![w.dev.clone()], mounts);
    if w.swap {
        inv.swaps.push(SwapEntry {
            path: "/dev/sdx".into(),
            kind: "partition".into(),
            devno: Some(w.dev.devno),
        });
    }
    inv
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Nothing with a signature, holder, partition, mount, swap, or any
    /// unknown is ever eligible, under the strict and the most permissive config.
    #[test]
    fn nothing_in_use_or_with_data_is_ever_eligible(w in arb_world(), permissive in any::<bool>()) {
        let inv = world_inventory(&w);
        let text = if permissive { PERMISSIVE } else { CONFIG };
        let d = decide_in(text, &inv, "sdx", w.stable.map(Duration::from_secs));
        if d.verdict == Verdict::Eligible {
            let dev = &w.dev;
            // No format was recorded as started here, so not even the
            // remains of an unfinished mkfs.xfs labelled ours qualify.
            prop_assert!(dev.signatures().is_empty(), "signature: {:?}", dev.probe);
            prop_assert!(matches!(dev.probe, Probe::Done { .. }), "probe not done");
            prop_assert!(dev.holders.is_empty());
            prop_assert!(dev.partitions.is_empty());
            prop_assert!(w.mounted_at.is_none());
            prop_assert!(!w.swap);
            prop_assert!(!dev.read_only && !dev.hidden);
            prop_assert_eq!(&dev.exclusive, &Exclusive::Free);
            prop_assert!(dev.udev != UdevState::NotProcessed);
            prop_assert!(w.stable.is_none_or(|s| s >= 5) || permissive);
            if !permissive {
                prop_assert_eq!(dev.kind, DeviceKind::Disk);
                prop_assert!(!dev.removable);
                prop_assert!(matches!(dev.probe, Probe::Done { zeroed: Some(true), .. }), "not zeroed");
                prop_assert!(dev.size_bytes >= 1 << 30 && dev.size_bytes <= 1 << 40);
            }
        }
    }

    /// `ours` needs exactly one disklet-labelled xfs/ext4 and no foreign mount.
    #[test]
    fn ours_only_with_our_single_signature(w in arb_world()) {
        let inv = world_inventory(&w);
        let d = decide_in(PERMISSIVE, &inv, "sdx", None);
        if let Verdict::Ours { .. } = d.verdict {
            let s = w.dev.signatures();
            prop_assert_eq!(s.len(), 1);
            prop_assert!(s[0].kind == "xfs" || s[0].kind == "ext4");
            prop_assert_eq!(s[0].label.as_deref(), Some(OWNER_LABEL));
            prop_assert!(!s[0].in_progress, "an unfinished mkfs is never mounted");
            if let Some(at) = w.mounted_at {
                prop_assert!(at.starts_with("/var/lib/disklet") || at.starts_with("/var/lib/kubelet"));
            }
        }
    }

    /// A device no selector names is refused whatever its state.
    #[test]
    fn unnamed_devices_are_never_touched(w in arb_world()) {
        let mut w = w;
        w.dev.name = "sdq".into();
        w.dev.devnode = "/dev/sdq".into();
        let inv = world_inventory(&w);
        let d = decide_in(PERMISSIVE, &inv, "sdq", None);
        let ok = d.verdict == refused(Reason::NoClassMatches)
            || d.verdict == (Verdict::Pending { reason: PendingReason::UdevNotProcessed });
        prop_assert!(ok, "{:?}", d.verdict);
    }
}

/// The remains of a mkfs.xfs of disklet's that never finished (our label, the
/// superblock still "in progress") are formatted again like a blank disk,
/// but only when disklet recorded starting that very mkfs on that very disk:
/// an aborted xfs_copy of one of our disks looks the same and holds data.
#[test]
fn only_the_remains_of_a_mkfs_disklet_recorded_starting_are_formatted_again() {
    const UUID: &str = "6a1f3c84-3c39-4c8e-a5f0-8b1d2b7f0c11";
    let unfinished = Signature {
        label: Some(OWNER_LABEL.into()),
        in_progress: true,
        uuid: Some(UUID.into()),
        ..sig("xfs")
    };
    let with = |sigs: Vec<Signature>| {
        let mut d = blank();
        d.wwid = Some("0x5000c500a1b2c3d4".into());
        d.probe = Probe::Done {
            signatures: sigs,
            zeroed: None,
        };
        d
    };
    let record = |uuid: &str, key: &str| FormatIntent {
        uuid: uuid.into(),
        device_key: key.into(),
    };
    let key = with(vec![]).intent_key();
    assert_eq!(key, "wwn:0x5000c500a1b2c3d4");
    let decide_with = |text: &str, d: Device, intents: Vec<FormatIntent>, stable: Duration| {
        let inv = one(d);
        let (cfg, c) = classes(text);
        let facts = NodeFacts::new(&inv, &cfg.host_dir, &cfg.kubelet_dir).with_intents(intents);
        evaluate(inv.device("sdx").unwrap(), &inv, &c, &facts, Some(stable))
    };
    let settled = Duration::from_secs(60);
    let ours = || vec![record(UUID, &key)];

    let d = decide_with(CONFIG, with(vec![unfinished.clone()]), ours(), settled);
    assert_eq!(d.verdict, Verdict::Eligible, "{d:?}");
    assert!(d.detail.unwrap().contains("never finished"));
    assert!(disklet::model::ownership(std::slice::from_ref(&unfinished)).is_none());

    // Without the record, or with a record of another mkfs or another disk:
    // somebody else's (an aborted xfs_copy carries our label too).
    for (intents, why) in [
        (vec![], "no record"),
        (
            vec![record("0b7c1a2e-9d4f-4e3b-8a61-2f5c7d9e1b33", &key)],
            "another filesystem",
        ),
        (vec![record(UUID, "wwn:0x5000c500ffffffff")], "another disk"),
    ] {
        let d = decide_with(CONFIG, with(vec![unfinished.clone()]), intents, settled);
        assert_eq!(
            d.verdict,
            refused(Reason::ForeignFilesystem),
            "{why}: {d:?}"
        );
        assert!(d.detail.unwrap().contains("own record"), "{why}");
    }
    // A disk known only by its kernel name: after a reboot the name may
    // belong to another disk, so its record allows nothing.
    let mut nameless = with(vec![unfinished.clone()]);
    nameless.wwid = None;
    assert_eq!(nameless.intent_key(), "name:sdx");
    let d = decide_with(CONFIG, nameless, vec![record(UUID, "name:sdx")], settled);
    assert_eq!(d.verdict, refused(Reason::ForeignFilesystem), "{d:?}");
    // Still settling.
    let d = decide_with(
        CONFIG,
        with(vec![unfinished.clone()]),
        ours(),
        Duration::ZERO,
    );
    assert_eq!(
        d.verdict,
        Verdict::Pending {
            reason: PendingReason::Settling
        }
    );
    // Held exclusively: a mkfs of a killed agent still running.
    let mut busy = with(vec![unfinished.clone()]);
    busy.exclusive = Exclusive::Busy;
    assert_eq!(
        decide_with(CONFIG, busy, ours(), settled).verdict,
        refused(Reason::Busy)
    );
    // Anything else that resembles it stays refused, record or not.
    let finished = Signature {
        in_progress: false,
        ..unfinished.clone()
    };
    let cases = [
        (
            vec![Signature {
                label: Some("data".into()),
                ..unfinished.clone()
            }],
            "another label",
        ),
        (
            vec![Signature {
                kind: "ext4".into(),
                ..unfinished.clone()
            }],
            "not an xfs",
        ),
        (
            vec![Signature {
                offset: 4096,
                ..unfinished.clone()
            }],
            "not at the start",
        ),
        (
            vec![unfinished.clone(), sig("LVM2_member")],
            "with another signature",
        ),
    ];
    for (sigs, why) in cases {
        let d = decide_with(CONFIG, with(sigs), ours(), settled);
        assert!(matches!(d.verdict, Verdict::Refused { .. }), "{why}: {d:?}");
    }
    assert!(matches!(
        decide_with(CONFIG, with(vec![finished]), ours(), settled).verdict,
        Verdict::Ours { .. }
    ));
    // A class that does not format would hand the remains to a pod.
    for extra in ["    volumeMode: Block\n", "    publishFsType: true\n"] {
        let text = CONFIG.replace(
            "    settleSeconds: 5\n",
            &format!("    settleSeconds: 5\n{extra}"),
        );
        assert_ne!(text, CONFIG);
        let d = decide_with(&text, with(vec![unfinished.clone()]), ours(), settled);
        assert_eq!(
            d.verdict,
            refused(Reason::ForeignFilesystem),
            "{extra}: {d:?}"
        );
    }
}
