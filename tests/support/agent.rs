//! Harness for end-to-end tests of the real `disklet run` binary against the
//! fake API server on real loop devices.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use disklet_fakeapi::{FakeApiServer, Options};
use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt};

use serde_json::json;

/// The fake API server, seeded with a Node and a StorageClass, and a client.
pub struct Env {
    pub server: FakeApiServer,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
}

pub async fn env() -> Env {
    let server = FakeApiServer::start(Options::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();
    let env = Env {
        server,
        kubeconfig,
        client,
        dir,
    };
    env.node("node-a", "host-a-label").await;
    env.server
        .store()
        .create(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "local-fast"},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
            "allowVolumeExpansion": false,
            "mountOptions": ["noatime"]
        }))
        .await
        .unwrap();
    env
}

impl Env {
    /// A Node whose hostname label differs from its name, in zone z1.
    pub async fn node(&self, name: &str, hostname: &str) {
        self.server
            .store()
            .create(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": hostname, "topology.kubernetes.io/zone": "z1"}}
            }))
            .await
            .unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pvs(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    /// Waits, on the watch, until `pred` holds for the PVs matching `selector`.
    pub async fn wait_pvs(
        &self,
        selector: &str,
        what: &str,
        pred: impl Fn(&[PersistentVolume]) -> bool,
    ) -> Vec<PersistentVolume> {
        let (reader, writer) = reflector::store::<PersistentVolume>();
        let stream = watcher(self.pvs(), watcher::Config::default().labels(selector))
            .default_backoff()
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        // The watch is driven here; every object it delivers updates the
        // store, after which the predicate is checked.
        let wait = async {
            loop {
                match stream.next().await {
                    // Partial states during the initial list are not checked.
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    Some(Ok(_)) => {}
                    // The watcher relists by itself (a 410, a dropped
                    // watch, a fault the test injected); a watch that never
                    // recovers ends in the timeout below.
                    Some(Err(e)) => {
                        eprintln!("test PV watch error (retried): {e}");
                        continue;
                    }
                    None => panic!("PV watch ended"),
                }
                let now: Vec<PersistentVolume> =
                    reader.state().iter().map(|p| (**p).clone()).collect();
                if pred(&now) {
                    return now;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
    }

    /// Events the agent published, as (type, reason, note).
    pub async fn events(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for r in ["events.events.k8s.io", "events"] {
            for e in self.server.store().list(r).await.unwrap_or_default() {
                let s = |k: &str| {
                    e.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                let note = if e.get("note").is_some() {
                    s("note")
                } else {
                    s("message")
                };
                out.push((s("type"), s("reason"), note));
            }
        }
        out
    }
}

/// A running `disklet run`, killed with SIGKILL on drop. Its stderr goes to
/// a log file and to a channel the test reads markers from.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub log: PathBuf,
    /// Where it serves /metrics, /healthz and /readyz.
    pub http: std::net::SocketAddr,
}

impl Agent {
    pub fn start(env: &Env, name: &str, node: &str, config: &str) -> Agent {
        Self::start_with(env, name, node, config, &[])
    }

    /// With extra arguments (e.g. `--log-format json`).
    pub fn start_with(env: &Env, name: &str, node: &str, config: &str, extra: &[&str]) -> Agent {
        Self::start_raw(&env.kubeconfig, env.path(), name, node, config, extra)
    }

    /// Against any API server (the fake one or a real cluster).
    pub fn start_raw(
        kubeconfig: &Path,
        dir: &Path,
        name: &str,
        node: &str,
        config: &str,
        extra: &[&str],
    ) -> Agent {
        Self::start_full(kubeconfig, dir, name, node, config, extra, &[])
    }

    /// With extra environment variables (e.g. `DISKLET_FAILPOINTS`).
    pub fn start_env(
        env: &Env,
        name: &str,
        node: &str,
        config: &str,
        vars: &[(&str, &str)],
    ) -> Agent {
        Self::start_full(&env.kubeconfig, env.path(), name, node, config, &[], vars)
    }

    fn start_full(
        kubeconfig: &Path,
        dir: &Path,
        name: &str,
        node: &str,
        config: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Agent {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_disklet"))
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--node-name",
                node,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .envs(vars.iter().copied())
            .env("RUST_LOG", "disklet=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining into the file.
                }
            }
        });
        let mut agent = Agent {
            child,
            lines: rx,
            log,
            http: "0.0.0.0:0".parse().unwrap(),
        };
        let line = agent.wait_log("disklet agent starting");
        let at = line
            .find("127.0.0.1:")
            .expect("bound address in the start line");
        let addr: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        agent.http = addr.parse().unwrap();
        agent
    }

    /// A plain HTTP GET against the agent's health/metrics port.
    pub fn get(&self, path: &str) -> (u16, String) {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(self.http).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// Blocks until a log line containing `marker` appears (the agent's own
    /// signal), at most 60 s.
    pub fn wait_log(&self, marker: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(marker) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line with {marker:?} within 60s; log: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// The next log line, if one comes within `timeout`.
    pub fn recv_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for the process to end by itself (a failpoint), at most 60 s.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(std::time::Instant::now() < deadline, "agent did not exit");
            // Each log line, or 50 ms without one, is a chance to look again.
            let _ = self.lines.recv_timeout(Duration::from_millis(50));
        }
    }

    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!(
                "--- agent log {} (last 80 lines) ---\n{tail}",
                self.log.display()
            );
        }
    }
}

/// Unmounts everything mounted under a directory (deepest first) on drop:
/// the agent's mounts outlive it by design.
pub struct MountSweeper(pub PathBuf);

impl MountSweeper {
    pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut v: Vec<PathBuf> = disklet::host::mountinfo::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(dir))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    }

    pub fn sweep(&self) {
        for m in Self::mounts_under(&self.0) {
            if nix::mount::umount(&m).is_err() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for MountSweeper {
    fn drop(&mut self) {
        self.sweep();
    }
}

pub fn blkid(dev: &str, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag, dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---- Load tests (tests/load.rs, benches/load.rs) ----

impl Agent {
    /// The agent's process id, e.g. for `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Like `wait_log`, with a deadline chosen by the caller (a first pass
    /// over hundreds of disks takes longer than 60 s on a busy machine).
    pub fn wait_log_within(&self, marker: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(marker) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line with {marker:?} within {timeout:?}; log: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// The sum over all series of a metric family from `/metrics` (e.g.
    /// `disklet_reconciles_total`); `None` when the family is absent.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics answered {code}");
        metric_sum(&body, name)
    }
}

/// The sum of the samples named exactly `name` in a Prometheus text scrape.
pub fn metric_sum(scrape: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// Resident memory of a process in KiB: (`VmRSS` now, `VmHWM` peak).
pub fn proc_mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} missing in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Env {
    /// `wait_pvs` with a deadline chosen by the caller.
    pub async fn wait_pvs_within(
        &self,
        selector: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[PersistentVolume]) -> bool,
    ) -> Vec<PersistentVolume> {
        let (reader, writer) = reflector::store::<PersistentVolume>();
        let stream =
            watcher(self.pvs(), watcher::Config::default().labels(selector)).reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let wait = async {
            loop {
                match stream.next().await {
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("PV watch failed: {e}"),
                    None => panic!("PV watch ended"),
                }
                let now: Vec<PersistentVolume> =
                    reader.state().iter().map(|p| (**p).clone()).collect();
                if pred(&now) {
                    return now;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for: {what}"))
    }

    /// Writes a kubeconfig for this env's server whose requests are logged
    /// with `user == Some(token)`, so that several agents can be told apart.
    pub fn kubeconfig_as(&self, token: &str) -> PathBuf {
        let p = self.path().join(format!("kubeconfig-{token}"));
        self.server.write_kubeconfig_as(&p, token).unwrap();
        p
    }

    /// Seeds `n` PVs of `nodes` other nodes (`foreign-0` …), each as disklet
    /// itself builds and applies them (server-side apply, field manager
    /// `disklet`, every other one claimed), straight through the store.
    pub async fn seed_foreign_pvs(&self, n: usize, nodes: usize) {
        use disklet::model::{NodeInfo, ScInfo, Volume};
        let sc = ScInfo {
            reclaim_policy: "Delete".into(),
            mount_options: vec!["noatime".into()],
            ..Default::default()
        };
        let infos: Vec<NodeInfo> = (0..nodes)
            .map(|i| NodeInfo {
                name: format!("foreign-{i}"),
                uid: format!("00000000-0000-4000-8000-{i:012}"),
                hostname: format!("foreign-{i}.example.com"),
                labels: [(
                    "topology.kubernetes.io/zone".to_string(),
                    format!("z{}", i % 3),
                )]
                .into(),
            })
            .collect();
        let keys = ["topology.kubernetes.io/zone".to_string()];
        let store = self.server.store();
        for i in 0..n {
            let node = &infos[i % nodes];
            let uuid = format!("{i:08x}-0000-4000-8000-{:012x}", i * 7919);
            let v = Volume {
                key: format!("fs:{uuid}"),
                class: "fast".into(),
                mode: disklet::config::VolumeMode::Filesystem,
                access_mode: Default::default(),
                path: PathBuf::from(format!("/var/lib/disklet/fast/{uuid}/vol")),
                capacity_bytes: 3_998_614_470_656,
                fs_type: None,
                annotations: [
                    ("disklet.io/fs-uuid".to_string(), uuid.clone()),
                    (
                        "disklet.io/device-id".to_string(),
                        format!("wwn:0x5000c500{i:08x}"),
                    ),
                    (
                        "disklet.io/by-id".to_string(),
                        format!("/dev/disk/by-id/wwn-0x5000c500{i:08x}"),
                    ),
                ]
                .into(),
                create_blocked: None,
            };
            let pv = disklet::plan::pv::build_pv(&v, node, "local-fast", &sc, &keys);
            let name = pv.metadata.name.clone().unwrap();
            let mut body = serde_json::to_value(&pv).unwrap();
            body["apiVersion"] = json!("v1");
            body["kind"] = json!("PersistentVolume");
            if i % 2 == 0 {
                body["spec"]["claimRef"] = json!({
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": format!("team-{}", i % 40), "name": format!("data-{i}"),
                    "uid": format!("{i:08x}-1111-4000-8000-000000000000"),
                });
            }
            store
                .patch(
                    "persistentvolumes",
                    None,
                    &name,
                    disklet_fakeapi::PatchType::Apply,
                    &body,
                    false,
                    Some("disklet"),
                    true,
                )
                .await
                .unwrap();
        }
    }
}
