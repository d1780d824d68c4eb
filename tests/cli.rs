//! The `disklet` binary as an admin runs it.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn disklet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn scan_without_config_lists_every_device_as_unclaimed() {
    let out = disklet(&["scan", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let sys = std::fs::read_dir("/sys/class/block").unwrap().count();
    assert!(
        !rows.is_empty() && rows.len() <= sys,
        "{} rows, {sys} in sysfs",
        rows.len()
    );
    for r in &rows {
        assert_eq!(r["verdict"], "refused", "{r}");
        assert_eq!(r["reason"], "no-class-matches", "{r}");
        assert!(r["class"].is_null());
        for key in ["device", "size_bytes", "signature"] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
    }
}

#[test]
fn scan_table_and_yaml_render() {
    let table = || {
        let out = disklet(&["scan"]);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("DEVICE"), "{text}");
        let mut devices: Vec<String> = text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        devices.sort();
        devices
    };
    // The machine's devices can change between two scans (a loop of an
    // earlier test detaches once its last user closes it): compare a YAML
    // scan with the table only when the table is the same before and after.
    for _ in 0..20 {
        let before = table();
        let yaml = disklet(&["scan", "-o", "yaml"]);
        let rows: Vec<serde_json::Value> = serde_saphyr::from_slice(&yaml.stdout).unwrap();
        if table() != before {
            continue;
        }
        let mut devices: Vec<String> = rows
            .iter()
            .map(|r| r["device"].as_str().unwrap().to_string())
            .collect();
        devices.sort();
        assert_eq!(
            devices, before,
            "one table line per device, the same devices"
        );
        return;
    }
    panic!("the machine's block devices changed during each of 20 scans");
}

#[test]
fn a_bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "classes:\n  - name: fast\n    selector: {paths: [/dev/sdz], minSize: 10GB}\n",
    )
    .unwrap();
    let out = disklet(&["scan", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("classes[0].selector.minSize") && err.contains(cfg.to_str().unwrap()),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is scanned with a bad config"
    );

    let out = disklet(&[
        "scan",
        "--config",
        dir.path().join("missing.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));

    let out = disklet(&["scan", "--output", "xml"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "bad flags are config errors too"
    );
}

#[test]
fn version_names_the_commit() {
    let out = disklet(&["--version"]);
    let v = String::from_utf8(out.stdout).unwrap();
    assert!(
        v.starts_with(concat!("disklet ", env!("CARGO_PKG_VERSION"), " (commit ")),
        "{v}"
    );
}

/// `disklet run` with no class would run and do nothing forever: refused
/// as a config error (exit 2), before any API call.
#[test]
fn run_without_classes_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for text in ["classes: []\n", "hostDir: /var/lib/disklet\n"] {
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_disklet"))
            .args(["run", "--config", f.to_str().unwrap(), "--node-name", "n"])
            .env("KUBECONFIG", dir.path().join("none"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains("classes: none configured"), "{err}");
    }
}
