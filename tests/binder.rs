//! Tests of the test-support binder (tests/support/binder.rs), which plays
//! the PV controller and the scheduler's volume binding against the fake API
//! server. No root, no devices.
//!
//! "Never binds" is checked without sleeping: the binder records an Event on
//! a claim each time it looks at it and decides not to bind, so a test waits
//! for that Event (which names the reason), asserts nothing was bound, and
//! then adds a PV that does fit to show the same claim binds.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use disklet_fakeapi::{FaultAction, FaultRule, Verb};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use support::agent::{env, Env};
use support::binder::{
    self, claim, create_claim, delete_claim, local_pv, node_affinity_matches, parse_quantity, pvc,
    select_node, wait_bound, wait_claim_phase, wait_event, wait_event_with, wait_phase, Binder,
    BinderOptions, ANN_BIND_COMPLETED, ANN_BOUND_BY_CONTROLLER, ANN_SELECTED_NODE,
};

const T: Duration = Duration::from_secs(20);
/// The class `env()` creates (WaitForFirstConsumer).
const WFFC: &str = "local-fast";
/// The node `env()` creates: its hostname label differs from its name.
const NODE: &str = "node-a";
const HOST: &str = "host-a-label";
const NS: &str = "default";

async fn add_class(env: &Env, name: &str, mode: &str) {
    env.server
        .store()
        .create(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": mode,
        }))
        .await
        .unwrap();
}

/// Creates a PV (the fake makes it Pending) and waits for the binder to make
/// it Available, so the binder's own view has it before any claim arrives.
/// A claim already waiting for it may take it at once, so Bound counts too
/// (the Available state can be gone before a watch sees it).
async fn add_pv(env: &Env, pv: Value) -> PersistentVolume {
    let name = pv["metadata"]["name"].as_str().unwrap().to_string();
    let created = env.server.store().create(pv).await.unwrap();
    assert_eq!(created["status"]["phase"], "Pending");
    binder::wait_for(pvs(env), &name, "PV Available (or taken)", T, |pv| {
        pv.is_some_and(|pv| matches!(binder::pv_phase(pv), "Available" | "Bound"))
    })
    .await
    .unwrap()
    .unwrap()
}

fn pvs(env: &Env) -> Api<PersistentVolume> {
    Api::all(env.client.clone())
}

fn pvcs(env: &Env) -> Api<PersistentVolumeClaim> {
    Api::namespaced(env.client.clone(), NS)
}

/// The claim is Pending and unbound, the PV Available and unclaimed.
async fn assert_unbound(env: &Env, claim_name: &str, pv_name: &str) {
    let c = pvcs(env).get(claim_name).await.unwrap();
    assert_eq!(binder::claim_phase(&c), "Pending", "{c:?}");
    assert!(c.spec.as_ref().unwrap().volume_name.is_none(), "{c:?}");
    let pv = pvs(env).get(pv_name).await.unwrap();
    assert_eq!(binder::pv_phase(&pv), "Available", "{pv:?}");
    assert!(pv.spec.as_ref().unwrap().claim_ref.is_none(), "{pv:?}");
}

/// Waits for the binder's FailedBinding verdict on the claim and checks it
/// names `why`, then checks nothing got bound.
async fn assert_never_binds(env: &Env, claim_name: &str, pv_name: &str, why: &str) {
    wait_event_with(&env.client, NS, claim_name, "FailedBinding", why, T)
        .await
        .unwrap();
    assert_unbound(env, claim_name, pv_name).await;
}

fn claim_ref_uid(pv: &PersistentVolume) -> Option<String> {
    pv.spec.as_ref()?.claim_ref.as_ref()?.uid.clone()
}

#[test]
fn quantities_parse_to_bytes() {
    let cases = [
        ("1Gi", Some(1u128 << 30)),
        ("512Mi", Some(512u128 << 20)),
        ("2Ti", Some(2u128 << 40)),
        ("4Ki", Some(4096)),
        ("1G", Some(1_000_000_000)),
        ("5M", Some(5_000_000)),
        ("3k", Some(3000)),
        ("2T", Some(2_000_000_000_000)),
        ("1073741824", Some(1u128 << 30)),
        ("1.5Gi", Some(3u128 << 29)),
        ("1e3", Some(1000)),
        ("1500m", Some(2)), // 1.5 bytes, rounded up
        ("0", Some(0)),
        ("", None),
        ("Gi", None),
        ("-1Gi", None),
        ("1Xi", None),
        ("1.2.3", None),
    ];
    for (s, want) in cases {
        assert_eq!(parse_quantity(s), want, "{s:?}");
    }
}

#[test]
fn node_affinity_operators() {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "h1", "zone": "z1", "cpus": "8"}}
    }))
    .unwrap();
    let pv = |terms: Value| -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": terms}}}
        }))
        .unwrap()
    };
    let expr = |k: &str, op: &str, v: &[&str]| json!({"key": k, "operator": op, "values": v});
    let one = |e: Vec<Value>| pv(json!([{"matchExpressions": e}]));
    let yes = [
        one(vec![expr("kubernetes.io/hostname", "In", &["h0", "h1"])]),
        one(vec![expr("zone", "NotIn", &["z2"])]),
        one(vec![expr("rack", "NotIn", &["r1"])]), // absent label: NotIn holds
        one(vec![expr("zone", "Exists", &[])]),
        one(vec![expr("rack", "DoesNotExist", &[])]),
        one(vec![expr("cpus", "Gt", &["4"])]),
        one(vec![expr("cpus", "Lt", &["16"])]),
        // expressions AND'ed
        one(vec![
            expr("zone", "In", &["z1"]),
            expr("kubernetes.io/hostname", "Exists", &[]),
        ]),
        // terms OR'ed
        pv(json!([
            {"matchExpressions": [expr("zone", "In", &["z9"])]},
            {"matchExpressions": [expr("zone", "In", &["z1"])]}
        ])),
        pv(json!([{"matchFields": [expr("metadata.name", "In", &["n1"])]}])),
    ];
    let no = [
        one(vec![expr("kubernetes.io/hostname", "In", &["n1"])]), // the name is not the label
        one(vec![expr("zone", "NotIn", &["z1"])]),
        one(vec![expr("rack", "Exists", &[])]),
        one(vec![expr("zone", "DoesNotExist", &[])]),
        one(vec![expr("cpus", "Gt", &["8"])]),
        one(vec![
            expr("zone", "In", &["z1"]),
            expr("kubernetes.io/hostname", "In", &["h2"]),
        ]),
        pv(json!([
            {"matchExpressions": [expr("zone", "In", &["z9"])]},
            {"matchExpressions": [expr("zone", "In", &["z8"])]}
        ])),
        pv(json!([{}])), // an empty term matches nothing
        pv(json!([{"matchFields": [expr("metadata.name", "In", &["n2"])]}])),
    ];
    for (i, p) in yes.iter().enumerate() {
        assert!(node_affinity_matches(p, &node), "yes[{i}]: {p:?}");
    }
    for (i, p) in no.iter().enumerate() {
        assert!(!node_affinity_matches(p, &node), "no[{i}]: {p:?}");
    }
    let free: PersistentVolume =
        serde_json::from_value(json!({"metadata": {"name": "p"}})).unwrap();
    assert!(node_affinity_matches(&free, &node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_pv_becomes_available() {
    let env = env().await;
    // One PV exists before the binder starts, one is created after.
    env.server
        .store()
        .create(local_pv("pv-early", WFFC, "1Gi", HOST))
        .await
        .unwrap();
    let _b = Binder::start(env.client.clone());
    let pv = wait_phase(&env.client, "pv-early", "Available", T)
        .await
        .unwrap();
    assert!(claim_ref_uid(&pv).is_none());
    let pv = add_pv(&env, local_pv("pv-late", WFFC, "1Gi", HOST)).await;
    assert!(pv.spec.unwrap().claim_ref.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_first_consumer_binds_only_with_selected_node() {
    let env = env().await;
    let b = Binder::start(env.client.clone());
    let pv = add_pv(&env, local_pv("pv-a", WFFC, "10Gi", HOST)).await;
    claim(&env.client, NS, "data-0", WFFC, "5Gi", None)
        .await
        .unwrap();
    let ev = wait_event(&env.client, NS, "data-0", "WaitForFirstConsumer", T)
        .await
        .unwrap();
    assert_eq!(ev.type_.as_deref(), Some("Normal"));
    assert_unbound(&env, "data-0", "pv-a").await;
    assert_eq!(b.binds(), 0);

    // The scheduler picks node-a (hostname label host-a-label) for the pod.
    select_node(&env.client, NS, "data-0", NODE).await.unwrap();
    let bound = wait_bound(&env.client, NS, "data-0", T).await.unwrap();
    assert_eq!(bound.name_any(), "pv-a");
    assert_eq!(binder::pv_phase(&bound), "Bound");

    // What the real controller writes, on both sides.
    let c = pvcs(&env).get("data-0").await.unwrap();
    let r = bound.spec.as_ref().unwrap().claim_ref.clone().unwrap();
    assert_eq!(r.api_version.as_deref(), Some("v1"));
    assert_eq!(r.kind.as_deref(), Some("PersistentVolumeClaim"));
    assert_eq!(r.namespace.as_deref(), Some(NS));
    assert_eq!(r.name.as_deref(), Some("data-0"));
    assert_eq!(r.uid, c.metadata.uid);
    assert!(r.resource_version.is_some_and(|v| !v.is_empty()));
    assert_eq!(
        bound
            .annotations()
            .get(ANN_BOUND_BY_CONTROLLER)
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        c.spec.as_ref().unwrap().volume_name.as_deref(),
        Some("pv-a")
    );
    assert_eq!(
        c.annotations().get(ANN_BIND_COMPLETED).map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        c.annotations()
            .get(ANN_BOUND_BY_CONTROLLER)
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        c.annotations().get(ANN_SELECTED_NODE).map(String::as_str),
        Some(NODE)
    );
    let st = c.status.unwrap();
    assert_eq!(st.phase.as_deref(), Some("Bound"));
    // The claim reports the volume's capacity, not its request.
    assert_eq!(st.capacity, pv.spec.as_ref().unwrap().capacity);
    assert_eq!(st.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    assert_eq!(b.binds(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_class_binds_at_once() {
    let env = env().await;
    add_class(&env, "local-now", "Immediate").await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-now", "local-now", "1Gi", HOST)).await;
    claim(&env.client, NS, "c", "local-now", "1Gi", None)
        .await
        .unwrap();
    let pv = wait_bound(&env.client, NS, "c", T).await.unwrap();
    assert_eq!(pv.name_any(), "pv-now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_small_never_binds() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-small", WFFC, "1Gi", HOST)).await;
    claim(&env.client, NS, "c", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c", "pv-small", "1 too small").await;
    // Control: the same claim binds once a PV of exactly its size exists
    // (2Gi written as plain bytes).
    add_pv(&env, local_pv("pv-exact", WFFC, "2147483648", HOST)).await;
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_modes_mismatch_never_binds() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-rwo", WFFC, "1Gi", HOST)).await;
    let mut c = pvc(NS, "c", WFFC, "1Gi", Some(NODE));
    c.spec.as_mut().unwrap().access_modes =
        Some(vec!["ReadWriteOnce".into(), "ReadOnlyMany".into()]);
    create_claim(&env.client, &c).await.unwrap();
    assert_never_binds(&env, "c", "pv-rwo", "1 access modes mismatch").await;
    // Control: a PV offering a superset of the claim's modes fits.
    let mut pv = local_pv("pv-many", WFFC, "1Gi", HOST);
    pv["spec"]["accessModes"] = json!(["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce"]);
    add_pv(&env, pv).await;
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-many"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_mismatch_never_binds() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-other", "other-class", "1Gi", HOST)).await;
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c", "pv-other", "1 storage class mismatch").await;
    add_pv(&env, local_pv("pv-fast", WFFC, "1Gi", HOST)).await;
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-fast"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_mode_mismatch_never_binds() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    let mut block = local_pv("pv-block", WFFC, "1Gi", HOST);
    block["spec"]["volumeMode"] = json!("Block");
    add_pv(&env, block).await;
    // The claim leaves volumeMode unset: Filesystem by default.
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c", "pv-block", "1 volume mode mismatch").await;
    // A Block claim takes the Block PV.
    let mut blk = pvc(NS, "c-block", WFFC, "1Gi", Some(NODE));
    blk.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    create_claim(&env.client, &blk).await.unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c-block", T)
            .await
            .unwrap()
            .name_any(),
        "pv-block"
    );
    assert_eq!(
        binder::claim_phase(&pvcs(&env).get("c").await.unwrap()),
        "Pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_affinity_follows_node_labels_not_node_name() {
    let env = env().await;
    env.node("node-b", "host-b-label").await;
    let _b = Binder::start(env.client.clone());
    // Affinity on node-a's *name*: its hostname label is host-a-label, so no.
    add_pv(&env, local_pv("pv-by-name", WFFC, "1Gi", NODE)).await;
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c", "pv-by-name", "1 node affinity mismatch").await;

    // A PV on node-b never goes to a claim scheduled to node-a.
    add_pv(&env, local_pv("pv-on-b", WFFC, "1Gi", "host-b-label")).await;
    wait_event_with(
        &env.client,
        NS,
        "c",
        "FailedBinding",
        "2 node affinity mismatch",
        T,
    )
    .await
    .unwrap();
    assert_unbound(&env, "c", "pv-on-b").await;

    // Several operators AND'ed in one term, OR'ed with a term that fails.
    let mut pv = local_pv("pv-ops", WFFC, "1Gi", HOST);
    pv["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["nowhere"]}]},
        {"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["x", HOST]},
            {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["z2"]},
            {"key": "topology.kubernetes.io/zone", "operator": "Exists"},
            {"key": "disk.example/broken", "operator": "DoesNotExist"}
        ]}
    ]}});
    add_pv(&env, pv).await;
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-ops"
    );

    // The node-b PV is taken by a claim scheduled there.
    claim(&env.client, NS, "c-b", WFFC, "1Gi", Some("node-b"))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c-b", T)
            .await
            .unwrap()
            .name_any(),
        "pv-on-b"
    );
    let pv = pvs(&env).get("pv-by-name").await.unwrap();
    assert!(pv.spec.unwrap().claim_ref.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_labels_changing_later_are_seen() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    let mut pv = local_pv("pv-ssd", WFFC, "1Gi", HOST);
    pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "disk.example/ssd", "operator": "Exists"}));
    add_pv(&env, pv).await;
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c", "pv-ssd", "1 node affinity mismatch").await;
    // The node gains the label: the Node watch triggers a pass that binds.
    let nodes: Api<Node> = Api::all(env.client.clone());
    let patch = json!({"metadata": {"labels": {"disk.example/ssd": "true"}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-ssd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smallest_fitting_pv_is_chosen() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    // Sizes in several notations; names sort opposite to sizes.
    add_pv(&env, local_pv("pv-a-10gi", WFFC, "10Gi", HOST)).await;
    add_pv(&env, local_pv("pv-b-5g", WFFC, "5G", HOST)).await;
    add_pv(&env, local_pv("pv-c-3gi", WFFC, "3221225472", HOST)).await;
    add_pv(&env, local_pv("pv-d-1gi", WFFC, "1024Mi", HOST)).await; // too small
    claim(&env.client, NS, "c0", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c0", T)
            .await
            .unwrap()
            .name_any(),
        "pv-c-3gi"
    );
    claim(&env.client, NS, "c1", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c1", T)
            .await
            .unwrap()
            .name_any(),
        "pv-b-5g"
    );
    claim(&env.client, NS, "c2", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c2", T)
            .await
            .unwrap()
            .name_any(),
        "pv-a-10gi"
    );
    // Nothing left that fits; the 1Gi PV stays free.
    claim(&env.client, NS, "c3", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_never_binds(&env, "c3", "pv-d-1gi", "1 too small").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_life_delete_claim_releases_pv() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-0", WFFC, "1Gi", HOST)).await;
    let c = claim(&env.client, NS, "data-web-0", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    let bound = wait_bound(&env.client, NS, "data-web-0", T).await.unwrap();
    assert_eq!(bound.name_any(), "pv-0");

    delete_claim(&env.client, NS, "data-web-0").await.unwrap();
    let released = wait_phase(&env.client, "pv-0", "Released", T)
        .await
        .unwrap();
    // claimRef stays, as in Kubernetes: the volume keeps the old claim's uid.
    assert_eq!(claim_ref_uid(&released), c.metadata.uid);
    let r = released.spec.unwrap().claim_ref.unwrap();
    assert_eq!(r.name.as_deref(), Some("data-web-0"));
    // Retain: no further phase change.
    assert_eq!(released.status.unwrap().message, None);

    // The StatefulSet recreates the claim under the same name: a new uid, so
    // the Released volume is not reused.
    claim(&env.client, NS, "data-web-0", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    wait_event_with(
        &env.client,
        NS,
        "data-web-0",
        "FailedBinding",
        "1 not Available",
        T,
    )
    .await
    .unwrap();
    let pv = pvs(&env).get("pv-0").await.unwrap();
    assert_eq!(binder::pv_phase(&pv), "Released");
    assert_eq!(claim_ref_uid(&pv), c.metadata.uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangling_claim_refs_are_released_at_startup() {
    let env = env().await;
    // An existing claim, and PVs pointing at: a uid nobody has, the existing
    // claim's name with an old uid, the existing claim itself, and a claim
    // name only (pre-bound by a user, no uid).
    let live = claim(&env.client, NS, "live", WFFC, "1Gi", None)
        .await
        .unwrap();
    let with_ref = |name: &str, claim: &str, uid: Option<&str>| {
        let mut pv = local_pv(name, WFFC, "1Gi", HOST);
        let mut r = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": NS, "name": claim});
        if let Some(u) = uid {
            r["uid"] = json!(u);
        }
        pv["spec"]["claimRef"] = r;
        pv
    };
    let store = env.server.store();
    store
        .create(with_ref(
            "pv-gone",
            "gone",
            Some("00000000-dead-beef-0000-000000000000"),
        ))
        .await
        .unwrap();
    store
        .create(with_ref(
            "pv-old-uid",
            "live",
            Some("11111111-dead-beef-0000-000000000000"),
        ))
        .await
        .unwrap();
    let mut to_live = with_ref(
        "pv-live",
        "live",
        Some(live.metadata.uid.as_deref().unwrap()),
    );
    to_live["spec"]["capacity"]["storage"] = json!("100Gi");
    store.create(to_live).await.unwrap();
    store
        .create(with_ref("pv-prebound", "someone", None))
        .await
        .unwrap();

    let _b = Binder::start(env.client.clone());
    for name in ["pv-gone", "pv-old-uid"] {
        let pv = wait_phase(&env.client, name, "Released", T).await.unwrap();
        assert!(claim_ref_uid(&pv).is_some(), "{name}: claimRef kept");
    }
    wait_phase(&env.client, "pv-prebound", "Available", T)
        .await
        .unwrap();
    // The live claim's volume is bound to it (its claimRef came first), even
    // though the claim waits for a first consumer and is much smaller.
    let pv = wait_bound(&env.client, NS, "live", T).await.unwrap();
    assert_eq!(pv.name_any(), "pv-live");
    let pv = pvs(&env).get("pv-prebound").await.unwrap();
    assert_eq!(claim_ref_uid(&pv), None);
}

/// A claimRef to a claim the binder's cache has not seen yet (its PVC watch
/// is cut) must be checked against the server before releasing the volume:
/// the claim exists, so the volume is bound to it, not Released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_unknown_to_the_cache_is_checked_before_release() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-warmup", WFFC, "1Gi", HOST)).await;
    let freeze = env.server.faults().inject(
        FaultRule::always(FaultAction::Status { code: 503 })
            .verb(Verb::Watch)
            .resource("persistentvolumeclaims"),
    );
    env.server.faults().drop_watches();
    let c = claim(&env.client, NS, "c", WFFC, "5Gi", Some(NODE))
        .await
        .unwrap();
    let mut pv = local_pv("pv-taken", WFFC, "5Gi", HOST);
    pv["spec"]["claimRef"] = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "namespace": NS, "name": "c", "uid": c.metadata.uid
    });
    env.server.store().create(pv).await.unwrap();
    let pv = wait_phase(&env.client, "pv-taken", "Bound", T)
        .await
        .unwrap();
    assert_eq!(claim_ref_uid(&pv), c.metadata.uid);
    env.server.faults().remove(freeze);
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prebound_pv_goes_only_to_its_claim() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    let mut pv = local_pv("pv-for-b", WFFC, "1Gi", HOST);
    pv["spec"]["claimRef"] = json!({"namespace": NS, "name": "b"});
    add_pv(&env, pv).await;
    claim(&env.client, NS, "a", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    wait_event_with(
        &env.client,
        NS,
        "a",
        "FailedBinding",
        "1 claimed by another claim",
        T,
    )
    .await
    .unwrap();
    claim(&env.client, NS, "b", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    let pv = wait_bound(&env.client, NS, "b", T).await.unwrap();
    assert_eq!(pv.name_any(), "pv-for-b");
    // Pre-bound by a user: the controller did not set the claimRef.
    assert!(!pv.annotations().contains_key(ANN_BOUND_BY_CONTROLLER));
    assert_eq!(
        binder::claim_phase(&pvcs(&env).get("a").await.unwrap()),
        "Pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_bound_pv_loses_the_claim() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-x", WFFC, "1Gi", HOST)).await;
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    wait_bound(&env.client, NS, "c", T).await.unwrap();
    env.server
        .store()
        .delete("persistentvolumes", None, "pv-x")
        .await
        .unwrap();
    let c = wait_claim_phase(&env.client, NS, "c", "Lost", T)
        .await
        .unwrap();
    assert_eq!(c.spec.unwrap().volume_name.as_deref(), Some("pv-x"));
    assert_eq!(c.status.unwrap().capacity, None);
    wait_event(&env.client, NS, "c", "ClaimLost", T)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_delete_without_external_deleter_fails() {
    let env = env().await;
    let _b = Binder::start(env.client.clone());
    let mut plain = local_pv("pv-plain", WFFC, "1Gi", HOST);
    plain["spec"]["persistentVolumeReclaimPolicy"] = json!("Delete");
    let mut ext = local_pv("pv-ext", WFFC, "2Gi", HOST);
    ext["spec"]["persistentVolumeReclaimPolicy"] = json!("Delete");
    ext["metadata"]["annotations"] = json!({"pv.kubernetes.io/provisioned-by": "disklet"});
    add_pv(&env, plain).await;
    add_pv(&env, ext).await;
    claim(&env.client, NS, "c1", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    claim(&env.client, NS, "c2", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c1", T)
            .await
            .unwrap()
            .name_any(),
        "pv-plain"
    );
    assert_eq!(
        wait_bound(&env.client, NS, "c2", T)
            .await
            .unwrap()
            .name_any(),
        "pv-ext"
    );
    delete_claim(&env.client, NS, "c1").await.unwrap();
    delete_claim(&env.client, NS, "c2").await.unwrap();
    // No in-tree plugin deletes a local PV: Failed, claimRef kept.
    let pv = wait_phase(&env.client, "pv-plain", "Failed", T)
        .await
        .unwrap();
    assert!(claim_ref_uid(&pv).is_some());
    assert!(pv
        .status
        .unwrap()
        .message
        .unwrap_or_default()
        .contains("no deletable volume plugin"));
    // An externally provisioned PV waits Released for its deleter (disklet).
    wait_phase(&env.client, "pv-ext", "Released", T)
        .await
        .unwrap();
}

/// Injected 409s on the PV write: the binder re-reads and retries within the
/// same pass. The resync is an hour and a failed pass would be counted, so
/// only the conflict handling can bind here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_conflicts_are_retried() {
    let env = env().await;
    let b = Binder::start_with(
        env.client.clone(),
        BinderOptions {
            resync: Duration::from_secs(3600),
            ..BinderOptions::default()
        },
    );
    add_pv(&env, local_pv("pv-c", WFFC, "1Gi", HOST)).await;
    env.server.clear_requests();
    env.server.faults().inject(
        FaultRule::always(FaultAction::Status { code: 409 })
            .verb(Verb::Patch)
            .resource("persistentvolumes")
            .times(3),
    );
    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-c"
    );
    let reqs = env.server.requests();
    let conflicted = reqs
        .iter()
        .filter(|r| r.verb == Some(Verb::Patch) && r.status == 409)
        .count();
    let rereads = reqs
        .iter()
        .filter(|r| {
            r.verb == Some(Verb::Get)
                && r.resource.as_deref() == Some("persistentvolumes")
                && r.name.as_deref() == Some("pv-c")
        })
        .count();
    assert_eq!(conflicted, 3);
    assert!(rereads >= 3, "one re-read per conflict, got {rereads}");
    assert_eq!(b.conflicts(), 3);
    assert_eq!(
        b.stats()
            .failed_passes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(b.binds(), 1);
}

/// A real conflict: the PV changes behind the binder's back (its PV watch is
/// cut), so its write carries a stale resourceVersion, gets 409, and the
/// binder must re-read the PV to bind it — keeping the concurrent change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pv_change_is_reread_and_kept() {
    let env = env().await;
    let b = Binder::start_with(
        env.client.clone(),
        BinderOptions {
            resync: Duration::from_secs(3600),
            ..BinderOptions::default()
        },
    );
    add_pv(&env, local_pv("pv-r", WFFC, "1Gi", HOST)).await;
    // Freeze the binder's view of PVs: no PV watch can (re)start from now on.
    let freeze = env.server.faults().inject(
        FaultRule::always(FaultAction::Status { code: 503 })
            .verb(Verb::Watch)
            .resource("persistentvolumes"),
    );
    env.server.faults().drop_watches();
    // Someone else (e.g. the agent) updates the PV meanwhile.
    let pv = env
        .server
        .store()
        .get("persistentvolumes", None, "pv-r")
        .await
        .unwrap();
    let mut changed = pv.clone();
    changed["metadata"]["labels"] = json!({"example.com/touched": "yes"});
    env.server.store().update(changed).await.unwrap();

    claim(&env.client, NS, "c", WFFC, "1Gi", Some(NODE))
        .await
        .unwrap();
    // PVC watches still work: wait on the claim, then read the PV directly.
    let c = wait_claim_phase(&env.client, NS, "c", "Bound", T)
        .await
        .unwrap();
    env.server.faults().remove(freeze);
    let pv = pvs(&env).get("pv-r").await.unwrap();
    assert_eq!(claim_ref_uid(&pv), c.metadata.uid);
    assert_eq!(binder::pv_phase(&pv), "Bound");
    assert_eq!(
        pv.labels().get("example.com/touched").map(String::as_str),
        Some("yes"),
        "the concurrent change survived"
    );
    assert!(b.conflicts() >= 1, "the stale write must have conflicted");
    assert_eq!(
        b.stats()
            .failed_passes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let conflicted = env
        .server
        .requests()
        .iter()
        .filter(|r| r.verb == Some(Verb::Patch) && r.status == 409 && !r.faulted)
        .count();
    assert!(conflicted >= 1, "a genuine (not injected) 409");
}

/// Dropping the binder ends its task (the state it owns is dropped), and a
/// new binder picks up whatever happened meanwhile, as after a controller
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_ends_the_task_and_a_new_binder_catches_up() {
    let env = env().await;
    let b = Binder::start(env.client.clone());
    add_pv(&env, local_pv("pv-1", WFFC, "1Gi", HOST)).await;
    let mut alive = b.alive();
    drop(b);
    tokio::time::timeout(T, alive.changed())
        .await
        .expect("the task ended")
        .expect_err("the task's state was dropped, not changed");

    env.server
        .store()
        .create(local_pv("pv-2", WFFC, "2Gi", HOST))
        .await
        .unwrap();
    claim(&env.client, NS, "c", WFFC, "2Gi", Some(NODE))
        .await
        .unwrap();
    let b2 = Binder::start(env.client.clone());
    assert_eq!(
        wait_bound(&env.client, NS, "c", T)
            .await
            .unwrap()
            .name_any(),
        "pv-2"
    );
    wait_phase(&env.client, "pv-1", "Available", T)
        .await
        .unwrap();
    assert_eq!(b2.binds(), 1);
    b2.shutdown().await;
}
