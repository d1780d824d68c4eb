//! A faithful, in-memory fake Kubernetes API server for disklet's tests.
//!
//! Start it in-process with [`FakeApiServer::start`], point kubectl or kube-rs
//! at [`FakeApiServer::url`] / [`FakeApiServer::write_kubeconfig`], seed and
//! inspect objects with [`FakeApiServer::store`], inject faults with
//! [`FakeApiServer::faults`] and read what clients did with
//! [`FakeApiServer::requests`]. See README.md for the semantics implemented.

#![deny(missing_docs)]

mod discovery;
pub mod error;
pub mod faults;
pub mod fields;
mod openapi;
pub mod patch;
mod proto;
pub mod resources;
pub mod selector;
mod server;
pub mod store;
mod table;
pub mod validation;

pub use error::{ApiError, Cause, Details, FakeApiError};
pub use faults::{
    FaultAction, FaultId, FaultMatch, FaultRule, Faults, OutageKind, RequestRecord, Verb,
};
pub use patch::PatchType;
pub use server::DenyRule;
pub use store::{DeleteOutcome, WriteOpts};

use serde_json::Value;
use server::State;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::{DeleteOpts, ListOpts, Signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Server options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to bind (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Number of watch events retained for replay; older RVs get 410.
    pub history_size: usize,
    /// Interval of periodic BOOKMARK events for watchers that allow them.
    pub bookmark_interval: Duration,
    /// Capacity of the fan-out channel; a watcher that falls further behind gets 410.
    pub watch_buffer: usize,
    /// Namespaces created at start.
    pub namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_size: 1000,
            bookmark_interval: Duration::from_secs(5),
            watch_buffer: 16384,
            namespaces: vec!["default".into(), "kube-system".into()],
        }
    }
}

/// A running fake API server.
pub struct FakeApiServer {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Bind and start serving.
    pub async fn start(opts: Options) -> Result<Self, FakeApiError> {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| FakeApiError::Bind {
                addr: opts.listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| FakeApiError::Bind {
            addr: opts.listen.to_string(),
            source,
        })?;
        let state = Arc::new(State::new(opts));
        *state.addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(state.clone(), listener, rx));
        Ok(FakeApiServer {
            state,
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Write a kubeconfig whose user sends `token` as a bearer token: the
    /// requests of this client carry `user == Some(token)` in the log.
    pub fn write_kubeconfig_as(
        &self,
        path: impl AsRef<Path>,
        token: &str,
    ) -> Result<(), FakeApiError> {
        let path = path.as_ref();
        std::fs::write(path, kubeconfig_yaml_as(&self.url(), token)).map_err(|source| {
            FakeApiError::Io {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// Kubeconfig YAML (cluster, user and context all named `fake`).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Write the kubeconfig to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), FakeApiError> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| FakeApiError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Direct access to the objects (same code path as HTTP: watches fire).
    pub fn store(&self) -> StoreHandle {
        StoreHandle {
            state: self.state.clone(),
        }
    }

    /// Fault injection.
    pub fn faults(&self) -> Faults {
        self.state.faults.clone()
    }

    /// Every request served so far (admin `/_fake/` paths excluded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.log.all()
    }

    /// Requests sent with this bearer token (see [`kubeconfig_yaml_as`]).
    pub fn requests_of(&self, user: &str) -> Vec<RequestRecord> {
        self.state.log.filtered(|r| r.user.as_deref() == Some(user))
    }

    /// Number of requests served so far (cheap: no copy of the log).
    pub fn request_total(&self) -> usize {
        self.state.log.len()
    }

    /// Forget the request log.
    pub fn clear_requests(&self) {
        self.state.log.clear()
    }

    /// Request counts by (verb, resource, labelSelector).
    pub fn request_counts(&self) -> BTreeMap<(Verb, String, Option<String>), usize> {
        let mut out = BTreeMap::new();
        for r in self.state.log.all() {
            if let (Some(v), Some(res)) = (r.verb, r.resource) {
                *out.entry((v, res, r.label_selector)).or_insert(0) += 1;
            }
        }
        out
    }

    /// Number of requests with this verb on this resource (plural, `plural/status`).
    pub fn count(&self, verb: Verb, resource: &str) -> usize {
        self.state
            .log
            .all()
            .iter()
            .filter(|r| r.verb == Some(verb) && r.resource.as_deref() == Some(resource))
            .count()
    }

    /// Send a BOOKMARK now to every watcher that allows bookmarks.
    pub fn send_bookmarks(&self) {
        let _ = self.state.signals.send(Signal::Bookmark);
    }

    /// Drop all watch history: every RV older than the current one becomes
    /// "too old" (410) for watches and continue tokens.
    pub async fn compact(&self) {
        self.state.store.lock().await.compact();
    }

    /// Make SelfSubjectAccessReview answer `allowed: false` for `verb` on `resource` (`*` wildcards).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.state.deny_rules().push(DenyRule {
            verb: verb.to_string(),
            resource: resource.to_string(),
        });
    }

    /// Remove all deny rules.
    pub fn allow_all(&self) {
        self.state.deny_rules().clear();
    }

    /// Stop serving; closes watches and connections.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Kubeconfig for a server URL.
pub fn kubeconfig_yaml(url: &str) -> String {
    kubeconfig_with_user(url, "{}")
}

/// Kubeconfig for a server URL whose user authenticates with a bearer
/// token. The fake accepts any token and records it as the request's `user`.
pub fn kubeconfig_yaml_as(url: &str, token: &str) -> String {
    // A JSON string is a valid YAML flow scalar: any token is quoted safely.
    kubeconfig_with_user(url, &format!("{{token: {}}}", Value::from(token)))
}

fn kubeconfig_with_user(url: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: fake\n  user: {user}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\npreferences: {{}}\n"
    )
}

/// In-process access to the store. Resource names may be plural, singular,
/// kind, short name or `plural.group`.
#[derive(Clone)]
pub struct StoreHandle {
    state: Arc<State>,
}

fn resolve(resource: &str) -> Result<resources::ResourceId, FakeApiError> {
    resources::resolve(resource).ok_or_else(|| FakeApiError::UnknownResource(resource.to_string()))
}

fn resolve_obj(obj: &Value) -> Result<resources::ResourceId, FakeApiError> {
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    resources::lookup_kind(av, kind)
        .ok_or_else(|| FakeApiError::UnknownResource(format!("{av}/{kind}")))
}

fn ns_of(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn handle_opts() -> WriteOpts {
    WriteOpts {
        default_manager: "fake-apiserver-test".into(),
        ..Default::default()
    }
}

impl StoreHandle {
    /// Create (resource from `apiVersion`/`kind`, namespace from metadata, default `default`).
    pub async fn create(&self, obj: Value) -> Result<Value, FakeApiError> {
        let rid = resolve_obj(&obj)?;
        let ns = ns_of(&obj).unwrap_or_else(|| "default".into());
        let mut st = self.state.store.lock().await;
        Ok(st.create(rid, Some(&ns), obj, &handle_opts())?)
    }

    /// Get one object.
    pub async fn get(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, FakeApiError> {
        let rid = resolve(resource)?;
        Ok(self.state.store.lock().await.get(rid, namespace, name)?)
    }

    /// Get, or None when absent.
    pub async fn try_get(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, FakeApiError> {
        match self.get(resource, namespace, name).await {
            Ok(v) => Ok(Some(v)),
            Err(FakeApiError::Api(e)) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All objects of a type (every namespace), sorted by namespace and name.
    pub async fn list(&self, resource: &str) -> Result<Vec<Value>, FakeApiError> {
        let rid = resolve(resource)?;
        let st = self.state.store.lock().await;
        Ok(st
            .snapshot(rid, None)
            .into_iter()
            .map(|v| (*v).clone())
            .collect())
    }

    /// Objects matching a label selector.
    pub async fn list_selected(
        &self,
        resource: &str,
        label_selector: &str,
    ) -> Result<Vec<Value>, FakeApiError> {
        let rid = resolve(resource)?;
        let opts = ListOpts {
            labels: selector::LabelSelector::parse(label_selector)?,
            ..Default::default()
        };
        let list = self.state.store.lock().await.list(rid, &opts)?;
        Ok(list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Replace (PUT semantics: `metadata.resourceVersion`, if set, must match).
    pub async fn update(&self, obj: Value) -> Result<Value, FakeApiError> {
        self.put(obj, false).await
    }

    /// Replace the `status` of an object (PUT on `/status`).
    pub async fn update_status(&self, obj: Value) -> Result<Value, FakeApiError> {
        self.put(obj, true).await
    }

    async fn put(&self, obj: Value, status: bool) -> Result<Value, FakeApiError> {
        let rid = resolve_obj(&obj)?;
        let ns = ns_of(&obj);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut st = self.state.store.lock().await;
        Ok(st.update(rid, ns.as_deref(), &name, obj, status, &handle_opts())?)
    }

    /// Patch with any patch type (`status` for the subresource; `field_manager` required for Apply).
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        ptype: PatchType,
        patch: &Value,
        status: bool,
        field_manager: Option<&str>,
        force: bool,
    ) -> Result<Value, FakeApiError> {
        let rid = resolve(resource)?;
        let opts = WriteOpts {
            field_manager: field_manager.map(str::to_string),
            force,
            ..handle_opts()
        };
        let mut st = self.state.store.lock().await;
        Ok(st
            .patch(rid, namespace, name, ptype, patch, status, &opts)?
            .0)
    }

    /// Delete (honours finalizers).
    pub async fn delete(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<DeleteOutcome, FakeApiError> {
        let rid = resolve(resource)?;
        let mut st = self.state.store.lock().await;
        Ok(st.delete(rid, namespace, name, &DeleteOpts::default())?)
    }

    /// Current global resourceVersion.
    pub async fn resource_version(&self) -> String {
        self.state.store.lock().await.resource_version().to_string()
    }
}

/// Command-line options of the `fake-apiserver` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "fake-apiserver",
    about = "In-memory fake Kubernetes API server for tests"
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    pub kubeconfig_out: Option<std::path::PathBuf>,
    /// Watch history size (events kept for replay).
    #[arg(long, default_value_t = 1000)]
    pub history_size: usize,
    /// Bookmark interval in seconds.
    #[arg(long, default_value_t = 5)]
    pub bookmark_interval_secs: u64,
}

/// Entry point of the `fake-apiserver` binary: serve until SIGTERM/SIGINT.
/// Returns the process exit code.
pub fn run_cli() -> i32 {
    use clap::Parser;
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-apiserver: cannot start runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fake-apiserver: {e}");
            1
        }
    }
}

async fn run(cli: Cli) -> Result<(), FakeApiError> {
    use std::io::Write;
    let opts = Options {
        listen: cli.listen,
        history_size: cli.history_size,
        bookmark_interval: Duration::from_secs(cli.bookmark_interval_secs.max(1)),
        ..Options::default()
    };
    let srv = FakeApiServer::start(opts).await?;
    if let Some(p) = &cli.kubeconfig_out {
        srv.write_kubeconfig(p)?;
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", srv.url());
        let _ = out.flush();
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| FakeApiError::Runtime(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    srv.shutdown().await;
    Ok(())
}
