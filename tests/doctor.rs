//! `disklet doctor` against the fake API server: what an admin reads when the
//! node or the RBAC is not right.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

fn doctor(env: &support::agent::Env, cfg: &std::path::Path, node: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args([
            "doctor",
            "--config",
            cfg.to_str().unwrap(),
            "--node-name",
            node,
        ])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_what_is_wrong_and_how_to_fix_it() {
    let env = support::agent::env().await;
    let d = env.path();
    std::fs::create_dir_all(d.join("kubelet")).unwrap();
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "hostDir: {0}/hostdir\nkubeletDir: {0}/kubelet\nclasses: []\n",
            d.display()
        ),
    )
    .unwrap();

    let (code, out) = doctor(&env, &cfg, "node-a");
    for want in [
        "OK    mkfs.xfs",
        "API server",
        "OK    RBAC",
        "all 10 permissions granted",
        "OK    Node",
        "OK    kubelet dir",
        "OK    memory",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(out.contains("hostDir propagation"), "{out}");
    // The node's facts are this machine's.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        out.lines().any(
            |l| l.starts_with("OK    kernel ") && l.contains(&format!(" {} (", release.trim()))
        ),
        "{out}"
    );
    assert_eq!(code, 0, "warnings only:\n{out}");

    env.server.deny("delete", "persistentvolumes");
    let (code, out) = doctor(&env, &cfg, "node-zz");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  RBAC") && out.contains("denied: delete persistentvolumes"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  Node") && out.contains("node-zz not found"),
        "{out}"
    );
    assert!(out.contains("fix: apply deploy/"), "{out}");

    std::fs::write(&cfg, "classes: [{name: Bad}]\n").unwrap();
    let (code, _) = doctor(&env, &cfg, "node-a");
    assert_eq!(code, 2, "a bad config is a config error");
}
