//! Against a real cluster (kind, k3s, ...), gated by environment variables:
//!
//! ```sh
//! DISKLET_E2E_KUBECONFIG=~/.kube/config DISKLET_E2E_NODE=$(hostname) \
//!     cargo test --test external_cluster -- --ignored --nocapture
//! ```
//!
//! Run it as root on a machine that is the node `DISKLET_E2E_NODE` of that
//! cluster (a k3s server, or inside a kind node container). It creates a
//! StorageClass `disklet-e2e-<pid>`, a 320 MiB loop device in a temp dir, runs
//! the real agent selecting only that loop, checks the PV the API server
//! accepted, then deletes the PV and the StorageClass and detaches the loop.
#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, PostParams};
use support::agent::{Agent, MountSweeper};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: set DISKLET_E2E_KUBECONFIG and DISKLET_E2E_NODE, run with --ignored"]
async fn publishes_a_pv_a_real_api_server_accepts() {
    let (Ok(kubeconfig), Ok(node)) = (
        std::env::var("DISKLET_E2E_KUBECONFIG"),
        std::env::var("DISKLET_E2E_NODE"),
    ) else {
        panic!("set DISKLET_E2E_KUBECONFIG and DISKLET_E2E_NODE to run against a real cluster");
    };
    if skip_unless_root("publishes_a_pv_a_real_api_server_accepts") {
        return;
    }
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let sc_name = format!("disklet-e2e-{}", std::process::id());
    let scs: Api<StorageClass> = Api::all(client.clone());
    let sc: StorageClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": sc_name},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Delete"
    }))
    .unwrap();
    scs.create(&PostParams::default(), &sc).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let _sweep = MountSweeper(dir.path().to_path_buf());
    let d = dir.path().display();
    let cfg = format!(
        "hostDir: {d}/hostdir\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: e2e\n    storageClassName: {sc_name}\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n"
    );
    let agent = Agent::start_raw(
        std::path::Path::new(&kubeconfig),
        dir.path(),
        "agent",
        &node,
        &cfg,
        &[],
    );
    let lp = Loop::new(&dir.path().join("disks"), "e1", 320);
    lp.assert_ours();
    agent.wait_log("PV applied");

    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let list = pvs
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("disklet.io/class=e2e,disklet.io/node={node}")),
        )
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let pv = &list.items[0];
    let s = pv.spec.as_ref().unwrap();
    assert_eq!(s.storage_class_name.as_deref(), Some(sc_name.as_str()));
    assert!(s
        .local
        .as_ref()
        .unwrap()
        .path
        .starts_with(&format!("{d}/hostdir/e2e/")));
    assert_eq!(
        pv.status.as_ref().and_then(|st| st.phase.as_deref()),
        Some("Available"),
        "the real PV controller accepted it"
    );

    drop(agent);
    pvs.delete(
        pv.metadata.name.as_deref().unwrap(),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    scs.delete(&sc_name, &DeleteParams::default())
        .await
        .unwrap();
}
