//! Prometheus metrics. One registry per agent; every metric is documented in
//! the README's Observe section.

use crate::host::system::SystemProbe;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
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
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: String,
    pub result: String,
}

/// The agent's process (`process_*`, the names every Prometheus client
/// library serves) and the node (`disklet_node_*`), read at each scrape.
#[derive(Debug, Default)]
struct SystemCollector {
    probe: SystemProbe,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeInfoLabels {
    kernel_version: String,
    os_image: String,
}

fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for SystemCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(p) = self.probe.process() {
            let cpu = ConstCounter::new(p.cpu_seconds);
            let help = "Total user and system CPU time spent in seconds";
            cpu.encode(e.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                cpu.metric_type(),
            )?)?;
            let help = "Resident memory size in bytes";
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                help,
                p.resident_bytes,
            )?;
            let help = "Virtual memory size in bytes";
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                help,
                p.virtual_bytes,
            )?;
            let help = "Start time of the process since unix epoch in seconds";
            gauge(&mut e, "process_start_time_seconds", help, p.start_time)?;
            if let Some(n) = p.open_fds {
                gauge(
                    &mut e,
                    "process_open_fds",
                    "Number of open file descriptors",
                    n,
                )?;
            }
            if let Some(n) = p.max_fds {
                let help = "Maximum number of open file descriptors";
                gauge(&mut e, "process_max_fds", help, n)?;
            }
        }
        let n = self.probe.node();
        let info = ConstGauge::new(1i64);
        let mut family = e.encode_descriptor(
            "disklet_node_info",
            "The node's kernel and OS image (the agent's view), value 1",
            None,
            info.metric_type(),
        )?;
        let labels = NodeInfoLabels {
            kernel_version: n.kernel,
            os_image: n.os,
        };
        info.encode(family.encode_family(&labels)?)?;
        let help = "The node's memory in bytes";
        gauge(
            &mut e,
            "disklet_node_memory_total_bytes",
            help,
            n.memory_total,
        )?;
        let help = "The node's memory available for new allocations, in bytes";
        gauge(
            &mut e,
            "disklet_node_memory_available_bytes",
            help,
            n.memory_available,
        )?;
        let help = "The node's boot time since unix epoch in seconds";
        gauge(&mut e, "disklet_node_boot_time_seconds", help, n.boot_time)
    }
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
    /// Device probes by source: `read` (the device was read) or `cached`.
    pub probes: Family<SourceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(SystemCollector::default()));
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
            probes: Family::default(),
            registry: Registry::default(),
        };
        m.register(root.sub_registry_with_prefix("disklet"));
        let m = Metrics {
            registry: root,
            ..m
        };
        m.zero_alert_series();
        m
    }
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "devices",
            "Block devices on the node by verdict and reason",
            self.devices.clone(),
        );
        registry.register("pvs", "This node's PVs by phase", self.pvs.clone());
        registry.register(
            "format_duration_seconds",
            "Time to format a disk, interlocks included",
            self.format_seconds.clone(),
        );
        registry.register(
            "mount_duration_seconds",
            "Time to mount a disk",
            self.mount_seconds.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "cleanup_duration_seconds",
            "Time to clean a released volume",
            self.cleanup_seconds.clone(),
        );
        registry.register("reconciles", "Reconcile passes", self.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed steps by kind",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "storageclass_missing",
            "1 while a configured StorageClass does not exist",
            self.storageclass_missing.clone(),
        );
        registry.register(
            "api_calls",
            "Kubernetes API calls by call and result",
            self.api_calls.clone(),
        );
        registry.register(
            "device_probes",
            "Device content probes of the passes, by source (read, cached)",
            self.probes.clone(),
        );
    }

    /// Books `n` probes of `source`.
    pub fn probed(&self, source: &str, n: u64) {
        let l = SourceLabels {
            source: source.into(),
        };
        self.probes.get_or_create(&l).inc_by(n);
    }

    fn zero_alert_series(&self) {
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
            let _zero = self
                .reconcile_errors
                .get_or_create(&KindLabels { kind: kind.into() });
        }
    }

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
