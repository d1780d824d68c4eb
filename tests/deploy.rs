//! The `deploy/` kustomize tree (README, "Install" and "Security"): every
//! target renders with `kubectl kustomize`, holds the contract the agent
//! relies on, carries a config that disklet's own parser accepts, and every
//! object validates against the Kubernetes JSON schemas (kubernetes-validate,
//! strict, against 1.33 and the newest version the tool ships).
//!
//! Needs `kubectl` and `kubernetes-validate` (`pip install kubernetes-validate`;
//! `.ci/run` installs it); each test says SKIPPED without them. `KUBECTL` and
//! `KUBERNETES_VALIDATE` name other binaries.
//!
//! The checks are plain functions returning every problem found; the
//! `checks_catch_*` tests break a good render one field at a time and require
//! the matching problem, so no check can pass vacuously.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use disklet::config::{Config, VolumeMode};
use serde_json::{json, Value};

const NAMESPACE: &str = "disklet-system";
const IMAGE: &str = "ghcr.io/disklet/disklet:0.1.0";
const PORT: u64 = 9403;
/// The Kubernetes version the crate is built against (k8s-openapi `v1_33`).
const K8S_BASELINE: &str = "1.33.0";

/// The kustomize targets: the default install and each overlay.
const TARGETS: &[Target] = &[
    Target {
        dir: "deploy",
        host_network: false,
        storage_classes: &["local-fast"],
    },
    Target {
        dir: "deploy/overlays/udev-events",
        host_network: true,
        storage_classes: &["local-fast"],
    },
    Target {
        dir: "deploy/overlays/block",
        host_network: false,
        storage_classes: &["local-fast", "local-block"],
    },
];

struct Target {
    dir: &'static str,
    host_network: bool,
    storage_classes: &'static [&'static str],
}

/// What the agent asks of the API server, exactly (README, "Security").
fn expected_rbac() -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut m = BTreeMap::new();
    let mut put = |group: &str, resource: &str, verbs: &[&str]| {
        m.insert(
            (group.to_string(), resource.to_string()),
            verbs.iter().map(|v| v.to_string()).collect(),
        );
    };
    put(
        "",
        "persistentvolumes",
        &["get", "list", "watch", "create", "patch", "delete"],
    );
    put("storage.k8s.io", "storageclasses", &["get"]);
    put("", "nodes", &["get"]);
    put("events.k8s.io", "events", &["create", "patch"]);
    m
}

/// Host paths the pod mounts: (path in pod and on host, read-only, propagation).
const HOST_MOUNTS: &[(&str, bool, Option<&str>)] = &[
    ("/dev", true, None),
    ("/sys", true, None),
    ("/run/udev", true, None),
    ("/var/lib/disklet", false, Some("Bidirectional")),
    ("/var/lib/kubelet", true, Some("HostToContainer")),
];

// ---------------------------------------------------------------- tools

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(test: &str, name: &str, env: &str, extra: &[PathBuf], install: &str) -> Option<PathBuf> {
    let found = std::env::var_os(env)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| on_path(name))
        .or_else(|| extra.iter().find(|p| p.is_file()).cloned());
    if found.is_none() {
        eprintln!("SKIPPED {test}: {name} is not installed ({install})");
    }
    found
}

fn kubectl(test: &str) -> Option<PathBuf> {
    tool(
        test,
        "kubectl",
        "KUBECTL",
        &[],
        "kubectl >= 1.27 renders kustomize v5",
    )
}

fn kubernetes_validate(test: &str) -> Option<PathBuf> {
    // Where .ci/run installs the linters, for a developer who ran it once.
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/disklet-lint-venv/bin/kubernetes-validate"));
    tool(
        test,
        "kubernetes-validate",
        "KUBERNETES_VALIDATE",
        &venv.into_iter().collect::<Vec<_>>(),
        "pip install kubernetes-validate",
    )
}

fn parse_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn render(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = parse_docs(&String::from_utf8(out.stdout).unwrap());
    assert!(!objs.is_empty(), "{} rendered nothing", dir.display());
    objs
}

fn render_target(kubectl: &Path, t: &Target) -> Vec<Value> {
    render(kubectl, &repo().join(t.dir))
}

// ---------------------------------------------------------------- lookups

fn kind_of(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|o| kind_of(o) == kind && name_of(o) == name)
}

fn all<'a>(objs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objs.iter().filter(move |o| kind_of(o) == kind)
}

fn daemonset(objs: &[Value]) -> Option<&Value> {
    find(objs, "DaemonSet", "disklet")
}

fn container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["containers"][0]
}

/// The ConfigMap the DaemonSet mounts, and the config file's text in it.
fn mounted_config(objs: &[Value]) -> Result<(&Value, &str), String> {
    let ds = daemonset(objs).ok_or("no DaemonSet disklet")?;
    let env_path = container(ds)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "DISKLET_CONFIG")
        .and_then(|e| e["value"].as_str())
        .ok_or("DISKLET_CONFIG is not set to a path")?;
    let (dir, file) = env_path
        .rsplit_once('/')
        .ok_or("DISKLET_CONFIG is not an absolute path")?;
    let mount = container(ds)["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir)
        .ok_or(format!(
            "DISKLET_CONFIG {env_path}: nothing is mounted at {dir}"
        ))?;
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .ok_or("the config mount has no volume")?;
    let cm_name = volume["configMap"]["name"].as_str().ok_or(format!(
        "DISKLET_CONFIG {env_path}: {dir} is not a ConfigMap"
    ))?;
    let cm = find(objs, "ConfigMap", cm_name).ok_or(format!(
        "the DaemonSet mounts ConfigMap {cm_name}, which is not rendered"
    ))?;
    let text = cm["data"][file].as_str().ok_or(format!(
        "ConfigMap {cm_name} has no key {file} (DISKLET_CONFIG {env_path})"
    ))?;
    Ok((cm, text))
}

fn parse_config(text: &str) -> Result<Config, String> {
    Config::parse(text).map_err(|problems| {
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

// ---------------------------------------------------------------- checks

/// Every way `objs` (one rendered target) breaks the contract.
fn problems(objs: &[Value], t: &Target, image: &str) -> Vec<String> {
    let mut p = Vec::new();
    p.extend(namespace_problems(objs));
    p.extend(daemonset_problems(objs, t.host_network, image));
    p.extend(rbac_problems(objs));
    p.extend(secret_problems(objs));
    p.extend(config_problems(objs));
    for sc in t.storage_classes {
        p.extend(storage_class_problems(objs, sc));
    }
    p
}

fn namespace_problems(objs: &[Value]) -> Vec<String> {
    let mut p = Vec::new();
    match find(objs, "Namespace", NAMESPACE) {
        None => p.push(format!("no Namespace {NAMESPACE}")),
        Some(ns) => {
            let enforce = &ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"];
            if enforce != "privileged" {
                p.push(format!(
                    "Namespace {NAMESPACE}: pod-security.kubernetes.io/enforce is {enforce}, not privileged"
                ));
            }
        }
    }
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "StorageClass",
        "CSIDriver",
        "VolumeSnapshotClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for o in objs
        .iter()
        .filter(|o| !cluster_scoped.contains(&kind_of(o)))
    {
        if o["metadata"]["namespace"] != NAMESPACE {
            p.push(format!(
                "{} {} is in namespace {}, not {NAMESPACE}",
                kind_of(o),
                name_of(o),
                o["metadata"]["namespace"]
            ));
        }
    }
    p
}

fn daemonset_problems(objs: &[Value], host_network: bool, image: &str) -> Vec<String> {
    let mut p = Vec::new();
    let Some(ds) = daemonset(objs) else {
        return vec!["no DaemonSet disklet".into()];
    };
    let spec = &ds["spec"]["template"]["spec"];

    want(
        &mut p,
        spec["hostPID"] == true,
        format!("hostPID is {}, not true", spec["hostPID"]),
    );
    let hn = spec["hostNetwork"].as_bool().unwrap_or(false);
    want(
        &mut p,
        hn == host_network,
        format!("hostNetwork is {hn}, not {host_network}"),
    );
    if host_network {
        want(
            &mut p,
            spec["dnsPolicy"] == "ClusterFirstWithHostNet",
            format!(
                "dnsPolicy is {}, not ClusterFirstWithHostNet",
                spec["dnsPolicy"]
            ),
        );
    }
    want(
        &mut p,
        spec["priorityClassName"] == "system-node-critical",
        format!("priorityClassName is {}", spec["priorityClassName"]),
    );
    want(
        &mut p,
        spec["tolerations"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t == &json!({"operator": "Exists"}))),
        format!(
            "tolerations {} do not tolerate every taint",
            spec["tolerations"]
        ),
    );
    want(
        &mut p,
        spec["serviceAccountName"] == "disklet",
        format!("serviceAccountName is {}", spec["serviceAccountName"]),
    );
    want(
        &mut p,
        spec["automountServiceAccountToken"] != false,
        "the ServiceAccount token is not mounted (the agent needs the API)".into(),
    );
    let grace = spec["terminationGracePeriodSeconds"].as_u64();
    want(
        &mut p,
        grace.is_some_and(|g| (1..=60).contains(&g)),
        format!("terminationGracePeriodSeconds is {grace:?}, not 1..=60"),
    );
    let us = &ds["spec"]["updateStrategy"];
    want(
        &mut p,
        us["type"] == "RollingUpdate" && us["rollingUpdate"]["maxUnavailable"] == 1,
        format!("updateStrategy is {us}, not RollingUpdate with maxUnavailable 1"),
    );

    let containers = spec["containers"].as_array().map_or(0, Vec::len);
    want(
        &mut p,
        containers == 1,
        format!("{containers} containers, not 1"),
    );
    let c = container(ds);
    want(
        &mut p,
        c["image"] == image,
        format!("image is {}, not {image}", c["image"]),
    );
    // The default /dev/termination-log cannot be created in the host's /dev
    // mounted read-only: the container would never start.
    let tmp = c["terminationMessagePath"].as_str();
    want(
        &mut p,
        tmp.is_some_and(|t| t.starts_with('/') && !t.starts_with("/dev/")),
        format!("terminationMessagePath is {tmp:?}: the default /dev/termination-log cannot be created in the read-only host /dev"),
    );
    let sc = &c["securityContext"];
    want(
        &mut p,
        sc["privileged"] == true,
        format!("privileged is {}, not true", sc["privileged"]),
    );
    want(
        &mut p,
        sc["readOnlyRootFilesystem"] == true,
        format!("readOnlyRootFilesystem is {}", sc["readOnlyRootFilesystem"]),
    );

    let env = |name: &str| {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let node = env("NODE_NAME");
    want(
        &mut p,
        node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            && node.get("value").is_none(),
        format!("NODE_NAME is {node}, not the fieldRef spec.nodeName"),
    );
    if let Err(e) = mounted_config(objs) {
        p.push(e);
    }

    // The port, and both probes on it.
    let port_ok = c["ports"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|q| q["name"] == "http" && q["containerPort"] == PORT && q["protocol"] != "UDP")
    });
    want(
        &mut p,
        port_ok,
        format!("no container port http = {PORT}: {}", c["ports"]),
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    want(
        &mut p,
        args.first() == Some(&"run")
            && args
                .iter()
                .any(|a| *a == format!("--listen=0.0.0.0:{PORT}")),
        format!("args {args:?} do not run the agent listening on 0.0.0.0:{PORT}"),
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let g = &c[probe]["httpGet"];
        let port = match &g["port"] {
            Value::String(s) if s == "http" => Some(PORT),
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        want(
            &mut p,
            g["path"] == path && port == Some(PORT),
            format!("{probe} is {}, not GET {path} on {PORT}", c[probe]),
        );
    }

    let r = &c["resources"];
    want(
        &mut p,
        r["requests"] == json!({"cpu": "20m", "memory": "32Mi"})
            && r["limits"]["memory"] == "128Mi",
        format!("resources are {r}"),
    );

    // hostPath volumes: exactly the expected ones, each mounted as expected.
    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    let host_paths: BTreeSet<&str> = volumes
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    let expected: BTreeSet<&str> = HOST_MOUNTS.iter().map(|m| m.0).collect();
    want(
        &mut p,
        host_paths == expected,
        format!("hostPath volumes are {host_paths:?}, not {expected:?}"),
    );
    let mounts: Vec<&Value> = c["volumeMounts"].as_array().into_iter().flatten().collect();
    for (path, read_only, propagation) in HOST_MOUNTS {
        let Some(v) = volumes.iter().find(|v| v["hostPath"]["path"] == *path) else {
            continue;
        };
        let Some(m) = mounts.iter().find(|m| m["name"] == v["name"]) else {
            p.push(format!("hostPath {path} is not mounted"));
            continue;
        };
        want(
            &mut p,
            m["mountPath"] == *path,
            format!(
                "hostPath {path} is mounted at {}, not at the same path",
                m["mountPath"]
            ),
        );
        let ro = m["readOnly"].as_bool().unwrap_or(false);
        want(
            &mut p,
            ro == *read_only,
            format!("{path}: readOnly is {ro}, not {read_only}"),
        );
        let prop = m["mountPropagation"].as_str();
        want(
            &mut p,
            prop == *propagation || (propagation.is_none() && prop == Some("None")),
            format!("{path}: mountPropagation is {prop:?}, not {propagation:?}"),
        );
    }

    // The config's paths are the ones the pod provides.
    if let Ok((_, text)) = mounted_config(objs) {
        if let Ok(cfg) = parse_config(text) {
            let mount = |dir: &Path| {
                mounts
                    .iter()
                    .find(|m| m["mountPath"] == dir.to_str().unwrap())
            };
            let host = mount(&cfg.host_dir);
            want(
                &mut p,
                host.is_some_and(|m| {
                    m["mountPropagation"] == "Bidirectional" && m["readOnly"] != true
                }),
                format!(
                    "config hostDir {} is not mounted read-write with Bidirectional propagation",
                    cfg.host_dir.display()
                ),
            );
            let kubelet = mount(&cfg.kubelet_dir);
            want(
&mut p,
                kubelet.is_some_and(|m| m["mountPropagation"] == "HostToContainer" && m["readOnly"] == true),
                format!("config kubeletDir {} is not mounted read-only with HostToContainer propagation", cfg.kubelet_dir.display()),
            );
            want(
                &mut p,
                cfg.mount_info == Path::new("/proc/1/mountinfo"),
                format!(
                    "config mountInfo is {}, not the host's /proc/1/mountinfo",
                    cfg.mount_info.display()
                ),
            );
        }
    }
    p
}

fn rbac_problems(objs: &[Value]) -> Vec<String> {
    let mut p = Vec::new();
    let roles: Vec<&Value> = objs
        .iter()
        .filter(|o| matches!(kind_of(o), "ClusterRole" | "Role"))
        .collect();
    if roles.len() != 1 || kind_of(roles[0]) != "ClusterRole" || name_of(roles[0]) != "disklet" {
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("{} {}", kind_of(r), name_of(r)))
            .collect();
        p.push(format!("roles are {names:?}, not just ClusterRole disklet"));
    }
    let mut got: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for role in &roles {
        for rule in role["rules"].as_array().into_iter().flatten() {
            for key in ["resourceNames", "nonResourceURLs"] {
                if rule.get(key).is_some() {
                    p.push(format!("RBAC rule with {key}: {rule}"));
                }
            }
            let strs = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap_or("?").to_string())
                    .collect()
            };
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    got.entry((g.clone(), r)).or_default().extend(strs("verbs"));
                }
            }
        }
    }
    let want = expected_rbac();
    for (k, verbs) in &got {
        if k.1.contains("secret") {
            p.push(format!("RBAC grants {verbs:?} on secrets ({k:?})"));
        }
        match want.get(k) {
            None => p.push(format!(
                "RBAC grants {verbs:?} on {k:?}, which the agent does not use"
            )),
            Some(w) if w != verbs => {
                p.push(format!("RBAC verbs on {k:?} are {verbs:?}, not {w:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, w) in &want {
        if !got.contains_key(k) {
            p.push(format!("RBAC lacks {w:?} on {k:?}"));
        }
    }

    let bindings: Vec<&Value> = objs
        .iter()
        .filter(|o| matches!(kind_of(o), "ClusterRoleBinding" | "RoleBinding"))
        .collect();
    let binding_ok = bindings.len() == 1
        && kind_of(bindings[0]) == "ClusterRoleBinding"
        && bindings[0]["roleRef"]
            == json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "disklet"})
        && bindings[0]["subjects"]
            == json!([{"kind": "ServiceAccount", "name": "disklet", "namespace": NAMESPACE}]);
    if !binding_ok {
        p.push(format!(
            "bindings are not exactly ClusterRole disklet to ServiceAccount {NAMESPACE}/disklet: {bindings:?}"
        ));
    }
    if find(objs, "ServiceAccount", "disklet").is_none() {
        p.push("no ServiceAccount disklet".into());
    }
    p
}

/// No object mentions Secrets: no RBAC on them (above), no secret volume,
/// env or envFrom, no image pull secret.
fn secret_problems(objs: &[Value]) -> Vec<String> {
    fn walk(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k.to_lowercase().contains("secret") {
                        out.push(format!("{at}.{k} refers to a Secret"));
                    }
                    walk(x, &format!("{at}.{k}"), out);
                }
            }
            Value::Array(xs) => {
                for (i, x) in xs.iter().enumerate() {
                    walk(x, &format!("{at}[{i}]"), out);
                }
            }
            Value::String(s) if s == "secrets" => out.push(format!("{at} names secrets")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for o in objs {
        walk(o, &format!("{} {}", kind_of(o), name_of(o)), &mut out);
    }
    out
}

fn storage_class_problems(objs: &[Value], name: &str) -> Vec<String> {
    let Some(sc) = find(objs, "StorageClass", name) else {
        return vec![format!("no StorageClass {name}")];
    };
    let mut p = Vec::new();
    for (field, want) in [
        ("provisioner", json!("kubernetes.io/no-provisioner")),
        ("volumeBindingMode", json!("WaitForFirstConsumer")),
        ("reclaimPolicy", json!("Delete")),
        ("allowVolumeExpansion", json!(false)),
    ] {
        if sc[field] != want {
            p.push(format!(
                "StorageClass {name}: {field} is {}, not {want}",
                sc[field]
            ));
        }
    }
    p
}

/// The mounted config parses with disklet's own parser, names only disks an
/// admin tagged through udev, and each class's StorageClass is rendered.
fn config_problems(objs: &[Value]) -> Vec<String> {
    let text = match mounted_config(objs) {
        Ok((_, t)) => t,
        Err(e) => return vec![e],
    };
    let cfg = match parse_config(text) {
        Ok(c) => c,
        Err(e) => {
            return vec![format!(
                "the ConfigMap's config.yaml is not a valid disklet config: {e}"
            )]
        }
    };
    let mut p = Vec::new();
    if cfg.classes.is_empty() {
        p.push("the config has no class".into());
    }
    for c in &cfg.classes {
        let s = &c.selector;
        if !s.paths.is_empty() || !s.backing_files.is_empty() || !c.discovery_dirs.is_empty() {
            p.push(format!(
                "class {} selects disks by more than udev tags",
                c.name
            ));
        }
        if s.udev.keys().collect::<Vec<_>>() != ["DISKLET_CLASS"] {
            p.push(format!(
                "class {} does not select by DISKLET_CLASS alone: {:?}",
                c.name, s.udev
            ));
        }
        if find(objs, "StorageClass", c.storage_class()).is_none() {
            p.push(format!(
                "class {}: StorageClass {} is not rendered",
                c.name,
                c.storage_class()
            ));
        }
    }
    p
}

fn want(p: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        p.push(what);
    }
}

fn assert_clean(what: &str, p: &[String]) {
    assert!(p.is_empty(), "{what}:\n  - {}", p.join("\n  - "));
}

// ---------------------------------------------------------------- tests

#[test]
fn every_target_renders_and_holds_the_contract() {
    let Some(k) = kubectl("every_target_renders_and_holds_the_contract") else {
        return;
    };
    for t in TARGETS {
        let objs = render_target(&k, t);
        assert_clean(t.dir, &problems(&objs, t, IMAGE));
        // Only the expected kinds: nothing else slips into an install.
        let kinds: BTreeSet<&str> = objs.iter().map(kind_of).collect();
        let allowed: BTreeSet<&str> = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "NetworkPolicy",
            "StorageClass",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
        .into();
        assert!(kinds.is_subset(&allowed), "{}: kinds {kinds:?}", t.dir);
        // The NetworkPolicy admits the metrics port only.
        let np = find(&objs, "NetworkPolicy", "disklet").unwrap();
        assert_eq!(
            np["spec"]["ingress"],
            json!([{"ports": [{"port": PORT, "protocol": "TCP"}]}]),
            "{}",
            t.dir
        );
    }
}

#[test]
fn the_default_config_selects_only_disks_the_udev_rule_tags_fast() {
    let Some(k) = kubectl("the_default_config_selects_only_disks_the_udev_rule_tags_fast") else {
        return;
    };
    let objs = render_target(&k, &TARGETS[0]);
    let (_, text) = mounted_config(&objs).unwrap();
    let cfg = parse_config(text).unwrap();
    assert_eq!(cfg.classes.len(), 1);
    let c = &cfg.classes[0];
    assert_eq!((c.name.as_str(), c.storage_class()), ("fast", "local-fast"));
    assert_eq!(c.volume_mode, VolumeMode::Filesystem);
    assert_eq!(
        c.selector.udev,
        BTreeMap::from([("DISKLET_CLASS".to_string(), "fast".to_string())])
    );
    let rules = std::fs::read_to_string(repo().join("udev-rules/90-disklet.rules")).unwrap();
    assert!(
        rules.contains("ENV{DISKLET_CLASS}=\"fast\""),
        "the udev rule's example no longer tags fast"
    );

    // deploy/config.yaml (README: `disklet scan --config deploy/config.yaml`)
    // is what the ConfigMap carries.
    let file = std::fs::read_to_string(repo().join("deploy/config.yaml")).unwrap();
    assert_eq!(
        file, text,
        "deploy/config.yaml differs from the deployed config"
    );
    // The loop example stays a valid config.
    let lab = std::fs::read_to_string(repo().join("deploy/examples/loop-config.yaml")).unwrap();
    parse_config(&lab).unwrap();
}

#[test]
fn the_udev_overlay_joins_the_host_network() {
    let Some(k) = kubectl("the_udev_overlay_joins_the_host_network") else {
        return;
    };
    let objs = render_target(&k, &TARGETS[1]);
    let spec = &daemonset(&objs).unwrap()["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    let base = render_target(&k, &TARGETS[0]);
    assert_eq!(
        daemonset(&base).unwrap()["spec"]["template"]["spec"]["hostNetwork"],
        false
    );
}

#[test]
fn the_block_overlay_adds_a_block_class_and_its_storage_class() {
    let Some(k) = kubectl("the_block_overlay_adds_a_block_class_and_its_storage_class") else {
        return;
    };
    let objs = render_target(&k, &TARGETS[2]);
    // One ConfigMap: the overlay's replaces the base's.
    assert_eq!(all(&objs, "ConfigMap").count(), 1);
    let (_, text) = mounted_config(&objs).unwrap();
    let cfg = parse_config(text).unwrap();
    let block: Vec<_> = cfg
        .classes
        .iter()
        .filter(|c| c.volume_mode == VolumeMode::Block)
        .collect();
    assert_eq!(block.len(), 1, "{:?}", cfg.classes);
    assert_eq!(block[0].storage_class(), "local-block");
    assert!(!block[0].publish_fs_type);
    assert!(cfg
        .classes
        .iter()
        .any(|c| c.storage_class() == "local-fast"));
    assert_clean("local-block", &storage_class_problems(&objs, "local-block"));
}

/// deploy/overlays/csi: the base unchanged (the agent's DaemonSet, RBAC and
/// config contract hold), plus the CSI driver's objects, each field kubelet,
/// the scheduler and the sidecars rely on. tests/csi_e2e.rs runs the real
/// sidecars with these very args and this ServiceAccount's token.
#[test]
fn the_csi_overlay_serves_the_driver_with_its_sidecars_on_every_node() {
    let Some(k) = kubectl("the_csi_overlay_serves_the_driver_with_its_sidecars_on_every_node")
    else {
        return;
    };
    let objs = render(&k, &repo().join("deploy/overlays/csi"));
    // The base's contract, the CSI objects aside.
    let csi_rbac = |o: &Value| {
        name_of(o) == "disklet-csi"
            && matches!(
                kind_of(o),
                "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
    };
    let base: Vec<Value> = objs.iter().filter(|o| !csi_rbac(o)).cloned().collect();
    let t = Target {
        dir: "deploy/overlays/csi",
        host_network: false,
        storage_classes: &["local-fast"],
    };
    assert_clean(t.dir, &problems(&base, &t, IMAGE));

    let mut p = Vec::new();
    let driver = find(&objs, "CSIDriver", "csi.disklet.io");
    want(
        &mut p,
        driver.is_some(),
        "no CSIDriver csi.disklet.io".into(),
    );
    if let Some(d) = driver {
        for (field, v) in [
            ("attachRequired", json!(false)),
            ("storageCapacity", json!(true)),
            ("podInfoOnMount", json!(true)),
            ("fsGroupPolicy", json!("File")),
        ] {
            let got = &d["spec"][field];
            want(
                &mut p,
                got == &v,
                format!("CSIDriver {field} is {got}, not {v}"),
            );
        }
    }
    // The pool class's StorageClass provisions through the driver.
    let (_, text) = mounted_config(&objs).unwrap();
    let cfg = parse_config(text).unwrap();
    let pools: Vec<_> = cfg.classes.iter().filter(|c| c.is_pool()).collect();
    want(
        &mut p,
        pools.len() == 1,
        format!("{} pool classes, not 1", pools.len()),
    );
    for c in &pools {
        let sc = find(&objs, "StorageClass", c.storage_class())
            .cloned()
            .unwrap_or_default();
        for (field, v) in [
            ("provisioner", json!("csi.disklet.io")),
            ("volumeBindingMode", json!("WaitForFirstConsumer")),
            ("allowVolumeExpansion", json!(true)),
        ] {
            want(
                &mut p,
                sc[field] == v,
                format!(
                    "StorageClass {}: {field} is {}, not {v}",
                    c.storage_class(),
                    sc[field]
                ),
            );
        }
    }
    let vsc = find(&objs, "VolumeSnapshotClass", "disklet")
        .cloned()
        .unwrap_or_default();
    want(
        &mut p,
        vsc["driver"] == "csi.disklet.io",
        format!("VolumeSnapshotClass disklet: driver is {}", vsc["driver"]),
    );

    let ds = find(&objs, "DaemonSet", "disklet-csi")
        .cloned()
        .unwrap_or_default();
    let spec = &ds["spec"]["template"]["spec"];
    want(
        &mut p,
        spec["serviceAccountName"] == "disklet-csi",
        format!("disklet-csi runs as {}", spec["serviceAccountName"]),
    );
    want(
        &mut p,
        spec["hostPID"] == true,
        "disklet-csi: hostPID is not true".into(),
    );
    let agent_cm = &daemonset(&objs).unwrap()["spec"]["template"]["spec"]["volumes"];
    let cm_of = |vols: &Value| {
        vols.as_array()
            .into_iter()
            .flatten()
            .find_map(|v| v["configMap"]["name"].as_str().map(str::to_string))
    };
    want(
        &mut p,
        cm_of(&spec["volumes"]).is_some() && cm_of(&spec["volumes"]) == cm_of(agent_cm),
        "disklet-csi does not mount the agent's ConfigMap".into(),
    );
    let host_path = |vol: &str| {
        spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == vol)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = containers
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    want(
        &mut p,
        names
            == [
                "disklet-csi",
                "csi-provisioner",
                "csi-snapshotter",
                "csi-resizer",
                "node-driver-registrar",
                "liveness-probe",
            ],
        format!("disklet-csi containers are {names:?}"),
    );
    let args = |c: &Value| -> Vec<String> {
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect()
    };
    let mount_of = |c: &Value, path: &str| -> Value {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == path)
            .cloned()
            .unwrap_or_default()
    };
    // Every container reaches the driver on one socket, in kubelet's plugin
    // dir on the host, where node-driver-registrar tells kubelet it is.
    let sock_dir = host_path("socket-dir");
    want(
        &mut p,
        sock_dir == "/var/lib/kubelet/plugins/csi.disklet.io",
        format!("the socket dir is {sock_dir}"),
    );
    for c in &containers {
        let n = c["name"].as_str().unwrap_or("");
        let a = args(c);
        let m = mount_of(c, "/csi");
        want(
            &mut p,
            m["name"] == "socket-dir",
            format!("{n}: /csi is not the socket dir"),
        );
        let endpoint = if n == "disklet-csi" {
            "--endpoint=unix:///csi/csi.sock"
        } else {
            "--csi-address=/csi/csi.sock"
        };
        want(
            &mut p,
            a.iter().any(|x| x == endpoint),
            format!("{n}: no {endpoint}"),
        );
        if n != "disklet-csi" {
            want(
                &mut p,
                c["securityContext"]["privileged"] != true
                    && c["securityContext"]["allowPrivilegeEscalation"] == false,
                format!("{n}: a sidecar must not be privileged"),
            );
            want(
                &mut p,
                !a.iter()
                    .any(|x| x == "--leader-election" || x == "--leader-election=true"),
                format!("{n}: leader election on a per-node sidecar"),
            );
        }
    }
    let c = |n: &str| {
        containers
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    let driver_c = c("disklet-csi");
    want(
        &mut p,
        driver_c["image"] == IMAGE,
        format!("disklet-csi image {}", driver_c["image"]),
    );
    want(
        &mut p,
        args(&driver_c)[0] == "csi",
        "disklet-csi does not run `disklet csi`".into(),
    );
    let kubelet = mount_of(&driver_c, "/var/lib/kubelet");
    want(
        &mut p,
        kubelet["mountPropagation"] == "Bidirectional"
            && host_path(kubelet["name"].as_str().unwrap_or("")) == "/var/lib/kubelet",
        "disklet-csi: kubelet's dir is not mounted Bidirectional (pods would not see the volumes)"
            .into(),
    );
    let pools_mount = mount_of(&driver_c, "/var/lib/disklet");
    want(
        &mut p,
        pools_mount["mountPropagation"] == "HostToContainer",
        "disklet-csi: hostDir does not receive the agent's pool mounts (HostToContainer)".into(),
    );
    want(
        &mut p,
        driver_c["securityContext"]["privileged"] == true,
        "disklet-csi must be privileged (loop devices, mounts)".into(),
    );
    let env_paths = |c: &Value| -> BTreeMap<String, String> {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()?
                        .to_string(),
                ))
            })
            .collect()
    };
    for (n, flags, envs) in [
        (
            "csi-provisioner",
            &[
                "--node-deployment",
                "--enable-capacity",
                "--strict-topology",
            ][..],
            &[
                ("NODE_NAME", "spec.nodeName"),
                ("NAMESPACE", "metadata.namespace"),
                ("POD_NAME", "metadata.name"),
            ][..],
        ),
        (
            "csi-snapshotter",
            &["--node-deployment"][..],
            &[("NODE_NAME", "spec.nodeName")][..],
        ),
        (
            "disklet-csi",
            &[][..],
            &[("NODE_NAME", "spec.nodeName")][..],
        ),
    ] {
        let a = args(&c(n));
        for f in flags {
            want(&mut p, a.iter().any(|x| x == f), format!("{n}: no {f}"));
        }
        let e = env_paths(&c(n));
        for (k, v) in envs {
            want(
                &mut p,
                e.get(*k).map(String::as_str) == Some(*v),
                format!("{n}: env {k} is not from {v}"),
            );
        }
    }
    let reg = c("node-driver-registrar");
    want(
        &mut p,
        args(&reg).contains(&format!("--kubelet-registration-path={sock_dir}/csi.sock")),
        format!("node-driver-registrar registers {:?}", args(&reg)),
    );
    want(
        &mut p,
        host_path(
            mount_of(&reg, "/registration")["name"]
                .as_str()
                .unwrap_or(""),
        ) == "/var/lib/kubelet/plugins_registry",
        "node-driver-registrar: /registration is not kubelet's plugins_registry".into(),
    );
    // The sidecars' account is their own: the agent's gains nothing.
    let crb = find(&objs, "ClusterRoleBinding", "disklet-csi")
        .cloned()
        .unwrap_or_default();
    want(
        &mut p,
        crb["subjects"]
            == json!([{"kind": "ServiceAccount", "name": "disklet-csi", "namespace": NAMESPACE}]),
        format!("ClusterRoleBinding disklet-csi binds {}", crb["subjects"]),
    );
    for role in objs
        .iter()
        .filter(|o| csi_rbac(o) && kind_of(o).ends_with("Role"))
    {
        for rule in role["rules"].as_array().into_iter().flatten() {
            let text = rule.to_string();
            want(
                &mut p,
                !text.contains("\"*\""),
                format!("{} {}: a wildcard: {text}", kind_of(role), name_of(role)),
            );
            want(
                &mut p,
                !text.contains("secrets"),
                format!("{} {}: secrets: {text}", kind_of(role), name_of(role)),
            );
        }
    }
    assert_clean("deploy/overlays/csi", &p);
}

#[test]
fn the_image_can_be_overridden_from_a_kustomization_of_ones_own() {
    let Some(k) = kubectl("the_image_can_be_overridden_from_a_kustomization_of_ones_own") else {
        return;
    };
    let base = render_target(&k, &TARGETS[0]);
    assert_eq!(container(daemonset(&base).unwrap())["image"], IMAGE);

    // As README "Install" says: a directory of one's own listing deploy/.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let up = "../".repeat(dir.components().count() - 1);
    let deploy = repo().canonicalize().unwrap().join("deploy");
    let rel = format!("{up}{}", deploy.strip_prefix("/").unwrap().display());
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let by_digest = format!("digest: {digest}");
    for (images, want) in [
        (
            "newName: registry.example.com/mirror/disklet\n    newTag: 0.1.1",
            "registry.example.com/mirror/disklet:0.1.1".to_string(),
        ),
        (
            by_digest.as_str(),
            format!("ghcr.io/disklet/disklet@{digest}"),
        ),
    ] {
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "resources:\n  - {rel}\nimages:\n  - name: ghcr.io/disklet/disklet\n    {images}\n"
            ),
        )
        .unwrap();
        let objs = render(&k, &dir);
        assert_clean(&want, &problems(&objs, &TARGETS[0], &want));
    }
}

#[test]
fn the_statefulset_example_uses_local_fast_one_replica_per_node() {
    let Some(k) = kubectl("the_statefulset_example_uses_local_fast_one_replica_per_node") else {
        return;
    };
    let text = std::fs::read_to_string(repo().join("deploy/examples/statefulset.yaml")).unwrap();
    let objs = parse_docs(&text);
    let sts = all(&objs, "StatefulSet").next().expect("no StatefulSet");
    let claims = sts["spec"]["volumeClaimTemplates"].as_array().unwrap();
    assert!(!claims.is_empty());
    for c in claims {
        assert_eq!(c["spec"]["storageClassName"], "local-fast", "{c}");
    }
    let anti = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"];
    assert!(
        anti.as_array().is_some_and(|terms| terms.iter().any(|t| {
            t["topologyKey"] == "kubernetes.io/hostname"
                && t["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        })),
        "no required anti-affinity by hostname on the StatefulSet's own pods: {anti}"
    );
    // Not part of the default install.
    let base = render_target(&k, &TARGETS[0]);
    assert_eq!(all(&base, "StatefulSet").count(), 0);
}

/// A good render broken one field at a time: each check reports it.
#[test]
fn checks_catch_every_broken_field() {
    let Some(k) = kubectl("checks_catch_every_broken_field") else {
        return;
    };
    let good = render_target(&k, &TARGETS[0]);
    assert_clean("the good render", &problems(&good, &TARGETS[0], IMAGE));

    fn ds(objs: &mut [Value]) -> &mut Value {
        objs.iter_mut().find(|o| o["kind"] == "DaemonSet").unwrap()
    }
    fn pod(objs: &mut [Value]) -> &mut Value {
        &mut ds(objs)["spec"]["template"]["spec"]
    }
    fn ctr(objs: &mut [Value]) -> &mut Value {
        &mut pod(objs)["containers"][0]
    }
    fn mount<'a>(objs: &'a mut [Value], path: &str) -> &'a mut Value {
        ctr(objs)["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|m| m["mountPath"] == path)
            .unwrap()
    }
    fn env<'a>(objs: &'a mut [Value], name: &str) -> &'a mut Value {
        ctr(objs)["env"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["name"] == name)
            .unwrap()
    }
    fn rule<'a>(objs: &'a mut [Value], resource: &str) -> &'a mut Value {
        objs.iter_mut()
            .find(|o| o["kind"] == "ClusterRole")
            .unwrap()["rules"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|r| r["resources"][0] == resource)
            .unwrap()
    }
    fn rules(objs: &mut [Value]) -> &mut Vec<Value> {
        objs.iter_mut()
            .find(|o| o["kind"] == "ClusterRole")
            .unwrap()["rules"]
            .as_array_mut()
            .unwrap()
    }
    fn sc(objs: &mut [Value]) -> &mut Value {
        objs.iter_mut()
            .find(|o| o["kind"] == "StorageClass")
            .unwrap()
    }
    fn cm(objs: &mut [Value]) -> &mut Value {
        objs.iter_mut().find(|o| o["kind"] == "ConfigMap").unwrap()
    }
    type Break = fn(&mut Vec<Value>);
    let cases: &[(&str, Break, &str)] = &[
        (
            "NODE_NAME from a literal",
            |o| *env(o, "NODE_NAME") = json!({"name": "NODE_NAME", "value": "node-1"}),
            "NODE_NAME",
        ),
        (
            "NODE_NAME from metadata.name",
            |o| env(o, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] = json!("metadata.name"),
            "NODE_NAME",
        ),
        (
            "DISKLET_CONFIG elsewhere",
            |o| env(o, "DISKLET_CONFIG")["value"] = json!("/etc/disklet/other.yaml"),
            "no key other.yaml",
        ),
        (
            "hostDir without propagation",
            |o| {
                mount(o, "/var/lib/disklet")
                    .as_object_mut()
                    .unwrap()
                    .remove("mountPropagation");
            },
            "/var/lib/disklet: mountPropagation",
        ),
        (
            "hostDir read-only",
            |o| mount(o, "/var/lib/disklet")["readOnly"] = json!(true),
            "/var/lib/disklet: readOnly",
        ),
        (
            "kubelet dir writable",
            |o| mount(o, "/var/lib/kubelet")["readOnly"] = json!(false),
            "/var/lib/kubelet: readOnly",
        ),
        (
            "kubelet dir Bidirectional",
            |o| mount(o, "/var/lib/kubelet")["mountPropagation"] = json!("Bidirectional"),
            "/var/lib/kubelet: mountPropagation",
        ),
        (
            "/dev writable",
            |o| {
                mount(o, "/dev").as_object_mut().unwrap().remove("readOnly");
            },
            "/dev: readOnly",
        ),
        (
            "/sys writable",
            |o| mount(o, "/sys")["readOnly"] = json!(false),
            "/sys: readOnly",
        ),
        (
            "/run/udev writable",
            |o| mount(o, "/run/udev")["readOnly"] = json!(false),
            "/run/udev: readOnly",
        ),
        (
            "/dev mounted elsewhere",
            |o| mount(o, "/dev")["mountPath"] = json!("/host/dev"),
            "not at the same path",
        ),
        (
            "an extra hostPath",
            |o| {
                pod(o)["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "root", "hostPath": {"path": "/"}}))
            },
            "hostPath volumes",
        ),
        (
            "hostPID off",
            |o| pod(o)["hostPID"] = json!(false),
            "hostPID",
        ),
        (
            "hostNetwork on",
            |o| pod(o)["hostNetwork"] = json!(true),
            "hostNetwork",
        ),
        (
            "not privileged",
            |o| ctr(o)["securityContext"]["privileged"] = json!(false),
            "privileged",
        ),
        (
            "writable root",
            |o| {
                ctr(o)["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("readOnlyRootFilesystem");
            },
            "readOnlyRootFilesystem",
        ),
        (
            "liveness elsewhere",
            |o| ctr(o)["livenessProbe"]["httpGet"]["port"] = json!(8080),
            "livenessProbe",
        ),
        (
            "readiness on /healthz",
            |o| ctr(o)["readinessProbe"]["httpGet"]["path"] = json!("/healthz"),
            "readinessProbe",
        ),
        (
            "port renamed",
            |o| ctr(o)["ports"][0]["name"] = json!("metrics"),
            "container port http",
        ),
        (
            "listen elsewhere",
            |o| ctr(o)["args"][1] = json!("--listen=127.0.0.1:9403"),
            "args",
        ),
        (
            "no CPU request",
            |o| {
                ctr(o)["resources"]["requests"]
                    .as_object_mut()
                    .unwrap()
                    .remove("cpu");
            },
            "resources",
        ),
        (
            "memory limit changed",
            |o| ctr(o)["resources"]["limits"]["memory"] = json!("1Gi"),
            "resources",
        ),
        (
            "default termination message path",
            |o| {
                ctr(o)
                    .as_object_mut()
                    .unwrap()
                    .remove("terminationMessagePath");
            },
            "terminationMessagePath",
        ),
        (
            "another image",
            |o| ctr(o)["image"] = json!("ghcr.io/disklet/disklet:latest"),
            "image",
        ),
        (
            "maxUnavailable 2",
            |o| ds(o)["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = json!(2),
            "updateStrategy",
        ),
        (
            "no tolerations",
            |o| {
                pod(o).as_object_mut().unwrap().remove("tolerations");
            },
            "tolerations",
        ),
        (
            "no priority class",
            |o| {
                pod(o).as_object_mut().unwrap().remove("priorityClassName");
            },
            "priorityClassName",
        ),
        (
            "long grace period",
            |o| pod(o)["terminationGracePeriodSeconds"] = json!(600),
            "terminationGracePeriodSeconds",
        ),
        (
            "no token",
            |o| pod(o)["automountServiceAccountToken"] = json!(false),
            "token",
        ),
        (
            "PSA label gone",
            |o| {
                o.iter_mut().find(|x| x["kind"] == "Namespace").unwrap()["metadata"]["labels"]
                    .as_object_mut()
                    .unwrap()
                    .remove("pod-security.kubernetes.io/enforce");
            },
            "enforce",
        ),
        (
            "extra verb on PVs",
            |o| {
                rule(o, "persistentvolumes")["verbs"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!("update"))
            },
            "RBAC verbs",
        ),
        (
            "a verb missing on PVs",
            |o| {
                rule(o, "persistentvolumes")["verbs"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            },
            "RBAC verbs",
        ),
        (
            "storageclasses list",
            |o| rule(o, "storageclasses")["verbs"] = json!(["get", "list", "watch"]),
            "RBAC verbs",
        ),
        (
            "nodes list",
            |o| rule(o, "nodes")["verbs"] = json!(["get", "list"]),
            "RBAC verbs",
        ),
        (
            "secrets readable",
            |o| {
                rules(o)
                    .push(json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}))
            },
            "secrets",
        ),
        (
            "a wildcard",
            |o| rules(o).push(json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]})),
            "does not use",
        ),
        (
            "storageclasses in another group",
            |o| rule(o, "storageclasses")["apiGroups"] = json!(["storage.k8s.io", "apps"]),
            "does not use",
        ),
        (
            "events dropped",
            |o| {
                let r = rules(o);
                let i = r
                    .iter()
                    .position(|x| {
                        x["apiGroups"] == json!(["events.k8s.io"])
                            && x["resources"] == json!(["events"])
                    })
                    .unwrap();
                r.remove(i);
            },
            "RBAC lacks",
        ),
        (
            "a secret env",
            |o| {
                ctr(o)["env"].as_array_mut().unwrap().push(
                    json!({"name": "T", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}),
                )
            },
            "Secret",
        ),
        (
            "bound to another account",
            |o| {
                let b = o
                    .iter_mut()
                    .find(|x| x["kind"] == "ClusterRoleBinding")
                    .unwrap();
                b["subjects"][0]["name"] = json!("default");
            },
            "bindings",
        ),
        (
            "reclaim Retain",
            |o| sc(o)["reclaimPolicy"] = json!("Retain"),
            "reclaimPolicy",
        ),
        (
            "binding Immediate",
            |o| sc(o)["volumeBindingMode"] = json!("Immediate"),
            "volumeBindingMode",
        ),
        (
            "a provisioner",
            |o| sc(o)["provisioner"] = json!("disklet.io/local"),
            "provisioner",
        ),
        (
            "expandable",
            |o| sc(o)["allowVolumeExpansion"] = json!(true),
            "allowVolumeExpansion",
        ),
        (
            "config typo",
            |o| {
                let t = cm(o)["data"]["config.yaml"]
                    .as_str()
                    .unwrap()
                    .replace("minSize", "minsize");
                cm(o)["data"]["config.yaml"] = json!(t);
            },
            "not a valid disklet config",
        ),
        (
            "config selects by path",
            |o| {
                let t = cm(o)["data"]["config.yaml"].as_str().unwrap().replace(
                    "udev: {DISKLET_CLASS: \"fast\"}",
                    "udev: {DISKLET_CLASS: \"fast\"}\n      paths: [\"/dev/nvme0n1\"]",
                );
                cm(o)["data"]["config.yaml"] = json!(t);
            },
            "more than udev",
        ),
        (
            "config hostDir moved",
            |o| {
                let t = cm(o)["data"]["config.yaml"]
                    .as_str()
                    .unwrap()
                    .replace("hostDir: /var/lib/disklet", "hostDir: /mnt/disklet");
                cm(o)["data"]["config.yaml"] = json!(t);
            },
            "config hostDir",
        ),
        (
            "ConfigMap in default",
            |o| cm(o)["metadata"]["namespace"] = json!("default"),
            "namespace",
        ),
    ];
    for (what, break_it, expect) in cases {
        let mut objs = good.clone();
        break_it(&mut objs);
        let p = problems(&objs, &TARGETS[0], IMAGE);
        assert!(
            p.iter().any(|x| x.contains(expect)),
            "{what}: expected a problem mentioning {expect:?}, got {p:?}"
        );
    }
    // The StorageClass check of the block overlay's class can fail too.
    assert!(!storage_class_problems(&good, "local-block").is_empty());
}

/// Every rendered object, and the examples, against the Kubernetes JSON
/// schemas: strict (unknown fields fail), for 1.33 (the version disklet is
/// built against) and the newest version kubernetes-validate ships.
#[test]
fn every_object_validates_against_the_kubernetes_schemas() {
    let test = "every_object_validates_against_the_kubernetes_schemas";
    let (Some(k), Some(kv)) = (kubectl(test), kubernetes_validate(test)) else {
        return;
    };
    let help = Command::new(&kv).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let newest = help
        .split("Defaults to ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|s| s.trim_end_matches('.').to_string())
        .unwrap_or_else(|| panic!("no default version in kubernetes-validate --help: {help}"));
    let tool_version = Command::new(&kv).arg("--version").output().unwrap();
    let tool_version = String::from_utf8_lossy(&tool_version.stdout)
        .trim()
        .to_string();

    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut add = |origin: &str, objs: Vec<Value>| {
        for o in objs {
            let f = tmp.path().join(format!(
                "{:03}-{}-{}-{}.json",
                files.len(),
                origin.replace('/', "_"),
                kind_of(&o),
                name_of(&o)
            ));
            std::fs::write(&f, serde_json::to_vec_pretty(&o).unwrap()).unwrap();
            files.push(f);
        }
    };
    for t in TARGETS {
        add(t.dir, render_target(&k, t));
    }
    // The csi overlay's built-in kinds; its VolumeSnapshotClass is a CRD's,
    // which this validator has no schema for: tests/csi_e2e.rs applies it to
    // a real apiserver with the CRDs installed.
    add(
        "deploy/overlays/csi",
        render(&k, &repo().join("deploy/overlays/csi"))
            .into_iter()
            .filter(|o| kind_of(o) != "VolumeSnapshotClass")
            .collect(),
    );
    for example in ["dev-node.yaml", "statefulset.yaml"] {
        let text = std::fs::read_to_string(repo().join("deploy/examples").join(example)).unwrap();
        add(example, parse_docs(&text));
    }

    let validate = |version: &str, files: &[PathBuf]| {
        let out = Command::new(&kv)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for version in [K8S_BASELINE, newest.as_str()] {
        let (ok, text) = validate(version, &files);
        let passed = text.matches(" passed for resource ").count();
        assert!(
            ok && passed == files.len(),
            "kubernetes-validate {version}: {passed} of {} objects passed\n{text}",
            files.len()
        );
        eprintln!(
            "kubernetes-validate ({tool_version}): {passed} objects valid against Kubernetes {version} (strict)"
        );
    }

    // The validator rejects what it should: a wrong type, an unknown field.
    let good = render_target(&k, &TARGETS[0]);
    let ds = daemonset(&good).unwrap();
    for (what, broken) in [
        ("hostPID as a string", {
            let mut d = ds.clone();
            d["spec"]["template"]["spec"]["hostPID"] = json!("yes");
            d
        }),
        ("a misspelt field", {
            let mut d = ds.clone();
            d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]["readonly"] =
                json!(true);
            d
        }),
    ] {
        let f = tmp.path().join("broken.json");
        std::fs::write(&f, serde_json::to_vec(&broken).unwrap()).unwrap();
        let (ok, text) = validate(K8S_BASELINE, &[f]);
        assert!(!ok, "kubernetes-validate accepted {what}:\n{text}");
    }
}
