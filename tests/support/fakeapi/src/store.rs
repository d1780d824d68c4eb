//! The in-memory object store: one global resourceVersion counter, a bounded
//! event history for watch replay, and the write semantics of the real
//! apiserver (preconditions, status subresource, finalizers, managedFields).

use crate::error::{ApiError, Cause};
use crate::fields::{self, Scope};
use crate::patch::{self, PatchType};
use crate::resources::{self, info, ResourceId, ResourceInfo, RESOURCES};
use crate::selector::{FieldSelector, LabelReq, LabelSelector};
use crate::validation;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A committed change.
#[derive(Debug)]
pub struct Event {
    /// Resource type.
    pub resource: ResourceId,
    /// resourceVersion of the change.
    pub rv: u64,
    /// Type.
    pub kind: EventType,
    /// Object after the change (for DELETED: the last state, with `rv`).
    pub object: Arc<Value>,
    /// Object before the change (MODIFIED/DELETED).
    pub prev: Option<Arc<Value>>,
}

/// What watchers receive on the broadcast channel.
#[derive(Debug, Clone)]
pub enum Signal {
    /// A committed change.
    Event(Arc<Event>),
    /// Send a bookmark now (to watchers that allow them).
    Bookmark,
    /// Close every watch stream now.
    Close,
}

/// Options common to writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `fieldManager`.
    pub field_manager: Option<String>,
    /// Manager derived from User-Agent when `fieldManager` is absent.
    pub default_manager: String,
    /// `force` (server-side apply).
    pub force: bool,
}

impl WriteOpts {
    fn manager(&self) -> String {
        match &self.field_manager {
            Some(m) if !m.is_empty() => m.clone(),
            _ if !self.default_manager.is_empty() => self.default_manager.clone(),
            _ => "unknown".into(),
        }
    }
}

/// Delete options.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

/// List parameters.
#[derive(Debug, Clone, Default)]
pub struct ListOpts {
    /// Namespace restriction (None: all).
    pub namespace: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// `limit` (0/None: no limit).
    pub limit: Option<usize>,
    /// `continue` token.
    pub continue_token: Option<String>,
}

/// Key within one resource's map: (namespace, name); namespace is "" for cluster-scoped.
pub type ObjKey = (String, String);

/// Per resource: (label key, label value) → keys of the objects carrying it.
type LabelIndex = HashMap<(String, String), BTreeSet<ObjKey>>;

/// The store state. Callers hold the `tokio::sync::Mutex` around it.
pub struct Store {
    objects: Vec<BTreeMap<ObjKey, Arc<Value>>>,
    /// A list or watch whose selector has a `key=value` requirement visits
    /// only the objects with that label, not every object of the type (an
    /// agent listing its own PVs among 100,000 of other nodes).
    labels: Vec<LabelIndex>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_size: usize,
    compacted_rv: u64,
    tx: broadcast::Sender<Signal>,
}

/// Current time, RFC 3339 with second precision as the apiserver writes it.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
}

fn set_meta(obj: &mut Value, key: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        if value.is_null() {
            m.remove(key);
        } else {
            m.insert(key.to_string(), value);
        }
    }
}

/// The labels of an object whose values are strings (the only ones a
/// `key=value` requirement matches).
fn string_labels(obj: &Value) -> impl Iterator<Item = (&str, &str)> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)))
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// Strip what differs on every write to compare two states.
fn comparable(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(Value::Object(m)) = c.get_mut("metadata") {
        m.remove("resourceVersion");
    }
    c
}

fn non_meta_non_status(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Value::Object(m) = &mut c {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    c
}

/// Result of a delete.
#[derive(Debug, Clone)]
pub enum DeleteOutcome {
    /// Removed; carries the final state.
    Deleted(Value),
    /// Finalizers pending; carries the object with deletionTimestamp set.
    Pending(Value),
}

impl Store {
    /// Empty store with the given watch history size.
    pub fn new(history_size: usize, tx: broadcast::Sender<Signal>) -> Self {
        Store {
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            labels: RESOURCES.iter().map(|_| HashMap::new()).collect(),
            rv: 1,
            history: VecDeque::new(),
            history_size: history_size.max(1),
            compacted_rv: 0,
            tx,
        }
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Highest RV no longer replayable (watch from it or older is 410).
    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Forget all history (as an etcd compaction at the current revision).
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    /// Subscribe to signals. Do it while holding the lock to get a gap-free view.
    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.tx.subscribe()
    }

    /// Events with rv > `after`, or None if some are compacted away.
    pub fn events_after(&self, after: u64) -> Option<Vec<Arc<Event>>> {
        if after < self.compacted_rv {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.rv > after)
                .cloned()
                .collect(),
        )
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(
        &mut self,
        resource: ResourceId,
        kind: EventType,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        let ev = Arc::new(Event {
            resource,
            rv: self.rv,
            kind,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_size {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        // no receivers is fine
        let _ = self.tx.send(Signal::Event(ev));
    }

    fn key(res: &ResourceInfo, ns: Option<&str>, name: &str) -> ObjKey {
        let ns = if res.namespaced { ns.unwrap_or("") } else { "" };
        (ns.to_string(), name.to_string())
    }

    /// Stores `obj` under `key`, keeping the label index in step.
    fn put(&mut self, rid: ResourceId, key: ObjKey, obj: Arc<Value>) {
        if let Some(old) = self.objects[rid].insert(key.clone(), obj.clone()) {
            self.unindex(rid, &key, &old);
        }
        for (k, v) in string_labels(&obj) {
            self.labels[rid]
                .entry((k.to_string(), v.to_string()))
                .or_default()
                .insert(key.clone());
        }
    }

    /// Removes the object under `key`, keeping the label index in step.
    fn take(&mut self, rid: ResourceId, key: &ObjKey) -> Option<Arc<Value>> {
        let old = self.objects[rid].remove(key)?;
        self.unindex(rid, key, &old);
        Some(old)
    }

    fn unindex(&mut self, rid: ResourceId, key: &ObjKey, obj: &Value) {
        for (k, v) in string_labels(obj) {
            let idx = (k.to_string(), v.to_string());
            if let Some(set) = self.labels[rid].get_mut(&idx) {
                set.remove(key);
                if set.is_empty() {
                    self.labels[rid].remove(&idx);
                }
            }
        }
    }

    /// The objects a selector can match, in key order from `start`: those
    /// carrying the rarest of its `key=value` labels (index), or all.
    fn candidates<'a>(
        &'a self,
        rid: ResourceId,
        labels: &LabelSelector,
        start: Bound<ObjKey>,
    ) -> Box<dyn Iterator<Item = (&'a ObjKey, &'a Arc<Value>)> + 'a> {
        let map = &self.objects[rid];
        let narrowest = labels
            .reqs
            .iter()
            .filter_map(|r| match r {
                LabelReq::Eq(k, v) => Some(
                    self.labels[rid]
                        .get(&(k.clone(), v.clone()))
                        .map_or(0, BTreeSet::len),
                )
                .map(|n| (n, k, v)),
                _ => None,
            })
            .min_by_key(|(n, _, _)| *n);
        match narrowest {
            None => Box::new(map.range((start, Bound::Unbounded))),
            Some((_, k, v)) => match self.labels[rid].get(&(k.clone(), v.clone())) {
                None => Box::new(std::iter::empty()),
                Some(keys) => Box::new(
                    keys.range((start, Bound::Unbounded))
                        .filter_map(move |key| map.get_key_value(key)),
                ),
            },
        }
    }

    /// Objects of a type (optionally one namespace) matching a label
    /// selector, sorted; uses the label index.
    pub fn select(
        &self,
        rid: ResourceId,
        ns: Option<&str>,
        labels: &LabelSelector,
    ) -> Vec<Arc<Value>> {
        self.candidates(rid, labels, Bound::Unbounded)
            .filter(|((n, _), v)| ns.is_none_or(|x| x == n) && labels.matches(v))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Get one object.
    pub fn get(&self, rid: ResourceId, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let res = info(rid);
        self.objects[rid]
            .get(&Self::key(res, ns, name))
            .map(|v| (**v).clone())
            .ok_or_else(|| ApiError::not_found(res.group, res.plural, name))
    }

    /// Snapshot of all objects of a type (optionally one namespace), sorted.
    pub fn snapshot(&self, rid: ResourceId, ns: Option<&str>) -> Vec<Arc<Value>> {
        self.objects[rid]
            .iter()
            .filter(|((n, _), _)| ns.is_none_or(|x| x == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// List with selectors and pagination; returns the `<Kind>List` object.
    pub fn list(&self, rid: ResourceId, opts: &ListOpts) -> Result<Value, ApiError> {
        let res = info(rid);
        let (items, metadata) = self.list_shared(rid, opts)?;
        let items: Vec<Value> = items.iter().map(|v| (**v).clone()).collect();
        Ok(json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Matching objects (shared, not cloned) and the list metadata.
    pub fn list_shared(
        &self,
        rid: ResourceId,
        opts: &ListOpts,
    ) -> Result<(Vec<Arc<Value>>, Value), ApiError> {
        let res = info(rid);
        let mut list_rv = self.rv;
        let start = match &opts.continue_token {
            Some(tok) if !tok.is_empty() => {
                let (rv, key) = decode_continue(tok)?;
                if rv < self.compacted_rv {
                    let mut e = ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.");
                    e.reason = "Expired".into();
                    return Err(e);
                }
                list_rv = rv;
                Bound::Excluded(key)
            }
            _ => Bound::Unbounded,
        };
        let ns_filter = if res.namespaced {
            opts.namespace.as_deref()
        } else {
            None
        };
        let limit = opts.limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut last_key: Option<ObjKey> = None;
        let mut remaining = 0usize;
        let mut more = false;
        for (k, v) in self.candidates(rid, &opts.labels, start) {
            if ns_filter.is_some_and(|n| n != k.0) {
                continue;
            }
            if !opts.labels.matches(v) || !opts.fields.matches(v) {
                continue;
            }
            if let Some(l) = limit {
                if items.len() >= l {
                    more = true;
                    remaining += 1;
                    continue;
                }
            }
            items.push(v.clone());
            last_key = Some(k.clone());
        }
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if more {
            if let Some(k) = last_key {
                metadata["continue"] = json!(encode_continue(list_rv, &k));
                if opts.labels.is_empty() && opts.fields.is_empty() {
                    metadata["remainingItemCount"] = json!(remaining);
                }
            }
        }
        Ok((items, metadata))
    }

    fn check_namespace(&self, res: &ResourceInfo, ns: Option<&str>) -> Result<(), ApiError> {
        if !res.namespaced {
            return Ok(());
        }
        let ns = ns.unwrap_or("");
        if ns.is_empty() {
            return Err(ApiError::bad_request(
                "the server could not find the requested resource",
            ));
        }
        let ns_id = resources::lookup("", "v1", "namespaces").unwrap_or(0);
        if !self.objects[ns_id].contains_key(&(String::new(), ns.to_string())) {
            return Err(ApiError::not_found("", "namespaces", ns));
        }
        Ok(())
    }

    fn check_type_meta(res: &ResourceInfo, obj: &mut Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml"));
        }
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind.is_empty() || api_version.is_empty() {
            // the real decoder defaults these from the URL for JSON bodies
            obj["apiVersion"] = json!(res.api_version());
            obj["kind"] = json!(res.kind);
            return Ok(());
        }
        if api_version != res.api_version() || kind != res.kind {
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            let mut causes = Vec::new();
            if kind != res.kind {
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: \"{kind}\": must be {}", res.kind),
                    field: "kind".into(),
                });
            }
            if api_version != res.api_version() {
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: \"{api_version}\": must be {}",
                        res.api_version()
                    ),
                    field: "apiVersion".into(),
                });
            }
            return Err(ApiError::invalid(res.group, res.kind, &name, causes));
        }
        Ok(())
    }

    /// Create an object.
    pub fn create(
        &mut self,
        rid: ResourceId,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.create_inner(rid, ns, obj, opts, None)
    }

    fn create_inner(
        &mut self,
        rid: ResourceId,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOpts,
        managed: Option<Value>,
    ) -> Result<Value, ApiError> {
        let res = info(rid);
        Self::check_type_meta(res, &mut obj)?;
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let body_ns = meta_str(&obj, "namespace").unwrap_or("").to_string();
        if res.namespaced {
            let ns = ns.unwrap_or("");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            self.check_namespace(res, Some(ns))?;
            set_meta(&mut obj, "namespace", json!(ns));
        } else {
            set_meta(&mut obj, "namespace", Value::Null);
        }
        let mut name = meta_str(&obj, "name").unwrap_or("").to_string();
        if name.is_empty() {
            if let Some(prefix) = meta_str(&obj, "generateName").filter(|p| !p.is_empty()) {
                name = format!("{prefix}{}", random_suffix());
                set_meta(&mut obj, "name", json!(name));
            }
        }
        if let Some(c) = validation::validate_name(res, &name) {
            return Err(ApiError::invalid(res.group, res.kind, &name, vec![c]));
        }
        let key = Self::key(res, ns, &name);
        if self.objects[rid].contains_key(&key) {
            return Err(ApiError::already_exists(res.group, res.plural, &name));
        }
        if res.reset_status_on_create {
            if let Value::Object(m) = &mut obj {
                m.remove("status");
            }
        }
        for k in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            set_meta(&mut obj, k, Value::Null);
        }
        validation::apply_defaults(res, &mut obj);
        let causes = validation::validate_object(res, &obj, None);
        if !causes.is_empty() {
            return Err(ApiError::invalid(res.group, res.kind, &name, causes));
        }
        let ts = now();
        if res.plural == "persistentvolumes" {
            if let Some(Value::Object(st)) = obj.get_mut("status") {
                st.insert("lastPhaseTransitionTime".into(), json!(ts));
            }
        }
        set_meta(&mut obj, "uid", json!(uuid::Uuid::new_v4().to_string()));
        set_meta(&mut obj, "creationTimestamp", json!(ts));
        set_meta(&mut obj, "generation", json!(1));
        match managed {
            Some(m) => set_meta(&mut obj, "managedFields", m),
            None => fields::track_update(
                None,
                &mut obj,
                &opts.manager(),
                &res.api_version(),
                None,
                Scope::All,
                &ts,
            ),
        }
        if opts.dry_run {
            set_meta(&mut obj, "resourceVersion", Value::Null);
            return Ok(obj);
        }
        let rv = self.next_rv();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        let arc = Arc::new(obj);
        self.put(rid, key, arc.clone());
        self.emit(rid, EventType::Added, arc.clone(), None);
        Ok((*arc).clone())
    }

    /// Replace (PUT). `status` selects the `/status` subresource.
    pub fn update(
        &mut self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
        status: bool,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let res = info(rid);
        Self::check_type_meta(res, &mut body)?;
        let body_name = meta_str(&body, "name").unwrap_or("");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = Self::key(res, ns, name);
        let old = self.objects[rid]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.group, res.plural, name))?;
        self.commit(rid, key, old, body, status, Mgmt::Update, opts)
    }

    /// Patch. `status` selects the `/status` subresource. Server-side apply
    /// creates the object if absent (returns `(object, created)`).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        ptype: PatchType,
        patch_body: &Value,
        status: bool,
        opts: &WriteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let res = info(rid);
        let key = Self::key(res, ns, name);
        let old = self.objects[rid].get(&key).cloned();
        if ptype == PatchType::Apply {
            let manager = match &opts.field_manager {
                Some(m) if !m.is_empty() => m.clone(),
                _ => {
                    return Err(ApiError::bad_request(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ))
                }
            };
            let mut applied = patch_body.clone();
            if !applied.is_object() {
                return Err(ApiError::bad_request("apply patch must be an object"));
            }
            let av = applied
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            let kd = applied.get("kind").and_then(Value::as_str).unwrap_or("");
            if av.is_empty() || kd.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid object type: /, Kind=: apiVersion and kind must be set",
                ));
            }
            Self::check_type_meta(res, &mut applied)?;
            let applied_name = meta_str(&applied, "name").unwrap_or("");
            if applied_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({applied_name}) does not match the name on the URL ({name})"
                )));
            }
            let scope = scope_for(res, status);
            let ts = now();
            match old {
                None => {
                    if status {
                        return Err(ApiError::not_found(res.group, res.plural, name));
                    }
                    if meta_str(&applied, "resourceVersion").is_some_and(|s| !s.is_empty()) {
                        return Err(ApiError::conflict_modified(res.group, res.plural, name));
                    }
                    let merged = fields::server_side_apply(
                        None,
                        &applied,
                        &manager,
                        opts.force,
                        &res.api_version(),
                        None,
                        if res.reset_status_on_create {
                            Scope::NoStatus
                        } else {
                            Scope::All
                        },
                        &ts,
                    )?;
                    let mut obj = merged.object;
                    obj["apiVersion"] = json!(res.api_version());
                    obj["kind"] = json!(res.kind);
                    let managed = obj.pointer("/metadata/managedFields").cloned();
                    let created = self.create_inner(rid, ns, obj, opts, managed)?;
                    Ok((created, true))
                }
                Some(old) => {
                    let merged = fields::server_side_apply(
                        Some(&old),
                        &applied,
                        &manager,
                        opts.force,
                        &res.api_version(),
                        if status { Some("status") } else { None },
                        scope,
                        &ts,
                    )?;
                    let mut candidate = merged.object;
                    // an apply without resourceVersion is unconditional
                    let rv_pre = meta_str(&applied, "resourceVersion").map(str::to_string);
                    set_meta(
                        &mut candidate,
                        "resourceVersion",
                        json!(rv_pre.unwrap_or_default()),
                    );
                    let out = self.commit(rid, key, old, candidate, status, Mgmt::Keep, opts)?;
                    Ok((out, false))
                }
            }
        } else {
            let old = old.ok_or_else(|| ApiError::not_found(res.group, res.plural, name))?;
            let mut doc = (*old).clone();
            match ptype {
                PatchType::Merge => patch::merge_patch(&mut doc, patch_body),
                PatchType::Strategic => patch::strategic_merge(&mut doc, patch_body)?,
                PatchType::Json => patch::json_patch(&mut doc, patch_body)?,
                PatchType::Apply => {}
            }
            // a patch that does not mention resourceVersion is unconditional
            let mentioned = match ptype {
                PatchType::Json => {
                    meta_str(&doc, "resourceVersion") != meta_str(&old, "resourceVersion")
                }
                _ => patch_body.pointer("/metadata/resourceVersion").is_some(),
            };
            if !mentioned {
                set_meta(&mut doc, "resourceVersion", json!(""));
            }
            let out = self.commit(rid, key, old, doc, status, Mgmt::Update, opts)?;
            Ok((out, false))
        }
    }

    /// The shared update pipeline.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        rid: ResourceId,
        key: ObjKey,
        old: Arc<Value>,
        mut candidate: Value,
        status: bool,
        mgmt: Mgmt,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let res = info(rid);
        let name = key.1.clone();
        if !candidate.is_object() {
            return Err(ApiError::bad_request(
                "the patched or updated object is not a JSON object",
            ));
        }
        if status && !res.has_status {
            return Err(ApiError::path_not_found());
        }
        // preconditions
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_string();
        if let Some(rv) = meta_str(&candidate, "resourceVersion").filter(|s| !s.is_empty()) {
            if rv != old_rv {
                return Err(ApiError::conflict_modified(res.group, res.plural, &name));
            }
        }
        let old_uid = meta_str(&old, "uid").unwrap_or("").to_string();
        if let Some(uid) = meta_str(&candidate, "uid").filter(|s| !s.is_empty()) {
            if uid != old_uid {
                return Err(ApiError::conflict(
                    res.group,
                    res.plural,
                    &name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"),
                ));
            }
        }
        candidate["apiVersion"] = json!(res.api_version());
        candidate["kind"] = json!(res.kind);
        // system metadata comes from the stored object
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
            "resourceVersion",
            "selfLink",
        ] {
            let v = old
                .pointer(&format!("/metadata/{k}"))
                .cloned()
                .unwrap_or(Value::Null);
            set_meta(&mut candidate, k, v);
        }
        if mgmt == Mgmt::Update {
            let v = old
                .pointer("/metadata/managedFields")
                .cloned()
                .unwrap_or(Value::Null);
            set_meta(&mut candidate, "managedFields", v);
        }
        // status subresource rules
        let mut new = if status {
            let mut n = (*old).clone();
            match candidate.get("status") {
                Some(s) => n["status"] = s.clone(),
                None => {
                    if let Value::Object(m) = &mut n {
                        m.remove("status");
                    }
                }
            }
            if mgmt == Mgmt::Keep {
                let v = candidate
                    .pointer("/metadata/managedFields")
                    .cloned()
                    .unwrap_or(Value::Null);
                set_meta(&mut n, "managedFields", v);
            }
            n
        } else {
            if res.has_status {
                match old.get("status") {
                    Some(s) => candidate["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut candidate {
                            m.remove("status");
                        }
                    }
                }
            }
            candidate
        };
        validation::apply_defaults(res, &mut new);
        let causes = validation::validate_object(res, &new, Some(&old));
        if !causes.is_empty() {
            return Err(ApiError::invalid(res.group, res.kind, &name, causes));
        }
        // finalizers on a terminating object may only shrink
        let terminating = old
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null());
        let new_fin = finalizers(&new);
        if terminating {
            let old_fin = finalizers(&old);
            let added: Vec<&String> = new_fin.iter().filter(|f| !old_fin.contains(f)).collect();
            if !added.is_empty() {
                let list: Vec<String> = added.iter().map(|f| format!("\"{f}\"")).collect();
                return Err(ApiError::invalid(
                    res.group,
                    res.kind,
                    &name,
                    vec![Cause {
                        reason: "FieldValueForbidden".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                            list.join(", ")
                        ),
                        field: "metadata.finalizers".into(),
                    }],
                ));
            }
        }
        let ts = now();
        if status
            && res.plural == "persistentvolumes"
            && new.pointer("/status/phase") != old.pointer("/status/phase")
        {
            if let Some(Value::Object(st)) = new.get_mut("status") {
                st.insert("lastPhaseTransitionTime".into(), json!(ts));
            }
        }
        if mgmt == Mgmt::Update {
            let scope = scope_for(res, status);
            fields::track_update(
                Some(&old),
                &mut new,
                &opts.manager(),
                &res.api_version(),
                if status { Some("status") } else { None },
                scope,
                &ts,
            );
        }
        if comparable(&new) == comparable(&old) {
            return Ok((*old).clone());
        }
        if non_meta_non_status(&new) != non_meta_non_status(&old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            set_meta(&mut new, "generation", json!(g + 1));
        }
        if opts.dry_run {
            return Ok(new);
        }
        let rv = self.next_rv();
        set_meta(&mut new, "resourceVersion", json!(rv.to_string()));
        let arc = Arc::new(new);
        if terminating && new_fin.is_empty() {
            self.take(rid, &key);
            self.emit(rid, EventType::Deleted, arc.clone(), Some(old));
        } else {
            self.put(rid, key, arc.clone());
            self.emit(rid, EventType::Modified, arc.clone(), Some(old));
        }
        Ok((*arc).clone())
    }

    /// Delete one object.
    pub fn delete(
        &mut self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<DeleteOutcome, ApiError> {
        let res = info(rid);
        let key = Self::key(res, ns, name);
        let old = self.objects[rid]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.group, res.plural, name))?;
        if let Some(uid) = opts.uid.as_deref().filter(|s| !s.is_empty()) {
            let cur = meta_str(&old, "uid").unwrap_or("");
            if uid != cur {
                return Err(ApiError::conflict(
                    res.group,
                    res.plural,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {cur}"),
                ));
            }
        }
        if let Some(rv) = opts.resource_version.as_deref().filter(|s| !s.is_empty()) {
            let cur = meta_str(&old, "resourceVersion").unwrap_or("");
            if rv != cur {
                return Err(ApiError::conflict(
                    res.group,
                    res.plural,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {cur}"),
                ));
            }
        }
        if !finalizers(&old).is_empty() {
            if old
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null())
            {
                return Ok(DeleteOutcome::Pending((*old).clone()));
            }
            let mut new = (*old).clone();
            set_meta(&mut new, "deletionTimestamp", json!(now()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            if opts.dry_run {
                return Ok(DeleteOutcome::Pending(new));
            }
            let rv = self.next_rv();
            set_meta(&mut new, "resourceVersion", json!(rv.to_string()));
            let arc = Arc::new(new);
            self.put(rid, key, arc.clone());
            self.emit(rid, EventType::Modified, arc.clone(), Some(old));
            return Ok(DeleteOutcome::Pending((*arc).clone()));
        }
        if opts.dry_run {
            return Ok(DeleteOutcome::Deleted((*old).clone()));
        }
        let rv = self.next_rv();
        let mut last = (*old).clone();
        set_meta(&mut last, "resourceVersion", json!(rv.to_string()));
        self.take(rid, &key);
        let arc = Arc::new(last);
        self.emit(rid, EventType::Deleted, arc.clone(), Some(old));
        if res.plural == "namespaces" {
            // the namespace controller's job, done synchronously here
            for (i, r) in RESOURCES.iter().enumerate() {
                if !r.namespaced {
                    continue;
                }
                let keys: Vec<ObjKey> = self.objects[i]
                    .keys()
                    .filter(|(n, _)| n == name)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(o) = self.take(i, &k) {
                        self.next_rv();
                        let mut l = (*o).clone();
                        set_meta(&mut l, "resourceVersion", json!(self.rv.to_string()));
                        self.emit(i, EventType::Deleted, Arc::new(l), Some(o));
                    }
                }
            }
        }
        Ok(DeleteOutcome::Deleted((*arc).clone()))
    }

    /// Delete every object matching the list options.
    pub fn delete_collection(
        &mut self,
        rid: ResourceId,
        lopts: &ListOpts,
        dopts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let res = info(rid);
        let ns_filter = if res.namespaced {
            lopts.namespace.clone()
        } else {
            None
        };
        let keys: Vec<ObjKey> = self
            .candidates(rid, &lopts.labels, Bound::Unbounded)
            .filter(|(k, v)| {
                ns_filter.as_deref().is_none_or(|n| n == k.0)
                    && lopts.labels.matches(v)
                    && lopts.fields.matches(v)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for (ns, name) in keys {
            let nso = if res.namespaced {
                Some(ns.as_str())
            } else {
                None
            };
            match self.delete(rid, nso, &name, dopts)? {
                DeleteOutcome::Deleted(v) | DeleteOutcome::Pending(v) => items.push(v),
            }
        }
        Ok(json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mgmt {
    /// Track ownership as an Update by the writer.
    Update,
    /// managedFields already computed (server-side apply).
    Keep,
}

fn scope_for(res: &ResourceInfo, status: bool) -> Scope {
    if status {
        Scope::StatusOnly
    } else if res.has_status {
        Scope::NoStatus
    } else {
        Scope::All
    }
}

fn encode_continue(rv: u64, key: &ObjKey) -> String {
    let tok =
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{}/{}\u{0}", key.0, key.1)});
    base64::engine::general_purpose::URL_SAFE.encode(tok.to_string())
}

fn decode_continue(tok: &str) -> Result<(u64, ObjKey), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {tok}"));
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(tok)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(tok))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let start = start.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, (ns.to_string(), name.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(name: &str, node: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"disklet.io/node": node, "tier": "x"}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": format!("/mnt/{name}")}}
        })
    }

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn list(
        st: &Store,
        rid: ResourceId,
        sel: &str,
        limit: Option<usize>,
        cont: Option<String>,
    ) -> Value {
        let opts = ListOpts {
            labels: LabelSelector::parse(sel).unwrap(),
            limit,
            continue_token: cont,
            ..Default::default()
        };
        st.list(rid, &opts).unwrap()
    }

    #[test]
    fn label_index_follows_writes_and_lists_like_a_scan() {
        let (tx, _) = broadcast::channel(16);
        let mut st = Store::new(100, tx);
        let rid = resources::lookup("", "v1", "persistentvolumes").unwrap();
        let w = WriteOpts::default();
        for i in 0..30 {
            let node = if i % 3 == 0 { "a" } else { "b" };
            st.create(rid, None, pv(&format!("pv-{i:02}"), node), &w)
                .unwrap();
        }
        let a: Vec<String> = (0..30)
            .filter(|i| i % 3 == 0)
            .map(|i| format!("pv-{i:02}"))
            .collect();
        assert_eq!(names(&list(&st, rid, "disklet.io/node=a", None, None)), a);
        // The narrowest requirement drives, the others still filter.
        assert_eq!(
            names(&list(&st, rid, "tier=x,disklet.io/node=a", None, None)),
            a
        );
        assert_eq!(
            names(&list(&st, rid, "disklet.io/node=a,tier!=x", None, None)),
            Vec::<String>::new()
        );
        assert!(names(&list(&st, rid, "disklet.io/node=zz", None, None)).is_empty());
        // Pages in key order, continue included.
        let p1 = list(&st, rid, "disklet.io/node=a", Some(4), None);
        assert_eq!(names(&p1), a[..4]);
        let tok = p1["metadata"]["continue"].as_str().unwrap().to_string();
        let p2 = list(&st, rid, "disklet.io/node=a", Some(100), Some(tok));
        assert_eq!(names(&p2), a[4..]);
        // Relabel moves it, delete removes it, a merge patch too.
        st.patch(
            rid,
            None,
            "pv-00",
            PatchType::Merge,
            &json!({"metadata": {"labels": {"disklet.io/node": "b"}}}),
            false,
            &w,
        )
        .unwrap();
        st.delete(rid, None, "pv-03", &DeleteOpts::default())
            .unwrap();
        assert_eq!(
            names(&list(&st, rid, "disklet.io/node=a", None, None)),
            a[2..]
        );
        assert!(names(&list(&st, rid, "disklet.io/node=b", None, None)).contains(&"pv-00".into()));
        assert_eq!(
            st.select(
                rid,
                None,
                &LabelSelector::parse("disklet.io/node=a").unwrap()
            )
            .len(),
            a.len() - 2
        );
        // Labels dropped entirely leave no trace in the index.
        st.patch(
            rid,
            None,
            "pv-06",
            PatchType::Merge,
            &json!({"metadata": {"labels": null}}),
            false,
            &w,
        )
        .unwrap();
        assert_eq!(
            names(&list(&st, rid, "disklet.io/node=a", None, None)),
            a[3..]
        );
        let del = st
            .delete_collection(
                rid,
                &ListOpts {
                    labels: LabelSelector::parse("disklet.io/node=b").unwrap(),
                    ..Default::default()
                },
                &DeleteOpts::default(),
            )
            .unwrap();
        assert_eq!(names(&del).len(), 21);
        assert_eq!(st.snapshot(rid, None).len(), 30 - 1 - 21);
        assert!(st.labels[rid]
            .keys()
            .all(|(k, v)| k != "disklet.io/node" || v == "a"));
    }
}
