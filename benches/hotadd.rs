//! `cargo bench --bench hotadd` (root): latency from loop attach to PV visible
//! in the API, over 20 disks, split into detect / probe / mkfs / mount /
//! publish, without udevd and with a real udevd. The agent is the real
//! `disklet run` binary against the fake API server, settleSeconds 0.
//!
//! A third run (`HOTADD_BENCH_ONLY=real` runs only it, `=fake` all but it) is against the real
//! control plane (tests/support/cluster.rs): a pod with a claim, pinned to the
//! node, waits (unschedulable) before each disk is attached; measured are
//! attach → PV Available and attach → the claim Bound by the real PV
//! controller after the real scheduler placed the pod, against one mkfs.xfs
//! of the same size measured in the same run.
//!
//! Phases come from the agent's JSON log timestamps (same clock):
//!   detect  = attach → first device event the agent logs for that loop
//!   probe   = that event → start of the format (debounce, observe, decide, interlocks)
//!   mkfs    = mkfs.xfs itself plus the interlock re-probe
//!   mount   = format done → mounted
//!   publish = mounted → PV seen by a watch in this process
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::agent::{Agent, MountSweeper};

const DISKS: usize = 20;

fn now() -> f64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() % 86400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// Seconds since midnight UTC of a tracing JSON line's timestamp.
fn ts(line: &serde_json::Value) -> f64 {
    let t = line["timestamp"].as_str().unwrap();
    let clock = t.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut it = clock.split(':');
    let h: f64 = it.next().unwrap().parse().unwrap();
    let m: f64 = it.next().unwrap().parse().unwrap();
    let s: f64 = it.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

#[derive(Default, Clone, Copy)]
struct Sample {
    detect: f64,
    probe: f64,
    mkfs: f64,
    mount: f64,
    publish: f64,
    total: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn run(with_udevd: bool) -> Vec<Sample> {
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().display().to_string();
    let cfg = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n"
    );
    let agent = Agent::start_with(&env, "agent", "node-a", &cfg, &["--log-format", "json"]);
    let mut lines: Vec<serde_json::Value> = Vec::new();
    loop {
        let l = agent
            .recv_line(Duration::from_secs(60))
            .expect("agent never became ready");
        if l.contains("ready: first reconcile done") {
            break;
        }
    }
    let mut loops = Vec::new();
    let mut samples = Vec::new();
    for i in 0..DISKS {
        let t0 = now();
        let lp = support::Loop::new(&env.path().join("disks"), &format!("d{i}"), 320);
        lp.assert_ours();
        let name = lp.name();
        env.wait_pvs("disklet.io/node=node-a", "the PV", |p| p.len() == i + 1)
            .await;
        let t_pub = now();
        while let Some(l) = agent.recv_line(Duration::from_millis(200)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                lines.push(v);
            }
            if lines.last().is_some_and(|v| {
                v["fields"]["message"] == "mounted" && v["fields"]["device"] == name.as_str()
            }) {
                break;
            }
        }
        let find = |msg: &str| {
            lines
                .iter()
                .find(|v| {
                    ts(v) >= t0 - 0.001
                        && v["fields"]["message"] == msg
                        && (v["fields"]["device"] == name.as_str()
                            || v["fields"]["dev"]
                                .as_str()
                                .is_some_and(|s| s.contains(&name)))
                })
                .cloned()
        };
        let (Some(ev), Some(fmt), Some(mnt)) =
            (find("device event"), find("formatted"), find("mounted"))
        else {
            panic!("missing log lines for {name}");
        };
        let fmt_ms = fmt["fields"]["ms"].as_f64().unwrap() / 1000.0;
        let s = Sample {
            detect: ts(&ev) - t0,
            probe: (ts(&fmt) - fmt_ms) - ts(&ev),
            mkfs: fmt_ms,
            mount: ts(&mnt) - ts(&fmt),
            publish: t_pub - ts(&mnt),
            total: t_pub - t0,
        };
        samples.push(s);
        loops.push(lp);
        let _ = with_udevd;
    }
    drop(agent);
    // Where a pass that acted spends its time (the agent's debug lines).
    let mean = |msg: &str, f: &str, acted: bool| {
        let v: Vec<f64> = lines
            .iter()
            .filter(|v| v["fields"]["message"] == msg)
            .filter(|v| !acted || v["fields"]["actions"].as_u64().is_some_and(|n| n > 0))
            .filter_map(|v| v["fields"][f].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    println!(
        "  passes that acted, mean ms: api {:.2} observe {:.2} plan {:.2} act {:.2}",
        mean("pass timing", "api_ms", true),
        mean("pass timing", "observe_ms", true),
        mean("pass timing", "plan_ms", true),
        mean("pass timing", "act_ms", true),
    );
    println!(
        "  observe, mean ms: snapshot {:.2} decide {:.2} rest {:.2}",
        mean("observe timing", "snapshot_ms", false),
        mean("observe timing", "decide_ms", false),
        mean("observe timing", "rest_ms", false),
    );
    samples
}

fn report(title: &str, s: &[Sample]) {
    println!("{title}: {} disks, seconds (p50 / p95)", s.len());
    type Get = fn(&Sample) -> f64;
    let cols: [(&str, Get); 6] = [
        ("detect", |x| x.detect),
        ("probe", |x| x.probe),
        ("mkfs", |x| x.mkfs),
        ("mount", |x| x.mount),
        ("publish", |x| x.publish),
        ("total attach->PV", |x| x.total),
    ];
    for (name, f) in cols {
        let mut v: Vec<f64> = s.iter().map(f).collect();
        println!(
            "  {name:<18} {:8.4} / {:8.4}",
            pct(&mut v, 0.5),
            pct(&mut v, 0.95)
        );
    }
    let mut excl: Vec<f64> = s.iter().map(|x| x.total - x.mkfs).collect();
    println!(
        "  {:<18} {:8.4} / {:8.4}   (target: p95 < 1 s)",
        "total minus mkfs",
        pct(&mut excl, 0.5),
        pct(&mut excl, 0.95)
    );
}

/// attach → PV Available, attach → claim Bound, and mkfs.xfs alone, seconds.
async fn run_real() -> Vec<(f64, f64, f64)> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
    use kube::api::Api;
    use serde_json::json;
    use support::cluster::*;
    let s = Scope::new("hotadd-bench").await;
    let sc = s.storage_class("fast", json!({})).await;
    let mut rig = s
        .rig("n1", &[], |d| {
            loop_config(d, "", &[("fast", &sc, "disks", "")])
        })
        .await;
    rig.agent().wait_log("ready: first reconcile done");
    let ns = s.namespace("bench").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    let t = Duration::from_secs(90);
    let scratch = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    for i in 0..DISKS {
        let name = format!("c{i}");
        s.apply_json(&json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"storageClassName": sc, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "100Mi"}}}
        }))
        .await;
        s.apply_json(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": rig.node},
                     "containers": [{"name": "app", "image": "busybox:1.36.1"}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": name}}]}
        }))
        .await;
        wait_for(&pods, &name, "the pod waiting for a volume", t, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.reason.as_deref() == Some("Unschedulable"))
                })
        })
        .await;
        let before = list(&pvs, &nodes_selector(&[&rig.node])).await.len();
        let t0 = now();
        rig.disk("disks", &format!("d{i}"), 320);
        let sel = nodes_selector(&[&rig.node]);
        let avail = async {
            wait_list(&pvs, &sel, "a new PV", t, |p| p.len() > before).await;
            now()
        };
        let bound = async {
            wait_for(&pvcs, &name, "the claim Bound", t, |c| {
                c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
            })
            .await;
            now()
        };
        let (ta, tb) = tokio::join!(avail, bound);
        // The same mkfs.xfs the agent runs, on a file of the same size.
        let img = scratch.path().join(format!("m{i}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(320 << 20)
            .unwrap();
        let m0 = now();
        support::sh(&["mkfs.xfs", "-q", "-L", "disklet", img.to_str().unwrap()]);
        let mkfs = now() - m0;
        out.push((ta - t0, tb - t0, mkfs));
    }
    drop(rig.agent.take());
    out
}

fn report_real(s: &[(f64, f64, f64)]) {
    println!("real control plane: {} disks, seconds (p50 / p95)", s.len());
    let mut a: Vec<f64> = s.iter().map(|x| x.0).collect();
    let mut b: Vec<f64> = s.iter().map(|x| x.1).collect();
    let mut m: Vec<f64> = s.iter().map(|x| x.2).collect();
    let (m50, m95) = (pct(&mut m, 0.5), pct(&mut m, 0.95));
    let (a50, a95) = (pct(&mut a, 0.5), pct(&mut a, 0.95));
    let (b50, b95) = (pct(&mut b, 0.5), pct(&mut b, 0.95));
    println!(
        "  {:<30} {m50:8.4} / {m95:8.4}",
        "mkfs.xfs alone (baseline)"
    );
    println!(
        "  {:<30} {a50:8.4} / {a95:8.4}   ({:.1}x / {:.1}x mkfs)",
        "attach -> PV Available",
        a50 / m50,
        a95 / m95
    );
    println!(
        "  {:<30} {b50:8.4} / {b95:8.4}   ({:.1}x / {:.1}x mkfs)",
        "attach -> waiting claim Bound",
        b50 / m50,
        b95 / m95
    );
}

fn main() {
    if support::skip_unless_root("hotadd bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only_real = std::env::var("HOTADD_BENCH_ONLY").as_deref() == Ok("real");
    if only_real {
        let s = rt.block_on(run_real());
        report_real(&s);
        return;
    }
    if support::udevd_alive() {
        println!("a udevd not started by this bench is running; skipping the no-udevd run");
    } else {
        let s = rt.block_on(run(false));
        report("without udevd (kernel uevents)", &s);
    }
    match support::Udevd::start() {
        Some(_udevd) => {
            let s = rt.block_on(run(true));
            report("with udevd (udev events, udev db required)", &s);
        }
        None => println!("systemd-udevd not installed: no udevd run"),
    }
    if std::env::var("HOTADD_BENCH_ONLY").as_deref() == Ok("fake") {
        return;
    }
    let s = rt.block_on(run_real());
    report_real(&s);
}
