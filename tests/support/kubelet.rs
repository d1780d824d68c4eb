//! The real kubelet's node in tests (`scripts/test-cluster.sh up DIR
//! --kubelet`): an agent for it, and what kubelet mounted for a pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::Api;
use serde_json::json;

use super::cluster::{name_of, try_wait_for, KubeletNode, NodeRig, Scope};

/// One test at a time on the kubelet node: there is one such node, and two
/// agents on one node would each take the other's PVs for their own.
/// Every test on it holds this for its whole run.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    NODE.lock().await
}

/// Waits for `n` Available PVs of StorageClass `sc` on `node` (earlier
/// tests' PVs on the same node are of other classes).
pub async fn available_of(s: &Scope, node: &str, sc: &str, n: usize) -> Vec<PersistentVolume> {
    let of = |pv: &PersistentVolume| {
        pv.spec
            .as_ref()
            .and_then(|p| p.storage_class_name.as_deref())
            == Some(sc)
    };
    super::cluster::wait_list(
        &super::cluster::pvs(s),
        &super::cluster::nodes_selector(&[node]),
        &format!("{n} Available PVs of {sc} on {node}"),
        super::cluster::WAIT,
        |p| {
            p.iter()
                .filter(|pv| of(pv) && super::cluster::phase(pv) == "Available")
                .count()
                == n
        },
    )
    .await
    .into_iter()
    .filter(|pv| of(pv) && super::cluster::phase(pv) == "Available")
    .collect()
}

impl Scope {
    /// The real kubelet's node.
    pub fn kubelet_node(&self) -> &'static KubeletNode {
        self.cluster
            .kubelet
            .as_ref()
            .expect("this test binary's cluster has no kubelet node: use Scope::with_kubelet")
    }

    /// The kubelet node with its own disklet agent, a process of the test
    /// like the kwok nodes' agents (deploy/'s DaemonSet is kept off this
    /// node). Its token is bound to a stand-in pod of deploy/'s
    /// ServiceAccount that the real kubelet runs there, so it carries the
    /// node's name as the DaemonSet pod's token would. `config`'s
    /// `kubeletDir` (`<dir>/kubelet`, as `loop_config` writes it) becomes the
    /// real kubelet's root dir, where the agent must see the pods' mounts.
    pub async fn kubelet_rig(&self, config: impl Fn(&Path) -> String) -> NodeRig {
        self.apply_deploy();
        let k = self.kubelet_node();
        let pod = self.stand_in_pod("disklet", "agent").await;
        let root = k.root.display().to_string();
        self.rig_with(&k.name, &pod, |d| {
            let mine = format!("kubeletDir: {}/kubelet\n", d.display());
            let c = config(d);
            assert!(c.contains(&mine), "the config names no {mine}: {c}");
            c.replace(&mine, &format!("kubeletDir: {root}\n"))
        })
        .await
    }
}

impl Scope {
    /// A pod of ServiceAccount `disklet-system/<sa>` that the real kubelet
    /// runs on its node (busybox asleep, no token mounted): what a token
    /// bound to it names is that node, as for the DaemonSet's own pod.
    pub async fn stand_in_pod(&self, sa: &str, n: &str) -> Pod {
        let k = self.kubelet_node();
        let name = self.name(n);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "disklet-system"},
            "spec": {"nodeName": k.name, "serviceAccountName": sa,
                     "automountServiceAccountToken": false,
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "stand-in", "image": k.image,
                                     "imagePullPolicy": "Never",
                                     "command": ["sleep", "86400"]}]}
        });
        self.apply_json(&pod).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "disklet-system");
        let running = try_wait_for(
            &pods,
            &name,
            &format!("the stand-in pod of {sa} Running on the kubelet node"),
            Duration::from_secs(90),
            |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
        )
        .await;
        match running {
            Ok(p) => p,
            Err(why) => panic!("{}\n{why}", self.kubelet_node_state(&name).await),
        }
    }

    /// Why the kubelet node may refuse or not start a pod: its conditions and
    /// taints, and kubelet's log lines naming `pod` (the last 20).
    pub async fn kubelet_node_state(&self, pod: &str) -> String {
        let k = self.kubelet_node();
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get_opt(&k.name).await.ok().flatten();
        let conditions: Vec<String> = node
            .as_ref()
            .and_then(|n| n.status.as_ref()?.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                format!(
                    "{}={} ({})",
                    c.type_,
                    c.status,
                    c.message.unwrap_or_default()
                )
            })
            .collect();
        let taints: Vec<String> = node
            .as_ref()
            .and_then(|n| n.spec.as_ref()?.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        let log =
            std::fs::read_to_string(self.cluster.dir.join("logs/kubelet.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(pod)).collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        format!(
            "kubelet node {}: conditions {conditions:?}, taints {taints:?}; kubelet's log on {pod}:\n{}",
            k.name,
            tail.join("\n")
        )
    }
}

/// Where kubelet mounts a local PV for a pod.
pub fn pod_volume_dir(k: &KubeletNode, pod: &Pod, pv: &PersistentVolume) -> PathBuf {
    k.root
        .join("pods")
        .join(pod.metadata.uid.as_deref().unwrap())
        .join("volumes/kubernetes.io~local-volume")
        .join(name_of(pv))
}

/// Whether `path` is a mount point now (this process's mount table: the
/// test, kubelet and the agent share the host's mount namespace).
pub fn is_mount_point(path: &Path) -> bool {
    let want = path.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want))
}

/// The kubelet stopped (SIGSTOP) until this drops (SIGCONT), even on panic:
/// a kubelet that does nothing, as one that hangs or is slow to act does.
pub struct Frozen(nix::unistd::Pid);

impl Frozen {
    pub fn new(k: &KubeletNode) -> Frozen {
        let pid: i32 = std::fs::read_to_string(&k.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// `scripts/test-cluster.sh CMD DIR` on the cluster's dir (`kubelet-restart`,
/// `node-reboot`).
pub fn node_script(c: &super::cluster::Cluster, cmd: &str) {
    let st = std::process::Command::new("bash")
        .arg(super::cluster::repo().join("scripts/test-cluster.sh"))
        .arg(cmd)
        .arg(&c.dir)
        .status()
        .unwrap();
    assert!(st.success(), "scripts/test-cluster.sh {cmd} failed");
}

/// Deletes every pod in `ns` and waits until they are gone, which on the
/// kubelet node means kubelet has unmounted and unmapped their volumes (it
/// removes a pod only then). Tests end with it, so no pod of theirs outlives
/// them (the agents' stand-in pods in disklet-system stay until `down`).
pub async fn clear_pods(s: &Scope, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), ns);
    for p in pods.list(&Default::default()).await.unwrap() {
        let name = name_of(&p);
        super::cluster::delete(&pods, &name).await;
        super::cluster::wait_gone(
            &pods,
            &name,
            &format!("pod {name} gone"),
            super::cluster::WAIT,
        )
        .await;
    }
}
