//! Crash points: the real `disklet run` binary killed with SIGKILL at every
//! step of provisioning, withdrawal and cleanup (`src/failpoint.rs`), then a
//! new agent started on the same node. For every point the suite checks what
//! a user relies on after a power cut or an OOM kill:
//!
//! - exactly one PV per volume, and each PV's path is the one mount of its disk;
//! - no disk formatted twice (a filesystem made before the kill survives it);
//! - the data of a Bound volume on the same node is never touched;
//! - a released volume is never published again before it was cleaned (every
//!   PV update the test's watch sees is checked, not only the end state).
//!
//! Needs the `failpoints` feature (the README's test command enables it).
#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use disklet::failpoint::POINTS;
use k8s_openapi::api::core::v1::PersistentVolume;
use support::agent::{blkid, Agent, Env, MountSweeper};
use support::binder::{self, Binder};
use support::*;

const SEL: &str = "disklet.io/node=node-a";
const T: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> String {
    format!(
        "hostDir: {d}/hostdir\nkubeletDir: {d}/kubelet\nmountInfo: /proc/self/mountinfo\nclasses:\n  - name: fast\n    storageClassName: local-fast\n    settleSeconds: 0\n    selector: {{backingFiles: [\"{d}/disks/*.img\"], types: [loop]}}\n  - name: dirs\n    storageClassName: local-dirs\n    discoveryDirs: [{d}/discovery]\n",
        d = dir.display()
    )
}

fn name_of(pv: &PersistentVolume) -> String {
    pv.metadata.name.clone().unwrap()
}

fn uid_of(pv: &PersistentVolume) -> String {
    pv.metadata.uid.clone().unwrap()
}

fn path_of(pv: &PersistentVolume) -> PathBuf {
    PathBuf::from(&pv.spec.as_ref().unwrap().local.as_ref().unwrap().path)
}

fn phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn device_id(pv: &PersistentVolume) -> String {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("disklet.io/device-id"))
        .cloned()
        .unwrap_or_default()
}

fn id_of(l: &Loop) -> String {
    format!("loop-file:{}", l.file.display())
}

/// Where the loop's filesystem is mounted, per the kernel.
fn mounts_of(l: &Loop, under: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(&l.dev).unwrap().rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    disklet::host::mountinfo::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| {
            u64::from(m.devno.major) == major
                && u64::from(m.devno.minor) == minor
                && m.mount_point.starts_with(under)
        })
        .map(|m| m.mount_point)
        .collect()
}

/// Log lines of a finished agent that say a given device was formatted.
fn formatted_lines(log: &Path, dev: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(" formatted") && mentions(l, dev))
        .count()
}

/// Whether `line` names the device `dev` (`loop1` must not match `loop12`).
fn mentions(line: &str, dev: &str) -> bool {
    line.match_indices(dev).any(|(i, _)| {
        !line[i + dev.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// One node's world: the fake API server, the binder, and a Bound volume
/// full of a tenant's data that no crash anywhere may touch.
struct World {
    env: Env,
    _binder: Binder,
    cfg: String,
    keeper: Loop,
    keeper_pv: PersistentVolume,
    keeper_uuid: String,
    // Last: mounts go before the loops' files.
    _sweep: MountSweeper,
}

async fn world() -> (World, Agent) {
    let env = support::agent::env().await;
    env.server
        .store()
        .create(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "local-dirs"},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete"
        }))
        .await
        .unwrap();
    std::fs::create_dir_all(env.path().join("discovery")).unwrap();
    let sweep = MountSweeper(env.path().to_path_buf());
    let binder = Binder::start(env.client.clone());
    let cfg = config(env.path());
    let agent = Agent::start(&env, "setup", "node-a", &cfg);
    let keeper = Loop::new(&env.path().join("disks"), "keeper", 320);
    env.wait_pvs(SEL, "the keeper's PV", |p| {
        p.iter().any(|pv| device_id(pv) == id_of(&keeper))
    })
    .await;
    binder::claim(
        &env.client,
        "default",
        "keep",
        "local-fast",
        "100Mi",
        Some("node-a"),
    )
    .await
    .unwrap();
    let keeper_pv = binder::wait_bound(&env.client, "default", "keep", T)
        .await
        .unwrap();
    std::fs::write(path_of(&keeper_pv).join("precious"), "tenant data").unwrap();
    let keeper_uuid = blkid(keeper.path(), "UUID");
    assert!(!keeper_uuid.is_empty());
    let w = World {
        env,
        _binder: binder,
        cfg,
        keeper,
        keeper_pv,
        keeper_uuid,
        _sweep: sweep,
    };
    (w, agent)
}

impl World {
    /// Starts an agent armed with `fp` and waits for the failpoint to kill it.
    fn crash_at(&self, fp: &str, during: impl FnOnce()) {
        let mut agent = Agent::start_env(
            &self.env,
            &format!("crash-{fp}"),
            "node-a",
            &self.cfg,
            &[("DISKLET_FAILPOINTS", fp)],
        );
        during();
        let st = agent.wait_exit();
        assert!(!st.success(), "{fp}: the agent was killed ({st})");
        let log = std::fs::read_to_string(&agent.log).unwrap();
        assert!(
            log.contains(&format!("failpoint {fp}: SIGKILL")),
            "{fp}: killed at the point itself, not elsewhere"
        );
    }

    /// The invariants that hold after every recovery.
    async fn check(&self, fp: &str, volumes: usize) -> Vec<PersistentVolume> {
        let pvs = self
            .env
            .pvs()
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        let ours: Vec<_> = pvs
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("disklet.io/node"))
                    == Some(&"node-a".to_string())
            })
            .collect();
        let mut ids: Vec<String> = ours.iter().map(device_id).collect();
        ids.sort();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "{fp}: one PV per volume: {ids:?}");
        assert_eq!(n, volumes, "{fp}: PVs {ids:?}");
        // The Bound volume: same PV, same filesystem, same data.
        let keeper = ours
            .iter()
            .find(|p| device_id(p) == id_of(&self.keeper))
            .unwrap_or_else(|| panic!("{fp}: the Bound PV is gone"));
        assert_eq!(uid_of(keeper), uid_of(&self.keeper_pv), "{fp}");
        assert_eq!(phase(keeper), "Bound", "{fp}");
        assert_eq!(blkid(self.keeper.path(), "UUID"), self.keeper_uuid, "{fp}");
        assert_eq!(
            std::fs::read_to_string(path_of(keeper).join("precious")).unwrap(),
            "tenant data",
            "{fp}: a Bound volume's data is never touched"
        );
        ours
    }

    /// Checks a disk volume's PV: its path is the disk's one mount.
    fn check_mounted(&self, fp: &str, l: &Loop, pv: &PersistentVolume) {
        let mounts = mounts_of(l, &self.env.path().join("hostdir"));
        assert_eq!(mounts.len(), 1, "{fp}: mounted once: {mounts:?}");
        assert_eq!(path_of(pv), mounts[0].join("vol"), "{fp}");
    }
}

/// Bound claim on the first Available PV of `class`, some data written, the
/// claim deleted, the PV Released; the agent stopped first.
async fn release_with_data(
    w: &World,
    agent: Agent,
    sc: &str,
    files: &[&str],
) -> (PersistentVolume, PathBuf) {
    binder::claim(&w.env.client, "default", "c", sc, "50Mi", Some("node-a"))
        .await
        .unwrap();
    let bound = binder::wait_bound(&w.env.client, "default", "c", T)
        .await
        .unwrap();
    let root = path_of(&bound);
    for f in files {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "old tenant").unwrap();
    }
    agent.kill();
    binder::delete_claim(&w.env.client, "default", "c")
        .await
        .unwrap();
    binder::wait_phase(&w.env.client, &name_of(&bound), "Released", T)
        .await
        .unwrap();
    (bound, root)
}

/// Waits until the volume behind `old` is published afresh (a new uid), and
/// checks, on every update the watch delivers on the way, that no fresh PV
/// of that volume is visible while old data is still in it.
async fn wait_republished(
    w: &World,
    fp: &str,
    old: &PersistentVolume,
    same_entry: impl Fn(&PersistentVolume) -> bool,
    leftovers: impl Fn(&Path) -> Vec<String>,
) -> PersistentVolume {
    let violations = Mutex::new(Vec::new());
    let pvs = w
        .env
        .wait_pvs(SEL, &format!("{fp}: the volume published afresh"), |p| {
            let fresh: Vec<_> = p
                .iter()
                .filter(|pv| same_entry(pv) && uid_of(pv) != uid_of(old))
                .collect();
            for pv in &fresh {
                let left = leftovers(&path_of(pv));
                if !left.is_empty() {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{} published with {left:?}", name_of(pv)));
                }
            }
            let old_gone = !p.iter().any(|pv| uid_of(pv) == uid_of(old));
            old_gone && fresh.iter().any(|pv| phase(pv) == "Available")
        })
        .await;
    let v = violations.into_inner().unwrap();
    assert!(v.is_empty(), "{fp}: published before it was cleaned: {v:?}");
    pvs.into_iter()
        .find(|pv| same_entry(pv) && uid_of(pv) != uid_of(old))
        .unwrap()
}

fn old_files(root: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return left;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "lost+found" {
            left.push(n);
        }
    }
    left
}

fn points(prefixes: &[&str]) -> Vec<&'static str> {
    POINTS
        .iter()
        .copied()
        .filter(|p| prefixes.iter().any(|x| p.starts_with(x)))
        .filter(|p| p != &"files-mid-clean")
        .collect()
}

/// Every `failpoint::hit("…")` in the code is in `POINTS`, and every entry of
/// `POINTS` is in the code: a new crash point cannot go untested, and the
/// suite cannot test a point that no longer exists.
#[test]
fn every_crash_point_in_the_code_is_listed_and_tested() {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, _) in text.match_indices("failpoint::hit(\"") {
                    let rest = &text[i + "failpoint::hit(\"".len()..];
                    out.push(rest[..rest.find('"').unwrap()].to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut found,
    );
    found.sort();
    found.dedup();
    let mut listed: Vec<String> = POINTS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
    // Each listed point belongs to exactly one scenario below.
    let covered: usize = points(&["format-", "mount-", "apply-"]).len()
        + points(&["delete-"]).len()
        + points(&["recycle-"]).len()
        + 1; // files-mid-clean
    assert_eq!(covered, POINTS.len());
}

/// A new disk: killed at each step from the format lock to the PV's Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_killed_at_every_step_converges() {
    if skip_unless_root("provisioning_killed_at_every_step_converges") {
        return;
    }
    for fp in points(&["format-", "mount-", "apply-"]) {
        let (w, agent) = world().await;
        agent.kill();
        let mut disk = None;
        w.crash_at(fp, || {
            disk = Some(Loop::new(&w.env.path().join("disks"), "new", 320));
        });
        let disk = disk.unwrap();
        let hostdir = w.env.path().join("hostdir");
        let records = disklet::host::intents::read(&hostdir);
        if fp == "format-after-record" {
            // Killed with the start of its mkfs recorded: the record names
            // the disk. Make the disk what that mkfs would have left had it
            // been killed midway (a real one finishes too fast to catch).
            assert_eq!(records.len(), 1, "{fp}: {records:?}");
            assert_eq!(records[0].device_key, id_of(&disk), "{fp}");
            let u = &records[0].uuid;
            sh(&[
                "mkfs.xfs",
                "-q",
                "-L",
                "disklet",
                "-m",
                &format!("uuid={u}"),
                disk.path(),
            ]);
            disk.xfs_sb_write("inprogress 1");
        } else {
            assert!(records.is_empty(), "{fp}: {records:?}");
        }
        let uuid_at_crash = blkid(disk.path(), "UUID");

        let agent = Agent::start(&w.env, "recover", "node-a", &w.cfg);
        let pvs = w
            .env
            .wait_pvs(SEL, &format!("{fp}: the new disk's PV"), |p| {
                p.iter()
                    .any(|pv| device_id(pv) == id_of(&disk) && phase(pv) == "Available")
            })
            .await;
        // The recovering agent has published; let it finish its pass.
        agent.wait_log("ready: first reconcile done");
        drop(agent);
        let ours = w.check(fp, 2).await;
        let pv = ours.iter().find(|p| device_id(p) == id_of(&disk)).unwrap();
        assert!(pvs.iter().any(|p| uid_of(p) == uid_of(pv)), "{fp}");
        w.check_mounted(fp, &disk, pv);
        let uuid = blkid(disk.path(), "UUID");
        let formats = formatted_lines(&w.env.path().join("recover.log"), &disk.name());
        assert!(
            disklet::host::intents::read(&hostdir).is_empty(),
            "{fp}: no format record left"
        );
        if fp == "format-after-record" {
            assert_ne!(uuid, uuid_at_crash, "{fp}: the cut-short mkfs done again");
            assert_eq!(formats, 1, "{fp}: formatted once, after the restart");
        } else if uuid_at_crash.is_empty() {
            assert_eq!(formats, 1, "{fp}: formatted once, after the restart");
        } else {
            assert_eq!(uuid, uuid_at_crash, "{fp}: not formatted twice");
            assert_eq!(formats, 0, "{fp}: not formatted twice");
        }
        eprintln!(
            "{fp}: converged (filesystem at the kill: {})",
            if uuid_at_crash.is_empty() {
                "none"
            } else {
                "kept"
            }
        );
        drop(disk);
        drop(w);
    }
}

/// A disk pulled while its PV was Available: killed right after the PV's
/// delete. Nothing comes back until the disk does, then exactly one PV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_killed_after_the_delete_converges() {
    if skip_unless_root("withdrawal_killed_after_the_delete_converges") {
        return;
    }
    for fp in points(&["delete-"]) {
        let (w, agent) = world().await;
        let disks = w.env.path().join("disks");
        let gone = Loop::new(&disks, "gone", 320);
        let before = w
            .env
            .wait_pvs(SEL, "the second PV", |p| {
                p.iter().any(|pv| device_id(pv) == id_of(&gone))
            })
            .await;
        let before = before
            .into_iter()
            .find(|pv| device_id(pv) == id_of(&gone))
            .unwrap();
        let uuid = blkid(gone.path(), "UUID");
        agent.kill();
        for m in mounts_of(&gone, &w.env.path().join("hostdir")) {
            nix::mount::umount(&m).unwrap();
        }
        let file = gone.file.clone();
        drop(gone);
        w.crash_at(fp, || {});

        let agent = Agent::start(&w.env, "recover", "node-a", &w.cfg);
        agent.wait_log("ready: first reconcile done");
        w.check(fp, 1).await;
        let back = Loop::new(&disks, file.file_stem().unwrap().to_str().unwrap(), 320);
        let pvs = w
            .env
            .wait_pvs(SEL, &format!("{fp}: the disk back"), |p| {
                p.iter().any(|pv| device_id(pv) == id_of(&back))
            })
            .await;
        drop(agent);
        let ours = w.check(fp, 2).await;
        let pv = ours.iter().find(|p| device_id(p) == id_of(&back)).unwrap();
        assert!(pvs.iter().any(|p| uid_of(p) == uid_of(pv)));
        assert_eq!(name_of(pv), name_of(&before), "{fp}: same disk, same name");
        assert_eq!(
            blkid(back.path(), "UUID"),
            uuid,
            "{fp}: not formatted again"
        );
        w.check_mounted(fp, &back, pv);
        eprintln!("{fp}: converged");
        drop(back);
        drop(w);
    }
}

/// A released disk volume (reformat): killed at each step of the cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reformat_cleanup_killed_at_every_step_converges() {
    if skip_unless_root("reformat_cleanup_killed_at_every_step_converges") {
        return;
    }
    for fp in points(&["recycle-"]) {
        let (w, agent) = world().await;
        let disk = Loop::new(&w.env.path().join("disks"), "used", 320);
        w.env
            .wait_pvs(SEL, "the second PV", |p| {
                p.iter()
                    .any(|pv| device_id(pv) == id_of(&disk) && phase(pv) == "Available")
            })
            .await;
        let (old, _) = release_with_data(&w, agent, "local-fast", &["old", "d/old"]).await;
        w.crash_at(fp, || {});

        let agent = Agent::start(&w.env, "recover", "node-a", &w.cfg);
        let fresh =
            wait_republished(&w, fp, &old, |pv| device_id(pv) == id_of(&disk), old_files).await;
        drop(agent);
        let ours = w.check(fp, 2).await;
        let pv = ours.iter().find(|p| device_id(p) == id_of(&disk)).unwrap();
        assert_eq!(uid_of(pv), uid_of(&fresh));
        assert!(old_files(&path_of(pv)).is_empty(), "{fp}: cleaned");
        w.check_mounted(fp, &disk, pv);
        eprintln!("{fp}: converged");
        drop(disk);
        drop(w);
    }
}

/// A released discovery-dir volume (files): killed after the first unlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cleanup_killed_midway_converges() {
    if skip_unless_root("files_cleanup_killed_midway_converges") {
        return;
    }
    let fp = "files-mid-clean";
    let (w, agent) = world().await;
    let lp = Loop::new(&w.env.path().join("prepared"), "p", 128);
    sh(&["mkfs.ext4", "-q", lp.path()]);
    let entry = w.env.path().join("discovery/vol1");
    let _m = Mounted::new(lp.path(), &entry);
    w.env
        .wait_pvs(SEL, "the discovery PV", |p| {
            p.iter().any(|pv| path_of(pv) == entry)
        })
        .await;
    let files = ["f1", "f2", "f3", "a/b/old", "a/c"];
    let (old, root) = release_with_data(&w, agent, "local-dirs", &files).await;
    assert_eq!(root, entry);
    w.crash_at(fp, || {});
    let left = old_files(&entry);
    assert!(
        !left.is_empty(),
        "{fp}: killed midway, something is left: {left:?}"
    );

    let agent = Agent::start(&w.env, "recover", "node-a", &w.cfg);
    let fresh = wait_republished(&w, fp, &old, |pv| path_of(pv) == entry, old_files).await;
    drop(agent);
    let ours = w.check(fp, 2).await;
    assert!(ours.iter().any(|p| uid_of(p) == uid_of(&fresh)));
    assert!(old_files(&entry).is_empty(), "{fp}: cleaned");
    eprintln!(
        "{fp}: converged ({} entries were left at the kill)",
        left.len()
    );
}

/// Kills at random moments (not at named points) while six disks arrive one
/// by one: twelve agents in a row, each SIGKILLed after 0–600 ms, then one
/// left to finish. Every filesystem seen at any kill must survive to the end;
/// one PV and one mount per disk. The seed is printed; set
/// `DISKLET_CHAOS_SEED` to replay the same kill delays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_while_disks_arrive_converge() {
    if skip_unless_root("random_kills_while_disks_arrive_converge") {
        return;
    }
    let seed: u64 = std::env::var("DISKLET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos seed {seed} (DISKLET_CHAOS_SEED={seed} replays its kill delays)");
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let (w, agent) = world().await;
    agent.kill();
    let disks = w.env.path().join("disks");
    let mut loops: Vec<Loop> = Vec::new();
    let mut seen: std::collections::HashMap<PathBuf, String> = Default::default();
    let mut record = |loops: &[Loop]| {
        for l in loops {
            let u = blkid(l.path(), "UUID");
            if u.is_empty() {
                continue;
            }
            let first = seen.entry(l.file.clone()).or_insert_with(|| u.clone());
            assert_eq!(*first, u, "seed {seed}: {} formatted twice", l.path());
        }
    };
    for round in 0..12 {
        if round < 6 {
            loops.push(Loop::new(&disks, &format!("d{round}"), 320));
        }
        let agent = Agent::start(&w.env, &format!("chaos-{round}"), "node-a", &w.cfg);
        // The fault's timing, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(next() % 600)).await;
        agent.kill();
        record(&loops);
    }
    let agent = Agent::start(&w.env, "recover", "node-a", &w.cfg);
    let ids: Vec<String> = loops.iter().map(id_of).collect();
    w.env
        .wait_pvs(SEL, "every disk published", |p| {
            ids.iter().all(|id| p.iter().any(|pv| &device_id(pv) == id))
        })
        .await;
    drop(agent);
    record(&loops);
    let ours = w.check("chaos", loops.len() + 1).await;
    for l in &loops {
        let pv = ours.iter().find(|p| device_id(p) == id_of(l)).unwrap();
        w.check_mounted(&format!("chaos seed {seed}"), l, pv);
    }
    eprintln!("chaos seed {seed}: converged with {} disks", loops.len());
    drop(loops);
    drop(w);
}
