//! `cargo bench --bench load` (root): disklet under load, the real
//! `disklet run` binary against the fake API server.
//!
//! 1. 200 loop devices (32 MiB, sparse, ext4, settleSeconds 0) on one node:
//!    - startup: 200 attached, agent started → 200 PVs seen by a watch here;
//!    - restart: agent killed and started again → ready (nothing to do);
//!    - idle pass: mean reconcile pass with the 200 published (resync 2 s);
//!    - burst: agent running, 200 attached at once → 200 PVs seen;
//!    - baselines measured in the same run on the same devices: `mkfs` alone
//!      over the 200, sequential, with the agent's arguments, and one
//!      `wipefs --no-act --json` probe over the 200 (what a pass must read).
//! 2. 50 agents (distinct nodes, selectors matching no device) against one
//!    fake API server holding 0, then 100,000 PVs of 1,000 other nodes: per
//!    agent start → ready, RSS idle and peak (VmRSS / VmHWM), API requests per
//!    minute over a 60 s steady-state window (resyncSeconds 10), mean and max
//!    over the agents, and the ratios 100,000 / 0.
//!
//! 3. The real control plane (tests/support/cluster.rs): 20 agents, each on
//!    a kwok Node with one loop device and a token bound to the DaemonSet's
//!    pod, against the real apiserver with 0, then (restarted) 20,000 PVs of
//!    100 other nodes in etcd: RSS, requests per pass and per minute from
//!    the apiserver's audit log (by the node the token is bound to) over a
//!    60 s window (resyncSeconds 3), and the ratios 20,000 / 0.
//!
//! `LOAD_BENCH_ONLY=disks`, `=agents` or `=real` runs one part.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::agent::{proc_mem_kib, Agent, Env, MountSweeper};
use support::Loop;

const DISKS: usize = 200;
const SIZE_MIB: u64 = 32;
const AGENTS: usize = 50;
const FOREIGN_PVS: usize = 100_000;
const FOREIGN_NODES: usize = 1000;
const RESYNC_S: u64 = 10;
const WINDOW: Duration = Duration::from_secs(60);
const JSON: &[&str] = &["--log-format", "json"];

/// Detaches every loop backed by a file under the directory, on drop.
struct LoopSweeper(PathBuf);

impl Drop for LoopSweeper {
    fn drop(&mut self) {
        for e in std::fs::read_dir("/sys/class/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(bf) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if Path::new(bf.trim()).starts_with(&self.0) {
                let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
    }
}

fn quiet(cmd: &mut Command) {
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd:?}");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn disk_config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nresyncSeconds: 2\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

fn attach(dir: &Path, n: usize, loops: &mut Vec<Loop>) {
    for i in 0..n {
        let l = Loop::new(dir, &format!("d{i:03}"), SIZE_MIB);
        l.assert_ours();
        loops.push(l);
    }
}

fn metric(agent: &Agent, name: &str) -> f64 {
    agent.metric(name).unwrap_or(0.0)
}

/// Mean reconcile pass of an idle agent over `passes` passes.
fn idle_pass(agent: &Agent, passes: f64) -> Duration {
    let sum = "disklet_reconcile_duration_seconds_sum";
    let count = "disklet_reconcile_duration_seconds_count";
    let (s0, n0) = (metric(agent, sum), metric(agent, count));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n1 = metric(agent, count);
        if n1 >= n0 + passes {
            return Duration::from_secs_f64((metric(agent, sum) - s0) / (n1 - n0));
        }
        assert!(Instant::now() < deadline, "no idle passes");
        let _ = agent.recv_line(Duration::from_millis(200));
    }
}

/// The mean of each of `fields` over the last `n` JSON log lines whose
/// message is `msg`, as `field=mean` pairs.
fn means(log: &str, msg: &str, fields: &[&str], n: usize) -> String {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == msg)
        .collect();
    let last = &lines[lines.len().saturating_sub(n)..];
    fields
        .iter()
        .map(|f| {
            let sum: f64 = last.iter().filter_map(|v| v["fields"][*f].as_f64()).sum();
            format!("{f}={:.2}", sum / last.len().max(1) as f64)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Disks {
    attach: Duration,
    mkfs: Duration,
    probe: Duration,
    startup: Duration,
    passes: f64,
    restart: Duration,
    idle_pass: Duration,
    /// CPU seconds and passes of an idle agent over 60 s (default resync).
    idle_minute: (f64, f64),
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64);
    ticks / hz
}

/// 200 attached, then the agent started; restart; idle pass.
async fn startup() -> Disks {
    let env = support::agent::env().await;
    let disks = env.path().join("disks");
    let _stray = LoopSweeper(disks.clone());
    let mut loops = Vec::new();
    let _sweep = MountSweeper(env.path().to_path_buf());
    let t = Instant::now();
    attach(&disks, DISKS, &mut loops);
    let attach_t = t.elapsed();

    // Baselines on the very same devices, then blank them again.
    let t = Instant::now();
    for l in &loops {
        let uuid = uuid::Uuid::new_v4().to_string();
        quiet(Command::new("mkfs.ext4").args([
            "-q",
            "-L",
            "disklet",
            "-U",
            &uuid,
            "-E",
            "nodiscard",
            l.path(),
        ]));
    }
    let mkfs = t.elapsed();
    // Blank again, down to the zeroed first and last MiB disklet checks for
    // (on a loop, a discard punches holes in the sparse file).
    for l in &loops {
        quiet(Command::new("blkdiscard").args(["-f", l.path()]));
    }
    let t = Instant::now();
    for l in &loops {
        quiet(Command::new("wipefs").args(["--no-act", "--json", l.path()]));
    }
    let probe = t.elapsed();

    let cfg = disk_config(env.path());
    let sel = "disklet.io/node=node-a";
    let t = Instant::now();
    let agent = Agent::start_with(&env, "agent", "node-a", &cfg, JSON);
    env.wait_pvs_within(sel, "200 PVs", Duration::from_secs(900), |p| {
        p.len() >= DISKS
    })
    .await;
    let startup_t = t.elapsed();
    let passes = metric(&agent, "disklet_reconciles_total");
    agent.kill();

    let t = Instant::now();
    let agent = Agent::start_with(&env, "agent2", "node-a", &cfg, JSON);
    agent.wait_log_within("ready: first reconcile done", Duration::from_secs(300));
    let restart = t.elapsed();
    let cached = |a: &Agent| {
        let (_, body) = a.get("/metrics");
        support::agent::metric_sum(
            &body.replace("{source=\"cached\"}", "_cached "),
            "disklet_device_probes_total_cached",
        )
        .unwrap_or(0.0)
    };
    let (c0, all0) = (
        cached(&agent),
        metric(&agent, "disklet_device_probes_total"),
    );
    let idle = idle_pass(&agent, 5.0);
    let (c1, all1) = (
        cached(&agent),
        metric(&agent, "disklet_device_probes_total"),
    );
    println!(
        "  idle passes' probes: {} read, {} cached",
        (all1 - all0) - (c1 - c0),
        c1 - c0
    );
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    for (msg, fields) in [
        (
            "pass timing",
            &["api_ms", "observe_ms", "plan_ms", "act_ms"][..],
        ),
        (
            "observe timing",
            &["snapshot_ms", "decide_ms", "rest_ms"][..],
        ),
    ] {
        println!(
            "  idle passes, {msg} (mean ms of the last 5): {}",
            means(&log, msg, fields, 5)
        );
    }
    drop(agent);
    // The default resync (60 s): what an idle agent costs a node per minute.
    let agent = Agent::start_with(
        &env,
        "agent3",
        "node-a",
        &cfg.replace("resyncSeconds: 2\n", ""),
        JSON,
    );
    agent.wait_log_within("ready: first reconcile done", Duration::from_secs(300));
    let (cpu0, passes0) = (
        cpu_seconds(agent.pid()),
        metric(&agent, "disklet_reconciles_total"),
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let _ = agent.recv_line(Duration::from_millis(500));
    }
    let idle_minute = (
        cpu_seconds(agent.pid()) - cpu0,
        metric(&agent, "disklet_reconciles_total") - passes0,
    );
    drop(agent);
    Disks {
        attach: attach_t,
        mkfs,
        probe,
        startup: startup_t,
        passes,
        restart,
        idle_pass: idle,
        idle_minute,
    }
}

/// The agent running with no disk, then 200 attached at once.
async fn burst() -> (Duration, Duration) {
    let env = support::agent::env().await;
    let disks = env.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let _stray = LoopSweeper(disks.clone());
    let mut loops = Vec::new();
    let _sweep = MountSweeper(env.path().to_path_buf());
    let agent = Agent::start_with(&env, "agent", "node-a", &disk_config(env.path()), JSON);
    agent.wait_log("ready: first reconcile done");
    let t = Instant::now();
    attach(&disks, DISKS, &mut loops);
    let attach_t = t.elapsed();
    env.wait_pvs_within(
        "disklet.io/node=node-a",
        "200 PVs",
        Duration::from_secs(900),
        |p| p.len() >= DISKS,
    )
    .await;
    let total = t.elapsed();
    drop(agent);
    (attach_t, total)
}

/// One agent's figures.
struct Fig {
    ready: f64,
    rss_mib: f64,
    hwm_mib: f64,
    req_min: f64,
    passes_min: f64,
    /// Requests in the window by "verb resource".
    kinds: BTreeMap<String, usize>,
}

fn agent_config(dir: &Path, name: &str) -> String {
    format!(
        "hostDir: {d}/hostdir-{name}\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nresyncSeconds: {RESYNC_S}\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    fsType: ext4\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/none/*.img\"], types: [loop]}}\n",
        d = dir.display()
    )
}

async fn agents(env: &Env, phase: &str) -> Vec<Fig> {
    let mut started = Vec::new();
    for i in 0..AGENTS {
        let user = format!("{phase}-{i}");
        let kc = env.kubeconfig_as(&user);
        let cfg = agent_config(env.path(), &user);
        let t = Instant::now();
        let a = Agent::start_raw(&kc, env.path(), &user, &format!("load-{i}"), &cfg, &[]);
        started.push((a, user, t));
    }
    let mut ready = Vec::new();
    for (a, _, t) in &started {
        a.wait_log_within("ready: first reconcile done", Duration::from_secs(300));
        ready.push(secs(t.elapsed()));
    }
    // Steady state from here: every agent has listed, watched, reconciled.
    let snap = |a: &Agent, u: &str| {
        (
            metric(a, "disklet_reconciles_total"),
            env.server.requests_of(u).len(),
        )
    };
    let t0 = Instant::now();
    let first: Vec<(f64, usize)> = started.iter().map(|(a, u, _)| snap(a, u)).collect();
    // The measurement window itself (wall time, as "per minute" says).
    tokio::time::sleep(WINDOW).await;
    let minutes = secs(t0.elapsed()) / 60.0;
    let mut out = Vec::new();
    for (((a, u, _), (p0, r0)), ready) in started.iter().zip(first).zip(ready) {
        let (p1, r1) = snap(a, u);
        let mut kinds = BTreeMap::new();
        for r in &env.server.requests_of(u)[r0..r1] {
            let k = format!(
                "{} {}",
                r.verb.map_or("other", |v| v.as_str()),
                r.resource.as_deref().unwrap_or(&r.path)
            );
            *kinds.entry(k).or_insert(0) += 1;
        }
        let (rss, hwm) = proc_mem_kib(a.pid());
        out.push(Fig {
            ready,
            rss_mib: rss as f64 / 1024.0,
            hwm_mib: hwm as f64 / 1024.0,
            req_min: (r1 - r0) as f64 / minutes,
            passes_min: (p1 - p0) / minutes,
            kinds,
        });
    }
    drop(started);
    out
}

fn mean_max(v: &[Fig], f: fn(&Fig) -> f64) -> (f64, f64) {
    let xs: Vec<f64> = v.iter().map(f).collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    (mean, xs.iter().copied().fold(f64::MIN, f64::max))
}

fn main() {
    if support::skip_unless_root("load bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // LOAD_BENCH_ONLY=disks or =agents runs one part.
    let only = std::env::var("LOAD_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "disks" {
        disks_part(&rt, cpus);
    }
    if only.is_empty() || only == "agents" {
        agents_part(&rt);
    }
    if only.is_empty() || only == "real" {
        real_part(&rt);
    }
}

fn real_part(rt: &tokio::runtime::Runtime) {
    use support::load::{max, mean, Fig};
    const REAL_AGENTS: usize = 20;
    const REAL_FOREIGN: usize = 20_000;
    let r = rt.block_on(support::load::run(
        REAL_AGENTS,
        REAL_FOREIGN,
        Duration::from_secs(60),
    ));
    println!(
        "{} agents against the real apiserver, {}-s window (mean / max per agent); {} foreign PVs created in {:.1} s",
        r.agents,
        r.window.as_secs(),
        r.foreign,
        r.seed_s
    );
    println!(
        "  {:<26} {:>17} {:>17} {:>8}",
        "", "0 foreign", "20,000 foreign", "ratio"
    );
    let minutes = r.window.as_secs_f64() / 60.0;
    type Row = (&'static str, Box<dyn Fn(&Fig) -> f64>);
    let rows: [Row; 6] = [
        ("RSS idle, MiB", Box::new(|f| f.rss_mib)),
        ("RSS peak (VmHWM), MiB", Box::new(|f| f.hwm_mib)),
        (
            "API requests / minute",
            Box::new(move |f| f.requests() as f64 / minutes),
        ),
        (
            "reconcile passes / minute",
            Box::new(move |f| f.passes / minutes),
        ),
        ("API requests / pass", Box::new(|f| f.requests_per_pass())),
        ("restart -> ready, s", Box::new(|f| f.ready_s)),
    ];
    for (name, f) in rows {
        let (bm, bx) = (mean(&r.base, &f), max(&r.base, &f));
        let (lm, lx) = (mean(&r.loaded, &f), max(&r.loaded, &f));
        println!(
            "  {name:<26} {bm:>8.2} / {bx:>6.2} {lm:>8.2} / {lx:>6.2} {:>8.2}",
            lm / bm
        );
    }
    print_kinds(
        r.base.iter().map(|f| &f.kinds),
        r.loaded.iter().map(|f| &f.kinds),
    );
    println!(
        "  PV lists/watches without the node's selector: {}; refused requests: {}",
        r.unscoped.len(),
        r.refused.len()
    );
}

fn disks_part(rt: &tokio::runtime::Runtime, cpus: usize) {
    let d = rt.block_on(startup());
    let (burst_attach, burst) = rt.block_on(burst());
    println!("{DISKS} loop devices ({SIZE_MIB} MiB, ext4) on one node, {cpus} CPUs");
    println!(
        "  attach {DISKS} (losetup, sequential)        {:8.2} s",
        secs(d.attach)
    );
    println!(
        "  agent start -> {DISKS} PVs visible           {:8.2} s  ({} passes)",
        secs(d.startup),
        d.passes
    );
    println!(
        "  agent running, attach {DISKS} -> all visible {:8.2} s  (attach itself {:.2} s)",
        secs(burst),
        secs(burst_attach)
    );
    println!(
        "  restart -> ready (nothing to do)         {:8.2} s",
        secs(d.restart)
    );
    println!(
        "  idle reconcile pass, {DISKS} published       {:8.3} s",
        secs(d.idle_pass)
    );
    println!(
        "  idle minute (resync 60 s): CPU {:.3} s over {} passes ({:.2}% of one CPU)",
        d.idle_minute.0,
        d.idle_minute.1,
        d.idle_minute.0 / 60.0 * 100.0
    );
    println!(
        "  baseline: mkfs.ext4 x{DISKS}, sequential     {:8.2} s  ({:.1} ms per device)",
        secs(d.mkfs),
        secs(d.mkfs) * 1000.0 / DISKS as f64
    );
    println!(
        "  baseline: wipefs -n x{DISKS}, sequential     {:8.2} s",
        secs(d.probe)
    );
    println!(
        "  per device: startup {:.1} ms, burst {:.1} ms, mkfs {:.1} ms",
        secs(d.startup) * 1000.0 / DISKS as f64,
        secs(burst) * 1000.0 / DISKS as f64,
        secs(d.mkfs) * 1000.0 / DISKS as f64
    );
    println!(
        "  ratio startup / mkfs alone               {:8.2}",
        secs(d.startup) / secs(d.mkfs)
    );
    println!(
        "  ratio burst / mkfs alone                 {:8.2}",
        secs(burst) / secs(d.mkfs)
    );
    println!(
        "  ratio idle pass / one wipefs round       {:8.2}",
        secs(d.idle_pass) / secs(d.probe)
    );
}

fn agents_part(rt: &tokio::runtime::Runtime) {
    let (base, loaded, seed, server_mib) = rt.block_on(async {
        let env = support::agent::env().await;
        let _sweep = MountSweeper(env.path().to_path_buf());
        std::fs::create_dir_all(env.path().join("none")).unwrap();
        for i in 0..AGENTS {
            env.node(&format!("load-{i}"), &format!("load-{i}.example.com"))
                .await;
        }
        let base = agents(&env, "base").await;
        let t = Instant::now();
        env.seed_foreign_pvs(FOREIGN_PVS, FOREIGN_NODES).await;
        let seed = t.elapsed();
        let server_mib = proc_mem_kib(std::process::id()).0 as f64 / 1024.0;
        let loaded = agents(&env, "loaded").await;
        (base, loaded, seed, server_mib)
    });
    println!(
        "{AGENTS} agents, one fake API server, resyncSeconds {RESYNC_S}, {}-s window (mean / max per agent)",
        WINDOW.as_secs()
    );
    println!(
        "  seeding {FOREIGN_PVS} foreign PVs: {:.1} s; bench process (server) RSS then {server_mib:.0} MiB",
        secs(seed)
    );
    println!(
        "  {:<26} {:>17} {:>17} {:>8}",
        "", "0 foreign", "100,000 foreign", "ratio"
    );
    type Get = fn(&Fig) -> f64;
    let rows: [(&str, Get); 6] = [
        ("RSS idle, MiB", |f| f.rss_mib),
        ("RSS peak (VmHWM), MiB", |f| f.hwm_mib),
        ("API requests / minute", |f| f.req_min),
        ("reconcile passes / minute", |f| f.passes_min),
        ("API requests / pass", |f| f.req_min / f.passes_min),
        ("start -> ready, s", |f| f.ready),
    ];
    for (name, f) in rows {
        let (bm, bx) = mean_max(&base, f);
        let (lm, lx) = mean_max(&loaded, f);
        println!(
            "  {name:<26} {bm:>8.2} / {bx:>6.2} {lm:>8.2} / {lx:>6.2} {:>8.2}",
            lm / bm
        );
    }
    print_kinds(
        base.iter().map(|f| &f.kinds),
        loaded.iter().map(|f| &f.kinds),
    );
}

/// Requests in the window by kind, summed over the agents, without and with
/// the foreign PVs.
fn print_kinds<'a>(
    base: impl Iterator<Item = &'a BTreeMap<String, usize>>,
    loaded: impl Iterator<Item = &'a BTreeMap<String, usize>>,
) {
    let sum = |v: &mut dyn Iterator<Item = &'a BTreeMap<String, usize>>| {
        let mut all: BTreeMap<String, usize> = BTreeMap::new();
        for m in v {
            for (k, n) in m {
                *all.entry(k.clone()).or_insert(0) += n;
            }
        }
        all
    };
    let (mut base, mut loaded) = (base, loaded);
    let (kb, kl) = (sum(&mut base), sum(&mut loaded));
    let keys: std::collections::BTreeSet<&String> = kb.keys().chain(kl.keys()).collect();
    println!("  requests in the window, all agents:");
    for k in keys {
        println!(
            "    {k:<36} {:>6} {:>6}",
            kb.get(k).unwrap_or(&0),
            kl.get(k).unwrap_or(&0)
        );
    }
}
