//! The CSI mode end to end, through the real control plane and the real
//! sidecars: kube-scheduler placing pods from CSIStorageCapacity,
//! csi-provisioner (`--node-deployment --enable-capacity`), csi-snapshotter
//! (`--node-deployment`) with snapshot-controller
//! (`--enable-distributed-snapshotting`) and the VolumeSnapshot CRDs, and
//! csi-resizer, all built from their Go modules by `scripts/test-cluster.sh
//! build`. Each kwok Node has its own agent (`disklet run`, which takes the
//! pool disk), its own `disklet csi` and its own sidecars, run with tokens of
//! deploy/overlays/csi's ServiceAccount bound to that node's DaemonSet pod,
//! as in the overlay.
//!
//! kwok runs no kubelet, so the test does kubelet's part where one is needed:
//! it registers the driver in each Node's CSINode (as node-driver-registrar
//! and kubelet would) and calls NodeStageVolume, NodePublishVolume and
//! NodeExpandVolume on the driver's socket with kubelet's paths, to write and
//! read the volumes' contents. (The real kubelet is issue 16.)
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
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
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::agent::MountSweeper;
use support::cluster::*;
use tonic::transport::Channel;

const DRIVER: &str = "csi.disklet.io";
const NS: &str = "disklet-system";
const MIB: u64 = 1 << 20;

/// A process of the test, killed on drop; its output in `<dir>/<name>.log`.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Proc {
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
fn snapshot_infra(s: &Scope) {
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
        s.cluster.kubectl(&["apply", "-k", "deploy/overlays/csi"]);
        let dir = s.cluster.dir.join("logs");
        spawn(
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
        )
    });
}

/// One kwok Node serving CSI volumes: its agent with a `pool` class on one
/// loop device, `disklet csi`, and the sidecars. Fields drop in order:
/// sidecars and driver stopped, the test's kubelet mounts and the volumes'
/// loop devices undone, then the rig (agent, pool mount, loops).
struct CsiNode {
    _sidecars: Vec<Proc>,
    _driver: Proc,
    _volumes: VolumeSweeper,
    sock: PathBuf,
    /// Where the pool is mounted.
    pool: PathBuf,
    rig: NodeRig,
}

/// The test's kubelet mounts under the rig's kubelet dir and the volumes'
/// loop devices under its hostDir, undone on drop.
struct VolumeSweeper(PathBuf);

impl Drop for VolumeSweeper {
    fn drop(&mut self) {
        MountSweeper(self.0.join("kubelet")).sweep();
        support::detach_loops_under(&self.0.join("hostdir"));
    }
}

async fn csi_node(s: &Scope, n: &str, sc: &str, pool_mib: u64) -> CsiNode {
    snapshot_infra(s);
    let mut rig = s
        .rig(n, &[], |d| {
            loop_config(d, "", &[("pool", sc, "disks", "kind: pool")])
        })
        .await;
    rig.disk("disks", "p1", pool_mib);
    let pool = pool_mount(&rig.path().join("hostdir"));
    let dir = rig.path().to_path_buf();
    let volumes = VolumeSweeper(dir.clone());

    // The csi DaemonSet's ServiceAccount, with a token bound to its pod on
    // this node, for the driver and every sidecar, as in the overlay.
    let pod = daemonset_pod_of(s, "disklet-csi", &rig.node).await;
    let token = s.pod_token(&pod).await;
    let kc = dir.join("csi.kubeconfig");
    s.cluster.kubeconfig_with_token(&kc, &token);
    let kcarg = format!("--kubeconfig={}", kc.display());

    let sock = dir.join("csi.sock");
    let driver = overlay_containers()
        .iter()
        .find(|c| c.name == "disklet-csi")
        .unwrap();
    assert_eq!(driver.args, ["csi", "--endpoint=unix:///csi/csi.sock"]);
    let driver = spawn(
        &dir,
        "disklet-csi",
        Command::new(env!("CARGO_BIN_EXE_disklet"))
            .args(["csi", "--node-name", &rig.node])
            .arg(format!("--endpoint=unix://{}", sock.display()))
            .arg("--config")
            .arg(dir.join("agent.yaml"))
            .env("KUBECONFIG", &kc),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "disklet csi made no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What node-driver-registrar and kubelet would register.
    s.apply_json(&json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
        "metadata": {"name": rig.node},
        "spec": {"drivers": [{"name": DRIVER, "nodeID": rig.node,
            "topologyKeys": ["kubernetes.io/hostname"], "allocatable": {"count": 1000}}]},
    }))
    .await;

    // The sidecars as deploy/overlays/csi runs them: its containers' args
    // and fieldRef envs, with this node's socket, token and names put in, and
    // faster retries and more logging for the test.
    let pod_name = pod.metadata.name.clone().unwrap();
    let field = |path: &str| match path {
        "spec.nodeName" => rig.node.clone(),
        "metadata.namespace" => NS.to_string(),
        "metadata.name" => pod_name.clone(),
        other => panic!("the overlay sets an env from {other}, which this test does not know"),
    };
    let mut sidecars = Vec::new();
    for c in overlay_containers() {
        if !["csi-provisioner", "csi-snapshotter", "csi-resizer"].contains(&c.name.as_str()) {
            continue;
        }
        let mut cmd = Command::new(s.cluster.bin.join(&c.name));
        for a in &c.args {
            match a.as_str() {
                "--csi-address=/csi/csi.sock" => {
                    cmd.arg(format!("--csi-address={}", sock.display()))
                }
                a => cmd.arg(a),
            };
        }
        cmd.arg(&kcarg)
            .args(["--retry-interval-start=200ms", "--v=3"]);
        for (k, path) in &c.env {
            cmd.env(k, field(path));
        }
        sidecars.push(spawn(&dir, &c.name, &mut cmd));
    }
    assert_eq!(
        sidecars.len(),
        3,
        "the overlay's sidecars: {:?}",
        overlay_containers()
    );
    CsiNode {
        _sidecars: sidecars,
        _driver: driver,
        _volumes: volumes,
        sock,
        pool,
        rig,
    }
}

/// A container of the overlay's DaemonSet disklet-csi: its args and the envs
/// it takes from fieldRefs (name, fieldPath).
#[derive(Debug)]
struct Container {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The containers of DaemonSet disklet-csi as `kubectl kustomize
/// deploy/overlays/csi` renders them.
fn overlay_containers() -> &'static [Container] {
    static C: OnceLock<Vec<Container>> = OnceLock::new();
    C.get_or_init(|| {
        let text = cluster().kubectl(&["kustomize", "deploy/overlays/csi"]);
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
async fn daemonset_pod_of(s: &Scope, app: &str, node: &str) -> Pod {
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
fn pool_mount(hostdir: &Path) -> PathBuf {
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
async fn csi_class(s: &Scope, n: &str, extra: serde_json::Value) -> String {
    let mut sc = json!({"provisioner": DRIVER, "allowVolumeExpansion": true});
    for (k, v) in extra.as_object().unwrap() {
        sc[k] = v.clone();
    }
    s.storage_class(n, sc).await
}

fn bytes(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> u64 {
    Quantity::from_str(&q.0).unwrap_or_else(|e| panic!("{e}")).0
}

/// The capacity csi-provisioner published for class `sc` on `node`.
fn capacity_of(caps: &[CSIStorageCapacity], sc: &str, node: &str) -> Option<u64> {
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
async fn wait_capacity(s: &Scope, sc: &str, node: &str, pred: impl Fn(u64) -> bool) -> u64 {
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
fn claim(name: &str, sc: &str, mib: u64, extra: serde_json::Value) -> serde_json::Value {
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
fn pod_with(name: &str, pvc: &str, node: Option<&str>) -> serde_json::Value {
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

async fn create_in(s: &Scope, ns: &str, mut obj: serde_json::Value) {
    obj["metadata"]["namespace"] = json!(ns);
    s.apply_json(&obj).await;
}

/// The claim once Bound, and its PV.
async fn bound(s: &Scope, ns: &str, pvc: &str) -> (PersistentVolumeClaim, PersistentVolume) {
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

fn pv_node(pv: &PersistentVolume) -> String {
    affinity(pv, "kubernetes.io/hostname").join(",")
}

fn pv_bytes(pv: &PersistentVolume) -> u64 {
    bytes(&pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"])
}

// ------------------------------------------------------------ the kubelet part

/// kubelet's NodeStageVolume and NodePublishVolume of `pv` (its paths under
/// the rig's kubelet dir); the published path: a dir, or a block device file.
async fn kubelet_mount(node: &CsiNode, pv: &PersistentVolume) -> PathBuf {
    let (mut n, cap, id) = node_call(node, pv).await;
    let pv_name = name_of(pv);
    let kubelet = node.rig.path().join("kubelet");
    let staging = kubelet.join(format!(
        "plugins/kubernetes.io/csi/{DRIVER}/{pv_name}/globalmount"
    ));
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
async fn kubelet_unmount(node: &CsiNode, pv: &PersistentVolume, target: &Path) {
    let (mut n, _, id) = node_call(node, pv).await;
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    let staging = node.rig.path().join(format!(
        "kubelet/plugins/kubernetes.io/csi/{DRIVER}/{}/globalmount",
        name_of(pv)
    ));
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id,
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
}

/// kubelet's NodeExpandVolume of a published `pv` to the claim's new size.
async fn kubelet_expand(node: &CsiNode, pv: &PersistentVolume, target: &Path, want: u64) -> u64 {
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
async fn node_call(
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
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(access_type),
    };
    let ch = support::csi::channel(node.sock.clone()).await;
    (NodeClient::new(ch), cap, csi.volume_handle.clone())
}

/// Fills a file of `mib` MiB at `path` with `byte`, synced.
fn fill(path: &Path, byte: u8, mib: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let buf = vec![byte; MIB as usize];
    for _ in 0..mib {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// How many bytes of `path` are not zero.
fn nonzero_bytes(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0;
    loop {
        let got = f.read(&mut buf).unwrap();
        if got == 0 {
            return n;
        }
        n += buf[..got].iter().filter(|b| **b != 0).count() as u64;
    }
}

fn fs_bytes(target: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(target).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// No request of the csi DaemonSet's ServiceAccount was refused.
fn assert_no_refusals(s: &Scope) {
    let refused: Vec<String> = s
        .cluster
        .audit()
        .into_iter()
        .filter(|a| a.user.ends_with(":disklet-csi") && a.code == 403)
        .map(|a| format!("{} {} ({})", a.verb, a.uri, a.user_agent))
        .collect();
    assert!(
        refused.is_empty(),
        "RBAC of deploy/overlays/csi refused: {refused:#?}"
    );
}

/// The volumes and snapshots files in a pool.
fn pool_files(pool: &Path) -> BTreeMap<String, u64> {
    ["volumes", "snapshots"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(pool.join("pool").join(d))
                .unwrap()
                .flatten()
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

async fn delete_claim(s: &Scope, ns: &str, pvc: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), ns);
    claims.delete(pvc, &DeleteParams::default()).await.unwrap();
}

/// Waits until no PV named `pv` exists (csi-provisioner deleted it after
/// DeleteVolume).
async fn wait_pv_gone(s: &Scope, pv: &str) {
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while pvs.get_opt(pv).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "PV {pv} was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------- tests

/// A StatefulSet's claims land where CSIStorageCapacity says they fit; a
/// full node gets no further pod; deleting a claim gives its capacity back
/// and destroys its data, so the next volume on that space reads zeroes.
#[tokio::test(flavor = "multi_thread")]
async fn claims_go_where_capacity_is_and_a_deleted_claims_space_reads_zeroes() {
    let s = Scope::new("csi-capacity").await;
    let n1 = s.name("c1");
    let n2 = s.name("c2");
    let sc = csi_class(
        &s,
        "cap",
        json!({"allowedTopologies": [{"matchLabelExpressions": [
            {"key": "kubernetes.io/hostname", "values": [n1, n2]}]}]}),
    )
    .await;
    let a = csi_node(&s, "c1", &sc, 1024).await;
    let b = csi_node(&s, "c2", &sc, 1024).await;
    let ca = wait_capacity(&s, &sc, &a.rig.node, |c| c > 0).await;
    let cb = wait_capacity(&s, &sc, &b.rig.node, |c| c > 0).await;
    // One volume of this size fits a node's pool, two do not.
    let size = (ca.min(cb) / 2 / MIB) + 32;
    assert!(size * MIB <= ca.min(cb), "capacity {ca} / {cb}");
    eprintln!(
        "CSIStorageCapacity: {} MiB on {}, {} MiB on {}; claims of {size} MiB",
        ca / MIB,
        a.rig.node,
        cb / MIB,
        b.rig.node
    );

    let ns = s.namespace("cap").await;
    create_in(
        &s,
        &ns,
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 2, "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {
                        "tolerations": [{"operator": "Exists"}],
                        "nodeSelector": {"type": "kwok"},
                        "containers": [{"name": "db", "image": "busybox",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    },
                },
                "volumeClaimTemplates": [claim("data", &sc, size, json!({}))],
            },
        }),
    )
    .await;
    let (_, pv0) = bound(&s, &ns, "data-db-0").await;
    let (_, pv1) = bound(&s, &ns, "data-db-1").await;
    let nodes = [pv_node(&pv0), pv_node(&pv1)];
    assert_ne!(
        nodes[0], nodes[1],
        "both claims on one node, though its pool holds one"
    );
    for (pv, node) in [(&pv0, &nodes[0]), (&pv1, &nodes[1])] {
        assert_eq!(pv_bytes(pv), size * MIB, "{}", name_of(pv));
        assert!(node == &a.rig.node || node == &b.rig.node, "{node}");
    }
    // The pods run where their volumes are.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    for (i, node) in nodes.iter().enumerate() {
        let p = wait_for(
            &pods,
            &format!("db-{i}"),
            &format!("db-{i} bound to a node"),
            Duration::from_secs(60),
            |p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
        )
        .await;
        assert_eq!(
            p.spec.unwrap().node_name.as_deref(),
            Some(node.as_str()),
            "db-{i}"
        );
    }
    // Each node's published capacity went down by at least the volume.
    let left_a = wait_capacity(&s, &sc, &a.rig.node, |c| c + size * MIB <= ca).await;
    let left_b = wait_capacity(&s, &sc, &b.rig.node, |c| c + size * MIB <= cb).await;
    assert!(left_a < size * MIB && left_b < size * MIB);

    // Both pools are too full for one more: its pod is not scheduled.
    create_in(
        &s,
        &ns,
        claim("extra", &sc, size, json!({"volumeMode": "Block"})),
    )
    .await;
    create_in(&s, &ns, pod_with("extra", "extra", None)).await;
    let p = wait_for(
        &pods,
        "extra",
        "pod extra unschedulable for lack of storage",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.message
                                .as_deref()
                                .is_some_and(|m| m.contains("enough free storage"))
                    })
                })
        },
    )
    .await;
    assert!(p.spec.unwrap().node_name.is_none());
    // It waits elsewhere while the capacity comes back (else it would take
    // that space at once).
    pods.delete("extra", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pods.get_opt("extra").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "pod extra not gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // db-1's volume gets data, as its pod would write it; then the claim is
    // deleted (StatefulSet scaled down first, its pod gone).
    let node1 = if nodes[1] == a.rig.node { &a } else { &b };
    let t = kubelet_mount(node1, &pv1).await;
    fill(&t.join("data"), 0xA5, size - 64);
    kubelet_unmount(node1, &pv1, &t).await;
    let before = pool_files(&node1.pool);
    s.cluster
        .kubectl(&["-n", &ns, "scale", "statefulset/db", "--replicas=1"]);
    let pods2 = pods.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pods2.get_opt("db-1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "db-1 not gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    delete_claim(&s, &ns, "data-db-1").await;
    wait_pv_gone(&s, &name_of(&pv1)).await;

    // Its capacity comes back, and the pod that found no room gets that very
    // space.
    let sc_left = if node1.rig.node == a.rig.node {
        left_a
    } else {
        left_b
    };
    let back = wait_capacity(&s, &sc, &node1.rig.node, |c| c >= sc_left + size * MIB).await;
    eprintln!(
        "capacity on {} after deleting a {size} MiB claim: {} -> {} MiB",
        node1.rig.node,
        sc_left / MIB,
        back / MIB
    );
    create_in(&s, &ns, pod_with("extra", "extra", None)).await;
    let (_, pv_extra) = bound(&s, &ns, "extra").await;
    assert_eq!(pv_node(&pv_extra), node1.rig.node);
    let after = pool_files(&node1.pool);
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(new.len(), 1, "before {before:?}, after {after:?}");
    // Read through the volume as its pod would, the whole device: zeroes.
    let dev = kubelet_mount(node1, &pv_extra).await;
    assert_eq!(
        nonzero_bytes(&dev),
        0,
        "a new volume in a deleted one's space reads old data"
    );
    kubelet_unmount(node1, &pv_extra, &dev).await;
    assert_no_refusals(&s);
}

/// Snapshots and clones through csi-snapshotter and csi-provisioner hold
/// their moment's data; a claim grown through csi-resizer shows the new size
/// in its filesystem, online.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_clones_and_growth_through_the_sidecars() {
    let s = Scope::new("csi-snapshots").await;
    let sc = csi_class(
        &s,
        "snap",
        json!({"parameters": {"csi.storage.k8s.io/fstype": "xfs"}}),
    )
    .await;
    let node = csi_node(&s, "s1", &sc, 2048).await;
    let n = node.rig.node.clone();
    let ns = s.namespace("snap").await;

    create_in(&s, &ns, claim("src", &sc, 320, json!({}))).await;
    create_in(&s, &ns, pod_with("src", "src", Some(&n))).await;
    let (_, src) = bound(&s, &ns, "src").await;
    let t = kubelet_mount(&node, &src).await;
    std::fs::write(t.join("data"), "the moment of the snapshot").unwrap();
    nix::unistd::sync();

    // The overlay's VolumeSnapshotClass, through the real snapshot stack.
    create_in(
        &s,
        &ns,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
               "metadata": {"name": "snap"},
               "spec": {"volumeSnapshotClassName": "disklet",
                        "source": {"persistentVolumeClaimName": "src"}}}),
    )
    .await;
    let gvk = kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let (ar, _) = kube::discovery::pinned_kind(&s.client, &gvk).await.unwrap();
    let snaps: Api<kube::api::DynamicObject> = Api::namespaced_with(s.client.clone(), &ns, &ar);
    let snap = wait_for(
        &snaps,
        "snap",
        "VolumeSnapshot snap readyToUse",
        Duration::from_secs(120),
        |o| o.data["status"]["readyToUse"] == json!(true),
    )
    .await;
    eprintln!("snapshot: {}", snap.data["status"]);
    // Written after the snapshot: must not be in the restore.
    std::fs::write(t.join("data"), "written after the snapshot").unwrap();
    nix::unistd::sync();

    create_in(
        &s,
        &ns,
        claim(
            "restored",
            &sc,
            320,
            json!({"dataSource": {"apiGroup": "snapshot.storage.k8s.io",
                                  "kind": "VolumeSnapshot", "name": "snap"}}),
        ),
    )
    .await;
    create_in(&s, &ns, pod_with("restored", "restored", Some(&n))).await;
    create_in(
        &s,
        &ns,
        claim(
            "clone",
            &sc,
            320,
            json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}),
        ),
    )
    .await;
    create_in(&s, &ns, pod_with("clone", "clone", Some(&n))).await;
    let (_, restored) = bound(&s, &ns, "restored").await;
    let (_, clone) = bound(&s, &ns, "clone").await;
    let tr = kubelet_mount(&node, &restored).await;
    let tc = kubelet_mount(&node, &clone).await;
    assert_eq!(
        std::fs::read_to_string(tr.join("data")).unwrap(),
        "the moment of the snapshot"
    );
    assert_eq!(
        std::fs::read_to_string(tc.join("data")).unwrap(),
        "written after the snapshot"
    );
    // Three distinct volumes: writing to one changes no other.
    std::fs::write(tc.join("data"), "the clone's own").unwrap();
    assert_eq!(
        std::fs::read_to_string(t.join("data")).unwrap(),
        "written after the snapshot"
    );

    // Online growth: the claim asks for more; csi-resizer records it (the
    // driver grows on the node), kubelet's NodeExpandVolume grows the file,
    // the device and the mounted filesystem.
    let small = fs_bytes(&t);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    claims
        .patch(
            "src",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "448Mi"}}}})),
        )
        .await
        .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(s.client.clone());
    let grown = wait_for(
        &pvs,
        &name_of(&src),
        "the PV's capacity raised by csi-resizer",
        Duration::from_secs(60),
        |pv| pv_bytes(pv) == 448 * MIB,
    )
    .await;
    let pending = wait_for(
        &claims,
        "src",
        "the claim waiting for kubelet's node expansion",
        Duration::from_secs(60),
        |c| {
            c.status
                .as_ref()
                .and_then(|s| s.allocated_resource_statuses.as_ref())
                .and_then(|m| m.get("storage"))
                .map(String::as_str)
                == Some("NodeResizePending")
        },
    )
    .await;
    assert!(pending.status.is_some());
    let got = kubelet_expand(&node, &grown, &t, 448 * MIB).await;
    assert_eq!(got, 448 * MIB);
    let big = fs_bytes(&t);
    assert!(
        big >= small + 128 * MIB * 9 / 10,
        "filesystem {small} -> {big} bytes after growing by 128 MiB"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("data")).unwrap(),
        "written after the snapshot"
    );

    // Everything given back: the pool holds nothing once the claims and the
    // snapshot are gone.
    for (pv, target) in [(&src, &t), (&restored, &tr), (&clone, &tc)] {
        kubelet_unmount(&node, pv, target).await;
    }
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    for p in ["src", "restored", "clone"] {
        pods.delete(p, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
    snaps
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    for c in ["restored", "clone", "src"] {
        delete_claim(&s, &ns, c).await;
    }
    for pv in [&src, &restored, &clone] {
        wait_pv_gone(&s, &name_of(pv)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pool_files(&node.pool).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in the pool: {:?}",
            pool_files(&node.pool)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_refusals(&s);
}
