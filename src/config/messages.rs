//! The YAML decoder's errors as a [`Problem`]: the key's path (from
//! `serde_path_to_error`), a message in the words of the file rather than of
//! Rust types, and what to write instead.

use super::schema::{BlankCheck, CleanupMethod, Config, FsType};
use super::{AccessMode, Problem, VolumeMode};
use crate::model::DeviceKind;

/// Decodes the file strictly; the first thing it cannot decode is the problem.
pub(super) fn decode(text: &str) -> Result<Config, Problem> {
    super::decode::decode(text).map_err(|f| problem(f.path, &f.message))
}

/// The problem for a decoder message `raw` at `path` (serde_path_to_error's
/// rendering: `.` for the top level, `?` when not even YAML).
fn problem(path: String, raw: &str) -> Problem {
    let mut key = match path {
        p if p == "." || p.is_empty() => "(top level)".to_string(),
        // Not even a YAML document: the line and column say where.
        p if p == "?" => "(yaml syntax)".to_string(),
        p => p,
    };
    let mut message = plain_message(raw);
    // A list where a plain word is expected: the decoder asks for a YAML
    // tag; name the words instead.
    if let Some(words) = message
        .contains("expected a YAML tag")
        .then(|| enum_words(&key))
        .flatten()
    {
        message = message.replace(
            "expected a YAML tag starting with '!'",
            &format!("expected {words}"),
        );
    }
    let mut field_key = |field: &str| {
        if key == "(top level)" {
            key = field.to_string();
        } else if key != field && !key.ends_with(&format!(".{field}")) {
            key = format!("{key}.{field}");
        }
    };
    let named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|r| r.split_once('`'))
            .map(|(f, _)| f.to_string())
    };
    if let Some(field) = named("duplicate field `") {
        field_key(&field);
        message.push_str("; give each key once");
    } else if let Some(field) = named("missing field `") {
        field_key(&field);
        message.push_str("; it is required");
    } else if let Some((field, hint)) = unknown_field_hint(&message) {
        field_key(&field);
        if let Some(hint) = hint {
            message.push_str(&format!("; did you mean `{hint}`?"));
        }
    }
    Problem { key, message }
}

/// The words an enum key accepts, as serde lists them (`` `xfs` or `ext4` ``).
pub(super) fn enum_words(key: &str) -> Option<String> {
    fn words<T: serde::de::DeserializeOwned>() -> Option<String> {
        use serde::de::value::{Error, StrDeserializer};
        let e = T::deserialize(StrDeserializer::<Error>::new("")).err()?;
        let e = e.to_string();
        let at = e.find("expected ")? + "expected ".len();
        Some(e[at..].to_string())
    }
    let last = key.rsplit('.').next()?;
    let last = last.split('[').next()?;
    match last {
        "volumeMode" => words::<VolumeMode>(),
        "accessMode" => words::<AccessMode>(),
        "fsType" => words::<FsType>(),
        "blankCheck" => words::<BlankCheck>(),
        "cleanup" => words::<CleanupMethod>(),
        "types" => words::<DeviceKind>(),
        _ => None,
    }
}
/// The decoder's message without a path it repeats in front (which, for a
/// value refused by a custom deserializer, names the enclosing mapping rather
/// than the key: the key comes from `serde_path_to_error` instead), and with
/// Rust type names replaced by what to write.
fn plain_message(raw: &str) -> String {
    let mut m = raw;
    if let Some((head, rest)) = raw.split_once(": ") {
        let pathlike = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c));
        if pathlike {
            m = rest;
        }
    }
    if let Some(at) = m.find("unknown field `") {
        m = &m[at..];
    }
    m.replace("unit value", "no value")
        .replace("expected u64", "expected a whole number")
        .replace("expected a sequence", "expected a list, e.g. [a, b]")
        .replace("expected a map", "expected a mapping of key: value")
        .replace("expected a boolean", "expected true or false")
}

/// For an "unknown field `x`, expected one of `a`, `b`" message: the unknown
/// field, and the closest known one if it is close enough to be a typo.
fn unknown_field_hint(message: &str) -> Option<(String, Option<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let hint = expected
        .into_iter()
        .map(|cand| {
            (
                edit_distance(&field.to_lowercase(), &cand.to_lowercase()),
                cand,
            )
        })
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c.to_string());
    Some((field.to_string(), hint))
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
