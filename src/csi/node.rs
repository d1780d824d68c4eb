//! The Node service: a volume's loop device attached at stage (and its
//! filesystem made if it is blank, mounted at the staging path), bound into
//! the pod's path at publish, and all of it undone in reverse.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caps::{self, Access};
use super::nodeops::{self, mounted_at};
use super::proto::node_service_capability::{rpc, Rpc, Type};
use super::proto::volume_usage::Unit;
use super::proto::*;
use super::{blocking, status, Driver};
use crate::host::pool;

pub struct Node(pub Arc<Driver>);

fn path_arg(v: &str, what: &str) -> Result<PathBuf, Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(PathBuf::from(v))
}

fn id_arg(v: &str) -> Result<String, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument("volume id is required"))
    } else {
        Ok(v.to_string())
    }
}

impl Driver {
    fn stage(&self, id: &str, staging: &Path, access: &Access) -> Result<(), Status> {
        let (_, e) = self.volume(id)?;
        let dev = pool::attach(&e.path).map_err(status)?;
        let Access::Mount { fs_type, flags } = access else {
            return Ok(());
        };
        if let Some(m) = mounted_at(&self.cfg.mount_info, staging)? {
            let ours = crate::host::mountinfo::block_devno(&dev) == Some(m.devno);
            return if ours {
                Ok(())
            } else {
                Err(Status::already_exists(format!(
                    "{} is already a mount point of something else",
                    staging.display()
                )))
            };
        }
        match nodeops::filesystem(&dev, &e.path)? {
            None => {
                nodeops::mkfs(&dev, fs_type)?;
                tracing::info!(
                    volume = id,
                    fs = fs_type,
                    "filesystem made on a blank volume"
                );
            }
            Some(have) if have == *fs_type => {}
            Some(have) => {
                return Err(Status::failed_precondition(format!(
                "volume {id} holds a {have} filesystem, {fs_type} was asked; it is not formatted"
            )))
            }
        }
        nodeops::mount_fs(&dev, staging, fs_type, flags)
    }

    fn unstage(&self, id: &str, staging: &Path) -> Result<(), Status> {
        nodeops::umount_all(&self.cfg.mount_info, staging)?;
        let e = match self.volume(id) {
            Ok((_, e)) => e,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        if let Some(dev) = pool::attached(&e.path) {
            if pool::in_use(&dev) {
                return Err(Status::failed_precondition(format!(
                    "{} (volume {id}) is still open: unpublish it first",
                    dev.display()
                )));
            }
            pool::detach(&dev).map_err(status)?;
        }
        Ok(())
    }

    fn publish(&self, r: &NodePublishVolumeRequest, access: &Access) -> Result<(), Status> {
        let target = path_arg(&r.target_path, "target path")?;
        let staging = path_arg(&r.staging_target_path, "staging target path")?;
        let (_, e) = self.volume(&r.volume_id)?;
        let dev = pool::attached(&e.path).ok_or_else(|| {
            Status::failed_precondition(format!("volume {} is not staged", r.volume_id))
        })?;
        if mounted_at(&self.cfg.mount_info, &target)?.is_some() {
            return Ok(());
        }
        if caps::single_writer(r.volume_capability.as_ref()) {
            let others = nodeops::published_at(&self.cfg.mount_info, &dev, &[&staging, &target])?;
            if let Some(o) = others.first() {
                return Err(Status::failed_precondition(format!(
                    "volume {} is single-writer (ReadWriteOncePod) and already published at {}",
                    r.volume_id,
                    o.display()
                )));
            }
        }
        match access {
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        Status::internal(format!("cannot create {}: {e}", parent.display()))
                    })?;
                }
                if !target.exists() {
                    std::fs::File::create(&target).map_err(|e| {
                        Status::internal(format!("cannot create {}: {e}", target.display()))
                    })?;
                }
                nodeops::bind(&dev, &target, r.readonly)
            }
            Access::Mount { .. } => {
                if mounted_at(&self.cfg.mount_info, &staging)?.is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is not staged at {}",
                        r.volume_id,
                        staging.display()
                    )));
                }
                std::fs::create_dir_all(&target).map_err(|e| {
                    Status::internal(format!("cannot create {}: {e}", target.display()))
                })?;
                nodeops::bind(&staging, &target, r.readonly)
            }
        }
    }

    fn stats(&self, id: &str, path: &Path) -> Result<NodeGetVolumeStatsResponse, Status> {
        let (p, e) = self.volume(id)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let abnormal = |message: String| NodeGetVolumeStatsResponse {
            usage: Vec::new(),
            volume_condition: Some(VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        if !p.disk_present() {
            return Ok(abnormal(format!("the disk of pool {} is gone", p.id)));
        }
        let healthy = Some(VolumeCondition {
            abnormal: false,
            message: "healthy".into(),
        });
        if mounted_at(&self.cfg.mount_info, path)?.is_none() || !path.is_dir() {
            // A Block volume: its size, nothing more is known.
            let usage = vec![VolumeUsage {
                total: e.size as i64,
                unit: Unit::Bytes as i32,
                ..Default::default()
            }];
            return Ok(NodeGetVolumeStatsResponse {
                usage,
                volume_condition: healthy,
            });
        }
        let st = match nix::sys::statvfs::statvfs(path) {
            Ok(st) => st,
            Err(e) => {
                return Ok(abnormal(format!(
                    "the filesystem at {} fails: {e}",
                    path.display()
                )))
            }
        };
        let frag = st.fragment_size() as i64;
        let (blocks, free, avail) = (
            st.blocks() as i64,
            st.blocks_free() as i64,
            st.blocks_available() as i64,
        );
        let (files, ffree) = (st.files() as i64, st.files_free() as i64);
        let usage = vec![
            VolumeUsage {
                total: blocks * frag,
                available: avail * frag,
                used: (blocks - free) * frag,
                unit: Unit::Bytes as i32,
            },
            VolumeUsage {
                total: files,
                available: ffree,
                used: files - ffree,
                unit: Unit::Inodes as i32,
            },
        ];
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: healthy,
        })
    }

    /// NodeExpandVolume: the backing file grown first when the driver
    /// expands on the node (`Expansion::Node`), then the loop device's size
    /// and the filesystem.
    fn expand(&self, id: &str, path: &Path, range: Option<&CapacityRange>) -> Result<u64, Status> {
        let e = if self.expansion == super::Expansion::Node {
            self.grow(id, range)?
        } else {
            self.volume(id)?.1
        };
        let Some(dev) = pool::attached(&e.path) else {
            return Err(Status::failed_precondition(format!(
                "volume {id} is not staged on this node"
            )));
        };
        pool::set_capacity(&dev).map_err(status)?;
        if let Some(m) = mounted_at(&self.cfg.mount_info, path)? {
            if path.is_dir() {
                nodeops::grow_fs(&dev, path, &m.fs_type)?;
                tracing::info!(volume = id, bytes = e.size, "filesystem grown");
            }
        } else if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist",
                path.display()
            )));
        }
        Ok(e.size)
    }
}

#[tonic::async_trait]
impl node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        let staging = path_arg(&r.staging_target_path, "staging target path")?;
        let access = caps::access(r.volume_capability.as_ref())?;
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            d.stage(&id, &staging, &access)
        })
        .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        let staging = path_arg(&r.staging_target_path, "staging target path")?;
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            d.unstage(&id, &staging)
        })
        .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        path_arg(&r.target_path, "target path")?;
        path_arg(&r.staging_target_path, "staging target path")?;
        let access = caps::access(r.volume_capability.as_ref())?;
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            d.publish(&r, &access)
        })
        .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        let target = path_arg(&r.target_path, "target path")?;
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            nodeops::umount_all(&d.cfg.mount_info, &target)?;
            nodeops::remove_target(&target)
        })
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        let path = path_arg(&r.volume_path, "volume path")?;
        let d = self.0.clone();
        let resp = blocking(move || d.stats(&id, &path)).await?;
        Ok(Response::new(resp))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = id_arg(&r.volume_id)?;
        let path = path_arg(&r.volume_path, "volume path")?;
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        let range = r.capacity_range;
        let size = blocking(move || {
            let _g = guard;
            d.expand(&id, &path, range.as_ref())
        })
        .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let capabilities = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let n = &self.0.node;
        Ok(Response::new(NodeGetInfoResponse {
            node_id: n.name.clone(),
            max_volumes_per_node: n.max_volumes,
            accessible_topology: Some(caps::topology(&n.topology)),
        }))
    }
}
