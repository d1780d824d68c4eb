//! The shape of `src/` (ARCHITECTURE.md), checked so that a change that
//! breaks it fails CI: which layer may name which, no file over 600 lines, no
//! function over 80 (named tables of data excepted), every Event reason
//! documented.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which top-level modules each layer may name (`crate::<module>`), besides
/// itself. Layers not listed (the agent loop, scan, doctor, main) may name
/// any.
const MAY_NAME: &[(&str, &[&str])] = &[
    // Plain data and the vocabulary: nothing.
    ("model", &[]),
    // The configuration's schema and validation: the data it is made of.
    ("config", &["model"]),
    // Pure decisions: data and configuration, no I/O.
    ("plan", &["model", "config"]),
    // The node: reads and writes the host; decides nothing.
    ("host", &["model", "config", "failpoint"]),
    // The API server.
    ("k8s", &["model", "config"]),
    // The CSI driver: the pools' volumes, served over gRPC; never the
    // agent's plan or the API.
    ("csi", &["model", "config", "host"]),
];

/// Pairs of files in one layer that must not name each other.
const APART: &[(&str, &str)] = &[("plan/provision.rs", "plan/recycle.rs")];

/// Files allowed past `MAX_FILE_LINES` (none now).
const LONG_FILES: &[&str] = &[];
const MAX_FILE_LINES: usize = 600;

/// Functions allowed past `MAX_FN_LINES`: tables of data, by `file:name`.
const LONG_FNS: &[&str] = &[];
const MAX_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("src/ entry is readable").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Each file under `src/`, relative (`plan/provision.rs`), with its text.
fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    assert!(files.len() > 20, "src/ not found: {}", src().display());
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(src())
                .expect("a file under src/")
                .to_string_lossy()
                .into_owned();
            (
                rel,
                std::fs::read_to_string(&p).expect("source is readable"),
            )
        })
        .collect()
}

/// The text with comments, string and char literals blanked (lines kept),
/// so that paths and braces are only those of the code.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if c == b'r' && (next == Some(b'"') || next == Some(b'#')) && raw_start(b, i) {
            // r"…" or r#"…"#
            let mut hashes = 0;
            i += 1;
            while b[i] == b'#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == b'"' && b[i + 1..].iter().take(hashes).all(|&h| h == b'#') {
                    i += 1 + hashes;
                    break;
                }
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' && is_char_literal(b, i) {
            let end = b[i + 1..].iter().position(|&x| x == b'\'').unwrap_or(0) + i + 1;
            let end = if b[i + 1] == b'\\' && b[i + 2] == b'\'' {
                i + 3
            } else {
                end
            };
            i = end + 1;
            out.push_str("' '");
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn raw_start(b: &[u8], i: usize) -> bool {
    let ident_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    if ident_before {
        return false;
    }
    let mut j = i + 1;
    while j < b.len() && b[j] == b'#' {
        j += 1;
    }
    j < b.len() && b[j] == b'"'
}

/// A char literal (`'a'`, `'\n'`, `'\''`), not a lifetime (`'a`).
fn is_char_literal(b: &[u8], i: usize) -> bool {
    match (b.get(i + 1), b.get(i + 2), b.get(i + 3)) {
        (Some(b'\\'), _, _) => true,
        (Some(_), Some(b'\''), _) => true,
        // A multi-byte UTF-8 char.
        (Some(&x), _, _) if x >= 0x80 => true,
        _ => false,
    }
}

/// The part of a file before its unit tests.
fn before_tests(code: &str) -> &str {
    match code.find("#[cfg(test)]") {
        Some(i) => &code[..i],
        None => code,
    }
}

/// The layer of a file: its top-level module (`plan/provision.rs` → `plan`).
fn layer(rel: &str) -> &str {
    let first = rel.split('/').next().unwrap_or(rel);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// The top-level modules a file names through `crate::`.
fn named_layers(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn each_layer_names_only_the_layers_below_it() {
    let mut wrong = Vec::new();
    for (rel, text) in sources() {
        let l = layer(&rel);
        let Some((_, may)) = MAY_NAME.iter().find(|(name, _)| *name == l) else {
            continue;
        };
        let code = code_only(&text);
        for named in named_layers(&code) {
            if named != l && !may.contains(&named.as_str()) {
                wrong.push(format!("src/{rel} names crate::{named}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layering broken (ARCHITECTURE.md, \"Layers\"):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_rule_sees_what_it_must() {
    // The checker itself: a use, a path in code, a group; not a comment or
    // a string.
    let code = code_only(
        "use crate::host::x;\nfn f() { crate::k8s::y(); }\nuse crate::{plan::a, config};\n// crate::scan\nlet s = \"crate::doctor\";\nlet c = '\"'; let t = 'a';\n",
    );
    let got: Vec<String> = named_layers(&code).into_iter().collect();
    assert_eq!(got, ["config", "host", "k8s", "plan"]);
    assert_eq!(layer("plan/provision.rs"), "plan");
    assert_eq!(layer("scan.rs"), "scan");
}

#[test]
fn files_kept_apart_do_not_name_each_other() {
    let all = sources();
    for (a, b) in APART {
        for (from, to) in [(a, b), (b, a)] {
            let text = &all.iter().find(|(r, _)| r == from).expect(from).1;
            let code = code_only(text);
            let module = to.trim_end_matches(".rs").replace('/', "::");
            let sibling = to.rsplit('/').next().unwrap_or(to).trim_end_matches(".rs");
            assert!(
                !code.contains(&format!("crate::{module}"))
                    && !code.contains(&format!("super::{sibling}")),
                "src/{from} names src/{to}: what both need goes in plan/action.rs or model/"
            );
        }
    }
}

#[test]
fn no_file_is_over_600_lines() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter(|(rel, _)| !LONG_FILES.contains(&rel.as_str()))
        .filter_map(|(rel, text)| {
            let n = text.lines().count();
            (n > MAX_FILE_LINES).then(|| format!("src/{rel}: {n} lines"))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines:\n  {}",
        long.join("\n  ")
    );
}

/// Every function outside unit tests, as (file:name, lines).
fn functions(rel: &str, code: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let mut depth = 0i32;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !opened && l.contains(';') && !l.contains('{') {
                break; // a declaration without a body
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((format!("{rel}:{name}"), j - i + 1));
                break;
            }
        }
    }
    out
}

fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let w = w
            .trim_start_matches("pub(crate)")
            .trim_start_matches("pub(super)");
        match w {
            "pub" | "async" | "const" | "unsafe" | "" => continue,
            "fn" => {
                let name: String = words
                    .next()?
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return Some(name);
            }
            _ => return None,
        }
    }
    None
}

#[test]
fn no_function_is_over_80_lines() {
    let mut long = Vec::new();
    for (rel, text) in sources() {
        let code = code_only(&text);
        for (name, n) in functions(&rel, before_tests(&code)) {
            if n > MAX_FN_LINES && !LONG_FNS.contains(&name.as_str()) {
                long.push(format!("src/{name}: {n} lines"));
            }
        }
    }
    long.sort();
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them, or name a table of data in LONG_FNS):\n  {}",
        long.join("\n  ")
    );
}

#[test]
fn the_length_rule_counts_bodies() {
    let code = code_only("fn a() {\n    let s = \"}\";\n}\npub async fn b(x: u8) -> u8 {\n    if x > 0 { 1 } else { 2 }\n}\nfn decl();\n");
    assert_eq!(
        functions("x.rs", &code),
        [("x.rs:a".to_string(), 3), ("x.rs:b".to_string(), 3)]
    );
}

#[test]
fn every_event_reason_is_documented() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md is readable");
    let missing: Vec<&str> = disklet::model::reasons::event::ALL
        .iter()
        .copied()
        .filter(|r| !readme.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "Event reasons not in README: {missing:?}"
    );
}

#[test]
fn event_reasons_are_named_only_in_the_vocabulary() {
    // An Event reason written as a literal elsewhere would escape the list
    // the README is checked against.
    let mut stray = Vec::new();
    for (rel, text) in sources() {
        if rel == "model/reasons.rs" {
            continue;
        }
        let body = before_tests(&text);
        for r in disklet::model::reasons::event::ALL {
            if body.contains(&format!("\"{r}\"")) {
                stray.push(format!("src/{rel}: \"{r}\""));
            }
        }
        // A reason not in the list at all, where reasons are written.
        for shape in ["report(true, \"", "report(false, \"", "reason: \""] {
            for (i, _) in body.match_indices(shape) {
                let rest = &body[i + shape.len()..];
                let word: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
                stray.push(format!("src/{rel}: \"{word}\""));
            }
        }
    }
    assert!(stray.is_empty(), "use model::reasons::event: {stray:?}");
}
