//! Raw HTTP tests: watch semantics, pagination, errors, faults, counters.

mod common;

use common::*;
use disklet_fakeapi::{FaultAction, FaultRule, Options, OutageKind, Verb};
use serde_json::json;
use std::time::Duration;

const PVS: &str = "/api/v1/persistentvolumes";

#[tokio::test]
async fn discovery_and_health() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    assert_eq!(h.get("/healthz").await.text, "ok");
    assert_eq!(h.get("/readyz").await.status, 200);
    let v = h.get("/version").await;
    assert_eq!(v.body["major"], "1");
    let core = h.get("/api/v1").await;
    assert_eq!(core.headers["content-type"], "application/json");
    let res = core.body["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pv = res
        .iter()
        .find(|r| r["name"] == "persistentvolumes")
        .expect("pv in discovery");
    assert_eq!(pv["shortNames"], json!(["pv"]));
    assert_eq!(pv["namespaced"], false);
    assert!(res.iter().any(|r| r["name"] == "persistentvolumes/status"));
    assert!(res
        .iter()
        .any(|r| r["name"] == "persistentvolumeclaims" && r["namespaced"] == true));
    let groups = h.get("/apis").await;
    let names: Vec<&str> = groups.body["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for g in [
        "storage.k8s.io",
        "events.k8s.io",
        "coordination.k8s.io",
        "authorization.k8s.io",
    ] {
        assert!(names.contains(&g), "{g} missing from {names:?}");
    }
    let sc = h.get("/apis/storage.k8s.io/v1").await;
    assert_eq!(sc.body["resources"][0]["shortNames"], json!(["sc"]));
    assert_eq!(h.get("/apis/nope.io/v1").await.status, 404);
    let nf = h.get("/api/v1/persistentvolumes/missing").await;
    assert_eq!(nf.status, 404);
    assert_eq!(nf.body["kind"], "Status");
    assert_eq!(nf.body["reason"], "NotFound");
    assert_eq!(
        nf.body["message"],
        "persistentvolumes \"missing\" not found"
    );
    assert_eq!(nf.body["details"]["name"], "missing");
    assert_eq!(nf.body["details"]["kind"], "persistentvolumes");
    env.srv.shutdown().await;
}

#[tokio::test]
async fn create_validation_and_conflicts() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let created = h.post(PVS, &pv("pv-a", "n1")).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["metadata"]["generation"], 1);
    assert!(created.body["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert_eq!(created.body["status"]["phase"], "Pending");
    assert_eq!(
        created.body["spec"]["persistentVolumeReclaimPolicy"],
        "Retain"
    );
    let again = h.post(PVS, &pv("pv-a", "n1")).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.body["reason"], "AlreadyExists");
    // invalid name
    let bad = h.post(PVS, &pv("Bad_Name", "n1")).await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["reason"], "Invalid");
    assert_eq!(bad.body["details"]["causes"][0]["field"], "metadata.name");
    // kind mismatch with URL
    let mut wrong = pv("pv-k", "n1");
    wrong["kind"] = json!("Node");
    assert_eq!(h.post(PVS, &wrong).await.status, 422);
    // local PV without nodeAffinity is rejected like the real validation
    let mut no_aff = pv("pv-na", "n1");
    no_aff["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("nodeAffinity");
    let r = h.post(PVS, &no_aff).await;
    assert_eq!(r.status, 422);
    assert!(r.body["message"]
        .as_str()
        .unwrap_or("")
        .contains("spec.nodeAffinity"));
    // generateName
    let mut gen = pv("", "n1");
    gen["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("name");
    gen["metadata"]["generateName"] = json!("disk-");
    let g = h.post(PVS, &gen).await;
    assert_eq!(g.status, 201);
    assert!(g.body["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("disk-") && n.len() == 10));
    // dryRun creates nothing
    let d = h
        .post(&format!("{PVS}?dryRun=All"), &pv("pv-dry", "n1"))
        .await;
    assert_eq!(d.status, 201);
    assert_eq!(h.get(&format!("{PVS}/pv-dry")).await.status, 404);
    // PUT with stale resourceVersion
    let mut stale = created.body.clone();
    let cur = h
        .patch(
            &format!("{PVS}/pv-a"),
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"x":"1"}}}"#,
        )
        .await;
    assert_eq!(cur.status, 200);
    stale["metadata"]["labels"]["y"] = json!("2");
    let c = h.put(&format!("{PVS}/pv-a"), &stale).await;
    assert_eq!(c.status, 409);
    assert_eq!(c.body["reason"], "Conflict");
    assert_eq!(c.body["message"], "Operation cannot be fulfilled on persistentvolumes \"pv-a\": the object has been modified; please apply your changes to the latest version and try again");
    // PUT without resourceVersion is unconditional; status changes are ignored on the main resource
    let mut unconditional = cur.body.clone();
    unconditional["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("resourceVersion");
    unconditional["status"]["phase"] = json!("Bound");
    unconditional["spec"]["capacity"]["storage"] = json!("20Gi");
    let u = h.put(&format!("{PVS}/pv-a"), &unconditional).await;
    assert_eq!(u.status, 200);
    assert_eq!(u.body["status"]["phase"], "Pending");
    assert_eq!(u.body["spec"]["capacity"]["storage"], "20Gi");
    assert_eq!(u.body["metadata"]["generation"], 2);
    // /status changes only status
    let mut st = u.body.clone();
    st["status"]["phase"] = json!("Available");
    st["spec"]["capacity"]["storage"] = json!("99Gi");
    let s = h.put(&format!("{PVS}/pv-a/status"), &st).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.body["status"]["phase"], "Available");
    assert_eq!(s.body["spec"]["capacity"]["storage"], "20Gi");
    assert_eq!(s.body["metadata"]["generation"], 2);
    // json patch test op failure -> 422
    let t = h
        .patch(
            &format!("{PVS}/pv-a"),
            "application/json-patch+json",
            r#"[{"op":"test","path":"/spec/capacity/storage","value":"1Gi"}]"#,
        )
        .await;
    assert_eq!(t.status, 422);
    // patch with resourceVersion precondition
    let p = h
        .patch(
            &format!("{PVS}/pv-a"),
            "application/merge-patch+json",
            r#"{"metadata":{"resourceVersion":"1","labels":{"z":"1"}}}"#,
        )
        .await;
    assert_eq!(p.status, 409);
    // apply without fieldManager -> 400
    let a = h
        .patch(
            &format!("{PVS}/pv-a"),
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: pv-a\n",
        )
        .await;
    assert_eq!(a.status, 400);
    // unknown namespace
    let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
    assert_eq!(
        h.post("/api/v1/namespaces/nope/persistentvolumeclaims", &pvc)
            .await
            .status,
        404
    );
    assert_eq!(
        h.post("/api/v1/namespaces/default/persistentvolumeclaims", &pvc)
            .await
            .status,
        201
    );
    env.srv.shutdown().await;
}

#[tokio::test]
async fn delete_with_finalizers_and_preconditions() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let mut obj = pv("pv-f", "n1");
    obj["metadata"]["finalizers"] = json!(["disklet.io/cleanup"]);
    let created = h.post(PVS, &obj).await;
    let mut w = h
        .watch(&format!(
            "{PVS}?watch=1&resourceVersion={}",
            rv_of(&created.body)
        ))
        .await;
    // uid precondition mismatch
    let pre = h
        .send(
            "DELETE",
            &format!("{PVS}/pv-f"),
            Some("application/json"),
            Some(r#"{"preconditions":{"uid":"nope"}}"#),
        )
        .await
        .expect("delete");
    assert_eq!(pre.status, 409);
    let d = h.delete(&format!("{PVS}/pv-f")).await;
    assert_eq!(d.status, 200);
    assert!(d.body["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(d.body["metadata"]["deletionGracePeriodSeconds"], 0);
    let e = w.next_within(5).await.expect("event");
    assert_eq!(ev_type(&e), "MODIFIED");
    // still there
    assert_eq!(h.get(&format!("{PVS}/pv-f")).await.status, 200);
    // new finalizers refused while terminating
    let add = h
        .patch(
            &format!("{PVS}/pv-f"),
            "application/merge-patch+json",
            r#"{"metadata":{"finalizers":["disklet.io/cleanup","x.io/new"]}}"#,
        )
        .await;
    assert_eq!(add.status, 422);
    // removing the finalizer deletes it
    let rm = h
        .patch(
            &format!("{PVS}/pv-f"),
            "application/merge-patch+json",
            r#"{"metadata":{"finalizers":null}}"#,
        )
        .await;
    assert_eq!(rm.status, 200);
    let e = w.next_within(5).await.expect("event");
    assert_eq!(ev_type(&e), "DELETED");
    assert_eq!(h.get(&format!("{PVS}/pv-f")).await.status, 404);
    // plain delete returns Status Success and a DELETED event
    h.post(PVS, &pv("pv-g", "n1")).await;
    let _added = w.next_within(5).await;
    let d = h.delete(&format!("{PVS}/pv-g")).await;
    assert_eq!(d.body["kind"], "Status");
    assert_eq!(d.body["status"], "Success");
    let e = w.next_within(5).await.expect("event");
    assert_eq!((ev_type(&e), ev_name(&e)), ("DELETED", "pv-g"));
    assert_eq!(h.delete(&format!("{PVS}/pv-g")).await.status, 404);
    env.srv.shutdown().await;
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    for i in 0..7 {
        let node = if i % 2 == 0 { "n1" } else { "n2" };
        assert_eq!(h.post(PVS, &pv(&format!("pv-{i}"), node)).await.status, 201);
    }
    let all = h.get(PVS).await;
    assert_eq!(all.body["kind"], "PersistentVolumeList");
    assert_eq!(all.body["items"].as_array().map(Vec::len), Some(7));
    let names: Vec<&str> = all.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let n1 = h
        .get(&format!("{PVS}?labelSelector=disklet.io%2Fnode%3Dn1"))
        .await;
    assert_eq!(n1.body["items"].as_array().map(Vec::len), Some(4));
    let notin = h
        .get(&format!("{PVS}?labelSelector=disklet.io%2Fnode+notin+(n1)"))
        .await;
    assert_eq!(notin.body["items"].as_array().map(Vec::len), Some(3));
    let bad = h.get(&format!("{PVS}?labelSelector=a+in+()")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["reason"], "BadRequest");
    let f = h
        .get(&format!("{PVS}?fieldSelector=metadata.name%3Dpv-3"))
        .await;
    assert_eq!(f.body["items"].as_array().map(Vec::len), Some(1));
    let badf = h.get(&format!("{PVS}?fieldSelector=spec.nope%3Dx")).await;
    assert_eq!(badf.status, 400);
    assert!(badf.body["message"]
        .as_str()
        .unwrap_or("")
        .contains("field label not supported"));
    // pagination
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let url = if token.is_empty() {
            format!("{PVS}?limit=3")
        } else {
            format!("{PVS}?limit=3&continue={token}")
        };
        let page = h.get(&url).await;
        assert_eq!(page.status, 200);
        pages += 1;
        for i in page.body["items"].as_array().expect("items") {
            seen.push(i["metadata"]["name"].as_str().unwrap_or("").to_string());
        }
        match page.body["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => {
                if pages == 1 {
                    assert_eq!(page.body["metadata"]["remainingItemCount"], 4);
                }
                token = t.to_string();
            }
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7);
    // a continue token older than the compaction window is 410
    let first = h.get(&format!("{PVS}?limit=2")).await;
    let tok = first.body["metadata"]["continue"]
        .as_str()
        .expect("token")
        .to_string();
    env.srv
        .store()
        .create(pv("pv-new", "n1"))
        .await
        .expect("create");
    env.srv.compact().await;
    let gone = h.get(&format!("{PVS}?limit=2&continue={tok}")).await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.body["reason"], "Expired");
    env.srv.shutdown().await;
}

#[tokio::test]
async fn watch_replay_from_rv_and_410_after_compaction() {
    let env = start_with(Options {
        history_size: 5,
        ..Options::default()
    })
    .await;
    let h = Http::new(&env.srv.url());
    let first = h.post(PVS, &pv("pv-0", "n1")).await;
    let rv0 = rv_of(&first.body);
    h.post(PVS, &pv("pv-1", "n1")).await;
    h.patch(
        &format!("{PVS}/pv-0"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"x":"y"}}}"#,
    )
    .await;
    h.delete(&format!("{PVS}/pv-1")).await;
    let mut w = h
        .watch(&format!("{PVS}?watch=true&resourceVersion={rv0}"))
        .await;
    let got: Vec<(String, String)> = [
        w.next_within(5).await,
        w.next_within(5).await,
        w.next_within(5).await,
    ]
    .into_iter()
    .map(|e| {
        let e = e.expect("event");
        (ev_type(&e).to_string(), ev_name(&e).to_string())
    })
    .collect();
    assert_eq!(
        got,
        vec![
            ("ADDED".into(), "pv-1".into()),
            ("MODIFIED".into(), "pv-0".into()),
            ("DELETED".into(), "pv-1".into())
        ]
    );
    // then live events
    h.post(PVS, &pv("pv-2", "n1")).await;
    let e = w.next_within(5).await.expect("live event");
    assert_eq!((ev_type(&e), ev_name(&e)), ("ADDED", "pv-2"));
    // rv=0: synthetic ADDED for current objects
    let mut w0 = h.watch(&format!("{PVS}?watch=1&resourceVersion=0")).await;
    let a = w0.next_within(5).await.expect("event");
    let b = w0.next_within(5).await.expect("event");
    assert_eq!(
        (ev_type(&a), ev_name(&a), ev_type(&b), ev_name(&b)),
        ("ADDED", "pv-0", "ADDED", "pv-2")
    );
    // push rv0 out of the 5-event window
    for i in 10..16 {
        h.post(PVS, &pv(&format!("pv-{i}"), "n2")).await;
    }
    let mut old = h
        .watch(&format!("{PVS}?watch=1&resourceVersion={rv0}"))
        .await;
    let err = old.next_within(5).await.expect("error event");
    assert_eq!(ev_type(&err), "ERROR");
    assert_eq!(err["object"]["code"], 410);
    assert_eq!(err["object"]["reason"], "Expired");
    assert!(err["object"]["message"]
        .as_str()
        .unwrap_or("")
        .starts_with(&format!("too old resource version: {rv0} (")));
    assert!(old.ends_within(5).await);
    env.srv.shutdown().await;
}

#[tokio::test]
async fn watch_bookmarks_initial_events_and_timeout() {
    let env = start_with(Options {
        bookmark_interval: Duration::from_secs(3600),
        ..Options::default()
    })
    .await;
    let h = Http::new(&env.srv.url());
    h.post(PVS, &pv("pv-a", "n1")).await;
    let mut w = h.watch(&format!("{PVS}?watch=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=")).await;
    let a = w.next_within(5).await.expect("initial");
    assert_eq!((ev_type(&a), ev_name(&a)), ("ADDED", "pv-a"));
    let end = w.next_within(5).await.expect("initial-events-end");
    assert_eq!(ev_type(&end), "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(end["object"]["kind"], "PersistentVolume");
    let st = env.srv.store();
    st.create(pv("pv-b", "n1")).await.expect("create");
    let b = w.next_within(5).await.expect("event");
    assert_eq!(ev_name(&b), "pv-b");
    // on-demand bookmark carries the latest RV and nothing but kind/apiVersion/metadata.resourceVersion
    env.srv.send_bookmarks();
    let bm = w.next_within(5).await.expect("bookmark");
    assert_eq!(ev_type(&bm), "BOOKMARK");
    assert_eq!(
        bm["object"]["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        Some(st.resource_version().await)
    );
    assert_eq!(bm["object"].as_object().map(|m| m.len()), Some(3));
    // a watch without allowWatchBookmarks gets none
    let mut plain = h
        .watch(&format!(
            "{PVS}?watch=1&resourceVersion={}",
            st.resource_version().await
        ))
        .await;
    env.srv.send_bookmarks();
    st.create(pv("pv-c", "n1")).await.expect("create");
    let c = plain.next_within(5).await.expect("event");
    assert_eq!((ev_type(&c), ev_name(&c)), ("ADDED", "pv-c"));
    // periodic bookmarks
    let env2 = start_with(Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    let h2 = Http::new(&env2.srv.url());
    let mut wb = h2
        .watch(&format!("{PVS}?watch=1&allowWatchBookmarks=true"))
        .await;
    assert_eq!(
        ev_type(&wb.next_within(5).await.expect("periodic bookmark")),
        "BOOKMARK"
    );
    // timeoutSeconds ends the stream
    let mut wt = h
        .watch(&format!(
            "{PVS}?watch=1&resourceVersion={}&timeoutSeconds=1",
            st.resource_version().await
        ))
        .await;
    assert!(wt.ends_within(5).await);
    env.srv.shutdown().await;
    env2.srv.shutdown().await;
}

#[tokio::test]
async fn watch_selector_transitions() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    h.post(PVS, &pv("pv-a", "n1")).await;
    let mut w = h
        .watch(&format!(
            "{PVS}?watch=1&labelSelector=disklet.io%2Fnode%3Dn1"
        ))
        .await;
    assert_eq!(ev_type(&w.next_within(5).await.expect("initial")), "ADDED");
    // stops matching -> DELETED carrying the previous labels and the new RV
    let moved = h
        .patch(
            &format!("{PVS}/pv-a"),
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"disklet.io/node":"n2"}}}"#,
        )
        .await;
    let e = w.next_within(5).await.expect("event");
    assert_eq!(ev_type(&e), "DELETED");
    assert_eq!(e["object"]["metadata"]["labels"]["disklet.io/node"], "n1");
    assert_eq!(rv_of(&e["object"]), rv_of(&moved.body));
    // unrelated change is invisible; matching again -> ADDED
    h.patch(
        &format!("{PVS}/pv-a"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"other":"x"}}}"#,
    )
    .await;
    h.patch(
        &format!("{PVS}/pv-a"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"disklet.io/node":"n1"}}}"#,
    )
    .await;
    let e = w.next_within(5).await.expect("event");
    assert_eq!(ev_type(&e), "ADDED");
    assert_eq!(e["object"]["metadata"]["labels"]["other"], "x");
    env.srv.shutdown().await;
}

#[tokio::test]
async fn faults_status_429_latency_reset() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let f = env.srv.faults();
    f.inject(
        FaultRule::always(FaultAction::Status { code: 500 })
            .verb(Verb::List)
            .resource("persistentvolumes")
            .times(2),
    );
    assert_eq!(h.get(PVS).await.status, 500);
    let second = h.get(PVS).await;
    assert_eq!(second.status, 500);
    assert_eq!(second.body["reason"], "InternalError");
    assert_eq!(h.get(PVS).await.status, 200, "count exhausted");
    // other resources and verbs unaffected by a scoped rule
    f.inject(FaultRule::always(FaultAction::Status { code: 503 }).resource("persistentvolumes"));
    assert_eq!(h.get("/api/v1/nodes").await.status, 200);
    assert_eq!(h.get(PVS).await.status, 503);
    f.clear();
    assert_eq!(h.get(PVS).await.status, 200);
    // 429 with Retry-After
    f.inject(
        FaultRule::always(FaultAction::TooManyRequests {
            retry_after_secs: 7,
        })
        .verb(Verb::Create)
        .times(1),
    );
    let r = h.post(PVS, &pv("pv-a", "n1")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "7");
    assert_eq!(r.body["details"]["retryAfterSeconds"], 7);
    assert_eq!(h.post(PVS, &pv("pv-a", "n1")).await.status, 201);
    // latency
    f.inject(
        FaultRule::always(FaultAction::Latency { millis: 300 })
            .verb(Verb::Get)
            .times(1),
    );
    let t = std::time::Instant::now();
    assert_eq!(h.get(&format!("{PVS}/pv-a")).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    // reset: the connection is closed without an answer
    f.inject(
        FaultRule::always(FaultAction::Reset)
            .verb(Verb::Get)
            .times(1),
    );
    assert!(h
        .send("GET", &format!("{PVS}/pv-a"), None, None)
        .await
        .is_err());
    assert_eq!(h.get(&format!("{PVS}/pv-a")).await.status, 200);
    let faulted = env.srv.requests().iter().filter(|r| r.faulted).count();
    assert_eq!(faulted, 6);
    env.srv.shutdown().await;
}

#[tokio::test]
async fn faults_outages_drop_and_expire_watches() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let f = env.srv.faults();
    let created = h.post(PVS, &pv("pv-a", "n1")).await;
    // drop all watches
    let mut w1 = h
        .watch(&format!(
            "{PVS}?watch=1&resourceVersion={}",
            rv_of(&created.body)
        ))
        .await;
    let mut w2 = h.watch("/api/v1/nodes?watch=1").await;
    f.drop_watches();
    assert!(w1.ends_within(5).await);
    assert!(w2.ends_within(5).await);
    // next watch with this RV gets 410 once
    let rv = rv_of(&created.body);
    f.expire_next_watch(Some(&rv));
    let mut w = h
        .watch(&format!("{PVS}?watch=1&resourceVersion={rv}"))
        .await;
    let e = w.next_within(5).await.expect("error");
    assert_eq!(
        (ev_type(&e), e["object"]["code"].as_i64()),
        ("ERROR", Some(410))
    );
    let mut ok = h
        .watch(&format!("{PVS}?watch=1&resourceVersion={rv}"))
        .await;
    h.patch(
        &format!("{PVS}/pv-a"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"a":"b"}}}"#,
    )
    .await;
    assert_eq!(
        ev_type(&ok.next_within(5).await.expect("event")),
        "MODIFIED"
    );
    // 503 outage closes watches and fails everything, discovery included
    f.outage(OutageKind::ServiceUnavailable);
    assert!(ok.ends_within(5).await);
    assert_eq!(h.get(PVS).await.status, 503);
    assert_eq!(h.get("/api/v1").await.status, 503);
    f.end_outage();
    assert_eq!(h.get(PVS).await.status, 200);
    // connection refused outage
    f.outage(OutageKind::ConnectionRefused);
    let addr = env.srv.addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // the listener closes asynchronously: poll until connects are refused
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still accepting"
        );
        tokio::task::yield_now().await;
    }
    assert!(Http::new(&env.srv.url())
        .send("GET", PVS, None, None)
        .await
        .is_err());
    f.end_outage();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let fresh = Http::new(&env.srv.url());
    loop {
        if let Ok(r) = fresh.send("GET", PVS, None, None).await {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not come back"
        );
        tokio::task::yield_now().await;
    }
    env.srv.shutdown().await;
}

#[tokio::test]
async fn request_counters_and_admin_api() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    h.get(&format!("{PVS}?labelSelector=disklet.io%2Fnode%3Dn1"))
        .await;
    h.get(&format!("{PVS}?labelSelector=disklet.io%2Fnode%3Dn1"))
        .await;
    h.get(PVS).await;
    h.patch(
        &format!("{PVS}/x?fieldManager=disklet"),
        "application/apply-patch+yaml",
        &pv("x", "n1").to_string(),
    )
    .await;
    let counts = env.srv.request_counts();
    assert_eq!(
        counts.get(&(
            Verb::List,
            "persistentvolumes".into(),
            Some("disklet.io/node=n1".into())
        )),
        Some(&2)
    );
    assert_eq!(
        counts.get(&(Verb::List, "persistentvolumes".into(), None)),
        Some(&1)
    );
    assert_eq!(env.srv.count(Verb::Patch, "persistentvolumes"), 1);
    let reqs = env.srv.requests();
    let apply = reqs
        .iter()
        .find(|r| r.verb == Some(Verb::Patch))
        .expect("patch recorded");
    assert_eq!(apply.field_manager.as_deref(), Some("disklet"));
    assert_eq!(apply.status, 201);
    // admin API over HTTP (for the standalone binary)
    let r = h.send("POST", "/_fake/faults", Some("application/json"),
        Some(r#"{"match":{"verb":"get","resource":"persistentvolumes"},"action":{"type":"status","code":503},"count":1}"#)).await.expect("admin");
    assert_eq!(r.status, 200);
    assert_eq!(h.get(&format!("{PVS}/x")).await.status, 503);
    assert_eq!(h.get(&format!("{PVS}/x")).await.status, 200);
    let log = h.get("/_fake/requests").await;
    assert!(
        log.body
            .as_array()
            .is_some_and(|a| a.len() == reqs.len() + 2),
        "admin calls are not logged"
    );
    h.send("DELETE", "/_fake/requests", None, None)
        .await
        .expect("clear");
    assert!(env.srv.requests().is_empty());
    env.srv.shutdown().await;
}

#[tokio::test]
async fn self_subject_access_review() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let review = |verb: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "resource": "persistentvolumes"}}})
    };
    let r = h
        .post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            &review("create"),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["status"]["allowed"], true);
    env.srv.deny("delete", "persistentvolumes");
    let d = h
        .post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            &review("delete"),
        )
        .await;
    assert_eq!(d.body["status"]["allowed"], false);
    let c = h
        .post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            &review("create"),
        )
        .await;
    assert_eq!(c.body["status"]["allowed"], true);
    env.srv.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_semantics() {
    let env = start().await;
    let h = Http::new(&env.srv.url());
    let path = format!("{PVS}/pv-s");
    let mut cfg = pv("pv-s", "n1");
    cfg["metadata"]["labels"]["tier"] = json!("fast");
    let a1 = h
        .patch(
            &format!("{path}?fieldManager=disklet"),
            "application/apply-patch+yaml",
            &cfg.to_string(),
        )
        .await;
    assert_eq!(a1.status, 201);
    let mf = &a1.body["metadata"]["managedFields"];
    assert_eq!(mf[0]["manager"], "disklet");
    assert_eq!(mf[0]["operation"], "Apply");
    assert_eq!(mf[0]["fieldsType"], "FieldsV1");
    assert!(mf[0]["fieldsV1"]["f:spec"]["f:capacity"]["f:storage"].is_object());
    // idempotent: same apply changes nothing
    let a2 = h
        .patch(
            &format!("{path}?fieldManager=disklet"),
            "application/apply-patch+yaml",
            &cfg.to_string(),
        )
        .await;
    assert_eq!(a2.status, 200);
    assert_eq!(rv_of(&a2.body), rv_of(&a1.body));
    // YAML body works too; omitting a field removes it
    let yaml = "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: pv-s\n  labels:\n    disklet.io/node: n1\nspec:\n  capacity:\n    storage: 10Gi\n  accessModes: [ReadWriteOnce]\n  storageClassName: local\n  local:\n    path: /mnt/disks/pv-s\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - {key: kubernetes.io/hostname, operator: In, values: [n1]}\n";
    let a3 = h
        .patch(
            &format!("{path}?fieldManager=disklet"),
            "application/apply-patch+yaml",
            yaml,
        )
        .await;
    assert_eq!(a3.status, 200, "{}", a3.text);
    assert!(a3.body["metadata"]["labels"].get("tier").is_none());
    // another manager changing an owned field conflicts
    let other = "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: pv-s\nspec:\n  capacity:\n    storage: 50Gi\n";
    let c = h
        .patch(
            &format!("{path}?fieldManager=other"),
            "application/apply-patch+yaml",
            other,
        )
        .await;
    assert_eq!(c.status, 409);
    assert_eq!(c.body["reason"], "Conflict");
    assert_eq!(
        c.body["details"]["causes"][0]["field"],
        ".spec.capacity.storage"
    );
    assert_eq!(
        c.body["details"]["causes"][0]["reason"],
        "FieldManagerConflict"
    );
    // same value from another manager is shared ownership, no conflict
    let same = "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: pv-s\nspec:\n  capacity:\n    storage: 10Gi\n";
    assert_eq!(
        h.patch(
            &format!("{path}?fieldManager=other"),
            "application/apply-patch+yaml",
            same
        )
        .await
        .status,
        200
    );
    let f = h
        .patch(
            &format!("{path}?fieldManager=other&force=true"),
            "application/apply-patch+yaml",
            other,
        )
        .await;
    assert_eq!(f.status, 200);
    assert_eq!(f.body["spec"]["capacity"]["storage"], "50Gi");
    // disklet lost ownership of capacity: re-applying its old value now conflicts
    let back = h
        .patch(
            &format!("{path}?fieldManager=disklet"),
            "application/apply-patch+yaml",
            yaml,
        )
        .await;
    assert_eq!(back.status, 409);
    // a non-apply update takes ownership (no conflicts for updates)
    let up = h
        .patch(
            &format!("{path}?fieldManager=editor"),
            "application/merge-patch+json",
            r#"{"spec":{"capacity":{"storage":"60Gi"}}}"#,
        )
        .await;
    assert_eq!(up.status, 200);
    let managers: Vec<(String, String)> = up.body["metadata"]["managedFields"]
        .as_array()
        .expect("mf")
        .iter()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or("").to_string(),
                e["operation"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("editor".into(), "Update".into())),
        "{managers:?}"
    );
    env.srv.shutdown().await;
}
