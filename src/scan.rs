//! `disklet scan`: observe every block device, decide each one, report.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::Config;
use crate::host::{BlockDevices, HostError, HostTables, Prober};
use crate::model::PendingReason;
use crate::model::{format_bytes, Device, DirEntryKind, Inventory, Signature, UdevState};
use crate::plan::{evaluate, Classes, Decision, NodeFacts, Verdict};

/// One device in the report. The JSON field names are a stable interface.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub device: PathBuf,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size_bytes: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwid: Option<String>,
    /// The most stable identity known (`wwn:`, `serial:`, `by-id:`, `loop-file:`).
    pub identity: Option<String>,
    pub links: Vec<PathBuf>,
    pub class: Option<String>,
    pub verdict: &'static str,
    pub reason: Option<&'static str>,
    pub detail: Option<String>,
    /// The first signature found (`ext4`, `gpt`, ...), null when blank.
    pub signature: Option<String>,
    pub signatures: Vec<Signature>,
    /// Why the contents could not be probed, if they could not.
    pub probe_error: Option<String>,
    /// `not-running`, `not-processed` or `processed`; `not-applicable` for
    /// discovery-dir rows.
    pub udev: &'static str,
}

impl Row {
    fn new(d: &Device, decision: &Decision) -> Row {
        // sysfs first; udev fills in what sysfs lacks (loop, virtio, USB bridges).
        let prop = |k: &str| d.udev_properties().and_then(|p| p.get(k).cloned());
        Row {
            device: d.devnode.clone(),
            name: d.name.clone(),
            kind: d.kind.as_str().into(),
            size_bytes: d.size_bytes,
            model: d.model.clone().or_else(|| prop("ID_MODEL")),
            serial: d.serial.clone().or_else(|| prop("ID_SERIAL")),
            wwid: d.wwid.clone().or_else(|| prop("ID_WWN")),
            identity: d.identity(),
            links: d.links.clone(),
            class: decision.class.clone(),
            verdict: decision.verdict.name(),
            reason: decision.verdict.reason_code(),
            detail: decision.detail.clone(),
            signature: d.signatures().first().map(|s| s.kind.clone()),
            signatures: d.signatures().to_vec(),
            probe_error: match &d.probe {
                crate::model::Probe::Failed { error } => Some(error.clone()),
                _ => None,
            },
            udev: match d.udev {
                UdevState::NotRunning => "not-running",
                UdevState::NotProcessed => "not-processed",
                UdevState::Processed { .. } => "processed",
            },
        }
    }
}

impl Row {
    fn dir(
        path: PathBuf,
        kind: &str,
        class: &str,
        size_bytes: u64,
        refusal: Option<(&'static str, String)>,
    ) -> Row {
        let (verdict, reason, detail) = match refusal {
            None => (
                "eligible",
                None,
                Some("published as is, never formatted".to_string()),
            ),
            Some((code, detail)) => ("refused", Some(code), Some(detail)),
        };
        Row {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            identity: Some(format!("dir:{}", path.to_string_lossy())),
            device: path,
            kind: kind.into(),
            size_bytes,
            model: None,
            serial: None,
            wwid: None,
            links: Vec::new(),
            class: Some(class.to_string()),
            verdict,
            reason,
            detail,
            signature: None,
            signatures: Vec::new(),
            probe_error: None,
            udev: "not-applicable",
        }
    }
}

/// Observes the node: devices with their contents probed, mounts, swaps.
/// Probes run on a few threads (each is a short `wipefs` plus two 1 MiB reads).
pub fn observe(
    devices: &dyn BlockDevices,
    prober: &dyn Prober,
    tables: &dyn HostTables,
) -> Result<Inventory, HostError> {
    observe_named(devices, prober, tables, None)
}

/// Like `observe`, but with `only` the contents of devices a class names are
/// probed (the agent's way: it has no business reading other disks, and a
/// dead device elsewhere must not slow it down). `scan` probes everything to
/// show the admin what is there.
pub fn observe_named(
    devices: &dyn BlockDevices,
    prober: &dyn Prober,
    tables: &dyn HostTables,
    only: Option<&Classes>,
) -> Result<Inventory, HostError> {
    let mut devs = devices.list()?;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        * 2;
    let chunk = devs.len().div_ceil(workers).max(1);
    std::thread::scope(|s| {
        for part in devs.chunks_mut(chunk) {
            s.spawn(move || {
                for d in part {
                    if only.is_none_or(|c| c.matching(d).is_some()) {
                        d.probe = prober.probe(d);
                    }
                }
            });
        }
    });
    crate::failpoint::pause("observe-after-devices");
    Ok(Inventory {
        devices: devs,
        mounts: tables.mounts()?,
        swaps: tables.swaps()?,
    })
}

/// Decides every device. The exclusive-open test is made only for devices
/// that pass every other check, so disklet never opens a device it has no
/// business with.
pub fn decide_all(
    inv: &mut Inventory,
    cfg: &Config,
    classes: &Classes,
    prober: &dyn Prober,
) -> Vec<Decision> {
    decide_all_aged(inv, cfg, classes, prober, &|_| None)
}

/// Like `decide_all`, with how long each device has looked the same (the
/// agent's settle tracking; `None` skips the settle check).
pub fn decide_all_aged(
    inv: &mut Inventory,
    cfg: &Config,
    classes: &Classes,
    prober: &dyn Prober,
    age: &dyn Fn(&Device) -> Option<std::time::Duration>,
) -> Vec<Decision> {
    let facts = NodeFacts::new(inv, &cfg.host_dir, &cfg.kubelet_dir)
        .with_intents(crate::host::intents::read(&cfg.host_dir));
    let mut out = Vec::with_capacity(inv.devices.len());
    for i in 0..inv.devices.len() {
        let a = age(&inv.devices[i]);
        let mut d = evaluate(&inv.devices[i], inv, classes, &facts, a);
        if d.verdict
            == (Verdict::Pending {
                reason: PendingReason::ExclusiveNotChecked,
            })
        {
            let ex = prober.exclusive(&inv.devices[i]);
            inv.devices[i].exclusive = ex;
            d = evaluate(&inv.devices[i], inv, classes, &facts, a);
        }
        out.push(d);
    }
    out
}

/// The whole scan.
pub fn scan(
    cfg: &Config,
    classes: &Classes,
    devices: &dyn BlockDevices,
    prober: &dyn Prober,
    tables: &dyn HostTables,
) -> Result<Vec<Row>, HostError> {
    let mut inv = observe(devices, prober, tables)?;
    let decisions = decide_all(&mut inv, cfg, classes, prober);
    let mut rows: Vec<Row> = inv
        .devices
        .iter()
        .zip(&decisions)
        .map(|(d, dec)| Row::new(d, dec))
        .collect();
    rows.extend(dir_rows(cfg, &inv));
    Ok(rows)
}

/// One row per discovery-dir entry (type `dir-entry`): `eligible` when it is
/// published as is, else `refused` with a reason; and one per discovery dir
/// that cannot be read (type `dir`).
pub fn dir_rows(cfg: &Config, inv: &Inventory) -> Vec<Row> {
    let os_devices = crate::plan::provision::os_devices(inv, cfg);
    let mut rows = Vec::new();
    for c in &cfg.classes {
        for dir in &c.discovery_dirs {
            if let Err(e) = std::fs::read_dir(dir) {
                rows.push(Row::dir(
                    dir.clone(),
                    "dir",
                    &c.name,
                    0,
                    Some((
                        "unreadable-dir",
                        format!("{e}; create it or fix discoveryDirs"),
                    )),
                ));
                continue;
            }
            for e in crate::host::dirs::inspect_dir(&c.name, Some(c.volume_mode), dir, &inv.mounts)
            {
                let mut refusal = e.refusal;
                let size = match &e.entry.kind {
                    DirEntryKind::MountPoint { capacity_bytes, .. } => *capacity_bytes,
                    DirEntryKind::BlockLink { size_bytes, target } => {
                        if refusal.is_none() {
                            refusal =
                                crate::plan::provision::link_refusal(inv, &os_devices, target).map(
                                    |why| {
                                        (
                                            "link-in-use",
                                            format!(
                                        "a symlink to {}: {why}; the agent does not publish it",
                                        target.display()
                                    ),
                                        )
                                    },
                                );
                        }
                        *size_bytes
                    }
                    DirEntryKind::Other => 0,
                };
                rows.push(Row::dir(e.entry.path, "dir-entry", &c.name, size, refusal));
            }
        }
    }
    rows
}

/// The table an admin reads before rolling out.
pub fn render_table(rows: &[Row]) -> String {
    let header = [
        "DEVICE",
        "TYPE",
        "SIZE",
        "MODEL/SERIAL",
        "IDENTITY",
        "SIGNATURE",
        "CLASS",
        "VERDICT",
        "REASON",
        "DETAIL",
    ];
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            let ms = match (&r.model, &r.serial) {
                (Some(m), Some(s)) => format!("{m}/{s}"),
                (Some(m), None) => m.clone(),
                (None, Some(s)) => s.clone(),
                (None, None) => "-".into(),
            };
            [
                r.device.display().to_string(),
                r.kind.clone(),
                format_bytes(r.size_bytes),
                ms,
                r.identity.clone().unwrap_or_else(|| "-".into()),
                match (&r.signature, &r.probe_error) {
                    (Some(s), _) => s.clone(),
                    (None, Some(_)) => "(unreadable)".into(),
                    (None, None) => "-".into(),
                },
                r.class.clone().unwrap_or_else(|| "-".into()),
                r.verdict.to_string(),
                r.reason.unwrap_or("-").to_string(),
                r.detail.clone().unwrap_or_default(),
            ]
        })
        .map(|row| row.map(|c| sanitize(&c)))
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cols: &[String], out: &mut String| {
        let last = cols.len() - 1;
        for (i, c) in cols.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&header.map(String::from), &mut out);
    for row in &cells {
        line(row, &mut out);
    }
    out
}

/// Keeps a table cell on one line whatever a device reports.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeDevices, FakeProber, FakeTables, ProberCall};
    use crate::model::{DevNo, DeviceKind, Exclusive, Probe};

    fn dev(name: &str, minor: u32) -> Device {
        let mut d = Device::new(name, DevNo::new(7, minor), DeviceKind::Loop);
        d.size_bytes = 1 << 30;
        d
    }

    #[test]
    fn exclusive_open_only_for_devices_that_pass_everything_else() {
        let cfg = Config::parse(
            "classes: [{name: a, selector: {paths: [/dev/loop1, /dev/loop2], types: [loop]}}]",
        )
        .unwrap();
        let classes = Classes::compile(&cfg).unwrap();
        let prober = FakeProber {
            probes: [(
                "loop2".to_string(),
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
            exclusive: [("loop1".to_string(), Exclusive::Busy)].into(),
            ..FakeProber::default()
        };
        let devices = FakeDevices(vec![dev("loop0", 0), dev("loop1", 1), dev("loop2", 2)]);
        let rows = scan(&cfg, &classes, &devices, &prober, &FakeTables::default()).unwrap();
        let got: Vec<(&str, &str, Option<&str>)> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.verdict, r.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("loop0", "refused", Some("no-class-matches")),
                ("loop1", "refused", Some("busy")),
                ("loop2", "refused", Some("foreign-filesystem")),
            ]
        );
        let ex: Vec<ProberCall> = prober
            .calls()
            .into_iter()
            .filter(|c| matches!(c, ProberCall::Exclusive(_)))
            .collect();
        assert_eq!(ex, [ProberCall::Exclusive("loop1".into())]);
        assert_eq!(rows[2].signature.as_deref(), Some("xfs"));
    }

    #[test]
    fn table_has_a_row_per_device_and_survives_hostile_strings() {
        let cfg = Config::default();
        let classes = Classes::compile(&cfg).unwrap();
        let mut d = dev("loop0", 0);
        d.model = Some("evil\nmodel\x1b[31m".into());
        let rows = scan(
            &cfg,
            &classes,
            &FakeDevices(vec![d, dev("loop1", 1)]),
            &FakeProber::default(),
            &FakeTables::default(),
        )
        .unwrap();
        let t = render_table(&rows);
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(t.lines().next().unwrap().starts_with("DEVICE"));
        assert!(t.contains("evil?model?[31m"), "{t}");
        assert!(t.contains("no-class-matches"));
    }
}
