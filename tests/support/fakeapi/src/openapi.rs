//! A minimal OpenAPI v3 document: enough for kubectl to learn that every
//! resource accepts `fieldValidation` (so it validates server-side and never
//! needs the protobuf `/openapi/v2` document).

use crate::resources::{self, RESOURCES};
use serde_json::{json, Map, Value};

const HASH: &str = "0FAKE0APISERVER0";

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`.
pub fn root() -> Value {
    let mut paths = Map::new();
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": format!("/openapi/v3/api/v1?hash={HASH}")}),
    );
    for (g, v) in resources::groups() {
        let p = gv_path(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={HASH}")}),
        );
    }
    json!({"paths": paths})
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
pub fn group_version(group: &str, version: &str) -> Option<Value> {
    let mut paths = Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let prefix = format!("/{}", gv_path(r.group, r.version));
        let collection = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{prefix}/{}", r.plural)
        };
        let op = |verb: &str, action: &str| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation")],
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(collection.clone(), json!({"post": op("create", "post")}));
        if r.virtual_create_only {
            continue;
        }
        let mut item = json!({
            "get": op("read", "get"),
            "put": op("replace", "put"),
            "patch": op("patch", "patch"),
            "delete": op("delete", "delete"),
        });
        if let Some(p) = item["patch"]["parameters"].as_array_mut() {
            p.push(param("force"));
        }
        paths.insert(format!("{collection}/{{name}}"), item.take());
        if r.has_status {
            paths.insert(
                format!("{collection}/{{name}}/status"),
                json!({"get": op("read", "get"), "put": op("replace", "put"), "patch": op("patch", "patch")}),
            );
        }
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (fake)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
