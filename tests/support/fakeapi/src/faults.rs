//! Fault injection and the per-request log.

use crate::store::Signal;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// API verb of a request (as in audit logs / RBAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// GET one object.
    Get,
    /// GET a collection.
    List,
    /// GET a collection with `watch`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
    /// DELETE one object.
    Delete,
    /// DELETE a collection.
    #[serde(rename = "deletecollection")]
    DeleteCollection,
}

impl Verb {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

/// What a matching request gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum FaultAction {
    /// Answer with this HTTP status and a Status body (500 InternalError,
    /// 503 ServiceUnavailable, 504 Timeout, anything else).
    Status {
        /// HTTP code.
        code: u16,
    },
    /// 429 TooManyRequests with `Retry-After: N`.
    TooManyRequests {
        /// Seconds in `Retry-After`.
        retry_after_secs: u64,
    },
    /// Delay, then serve normally.
    Latency {
        /// Delay in milliseconds.
        millis: u64,
    },
    /// Close the connection without an answer.
    Reset,
}

/// Which requests a rule applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultMatch {
    /// Verb to match.
    #[serde(default)]
    pub verb: Option<Verb>,
    /// Resource plural (`persistentvolumes`), optionally `/status`, or `plural.group`.
    #[serde(default)]
    pub resource: Option<String>,
}

/// A fault rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Matcher.
    #[serde(default, rename = "match")]
    pub matcher: FaultMatch,
    /// Action.
    pub action: FaultAction,
    /// Number of requests to affect; None = until cleared.
    #[serde(default)]
    pub count: Option<u32>,
}

impl FaultRule {
    /// Rule for every request until cleared.
    pub fn always(action: FaultAction) -> Self {
        FaultRule {
            matcher: FaultMatch::default(),
            action,
            count: None,
        }
    }

    /// Restrict to a verb.
    pub fn verb(mut self, verb: Verb) -> Self {
        self.matcher.verb = Some(verb);
        self
    }

    /// Restrict to a resource.
    pub fn resource(mut self, resource: &str) -> Self {
        self.matcher.resource = Some(resource.to_string());
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.count = Some(n);
        self
    }
}

/// How an outage looks to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutageKind {
    /// Every API request gets 503.
    ServiceUnavailable,
    /// The listener is closed (connection refused) and open connections are cut.
    ConnectionRefused,
}

/// Identifier of an injected rule.
pub type FaultId = u64;

#[derive(Default)]
struct FaultState {
    next_id: FaultId,
    rules: Vec<(FaultId, FaultRule)>,
    expire_watch: Vec<(Option<String>, u32)>,
    outage: Option<OutageKind>,
    watch_lag: Duration,
}

/// What the request path must do, decided by [`Faults::check`].
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// Sleep first.
    pub delay: Duration,
    /// Then fail like this (None: serve).
    pub action: Option<FaultAction>,
}

/// Fault injection handle (cheap to clone).
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    signals: broadcast::Sender<Signal>,
    outage_tx: Arc<watch::Sender<Option<OutageKind>>>,
}

impl Faults {
    pub(crate) fn new(signals: broadcast::Sender<Signal>) -> Self {
        let (outage_tx, _) = watch::channel(None);
        Faults {
            state: Arc::new(Mutex::new(FaultState::default())),
            signals,
            outage_tx: Arc::new(outage_tx),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Add a rule; returns its id.
    pub fn inject(&self, rule: FaultRule) -> FaultId {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.rules.push((id, rule));
        id
    }

    /// Remove one rule.
    pub fn remove(&self, id: FaultId) {
        self.lock().rules.retain(|(i, _)| *i != id);
    }

    /// Remove every rule, pending watch expiries, and end any outage.
    pub fn clear(&self) {
        {
            let mut st = self.lock();
            st.rules.clear();
            st.expire_watch.clear();
            st.outage = None;
            st.watch_lag = Duration::ZERO;
        }
        self.outage_tx.send_replace(None);
    }

    /// Rules currently active.
    pub fn rules(&self) -> Vec<FaultRule> {
        self.lock().rules.iter().map(|(_, r)| r.clone()).collect()
    }

    /// Close every open watch stream now (clients see the stream end).
    pub fn drop_watches(&self) {
        let _ = self.signals.send(Signal::Close);
    }

    /// The next watch request whose `resourceVersion` equals `rv` (any RV
    /// when None, but not unset/"0") gets an ERROR event with 410 Expired.
    pub fn expire_next_watch(&self, rv: Option<&str>) {
        self.lock().expire_watch.push((rv.map(str::to_string), 1));
    }

    /// Hold every watch event (not the initial list) this long before it is
    /// sent, on every open and later watch: a watch that lags behind the
    /// writes, as a loaded apiserver's can. Zero ends it.
    pub fn watch_lag(&self, lag: Duration) {
        self.lock().watch_lag = lag;
    }

    pub(crate) fn current_watch_lag(&self) -> Duration {
        self.lock().watch_lag
    }

    /// Start an outage until [`Faults::end_outage`] or [`Faults::clear`].
    pub fn outage(&self, kind: OutageKind) {
        self.lock().outage = Some(kind);
        self.outage_tx.send_replace(Some(kind));
        self.drop_watches();
    }

    /// End an outage.
    pub fn end_outage(&self) {
        self.lock().outage = None;
        self.outage_tx.send_replace(None);
    }

    /// Current outage.
    pub fn current_outage(&self) -> Option<OutageKind> {
        self.lock().outage
    }

    pub(crate) fn outage_watch(&self) -> watch::Receiver<Option<OutageKind>> {
        self.outage_tx.subscribe()
    }

    /// Decide what to do with a request; consumes counted rules.
    pub(crate) fn check(
        &self,
        verb: Option<Verb>,
        resource: Option<&str>,
        group: &str,
    ) -> Decision {
        let mut st = self.lock();
        let mut d = Decision::default();
        if let Some(kind) = st.outage {
            d.action = Some(match kind {
                OutageKind::ServiceUnavailable => FaultAction::Status { code: 503 },
                OutageKind::ConnectionRefused => FaultAction::Reset,
            });
            return d;
        }
        let mut exhausted = Vec::new();
        for (id, rule) in st.rules.iter_mut() {
            let m = &rule.matcher;
            if m.verb.is_some_and(|v| Some(v) != verb) {
                continue;
            }
            if let Some(want) = &m.resource {
                let Some(res) = resource else { continue };
                let base = res.split('/').next().unwrap_or(res);
                let qualified = if group.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}.{group}")
                };
                if want != res && want != base && *want != qualified {
                    continue;
                }
            }
            match &rule.action {
                FaultAction::Latency { millis } => {
                    d.delay += Duration::from_millis(*millis);
                }
                other => {
                    if d.action.is_some() {
                        continue;
                    }
                    d.action = Some(other.clone());
                }
            }
            if let Some(c) = rule.count.as_mut() {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    exhausted.push(*id);
                }
            }
        }
        st.rules.retain(|(i, _)| !exhausted.contains(i));
        d
    }

    /// Whether a watch from `rv` must be expired (consumes the entry).
    pub(crate) fn take_watch_expiry(&self, rv: &str) -> bool {
        if rv.is_empty() || rv == "0" {
            return false;
        }
        let mut st = self.lock();
        let pos = st
            .expire_watch
            .iter()
            .position(|(want, _)| want.as_deref().is_none_or(|w| w == rv));
        match pos {
            Some(i) => {
                st.expire_watch[i].1 = st.expire_watch[i].1.saturating_sub(1);
                if st.expire_watch[i].1 == 0 {
                    st.expire_watch.remove(i);
                }
                true
            }
            None => false,
        }
    }
}

/// One served request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Sequence number from 1.
    pub seq: u64,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// API verb (None for discovery and other non-resource paths).
    pub verb: Option<Verb>,
    /// API group of the resource.
    pub group: String,
    /// Resource plural, with `/status` for the subresource.
    pub resource: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// `labelSelector` as sent (decoded).
    pub label_selector: Option<String>,
    /// `fieldSelector` as sent (decoded).
    pub field_selector: Option<String>,
    /// `resourceVersion` query parameter.
    pub resource_version: Option<String>,
    /// `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// `Content-Type` of the request (patch type).
    pub content_type: Option<String>,
    /// User-Agent.
    pub user_agent: Option<String>,
    /// Who sent it: the bearer token of the `Authorization` header. The fake
    /// authenticates nobody; a token only names the client, so that requests
    /// of several clients of one server can be told apart (see
    /// [`crate::kubeconfig_yaml_as`]).
    #[serde(default)]
    pub user: Option<String>,
    /// HTTP status answered (0 when the connection was cut).
    pub status: u16,
    /// Whether a fault rule shaped the answer.
    pub faulted: bool,
    /// When the request arrived, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_unix_ms: u64,
    /// Time to answer, in µs (for a watch: until the stream starts); 0 for
    /// faulted requests.
    #[serde(default)]
    pub micros: u64,
}

/// The request log.
#[derive(Clone, Default)]
pub struct RequestLog {
    inner: Arc<Mutex<Vec<RequestRecord>>>,
}

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(crate) fn push(&self, mut r: RequestRecord) {
        let mut g = self.lock();
        r.seq = g.len() as u64 + 1;
        g.push(r);
    }

    /// All records so far.
    pub fn all(&self) -> Vec<RequestRecord> {
        self.lock().clone()
    }

    /// Records for which `keep` holds.
    pub fn filtered(&self, keep: impl Fn(&RequestRecord) -> bool) -> Vec<RequestRecord> {
        self.lock().iter().filter(|r| keep(r)).cloned().collect()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was logged.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forget the log.
    pub fn clear(&self) {
        self.lock().clear();
    }
}
