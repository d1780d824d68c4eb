//! The API calls disklet makes, all scoped to its own node: get its Node, get
//! StorageClasses, server-side apply its PVs, watch PVs labelled with its node
//! name (never another node's), and publish Events.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use tokio::sync::mpsc;

use crate::model::keys::{node_label_value, FIELD_MANAGER, LABEL_NODE};
use crate::model::{NodeInfo, ScInfo, HOSTNAME_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot reach the Kubernetes API: {0} (in a pod, the ServiceAccount token; outside, KUBECONFIG)")]
    Config(String),
    #[error("Node {node:?} not found: pass the name of this node with --node-name or NODE_NAME (spec.nodeName in the DaemonSet)")]
    NodeMissing { node: String },
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{what}: no answer from the API server within {}s", CALL_TIMEOUT.as_secs())]
    Timeout { what: String },
}

/// The longest one API call may take (a hung connection must not stall the
/// agent for the transport's 295 s). Watches are not bounded by it.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs one API call under `CALL_TIMEOUT`.
async fn bounded<T>(
    what: impl FnOnce() -> String,
    call: impl std::future::Future<Output = Result<T, KubeError>>,
) -> Result<T, KubeError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(KubeError::Timeout { what: what() }))
}

impl KubeError {
    /// A 409: the object changed since it was read (a precondition failed).
    pub fn is_conflict(&self) -> bool {
        matches!(self, KubeError::Api { source: kube::Error::Api(s), .. } if s.code == 409)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            KubeError::Config(_) => "config",
            KubeError::NodeMissing { .. } => "node-missing",
            KubeError::Api { .. } => "api",
            KubeError::Timeout { .. } => "timeout",
        }
    }
}

fn api_err(what: &str) -> impl FnOnce(kube::Error) -> KubeError + '_ {
    move |source| KubeError::Api {
        what: what.to_string(),
        source,
    }
}

/// A kube client bound to one node.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub node: String,
    pvs: Api<PersistentVolume>,
    nodes: Api<Node>,
    scs: Api<StorageClass>,
    reporter: Reporter,
}

impl Kube {
    /// Client from the standard places: in-cluster, then `KUBECONFIG` /
    /// `~/.kube/config`.
    pub async fn connect(node: &str) -> Result<Kube, KubeError> {
        let mut config = kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?;
        // kube's built-in retry of 429/503/504 can hold one request for
        // minutes; the reconcile loop's own backoff (logged, counted) decides
        // instead, and the host side is never stuck behind one call.
        config.default_retry = false;
        let gate = crate::k8s::throttle::RetryAfter::default();
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| KubeError::Config(e.to_string()))?
            .with_layer(&gate)
            .build();
        Ok(Kube::new(client, node))
    }

    pub fn new(client: Client, node: &str) -> Kube {
        let reporter = Reporter {
            controller: "disklet".into(),
            instance: Some(format!("disklet-{node}")),
        };
        Kube {
            pvs: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            scs: Api::all(client.clone()),
            reporter,
            client,
            node: node.to_string(),
        }
    }

    /// The label selector that scopes every PV list and watch to this node.
    pub fn selector(&self) -> String {
        format!("{LABEL_NODE}={}", node_label_value(&self.node))
    }

    pub async fn node_info(&self) -> Result<(NodeInfo, Node), KubeError> {
        let what = format!("get Node {}", self.node);
        let n = bounded(|| what.clone(), async {
            self.nodes.get_opt(&self.node).await.map_err(api_err(&what))
        })
        .await?
        .ok_or_else(|| KubeError::NodeMissing {
            node: self.node.clone(),
        })?;
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let info = NodeInfo {
            name: self.node.clone(),
            uid: n.metadata.uid.clone().unwrap_or_default(),
            hostname: labels
                .get(HOSTNAME_LABEL)
                .cloned()
                .unwrap_or_else(|| self.node.clone()),
            labels: labels.into_iter().collect(),
        };
        Ok((info, n))
    }

    /// `None` when the StorageClass does not exist.
    pub async fn storage_class(&self, name: &str) -> Result<Option<ScInfo>, KubeError> {
        let what = format!("get StorageClass {name}");
        let sc = bounded(|| what.clone(), async {
            self.scs.get_opt(name).await.map_err(api_err(&what))
        })
        .await?;
        Ok(sc.map(|sc| ScInfo {
            reclaim_policy: sc.reclaim_policy.unwrap_or_else(|| "Delete".into()),
            mount_options: sc.mount_options.unwrap_or_default(),
            allowed_topologies: sc
                .allowed_topologies
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    t.match_label_expressions
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| (e.key, e.values))
                        .collect()
                })
                .collect(),
        }))
    }

    /// Server-side apply with field manager `disklet`, forcing ownership of the
    /// fields disklet sets (it is their only rightful writer).
    pub async fn apply_pv(&self, pv: &PersistentVolume) -> Result<PersistentVolume, KubeError> {
        let name = pv.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(pv).map_err(|e| KubeError::Config(e.to_string()))?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "PersistentVolume".into();
        let what = format!("apply PersistentVolume {name}");
        bounded(|| what.clone(), async {
            self.pvs
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
                .map_err(api_err(&what))
        })
        .await
    }

    /// Deletes a PV, only if it still has `uid` (a PV recreated under the
    /// same name meanwhile is not touched) and, when given, is still at
    /// `resource_version` (a PV bound since the plan saw it is not touched:
    /// 409). Gone already is success.
    pub async fn delete_pv(
        &self,
        name: &str,
        uid: &str,
        resource_version: Option<&str>,
    ) -> Result<(), KubeError> {
        let mut dp = kube::api::DeleteParams::default();
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        dp.preconditions = Some(kube::api::Preconditions {
            uid: non_empty(uid),
            resource_version: resource_version.and_then(non_empty),
        });
        let what = || format!("delete PersistentVolume {name}");
        bounded(what, async {
            match self.pvs.delete(name, &dp).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(source) => Err(KubeError::Api {
                    what: what(),
                    source,
                }),
            }
        })
        .await
    }

    /// Sets or removes annotations with a JSON merge patch (annotations only:
    /// they are bookkeeping, not fields disklet applies).
    pub async fn annotate_pv(
        &self,
        name: &str,
        set: &[(String, Option<String>)],
    ) -> Result<(), KubeError> {
        let mut anns = serde_json::Map::new();
        for (k, v) in set {
            anns.insert(
                k.clone(),
                v.clone()
                    .map_or(serde_json::Value::Null, serde_json::Value::String),
            );
        }
        let patch = serde_json::json!({"metadata": {"annotations": anns}});
        let what = format!("annotate PersistentVolume {name}");
        bounded(|| what.clone(), async {
            self.pvs
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(api_err(&what))
        })
        .await
    }

    /// Sets labels with a JSON merge patch (nothing else of the PV changes).
    pub async fn label_pv(
        &self,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<PersistentVolume, KubeError> {
        let patch = serde_json::json!({"metadata": {"labels": labels}});
        let what = format!("label PersistentVolume {name}");
        bounded(|| what.clone(), async {
            self.pvs
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(api_err(&what))
        })
        .await
    }

    /// A PV by name, for Events about it.
    pub async fn get_pv(&self, name: &str) -> Option<PersistentVolume> {
        tokio::time::timeout(CALL_TIMEOUT, self.pvs.get_opt(name))
            .await
            .ok()?
            .ok()
            .flatten()
    }

    /// Publishes an Event about `obj` (a PV or the Node). Failures are logged,
    /// never fatal: an Event is a report, not an action.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        match tokio::time::timeout(
            CALL_TIMEOUT,
            // A recorder per Event: kube's merges Events of one object,
            // reason and action into a series that keeps the first message
            // only, so four refused disks read as one. Repeats are held back
            // by the reconciler instead (one per message per 10 minutes).
            Recorder::new(self.client.clone(), self.reporter.clone())
                .publish(&ev, &obj.object_ref(&())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, reason, "could not publish Event"),
            Err(_) => tracing::warn!(
                reason,
                "could not publish Event: the API server did not answer"
            ),
        }
    }

    /// A reflector of this node's PVs. Every change kicks the reconciler.
    /// Returns the store and the future that drives the watch.
    pub fn pv_reflector(
        &self,
        kick: mpsc::Sender<()>,
        seen: Arc<tokio::sync::Notify>,
    ) -> (
        Store<PersistentVolume>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (reader, writer) = reflector::store();
        let cfg = watcher::Config::default().labels(&self.selector());
        let stream = watcher(self.pvs.clone(), cfg)
            .default_backoff()
            .reflect(writer)
            .touched_objects();
        let drive = async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    // The store holds the change by now.
                    Ok(_) => {
                        seen.notify_waiters();
                        let _ = kick.try_send(());
                    }
                    // Not a kick: nothing changed, and a failing watch must
                    // not drive requests of its own.
                    Err(e) => tracing::warn!(error = %e, "PV watch error; retrying with backoff"),
                }
            }
        };
        (reader, drive)
    }
}

/// A snapshot of a reflector store.
pub fn snapshot(store: &Store<PersistentVolume>) -> Vec<Arc<PersistentVolume>> {
    store.state()
}
