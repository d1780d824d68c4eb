//! The real control plane for a test binary: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok from
//! `scripts/test-cluster.sh`, built from pinned Go modules and cached by
//! version. One cluster per test binary, started by the first test that asks
//! for it and stopped when the binary exits (a watcher process reads a pipe
//! this process holds open; the kernel closes it on any exit, panics and
//! SIGKILL included). Tests are kept apart by names: each test's [`Scope`]
//! prefixes its Nodes, namespaces and StorageClasses with its own id.
//!
//! A test that fails keeps the components' logs: its `Scope` copies them to
//! `target/cluster-logs/<scope id>/` and prints the path.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::agent::{Agent, MountSweeper};
use super::Loop;

/// The running control plane.
pub struct Cluster {
    /// The `up` dir: `admin.kubeconfig`, `pki/`, `logs/`, `pids/`.
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// The dir of the component binaries (kubectl among them).
    pub bin: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The real kubelet's node (`up DIR --kubelet`), if this cluster has one.
    pub kubelet: Option<KubeletNode>,
    /// Held open until the process exits; the watcher then runs `down`.
    _watch: Mutex<ChildStdin>,
}

/// The node of the real kubelet (containerd, runc, CNI) on this machine.
pub struct KubeletNode {
    pub name: String,
    /// kubelet's `--root-dir`: pods' volumes are mounted under `pods/<uid>/volumes/`.
    pub root: PathBuf,
    /// The one workload image it has (busybox, imported: no registry is reachable).
    pub image: String,
    /// The file holding the kubelet's pid.
    pub pid_file: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static KUBELET_CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo().join("scripts/test-cluster.sh")
}

/// The binary's cluster, started on first use (the first start on a machine
/// builds the components, which takes minutes; later starts take seconds).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| start(false))
}

/// The binary's cluster with one real kubelet node beside the kwok ones
/// (`scripts/test-cluster.sh up DIR --kubelet`). A test binary uses either
/// this or [`cluster`], never both.
pub fn kubelet_cluster() -> &'static Cluster {
    KUBELET_CLUSTER.get_or_init(|| start(true))
}

/// The cluster this binary has started: the kubelet one if it has, else
/// [`cluster`] (started now if need be).
pub fn started() -> &'static Cluster {
    KUBELET_CLUSTER.get().unwrap_or_else(cluster)
}

fn start(kubelet: bool) -> Cluster {
    let exe = std::env::current_exe().unwrap();
    let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
    // The kubelet node's sockets live under its dir, and a unix socket's
    // path has at most 107 bytes (kubelet's plugins_registry/<driver>-reg.sock
    // under target/tmp/ would pass it): that cluster gets a short dir.
    let dir = if kubelet {
        std::env::temp_dir().join(format!("dkl-{}", std::process::id()))
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-{stem}-{}", std::process::id()))
    };
    let _ = std::fs::remove_dir_all(&dir);
    let mut up = Command::new("bash");
    up.arg(script()).arg("up").arg(&dir);
    if kubelet {
        up.arg("--kubelet");
    }
    let st = up.stdin(Stdio::null()).status().unwrap();
    assert!(
        st.success(),
        "scripts/test-cluster.sh up {} failed (see its output above)",
        dir.display()
    );
    // The watcher: `down` and cleanup once this process's end closes the pipe.
    // Never waited for: it must outlive this process to do its job.
    #[allow(clippy::zombie_processes)]
    let mut watcher = Command::new("bash")
        .args([
            "-c",
            "cat >/dev/null; bash \"$0\" down \"$1\" 2>/dev/null; rm -rf \"$1\"",
        ])
        .arg(script())
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let watch = watcher.stdin.take().unwrap();
    let env = std::fs::read_to_string(dir.join("cluster.env")).unwrap();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let kubelet = kubelet.then(|| KubeletNode {
        name: get("NODE_NAME"),
        root: Path::new(&get("NODE_DIR")).join("kubelet"),
        image: get("NODE_IMAGE"),
        pid_file: dir.join("pids/kubelet"),
    });
    Cluster {
        kubelet,
        kubeconfig: dir.join("admin.kubeconfig"),
        bin: PathBuf::from(get("BIN")),
        server: format!("https://127.0.0.1:{}", get("APISERVER_PORT")),
        dir,
        _watch: Mutex::new(watch),
    }
}

impl Cluster {
    /// A client with the admin's (system:masters) credentials.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }

    /// Runs the cluster's own kubectl as admin; panics with its stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A kubeconfig for this cluster that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            self.server,
            self.dir.join("pki/ca.crt").display()
        );
        std::fs::write(path, text).unwrap();
    }

    /// The apiserver's audit record of every request made with a token of a
    /// ServiceAccount in `disklet-system` (the agents'), one per request,
    /// oldest first: a watch is there from when its response started.
    pub fn audit(&self) -> Vec<Audit> {
        let text = std::fs::read_to_string(self.dir.join("logs/audit.log")).unwrap_or_default();
        let mut out: Vec<Audit> = Vec::new();
        let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let records = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let s = |p: &str| {
                    v.pointer(p)
                        .and_then(|x| x.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                Audit {
                    user: s("/user/username"),
                    node: s("/user/extra/authentication.kubernetes.io~1node-name/0"),
                    verb: s("/verb"),
                    resource: s("/objectRef/resource"),
                    name: s("/objectRef/name"),
                    code: v
                        .pointer("/responseStatus/code")
                        .and_then(|c| c.as_u64())
                        .unwrap_or(0) as u16,
                    user_agent: s("/userAgent"),
                    uri: s("/requestURI"),
                    message: s("/responseStatus/message"),
                    stage: s("/stage"),
                    id: s("/auditID"),
                }
            });
        // A long-running request (a watch) has a record when its response
        // starts and one when it ends: the later one (its final code) wins.
        for a in records {
            match at.get(&a.id) {
                Some(&i) => out[i] = a,
                None => {
                    at.insert(a.id.clone(), out.len());
                    out.push(a);
                }
            }
        }
        out
    }

    /// The components' logs, copied to `target/cluster-logs/<name>/`.
    pub fn keep_logs(&self, name: &str) -> PathBuf {
        let to = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("../cluster-logs")
            .join(name);
        std::fs::create_dir_all(&to).unwrap();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            for e in rd.flatten() {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        to
    }
}

pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// One request in the apiserver's audit log.
#[derive(Debug, Clone)]
pub struct Audit {
    pub user: String,
    /// The node the token is bound to (`authentication.kubernetes.io/node-name`).
    pub node: String,
    pub verb: String,
    pub resource: String,
    pub name: String,
    pub code: u16,
    pub user_agent: String,
    /// Path and query as sent.
    pub uri: String,
    /// The error's message, if it failed.
    pub message: String,
    /// `ResponseStarted` (a watch still open) or `ResponseComplete`.
    pub stage: String,
    pub id: String,
}

impl Audit {
    /// A query parameter of the request, decoded.
    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.uri.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| percent_decode(v))
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the object `name` exists and `pred` holds for it, on a watch.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug + Send + 'static,
{
    match try_wait_for(api, name, what, timeout, pred).await {
        Ok(o) => o,
        Err(why) => panic!("{why}"),
    }
}

/// [`wait_for`], giving back on timeout what it would panic with: the last
/// seen object's `status` first, on one line (CI shows a failure's first
/// lines), then the object without its managedFields.
pub async fn try_wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&K) -> bool,
) -> Result<K, String>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut last: Option<K> = None;
    let wait = async {
        let mut stream = std::pin::pin!(watcher::watcher(api.clone(), cfg));
        while let Some(ev) = stream.next().await {
            let objs = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("test watch error (retried): {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            for o in objs {
                if pred(&o) {
                    return o;
                }
                last = Some(o);
            }
        }
        panic!("watch ended")
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(o) => Ok(o),
        Err(_) => Err(format!(
            "timed out after {timeout:?} waiting for {what}; last seen: {}",
            brief(last.as_ref())
        )),
    }
}

/// An API object for a failure message: its `status` on one line, then the
/// rest without `metadata.managedFields`.
pub fn brief<K: serde::Serialize>(o: Option<&K>) -> String {
    let Some(mut v) = o.and_then(|o| serde_json::to_value(o).ok()) else {
        return "nothing".into();
    };
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.remove("managedFields");
    }
    let status = v
        .as_object_mut()
        .and_then(|m| m.remove("status"))
        .unwrap_or_default();
    format!("status {status}\nobject {v:#}")
}

/// Waits until no object `name` exists, on a watch.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, what: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + timeout;
    // A watch on one name reports its deletion; re-checked with a get so a
    // delete that happened before the watch started counts too.
    loop {
        match api.get_opt(name).await.unwrap() {
            None => return,
            Some(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for {what}"
                );
                let mut stream = std::pin::pin!(watcher::watcher(
                    api.clone(),
                    watcher::Config::default().fields(&format!("metadata.name={name}"))
                ));
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(ev) = stream.next().await {
                        if let Ok(watcher::Event::Delete(_)) = ev {
                            return;
                        }
                    }
                })
                .await;
            }
        }
    }
}

/// Waits until the objects matching `lp` satisfy `pred`, on a watch.
pub async fn wait_list<K>(
    api: &Api<K>,
    selector: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[K]) -> bool,
) -> Vec<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    use kube::runtime::{reflector, WatchStreamExt};
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api.clone(), watcher::Config::default().labels(selector))
        .default_backoff()
        .reflect(writer);
    let wait = async {
        let mut stream = std::pin::pin!(stream);
        loop {
            match stream.next().await {
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("test watch error (retried): {e}");
                    continue;
                }
                None => panic!("watch ended"),
            }
            let now: Vec<K> = reader.state().iter().map(|o| (**o).clone()).collect();
            if pred(&now) {
                return now;
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(v) => v,
        Err(_) => {
            let now: Vec<K> = reader.state().iter().map(|o| (**o).clone()).collect();
            panic!("timed out after {timeout:?} waiting for {what}; now: {now:#?}")
        }
    }
}

/// One test's corner of the shared cluster: every object it makes is named
/// `<id>-…`, so tests running at once never see each other's Nodes, claims or
/// classes. On drop its Nodes are deleted; after a failure the components'
/// logs are kept.
pub struct Scope {
    pub id: String,
    pub cluster: &'static Cluster,
    pub client: kube::Client,
    nodes: Mutex<Vec<String>>,
}

impl Scope {
    pub async fn new(test: &str) -> Scope {
        Scope::on(cluster(), test).await
    }

    /// A scope on the cluster with the real kubelet node.
    pub async fn with_kubelet(test: &str) -> Scope {
        Scope::on(kubelet_cluster(), test).await
    }

    async fn on(c: &'static Cluster, test: &str) -> Scope {
        // A short id from the test's name: DNS-label safe and stable.
        let h = test.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let id = format!("t{:06x}", h & 0xffffff);
        Scope {
            id,
            cluster: c,
            client: c.client().await,
            nodes: Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self, s: &str) -> String {
        format!("{}-{s}", self.id)
    }

    /// A Node that kwok keeps Ready, named `<id>-<n>`, with its hostname label
    /// (= its name unless `labels` says otherwise) and `labels`; returns its name
    /// once it is Ready.
    pub async fn node(&self, n: &str, labels: &[(&str, &str)]) -> String {
        let name = self.name(n);
        let mut l: BTreeMap<String, String> = [
            ("kubernetes.io/hostname".to_string(), name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("type".to_string(), "kwok".to_string()),
        ]
        .into();
        for (k, v) in labels {
            l.insert(k.to_string(), v.to_string());
        }
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": l,
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
        }))
        .unwrap();
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes.create(&PostParams::default(), &node).await.unwrap();
        self.nodes.lock().unwrap().push(name.clone());
        wait_for(
            &nodes,
            &name,
            &format!("node {name} Ready (kwok)"),
            Duration::from_secs(60),
            |n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            },
        )
        .await;
        name
    }

    /// A namespace `<id>-<n>`, returned once its default ServiceAccount exists
    /// (pods are refused before).
    pub async fn namespace(&self, n: &str) -> String {
        let name = self.name(n);
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &name);
        wait_for(
            &sas,
            "default",
            "the default ServiceAccount",
            Duration::from_secs(60),
            |_| true,
        )
        .await;
        name
    }

    /// A no-provisioner, WaitForFirstConsumer StorageClass `<id>-<n>`, with
    /// `extra` merged into it (reclaimPolicy, allowedTopologies, mountOptions).
    pub async fn storage_class(&self, n: &str, extra: serde_json::Value) -> String {
        let name = self.name(n);
        let mut sc = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        });
        if let (Some(o), Some(e)) = (sc.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        self.apply_json(&sc).await;
        name
    }

    /// Server-side apply of any object as the test (field manager `test`).
    pub async fn apply_json(&self, obj: &serde_json::Value) {
        let gvk = kube::api::GroupVersionKind::try_from(&kube::api::TypeMeta {
            api_version: obj["apiVersion"].as_str().unwrap().into(),
            kind: obj["kind"].as_str().unwrap().into(),
        })
        .unwrap();
        let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap();
        let api: Api<kube::api::DynamicObject> = match obj["metadata"]["namespace"].as_str() {
            Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(self.client.clone(), ns, &ar)
            }
            _ => Api::all_with(self.client.clone(), &ar),
        };
        api.patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
    }

    /// A token of deploy/'s ServiceAccount `disklet-system/disklet`, bound to
    /// the DaemonSet's pod on `node` (so it carries the node's name, as the
    /// token kubelet mounts into that pod does), in a kubeconfig at `path`.
    /// Needs `kubectl apply -k deploy/` first.
    pub async fn agent_kubeconfig(&self, node: &str, path: &Path) {
        let pod = self.daemonset_pod(node).await;
        let token = self.pod_token(&pod).await;
        self.cluster.kubeconfig_with_token(path, &token);
    }

    /// The disklet DaemonSet's pod on `node`, once it exists.
    pub async fn daemonset_pod(&self, node: &str) -> Pod {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "disklet-system");
        let lp = "app.kubernetes.io/name=disklet";
        let found = wait_list(
            &pods,
            lp,
            &format!("the disklet pod on {node}"),
            Duration::from_secs(60),
            |ps| {
                ps.iter().any(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                        && p.metadata.deletion_timestamp.is_none()
                })
            },
        )
        .await;
        found
            .into_iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .unwrap()
    }

    /// A TokenRequest for the pod's ServiceAccount bound to the pod.
    pub async fn pod_token(&self, pod: &Pod) -> String {
        let ns = pod.metadata.namespace.clone().unwrap();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap();
        let tr: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": ["https://kubernetes.default.svc.cluster.local"],
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                    "name": pod.metadata.name, "uid": pod.metadata.uid},
            }
        }))
        .unwrap();
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &ns);
        let out: TokenRequest = sas
            .create_subresource("token", &sa, &PostParams::default(), &tr)
            .await
            .unwrap();
        out.status.unwrap().token
    }

    /// `kubectl apply -k deploy/` once per cluster (every test that needs
    /// deploy/'s RBAC calls it; the apply is idempotent).
    pub fn apply_deploy(&self) {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| match &self.cluster.kubelet {
            None => {
                self.cluster.kubectl(&["apply", "-k", "deploy/"]);
            }
            Some(k) => self.apply_off("deploy/", &k.name),
        });
    }

    /// `kubectl apply -k DIR`, with its DaemonSets kept off the real
    /// kubelet's node when the cluster has one.
    pub fn apply_kustomize(&self, dir: &str) {
        match &self.cluster.kubelet {
            None => {
                self.cluster.kubectl(&["apply", "-k", dir]);
            }
            Some(k) => self.apply_off(dir, &k.name),
        }
    }

    /// A kustomize dir of deploy/ with its DaemonSets kept off the real
    /// kubelet's node: there they would run, as root, an agent and a driver
    /// configured for every disk of this machine. The tests' agent and
    /// driver on that node are processes of their own.
    fn apply_off(&self, dir: &str, node: &str) {
        let text = self.cluster.kubectl(&["kustomize", dir]);
        let mut items: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for ds in items.iter_mut().filter(|d| d["kind"] == "DaemonSet") {
            ds["spec"]["template"]["spec"]["affinity"] = json!({"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/hostname",
                                           "operator": "NotIn", "values": [node]}]}]}}});
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let mut child = Command::new(self.cluster.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.cluster.kubeconfig.display()
            ))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(list.to_string().as_bytes())
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "kubectl apply of deploy/ failed"
        );
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let to = self.cluster.keep_logs(&self.id);
            eprintln!(
                "--- control plane logs of {} kept in {} ---",
                self.id,
                to.display()
            );
        }
        let nodes = self.nodes.lock().unwrap().clone();
        if !nodes.is_empty() {
            let mut args = vec!["delete", "node", "--wait=false", "--ignore-not-found"];
            args.extend(nodes.iter().map(String::as_str));
            let _ = self.cluster.kubectl_output(&args);
        }
    }
}

/// Deletes with a grace period of 0, ignoring "not found".
pub async fn delete<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete {name}: {e}"),
    }
}

/// List helper with a label selector.
pub async fn list<K>(api: &Api<K>, selector: &str) -> Vec<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
}

/// Waits until deploy/'s admission policy (deploy/base/admission.yaml) is in
/// force for the agent token in `kubeconfig`: the apiserver loads a new
/// policy a moment after it is created, so an agent started at once could
/// write unchecked. The probe is a dry-run create of a PV for another node,
/// retried until the policy refuses it.
pub async fn wait_policy_effective(kubeconfig: &Path) {
    let api: Api<PersistentVolume> = Api::all(client_from(kubeconfig).await);
    let probe = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "disklet-policy-probe", "labels": {"disklet.io/node": "no-such-node"}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "local": {"path": "/nonexistent"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": ["no-such-node"]}]}]}}}
    });
    let pp = PatchParams::apply("disklet-test").force().dry_run();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match api
            .patch("disklet-policy-probe", &pp, &Patch::Apply(&probe))
            .await
        {
            Err(kube::Error::Api(e))
                if e.code == 403 && e.message.contains("disklet-node-scoped-pvs") =>
            {
                return
            }
            r => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "deploy/'s admission policy did not take effect within 60 s: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One kwok Node with its own disklet agent as a real process: its own temp
/// dir holding the loop devices' backing files, hostDir and kubelet dir, and a
/// kubeconfig with a token of deploy/'s ServiceAccount bound to the
/// DaemonSet's pod on the node. Fields drop in order: the agent is killed,
/// its mounts swept, the loops detached, the dir removed.
pub struct NodeRig {
    pub agent: Option<Agent>,
    pub node: String,
    _sweep: MountSweeper,
    pub loops: Vec<Loop>,
    pub kubeconfig: PathBuf,
    pub config: String,
    pub dir: tempfile::TempDir,
}

/// An agent config selecting only loops backed by files under `<dir>/<sub>/`,
/// one class per `(class, storageClassName, subdir, extra class YAML)`, with
/// `top` (e.g. `topologyKeys: [...]`) at the top level.
pub fn loop_config(dir: &Path, top: &str, classes: &[(&str, &str, &str, &str)]) -> String {
    let d = dir.display();
    let mut s = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\n{top}\nclasses:\n"
    );
    for (class, sc, sub, extra) in classes {
        s.push_str(&format!(
            "  - name: {class}\n    storageClassName: {sc}\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/{sub}/*.img\"], types: [loop]}}\n"
        ));
        for l in extra.lines().filter(|l| !l.trim().is_empty()) {
            s.push_str(&format!("    {l}\n"));
        }
    }
    s
}

impl Scope {
    /// A Node and its agent (deploy/ is applied first, for the agent's token).
    pub async fn rig(
        &self,
        n: &str,
        labels: &[(&str, &str)],
        config: impl Fn(&Path) -> String,
    ) -> NodeRig {
        self.apply_deploy();
        let node = self.node(n, labels).await;
        let pod = self.daemonset_pod(&node).await;
        self.rig_with(&node, &pod, |d| config(d)).await
    }

    /// An agent for `node` with a token of deploy/'s ServiceAccount bound to
    /// `pod` (a pod of that account on that node).
    pub async fn rig_with(
        &self,
        node: &str,
        pod: &Pod,
        config: impl Fn(&Path) -> String,
    ) -> NodeRig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kubelet")).unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let token = self.pod_token(pod).await;
        self.cluster.kubeconfig_with_token(&kubeconfig, &token);
        wait_policy_effective(&kubeconfig).await;
        let config = config(dir.path());
        let agent = Agent::start_raw(&kubeconfig, dir.path(), "agent", node, &config, &[]);
        NodeRig {
            agent: Some(agent),
            node: node.to_string(),
            _sweep: MountSweeper(dir.path().to_path_buf()),
            loops: Vec::new(),
            kubeconfig,
            config,
            dir,
        }
    }
}

impl NodeRig {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A loop device of `mib` MiB backed by `<dir>/<sub>/<name>.img`.
    pub fn disk(&mut self, sub: &str, name: &str, mib: u64) -> &Loop {
        let lp = Loop::new(&self.dir.path().join(sub), name, mib);
        lp.assert_ours();
        self.loops.push(lp);
        self.loops.last().unwrap()
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Pulls the disks `which` selects as a real pull would: the agent is
    /// stopped, every mount under hostDir goes (a pulled disk takes its mount
    /// with it; a loop cannot be detached while mounted), the loops are
    /// detached, and a new agent starts (and mounts the remaining disks again).
    pub fn pull(&mut self, which: impl Fn(&Loop) -> bool) -> Vec<PathBuf> {
        drop(self.agent.take());
        MountSweeper(self.dir.path().join("hostdir")).sweep();
        let (gone, kept): (Vec<Loop>, Vec<Loop>) = self.loops.drain(..).partition(|l| which(l));
        self.loops = kept;
        let files = gone.iter().map(|l| l.file.clone()).collect();
        drop(gone);
        self.restart();
        files
    }

    /// Attaches a backing file (a pulled disk) again.
    pub fn plug(&mut self, file: &Path) -> &Loop {
        let name = file.file_stem().unwrap().to_str().unwrap();
        let lp = Loop::new(file.parent().unwrap(), name, 0);
        lp.assert_ours();
        self.loops.push(lp);
        self.loops.last().unwrap()
    }

    /// Kills the agent and starts a new one with the same config and token.
    pub fn restart(&mut self) {
        drop(self.agent.take());
        self.agent = Some(Agent::start_raw(
            &self.kubeconfig,
            self.dir.path(),
            "agent",
            &self.node,
            &self.config,
            &[],
        ));
    }
}

/// Selects the PVs of these nodes.
pub fn nodes_selector(nodes: &[&str]) -> String {
    format!("disklet.io/node in ({})", nodes.join(","))
}

pub fn phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn name_of<K: Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap()
}

/// The values of `key` in a PV's required node affinity (first term).
pub fn affinity(pv: &PersistentVolume, key: &str) -> Vec<String> {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| {
            r.node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .filter(|e| e.key == key)
                .flat_map(|e| e.values.clone().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// How long the claim helpers below wait for the cluster to act.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn pvs(s: &Scope) -> Api<PersistentVolume> {
    Api::all(s.client.clone())
}

pub async fn bound_pv(s: &Scope, ns: &str, claim: &str) -> PersistentVolume {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), ns);
    let c = wait_for(&pvcs, claim, &format!("claim {claim} Bound"), WAIT, |c| {
        c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
    })
    .await;
    let pv = c.spec.unwrap().volume_name.unwrap();
    pvs(s).get(&pv).await.unwrap()
}

pub async fn running_pod(s: &Scope, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), ns);
    wait_for(&pods, name, &format!("pod {name} Running"), WAIT, |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
}

/// Waits for `n` Available PVs on these nodes.
pub async fn available(s: &Scope, nodes: &[&str], n: usize) -> Vec<PersistentVolume> {
    wait_list(
        &pvs(s),
        &nodes_selector(nodes),
        &format!("{n} Available PVs on {nodes:?}"),
        WAIT,
        |p| p.iter().filter(|pv| phase(pv) == "Available").count() == n,
    )
    .await
}

/// The events.k8s.io Events about `object` (a Node or a PV), as (type, reason, note).
pub async fn events_about(s: &Scope, object: &str) -> Vec<(String, String, String)> {
    use k8s_openapi::api::events::v1::Event;
    let api: Api<Event> = Api::all(s.client.clone());
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

pub fn local_path(pv: &PersistentVolume) -> std::path::PathBuf {
    std::path::PathBuf::from(&pv.spec.as_ref().unwrap().local.as_ref().unwrap().path)
}

pub fn ann<'a>(pv: &'a PersistentVolume, k: &str) -> Option<&'a str> {
    pv.metadata.annotations.as_ref()?.get(k).map(String::as_str)
}
