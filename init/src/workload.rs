//! The one interface the supervisor drives every workload kind through;
//! it never matches on the kind.

use crate::net::WorkloadNet;
use cairn_manifest::{PortSpec, RestartPolicy};
use std::net::Ipv4Addr;

/// A started workload process.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// Top process (what the reaper reports).
    pub pid: u32,
    /// Its address on the workload network.
    pub address: Ipv4Addr,
}

/// A workload kind (container now; VMs and functions plug in here).
pub trait Workload: Send + Sync {
    /// Unique name.
    fn name(&self) -> &str;
    /// `container`, `vm`, `function`.
    fn kind(&self) -> &'static str;
    /// Equal fingerprints mean an unchanged definition (keep it running).
    fn fingerprint(&self) -> String;
    /// Restart policy and `max_restarts`.
    fn restart_policy(&self) -> (RestartPolicy, u32);
    /// Published ports.
    fn ports(&self) -> Vec<PortSpec>;
    /// Slow, blocking preparation (image pull); runs on a worker thread.
    /// Returns a one-line summary.
    fn prepare(&self) -> Result<String, String>;
    /// Starts the process.
    fn start(&self, net: &mut WorkloadNet) -> Result<Started, String>;
    /// Kills everything that belongs to it, at once (kept for a restart).
    fn kill(&self);
    /// Kills it and removes its state: it is being removed or replaced.
    fn cleanup(&self);
    /// The signal a stop sends first, and how long before SIGKILL.
    fn stop_signal(&self) -> (i32, std::time::Duration) {
        (libc::SIGTERM, std::time::Duration::from_secs(10))
    }
    /// OOM kills in its cgroup so far (cgroup v2 `memory.events`).
    fn oom_kills(&self) -> u64 {
        0
    }
    /// Its health check, if it has one.
    fn health(&self) -> Option<cairn_manifest::HealthCheck> {
        None
    }
    /// Image digests it needs kept in the store (layer GC spares them).
    fn images(&self) -> Vec<String> {
        Vec::new()
    }
}
