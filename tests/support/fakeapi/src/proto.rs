//! Just enough protobuf decoding for the one request kubectl always sends as
//! protobuf: `SelfSubjectAccessReview` (`kubectl auth can-i`).

use serde_json::{json, Map, Value};

enum Wire<'a> {
    Varint,
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (field, wt) = (key >> 3, key & 7);
        match wt {
            0 => {
                varint(buf, &mut pos)?;
                out.push((field, Wire::Varint));
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                out.push((field, Wire::Bytes(buf.get(pos..end)?)));
                pos = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn sub(buf: &[u8], n: u64) -> Option<&[u8]> {
    fields(buf)?.into_iter().find_map(|(f, w)| match w {
        Wire::Bytes(b) if f == n => Some(b),
        _ => None,
    })
}

/// Decode a protobuf-encoded SelfSubjectAccessReview into its JSON form.
pub fn decode_ssar(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(b"k8s\0")?;
    let raw = sub(unknown, 2)?;
    let spec = sub(raw, 2).unwrap_or(&[]);
    let mut spec_json = Map::new();
    if let Some(ra) = sub(spec, 1) {
        let names = [
            "namespace",
            "verb",
            "group",
            "version",
            "resource",
            "subresource",
            "name",
        ];
        let mut m = Map::new();
        for (f, w) in fields(ra)? {
            if let (Wire::Bytes(b), Some(name)) = (w, names.get((f as usize).wrapping_sub(1))) {
                m.insert((*name).to_string(), json!(String::from_utf8_lossy(b)));
            }
        }
        spec_json.insert("resourceAttributes".into(), Value::Object(m));
    }
    if let Some(nra) = sub(spec, 2) {
        let mut m = Map::new();
        for (f, w) in fields(nra)? {
            if let Wire::Bytes(b) = w {
                let k = if f == 1 { "path" } else { "verb" };
                m.insert(k.into(), json!(String::from_utf8_lossy(b)));
            }
        }
        spec_json.insert("nonResourceAttributes".into(), Value::Object(m));
    }
    Some(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {},
        "spec": spec_json,
    }))
}
