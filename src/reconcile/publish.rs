//! Publishing handlers: apply, withdraw, re-adopt and annotate this node's
//! PVs.

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::{Agent, Written};
use crate::model::reasons::event;

/// PV applies of one pass in flight at once.
const APPLIES_AT_ONCE: usize = 16;

impl Agent {
    // Each returns whether the host changed: never.

    /// A pass's `Action::ApplyPv`s (`(pv, create)`): server-side applies,
    /// up to `APPLIES_AT_ONCE` in flight, so a batch costs about one round
    /// trip rather than one per PV. A new PV gets its `Published` Event and
    /// is awaited in the watch before the next pass.
    pub(super) async fn apply_pvs(&mut self, batch: Vec<(Box<PersistentVolume>, bool)>) -> bool {
        use futures::StreamExt;
        let kube = &self.kube;
        let applied: Vec<_> = futures::stream::iter(batch.iter().map(|(pv, _)| async move {
            crate::failpoint::hit("apply-before");
            let applied = kube.apply_pv(pv).await;
            if applied.is_ok() {
                crate::failpoint::hit("apply-after");
            }
            applied
        }))
        .buffered(APPLIES_AT_ONCE)
        .collect()
        .await;
        let mut published = Vec::new();
        for ((pv, create), applied) in batch.into_iter().zip(applied) {
            let name = pv.metadata.name.clone().unwrap_or_default();
            self.metrics.api("apply-pv", applied.is_ok());
            match applied {
                Ok(applied) => {
                    info!(pv = name, create, "PV applied");
                    if !create {
                        continue;
                    }
                    if let Some(uid) = applied.metadata.uid.clone() {
                        self.written.push(Written::Created { name, uid });
                    }
                    let path = pv
                        .spec
                        .as_ref()
                        .and_then(|s| s.local.as_ref())
                        .map(|l| l.path.clone())
                        .unwrap_or_default();
                    published.push((applied, path));
                }
                Err(e) => {
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    warn!(pv = name, error = %e, "PV apply failed");
                }
            }
        }
        // As many at once as the applies: each in flight is a connection
        // the client keeps open for a while afterwards.
        let node = &self.kube.node;
        futures::stream::iter(published.iter().map(|(pv, path)| {
            self.kube.event(
                pv,
                false,
                event::PUBLISHED,
                "Publish",
                format!("published {path} on node {node}"),
            )
        }))
        .buffer_unordered(APPLIES_AT_ONCE)
        .collect::<Vec<()>>()
        .await;
        false
    }

    /// `Action::DeletePv`, with the plan's uid and resourceVersion as
    /// preconditions.
    pub(super) async fn delete_pv(
        &mut self,
        name: String,
        uid: String,
        resource_version: String,
        reason: &'static str,
        note: String,
        node_obj: &Node,
    ) -> bool {
        let r = self
            .kube
            .delete_pv(&name, &uid, Some(&resource_version))
            .await;
        self.metrics.api("delete-pv", r.is_ok());
        match r {
            Ok(()) => {
                crate::failpoint::hit("delete-after");
                info!(pv = name, reason, "PV deleted");
                self.written.push(Written::Deleted {
                    name: name.clone(),
                    uid: uid.clone(),
                });
                self.kube
                    .event(
                        node_obj,
                        reason == event::VOLUME_WITHDRAWN,
                        reason,
                        "Delete",
                        note,
                    )
                    .await;
            }
            // The change reaches the watch, whose event kicks the
            // next pass; no pass is rerun on a stale view.
            Err(e) if e.is_conflict() => info!(
                pv = name,
                "PV changed since the plan saw it; not deleted, decided again"
            ),
            Err(e) => warn!(pv = name, error = %e, "PV delete failed"),
        }
        false
    }

    /// `Action::Readopt`: restore the labels of a PV of this node that lost
    /// them, or report the volume.
    pub(super) async fn readopt(
        &mut self,
        pv: Box<PersistentVolume>,
        otherwise: String,
        node_obj: &Node,
    ) -> bool {
        let name = pv.metadata.name.clone().unwrap_or_default();
        let want = |p: &PersistentVolume, k: &str| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k).cloned())
        };
        let found = self.kube.get_pv(&name).await;
        // The same name, key and node: ours, only out of sight.
        let ours = found.as_ref().is_some_and(|f| {
            [
                crate::model::keys::ANN_KEY,
                crate::model::keys::ANN_NODE_UID,
            ]
            .iter()
            .all(|k| want(f, k).is_some() && want(f, k) == want(&pv, k))
        });
        if !ours {
            self.report_node(node_obj, true, event::VOLUME_NOT_CLEAN, otherwise)
                .await;
            return false;
        }
        let Some(found) = found else { return false };
        let phase = found.status.as_ref().and_then(|s| s.phase.as_deref());
        if found.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Released" | "Failed"))
        {
            // A released volume taken out of disklet's hands (its
            // labels removed) stays out: labelling it again would
            // hand its data to the reclaim policy.
            let note = format!("{name} ({}) has no disklet labels, so disklet leaves it and its data alone; label it disklet.io/node={} to hand it back", phase.unwrap_or("deleting"), crate::model::keys::node_label_value(&self.kube.node));
            if self.due(event::PV_MODIFIED, &note) {
                self.kube
                    .event(&found, true, event::PV_MODIFIED, "Reconcile", note.clone())
                    .await;
                warn!(pv = name, "{note}");
            }
            return false;
        }
        // Only the labels: the PV's spec stays as it is.
        let labels = pv.metadata.labels.clone().unwrap_or_default();
        let labelled = self.kube.label_pv(&name, &labels).await;
        self.metrics.api("label-pv", labelled.is_ok());
        match labelled {
            Ok(labelled) => {
                let note = format!("{name} had lost disklet's labels (edited by hand?), so this node no longer saw it; labels restored");
                warn!(pv = name, "{note}");
                self.kube
                    .event(&labelled, true, event::PV_MODIFIED, "Publish", note)
                    .await;
            }
            Err(e) => {
                warn!(pv = name, error = %e, "cannot restore the labels of a PV of this node")
            }
        }
        false
    }

    /// `Action::AnnotatePv`.
    pub(super) async fn annotate_pv(
        &mut self,
        name: String,
        set: Vec<(String, Option<String>)>,
    ) -> bool {
        let r = self.kube.annotate_pv(&name, &set).await;
        self.metrics.api("annotate-pv", r.is_ok());
        if let Err(e) = r {
            warn!(pv = name, error = %e, "PV annotation failed");
        }
        false
    }
}
