//! Load: hundreds of loop devices on one node (at startup, across a restart,
//! and hot-added in a batch), and many agents against one fake API server
//! that holds 100,000 PVs of other nodes.
//!
//! The agent is the real `disklet run` binary. Every selector names only
//! loops backed by files in the test's own temp dir (`backingFiles`), each
//! checked before use; the agents of the foreign-PV test name an empty dir and
//! touch no device at all.
//!
//! Numbers for the same scenarios, with 50 agents: `cargo bench --bench load`.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use disklet_fakeapi::Verb;
use k8s_openapi::api::core::v1::PersistentVolume;
use support::agent::{proc_mem_kib, Agent, Env, MountSweeper};
use support::{skip_unless_root, Loop};

/// Devices attached before the agent starts.
const STARTUP: usize = 200;
/// Devices attached at once while it runs.
const HOT_ADD: usize = 60;
/// Sparse backing files; ext4 formats a 32 MiB loop in ~15 ms.
const SIZE_MIB: u64 = 32;
/// Agents of the foreign-PV test (the bench runs 50).
const AGENTS: usize = 10;
const FOREIGN_PVS: usize = 100_000;
const FOREIGN_NODES: usize = 1000;
/// Steady-state window, in reconcile passes of each agent.
const PASSES: u64 = 10;

/// Both tests load the same two CPUs; they run one at a time (an async
/// lock: each test has its own runtime, and a panic does not poison it).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Detaches, on drop, every loop device whose backing file lies under a
/// directory: the net under the per-device `Loop` guards, for a loop whose
/// guard never came to exist.
struct LoopSweeper(PathBuf);

fn loops_backed_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/class/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(bf) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(bf.trim()).starts_with(dir) {
            out.push(format!("/dev/{name}"));
        }
    }
    out
}

impl Drop for LoopSweeper {
    fn drop(&mut self) {
        for dev in loops_backed_under(&self.0) {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

fn config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

/// Attaches loops `from..to`, each kept in `loops` as soon as it exists.
fn attach(dir: &Path, range: std::ops::Range<usize>, loops: &mut Vec<Loop>) {
    for i in range {
        let l = Loop::new(dir, &format!("d{i:03}"), SIZE_MIB);
        l.assert_ours();
        loops.push(l);
    }
}

/// `blkid -p` of a device as KEY=value pairs.
fn probe(dev: &str) -> BTreeMap<String, String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> &'a str {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(k))
        .map(String::as_str)
        .unwrap_or("")
}

/// What one device looks like once published.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    pv: String,
    uid: String,
    fs_uuid: String,
}

/// Checks that `pvs` are exactly one PV per loop: distinct paths, each path
/// `<mount>/vol` of a mount of the right device (the only mount of it under
/// hostDir), carrying that device's identity and filesystem UUID, and that
/// every loop holds our ext4. Returns what each device (by backing file) got.
fn check_published(
    pvs: &[PersistentVolume],
    loops: &[Loop],
    hostdir: &Path,
) -> BTreeMap<PathBuf, Published> {
    assert_eq!(pvs.len(), loops.len(), "one PV per device");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<_> = disklet::host::mountinfo::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(hostdir))
        .collect();
    let by_dev: BTreeMap<&str, &Loop> = loops.iter().map(|l| (l.path(), l)).collect();
    let mut paths = BTreeSet::new();
    let mut out = BTreeMap::new();
    for pv in pvs {
        let name = pv.metadata.name.clone().unwrap();
        let path = PathBuf::from(&pv.spec.as_ref().unwrap().local.as_ref().unwrap().path);
        assert!(
            paths.insert(path.clone()),
            "two PVs share {}",
            path.display()
        );
        assert_eq!(
            path.file_name().unwrap(),
            "vol",
            "{name}: {}",
            path.display()
        );
        let mp = path.parent().unwrap();
        let at: Vec<_> = mounts.iter().filter(|m| m.mount_point == mp).collect();
        assert_eq!(at.len(), 1, "{name}: mounts at {}: {at:?}", mp.display());
        let dev = at[0].source.as_str();
        let lp = by_dev
            .get(dev)
            .unwrap_or_else(|| panic!("{name}: {} is a mount of {dev}, not ours", mp.display()));
        assert_eq!(
            mounts.iter().filter(|m| m.source == dev).count(),
            1,
            "{dev} is mounted more than once under hostDir"
        );
        assert_eq!(
            ann(pv, "disklet.io/device-id"),
            format!("loop-file:{}", lp.file.display()),
            "{name}"
        );
        let uuid = mp.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(ann(pv, "disklet.io/fs-uuid"), uuid, "{name}");
        let p = probe(dev);
        assert_eq!(
            p.get("TYPE").map(String::as_str),
            Some("ext4"),
            "{dev}: {p:?}"
        );
        assert_eq!(p.get("LABEL").map(String::as_str), Some("disklet"), "{dev}");
        assert_eq!(p.get("UUID"), Some(&uuid), "{dev}");
        let prev = out.insert(
            lp.file.clone(),
            Published {
                pv: name.clone(),
                uid: pv.metadata.uid.clone().unwrap(),
                fs_uuid: uuid,
            },
        );
        assert!(prev.is_none(), "{dev} has two PVs");
    }
    out
}

/// Events by reason, counting every occurrence of a series.
async fn event_counts(env: &Env) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in env
        .server
        .store()
        .list("events.events.k8s.io")
        .await
        .unwrap()
    {
        let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        assert_eq!(s("type"), "Normal", "unexpected Warning: {e}");
        let n = e["series"]["count"].as_u64().unwrap_or(1) as usize;
        *out.entry(s("reason")).or_insert(0) += n;
    }
    out
}

/// Waits until each of the Formatted, Mounted and Published Events numbers
/// `n` (the Published one follows the PV), then returns all counts.
async fn wait_events(env: &Env, agent: &Agent, n: usize) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = event_counts(env).await;
        if ["Formatted", "Mounted", "Published"]
            .iter()
            .all(|r| c.get(*r).copied().unwrap_or(0) >= n)
        {
            return c;
        }
        assert!(Instant::now() < deadline, "Events: {c:?}, want {n} of each");
        // Pace on the agent's own log (at most 100 ms).
        let _ = agent.recv_line(Duration::from_millis(100));
    }
}

const JSON: &[&str] = &["--log-format", "json"];

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

/// Now, in seconds since midnight UTC (the clock of the log timestamps).
fn clock() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() % 86400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// Where an agent's time went since `t0` (a `clock()`), from its JSON log:
/// when the first and last `formatted`, `mounted` and `PV applied` lines came,
/// and the summed `ms` of the format calls (interlocks and mkfs).
fn phases(agent: &Agent, t0: f64) -> String {
    let text = std::fs::read_to_string(&agent.log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v| ts(v) >= t0)
        .collect();
    let mut out = String::new();
    for msg in ["formatted", "mounted", "PV applied"] {
        let t: Vec<f64> = lines
            .iter()
            .filter(|v| v["fields"]["message"] == msg)
            .map(|v| ts(v) - t0)
            .collect();
        if let (Some(a), Some(b)) = (t.first(), t.last()) {
            out += &format!("{msg} x{} at {a:.1}..{b:.1} s; ", t.len());
        }
    }
    let ms: f64 = lines
        .iter()
        .filter(|v| v["fields"]["message"] == "formatted")
        .filter_map(|v| v["fields"]["ms"].as_f64())
        .sum();
    out + &format!(
        "format calls (interlocks + mkfs) {:.1} s in all",
        ms / 1000.0
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn counter(agent: &Agent, name: &str) -> u64 {
    agent.metric(name).unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_disks_at_startup_across_a_restart_and_a_hot_added_batch() {
    if skip_unless_root("two_hundred_disks_at_startup_across_a_restart_and_a_hot_added_batch") {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let env = support::agent::env().await;
    let disks = env.path().join("disks");
    let hostdir = env.path().join("hostdir");
    // Drop order (reverse): agent, mounts, loops, any stray loop, env.
    let _stray = LoopSweeper(disks.clone());
    let mut loops: Vec<Loop> = Vec::new();
    let _sweep = MountSweeper(env.path().to_path_buf());
    let cfg = config(env.path());
    let sel = "disklet.io/node=node-a";

    // (a) 200 blank disks, then the agent.
    let t = Instant::now();
    attach(&disks, 0..STARTUP, &mut loops);
    let t_attach = t.elapsed();
    let t = Instant::now();
    let t0 = clock();
    let agent = Agent::start_with(&env, "agent", "node-a", &cfg, JSON);
    let pvs = env
        .wait_pvs_within(sel, "200 PVs", Duration::from_secs(300), |p| {
            p.len() >= STARTUP
        })
        .await;
    let t_startup = t.elapsed();
    let first = check_published(&pvs, &loops, &hostdir);
    assert_eq!(
        counter(&agent, "disklet_format_duration_seconds_count"),
        STARTUP as u64
    );
    assert_eq!(env.server.store().list("pv").await.unwrap().len(), STARTUP);
    // One Event per device and step, none per pass.
    let events = wait_events(&env, &agent, STARTUP).await;
    for r in ["Formatted", "Mounted", "Published"] {
        assert_eq!(events.get(r), Some(&STARTUP), "{r}: {events:?}");
    }
    // Each Event names its own device (kube's recorder folded them into one
    // series that named the first device only).
    let notes: BTreeSet<String> = env
        .events()
        .await
        .into_iter()
        .filter(|e| e.1 == "Formatted")
        .map(|e| e.2)
        .collect();
    assert_eq!(notes.len(), STARTUP, "one Formatted Event per device");
    eprintln!("startup phases: {}", phases(&agent, t0));
    let passes = counter(&agent, "disklet_reconciles_total");
    let pass_s = agent
        .metric("disklet_reconcile_duration_seconds_sum")
        .unwrap();
    eprintln!(
        "startup: {STARTUP} loops attached in {t_attach:?}; agent start -> {STARTUP} PVs in {t_startup:?} ({passes} passes, {pass_s:.1} s in passes)"
    );

    // Restart: nothing formatted again, same PVs.
    agent.kill();
    let t = Instant::now();
    let agent = Agent::start_with(&env, "agent2", "node-a", &cfg, JSON);
    let ready = agent.wait_log_within("ready: first reconcile done", Duration::from_secs(300));
    let t_restart = t.elapsed();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["fields"]["actions"], 0, "restart acted: {ready}");
    let pvs = env
        .wait_pvs_within(sel, "200 PVs", Duration::from_secs(60), |p| {
            p.len() == STARTUP
        })
        .await;
    let again = check_published(&pvs, &loops, &hostdir);
    assert_eq!(
        again, first,
        "PVs, uids or filesystems changed across a restart"
    );
    assert_eq!(counter(&agent, "disklet_format_duration_seconds_count"), 0);
    assert_eq!(counter(&agent, "disklet_mount_duration_seconds_count"), 0);
    assert_eq!(event_counts(&env).await, events, "Events after a restart");
    eprintln!("restart: ready (no action) after {t_restart:?}");
    let fds = open_fds(agent.pid());

    // (b) A batch attached at once while it runs.
    let t = Instant::now();
    let t0 = clock();
    attach(&disks, STARTUP..STARTUP + HOT_ADD, &mut loops);
    let pvs = env
        .wait_pvs_within(sel, "the hot-added PVs", Duration::from_secs(300), |p| {
            p.len() >= STARTUP + HOT_ADD
        })
        .await;
    let t_hot = t.elapsed();
    let all = check_published(&pvs, &loops, &hostdir);
    for (file, p) in &first {
        assert_eq!(all.get(file), Some(p), "{} changed", file.display());
    }
    assert_eq!(
        counter(&agent, "disklet_format_duration_seconds_count"),
        HOT_ADD as u64
    );
    let events = wait_events(&env, &agent, STARTUP + HOT_ADD).await;
    for r in ["Formatted", "Mounted", "Published"] {
        assert_eq!(events.get(r), Some(&(STARTUP + HOT_ADD)), "{r}: {events:?}");
    }
    assert_eq!(
        env.server.store().list("pv").await.unwrap().len(),
        STARTUP + HOT_ADD
    );
    // Nothing held open per device.
    let fds_after = open_fds(agent.pid());
    assert!(
        fds_after < fds + HOT_ADD / 2,
        "open fds {fds} -> {fds_after} after {HOT_ADD} more devices"
    );
    eprintln!(
        "hot-add: {HOT_ADD} loops attached at once -> all PVs in {t_hot:?}; {}; agent fds {fds} -> {fds_after}",
        phases(&agent, t0)
    );
}

/// What one agent did in a steady-state window.
#[derive(Debug)]
struct Sample {
    /// API requests per reconcile pass over the window.
    per_pass: f64,
    /// PV lists and watches over the agent's life.
    pv_list_watch: usize,
    rss_kib: u64,
    hwm_kib: u64,
}

fn agent_config(dir: &Path, name: &str) -> String {
    format!(
        "hostDir: {d}/hostdir-{name}\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nresyncSeconds: 1\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/none/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

/// A consistent (passes, requests) snapshot of one agent: the pass count
/// read on both sides of the request count is the same.
fn snapshot(env: &Env, agent: &Agent, user: &str) -> (u64, usize) {
    loop {
        let before = counter(agent, "disklet_reconciles_total");
        let reqs = env.server.requests_of(user).len();
        if counter(agent, "disklet_reconciles_total") == before {
            return (before, reqs);
        }
    }
}

/// Starts `n` agents (nodes `load-<i>`), lets each make `PASSES` passes in
/// steady state, and reports what each cost.
async fn measure(env: &Env, phase: &str, n: usize) -> Vec<Sample> {
    let agents: Vec<(Agent, String)> = (0..n)
        .map(|i| {
            let user = format!("{phase}-{i}");
            let kc = env.kubeconfig_as(&user);
            let cfg = agent_config(env.path(), &user);
            let a = Agent::start_raw(&kc, env.path(), &user, &format!("load-{i}"), &cfg, &[]);
            (a, user)
        })
        .collect();
    for (a, _) in &agents {
        a.wait_log_within("ready: first reconcile done", Duration::from_secs(120));
    }
    let start: Vec<(u64, usize)> = agents.iter().map(|(a, u)| snapshot(env, a, u)).collect();
    let deadline = Instant::now() + Duration::from_secs(60 + PASSES * 5);
    let mut out = Vec::new();
    for ((a, user), (p0, r0)) in agents.iter().zip(start) {
        let (p1, r1) = loop {
            let s = snapshot(env, a, user);
            if s.0 >= p0 + PASSES {
                break s;
            }
            assert!(Instant::now() < deadline, "{user}: no {PASSES} passes");
            // Pace the polling on the agent's own log (at most 100 ms).
            let _ = a.recv_line(Duration::from_millis(100));
        };
        let reqs = env.server.requests_of(user);
        let node = user.rsplit('-').next().unwrap();
        for r in reqs
            .iter()
            .filter(|r| r.resource.as_deref() == Some("persistentvolumes"))
        {
            assert!(
                matches!(r.verb, Some(Verb::List | Verb::Watch))
                    && r.label_selector.as_deref() == Some(&format!("disklet.io/node=load-{node}")),
                "{user} asked for other nodes' PVs: {r:?}"
            );
        }
        let (rss_kib, hwm_kib) = proc_mem_kib(a.pid());
        out.push(Sample {
            per_pass: (r1 - r0) as f64 / (p1 - p0) as f64,
            pv_list_watch: reqs
                .iter()
                .filter(|r| {
                    r.resource.as_deref() == Some("persistentvolumes")
                        && matches!(r.verb, Some(Verb::List | Verb::Watch))
                })
                .count(),
            rss_kib,
            hwm_kib,
        });
    }
    drop(agents);
    out
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_memory_and_api_requests_do_not_grow_with_foreign_pvs() {
    if skip_unless_root("agent_memory_and_api_requests_do_not_grow_with_foreign_pvs") {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    std::fs::create_dir_all(env.path().join("none")).unwrap();
    for i in 0..AGENTS {
        env.node(&format!("load-{i}"), &format!("load-{i}.example.com"))
            .await;
    }

    let base = measure(&env, "base", AGENTS).await;
    let t = Instant::now();
    env.seed_foreign_pvs(FOREIGN_PVS, FOREIGN_NODES).await;
    eprintln!(
        "seeded {FOREIGN_PVS} foreign PVs in {:?}; this process (the fake API server) now holds {} MiB",
        t.elapsed(),
        proc_mem_kib(std::process::id()).0 >> 10
    );
    assert_eq!(
        env.server.store().list("pv").await.unwrap().len(),
        FOREIGN_PVS
    );
    let loaded = measure(&env, "loaded", AGENTS).await;

    eprintln!("per agent (base -> {FOREIGN_PVS} foreign PVs):");
    for (i, (b, l)) in base.iter().zip(&loaded).enumerate() {
        eprintln!(
            "  load-{i}: req/pass {:.2} -> {:.2}, PV list+watch {} -> {}, RSS {} -> {} KiB, peak {} -> {} KiB",
            b.per_pass, l.per_pass, b.pv_list_watch, l.pv_list_watch, b.rss_kib, l.rss_kib, b.hwm_kib, l.hwm_kib
        );
    }
    for s in base.iter().chain(&loaded) {
        assert!(s.per_pass > 0.0, "an agent made no request per pass: {s:?}");
    }
    let rate = |v: &[Sample]| mean(v.iter().map(|s| s.per_pass));
    let (rb, rl) = (rate(&base), rate(&loaded));
    assert!(
        (rl - rb).abs() <= 0.15 * rb,
        "API requests per pass grew with foreign PVs: {rb:.2} -> {rl:.2}"
    );
    let lw = |v: &[Sample]| v.iter().map(|s| s.pv_list_watch).max().unwrap();
    assert!(
        lw(&loaded) <= lw(&base) + 1,
        "PV lists/watches grew: {} -> {}",
        lw(&base),
        lw(&loaded)
    );
    for (what, f) in [
        ("RSS", (|s: &Sample| s.rss_kib as f64) as fn(&Sample) -> f64),
        ("peak RSS", |s: &Sample| s.hwm_kib as f64),
    ] {
        let (b, l) = (mean(base.iter().map(f)), mean(loaded.iter().map(f)));
        assert!(
            l < 1.5 * b,
            "agent {what} grew with foreign PVs: {b:.0} -> {l:.0} KiB"
        );
    }
}
