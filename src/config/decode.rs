//! Reading the file with serde-saphyr, and its errors put in the words the
//! messages use: serde's own `invalid type: sequence, expected a string`,
//! `` unknown field `x`, expected one of `a`, `b` ``, `at line L column C`,
//! whatever the decoder's phrasing, so that the hints in [`super::messages`]
//! apply.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_saphyr::Error;

use super::schema::Config;

/// Strict YAML 1.2: `yes` is a string, a key given twice is an error, and the
/// message carries no snippet of the file (the key path says where).
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    }
}

/// Where decoding stopped and the decoder's message, serde-style.
pub(super) struct Failure {
    /// serde_path_to_error's path: `.` for the top level, `?` for a syntax
    /// error, `classes[0].fsType`.
    pub path: String,
    pub message: String,
}

pub(super) fn decode(text: &str) -> Result<Config, Failure> {
    let mut track = serde_path_to_error::Track::new();
    let decoded = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        Config::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    });
    decoded.map_err(|e| {
        let path = track.path().to_string();
        describe(text, path, &e)
    })
}

fn describe(text: &str, path: String, e: &Error) -> Failure {
    let at = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| format!(" at line {} column {}", l.line(), l.column()))
        .unwrap_or_default();
    let (path, message) = match serde_message(e) {
        Some(message) => (path, message),
        None => parser_message(text, path, e),
    };
    Failure {
        path,
        message: format!("{message}{at}"),
    }
}

/// The errors serde's derived code raised, worded as serde words them.
fn serde_message(e: &Error) -> Option<String> {
    Some(match e {
        Error::SerdeUnknownField {
            field, expected, ..
        } => format!("unknown field `{field}`, expected {}", one_of(expected)),
        Error::SerdeUnknownVariant {
            variant, expected, ..
        } => format!("unknown variant `{variant}`, expected {}", one_of(expected)),
        Error::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        Error::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => format!("invalid value: {unexpected}, expected {expected}"),
        Error::SerdeMissingField { field, .. } => format!("missing field `{field}`"),
        Error::Message { msg, .. } => msg.clone(),
        _ => return None,
    })
}

/// The errors the YAML reader raised, with the value found at the path.
fn parser_message(text: &str, path: String, e: &Error) -> (String, String) {
    let found = || found_at(text, &path);
    match e {
        Error::DuplicateMappingKey { key, .. } => {
            let key = key.as_deref().unwrap_or("?");
            let at_key = path.trim_end_matches('?').trim_end_matches('.');
            let at_key = if at_key.is_empty() { "." } else { at_key };
            (at_key.to_string(), format!("duplicate field `{key}`"))
        }
        Error::Unexpected { expected, .. } => {
            let expected = match *expected {
                "sequence start" => "a sequence",
                "mapping start" => "a map",
                "string scalar" if is_path_key(&path) => "path string",
                "string scalar" => "a string",
                other => other,
            };
            let message = format!("invalid type: {}, expected {expected}", found());
            (path, message)
        }
        Error::InvalidScalar { ty, .. } => {
            let message = format!("invalid type: {}, expected {ty}", found());
            (path, message)
        }
        Error::InvalidBooleanStrict { .. } => {
            let message = format!("invalid type: {}, expected a boolean", found());
            (path, message)
        }
        Error::NullIntoString { .. } => (
            path,
            "invalid type: unit value, expected a string".to_string(),
        ),
        Error::ExternallyTaggedEnumExpectedScalarOrMapping { .. } => {
            let message = format!(
                "invalid type: {}, expected a YAML tag starting with '!'",
                found()
            );
            (path, message)
        }
        Error::MultipleDocuments { .. } => (
            ".".to_string(),
            "the file holds more than one YAML document; give one".to_string(),
        ),
        // The parser's own errors (and anything else): not a key's value.
        other => ("?".to_string(), without_location(&other.to_string())),
    }
}

/// The keys that hold a path (serde names them `path string`).
fn is_path_key(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let last = last.split('[').next().unwrap_or(last);
    matches!(
        last,
        "hostDir" | "kubeletDir" | "mountInfo" | "discoveryDirs"
    )
}

/// serde's list of the accepted names: `` `a` ``, `` `a` or `b` ``,
/// `` one of `a`, `b`, `c` ``.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_string(),
        [a] => format!("`{a}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        all => format!(
            "one of {}",
            all.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The decoder's message without its trailing `at line L, column C`.
fn without_location(m: &str) -> String {
    match m.rfind(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

/// What the file holds at `path`, as serde names it (`sequence`,
/// `` integer `-1` ``, `string "abc"`); `a value` when it cannot be found.
fn found_at(text: &str, path: &str) -> String {
    let root = serde_saphyr::from_str_with_options::<Node>(text, options()).ok();
    root.as_ref()
        .and_then(|n| n.at(path))
        .map(Node::unexpected)
        .unwrap_or_else(|| "a value".to_string())
}

/// Any YAML node, to describe what was found where something else was expected.
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// The node at a serde_path_to_error path: `classes[0].selector.udev.A B`
    /// (a mapping key may itself hold `.` or `[`: the longest key that fits
    /// is taken).
    fn at(&self, path: &str) -> Option<&Node> {
        let path = path.trim_start_matches('.');
        if path.is_empty() {
            return Some(self);
        }
        match self {
            Node::Seq(items) => {
                let rest = path.strip_prefix('[')?;
                let (i, rest) = rest.split_once(']')?;
                items.get(i.parse::<usize>().ok()?)?.at(rest)
            }
            Node::Map(entries) => entries
                .iter()
                .filter(|(k, _)| {
                    path.strip_prefix(k.as_str())
                        .is_some_and(|r| r.is_empty() || r.starts_with(['.', '[']))
                })
                .max_by_key(|(k, _)| k.len())
                .and_then(|(k, v)| v.at(&path[k.len()..])),
            _ => None,
        }
    }

    fn unexpected(&self) -> String {
        match self {
            Node::Null => Unexpected::Unit.to_string(),
            Node::Bool(b) => Unexpected::Bool(*b).to_string(),
            Node::Int(i) => match i64::try_from(*i) {
                Ok(i) => Unexpected::Signed(i).to_string(),
                Err(_) => format!("integer `{i}` as i128"),
            },
            Node::Float(f) => Unexpected::Float(*f).to_string(),
            Node::Str(s) => Unexpected::Str(s).to_string(),
            Node::Seq(_) => Unexpected::Seq.to_string(),
            Node::Map(_) => Unexpected::Map.to_string(),
        }
    }

    fn key(self) -> String {
        match self {
            Node::Str(s) => s,
            Node::Null => String::new(),
            Node::Bool(b) => b.to_string(),
            Node::Int(i) => i.to_string(),
            Node::Float(f) => f.to_string(),
            Node::Seq(_) | Node::Map(_) => "?".to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Node, E> {
        Ok(Node::Int(i.into()))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Node, E> {
        Ok(Node::Int(u.into()))
    }
    fn visit_i128<E>(self, i: i128) -> Result<Node, E> {
        Ok(Node::Int(i))
    }
    fn visit_u128<E>(self, u: u128) -> Result<Node, E> {
        Ok(i128::try_from(u).map_or(Node::Float(u as f64), Node::Int))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Node, E> {
        Ok(Node::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Str(s.to_string()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = a.next_element()? {
            items.push(n);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = a.next_entry::<Node, Node>()? {
            entries.push((k.key(), v));
        }
        Ok(Node::Map(entries))
    }
}
