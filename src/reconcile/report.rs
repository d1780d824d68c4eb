//! Reporting: Events on the Node or a PV, deduplicated, each with its log
//! line.

use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use super::{Agent, REPORT_EVERY};

impl Agent {
    /// Whether a report is due: not published in the last `REPORT_EVERY`.
    /// Records it as published when it is.
    pub(super) fn due(&mut self, reason: &str, message: &str) -> bool {
        let key = format!("{reason}\0{message}");
        if self
            .reported
            .get(&key)
            .is_some_and(|t| t.elapsed() < REPORT_EVERY)
        {
            return false;
        }
        self.reported.insert(key, Instant::now());
        true
    }

    /// A deduplicated Event on the Node, then its log line.
    pub(super) async fn report_node(
        &mut self,
        node_obj: &Node,
        warning: bool,
        reason: &'static str,
        message: String,
    ) {
        if !self.due(reason, &message) {
            return;
        }
        // The Event first, then the log line.
        self.kube
            .event(node_obj, warning, reason, "Reconcile", message.clone())
            .await;
        if warning {
            warn!(reason, "{message}");
        } else {
            info!(reason, "{message}");
        }
    }

    /// A deduplicated Event on a PV (skipped if the PV is gone).
    pub(super) async fn report_pv(
        &mut self,
        pv: &str,
        warning: bool,
        reason: &'static str,
        message: String,
    ) {
        if !self.due(reason, &message) {
            return;
        }
        // The Event first, then the log line: whoever reads the log can rely
        // on the Event being there.
        if let Some(obj) = self.kube.get_pv(pv).await {
            self.kube
                .event(&obj, warning, reason, "Reconcile", message.clone())
                .await;
        }
        if warning {
            warn!(pv, reason, "{message}");
        } else {
            info!(pv, reason, "{message}");
        }
    }
}
