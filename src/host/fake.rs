//! Recording fakes of the host adapters, for tests of everything above them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::host::{BlockDevices, HostError, HostTables, Prober};
use crate::model::{Device, Exclusive, MountEntry, Probe, SwapEntry};

/// Returns a fixed device list.
#[derive(Debug, Clone, Default)]
pub struct FakeDevices(pub Vec<Device>);

impl BlockDevices for FakeDevices {
    fn list(&self) -> Result<Vec<Device>, HostError> {
        Ok(self.0.clone())
    }
}

/// A call the fake prober saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProberCall {
    Probe(String),
    Exclusive(String),
}

/// Answers from tables keyed by kernel name and records every call.
#[derive(Debug, Default)]
pub struct FakeProber {
    pub probes: BTreeMap<String, Probe>,
    pub exclusive: BTreeMap<String, Exclusive>,
    pub calls: Mutex<Vec<ProberCall>>,
}

impl FakeProber {
    pub fn calls(&self) -> Vec<ProberCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, c: ProberCall) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(c);
        }
    }
}

impl Prober for FakeProber {
    fn probe(&self, dev: &Device) -> Probe {
        self.record(ProberCall::Probe(dev.name.clone()));
        self.probes.get(&dev.name).cloned().unwrap_or(Probe::Done {
            signatures: vec![],
            zeroed: Some(true),
        })
    }

    fn exclusive(&self, dev: &Device) -> Exclusive {
        self.record(ProberCall::Exclusive(dev.name.clone()));
        self.exclusive
            .get(&dev.name)
            .cloned()
            .unwrap_or(Exclusive::Free)
    }
}

/// Fixed mount and swap tables.
#[derive(Debug, Clone, Default)]
pub struct FakeTables {
    pub mounts: Vec<MountEntry>,
    pub swaps: Vec<SwapEntry>,
}

impl HostTables for FakeTables {
    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        Ok(self.mounts.clone())
    }
    fn swaps(&self) -> Result<Vec<SwapEntry>, HostError> {
        Ok(self.swaps.clone())
    }
}
