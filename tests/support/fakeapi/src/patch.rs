//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and a
//! strategic merge patch that knows the list strategies of the served types.

use crate::error::ApiError;
use serde_json::{Map, Value};

/// Patch content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// From a Content-Type header.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// RFC 7386 merge patch.
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    json_patch::merge(doc, patch);
}

/// RFC 6902 JSON patch; failures (including a failed `test`) are 422.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("json: cannot unmarshal patch: {e}")))?;
    json_patch::patch(doc, &ops).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {e}"),
        )
    })
}

enum ListStrategy {
    Replace,
    MergePrimitive,
    MergeByKey(&'static str),
}

fn list_strategy(path: &[String]) -> ListStrategy {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["metadata", "finalizers"] => ListStrategy::MergePrimitive,
        ["metadata", "ownerReferences"] => ListStrategy::MergeByKey("uid"),
        ["status", "conditions"] => ListStrategy::MergeByKey("type"),
        ["status", "addresses"] => ListStrategy::MergeByKey("type"),
        ["spec", "nodeAffinity", "required", "nodeSelectorTerms"] => ListStrategy::Replace,
        _ => ListStrategy::Replace,
    }
}

/// Strategic merge patch.
pub fn strategic_merge(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    smp(doc, patch, &mut Vec::new())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, child) in m {
                if k.starts_with('$') {
                    continue;
                }
                if child.is_null() {
                    continue;
                }
                out.insert(k.clone(), strip_directives(child));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn smp(doc: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), ApiError> {
    let Value::Object(pm) = patch else {
        *doc = patch.clone();
        return Ok(());
    };
    match pm.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *doc = strip_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            *doc = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unknown patch type: {other}"
            )))
        }
        None => {}
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let Value::Object(dm) = doc else {
        return Ok(());
    };
    for (k, v) in pm {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            dm.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Object(_) => {
                let target = dm.entry(k.clone()).or_insert(Value::Null);
                if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                    dm.remove(k);
                } else {
                    smp(target, v, path)?;
                }
            }
            Value::Array(items) => {
                let existing = dm
                    .get(k)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let merged = match list_strategy(path) {
                    ListStrategy::Replace => items.iter().map(strip_directives).collect(),
                    ListStrategy::MergePrimitive => {
                        let mut out = existing;
                        for it in items {
                            if !out.contains(it) {
                                out.push(it.clone());
                            }
                        }
                        out
                    }
                    ListStrategy::MergeByKey(key) => {
                        let mut out = existing;
                        for it in items {
                            let kv = it.get(key).cloned();
                            let pos = out
                                .iter()
                                .position(|e| e.get(key) == kv.as_ref() && kv.is_some());
                            let delete = it.get("$patch").and_then(Value::as_str) == Some("delete");
                            match (pos, delete) {
                                (Some(i), true) => {
                                    out.remove(i);
                                }
                                (None, true) => {}
                                (Some(i), false) => smp(&mut out[i], it, path)?,
                                (None, false) => out.push(strip_directives(it)),
                            }
                        }
                        out
                    }
                };
                dm.insert(k.clone(), Value::Array(merged));
            }
            other => {
                dm.insert(k.clone(), other.clone());
            }
        }
        path.pop();
    }
    for (k, v) in pm {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (dm.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
        }
    }
    if let Some(Value::Array(keep)) = pm.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        dm.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_finalizers_merge_and_delete() {
        let mut doc = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}});
        let Ok(()) = strategic_merge(
            &mut doc,
            &json!({"metadata": {"finalizers": ["b"], "labels": {"x": null}}}),
        ) else {
            panic!("patch failed")
        };
        assert_eq!(
            doc,
            json!({"metadata": {"finalizers": ["a", "b"], "labels": {}}})
        );
        let Ok(()) = strategic_merge(
            &mut doc,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        ) else {
            panic!("patch failed")
        };
        assert_eq!(doc["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn strategic_conditions_by_type() {
        let mut doc = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "X", "status": "True"}]}});
        let p = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "$patch": "delete"}]}});
        assert!(strategic_merge(&mut doc, &p).is_ok());
        assert_eq!(
            doc["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
    }

    #[test]
    fn json_patch_test_failure_is_422() {
        let mut doc = json!({"a": 1});
        let e = json_patch(&mut doc, &json!([{"op": "test", "path": "/a", "value": 2}]));
        assert_eq!(e.map_err(|e| e.code), Err(422));
    }
}
