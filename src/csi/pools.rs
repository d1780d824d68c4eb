//! This node's pools: the filesystems the agent mounted for the classes of
//! `kind: pool`, found in the host's mount table at `<hostDir>/<class>/<uuid>`.
//! A directory that is not a mount point is never a pool: nothing is
//! written to the root filesystem under an unmounted path.

use std::path::{Path, PathBuf};

use tonic::Status;

use super::proto::CapacityRange;
use super::{caps, status, Driver, Id};
use crate::host::mountinfo::read_consistent;
use crate::host::pool::{Capacity, Entry, Pool};
use crate::model::DevNo;

/// One mounted pool.
#[derive(Debug, Clone)]
pub struct PoolRef {
    /// The filesystem's UUID: the first part of its volumes' ids.
    pub id: String,
    pub class: String,
    pub mount_point: PathBuf,
    pub devno: DevNo,
    pub pool: Pool,
}

impl PoolRef {
    /// Whether the disk under the pool still exists (a disk pulled while
    /// mounted leaves the mount behind).
    pub fn disk_present(&self) -> bool {
        Path::new(&format!(
            "/sys/dev/block/{}:{}",
            self.devno.major, self.devno.minor
        ))
        .exists()
    }

    pub fn capacity(&self) -> Result<Capacity, Status> {
        self.pool.capacity().map_err(status)
    }
}

impl Driver {
    /// The pools mounted now, in the order of their classes then ids.
    pub fn pools(&self) -> Result<Vec<PoolRef>, Status> {
        let mounts = read_consistent(&self.cfg.mount_info).map_err(|e| {
            Status::unavailable(format!(
                "cannot read the mount table {}: {e}",
                self.cfg.mount_info.display()
            ))
        })?;
        let mut out = Vec::new();
        for class in self.cfg.classes.iter().filter(|c| c.is_pool()) {
            let dir = self.cfg.host_dir.join(&class.name);
            let mut here: Vec<_> = mounts
                .iter()
                .filter(|m| {
                    m.mount_point.parent() == Some(dir.as_path())
                        && m.root == Path::new("/")
                        && m.fs_type == "xfs"
                })
                .collect();
            here.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
            here.dedup_by(|a, b| a.mount_point == b.mount_point);
            for m in here {
                let Some(id) = m.mount_point.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if !Id::is_pool(id) {
                    continue;
                }
                let pool = Pool::open(&m.mount_point).map_err(status)?;
                out.push(PoolRef {
                    id: id.to_string(),
                    class: class.name.clone(),
                    mount_point: m.mount_point.clone(),
                    devno: m.devno,
                    pool,
                });
            }
        }
        Ok(out)
    }

    /// Each pool whose disk is present, with the bytes it has available:
    /// what capacity is reported from and new volumes are placed by.
    pub fn available(&self) -> Result<Vec<(PoolRef, u64)>, Status> {
        let mut out = Vec::new();
        for p in self.pools()?.into_iter().filter(PoolRef::disk_present) {
            let a = p.capacity()?.available;
            out.push((p, a));
        }
        Ok(out)
    }

    /// The pool of an id, `NOT_FOUND` when it is not mounted here.
    pub fn pool(&self, id: &str) -> Result<PoolRef, Status> {
        self.pools()?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "pool {id} is not mounted on node {}: its disk is gone or not yet mounted",
                    self.node.name
                ))
            })
    }

    /// The volume an id names, with its pool; `NOT_FOUND` when either is
    /// missing or the id is not one of ours.
    pub fn volume(&self, volume_id: &str) -> Result<(PoolRef, Entry), Status> {
        let id = Id::parse(volume_id).ok_or_else(|| {
            Status::not_found(format!("{volume_id:?} is not a disklet volume id"))
        })?;
        let p = self.pool(&id.pool)?;
        match p.pool.volume(&id.name) {
            Ok(Some(e)) => Ok((p, e)),
            Ok(None) | Err(crate::host::pool::PoolError::BadId { .. }) => Err(Status::not_found(
                format!("volume {volume_id} does not exist"),
            )),
            Err(e) => Err(status(e)),
        }
    }

    /// Grows volume `volume_id`'s backing file to what `range` asks for
    /// (never shrinks it; no range, no change); the volume after.
    pub fn grow(&self, volume_id: &str, range: Option<&CapacityRange>) -> Result<Entry, Status> {
        let (p, e) = self.volume(volume_id)?;
        let want = caps::size_for(range, e.size)?;
        if want <= e.size {
            return Ok(e);
        }
        let e = p.pool.expand_volume(&e.id, want).map_err(status)?;
        tracing::info!(volume = volume_id, bytes = e.size, "volume grown");
        Ok(e)
    }

    /// A volume or snapshot named `name` in any pool, for idempotent creates.
    pub fn find_named(
        &self,
        name: &str,
        snapshot: bool,
    ) -> Result<Option<(PoolRef, Entry)>, Status> {
        for p in self.pools()? {
            let found = if snapshot {
                p.pool.snapshot(name)
            } else {
                p.pool.volume(name)
            };
            if let Some(e) = found.map_err(status)? {
                return Ok(Some((p, e)));
            }
        }
        Ok(None)
    }
}
