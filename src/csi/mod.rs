//! The CSI driver (`disklet csi`): the CSI v1.12 Identity, Controller and
//! Node services over gRPC on a unix socket, for the volumes carved out of
//! this node's pools (classes of `kind: pool`, formatted and mounted by the
//! agent under every safety rule; [`crate::host::pool`] holds the files).
//!
//! One driver per node (external-provisioner with `--node-deployment`): each
//! serves only its own node's pools, so no central controller is needed.
//!
//! - A volume's id is `<pool>_<name>`: the pool's filesystem UUID, then the
//!   name the provisioner gave (`pvc-<uid>`); a snapshot's likewise.
//! - Every step that changes something holds a lock on the names it touches;
//!   a second call for the same name while one runs is told `ABORTED`, as
//!   the spec asks, and retried by the sidecar.
//! - Capacity is what the pools have left (fully allocated volumes, less
//!   what reflink copies may come to need): truthful, never overcommitted.

mod caps;
mod controller;
mod identity;
mod node;
mod nodeops;
mod pools;
pub mod proto;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::config::Config;
use crate::host::pool::PoolError;

pub use pools::PoolRef;

/// The driver's name when none is given: the CSIDriver object's name.
pub const DEFAULT_DRIVER_NAME: &str = "csi.disklet.io";

/// A new volume's size when the claim asks for none.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

/// The node's facts the driver reports.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    /// Topology segments: `kubernetes.io/hostname` and each configured
    /// topology key the Node carries.
    pub topology: BTreeMap<String, String>,
    pub max_volumes: i64,
}

/// Where a volume's backing file grows when its claim asks for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expansion {
    /// In NodeExpandVolume, on the node that holds the volume; the controller
    /// service does not offer EXPAND_VOLUME, so the external-resizer only
    /// records the new size (its "trivial resizer"). The default: the
    /// DaemonSet runs one csi-resizer per node, and csi-resizer v2.3 cannot
    /// tell which node a volume lives on (kubernetes-csi/external-resizer#142),
    /// so a ControllerExpandVolume would reach every node and all but one
    /// would fail it as NotFound, marking the claim's expansion infeasible.
    Node,
    /// In ControllerExpandVolume as well, for a single resizer that only
    /// reaches this node (csi-sanity, a one-node cluster).
    Controller,
}

/// What every service shares.
pub struct Driver {
    pub name: String,
    pub cfg: Config,
    pub node: NodeFacts,
    pub expansion: Expansion,
    locks: Mutex<HashSet<String>>,
}

impl Driver {
    pub fn new(name: String, cfg: Config, node: NodeFacts, expansion: Expansion) -> Arc<Driver> {
        Arc::new(Driver {
            name,
            cfg,
            node,
            expansion,
            locks: Mutex::new(HashSet::new()),
        })
    }

    /// Holds `keys` until the guard drops; `ABORTED` when another call holds
    /// one of them.
    fn lock(self: &Arc<Self>, keys: &[&str]) -> Result<KeyGuard, Status> {
        let mut held = self
            .locks
            .lock()
            .map_err(|_| Status::internal("the driver's lock table is poisoned"))?;
        if let Some(k) = keys.iter().find(|k| held.contains(**k)) {
            return Err(Status::aborted(format!(
                "an operation on {k} is already in progress; retry"
            )));
        }
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        held.extend(keys.iter().cloned());
        Ok(KeyGuard {
            driver: self.clone(),
            keys,
        })
    }
}

struct KeyGuard {
    driver: Arc<Driver>,
    keys: Vec<String>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Ok(mut held) = self.driver.locks.lock() {
            for k in &self.keys {
                held.remove(k);
            }
        }
    }
}

/// A volume's or snapshot's id: the pool it lives in and its name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    pub pool: String,
    pub name: String,
}

impl Id {
    pub fn parse(id: &str) -> Option<Id> {
        let (pool, name) = id.split_once('_')?;
        (Id::is_pool(pool) && !name.is_empty()).then(|| Id {
            pool: pool.to_string(),
            name: name.to_string(),
        })
    }

    /// Whether `pool` can be a pool's id: a filesystem UUID's characters.
    pub fn is_pool(pool: &str) -> bool {
        !pool.is_empty() && pool.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    }

    pub fn format(pool: &str, name: &str) -> String {
        format!("{pool}_{name}")
    }
}

/// A pool error in the spec's codes.
pub fn status(e: PoolError) -> Status {
    let code = match &e {
        PoolError::BadId { .. } => Code::InvalidArgument,
        PoolError::Exists { .. } => Code::AlreadyExists,
        PoolError::NotFound { .. } => Code::NotFound,
        PoolError::NoSpace { .. } => Code::ResourceExhausted,
        PoolError::Shrink { .. } => Code::OutOfRange,
        PoolError::InUse { .. } => Code::FailedPrecondition,
        PoolError::Io { .. } | PoolError::Cmd(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the operation's thread failed: {e}")))?
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let p = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| format!("endpoint {endpoint:?} is not unix:///PATH; the CSI sidecars reach the driver by a unix socket, e.g. unix:///csi/csi.sock"))?;
    let p = Path::new(p);
    if !p.is_absolute() {
        return Err(format!(
            "endpoint {endpoint:?}: the socket path must be absolute (unix:///csi/csi.sock)"
        ));
    }
    Ok(p.to_path_buf())
}

/// Serves the three services on `endpoint` until `shutdown` resolves.
pub async fn serve(
    driver: Arc<Driver>,
    endpoint: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use proto::controller_server::ControllerServer;
    use proto::identity_server::IdentityServer;
    use proto::node_server::NodeServer;
    use std::os::unix::fs::FileTypeExt;
    let path = socket_path(endpoint).map_err(anyhow::Error::msg)?;
    // A socket left by an earlier run is removed; anything else at the path
    // is not ours to remove.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; pass another --endpoint or remove it",
            path.display()
        ),
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    tracing::info!(driver = driver.name, node = driver.node.name, socket = %path.display(), "CSI driver serving");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::Identity(driver.clone())))
        .add_service(ControllerServer::new(controller::Controller(
            driver.clone(),
        )))
        .add_service(NodeServer::new(node::Node(driver)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_refuse_what_is_not_ours() {
        let id = Id::format("0b1c2d3e-aaaa-bbbb-cccc-000000000001", "pvc-1_x");
        assert_eq!(
            Id::parse(&id),
            Some(Id {
                pool: "0b1c2d3e-aaaa-bbbb-cccc-000000000001".into(),
                name: "pvc-1_x".into()
            })
        );
        for bad in ["", "_x", "pool", "zz_x", "0b1c_", "../x_y"] {
            assert_eq!(Id::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_must_be_absolute_unix_sockets() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock"),
            Ok(PathBuf::from("/csi/csi.sock"))
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://csi.sock").is_err());
    }
}
