//! udev-rules/90-disklet.rules loaded into a real udevd: a disk tagged for a
//! class gets its stable /dev/disk/by-disklet/<class>/<id> link, and disklet's
//! scan sees the class property. The tag itself comes from a test rule that
//! runs before ours (as an admin's own rule would), matching only a loop
//! backed by this test's file.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

#[test]
fn the_shipped_rules_make_stable_class_links() {
    if skip_unless_root("the_shipped_rules_make_stable_class_links") {
        return;
    }
    let Some(_udevd) = Udevd::start() else {
        eprintln!("SKIPPED the_shipped_rules_make_stable_class_links: systemd-udevd is not installed (apt-get install udev)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let id = format!("disklet-test-{}", std::process::id());
    let _tag = UdevRule::new(
        &format!("80-{id}.rules"),
        &format!(
            "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"loop*\", ATTR{{loop/backing_file}}==\"{}/*\", ENV{{DISKLET_CLASS}}=\"fast\", ENV{{ID_SERIAL}}=\"{id}\"\n",
            dir.path().display()
        ),
    );
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/udev-rules/90-disklet.rules"
    ))
    .unwrap();
    let _ours = UdevRule::new(&format!("90-disklet-{id}.rules"), &shipped);
    let lp = Loop::new(dir.path(), "tagged", 64);
    lp.assert_ours();
    Udevd::settle();

    let link = std::path::PathBuf::from(format!("/dev/disk/by-disklet/fast/{id}"));
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        lp.dev,
        "the class link leads to our loop"
    );
    let props = sh(&["udevadm", "info", "--query=property", lp.path()]);
    assert!(props.lines().any(|l| l == "DISKLET_CLASS=fast"), "{props}");

    // disklet sees both: a selector on the property and one on the link name it.
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!("mountInfo: /proc/self/mountinfo\nclasses:\n  - name: by-link\n    selector: {{paths: [\"/dev/disk/by-disklet/fast/{id}\"], types: [loop]}}\n"),
    )
    .unwrap();
    let rows = scan_json(&cfg);
    let row = rows.iter().find(|r| r["device"] == lp.path()).unwrap();
    assert_eq!(row["class"], "by-link", "{row}");
    assert!(
        row["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == link.to_str().unwrap()),
        "{row}"
    );

    // An untagged loop gets no class link.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = Loop::new(elsewhere.path(), "plain", 64);
    Udevd::settle();
    let props = sh(&["udevadm", "info", "--query=property", other.path()]);
    assert!(!props.contains("DISKLET_CLASS"), "{props}");
}
