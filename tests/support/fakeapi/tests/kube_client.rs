//! kube-rs client and runtime against the fake server.

mod common;

use common::*;
use disklet_fakeapi::FaultRule;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use std::time::Duration;

async fn client(env: &Env) -> Client {
    let kc = Kubeconfig::read_from(&env.kubeconfig).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

fn typed_pv(name: &str, node: &str) -> PersistentVolume {
    serde_json::from_value(pv(name, node)).expect("pv")
}

fn api_err(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crud_conflict_apply_status_delete() {
    let env = start().await;
    let pvs: Api<PersistentVolume> = Api::all(client(&env).await);
    let created = pvs
        .create(&PostParams::default(), &typed_pv("pv-1", "n1"))
        .await
        .expect("create");
    assert!(created.metadata.uid.is_some());
    pvs.create(&PostParams::default(), &typed_pv("pv-2", "n2"))
        .await
        .expect("create");
    let got = pvs.get("pv-1").await.expect("get");
    assert_eq!(
        got.spec
            .as_ref()
            .and_then(|s| s.local.as_ref())
            .map(|l| l.path.as_str()),
        Some("/mnt/disks/pv-1")
    );
    let listed = pvs
        .list(&ListParams::default().labels("disklet.io/node=n1"))
        .await
        .expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        vec!["pv-1"]
    );
    assert!(listed.metadata.resource_version.is_some());
    // replace with a stale RV -> 409 Conflict
    let mut fresh = got.clone();
    fresh.labels_mut().insert("a".into(), "1".into());
    pvs.replace("pv-1", &PostParams::default(), &fresh)
        .await
        .expect("replace");
    let mut stale = got.clone();
    stale.labels_mut().insert("b".into(), "2".into());
    let err = pvs
        .replace("pv-1", &PostParams::default(), &stale)
        .await
        .expect_err("stale replace");
    assert_eq!(api_err(err), (409, "Conflict".to_string()));
    // server-side apply by "disklet": idempotent, omitted fields removed
    let pp = PatchParams::apply("disklet");
    let mut cfg = pv("pv-3", "n1");
    cfg["metadata"]["annotations"] = json!({"disklet.io/serial": "S123"});
    let a1 = pvs
        .patch("pv-3", &pp, &Patch::Apply(&cfg))
        .await
        .expect("apply create");
    let a2 = pvs
        .patch("pv-3", &pp, &Patch::Apply(&cfg))
        .await
        .expect("apply again");
    assert_eq!(
        a1.resource_version(),
        a2.resource_version(),
        "idempotent apply must not write"
    );
    cfg["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("annotations");
    let a3 = pvs
        .patch("pv-3", &pp, &Patch::Apply(&cfg))
        .await
        .expect("apply without annotation");
    assert!(a3.annotations().get("disklet.io/serial").is_none());
    let mf = a3.metadata.managed_fields.clone().unwrap_or_default();
    assert!(mf.iter().any(
        |m| m.manager.as_deref() == Some("disklet") && m.operation.as_deref() == Some("Apply")
    ));
    // status subresource
    let st = pvs
        .patch_status(
            "pv-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Available"}})),
        )
        .await
        .expect("patch_status");
    assert_eq!(
        st.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Available")
    );
    let main = pvs
        .patch(
            "pv-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .expect("patch main");
    assert_eq!(
        main.status.and_then(|s| s.phase),
        Some("Available".to_string()),
        "main resource ignores status"
    );
    // delete with a finalizer
    pvs.patch(
        "pv-3",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["disklet.io/wipe"]}})),
    )
    .await
    .expect("add finalizer");
    let d = pvs
        .delete("pv-3", &DeleteParams::default())
        .await
        .expect("delete");
    let pending = d.left().expect("object returned while finalizers pending");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(pvs.get_opt("pv-3").await.expect("get_opt").is_some());
    pvs.patch(
        "pv-3",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    assert!(pvs.get_opt("pv-3").await.expect("get_opt").is_none());
    let gone = pvs
        .delete("pv-3", &DeleteParams::default())
        .await
        .expect_err("already gone");
    assert_eq!(api_err(gone), (404, "NotFound".to_string()));
    env.srv.shutdown().await;
}

#[tokio::test]
async fn watcher_sees_events_and_survives_drop_and_410() {
    let env = start().await;
    let client = client(&env).await;
    let pvs: Api<PersistentVolume> = Api::all(client);
    let store = env.srv.store();
    let mut stream = watcher(
        pvs.clone(),
        watcher::Config::default().labels("disklet.io/node=n1"),
    )
    .boxed();
    // initial list
    macro_rules! next {
        () => {
            tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("watcher stalled")
                .expect("stream ended")
        };
    }
    assert!(matches!(next!(), Ok(watcher::Event::Init)));
    assert!(matches!(next!(), Ok(watcher::Event::InitDone)));
    store.create(pv("pv-a", "n1")).await.expect("create");
    store.create(pv("pv-other", "n2")).await.expect("create");
    match next!() {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "pv-a"),
        other => panic!("expected Apply(pv-a), got {other:?}"),
    }
    store.delete("pv", None, "pv-a").await.expect("delete");
    match next!() {
        Ok(watcher::Event::Delete(p)) => assert_eq!(p.name_any(), "pv-a"),
        other => panic!("expected Delete(pv-a), got {other:?}"),
    }
    // dropped watch: the watcher re-watches from its last RV and misses nothing
    env.srv.faults().drop_watches();
    store.create(pv("pv-b", "n1")).await.expect("create");
    match next!() {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "pv-b"),
        other => panic!("expected Apply(pv-b), got {other:?}"),
    }
    // 410 on the next re-watch: the watcher reports the error and relists
    env.srv.faults().expire_next_watch(None);
    env.srv.faults().drop_watches();
    let mut saw_err = false;
    let mut saw_init = false;
    loop {
        match next!() {
            Err(_) => saw_err = true,
            Ok(watcher::Event::Init) => saw_init = true,
            Ok(watcher::Event::InitApply(p)) => assert_eq!(p.name_any(), "pv-b"),
            Ok(watcher::Event::InitDone) => break,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_err && saw_init, "expected an error then a relist");
    let relists = env
        .srv
        .requests()
        .iter()
        .filter(|r| r.verb == Some(disklet_fakeapi::Verb::List))
        .count();
    assert_eq!(relists, 2);
    assert!(
        env.srv
            .requests()
            .iter()
            .filter(|r| r.resource.as_deref() == Some("persistentvolumes"))
            .all(|r| r.label_selector.as_deref() == Some("disklet.io/node=n1")),
        "every list/watch carries the selector"
    );
    env.srv.shutdown().await;
}

#[tokio::test]
async fn reflector_store_converges_through_faults() {
    let env = start().await;
    let pvs: Api<PersistentVolume> = Api::all(client(&env).await);
    let (reader, writer) = reflector::store::<PersistentVolume>();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let rf = reflector(writer, watcher(pvs.clone(), watcher::Config::default()))
        .default_backoff()
        .for_each(move |_| {
            let _ = seen_tx.send(());
            futures::future::ready(())
        });
    let task = tokio::spawn(rf);
    reader.wait_until_ready().await.expect("ready");
    let store = env.srv.store();
    for i in 0..20 {
        store
            .create(pv(&format!("pv-{i:02}"), "n1"))
            .await
            .expect("create");
    }
    // a failing relist in the middle: the backoff retries until it works
    env.srv.faults().inject(
        FaultRule::always(disklet_fakeapi::FaultAction::Status { code: 503 })
            .verb(disklet_fakeapi::Verb::List)
            .times(2),
    );
    env.srv.faults().expire_next_watch(None);
    env.srv.faults().drop_watches();
    for i in 0..5 {
        store
            .delete("pv", None, &format!("pv-{i:02}"))
            .await
            .expect("delete");
    }
    let want: Vec<String> = (5..20).map(|i| format!("pv-{i:02}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut have: Vec<String> = reader.state().iter().map(|p| p.name_any()).collect();
        have.sort();
        if have == want {
            break;
        }
        // wait for the next event the reflector processed
        tokio::time::timeout_at(deadline, seen_rx.recv())
            .await
            .expect("reflector did not converge")
            .expect("reflector ended");
    }
    task.abort();
    env.srv.shutdown().await;
}

#[tokio::test]
async fn streaming_list_watcher() {
    let env = start().await;
    let pvs: Api<PersistentVolume> = Api::all(client(&env).await);
    env.srv
        .store()
        .create(pv("pv-a", "n1"))
        .await
        .expect("create");
    let mut stream = watcher(pvs, watcher::Config::default().streaming_lists()).boxed();
    let mut names = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("stalled")
            .expect("error")
        {
            Some(watcher::Event::InitApply(p)) => names.push(p.name_any()),
            Some(watcher::Event::InitDone) => break,
            Some(_) => {}
            None => panic!("ended"),
        }
    }
    assert_eq!(names, vec!["pv-a"]);
    let w = env
        .srv
        .requests()
        .into_iter()
        .find(|r| r.verb == Some(disklet_fakeapi::Verb::Watch))
        .expect("watch");
    assert!(w.query.contains("sendInitialEvents=true"));
    env.srv.shutdown().await;
}
