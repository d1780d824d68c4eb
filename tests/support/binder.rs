//! A stand-in for the Kubernetes PV controller (and the scheduler's volume
//! binding) for tests against the fake API server, which has no controllers.
//!
//! [`Binder::start`] spawns one tokio task that watches PersistentVolumes,
//! PersistentVolumeClaims, Nodes and StorageClasses and, on every change (and
//! on a periodic resync, like the real controller's), runs one level-triggered
//! pass over everything it knows:
//!
//! - a PV without `claimRef` (or pre-bound: `claimRef` without uid) becomes
//!   `Available`;
//! - a PV whose claim is gone (by uid) becomes `Released` (the `claimRef`
//!   stays), then goes through the reclaim policy: `Retain`, and `Delete` on a
//!   PV with a `pv.kubernetes.io/provisioned-by` annotation (an external
//!   deleter such as disklet), leave it `Released`; `Delete`/`Recycle` without
//!   that annotation end `Failed`, as no in-tree plugin can delete a local PV;
//! - an unbound claim is bound to the smallest fitting `Available` PV: same
//!   class, enough capacity, access modes ⊇ the claim's, same volume mode,
//!   the claim's label selector, and (for `WaitForFirstConsumer` classes) the
//!   node affinity of the node named by `volume.kubernetes.io/selected-node`.
//!   A `WaitForFirstConsumer` claim waits for that annotation, which the
//!   scheduler would set;
//! - a bound claim whose PV is gone becomes `Lost`.
//!
//! Binding writes what the real controller writes: the PV's `spec.claimRef`
//! (+ `pv.kubernetes.io/bound-by-controller`), PV phase `Bound`, the claim's
//! `spec.volumeName` (+ `pv.kubernetes.io/bind-completed`,
//! `pv.kubernetes.io/bound-by-controller`), claim phase `Bound` with the PV's
//! capacity and access modes. Every write carries the resourceVersion it was
//! computed from; a 409 makes the binder re-read the object, re-check that the
//! write still makes sense and retry.
//!
//! It reports on claims it cannot bind with Events on the claim, like the
//! real components: `WaitForFirstConsumer` (Normal), `FailedBinding`,
//! `ClaimLost`, `ClaimMisbound`, `VolumeMismatch` (Warning). Tests use them
//! (see [`wait_event`]) to know the binder has looked at a claim and decided
//! not to bind it, so "never binds" needs no sleep.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    Event, EventSource, Node, NodeSelectorRequirement, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// Set by the scheduler on a claim of a `WaitForFirstConsumer` class.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Set on a claim once the controller has completed its binding.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Set on a PV (claimRef) or claim (volumeName) when the controller, not the
/// user, filled in the binding.
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// Marks a PV as provisioned (and so deleted) by an external provisioner.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Deprecated class annotations, still honoured by the real controller.
pub const ANN_BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
/// The component name on Events, as the real controller's.
pub const COMPONENT: &str = "persistentvolume-controller";
const FIELD_MANAGER: &str = "kube-controller-manager";
/// Attempts of one write before the pass gives up (and is retried later).
const MAX_CONFLICT_RETRIES: usize = 8;

/// Tuning of the binder.
#[derive(Debug, Clone)]
pub struct BinderOptions {
    /// Full resync interval (a safety net; changes are handled from watches).
    pub resync: Duration,
    /// First retry delay after a failed pass (doubles up to `resync`).
    pub retry: Duration,
}

impl Default for BinderOptions {
    fn default() -> Self {
        BinderOptions {
            resync: Duration::from_secs(3),
            retry: Duration::from_millis(100),
        }
    }
}

/// What the binder did so far (for assertions).
#[derive(Debug, Default)]
pub struct Stats {
    /// Completed sync passes.
    pub passes: AtomicU64,
    /// 409 answers it re-read and retried after.
    pub conflicts: AtomicU64,
    /// Claims it bound (PV claimRef newly written).
    pub binds: AtomicU64,
    /// Passes that ended with an error (retried later).
    pub failed_passes: AtomicU64,
}

/// The running binder; dropping it stops the task.
pub struct Binder {
    task: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
    alive: tokio::sync::watch::Receiver<()>,
}

impl Binder {
    /// Starts watching and binding with default options.
    pub fn start(client: kube::Client) -> Binder {
        Self::start_with(client, BinderOptions::default())
    }

    pub fn start_with(client: kube::Client, opts: BinderOptions) -> Binder {
        let stats = Arc::new(Stats::default());
        let (alive_tx, alive) = tokio::sync::watch::channel(());
        let ctl = Ctl::new(client, stats.clone(), alive_tx);
        let task = tokio::spawn(ctl.run(opts));
        Binder {
            task: Some(task),
            stats,
            alive,
        }
    }

    /// A receiver whose `changed()` fails once the task is gone (its state,
    /// and the sender, dropped): lets a test see that stop/drop really ended it.
    pub fn alive(&self) -> tokio::sync::watch::Receiver<()> {
        self.alive.clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn conflicts(&self) -> u64 {
        self.stats.conflicts.load(Ordering::SeqCst)
    }

    pub fn binds(&self) -> u64 {
        self.stats.binds.load(Ordering::SeqCst)
    }

    pub fn passes(&self) -> u64 {
        self.stats.passes.load(Ordering::SeqCst)
    }

    /// Aborts the task; it ends at its next await point (use
    /// [`Binder::shutdown`] to wait for that).
    pub fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Aborts the task and waits until it is gone.
    pub async fn shutdown(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Binder {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Quantities, selectors, matching (pure)

/// Parses a Kubernetes quantity into bytes, rounding fractions up: plain
/// numbers, decimals (`1.5Gi`), binary (`Ki` … `Ei`), decimal (`m`, `k`, `M`
/// … `E`) suffixes and exponents (`1e3`). `None` when invalid or negative.
pub fn parse_quantity(s: &str) -> Option<u128> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let mut mant: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        mant = mant
            .checked_mul(10)?
            .checked_add(u128::from(c.to_digit(10)?))?;
    }
    let mut den: u128 = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let mut num_mul: u128 = 1;
    let pow = |b: u128, e: u32| b.checked_pow(e);
    match suffix {
        "" => {}
        "Ki" => num_mul = pow(1024, 1)?,
        "Mi" => num_mul = pow(1024, 2)?,
        "Gi" => num_mul = pow(1024, 3)?,
        "Ti" => num_mul = pow(1024, 4)?,
        "Pi" => num_mul = pow(1024, 5)?,
        "Ei" => num_mul = pow(1024, 6)?,
        "m" => den = den.checked_mul(1000)?,
        "k" => num_mul = pow(10, 3)?,
        "M" => num_mul = pow(10, 6)?,
        "G" => num_mul = pow(10, 9)?,
        "T" => num_mul = pow(10, 12)?,
        "P" => num_mul = pow(10, 15)?,
        "E" => num_mul = pow(10, 18)?,
        other => {
            let exp = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))?;
            let e: i32 = exp.parse().ok()?;
            if e >= 0 {
                num_mul = pow(10, e.unsigned_abs())?;
            } else {
                den = den.checked_mul(pow(10, e.unsigned_abs())?)?;
            }
        }
    }
    let total = mant.checked_mul(num_mul)?;
    Some(total.div_ceil(den))
}

fn quantity_of(map: Option<&BTreeMap<String, Quantity>>) -> Option<u128> {
    map.and_then(|m| m.get("storage"))
        .and_then(|q| parse_quantity(&q.0))
}

/// One node selector requirement against a label set (and the node name for
/// `matchFields`), with the operators of the real node affinity.
fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let got = labels.get(&r.key);
    match r.operator.as_str() {
        "In" => got.is_some_and(|v| values.contains(v)),
        "NotIn" => got.is_none_or(|v| !values.contains(v)),
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), [want]) = (got, values) else {
                return false;
            };
            match (v.parse::<i64>(), want.parse::<i64>()) {
                (Ok(v), Ok(w)) if r.operator == "Gt" => v > w,
                (Ok(v), Ok(w)) => v < w,
                _ => false,
            }
        }
        _ => false,
    }
}

/// `spec.nodeAffinity.required` of a PV against a Node: terms are OR'ed, the
/// expressions (and fields) of a term AND'ed; an empty term matches nothing;
/// no affinity at all matches every node.
pub fn node_affinity_matches(pv: &PersistentVolume, node: &Node) -> bool {
    let Some(required) = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name_set: BTreeMap<String, String> =
        [("metadata.name".to_string(), node.name_any())].into();
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs.iter().all(|r| requirement_matches(r, &labels))
            && fields.iter().all(|r| requirement_matches(r, &name_set))
    })
}

/// A claim's `spec.selector` against PV labels (nil selects everything).
fn label_selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let r = NodeSelectorRequirement {
            key: e.key.clone(),
            operator: e.operator.clone(),
            values: e.values.clone(),
        };
        matches!(
            e.operator.as_str(),
            "In" | "NotIn" | "Exists" | "DoesNotExist"
        ) && requirement_matches(&r, labels)
    });
    by_labels && by_exprs
}

fn annotation<'a, K: Resource>(o: &'a K, key: &str) -> Option<&'a str> {
    o.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn non_empty(s: Option<&String>) -> Option<&str> {
    s.map(String::as_str).filter(|s| !s.is_empty())
}

/// The claim's class as the real controller reads it (beta annotation first).
pub fn claim_class(c: &PersistentVolumeClaim) -> String {
    annotation(c, ANN_BETA_CLASS)
        .map(str::to_string)
        .or_else(|| c.spec.as_ref().and_then(|s| s.storage_class_name.clone()))
        .unwrap_or_default()
}

pub fn pv_class(pv: &PersistentVolume) -> String {
    annotation(pv, ANN_BETA_CLASS)
        .map(str::to_string)
        .or_else(|| pv.spec.as_ref().and_then(|s| s.storage_class_name.clone()))
        .unwrap_or_default()
}

pub fn pv_phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn claim_phase(c: &PersistentVolumeClaim) -> &str {
    c.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn claim_volume(c: &PersistentVolumeClaim) -> Option<&str> {
    non_empty(c.spec.as_ref().and_then(|s| s.volume_name.as_ref()))
}

fn claim_ref(pv: &PersistentVolume) -> Option<&ObjectReference> {
    pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref())
}

fn uid_of<K: Resource>(o: &K) -> &str {
    o.meta().uid.as_deref().unwrap_or("")
}

fn deleting<K: Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_some()
}

/// The real `IsVolumeBoundToClaim`: claimRef names the claim and its uid is
/// empty (pre-bound by a user) or the claim's.
fn is_bound_to_claim(pv: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    claim_ref(pv).is_some_and(|r| {
        r.name.as_deref() == c.metadata.name.as_deref()
            && r.namespace.as_deref() == c.metadata.namespace.as_deref()
            && non_empty(r.uid.as_ref()).is_none_or(|u| u == uid_of(c))
    })
}

/// claimRef names the claim with its uid.
fn is_bound_exactly(pv: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    is_bound_to_claim(pv, c) && claim_ref(pv).and_then(|r| r.uid.as_deref()) == Some(uid_of(c))
}

fn pv_volume_mode(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

fn claim_volume_mode(c: &PersistentVolumeClaim) -> &str {
    c.spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

fn pv_capacity(pv: &PersistentVolume) -> Option<u128> {
    quantity_of(pv.spec.as_ref().and_then(|s| s.capacity.as_ref()))
}

fn claim_request(c: &PersistentVolumeClaim) -> Option<u128> {
    quantity_of(
        c.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref()),
    )
}

fn access_modes_cover(pv: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    let have = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or_default();
    c.spec
        .as_ref()
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or_default()
        .iter()
        .all(|m| have.contains(m))
}

/// Why a PV does not fit a claim (names used in the Event summaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misfit {
    TooSmall,
    VolumeMode,
    BeingDeleted,
    NotAvailable,
    ClaimedByOther,
    Selector,
    Class,
    NodeAffinity,
    AccessModes,
}

impl Misfit {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfit::TooSmall => "too small",
            Misfit::VolumeMode => "volume mode mismatch",
            Misfit::BeingDeleted => "being deleted",
            Misfit::NotAvailable => "not Available",
            Misfit::ClaimedByOther => "claimed by another claim",
            Misfit::Selector => "selector mismatch",
            Misfit::Class => "storage class mismatch",
            Misfit::NodeAffinity => "node affinity mismatch",
            Misfit::AccessModes => "access modes mismatch",
        }
    }
}

/// Result of checking one PV for a claim, in the order of the real
/// `FindMatchingVolume`.
enum Fit {
    /// Pre-bound to this claim (by claimRef); `bool` = node affinity holds.
    PreBound(bool),
    /// Fits, with this capacity.
    Yes(u128),
    /// Skipped without a reason worth reporting (delayed binding, no node).
    Skip,
    No(Misfit),
}

fn check_fit(
    pv: &PersistentVolume,
    c: &PersistentVolumeClaim,
    class: &str,
    delay: bool,
    node: Option<&Node>,
) -> Fit {
    let req = claim_request(c).unwrap_or(u128::MAX);
    let cap = pv_capacity(pv).unwrap_or(0);
    if cap < req {
        return Fit::No(Misfit::TooSmall);
    }
    if pv_volume_mode(pv) != claim_volume_mode(c) {
        return Fit::No(Misfit::VolumeMode);
    }
    if deleting(pv) {
        return Fit::No(Misfit::BeingDeleted);
    }
    let affinity_ok = node.is_none_or(|n| node_affinity_matches(pv, n));
    if is_bound_to_claim(pv, c) {
        return Fit::PreBound(affinity_ok);
    }
    if delay && node.is_none() {
        return Fit::Skip;
    }
    if pv_phase(pv) != "Available" {
        return Fit::No(Misfit::NotAvailable);
    }
    if claim_ref(pv).is_some() {
        return Fit::No(Misfit::ClaimedByOther);
    }
    if let Some(sel) = c.spec.as_ref().and_then(|s| s.selector.as_ref()) {
        let labels = pv.metadata.labels.clone().unwrap_or_default();
        if !label_selector_matches(sel, &labels) {
            return Fit::No(Misfit::Selector);
        }
    }
    if pv_class(pv) != class {
        return Fit::No(Misfit::Class);
    }
    if !affinity_ok {
        return Fit::No(Misfit::NodeAffinity);
    }
    if !access_modes_cover(pv, c) {
        return Fit::No(Misfit::AccessModes);
    }
    Fit::Yes(cap)
}

/// The best PV for a claim among `pvs`: a PV pre-bound to it, else the
/// smallest fitting one (ties: first by name). The second value summarises
/// why the others did not fit.
fn find_best<'a>(
    pvs: impl Iterator<Item = &'a PersistentVolume>,
    c: &PersistentVolumeClaim,
    class: &str,
    delay: bool,
    node: Option<&Node>,
) -> (Option<&'a PersistentVolume>, String) {
    let mut best: Option<(u128, &PersistentVolume)> = None;
    let mut misfits: BTreeMap<Misfit, usize> = BTreeMap::new();
    let mut total = 0usize;
    for pv in pvs {
        total += 1;
        match check_fit(pv, c, class, delay, node) {
            Fit::PreBound(true) => return (Some(pv), String::new()),
            Fit::PreBound(false) => {
                return (
                    None,
                    format!(
                        "pre-bound volume {:?} does not match the node's labels",
                        pv.name_any()
                    ),
                )
            }
            Fit::Yes(cap) => {
                if best.is_none_or(|(b, _)| cap < b) {
                    best = Some((cap, pv));
                }
            }
            Fit::Skip => {}
            Fit::No(m) => *misfits.entry(m).or_default() += 1,
        }
    }
    let parts: Vec<String> = misfits
        .iter()
        .map(|(m, n)| format!("{n} {}", m.as_str()))
        .collect();
    let summary = if parts.is_empty() {
        format!("0/{total} volumes fit")
    } else {
        format!("0/{total} volumes fit: {}", parts.join(", "))
    };
    (best.map(|(_, pv)| pv), summary)
}

// ---------------------------------------------------------------------------
// The controller task

/// A local cache of one kind, fed by its watch and by the binder's own
/// writes (like the real controller's "assume cache"), so a pass never acts
/// on something older than what the binder itself wrote.
struct Cache<K> {
    objs: BTreeMap<String, K>,
    init: Option<BTreeMap<String, K>>,
    ready: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            objs: BTreeMap::new(),
            init: None,
            ready: false,
        }
    }
}

fn key_of<K: Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", o.meta().name.as_deref().unwrap_or("")),
        _ => o.meta().name.clone().unwrap_or_default(),
    }
}

fn rv_num<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

/// Whether `new` may replace `old` (same object and not older).
fn not_older<K: Resource>(new: &K, old: &K) -> bool {
    if uid_of(new) != uid_of(old) {
        return true;
    }
    match (rv_num(new), rv_num(old)) {
        (Some(n), Some(o)) => n >= o,
        _ => true,
    }
}

impl<K: Resource + Clone> Cache<K> {
    fn apply(&mut self, ev: watcher::Event<K>) {
        match ev {
            watcher::Event::Init => self.init = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                self.init.get_or_insert_default().insert(key_of(&o), o);
            }
            watcher::Event::InitDone => {
                let listed = self.init.take().unwrap_or_default();
                let mut next = BTreeMap::new();
                for (k, o) in listed {
                    // Keep our own write if it is newer than the list.
                    match self.objs.remove(&k) {
                        Some(mine) if !not_older(&o, &mine) => next.insert(k, mine),
                        _ => next.insert(k, o),
                    };
                }
                self.objs = next;
                self.ready = true;
            }
            watcher::Event::Apply(o) => self.store(o),
            watcher::Event::Delete(o) => {
                let k = key_of(&o);
                if self.objs.get(&k).is_some_and(|c| uid_of(c) == uid_of(&o)) {
                    self.objs.remove(&k);
                }
            }
        }
    }

    fn store(&mut self, o: K) {
        let k = key_of(&o);
        if self.objs.get(&k).is_none_or(|old| not_older(&o, old)) {
            self.objs.insert(k, o);
        }
    }

    fn get(&self, key: &str) -> Option<&K> {
        self.objs.get(key)
    }
}

enum Msg {
    Pv(Box<watcher::Event<PersistentVolume>>),
    Pvc(Box<watcher::Event<PersistentVolumeClaim>>),
    Node(Box<watcher::Event<Node>>),
    Sc(Box<watcher::Event<StorageClass>>),
}

/// What a write closure decides after looking at the current object.
enum Step {
    /// The write no longer makes sense (state moved on).
    Abort,
    /// Already as wanted.
    Noop,
    /// Merge patch to send (the resourceVersion is added).
    Patch(Value),
}

/// Outcome of a guarded write.
enum Wrote<K> {
    /// Written, or already as wanted: the current object.
    Done(K),
    /// Abandoned after seeing this state.
    Aborted(K),
    /// The object does not exist.
    Gone,
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

struct Ctl {
    client: kube::Client,
    pvs: Cache<PersistentVolume>,
    pvcs: Cache<PersistentVolumeClaim>,
    nodes: Cache<Node>,
    scs: Cache<StorageClass>,
    /// Last Event (reason, message) per claim uid, to report changes only.
    last_event: HashMap<String, (String, String)>,
    stats: Arc<Stats>,
    /// Something in this pass must be looked at again soon.
    requeue: bool,
    /// Dropped with the task (see [`Binder::alive`]).
    _alive: tokio::sync::watch::Sender<()>,
}

impl Ctl {
    fn new(client: kube::Client, stats: Arc<Stats>, alive: tokio::sync::watch::Sender<()>) -> Ctl {
        Ctl {
            client,
            pvs: Cache::default(),
            pvcs: Cache::default(),
            nodes: Cache::default(),
            scs: Cache::default(),
            last_event: HashMap::new(),
            stats,
            requeue: false,
            _alive: alive,
        }
    }

    fn ready(&self) -> bool {
        self.pvs.ready && self.pvcs.ready && self.nodes.ready && self.scs.ready
    }

    fn apply(&mut self, m: Msg) {
        match m {
            Msg::Pv(e) => self.pvs.apply(*e),
            Msg::Pvc(e) => self.pvcs.apply(*e),
            Msg::Node(e) => self.nodes.apply(*e),
            Msg::Sc(e) => self.scs.apply(*e),
        }
    }

    async fn run(mut self, opts: BinderOptions) {
        fn stream<K>(api: Api<K>) -> BoxStream<'static, watcher::Result<watcher::Event<K>>>
        where
            K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        {
            watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed()
        }
        let c = &self.client;
        let streams: Vec<BoxStream<'static, watcher::Result<Msg>>> = vec![
            stream(Api::<PersistentVolume>::all(c.clone()))
                .map(|r| r.map(|e| Msg::Pv(Box::new(e))))
                .boxed(),
            stream(Api::<PersistentVolumeClaim>::all(c.clone()))
                .map(|r| r.map(|e| Msg::Pvc(Box::new(e))))
                .boxed(),
            stream(Api::<Node>::all(c.clone()))
                .map(|r| r.map(|e| Msg::Node(Box::new(e))))
                .boxed(),
            stream(Api::<StorageClass>::all(c.clone()))
                .map(|r| r.map(|e| Msg::Sc(Box::new(e))))
                .boxed(),
        ];
        let mut events = futures::stream::select_all(streams);
        let mut resync = tokio::time::interval(opts.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_delay = opts.retry;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let mut dirty = false;
            let at = retry_at;
            let retry_sleep = async move {
                match at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = events.next() => match m {
                    Some(Ok(m)) => { self.apply(m); dirty = true; }
                    Some(Err(e)) => tracing::debug!("binder: watch error: {e}"),
                    None => return,
                },
                _ = resync.tick() => dirty = true,
                () = retry_sleep => { retry_at = None; dirty = true; }
            }
            // Take in everything already delivered before acting.
            while let Some(Some(m)) = events.next().now_or_never() {
                match m {
                    Ok(m) => {
                        self.apply(m);
                        dirty = true;
                    }
                    Err(e) => tracing::debug!("binder: watch error: {e}"),
                }
            }
            if !dirty || !self.ready() {
                continue;
            }
            self.requeue = false;
            let ok = match self.sync_all().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("binder: pass failed: {e:#}");
                    self.stats.failed_passes.fetch_add(1, Ordering::SeqCst);
                    false
                }
            };
            self.stats.passes.fetch_add(1, Ordering::SeqCst);
            if ok && !self.requeue {
                retry_delay = opts.retry;
                retry_at = None;
            } else {
                retry_at = Some(tokio::time::Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(opts.resync);
            }
        }
    }

    /// One pass: volumes first (phases, releases), then claims (binding),
    /// claims oldest first like a StatefulSet's. Errors on one object do not
    /// stop the others; the first is returned.
    async fn sync_all(&mut self) -> Result<()> {
        let mut first_err = None;
        let names: Vec<String> = self.pvs.objs.keys().cloned().collect();
        for n in names {
            let Some(pv) = self.pvs.get(&n).cloned() else {
                continue;
            };
            if let Err(e) = self.sync_volume(pv).await {
                first_err.get_or_insert(e.context(format!("volume {n}")));
            }
        }
        let mut claims: Vec<(String, String)> = self
            .pvcs
            .objs
            .iter()
            .map(|(k, c)| {
                let ts = c
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                (ts, k.clone())
            })
            .collect();
        claims.sort();
        for (_, k) in claims {
            let Some(c) = self.pvcs.get(&k).cloned() else {
                continue;
            };
            if let Err(e) = self.sync_claim(c).await {
                first_err.get_or_insert(e.context(format!("claim {k}")));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    // --- lookups: cache first, the API server when the cache cannot say

    async fn lookup_claim(
        &mut self,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<Option<PersistentVolumeClaim>> {
        if let Some(c) = self.pvcs.get(&format!("{ns}/{name}")) {
            if uid_of(c) == uid {
                return Ok(Some(c.clone()));
            }
        }
        // Not (or not with that uid) in the cache: ask the server before
        // concluding the claim is gone, like the real controller does.
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let got = api.get_opt(name).await?;
        if let Some(c) = &got {
            self.pvcs.store(c.clone());
        }
        Ok(got)
    }

    async fn lookup_pv(&mut self, name: &str) -> Result<Option<PersistentVolume>> {
        if let Some(pv) = self.pvs.get(name) {
            return Ok(Some(pv.clone()));
        }
        let got = Api::<PersistentVolume>::all(self.client.clone())
            .get_opt(name)
            .await?;
        if let Some(pv) = &got {
            self.pvs.store(pv.clone());
        }
        Ok(got)
    }

    async fn lookup_node(&mut self, name: &str) -> Result<Option<Node>> {
        if let Some(n) = self.nodes.get(name) {
            return Ok(Some(n.clone()));
        }
        let got = Api::<Node>::all(self.client.clone()).get_opt(name).await?;
        if let Some(n) = &got {
            self.nodes.store(n.clone());
        }
        Ok(got)
    }

    /// `WaitForFirstConsumer` class? A class that does not exist (or "")
    /// means immediate binding, as in the real `IsDelayBindingMode`.
    async fn is_delay(&mut self, class: &str) -> Result<bool> {
        if class.is_empty() {
            return Ok(false);
        }
        let sc = match self.scs.get(class) {
            Some(sc) => Some(sc.clone()),
            None => {
                let got = Api::<StorageClass>::all(self.client.clone())
                    .get_opt(class)
                    .await?;
                if let Some(sc) = &got {
                    self.scs.store(sc.clone());
                }
                got
            }
        };
        Ok(sc.is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")))
    }

    // --- guarded writes

    /// Merge-patches `name` (its status when `status`) with what `f` decides
    /// from the current object, with a resourceVersion precondition. On 409
    /// it re-reads the object and asks `f` again.
    async fn write<K>(
        &mut self,
        api: &Api<K>,
        start: K,
        status: bool,
        f: impl Fn(&K) -> Step,
    ) -> Result<Wrote<K>>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        let name = start.name_any();
        let mut cur = start;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut patch = match f(&cur) {
                Step::Abort => return Ok(Wrote::Aborted(cur)),
                Step::Noop => return Ok(Wrote::Done(cur)),
                Step::Patch(p) => p,
            };
            patch["metadata"]["resourceVersion"] = json!(cur.resource_version());
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            };
            let res = if status {
                api.patch_status(&name, &pp, &Patch::Merge(&patch)).await
            } else {
                api.patch(&name, &pp, &Patch::Merge(&patch)).await
            };
            match res {
                Ok(o) => return Ok(Wrote::Done(o)),
                Err(e) if is_code(&e, 409) => {
                    self.stats.conflicts.fetch_add(1, Ordering::SeqCst);
                    tracing::debug!("binder: conflict writing {name}, re-reading");
                    match api.get_opt(&name).await? {
                        Some(o) => cur = o,
                        None => return Ok(Wrote::Gone),
                    }
                }
                Err(e) if is_code(&e, 404) => return Ok(Wrote::Gone),
                Err(e) => return Err(anyhow!(e).context(format!("patching {name}"))),
            }
        }
        bail!("{name}: still conflicting after {MAX_CONFLICT_RETRIES} attempts")
    }

    async fn write_pv(
        &mut self,
        pv: PersistentVolume,
        status: bool,
        f: impl Fn(&PersistentVolume) -> Step,
    ) -> Result<Option<PersistentVolume>> {
        let api = Api::<PersistentVolume>::all(self.client.clone());
        let name = pv.name_any();
        match self.write(&api, pv, status, f).await? {
            Wrote::Done(o) => {
                self.pvs.store(o.clone());
                Ok(Some(o))
            }
            Wrote::Aborted(o) => {
                self.pvs.store(o);
                self.requeue = true;
                Ok(None)
            }
            Wrote::Gone => {
                self.pvs.objs.remove(&name);
                Ok(None)
            }
        }
    }

    async fn write_claim(
        &mut self,
        c: PersistentVolumeClaim,
        status: bool,
        f: impl Fn(&PersistentVolumeClaim) -> Step,
    ) -> Result<Option<PersistentVolumeClaim>> {
        let ns = c.namespace().unwrap_or_default();
        let api = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns);
        let key = key_of(&c);
        match self.write(&api, c, status, f).await? {
            Wrote::Done(o) => {
                self.pvcs.store(o.clone());
                Ok(Some(o))
            }
            Wrote::Aborted(o) => {
                self.pvcs.store(o);
                self.requeue = true;
                Ok(None)
            }
            Wrote::Gone => {
                self.pvcs.objs.remove(&key);
                Ok(None)
            }
        }
    }

    /// Sets a PV's phase (and message) while `guard` holds.
    async fn set_pv_phase(
        &mut self,
        pv: PersistentVolume,
        phase: &str,
        message: Option<&str>,
        guard: impl Fn(&PersistentVolume) -> bool,
    ) -> Result<Option<PersistentVolume>> {
        self.write_pv(pv, true, |cur| {
            if !guard(cur) {
                return Step::Abort;
            }
            let msg = cur.status.as_ref().and_then(|s| s.message.as_deref());
            if pv_phase(cur) == phase && msg == message {
                return Step::Noop;
            }
            Step::Patch(json!({"status": {"phase": phase, "message": message}}))
        })
        .await
    }

    /// Sets a claim's phase without a volume (Pending, Lost): capacity and
    /// access modes are cleared, as the real `updateClaimStatus(…, nil)` does.
    async fn set_claim_phase(&mut self, c: PersistentVolumeClaim, phase: &str) -> Result<()> {
        let uid = uid_of(&c).to_string();
        self.write_claim(c, true, |cur| {
            if uid_of(cur) != uid {
                return Step::Abort;
            }
            let st = cur.status.as_ref();
            let clean = st.is_none_or(|s| s.capacity.is_none() && s.access_modes.is_none());
            if claim_phase(cur) == phase && clean {
                return Step::Noop;
            }
            Step::Patch(json!({"status": {"phase": phase, "capacity": null, "accessModes": null}}))
        })
        .await?;
        Ok(())
    }

    /// Records an Event on a claim when its (reason, message) changed.
    async fn event(&mut self, c: &PersistentVolumeClaim, type_: &str, reason: &str, message: &str) {
        let uid = uid_of(c).to_string();
        let now = (reason.to_string(), message.to_string());
        if self.last_event.get(&uid) == Some(&now) {
            return;
        }
        let ns = c.namespace().unwrap_or_default();
        let ts = Time(k8s_openapi::jiff::Timestamp::now());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", c.name_any())),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns.clone()),
                name: Some(c.name_any()),
                uid: Some(uid.clone()),
                resource_version: c.resource_version(),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(type_.into()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: None,
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some("disklet-test-binder".into()),
            first_timestamp: Some(ts.clone()),
            last_timestamp: Some(ts),
            count: Some(1),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {
                self.last_event.insert(uid, now);
            }
            Err(e) => {
                tracing::debug!("binder: cannot record event {reason}: {e}");
                self.requeue = true;
            }
        }
    }

    // --- volumes

    async fn sync_volume(&mut self, pv: PersistentVolume) -> Result<()> {
        let Some(r) = claim_ref(&pv).cloned() else {
            // Unused volume.
            self.set_pv_phase(pv, "Available", None, |cur| claim_ref(cur).is_none())
                .await?;
            return Ok(());
        };
        let uid = r.uid.clone().unwrap_or_default();
        if uid.is_empty() {
            // Pre-bound by a user to a claim not bound yet.
            self.set_pv_phase(pv, "Available", None, |cur| {
                claim_ref(cur).is_some_and(|r| non_empty(r.uid.as_ref()).is_none())
            })
            .await?;
            return Ok(());
        }
        let ns = r.namespace.clone().unwrap_or_default();
        let cname = r.name.clone().unwrap_or_default();
        let same_ref = {
            let uid = uid.clone();
            move |cur: &PersistentVolume| {
                claim_ref(cur).and_then(|r| r.uid.as_deref()) == Some(&*uid)
            }
        };
        let phase = pv_phase(&pv).to_string();
        let cached = self
            .pvcs
            .get(&format!("{ns}/{cname}"))
            .is_some_and(|c| uid_of(c) == uid);
        if !cached && matches!(phase.as_str(), "Released" | "Failed") {
            return Ok(()); // Already released; the claim will not come back.
        }
        let claim = self
            .lookup_claim(&ns, &cname, &uid)
            .await?
            .filter(|c| uid_of(c) == uid);
        let Some(claim) = claim else {
            // The claim is gone: release, then reclaim.
            if matches!(phase.as_str(), "Released" | "Failed") {
                return Ok(());
            }
            let Some(pv) = self.set_pv_phase(pv, "Released", None, &same_ref).await? else {
                return Ok(());
            };
            let policy = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                .unwrap_or("Retain")
                .to_string();
            let external = annotation(&pv, ANN_PROVISIONED_BY).is_some();
            let message = match policy.as_str() {
                "Retain" => None,
                "Delete" if external => None, // waits for the external deleter
                "Delete" => Some(format!(
                    "error getting deleter volume plugin for volume \"{}\": no deletable volume plugin matched",
                    pv.name_any()
                )),
                _ => Some(format!(
                    "no volume plugin matched to recycle volume \"{}\"",
                    pv.name_any()
                )),
            };
            if let Some(m) = message {
                self.set_pv_phase(pv, "Failed", Some(&m), &same_ref).await?;
            }
            return Ok(());
        };
        match claim_volume(&claim) {
            // The claim sync (later in this pass) binds it.
            None => Ok(()),
            Some(v) if v == pv.name_any() => {
                self.set_pv_phase(pv, "Bound", None, &same_ref).await?;
                Ok(())
            }
            Some(_) => {
                // The claim got bound to another volume: unbind this one.
                let by_ctl = annotation(&pv, ANN_BOUND_BY_CONTROLLER).is_some();
                let Some(pv) = self
                    .write_pv(pv, false, |cur| {
                        if !same_ref(cur) {
                            return Step::Abort;
                        }
                        if by_ctl {
                            Step::Patch(json!({
                                "metadata": {"annotations": {ANN_BOUND_BY_CONTROLLER: null}},
                                "spec": {"claimRef": null}
                            }))
                        } else {
                            Step::Patch(json!({"spec": {"claimRef": {"uid": null}}}))
                        }
                    })
                    .await?
                else {
                    return Ok(());
                };
                self.set_pv_phase(pv, "Available", None, |cur| {
                    claim_ref(cur).is_none_or(|r| non_empty(r.uid.as_ref()).is_none())
                })
                .await?;
                Ok(())
            }
        }
    }

    // --- claims

    async fn sync_claim(&mut self, c: PersistentVolumeClaim) -> Result<()> {
        match claim_volume(&c).map(str::to_string) {
            None => self.sync_unbound_claim(c).await,
            Some(v) => self.sync_claim_with_volume(c, &v).await,
        }
    }

    async fn sync_unbound_claim(&mut self, c: PersistentVolumeClaim) -> Result<()> {
        let class = claim_class(&c);
        let delay = self.is_delay(&class).await?;
        let node = match (delay, annotation(&c, ANN_SELECTED_NODE)) {
            (true, Some(n)) => {
                let n = n.to_string();
                match self.lookup_node(&n).await? {
                    Some(node) => Some(node),
                    None => {
                        self.set_claim_phase(c.clone(), "Pending").await?;
                        let msg = format!("selected node {n:?} not found");
                        self.event(&c, "Warning", "FailedBinding", &msg).await;
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let (best, summary) = find_best(self.pvs.objs.values(), &c, &class, delay, node.as_ref());
        if let Some(pv) = best.cloned() {
            return self.bind(c, pv, node, true).await;
        }
        self.set_claim_phase(c.clone(), "Pending").await?;
        if delay && node.is_none() {
            self.event(
                &c,
                "Normal",
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )
            .await;
        } else if delay {
            let msg =
                format!("node(s) didn't find available persistent volumes to bind ({summary})");
            self.event(&c, "Warning", "FailedBinding", &msg).await;
        } else if class.is_empty() {
            let msg = format!(
                "no persistent volumes available for this claim and no storage class is set ({summary})"
            );
            self.event(&c, "Warning", "FailedBinding", &msg).await;
        } else {
            let msg = format!("no persistent volumes available for this claim ({summary})");
            self.event(&c, "Warning", "FailedBinding", &msg).await;
        }
        Ok(())
    }

    async fn sync_claim_with_volume(
        &mut self,
        c: PersistentVolumeClaim,
        vname: &str,
    ) -> Result<()> {
        let completed = annotation(&c, ANN_BIND_COMPLETED).is_some();
        let Some(pv) = self.lookup_pv(vname).await? else {
            if completed {
                if claim_phase(&c) != "Lost" {
                    self.set_claim_phase(c.clone(), "Lost").await?;
                }
                let msg = "Bound claim has lost its PersistentVolume. Data on the volume is lost!";
                self.event(&c, "Warning", "ClaimLost", msg).await;
            } else {
                self.set_claim_phase(c.clone(), "Pending").await?;
                let msg = format!("volume {vname:?} requested and not found");
                self.event(&c, "Warning", "FailedBinding", &msg).await;
            }
            return Ok(());
        };
        if claim_ref(&pv).is_none() {
            if completed {
                // Was bound, the volume lost its claimRef: bind it again.
                return self.bind(c, pv, None, false).await;
            }
            // Pre-bound claim: the real checkVolumeSatisfyClaim.
            let class = claim_class(&c);
            let why = if pv_capacity(&pv).unwrap_or(0) < claim_request(&c).unwrap_or(u128::MAX) {
                Some(Misfit::TooSmall)
            } else if pv_class(&pv) != class {
                Some(Misfit::Class)
            } else if pv_volume_mode(&pv) != claim_volume_mode(&c) {
                Some(Misfit::VolumeMode)
            } else {
                None
            };
            if let Some(why) = why {
                self.set_claim_phase(c.clone(), "Pending").await?;
                let msg = format!(
                    "Cannot bind to requested volume {vname:?}: {}",
                    why.as_str()
                );
                self.event(&c, "Warning", "VolumeMismatch", &msg).await;
                return Ok(());
            }
            return self.bind(c, pv, None, false).await;
        }
        if is_bound_to_claim(&pv, &c) {
            // Bound (no-op) or half-way through binding: complete it.
            return self.bind(c, pv, None, false).await;
        }
        if completed {
            self.set_claim_phase(c.clone(), "Lost").await?;
            let msg = "Two claims are bound to the same volume, this one is bound incorrectly";
            self.event(&c, "Warning", "ClaimMisbound", msg).await;
        } else {
            self.set_claim_phase(c.clone(), "Pending").await?;
            let msg = format!("volume {vname:?} already bound to a different claim.");
            self.event(&c, "Warning", "FailedBinding", &msg).await;
        }
        Ok(())
    }

    /// Binds claim and volume in the real controller's order: PV claimRef,
    /// PV phase, claim volumeName (+ annotations), claim phase. Each step is
    /// a no-op when already done, so this also completes a half-done binding.
    /// `recheck`: on a re-read after a conflict, the PV must still fit.
    async fn bind(
        &mut self,
        c: PersistentVolumeClaim,
        pv: PersistentVolume,
        node: Option<Node>,
        recheck: bool,
    ) -> Result<()> {
        let class = claim_class(&c);
        let pv_name = pv.name_any();
        let claim_uid = uid_of(&c).to_string();
        let cref = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": c.namespace(),
            "name": c.name_any(),
            "uid": claim_uid,
            "resourceVersion": c.resource_version(),
        });
        let newly = !is_bound_exactly(&pv, &c);
        let Some(pv) = self
            .write_pv(pv, false, |cur| {
                if is_bound_exactly(cur, &c) {
                    return Step::Noop;
                }
                if deleting(cur) || (claim_ref(cur).is_some() && !is_bound_to_claim(cur, &c)) {
                    return Step::Abort;
                }
                if recheck
                    && claim_ref(cur).is_none()
                    && !matches!(
                        check_fit(cur, &c, &class, node.is_some(), node.as_ref()),
                        Fit::Yes(_)
                    )
                {
                    return Step::Abort;
                }
                let mut p = json!({"spec": {"claimRef": cref}});
                if claim_ref(cur).is_none() {
                    p["metadata"]["annotations"][ANN_BOUND_BY_CONTROLLER] = json!("yes");
                }
                Step::Patch(p)
            })
            .await?
        else {
            return Ok(());
        };
        if newly {
            self.stats.binds.fetch_add(1, Ordering::SeqCst);
        }
        let Some(pv) = self
            .set_pv_phase(pv, "Bound", None, |cur| is_bound_exactly(cur, &c))
            .await?
        else {
            return Ok(());
        };
        let name = pv_name.clone();
        let uid = claim_uid.clone();
        let Some(c) = self
            .write_claim(c, false, |cur| {
                if uid_of(cur) != uid {
                    return Step::Abort;
                }
                let mut p = json!({});
                match claim_volume(cur) {
                    Some(v) if v != name => return Step::Abort,
                    Some(_) => {}
                    None => {
                        p["spec"]["volumeName"] = json!(name);
                        if annotation(cur, ANN_BOUND_BY_CONTROLLER).is_none() {
                            p["metadata"]["annotations"][ANN_BOUND_BY_CONTROLLER] = json!("yes");
                        }
                    }
                }
                if annotation(cur, ANN_BIND_COMPLETED).is_none() {
                    p["metadata"]["annotations"][ANN_BIND_COMPLETED] = json!("yes");
                }
                if p == json!({}) {
                    Step::Noop
                } else {
                    Step::Patch(p)
                }
            })
            .await?
        else {
            return Ok(());
        };
        let spec = pv.spec.clone().unwrap_or_default();
        let cap = spec.capacity.clone();
        let modes = spec.access_modes.clone();
        self.write_claim(c, true, |cur| {
            if uid_of(cur) != uid || claim_volume(cur) != Some(pv_name.as_str()) {
                return Step::Abort;
            }
            let st = cur.status.clone().unwrap_or_default();
            if claim_phase(cur) == "Bound" && st.capacity == cap && st.access_modes == modes {
                return Step::Noop;
            }
            Step::Patch(
                json!({"status": {"phase": "Bound", "capacity": cap, "accessModes": modes}}),
            )
        })
        .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Helpers for tests

/// A PVC object: ReadWriteOnce, `size` requested, class `storage_class`,
/// annotated with the selected node (as the scheduler would) when `node`.
pub fn pvc(
    ns: &str,
    name: &str,
    storage_class: &str,
    size: &str,
    node: Option<&str>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            annotations: node.map(|n| [(ANN_SELECTED_NODE.to_string(), n.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(size.into()))].into()),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: Some(storage_class.into()),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// Creates a claim (see [`pvc`]).
pub async fn claim(
    client: &kube::Client,
    ns: &str,
    name: &str,
    storage_class: &str,
    size: &str,
    node: Option<&str>,
) -> Result<PersistentVolumeClaim> {
    create_claim(client, &pvc(ns, name, storage_class, size, node)).await
}

pub async fn create_claim(
    client: &kube::Client,
    c: &PersistentVolumeClaim,
) -> Result<PersistentVolumeClaim> {
    let ns = c.namespace().unwrap_or_else(|| "default".into());
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), c)
        .await
        .with_context(|| format!("creating claim {ns}/{}", c.name_any()))
}

/// What the scheduler does for a `WaitForFirstConsumer` claim once it has
/// picked a node for the pod.
pub async fn select_node(
    client: &kube::Client,
    ns: &str,
    name: &str,
    node: &str,
) -> Result<PersistentVolumeClaim> {
    let patch = json!({"metadata": {"annotations": {ANN_SELECTED_NODE: node}}});
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotating claim {ns}/{name}"))
}

/// Deletes a claim (absent is fine). Nothing here models the
/// `kubernetes.io/pvc-protection` finalizer: the fake deletes at once.
pub async fn delete_claim(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    match Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("deleting claim {ns}/{name}"))),
    }
}

fn brief<K: serde::Serialize>(o: Option<&K>) -> String {
    let mut s = o
        .map(|o| serde_json::to_string(o).unwrap_or_default())
        .unwrap_or_else(|| "<absent>".into());
    if let Some((cut, _)) = s.char_indices().nth(1500) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Watches one object (by name) until `pred` holds for its current state
/// (`None` = absent). Watch errors are retried; only the timeout fails.
pub async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(Option<&K>) -> bool,
) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + serde::Serialize + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
    let mut cur: Option<K> = None;
    let mut init: Option<K> = None;
    let wait = async {
        loop {
            match stream.next().await {
                Some(Ok(watcher::Event::Init)) => init = None,
                Some(Ok(watcher::Event::InitApply(o))) => init = Some(o),
                Some(Ok(watcher::Event::InitDone)) => cur = init.take(),
                Some(Ok(watcher::Event::Apply(o))) => cur = Some(o),
                Some(Ok(watcher::Event::Delete(_))) => cur = None,
                Some(Err(_)) => continue,
                None => bail!("watch for {what} ended"),
            }
            if pred(cur.as_ref()) {
                return Ok(cur.clone());
            }
        }
    };
    let r = tokio::time::timeout(timeout, wait).await;
    match r {
        Ok(r) => r,
        Err(_) => bail!(
            "timed out after {timeout:?} waiting for {what}; last seen: {}",
            brief(cur.as_ref())
        ),
    }
}

/// Waits until the claim is `Bound` and returns its PV (itself `Bound`, with
/// `claimRef` on this claim's uid).
pub async fn wait_bound(
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<PersistentVolume> {
    let deadline = tokio::time::Instant::now() + timeout;
    let c = wait_for(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        name,
        &format!("claim {ns}/{name} Bound"),
        timeout,
        |c| c.is_some_and(|c| claim_phase(c) == "Bound" && claim_volume(c).is_some()),
    )
    .await?
    .ok_or_else(|| anyhow!("claim {ns}/{name} vanished"))?;
    let vname = claim_volume(&c).unwrap_or_default().to_string();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    wait_for(
        Api::<PersistentVolume>::all(client.clone()),
        &vname,
        &format!("volume {vname} Bound to {ns}/{name}"),
        left,
        |pv| pv.is_some_and(|pv| pv_phase(pv) == "Bound" && is_bound_exactly(pv, &c)),
    )
    .await?
    .ok_or_else(|| anyhow!("volume {vname} vanished"))
}

/// Waits until the PV is in `phase`.
pub async fn wait_phase(
    client: &kube::Client,
    pv_name: &str,
    phase: &str,
    timeout: Duration,
) -> Result<PersistentVolume> {
    wait_for(
        Api::<PersistentVolume>::all(client.clone()),
        pv_name,
        &format!("volume {pv_name} {phase}"),
        timeout,
        |pv| pv.is_some_and(|pv| pv_phase(pv) == phase),
    )
    .await?
    .ok_or_else(|| anyhow!("volume {pv_name} vanished"))
}

/// Waits until the claim is in `phase`.
pub async fn wait_claim_phase(
    client: &kube::Client,
    ns: &str,
    name: &str,
    phase: &str,
    timeout: Duration,
) -> Result<PersistentVolumeClaim> {
    wait_for(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        name,
        &format!("claim {ns}/{name} {phase}"),
        timeout,
        |c| c.is_some_and(|c| claim_phase(c) == phase),
    )
    .await?
    .ok_or_else(|| anyhow!("claim {ns}/{name} vanished"))
}

/// Waits (on the watch) for an Event with `reason` about the claim
/// `ns/name`, and returns it. The binder records one each time it looks at a
/// claim it does not bind and its verdict changed.
pub async fn wait_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Result<Event> {
    wait_event_with(client, ns, name, reason, "", timeout).await
}

/// [`wait_event`] for an Event whose message contains `message_part`
/// (earlier Events with the same reason are skipped).
pub async fn wait_event_with(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    message_part: &str,
    timeout: Duration,
) -> Result<Event> {
    let api = Api::<Event>::namespaced(client.clone(), ns);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut seen: Vec<String> = Vec::new();
    let wait = async {
        loop {
            let e = match stream.next().await {
                Some(Ok(watcher::Event::Apply(e) | watcher::Event::InitApply(e))) => e,
                Some(_) => continue,
                None => bail!("event watch ended"),
            };
            let about = e.involved_object.kind.as_deref() == Some("PersistentVolumeClaim")
                && e.involved_object.name.as_deref() == Some(name);
            if !about {
                continue;
            }
            let msg = e.message.clone().unwrap_or_default();
            seen.push(format!("{}: {msg}", e.reason.as_deref().unwrap_or("")));
            if e.reason.as_deref() == Some(reason) && msg.contains(message_part) {
                return Ok(e);
            }
        }
    };
    let r = tokio::time::timeout(timeout, wait).await;
    match r {
        Ok(r) => r,
        Err(_) => bail!(
            "timed out after {timeout:?} waiting for a {reason} event ({message_part:?}) on claim {ns}/{name}; saw {seen:?}"
        ),
    }
}

/// A local PV (like disklet's): `size`, ReadWriteOnce, Filesystem, class
/// `storage_class`, Retain, node affinity `kubernetes.io/hostname In
/// [hostname]`.
pub fn local_pv(name: &str, storage_class: &str, size: &str, hostname: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "storageClassName": storage_class,
            "persistentVolumeReclaimPolicy": "Retain",
            "local": {"path": format!("/mnt/disks/{name}")},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [hostname]}
            ]}]}}
        }
    })
}
