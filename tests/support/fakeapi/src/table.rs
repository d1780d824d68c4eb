//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`),
//! so `kubectl get` shows the usual columns.

use crate::resources::ResourceInfo;
use serde_json::{json, Value};

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.to_string()
    }
}

/// Human age as kubectl prints it.
pub fn age(ts: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(ts) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        format!("{m}m{}s", secs % 60)
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else {
        format!("{d}d")
    }
}

fn access_modes(obj: &Value, ptr: &str) -> String {
    let modes: Vec<&str> = obj
        .pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|m| match m {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    other => other,
                })
                .collect()
        })
        .unwrap_or_default();
    modes.join(",")
}

fn columns(res: &ResourceInfo) -> Vec<&'static str> {
    match res.plural {
        "persistentvolumes" => vec![
            "Name",
            "Capacity",
            "Access Modes",
            "Reclaim Policy",
            "Status",
            "Claim",
            "StorageClass",
            "VolumeAttributesClass",
            "Reason",
            "Age",
        ],
        "persistentvolumeclaims" => vec![
            "Name",
            "Status",
            "Volume",
            "Capacity",
            "Access Modes",
            "StorageClass",
            "VolumeAttributesClass",
            "Age",
        ],
        "nodes" => vec!["Name", "Status", "Roles", "Age", "Version"],
        "storageclasses" => vec![
            "Name",
            "Provisioner",
            "ReclaimPolicy",
            "VolumeBindingMode",
            "AllowVolumeExpansion",
            "Age",
        ],
        "namespaces" => vec!["Name", "Status", "Age"],
        "leases" => vec!["Name", "Holder", "Age"],
        _ => vec!["Name", "Age"],
    }
}

fn cells(res: &ResourceInfo, o: &Value) -> Vec<Value> {
    let name = s(o, "/metadata/name").to_string();
    let age = age(s(o, "/metadata/creationTimestamp"));
    let v: Vec<String> = match res.plural {
        "persistentvolumes" => {
            let claim = if s(o, "/spec/claimRef/name").is_empty() {
                String::new()
            } else {
                format!(
                    "{}/{}",
                    s(o, "/spec/claimRef/namespace"),
                    s(o, "/spec/claimRef/name")
                )
            };
            vec![
                name,
                s(o, "/spec/capacity/storage").to_string(),
                access_modes(o, "/spec/accessModes"),
                s(o, "/spec/persistentVolumeReclaimPolicy").to_string(),
                s(o, "/status/phase").to_string(),
                claim,
                s(o, "/spec/storageClassName").to_string(),
                or_none(s(o, "/spec/volumeAttributesClassName")),
                s(o, "/status/reason").to_string(),
                age,
            ]
        }
        "persistentvolumeclaims" => vec![
            name,
            s(o, "/status/phase").to_string(),
            s(o, "/spec/volumeName").to_string(),
            s(o, "/status/capacity/storage").to_string(),
            access_modes(o, "/status/accessModes"),
            s(o, "/spec/storageClassName").to_string(),
            or_none(s(o, "/spec/volumeAttributesClassName")),
            age,
        ],
        "nodes" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| s(c, "/type") == "Ready"))
                .map(|c| {
                    if s(c, "/status") == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            vec![
                name,
                ready.to_string(),
                "<none>".into(),
                age,
                s(o, "/status/nodeInfo/kubeletVersion").to_string(),
            ]
        }
        "storageclasses" => {
            let mut n = name;
            if s(
                o,
                "/metadata/annotations/storageclass.kubernetes.io~1is-default-class",
            ) == "true"
            {
                n.push_str(" (default)");
            }
            vec![
                n,
                s(o, "/provisioner").to_string(),
                s(o, "/reclaimPolicy").to_string(),
                s(o, "/volumeBindingMode").to_string(),
                o.get("allowVolumeExpansion")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string(),
                age,
            ]
        }
        "namespaces" => vec![name, s(o, "/status/phase").to_string(), age],
        "leases" => vec![name, s(o, "/spec/holderIdentity").to_string(), age],
        _ => vec![name, age],
    };
    v.into_iter().map(Value::String).collect()
}

/// Build a `meta.k8s.io/v1` Table for the given objects.
pub fn table(res: &ResourceInfo, items: &[Value], list_meta: Option<&Value>) -> Value {
    let cols: Vec<Value> = columns(res)
        .iter()
        .map(|c| {
            json!({
                "name": c,
                "type": "string",
                "format": if *c == "Name" { "name" } else { "" },
                "description": "",
                "priority": 0
            })
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({
                "cells": cells(res, o),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                }
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta.cloned().unwrap_or(json!({})),
        "columnDefinitions": cols,
        "rows": rows,
    })
}
