//! Prometheus metrics. One registry per agent; every metric is documented in
//! the README's Observe section.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub verdict: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScLabels {
    pub storageclass: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: String,
    pub result: String,
}

/// Buckets from 10 ms to about 4.5 hours (wipes of large disks take hours).
fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.01, 3.0, 14)
}

pub struct Metrics {
    pub registry: Registry,
    pub devices: Family<DeviceLabels, Gauge>,
    pub pvs: Family<PhaseLabels, Gauge>,
    pub format_seconds: Histogram,
    pub mount_seconds: Histogram,
    pub reconcile_seconds: Histogram,
    pub cleanup_seconds: Histogram,
    pub reconciles: Counter,
    pub reconcile_errors: Family<KindLabels, Counter>,
    pub storageclass_missing: Family<ScLabels, Gauge>,
    pub api_calls: Family<CallLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("disklet");
        let m = Metrics {
            devices: Family::default(),
            pvs: Family::default(),
            format_seconds: Histogram::new(duration_buckets()),
            mount_seconds: Histogram::new(duration_buckets()),
            reconcile_seconds: Histogram::new(duration_buckets()),
            cleanup_seconds: Histogram::new(duration_buckets()),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            storageclass_missing: Family::default(),
            api_calls: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "devices",
            "Block devices on the node by verdict and reason",
            m.devices.clone(),
        );
        registry.register("pvs", "This node's PVs by phase", m.pvs.clone());
        registry.register(
            "format_duration_seconds",
            "Time to format a disk, interlocks included",
            m.format_seconds.clone(),
        );
        registry.register(
            "mount_duration_seconds",
            "Time to mount a disk",
            m.mount_seconds.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "cleanup_duration_seconds",
            "Time to clean a released volume",
            m.cleanup_seconds.clone(),
        );
        registry.register("reconciles", "Reconcile passes", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed steps by kind",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "storageclass_missing",
            "1 while a configured StorageClass does not exist",
            m.storageclass_missing.clone(),
        );
        registry.register(
            "api_calls",
            "Kubernetes API calls by call and result",
            m.api_calls.clone(),
        );
        let m = Metrics { registry, ..m };
        // Series that alerts watch exist from the start, at zero, rather than
        // appearing with the first failure.
        for kind in [
            "api",
            "timeout",
            "node-missing",
            "pvs-not-listed",
            "host",
            "mount",
            "format-device-changed",
            "format-mkfs",
            "cleanup-reformat",
            "cleanup-files",
        ] {
            let _zero = m
                .reconcile_errors
                .get_or_create(&KindLabels { kind: kind.into() });
        }
        m
    }
}

impl Metrics {
    pub fn error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn api(&self, call: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.api_calls
            .get_or_create(&CallLabels {
                call: call.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
