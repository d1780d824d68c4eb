//! Field sets and `metadata.managedFields` bookkeeping (a simplified
//! structured-merge-diff: maps are descended into, lists and scalars are
//! atomic leaves).

use crate::error::{ApiError, Cause};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

/// A path of map keys from the object root.
pub type FieldPath = Vec<String>;
/// A set of owned leaf paths.
pub type FieldSet = BTreeSet<FieldPath>;

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (resources without a status subresource).
    All,
    /// Everything but `status` (main resource of a type with `/status`).
    NoStatus,
    /// Only `status` (the `/status` subresource).
    StatusOnly,
}

const SYSTEM_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Collect leaf paths of an object, excluding system fields, restricted to `scope`.
pub fn leaves(obj: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(map) = obj {
        for (k, v) in map {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            let in_scope = match scope {
                Scope::All => true,
                Scope::NoStatus => k != "status",
                Scope::StatusOnly => k == "status",
            };
            if !in_scope {
                continue;
            }
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    for (mk, mv) in meta {
                        if SYSTEM_META.contains(&mk.as_str()) {
                            continue;
                        }
                        walk(mv, &mut vec!["metadata".to_string(), mk.clone()], &mut out);
                    }
                }
                continue;
            }
            walk(v, &mut vec![k.clone()], &mut out);
        }
    }
    out
}

fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(k.clone());
                walk(child, path, out);
                path.pop();
            }
        }
        Value::Null => {}
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Value at a path.
pub fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

/// Remove the value at a path, pruning parents that become empty (below depth 1).
pub fn remove_path(obj: &mut Value, path: &[String]) {
    fn rec(cur: &mut Value, path: &[String], depth: usize) -> bool {
        let Some(map) = cur.as_object_mut() else {
            return false;
        };
        if path.len() == 1 {
            map.remove(&path[0]);
        } else if let Some(child) = map.get_mut(&path[0]) {
            if rec(child, &path[1..], depth + 1) {
                map.remove(&path[0]);
            }
        }
        map.is_empty() && depth >= 2
    }
    if !path.is_empty() {
        rec(obj, path, 0);
    }
}

/// Whether `a` is a prefix of `b` (or equal).
fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// Whether two paths overlap (one is a prefix of the other).
pub fn overlaps(a: &[String], b: &[String]) -> bool {
    is_prefix(a, b) || is_prefix(b, a)
}

/// Render a path for messages: `.spec.capacity.storage`.
pub fn path_str(p: &[String]) -> String {
    let mut s = String::new();
    for seg in p {
        s.push('.');
        s.push_str(seg);
    }
    s
}

/// Encode a field set as FieldsV1 (`{"f:spec": {"f:x": {}}}`); a path that is
/// also a prefix of another gets a `"."` marker.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    fn insert(node: &mut Map<String, Value>, path: &[String]) {
        if let Some((first, rest)) = path.split_first() {
            let entry = node
                .entry(format!("f:{first}"))
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(next) = entry {
                insert(next, rest);
            }
        }
    }
    let mut root = Map::new();
    for p in set {
        insert(&mut root, p);
    }
    // second pass: a leaf inserted before its children needs the "." marker too
    fn mark(set: &FieldSet, prefix: &mut FieldPath, node: &mut Map<String, Value>) {
        let keys: Vec<String> = node.keys().cloned().collect();
        for k in keys {
            let Some(seg) = k.strip_prefix("f:") else {
                continue;
            };
            prefix.push(seg.to_string());
            if let Some(Value::Object(child)) = node.get_mut(&k) {
                let has_children = child.keys().any(|c| c.starts_with("f:"));
                if has_children && set.contains(prefix.as_slice()) {
                    child.insert(".".into(), json!({}));
                }
                mark(set, prefix, child);
            }
            prefix.pop();
        }
    }
    mark(set, &mut Vec::new(), &mut root);
    Value::Object(root)
}

/// Decode FieldsV1 as written by [`to_fields_v1`]. Non-`f:` keys (`k:`, `v:`,
/// `i:` from real clients) are treated as ownership of their parent.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    fn rec(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Some(map) = v.as_object() else {
            return;
        };
        if map.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, child) in map {
            if k == "." {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            } else if let Some(seg) = k.strip_prefix("f:") {
                path.push(seg.to_string());
                rec(child, path, out);
                path.pop();
            } else if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
    rec(v, &mut Vec::new(), &mut out);
    out
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion the fields were written with.
    pub api_version: String,
    /// Last time the owned set changed.
    pub time: String,
    /// `status` for the status subresource.
    pub subresource: Option<String>,
    /// Owned paths.
    pub fields: FieldSet,
}

/// Parse `metadata.managedFields`.
pub fn parse_managed(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: str_of(e, "manager"),
            operation: str_of(e, "operation"),
            api_version: str_of(e, "apiVersion"),
            time: str_of(e, "time"),
            subresource: e
                .get("subresource")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// Write entries back (entries with no fields are dropped).
pub fn render_managed(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(s) = &e.subresource {
                m["subresource"] = json!(s);
            }
            m
        })
        .collect();
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Ownership bookkeeping for a non-apply write (create, update, patch):
/// changed fields move to `manager`'s Update entry, removed fields are
/// dropped from everyone.
pub fn track_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    scope: Scope,
    now: &str,
) {
    let mut entries = old.map(parse_managed).unwrap_or_default();
    let new_leaves = leaves(new, scope);
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| old.and_then(|o| get_path(o, p)) != get_path(new, p))
        .cloned()
        .collect();
    for e in entries.iter_mut() {
        e.fields
            .retain(|p| get_path(new, p).is_some() && !changed.iter().any(|c| overlaps(c, p)));
    }
    if !changed.is_empty() {
        let sub = subresource.map(str::to_string);
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update" && e.subresource == sub)
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_string();
                e.api_version = api_version.to_string();
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: sub,
                fields: changed,
            }),
        }
    }
    render_managed(new, &entries);
}

/// Deep-merge an applied configuration into `target` (maps merge, everything
/// else replaces, nulls are ignored).
fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_applied(existing, v)
                    }
                    _ => {
                        let mut fresh = if v.is_object() {
                            json!({})
                        } else {
                            Value::Null
                        };
                        if v.is_object() {
                            merge_applied(&mut fresh, v);
                        } else {
                            fresh = v.clone();
                        }
                        t.insert(k.clone(), fresh);
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Result of server-side apply before the generic update pipeline.
pub struct Applied {
    /// The merged object (managedFields already rendered).
    pub object: Value,
}

/// Server-side apply of `applied` by `manager` onto `current` (None: create).
#[allow(clippy::too_many_arguments)]
pub fn server_side_apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    subresource: Option<&str>,
    scope: Scope,
    now: &str,
) -> Result<Applied, ApiError> {
    let fa = leaves(applied, scope);
    let sub = subresource.map(str::to_string);
    let mut entries = current.map(parse_managed).unwrap_or_default();
    let empty = json!({});
    let cur = current.unwrap_or(&empty);

    // conflicts with other managers
    let mut conflicts: Vec<(usize, FieldPath)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.manager == manager {
            continue;
        }
        for p in &fa {
            for q in e.fields.iter().filter(|q| overlaps(p, q)) {
                let r = if p.len() <= q.len() { p } else { q };
                if get_path(applied, r) != get_path(cur, r) {
                    conflicts.push((i, r.clone()));
                }
            }
        }
    }
    conflicts.sort();
    conflicts.dedup();
    if !conflicts.is_empty() {
        if !force {
            let causes: Vec<Cause> = conflicts
                .iter()
                .map(|(i, p)| Cause {
                    reason: "FieldManagerConflict".into(),
                    message: format!(
                        "conflict with \"{}\" using {}",
                        entries[*i].manager, entries[*i].api_version
                    ),
                    field: path_str(p),
                })
                .collect();
            let n = causes.len();
            let list: Vec<String> = causes
                .iter()
                .map(|c| format!("{}: {}", c.message, c.field))
                .collect();
            let plural = if n == 1 { "" } else { "s" };
            let mut err = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {n} conflict{plural}: {}",
                    list.join("\n")
                ),
            );
            err.details.causes = causes;
            return Err(err);
        }
        for (i, p) in &conflicts {
            entries[*i].fields.retain(|q| !overlaps(p, q));
        }
    }

    // fields previously applied by this manager and now omitted
    let prev: FieldSet = entries
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut object = cur.clone();
    for p in prev.difference(&fa) {
        if fa.iter().any(|f| overlaps(f, p)) {
            continue;
        }
        let owned_by_other = entries.iter().any(|e| {
            !(e.manager == manager && e.operation == "Apply" && e.subresource == sub)
                && e.fields.iter().any(|q| overlaps(p, q))
        });
        if !owned_by_other {
            remove_path(&mut object, p);
        }
    }
    let mut filtered = applied.clone();
    if let Value::Object(m) = &mut filtered {
        match scope {
            Scope::All => {}
            Scope::NoStatus => {
                m.remove("status");
            }
            Scope::StatusOnly => m.retain(|k, _| k == "status" || k == "metadata"),
        }
    }
    merge_applied(&mut object, &filtered);

    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
    {
        Some(e) => {
            if e.fields != fa {
                e.fields = fa;
                e.time = now.to_string();
                e.api_version = api_version.to_string();
            }
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            subresource: sub,
            fields: fa,
        }),
    }
    // fields that vanished from the object are owned by nobody
    for e in entries.iter_mut() {
        e.fields.retain(|p| get_path(&object, p).is_some());
    }
    if object.get("metadata").is_none() {
        object["metadata"] = json!({});
    }
    render_managed(&mut object, &entries);
    Ok(Applied { object })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_roundtrip() {
        let obj = json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "a", "labels": {"x": "1"}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}});
        let set = leaves(&obj, Scope::All);
        assert_eq!(set.len(), 3);
        let enc = to_fields_v1(&set);
        assert_eq!(enc["f:spec"]["f:capacity"]["f:storage"], json!({}));
        assert_eq!(from_fields_v1(&enc), set);
        let mut with_prefix = set.clone();
        with_prefix.insert(vec!["spec".into(), "capacity".into()]);
        assert_eq!(from_fields_v1(&to_fields_v1(&with_prefix)), with_prefix);
    }

    #[test]
    fn apply_conflict_and_force() {
        let first = server_side_apply(
            None,
            &json!({"metadata": {"name": "a"}, "spec": {"x": 1, "y": 2}}),
            "m1",
            false,
            "v1",
            None,
            Scope::All,
            "t",
        )
        .map(|a| a.object);
        let Ok(first) = first else {
            panic!("first apply failed")
        };
        let second = server_side_apply(
            Some(&first),
            &json!({"metadata": {"name": "a"}, "spec": {"x": 5}}),
            "m2",
            false,
            "v1",
            None,
            Scope::All,
            "t",
        );
        match second {
            Err(e) => {
                assert_eq!(e.code, 409);
                assert_eq!(e.details.causes[0].field, ".spec.x");
            }
            Ok(_) => panic!("expected conflict"),
        }
        let forced = server_side_apply(
            Some(&first),
            &json!({"metadata": {"name": "a"}, "spec": {"x": 5}}),
            "m2",
            true,
            "v1",
            None,
            Scope::All,
            "t",
        );
        let Ok(forced) = forced else {
            panic!("forced apply failed")
        };
        assert_eq!(forced.object["spec"], json!({"x": 5, "y": 2}));
        // m1 now omits y: it is removed since nobody else owns it
        let again = server_side_apply(
            Some(&forced.object),
            &json!({"metadata": {"name": "a"}, "spec": {}}),
            "m1",
            false,
            "v1",
            None,
            Scope::All,
            "t",
        );
        let Ok(again) = again else {
            panic!("third apply failed")
        };
        assert_eq!(again.object["spec"], json!({"x": 5}));
    }
}
