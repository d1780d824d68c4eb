//! The agent under API trouble (fake API server faults): an outage, dropped
//! watches and a 410 on re-watch. It keeps its mounts, never deletes or
//! rewrites a PV because it could not see it, backs off instead of hammering,
//! and carries on after recovery.
#![allow(clippy::unwrap_used)]

mod support;

use disklet_fakeapi::{OutageKind, Verb};
use support::agent::{Agent, MountSweeper};
use support::*;

const SEL: &str = "disklet.io/node=node-a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_and_lost_watches_change_nothing_and_are_survived() {
    if skip_unless_root("an_outage_and_lost_watches_change_nothing_and_are_survived") {
        return;
    }
    let env = support::agent::env().await;
    let _sweep = MountSweeper(env.path().to_path_buf());
    let d = env.path().display().to_string();
    let cfg = format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n"
    );
    let agent = Agent::start(&env, "agent", "node-a", &cfg);
    let _a = Loop::new(&env.path().join("disks"), "a", 320);
    let before = env.wait_pvs(SEL, "the first PV", |p| p.len() == 1).await;
    let mounts_before = MountSweeper::mounts_under(&env.path().join("hostdir"));
    assert_eq!(mounts_before.len(), 1);

    // A full outage, while the host keeps producing events (a new disk).
    env.server.clear_requests();
    env.server.faults().outage(OutageKind::ServiceUnavailable);
    let _b = Loop::new(&env.path().join("disks"), "b", 320);
    for _ in 0..3 {
        agent.wait_log("reconcile failed");
    }
    let during = env.server.requests().len();
    env.server.faults().end_outage();
    agent.wait_log("reconcile recovered");

    // Recovered: the new disk is published, the old PV untouched, mounts kept.
    let after = env.wait_pvs(SEL, "both PVs", |p| p.len() == 2).await;
    let old = after
        .iter()
        .find(|p| p.metadata.name == before[0].metadata.name)
        .unwrap();
    assert_eq!(old.metadata.uid, before[0].metadata.uid);
    assert_eq!(
        old.metadata.resource_version, before[0].metadata.resource_version,
        "not rewritten"
    );
    assert!(
        MountSweeper::mounts_under(&env.path().join("hostdir")).contains(&mounts_before[0]),
        "mounts kept through the outage"
    );

    // Lost watches and a 410 on re-watch: the reflector relists, still nothing is deleted.
    env.server.faults().expire_next_watch(None);
    env.server.faults().drop_watches();
    let _c = Loop::new(&env.path().join("disks"), "c", 320);
    env.wait_pvs(SEL, "three PVs", |p| p.len() == 3).await;

    let reqs = env.server.requests();
    let pv_deletes = reqs
        .iter()
        .filter(|r| {
            r.resource.as_deref() == Some("persistentvolumes") && r.verb == Some(Verb::Delete)
        })
        .count();
    assert_eq!(pv_deletes, 0, "never deletes a PV it could not see");
    let unscoped = reqs.iter().filter(|r| {
        r.resource.as_deref() == Some("persistentvolumes")
            && matches!(r.verb, Some(Verb::List | Verb::Watch))
            && r.user_agent.as_deref().is_none_or(|u| !u.contains("test"))
            && r.label_selector
                .as_deref()
                .is_none_or(|s| !s.contains("disklet.io/node="))
    });
    // (the test's own watches are scoped too, so every PV read must be)
    assert_eq!(unscoped.count(), 0);
    eprintln!("requests during the outage (3 failed reconciles): {during}");
    assert!(
        during < 60,
        "backs off instead of hammering: {during} requests"
    );
    drop(agent);
}
