//! kubectl v1.32 against the fake server.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const KUBECTL: &str = "/usr/bin/kubectl";

/// kubectl is not a Debian package: where it is missing these tests say so
/// and return (CI's image has it).
fn no_kubectl(test: &str) -> bool {
    if std::path::Path::new(KUBECTL).exists() {
        return false;
    }
    eprintln!("SKIPPED {test}: {KUBECTL} is not installed");
    true
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn kubectl(kc: &Path, args: &[&str]) -> Out {
    let out = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kc)
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", kc.parent().expect("dir"))
        .output()
        .await
        .expect("run kubectl");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(kc: &Path, args: &[&str]) -> String {
    let o = kubectl(kc, args).await;
    assert!(o.ok, "kubectl {args:?} failed: {}", o.stderr);
    o.stdout
}

async fn get_json(kc: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&ok(kc, &a).await).expect("kubectl -o json output")
}

fn write_pv(dir: &Path, file: &str, name: &str, node: &str, storage: &str) -> String {
    let mut v = pv(name, node);
    v["spec"]["capacity"]["storage"] = Value::String(storage.into());
    let path = dir.join(file);
    std::fs::write(&path, serde_saphyr::to_string(&v).expect("yaml")).expect("write manifest");
    path.display().to_string()
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn kubectl_get_create_patch_label_delete() {
    if no_kubectl("kubectl_get_create_patch_label_delete") {
        return;
    }
    let env = start().await;
    let kc = env.kubeconfig.as_path();
    // empty
    let o = kubectl(kc, &["get", "pv"]).await;
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stderr.contains("No resources found"));
    assert!(names(&get_json(kc, &["get", "pv"]).await).is_empty());
    // create -f, twice
    let f1 = write_pv(env.dir.path(), "pv1.yaml", "pv1", "n1", "10Gi");
    assert!(ok(kc, &["create", "-f", &f1])
        .await
        .contains("persistentvolume/pv1 created"));
    let dup = kubectl(kc, &["create", "-f", &f1]).await;
    assert!(!dup.ok);
    assert!(
        dup.stderr.contains("AlreadyExists") && dup.stderr.contains("\"pv1\" already exists"),
        "{}",
        dup.stderr
    );
    let f2 = write_pv(env.dir.path(), "pv2.yaml", "pv2", "n2", "5Gi");
    ok(kc, &["create", "-f", &f2]).await;
    // table output and selectors
    let table = ok(kc, &["get", "pv"]).await;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("pv1")
            && l.contains("10Gi")
            && l.contains("RWO")
            && l.contains("Retain")),
        "{table}"
    );
    assert_eq!(
        names(&get_json(kc, &["get", "pv", "-l", "disklet.io/node=n1"]).await),
        vec!["pv1"]
    );
    assert_eq!(
        names(&get_json(kc, &["get", "pv"]).await),
        vec!["pv1", "pv2"]
    );
    // patch merge / json / strategic, label
    ok(
        kc,
        &[
            "patch",
            "pv",
            "pv1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"storageClassName":"fast"}}"#,
        ],
    )
    .await;
    ok(
        kc,
        &[
            "patch",
            "pv",
            "pv1",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/capacity/storage","value":"20Gi"}]"#,
        ],
    )
    .await;
    let bad = kubectl(
        kc,
        &[
            "patch",
            "pv",
            "pv1",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/spec/capacity/storage","value":"1Gi"}]"#,
        ],
    )
    .await;
    assert!(!bad.ok);
    ok(kc, &["label", "pv", "pv1", "tier=fast"]).await;
    ok(
        kc,
        &[
            "patch",
            "pv",
            "pv1",
            "-p",
            r#"{"metadata":{"finalizers":["disklet.io/wipe"]}}"#,
        ],
    )
    .await;
    let p = get_json(kc, &["get", "pv", "pv1"]).await;
    assert_eq!(p["spec"]["storageClassName"], "fast");
    assert_eq!(p["spec"]["capacity"]["storage"], "20Gi");
    assert_eq!(p["metadata"]["labels"]["tier"], "fast");
    assert_eq!(p["metadata"]["finalizers"][0], "disklet.io/wipe");
    // delete with a finalizer: stays, terminating, until the finalizer goes
    ok(kc, &["delete", "pv", "pv1", "--wait=false"]).await;
    let t = get_json(kc, &["get", "pv", "pv1"]).await;
    assert!(t["metadata"]["deletionTimestamp"].is_string());
    ok(
        kc,
        &[
            "patch",
            "pv",
            "pv1",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
    )
    .await;
    let gone = kubectl(kc, &["get", "pv", "pv1"]).await;
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    // plain delete
    assert!(ok(kc, &["delete", "pv", "pv2"])
        .await
        .contains("persistentvolume \"pv2\" deleted"));
    assert!(names(&get_json(kc, &["get", "pv"]).await).is_empty());
    env.srv.shutdown().await;
}

#[tokio::test]
async fn kubectl_server_side_apply_and_conflicts() {
    if no_kubectl("kubectl_server_side_apply_and_conflicts") {
        return;
    }
    let env = start().await;
    let kc = env.kubeconfig.as_path();
    let v1 = write_pv(env.dir.path(), "a.yaml", "pva", "n1", "10Gi");
    let v2 = write_pv(env.dir.path(), "b.yaml", "pva", "n1", "30Gi");
    assert!(ok(kc, &["apply", "--server-side", "-f", &v1])
        .await
        .contains("serverside-applied"));
    ok(kc, &["apply", "--server-side", "-f", &v2]).await;
    let p = get_json(kc, &["get", "pv", "pva", "--show-managed-fields"]).await;
    assert_eq!(p["spec"]["capacity"]["storage"], "30Gi");
    assert_eq!(p["metadata"]["managedFields"][0]["manager"], "kubectl");
    // a second field manager with a different value conflicts
    let c = kubectl(
        kc,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            &v1,
        ],
    )
    .await;
    assert!(!c.ok);
    assert!(
        c.stderr.contains("conflict with \"kubectl\"")
            && c.stderr.contains(".spec.capacity.storage"),
        "{}",
        c.stderr
    );
    ok(
        kc,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--force-conflicts",
            "-f",
            &v1,
        ],
    )
    .await;
    let p = get_json(kc, &["get", "pv", "pva"]).await;
    assert_eq!(p["spec"]["capacity"]["storage"], "10Gi");
    // dry-run=server changes nothing
    ok(
        kc,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--dry-run=server",
            "-f",
            &v2,
        ],
    )
    .await;
    assert_eq!(
        get_json(kc, &["get", "pv", "pva"]).await["spec"]["capacity"]["storage"],
        "10Gi"
    );
    env.srv.shutdown().await;
}

#[tokio::test]
async fn kubectl_watch_misc_and_discovery() {
    if no_kubectl("kubectl_watch_misc_and_discovery") {
        return;
    }
    let env = start().await;
    let kc = env.kubeconfig.as_path();
    let mut child = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kc)
        .args(["get", "pv", "-w", "-o", "name"])
        .env("HOME", env.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kubectl -w");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // create only once kubectl's watch is established (a real signal: the request log)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !env
        .srv
        .requests()
        .iter()
        .any(|r| r.verb == Some(disklet_fakeapi::Verb::Watch))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kubectl never started watching"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.srv
        .store()
        .create(pv("pv-w", "n1"))
        .await
        .expect("create");
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("no watch output")
        .expect("read")
        .expect("eof");
    assert_eq!(line.trim(), "persistentvolume/pv-w");
    child.kill().await.expect("kill kubectl");
    // several kinds at once
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    env.srv.store().create(node).await.expect("node");
    let sc = serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "local"},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"});
    env.srv.store().create(sc).await.expect("sc");
    let out = ok(kc, &["get", "sc,nodes"]).await;
    assert!(
        out.contains("storageclass.storage.k8s.io/local") && out.contains("WaitForFirstConsumer"),
        "{out}"
    );
    assert!(out.contains("node/n1") && out.contains("Ready"), "{out}");
    let res = ok(kc, &["api-resources"]).await;
    for needle in [
        "persistentvolumes",
        "pv",
        "storageclasses",
        "leases",
        "selfsubjectaccessreviews",
    ] {
        assert!(res.contains(needle), "{needle} missing: {res}");
    }
    assert!(
        ok(kc, &["auth", "can-i", "create", "persistentvolumes"])
            .await
            .trim()
            == "yes"
    );
    env.srv.deny("delete", "persistentvolumes");
    let no = kubectl(kc, &["auth", "can-i", "delete", "persistentvolumes"]).await;
    assert!(no.stdout.trim().starts_with("no"), "{}", no.stdout);
    let ns = ok(kc, &["get", "ns", "-o", "name"]).await;
    assert_eq!(
        ns.lines().collect::<Vec<_>>(),
        vec!["namespace/default", "namespace/kube-system"]
    );
    env.srv.shutdown().await;
}

#[tokio::test]
async fn standalone_binary_serves_until_sigterm() {
    if no_kubectl("standalone_binary_serves_until_sigterm") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kc");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kc)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn fake-apiserver");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("no banner")
        .expect("read")
        .expect("eof");
    assert!(
        first.starts_with("listening on http://127.0.0.1:"),
        "{first}"
    );
    let port = first.rsplit(':').next().expect("port");
    assert!(std::fs::read_to_string(&kc)
        .expect("kubeconfig")
        .contains(&format!("server: http://127.0.0.1:{port}")));
    let ns = ok(&kc, &["get", "ns", "-o", "name"]).await;
    assert!(ns.contains("namespace/default"));
    let pid = child.id().expect("pid").to_string();
    let k = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(k.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("did not exit on SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}
