//! The CSI mode on the real control plane (tests/csi_e2e.rs, benches/claims.rs):
//! per kwok Node an agent with a `pool` class, `disklet csi` and the real
//! sidecars run with deploy/overlays/csi's args and its ServiceAccount's
//! token; the cluster's snapshot CRDs and snapshot-controller; and kubelet's
//! part, which kwok does not play (the CSINode registration, NodeStage,
//! NodePublish and NodeExpand calls with kubelet's paths).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use disklet::csi::proto::node_client::NodeClient;
use disklet::csi::proto::volume_capability::access_mode::Mode;
use disklet::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use disklet::csi::proto::*;
use disklet::model::Quantity;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::Api;
use serde_json::json;
use tonic::transport::Channel;

use super::agent::MountSweeper;
use super::cluster::*;

pub const DRIVER: &str = "csi.disklet.io";
pub const NS: &str = "disklet-system";
pub const MIB: u64 = 1 << 20;

/// A process of the test, killed on drop; its output in `<dir>/<name>.log`.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}")),
    )
}

/// The cluster-wide parts, once per test binary: deploy/ and the csi
/// overlay applied, the VolumeSnapshot CRDs established, snapshot-controller
/// running (as the cluster's admin: it is the cluster's, not disklet's).
pub fn snapshot_infra(s: &Scope) {
    static RUNNING: OnceLock<Proc> = OnceLock::new();
    RUNNING.get_or_init(|| {
        s.apply_deploy();
        let crds = s.cluster.bin.join("snapshot-crds.yaml");
        s.cluster
            .kubectl(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        s.cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumesnapshots.snapshot.storage.k8s.io",
            "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
        ]);
        s.apply_kustomize("deploy/overlays/csi");
        let dir = s.cluster.dir.join("logs");
        let p = spawn(
            &dir,
            "snapshot-controller",
            Command::new(s.cluster.bin.join("snapshot-controller"))
                .arg(format!("--kubeconfig={}", s.cluster.kubeconfig.display()))
                .args([
                    "--leader-election=false",
                    "--enable-distributed-snapshotting",
                    "--retry-interval-start=200ms",
                    "--v=3",
                ]),
        );
        // A static is never dropped: the cluster's watcher stops it with the
        // cluster when this binary exits (scripts/test-cluster.sh down).
        std::fs::write(
            s.cluster.dir.join("pids/snapshot-controller"),
            p.0.id().to_string(),
        )
        .unwrap();
        p
    });
}

/// One kwok Node serving CSI volumes: its agent with a `pool` class on one
/// loop device, `disklet csi`, and the sidecars. Fields drop in order:
/// sidecars and driver stopped, the test's kubelet mounts and the volumes'
/// loop devices undone, then the rig (agent, pool mount, loops).
pub struct CsiNode {
    /// The sidecars, then the driver.
    procs: Vec<Proc>,
    _volumes: VolumeSweeper,
    pub sock: PathBuf,
    /// Where the pool is mounted.
    pub pool: PathBuf,
    pub rig: NodeRig,
    kubeconfig: PathBuf,
    pod_name: String,
    bin: PathBuf,
    /// On the real kubelet's node: the registration socket the registrar
    /// serves in kubelet's plugins_registry (kwok nodes get a CSINode from
    /// the test instead).
    registration: Option<PathBuf>,
}

impl Drop for CsiNode {
    /// The registrar is killed (SIGKILL) with the other processes: its socket
    /// goes too, so kubelet drops the registration and a later test's CSINode
    /// is its own.
    fn drop(&mut self) {
        self.procs.clear();
        if let Some(reg) = &self.registration {
            let _ = std::fs::remove_file(reg);
        }
    }
}

/// What a driver attached or mounted for a rig, undone on drop (before the
/// rig's own sweep, so the pool can be unmounted): the stage and publish
/// mounts under `mounts` (the test's kubelet dir, csi-sanity's dirs), then
/// the volumes' loop devices under the rig's hostDir.
pub struct VolumeSweeper {
    pub mounts: PathBuf,
    pub hostdir: PathBuf,
}

impl Drop for VolumeSweeper {
    fn drop(&mut self) {
        MountSweeper(self.mounts.clone()).sweep();
        super::detach_loops_under(&self.hostdir);
    }
}

pub async fn csi_node(s: &Scope, n: &str, sc: &str, pool_mib: u64) -> CsiNode {
    snapshot_infra(s);
    let rig = s
        .rig(n, &[], |d| {
            loop_config(d, "", &[("pool", sc, "disks", "kind: pool")])
        })
        .await;
    // The csi DaemonSet's ServiceAccount, with a token bound to its pod on
    // this node, for the driver and every sidecar, as in the overlay.
    let pod = daemonset_pod_of(s, "disklet-csi", &rig.node).await;
    // What node-driver-registrar and kubelet would register.
    s.apply_json(&json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
        "metadata": {"name": rig.node},
        "spec": {"drivers": [{"name": DRIVER, "nodeID": rig.node,
            "topologyKeys": ["kubernetes.io/hostname"], "allocatable": {"count": 1000}}]},
    }))
    .await;
    serve_csi(s, rig, pool_mib, &pod, None).await
}

/// The real kubelet's node serving CSI volumes: its agent with a `pool`
/// class, `disklet csi` and the sidecars as on a kwok node, with tokens
/// bound to stand-in pods there, and the driver registered with the real
/// kubelet, which then makes the CSINode and every NodeStage and
/// NodePublish call itself.
pub async fn csi_kubelet_node(s: &Scope, sc: &str, pool_mib: u64) -> CsiNode {
    snapshot_infra(s);
    let rig = s
        .kubelet_rig(|d| loop_config(d, "", &[("pool", sc, "disks", "kind: pool")]))
        .await;
    let pod = s.stand_in_pod("disklet-csi", "csi").await;
    serve_csi(s, rig, pool_mib, &pod, Some(s.kubelet_node())).await
}

/// `rig`'s pool disk of `pool_mib` MiB, mounted by its agent, then the
/// driver and the sidecars with a token bound to `pod`. On the real
/// kubelet's node the driver is registered with it, and what a failing test
/// leaves mounted is under kubelet's root; elsewhere under the rig's
/// kubelet dir, where the test plays kubelet.
async fn serve_csi(
    s: &Scope,
    mut rig: NodeRig,
    pool_mib: u64,
    pod: &Pod,
    kubelet: Option<&KubeletNode>,
) -> CsiNode {
    rig.disk("disks", "p1", pool_mib);
    let pool = pool_mount(&rig.path().join("hostdir"));
    let dir = rig.path().to_path_buf();
    let token = s.pod_token(pod).await;
    let kubeconfig = dir.join("csi.kubeconfig");
    s.cluster.kubeconfig_with_token(&kubeconfig, &token);
    let mut node = CsiNode {
        procs: Vec::new(),
        _volumes: VolumeSweeper {
            mounts: kubelet.map_or_else(|| dir.join("kubelet"), |k| k.root.clone()),
            hostdir: dir.join("hostdir"),
        },
        sock: dir.join("csi.sock"),
        pool,
        rig,
        kubeconfig,
        pod_name: pod.metadata.name.clone().unwrap(),
        bin: s.cluster.bin.clone(),
        registration: kubelet.map(|k| k.root.join(format!("plugins_registry/{DRIVER}-reg.sock"))),
    };
    node.start();
    node
}

impl CsiNode {
    /// Starts `disklet csi` and, once its socket is there, the sidecars as
    /// deploy/overlays/csi runs them: its containers' args and fieldRef envs,
    /// with this node's socket, token and names put in, and faster retries
    /// and more logging for the test.
    fn start(&mut self) {
        let dir = self.rig.path().to_path_buf();
        let sock = self.sock.clone();
        let _ = std::fs::remove_file(&sock);
        let driver = overlay_containers()
            .iter()
            .find(|c| c.name == "disklet-csi")
            .unwrap();
        assert_eq!(driver.args, ["csi", "--endpoint=unix:///csi/csi.sock"]);
        let driver = spawn(
            &dir,
            "disklet-csi",
            Command::new(env!("CARGO_BIN_EXE_disklet"))
                .args(["csi", "--node-name", &self.rig.node])
                .arg(format!("--endpoint=unix://{}", sock.display()))
                .arg("--config")
                .arg(dir.join("agent.yaml"))
                .env("KUBECONFIG", &self.kubeconfig),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "disklet csi made no socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        let field = |path: &str| match path {
            "spec.nodeName" => self.rig.node.clone(),
            "metadata.namespace" => NS.to_string(),
            "metadata.name" => self.pod_name.clone(),
            other => panic!("the overlay sets an env from {other}, which this test does not know"),
        };
        let mut procs = Vec::new();
        let mut owner_level_set = false;
        for c in overlay_containers() {
            if !["csi-provisioner", "csi-snapshotter", "csi-resizer"].contains(&c.name.as_str()) {
                continue;
            }
            let mut cmd = Command::new(self.bin.join(&c.name));
            for a in &c.args {
                match a.as_str() {
                    "--csi-address=/csi/csi.sock" => {
                        cmd.arg(format!("--csi-address={}", sock.display()))
                    }
                    // On the kubelet node the token's pod is a stand-in with
                    // no DaemonSet above it: the capacities are owned by it.
                    "--capacity-ownerref-level=1" if self.registration.is_some() => {
                        owner_level_set = true;
                        cmd.arg("--capacity-ownerref-level=0")
                    }
                    a => cmd.arg(a),
                };
            }
            cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(["--retry-interval-start=200ms", "--v=3"]);
            for (k, path) in &c.env {
                cmd.env(k, field(path));
            }
            procs.push(spawn(&dir, &c.name, &mut cmd));
        }
        assert_eq!(
            procs.len(),
            3,
            "the overlay's sidecars: {:?}",
            overlay_containers()
        );
        if let Some(reg) = &self.registration {
            assert!(
                owner_level_set,
                "the overlay's csi-provisioner no longer has --capacity-ownerref-level=1: see csi_kubelet_node"
            );
            procs.push(spawn(
                &dir,
                "registrar",
                Command::new(self.bin.join("registrar"))
                    .arg(format!("--driver-name={DRIVER}"))
                    .arg(format!("--csi-address={}", sock.display()))
                    .arg(format!("--registration-socket={}", reg.display())),
            ));
        }
        // Dropped last: the sidecars stop before the driver they call.
        procs.push(driver);
        self.procs = procs;
    }

    /// The pod restarts: driver, sidecars and agent killed and started again;
    /// every mount stays, as it does for a container restart.
    pub fn restart(&mut self) {
        self.procs.clear();
        self.rig.restart();
        self.start();
    }

    /// A reboot: the processes killed, every mount gone (kubelet's and the
    /// pool's) and every volume's loop device detached, then the agent (which
    /// mounts the pool disk again), the driver and the sidecars started.
    pub fn reboot(&mut self) {
        self.procs.clear();
        MountSweeper(self.rig.path().join("kubelet")).sweep();
        super::detach_loops_under(&self.rig.path().join("hostdir"));
        self.rig.pull(|_| false);
        self.pool = pool_mount(&self.rig.path().join("hostdir"));
        self.start();
    }
}

/// A container of the overlay's DaemonSet disklet-csi: its args and the envs
/// it takes from fieldRefs (name, fieldPath).
#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The containers of DaemonSet disklet-csi as `kubectl kustomize
/// deploy/overlays/csi` renders them.
pub fn overlay_containers() -> &'static [Container] {
    static C: OnceLock<Vec<Container>> = OnceLock::new();
    C.get_or_init(|| {
        let text = started().kubectl(&["kustomize", "deploy/overlays/csi"]);
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "disklet-csi")
            .expect("deploy/overlays/csi renders no DaemonSet disklet-csi");
        let strs = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap().to_string())
                .collect()
        };
        ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Container {
                name: c["name"].as_str().unwrap().to_string(),
                args: strs(&c["args"]),
                env: c["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
                        Some((e["name"].as_str().unwrap().to_string(), path.to_string()))
                    })
                    .collect(),
            })
            .collect()
    })
}

/// The pod of DaemonSet `app` on `node`, once the DaemonSet controller made it.
pub async fn daemonset_pod_of(s: &Scope, app: &str, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let on = |p: &Pod| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.metadata.deletion_timestamp.is_none()
    };
    let found = wait_list(
        &pods,
        &format!("app.kubernetes.io/name={app}"),
        &format!("the {app} pod on {node}"),
        Duration::from_secs(60),
        |ps| ps.iter().any(on),
    )
    .await;
    found.into_iter().find(on).unwrap()
}

/// The pool's mount point, once the agent has mounted it.
pub fn pool_mount(hostdir: &Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(m) = MountSweeper::mounts_under(hostdir).into_iter().next() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "the agent mounted no pool under {}",
            hostdir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A CSI StorageClass `<id>-<n>` (WaitForFirstConsumer), `extra` merged in.
pub async fn csi_class(s: &Scope, n: &str, extra: serde_json::Value) -> String {
    let mut sc = json!({"provisioner": DRIVER, "allowVolumeExpansion": true});
    for (k, v) in extra.as_object().unwrap() {
        sc[k] = v.clone();
    }
    s.storage_class(n, sc).await
}

pub fn bytes(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> u64 {
    Quantity::from_str(&q.0).unwrap_or_else(|e| panic!("{e}")).0
}

/// The capacity csi-provisioner published for class `sc` on `node`.
pub fn capacity_of(caps: &[CSIStorageCapacity], sc: &str, node: &str) -> Option<u64> {
    caps.iter()
        .find(|c| {
            c.storage_class_name == sc
                && c.node_topology
                    .as_ref()
                    .and_then(|t| t.match_labels.as_ref())
                    .and_then(|l| l.get("kubernetes.io/hostname"))
                    .map(String::as_str)
                    == Some(node)
        })
        .and_then(|c| c.capacity.as_ref())
        .map(bytes)
}

/// Waits until the published capacity of `sc` on `node` satisfies `pred`.
pub async fn wait_capacity(s: &Scope, sc: &str, node: &str, pred: impl Fn(u64) -> bool) -> u64 {
    let api: Api<CSIStorageCapacity> = Api::namespaced(s.client.clone(), NS);
    let caps = wait_list(
        &api,
        &format!("csi.storage.k8s.io/drivername={DRIVER}"),
        &format!("CSIStorageCapacity of {sc} on {node}"),
        Duration::from_secs(90),
        |cs| capacity_of(cs, sc, node).is_some_and(&pred),
    )
    .await;
    capacity_of(&caps, sc, node).unwrap()
}

/// A claim of `mib` MiB of class `sc`, with `extra` merged into its spec.
pub fn claim(name: &str, sc: &str, mib: u64, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "storageClassName": sc,
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": format!("{mib}Mi")}},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": name}, "spec": spec})
}

/// A pod on the kwok Nodes using claim `pvc`, placed on `node` if given.
pub fn pod_with(name: &str, pvc: &str, node: Option<&str>) -> serde_json::Value {
    let mut spec = json!({
        "tolerations": [{"operator": "Exists"}],
        "containers": [{"name": "c", "image": "busybox"}],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": pvc}}],
        "nodeSelector": {"type": "kwok"},
    });
    if let Some(n) = node {
        spec["nodeSelector"]["kubernetes.io/hostname"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

pub async fn create_in(s: &Scope, ns: &str, mut obj: serde_json::Value) {
    obj["metadata"]["namespace"] = json!(ns);
    s.apply_json(&obj).await;
}

/// The claim once Bound, and its PV.
pub async fn bound(s: &Scope, ns: &str, pvc: &str) -> (PersistentVolumeClaim, PersistentVolume) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), ns);
    let c = wait_for(
        &claims,
        pvc,
        &format!("claim {pvc} Bound"),
        Duration::from_secs(120),
        |c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
    )
    .await;
    let pv_name = c.spec.as_ref().unwrap().volume_name.clone().unwrap();
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    (c, pvs.get(&pv_name).await.unwrap())
}

pub fn pv_node(pv: &PersistentVolume) -> String {
    affinity(pv, "kubernetes.io/hostname").join(",")
}

pub fn pv_bytes(pv: &PersistentVolume) -> u64 {
    bytes(&pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"])
}

// ------------------------------------------------------------ the kubelet part

/// kubelet's staging path of `pv` (its global mount) under the rig's kubelet dir.
pub fn staging_path(node: &CsiNode, pv: &PersistentVolume) -> PathBuf {
    node.rig.path().join(format!(
        "kubelet/plugins/kubernetes.io/csi/{DRIVER}/{}/globalmount",
        name_of(pv)
    ))
}

/// kubelet's NodeStageVolume and NodePublishVolume of `pv` (its paths under
/// the rig's kubelet dir); the published path: a dir, or a block device file.
pub async fn kubelet_mount(node: &CsiNode, pv: &PersistentVolume) -> PathBuf {
    let (mut n, cap, id) = node_call(node, pv).await;
    let pv_name = name_of(pv);
    let kubelet = node.rig.path().join("kubelet");
    let staging = staging_path(node, pv);
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let target = kubelet.join(format!(
        "pods/{pv_name}-pod/volumes/kubernetes.io~csi/{pv_name}/mount"
    ));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap();
    target
}

/// kubelet's NodeUnpublishVolume and NodeUnstageVolume of `pv`.
pub async fn kubelet_unmount(node: &CsiNode, pv: &PersistentVolume, target: &Path) {
    let (mut n, _, id) = node_call(node, pv).await;
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    let staging = staging_path(node, pv);
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id,
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
}

/// kubelet's NodeExpandVolume of a published `pv` to the claim's new size.
pub async fn kubelet_expand(
    node: &CsiNode,
    pv: &PersistentVolume,
    target: &Path,
    want: u64,
) -> u64 {
    let (mut n, cap, id) = node_call(node, pv).await;
    n.node_expand_volume(NodeExpandVolumeRequest {
        volume_id: id,
        volume_path: target.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: want as i64,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .capacity_bytes as u64
}

/// A node client, and the capability and handle kubelet reads from the PV.
pub async fn node_call(
    node: &CsiNode,
    pv: &PersistentVolume,
) -> (NodeClient<Channel>, VolumeCapability, String) {
    let spec = pv.spec.as_ref().unwrap();
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(csi.driver, DRIVER);
    let access_type = if spec.volume_mode.as_deref() == Some("Block") {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume {
            fs_type: csi.fs_type.clone().unwrap_or_default(),
            ..Default::default()
        })
    };
    let cap = VolumeCapability {
        access_mode: Some(AccessMode {
            // kubelet's mapping of the PV's access mode.
            mode: if spec
                .access_modes
                .iter()
                .flatten()
                .any(|m| m == "ReadWriteOncePod")
            {
                Mode::SingleNodeSingleWriter as i32
            } else {
                Mode::SingleNodeWriter as i32
            },
        }),
        access_type: Some(access_type),
    };
    let ch = super::csi::channel(node.sock.clone()).await;
    (NodeClient::new(ch), cap, csi.volume_handle.clone())
}
