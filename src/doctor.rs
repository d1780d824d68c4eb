//! `disklet doctor`: checks the node environment and says what is wrong and
//! how to fix it. Read-only.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::host::system::NodeFacts;
use crate::host::udevdb::UdevDb;
use crate::host::Cmd;
use crate::model::quantity::format_bytes;

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
        // The CSI driver's: loop devices of its volumes, online growth.
        ("losetup", "--version", "mount"),
        ("xfs_growfs", "-V", "xfsprogs"),
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

/// Below this memory limit the agent (tens of MiB with its mkfs children)
/// risks the OOM killer; deploy/ gives it 128Mi.
const MEMORY_FLOOR: u64 = 64 << 20;

/// What the node is, as sysinfo reads it: kernel, CPUs, uptime, memory.
pub fn node(facts: &NodeFacts) -> Vec<Check> {
    let kernel = if facts.kernel.is_empty() {
        check(
            Level::Warn,
            "kernel",
            "the kernel release cannot be read",
            "",
        )
    } else {
        let up = facts.uptime_seconds;
        let detail = format!(
            "{} ({}), {} CPUs, up {} h {} min",
            facts.kernel,
            if facts.os.is_empty() {
                "OS image unknown"
            } else {
                &facts.os
            },
            facts.cpus,
            up / 3600,
            up % 3600 / 60
        );
        check(Level::Ok, "kernel", detail, "")
    };
    let mut detail = format!(
        "{} total, {} available",
        format_bytes(facts.memory_total),
        format_bytes(facts.memory_available)
    );
    if let Some(limit) = facts.cgroup_memory_limit {
        detail.push_str(&format!(
            ", the agent's cgroup limit {}",
            format_bytes(limit)
        ));
    }
    let room = facts
        .cgroup_memory_limit
        .unwrap_or(u64::MAX)
        .min(facts.memory_available);
    let memory = if facts.memory_total == 0 {
        check(
            Level::Warn,
            "memory",
            "the node's memory cannot be read",
            "",
        )
    } else if room < MEMORY_FLOOR {
        check(
            Level::Warn,
            "memory",
            detail,
            format!(
                "give the agent at least {} (deploy/ sets limits.memory: 128Mi)",
                format_bytes(MEMORY_FLOOR)
            ),
        )
    } else {
        check(Level::Ok, "memory", detail, "")
    };
    vec![kernel, memory]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            kernel: "6.18.0".into(),
            os: "Debian GNU/Linux 13".into(),
            cpus: 2,
            memory_total: 24 << 30,
            memory_available: 20 << 30,
            cgroup_memory_limit: Some(128 << 20),
            uptime_seconds: 3 * 3600 + 12 * 60,
            boot_time: 0,
        }
    }

    #[test]
    fn node_facts_read_as_an_admin_would() {
        let out = render(&node(&facts()));
        assert!(
            out.contains("OK    kernel  6.18.0 (Debian GNU/Linux 13), 2 CPUs, up 3 h 12 min"),
            "{out}"
        );
        assert!(
            out.contains("OK    memory  24.0 GiB total, 20.0 GiB available, the agent's cgroup limit 128.0 MiB"),
            "{out}"
        );
    }

    #[test]
    fn a_tight_memory_limit_is_a_warning_with_the_fix() {
        let tight = NodeFacts {
            cgroup_memory_limit: Some(32 << 20),
            ..facts()
        };
        let checks = node(&tight);
        assert_eq!(checks[1].level, Level::Warn);
        assert!(
            checks[1].fix.contains("at least 64.0 MiB"),
            "{:?}",
            checks[1]
        );
        let starved = NodeFacts {
            cgroup_memory_limit: None,
            memory_available: 10 << 20,
            ..facts()
        };
        assert_eq!(node(&starved)[1].level, Level::Warn);
        let unknown = NodeFacts::default();
        assert!(node(&unknown).iter().all(|c| c.level == Level::Warn));
    }
}
