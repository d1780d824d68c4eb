//! The node and the agent's own process, as `sysinfo` reads them from
//! `/proc` and `/sys`: the facts `disklet doctor` prints and the process and
//! node series `/metrics` serves. Nothing here writes.

use std::sync::Mutex;
use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// What the node is: read once per `doctor` run or per scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    /// `uname -r`.
    pub kernel: String,
    /// The OS image (`/etc/os-release`'s PRETTY_NAME as sysinfo words it);
    /// in a container this is the image's, not the host's.
    pub os: String,
    pub cpus: usize,
    pub memory_total: u64,
    pub memory_available: u64,
    /// The memory limit of the agent's cgroup, when it has one.
    pub cgroup_memory_limit: Option<u64>,
    pub uptime_seconds: u64,
    /// Seconds since the epoch.
    pub boot_time: u64,
}

/// The agent's own process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessFacts {
    /// User plus system time, all threads.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Seconds since the epoch.
    pub start_time: u64,
    pub open_fds: Option<usize>,
    pub max_fds: Option<usize>,
}

/// Reads the node and this process; keeps sysinfo's state between reads so a
/// scrape refreshes only what changes (one process, the memory counters,
/// the uptime). What does not change while the agent runs (kernel, OS
/// image, CPUs, boot time) is read once.
#[derive(Debug)]
pub struct SystemProbe {
    sys: Mutex<Option<System>>,
    pid: Option<Pid>,
    fixed: NodeFacts,
}

impl Default for SystemProbe {
    fn default() -> Self {
        SystemProbe {
            sys: Mutex::new(System::new().ok()),
            pid: sysinfo::get_current_pid().ok(),
            fixed: NodeFacts {
                kernel: System::kernel_version().unwrap_or_default(),
                os: System::long_os_version().unwrap_or_default(),
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                boot_time: System::boot_time().unwrap_or_default(),
                ..NodeFacts::default()
            },
        }
    }
}

impl SystemProbe {
    /// The node's facts; fields sysinfo cannot read stay empty or zero.
    pub fn node(&self) -> NodeFacts {
        let mut facts = NodeFacts {
            uptime_seconds: System::uptime().unwrap_or_default(),
            ..self.fixed.clone()
        };
        let mut guard = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sys) = guard.as_mut() {
            sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            facts.memory_total = sys.total_memory();
            facts.memory_available = sys.available_memory();
            facts.cgroup_memory_limit = sys
                .cgroup_limits()
                .map(|l| l.total_memory)
                .filter(|&l| l > 0 && l < facts.memory_total);
        }
        facts
    }

    /// This process, or `None` when `/proc/self` cannot be read.
    pub fn process(&self) -> Option<ProcessFacts> {
        let pid = self.pid?;
        let mut guard = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        let sys = guard.as_mut()?;
        let kind = ProcessRefreshKind::nothing()
            .with_cpu()
            .with_memory()
            .without_tasks();
        sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, kind);
        let p = sys.process(pid)?;
        Some(ProcessFacts {
            cpu_seconds: p.accumulated_cpu_time() as f64 / 1000.0,
            resident_bytes: p.memory(),
            virtual_bytes: p.virtual_memory(),
            start_time: p.start_time(),
            open_fds: p.open_files(),
            max_fds: p.open_files_limit(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel and memory agree with what the kernel itself says.
    #[test]
    fn node_facts_match_proc() {
        let facts = SystemProbe::default().node();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        assert_eq!(facts.kernel, release.trim());
        assert_eq!(
            facts.memory_total,
            kib_field("/proc/meminfo", "MemTotal:") * 1024
        );
        assert!(facts.memory_available > 0 && facts.memory_available <= facts.memory_total);
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .expect("uptime")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("uptime seconds");
        assert!((facts.uptime_seconds as f64 - uptime).abs() < 5.0);
    }

    /// RSS is what the kernel reports for this process (64 MiB touched, so
    /// not a constant), and CPU time grows when it computes.
    #[test]
    fn process_facts_follow_this_process() {
        let probe = SystemProbe::default();
        let before = probe.process().expect("this process is readable");
        let block = vec![1u8; 64 << 20];
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        let low = vm_rss();
        let after = probe.process().expect("this process is readable");
        let high = vm_rss();
        std::hint::black_box(&block);
        let slack = 8 << 20;
        assert!(
            after.resident_bytes >= 64 << 20
                && after.resident_bytes + slack >= low.min(high)
                && after.resident_bytes <= low.max(high) + slack,
            "sysinfo RSS {} against VmRSS {low}..{high}",
            after.resident_bytes
        );
        assert!(after.cpu_seconds > before.cpu_seconds);
        assert!(after.open_fds.is_some_and(|n| n >= 3));
    }

    fn vm_rss() -> u64 {
        kib_field("/proc/self/status", "VmRSS:") * 1024
    }

    /// A `Key:   1234 kB` line of a /proc file.
    fn kib_field(file: &str, key: &str) -> u64 {
        let text = std::fs::read_to_string(file).expect("readable /proc file");
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in {file}"))
    }
}
