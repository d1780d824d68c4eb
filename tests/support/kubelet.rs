//! The real kubelet's node in tests (`scripts/test-cluster.sh up DIR
//! --kubelet`): an agent for it, and what kubelet mounted for a pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::Api;
use serde_json::json;

use super::cluster::{name_of, wait_for, KubeletNode, NodeRig, Scope};

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
        let name = self.name("agent");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "disklet-system"},
            "spec": {"nodeName": k.name, "serviceAccountName": "disklet",
                     "automountServiceAccountToken": false,
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "stand-in", "image": k.image,
                                     "imagePullPolicy": "Never",
                                     "command": ["sleep", "86400"]}]}
        });
        self.apply_json(&pod).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "disklet-system");
        let pod = wait_for(
            &pods,
            &name,
            "the agent's stand-in pod Running on the kubelet node",
            Duration::from_secs(90),
            |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
        )
        .await;
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
