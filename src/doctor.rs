//! `disklet doctor`: checks the node environment and says what is wrong and
//! how to fix it. Read-only.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::host::udevdb::UdevDb;
use crate::host::Cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub level: Level,
    pub name: String,
    pub detail: String,
    /// What to do about it (empty when all is well).
    pub fix: String,
}

fn check(level: Level, name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level,
        name: name.into(),
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// The tools disklet runs.
pub fn tools() -> Vec<Check> {
    [
        ("mkfs.xfs", "-V", "xfsprogs"),
        ("mkfs.ext4", "-V", "e2fsprogs"),
        ("wipefs", "--version", "util-linux"),
    ]
    .into_iter()
    .map(
        |(tool, flag, pkg)| match Cmd::new(tool).arg(flag).output() {
            Ok(out) => {
                let first = out.lines().next().unwrap_or("").trim();
                check(
                    Level::Ok,
                    tool,
                    if first.is_empty() { "present" } else { first },
                    "",
                )
            }
            // mke2fs -V prints to stderr and exits 0; any spawn failure is the real problem.
            Err(crate::host::CmdError::Spawn { .. }) => check(
                Level::Fail,
                tool,
                "not found",
                format!("install {pkg} (the image ships it; on a host: apt-get install {pkg})"),
            ),
            Err(e) => check(Level::Warn, tool, e.to_string(), ""),
        },
    )
    .collect()
}

/// Host-side checks: udev, the mount table, the directories.
pub fn host(cfg: &Config, udev: &UdevDb) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(if udev.active() {
        check(Level::Ok, "udev", format!("udevd answers on {}/control: properties and /dev/disk links are used", udev.run_dir.display()), "")
    } else {
        check(
            Level::Warn,
            "udev",
            "udevd not reachable: kernel uevents only; selectors on udev properties or /dev/disk links match nothing",
            format!("mount the host's {} into the pod read-only (and hostNetwork for udev events), or select disks by device node", udev.run_dir.display()),
        )
    });
    match crate::host::mountinfo::read_lossy(&cfg.mount_info) {
        Err(e) => out.push(check(
            Level::Fail,
            "mount table",
            format!("{}: {e}", cfg.mount_info.display()),
            "run as root with hostPID: true, or set mountInfo",
        )),
        Ok(text) => {
            let mounts = crate::host::mountinfo::parse_mountinfo(&text);
            let root_is_block = mounts
                .iter()
                .rev()
                .find(|m| m.mount_point == Path::new("/"))
                .is_some_and(|m| {
                    m.source.starts_with("/dev/")
                        || std::path::Path::new(&format!("/sys/dev/block/{}", m.devno)).exists()
                });
            out.push(if root_is_block {
                check(Level::Ok, "mount table", format!("{}: {} mounts, / is on a block device", cfg.mount_info.display(), mounts.len()), "")
            } else {
                check(Level::Fail, "mount table", format!("{}: / is not on a block device: this is a container's table, not the host's; nothing will be formatted", cfg.mount_info.display()), "set hostPID: true in the DaemonSet (mountInfo: /proc/1/mountinfo)")
            });
            let tags =
                crate::host::mountinfo::propagation_of(&text, &cfg.host_dir).unwrap_or_default();
            out.push(if tags.contains("shared:") {
                check(Level::Ok, "hostDir propagation", format!("{} is on a shared mount ({tags})", cfg.host_dir.display()), "")
            } else {
                check(
                    Level::Warn,
                    "hostDir propagation",
                    format!("{} is on a mount that is not shared ({}): disklet's mounts would not reach the host and kubelet", cfg.host_dir.display(), if tags.is_empty() { "private" } else { tags.as_str() }),
                    "in the DaemonSet use mountPropagation: Bidirectional for hostDir; on a host: mount --make-rshared /",
                )
            });
        }
    }
    out.push(if cfg.kubelet_dir.is_dir() {
        check(Level::Ok, "kubelet dir", format!("{} present", cfg.kubelet_dir.display()), "")
    } else {
        check(Level::Warn, "kubelet dir", format!("{} is missing: pods' mounts of volumes cannot be seen, so released volumes are cleaned without that check", cfg.kubelet_dir.display()), "mount the host's kubelet dir read-only with mountPropagation: HostToContainer, or set kubeletDir")
    });
    out
}

/// The API permissions disklet needs, checked with SelfSubjectAccessReviews.
pub const NEEDED: &[(&str, &str, &str)] = &[
    ("", "persistentvolumes", "get"),
    ("", "persistentvolumes", "list"),
    ("", "persistentvolumes", "watch"),
    ("", "persistentvolumes", "create"),
    ("", "persistentvolumes", "patch"),
    ("", "persistentvolumes", "delete"),
    ("storage.k8s.io", "storageclasses", "get"),
    ("", "nodes", "get"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

pub async fn api(client: kube::Client, node: Option<&str>) -> Vec<Check> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    use kube::api::{Api, PostParams};
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => out.push(check(
            Level::Ok,
            "API server",
            format!("reachable, Kubernetes {}.{}", v.major, v.minor),
            "",
        )),
        Err(e) => {
            out.push(check(Level::Fail, "API server", e.to_string(), "check KUBECONFIG (outside a pod) or the ServiceAccount token and network policy (in a pod)"));
            return out;
        }
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (group, resource, verb) in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some((*group).into()),
                    resource: Some((*resource).into()),
                    verb: Some((*verb).into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(format!("{verb} {resource}")),
            Err(e) => denied.push(format!("{verb} {resource} (review failed: {e})")),
        }
    }
    out.push(if denied.is_empty() {
        check(
            Level::Ok,
            "RBAC",
            format!("all {} permissions granted", NEEDED.len()),
            "",
        )
    } else {
        check(
            Level::Fail,
            "RBAC",
            format!("denied: {}", denied.join(", ")),
            "apply deploy/ (ClusterRole disklet) or grant these verbs to disklet's ServiceAccount",
        )
    });
    if let Some(node) = node {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
        out.push(match nodes.get_opt(node).await {
            Ok(Some(_)) => check(Level::Ok, "Node", format!("{node} exists"), ""),
            Ok(None) => check(Level::Fail, "Node", format!("{node} not found"), "pass this node's name with --node-name (NODE_NAME from spec.nodeName in the DaemonSet)"),
            Err(e) => check(Level::Warn, "Node", e.to_string(), ""),
        });
    }
    out
}

pub fn render(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for c in checks {
        let tag = match c.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        s.push_str(&format!("{tag}  {:<w$}  {}\n", c.name, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("      {:<w$}  fix: {}\n", "", c.fix));
        }
    }
    s
}
