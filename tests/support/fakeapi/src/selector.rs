//! Label and field selectors, parsed as the real apiserver parses them.

use crate::error::ApiError;
use crate::resources::{FieldSet, ResourceInfo};
use serde_json::Value;
use std::collections::BTreeSet;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelReq {
    /// `key=value` / `key==value`.
    Eq(String, String),
    /// `key!=value` (also matches when the key is absent).
    NotEq(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)` (also matches when the key is absent).
    NotIn(String, BTreeSet<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    NotExists(String),
    /// `key>N`.
    Gt(String, i64),
    /// `key<N`.
    Lt(String, i64),
}

/// A parsed label selector (AND of requirements). Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// Requirements, all must hold.
    pub reqs: Vec<LabelReq>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Comma,
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '(' => {
                out.push(Tok::Open);
                i += 1
            }
            ')' => {
                out.push(Tok::Close);
                i += 1
            }
            '>' => {
                out.push(Tok::Gt);
                i += 1
            }
            '<' => {
                out.push(Tok::Lt);
                i += 1
            }
            '=' => {
                if chars.get(i + 1) == Some(&'=') {
                    out.push(Tok::DoubleEq);
                    i += 2
                } else {
                    out.push(Tok::Eq);
                    i += 1
                }
            }
            '!' => {
                if chars.get(i + 1) == Some(&'=') {
                    out.push(Tok::NotEq);
                    i += 2
                } else {
                    out.push(Tok::Not);
                    i += 1
                }
            }
            _ => {
                let start = i;
                while i < chars.len() && !" \t\n\r,()=!<>".contains(chars[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

fn is_label_name(s: &str) -> bool {
    // qualified name: [A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?, at most 63 chars
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Validate a label key (`prefix/name` or `name`). Returns an error message.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !crate::validation::is_dns1123_subdomain(p) {
            return Err(String::from(
                "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            ));
        }
    }
    if !is_label_name(name) {
        return Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".to_string());
    }
    Ok(())
}

/// Validate a label value (may be empty).
pub fn validate_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".to_string())
    }
}

fn req_err(msg: String) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {msg}"))
}

impl LabelSelector {
    /// Parse the `labelSelector` query syntax.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let toks = lex(s).map_err(req_err)?;
        let mut reqs = Vec::new();
        let mut i = 0;
        let key_of = |t: Option<&Tok>| -> Result<String, ApiError> {
            match t {
                Some(Tok::Ident(k)) => {
                    validate_label_key(k)
                        .map_err(|e| req_err(format!("invalid label key \"{k}\": {e}")))?;
                    Ok(k.clone())
                }
                other => Err(ApiError::bad_request(format!(
                    "found '{}', expected: identifier",
                    tok_str(other)
                ))),
            }
        };
        while i < toks.len() {
            let req = if toks[i] == Tok::Not {
                let k = key_of(toks.get(i + 1))?;
                i += 2;
                LabelReq::NotExists(k)
            } else {
                let k = key_of(toks.get(i))?;
                i += 1;
                match toks.get(i) {
                    None | Some(Tok::Comma) => LabelReq::Exists(k),
                    Some(op @ (Tok::Eq | Tok::DoubleEq | Tok::NotEq | Tok::Gt | Tok::Lt)) => {
                        let op = op.clone();
                        i += 1;
                        let v = match toks.get(i) {
                            Some(Tok::Ident(v)) => {
                                i += 1;
                                v.clone()
                            }
                            None | Some(Tok::Comma) => String::new(),
                            other => {
                                return Err(ApiError::bad_request(format!(
                                    "found '{}', expected: identifier",
                                    tok_str(other)
                                )))
                            }
                        };
                        match op {
                            Tok::Gt | Tok::Lt => {
                                let n: i64 = v.parse().map_err(|_| {
                                    req_err(format!(
                                        "for 'Gt', 'Lt' operators, the value must be an integer: {v}"
                                    ))
                                })?;
                                if op == Tok::Gt {
                                    LabelReq::Gt(k, n)
                                } else {
                                    LabelReq::Lt(k, n)
                                }
                            }
                            _ => {
                                validate_label_value(&v).map_err(|e| {
                                    req_err(format!("invalid label value: \"{v}\": {e}"))
                                })?;
                                if op == Tok::NotEq {
                                    LabelReq::NotEq(k, v)
                                } else {
                                    LabelReq::Eq(k, v)
                                }
                            }
                        }
                    }
                    Some(Tok::Ident(w)) if w == "in" || w == "notin" => {
                        let neg = w == "notin";
                        i += 1;
                        if toks.get(i) != Some(&Tok::Open) {
                            return Err(ApiError::bad_request(format!(
                                "found '{}', expected: '('",
                                tok_str(toks.get(i))
                            )));
                        }
                        i += 1;
                        let mut set = BTreeSet::new();
                        loop {
                            match toks.get(i) {
                                Some(Tok::Ident(v)) => {
                                    validate_label_value(v).map_err(|e| {
                                        req_err(format!("invalid label value: \"{v}\": {e}"))
                                    })?;
                                    set.insert(v.clone());
                                    i += 1;
                                }
                                Some(Tok::Comma) => i += 1,
                                Some(Tok::Close) => {
                                    i += 1;
                                    break;
                                }
                                other => {
                                    return Err(ApiError::bad_request(format!(
                                        "found '{}', expected: ',', ')' or identifier",
                                        tok_str(other)
                                    )))
                                }
                            }
                        }
                        if set.is_empty() {
                            return Err(req_err(
                                "for 'in', 'notin' operators, values set can't be empty".into(),
                            ));
                        }
                        if neg {
                            LabelReq::NotIn(k, set)
                        } else {
                            LabelReq::In(k, set)
                        }
                    }
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "found '{}', expected: in, notin, =, ==, !=, gt, lt",
                            tok_str(other)
                        )))
                    }
                }
            };
            reqs.push(req);
            match toks.get(i) {
                None => {}
                Some(Tok::Comma) => {
                    i += 1;
                    if i >= toks.len() {
                        return Err(ApiError::bad_request(
                            "found '', expected: identifier after ','",
                        ));
                    }
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "found '{}', expected: ',' or 'end of string'",
                        tok_str(other)
                    )))
                }
            }
        }
        Ok(LabelSelector { reqs })
    }

    /// Whether the selector is empty.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Does an object's `metadata.labels` satisfy the selector?
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let get =
            |k: &str| -> Option<&str> { labels.and_then(|l| l.get(k)).and_then(Value::as_str) };
        self.reqs.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, s) => get(k).is_some_and(|x| s.contains(x)),
            LabelReq::NotIn(k, s) => !get(k).is_some_and(|x| s.contains(x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

fn tok_str(t: Option<&Tok>) -> String {
    match t {
        None => String::new(),
        Some(Tok::Ident(s)) => s.clone(),
        Some(Tok::Not) => "!".into(),
        Some(Tok::Eq) => "=".into(),
        Some(Tok::DoubleEq) => "==".into(),
        Some(Tok::NotEq) => "!=".into(),
        Some(Tok::Gt) => ">".into(),
        Some(Tok::Lt) => "<".into(),
        Some(Tok::Comma) => ",".into(),
        Some(Tok::Open) => "(".into(),
        Some(Tok::Close) => ")".into(),
    }
}

/// One field requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReq {
    /// Field path, e.g. `metadata.name`.
    pub field: String,
    /// Value compared against.
    pub value: String,
    /// `!=` instead of `=`.
    pub negate: bool,
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    /// Requirements (AND).
    pub reqs: Vec<FieldReq>,
}

fn supported_fields(fs: FieldSet) -> &'static [&'static str] {
    match fs {
        FieldSet::Meta => &[],
        FieldSet::PersistentVolume => &[
            "status.phase",
            "spec.claimRef.name",
            "spec.claimRef.namespace",
            "spec.storageClassName",
        ],
        FieldSet::PersistentVolumeClaim => {
            &["status.phase", "spec.volumeName", "spec.storageClassName"]
        }
        FieldSet::Node => &["spec.unschedulable"],
        FieldSet::Namespace => &["status.phase"],
        FieldSet::CoreEvent => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        FieldSet::EventsV1 => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
    }
}

impl FieldSelector {
    /// Parse and check against the fields the resource supports.
    pub fn parse(s: &str, res: &ResourceInfo) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            let ok = field == "metadata.name"
                || field == "metadata.namespace"
                || supported_fields(res.fields).contains(&field);
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push(FieldReq {
                field: field.to_string(),
                value: value.trim().to_string(),
                negate,
            });
        }
        Ok(FieldSelector { reqs })
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Does the object match?
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|r| {
            let actual = field_value(obj, &r.field);
            (actual == r.value) != r.negate
        })
    }
}

fn field_value(obj: &Value, field: &str) -> String {
    if field == "source" {
        // core Event: source.component
        return obj
            .pointer("/source/component")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
    }
    let mut cur = obj;
    for seg in field.split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => {
                return if field == "spec.unschedulable" {
                    "false".into()
                } else {
                    String::new()
                }
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "labels": labels}})
    }

    #[test]
    fn label_selector_ops() {
        let o = obj(json!({"disklet.io/node": "n1", "tier": "fast"}));
        let m = |s: &str| LabelSelector::parse(s).map(|x| x.matches(&o));
        assert_eq!(m("disklet.io/node=n1"), Ok(true));
        assert_eq!(m("disklet.io/node==n2"), Ok(false));
        assert_eq!(m("disklet.io/node!=n2"), Ok(true));
        assert_eq!(m("missing!=x"), Ok(true));
        assert_eq!(m("tier in (slow, fast)"), Ok(true));
        assert_eq!(m("tier notin (slow,fast)"), Ok(false));
        assert_eq!(m("missing notin (x)"), Ok(true));
        assert_eq!(m("tier"), Ok(true));
        assert_eq!(m("!tier"), Ok(false));
        assert_eq!(m("!missing,tier=fast"), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(m("tier in ()").is_err());
        assert!(m("a b").is_err());
        assert!(m("=x").is_err());
        assert!(m("x=,").is_err());
        assert!(m("Bad_Prefix/x=1").is_err());
    }
}
