//! Validation and defaulting, a subset of what the real apiserver does.

use crate::error::Cause;
use crate::resources::ResourceInfo;
use crate::selector::{validate_label_key, validate_label_value};
use serde_json::{json, Value};

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn cause(reason: &str, field: &str, message: String) -> Cause {
    Cause {
        reason: reason.to_string(),
        message,
        field: field.to_string(),
    }
}

fn invalid(field: &str, value: &Value, detail: &str) -> Cause {
    let shown = match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    };
    cause(
        "FieldValueInvalid",
        field,
        format!("Invalid value: {shown}: {detail}"),
    )
}

fn required(field: &str, detail: &str) -> Cause {
    let msg = if detail.is_empty() {
        "Required value".to_string()
    } else {
        format!("Required value: {detail}")
    };
    cause("FieldValueRequired", field, msg)
}

fn forbidden(field: &str, detail: &str) -> Cause {
    cause("FieldValueForbidden", field, format!("Forbidden: {detail}"))
}

fn unsupported(field: &str, value: &str, allowed: &[&str]) -> Cause {
    let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    cause(
        "FieldValueNotSupported",
        field,
        format!(
            "Unsupported value: \"{value}\": supported values: {}",
            list.join(", ")
        ),
    )
}

/// Validate a name for a resource (namespaces use DNS-1123 labels, others subdomains).
pub fn validate_name(res: &ResourceInfo, name: &str) -> Option<Cause> {
    if name.is_empty() {
        return Some(required(
            "metadata.name",
            "name or generateName is required",
        ));
    }
    let (ok, msg) = if res.plural == "namespaces" {
        (is_dns1123_label(name), DNS1123_LABEL_MSG)
    } else {
        (is_dns1123_subdomain(name), DNS1123_SUBDOMAIN_MSG)
    };
    if ok {
        None
    } else {
        Some(invalid("metadata.name", &json!(name), msg))
    }
}

/// Validate metadata (labels, annotations, finalizers) and per-kind rules.
pub fn validate_object(res: &ResourceInfo, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let meta = obj.get("metadata");
    if let Some(labels) = meta.and_then(|m| m.get("labels")) {
        match labels.as_object() {
            Some(map) => {
                for (k, v) in map {
                    if let Err(e) = validate_label_key(k) {
                        causes.push(invalid("metadata.labels", &json!(k), &e));
                    }
                    match v.as_str() {
                        Some(s) => {
                            if let Err(e) = validate_label_value(s) {
                                causes.push(invalid("metadata.labels", &json!(s), &e));
                            }
                        }
                        None => causes.push(invalid(
                            "metadata.labels",
                            v,
                            "label values must be strings",
                        )),
                    }
                }
            }
            None if labels.is_null() => {}
            None => causes.push(invalid("metadata.labels", labels, "must be a map")),
        }
    }
    if let Some(ann) = meta.and_then(|m| m.get("annotations")) {
        if let Some(map) = ann.as_object() {
            for (k, v) in map {
                if let Err(e) = validate_label_key(&k.to_ascii_lowercase()) {
                    causes.push(invalid("metadata.annotations", &json!(k), &e));
                }
                if !v.is_string() {
                    causes.push(invalid(
                        "metadata.annotations",
                        v,
                        "annotation values must be strings",
                    ));
                }
            }
        }
    }
    if let Some(f) = meta.and_then(|m| m.get("finalizers")) {
        if let Some(list) = f.as_array() {
            for (i, item) in list.iter().enumerate() {
                let field = format!("metadata.finalizers[{i}]");
                match item.as_str() {
                    Some(s) if validate_label_key(s).is_ok() || s == "kubernetes" => {}
                    _ => causes.push(invalid(
                        &field,
                        item,
                        "a qualified name must consist of alphanumeric characters, '-', '_' or '.'",
                    )),
                }
            }
        }
    }
    match res.plural {
        "persistentvolumes" => validate_pv(obj, old, &mut causes),
        "persistentvolumeclaims" => validate_pvc(obj, &mut causes),
        "storageclasses" => validate_sc(obj, old, &mut causes),
        _ => {}
    }
    causes
}

const PV_SOURCES: &[&str] = &[
    "local",
    "hostPath",
    "csi",
    "nfs",
    "iscsi",
    "fc",
    "rbd",
    "cephfs",
    "cinder",
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "vsphereVolume",
    "flexVolume",
    "flocker",
    "glusterfs",
    "quobyte",
    "portworxVolume",
    "scaleIO",
    "storageos",
    "photonPersistentDisk",
];

fn validate_pv(obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    match spec.get("capacity").and_then(Value::as_object) {
        Some(c) if c.contains_key("storage") => {}
        _ => causes.push(required("spec.capacity", "")),
    }
    match spec.get("accessModes").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            for m in a {
                let s = m.as_str().unwrap_or("");
                let allowed = [
                    "ReadOnlyMany",
                    "ReadWriteMany",
                    "ReadWriteOnce",
                    "ReadWriteOncePod",
                ];
                if !allowed.contains(&s) {
                    causes.push(unsupported("spec.accessModes", s, &allowed));
                }
            }
        }
        _ => causes.push(required("spec.accessModes", "")),
    }
    let sources: Vec<&str> = PV_SOURCES
        .iter()
        .copied()
        .filter(|s| spec.get(*s).is_some_and(|v| !v.is_null()))
        .collect();
    if sources.is_empty() {
        causes.push(required("spec", "must specify a volume type"));
    } else if sources.len() > 1 {
        causes.push(forbidden(
            &format!("spec.{}", sources[1]),
            "may not specify more than 1 volume type",
        ));
    }
    if sources.contains(&"local") {
        match spec.pointer("/local/path").and_then(Value::as_str) {
            Some(p) if !p.is_empty() => {}
            _ => causes.push(required("spec.local.path", "")),
        }
        if spec.get("nodeAffinity").is_none_or(Value::is_null) {
            causes.push(required(
                "spec.nodeAffinity",
                "Local volume requires node affinity",
            ));
        }
    }
    if let Some(p) = spec
        .get("persistentVolumeReclaimPolicy")
        .and_then(Value::as_str)
    {
        let allowed = ["Delete", "Recycle", "Retain"];
        if !allowed.contains(&p) {
            causes.push(unsupported(
                "spec.persistentVolumeReclaimPolicy",
                p,
                &allowed,
            ));
        }
    }
    if let Some(m) = spec.get("volumeMode").and_then(Value::as_str) {
        let allowed = ["Block", "Filesystem"];
        if !allowed.contains(&m) {
            causes.push(unsupported("spec.volumeMode", m, &allowed));
        }
    }
    if let Some(old) = old {
        let ospec = old.get("spec").cloned().unwrap_or(json!({}));
        for s in PV_SOURCES {
            if spec.get(*s) != ospec.get(*s) {
                causes.push(forbidden(
                    "spec.persistentvolumesource",
                    "spec.persistentvolumesource is immutable after creation",
                ));
                break;
            }
        }
        if ospec.get("nodeAffinity").is_some_and(|v| !v.is_null())
            && spec.get("nodeAffinity") != ospec.get("nodeAffinity")
        {
            causes.push(invalid(
                "spec.nodeAffinity",
                spec.get("nodeAffinity").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        if spec.get("volumeMode") != ospec.get("volumeMode") {
            causes.push(invalid(
                "spec.volumeMode",
                spec.get("volumeMode").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
    }
}

fn validate_pvc(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    match spec.get("accessModes").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {}
        _ => causes.push(required(
            "spec.accessModes",
            "at least 1 access mode is required",
        )),
    }
    if spec.pointer("/resources/requests/storage").is_none() {
        causes.push(required("spec.resources[storage]", ""));
    }
}

fn validate_sc(obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    match obj.get("provisioner").and_then(Value::as_str) {
        Some(p) if !p.is_empty() => {}
        _ => causes.push(required("provisioner", "")),
    }
    if let Some(m) = obj.get("volumeBindingMode").and_then(Value::as_str) {
        let allowed = ["Immediate", "WaitForFirstConsumer"];
        if !allowed.contains(&m) {
            causes.push(unsupported("volumeBindingMode", m, &allowed));
        }
    }
    if let Some(old) = old {
        for f in [
            "provisioner",
            "parameters",
            "reclaimPolicy",
            "volumeBindingMode",
        ] {
            if obj.get(f) != old.get(f) {
                causes.push(forbidden(f, &format!("updates to {f} are forbidden.")));
            }
        }
    }
}

fn set_default(obj: &mut Value, pointer_parent: &str, key: &str, value: Value) {
    let parent = if pointer_parent.is_empty() {
        Some(&mut *obj)
    } else {
        ensure_object(obj, pointer_parent)
    };
    if let Some(Value::Object(map)) = parent {
        if map.get(key).is_none_or(Value::is_null) {
            map.insert(key.to_string(), value);
        }
    }
}

fn ensure_object<'a>(obj: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    let mut cur = obj;
    for seg in pointer.trim_start_matches('/').split('/') {
        let map = cur.as_object_mut()?;
        let entry = map.entry(seg.to_string()).or_insert_with(|| json!({}));
        if entry.is_null() {
            *entry = json!({});
        }
        cur = entry;
    }
    Some(cur)
}

/// Apply the defaults the real apiserver applies to the types served.
pub fn apply_defaults(res: &ResourceInfo, obj: &mut Value) {
    match res.plural {
        "persistentvolumes" => {
            set_default(
                obj,
                "/spec",
                "persistentVolumeReclaimPolicy",
                json!("Retain"),
            );
            set_default(obj, "/spec", "volumeMode", json!("Filesystem"));
            set_default(obj, "/status", "phase", json!("Pending"));
        }
        "persistentvolumeclaims" => {
            set_default(obj, "/spec", "volumeMode", json!("Filesystem"));
            set_default(obj, "/status", "phase", json!("Pending"));
        }
        "storageclasses" => {
            set_default(obj, "", "reclaimPolicy", json!("Delete"));
            set_default(obj, "", "volumeBindingMode", json!("Immediate"));
        }
        "namespaces" => {
            set_default(obj, "/status", "phase", json!("Active"));
            if let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str) {
                let name = name.to_string();
                if let Some(Value::Object(l)) = ensure_object(obj, "/metadata/labels") {
                    l.entry("kubernetes.io/metadata.name".to_string())
                        .or_insert(Value::String(name));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns1123_subdomain("pv-1.disk"));
        assert!(!is_dns1123_subdomain("PV"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_dns1123_label("default"));
        assert!(!is_dns1123_label("a.b"));
    }
}
