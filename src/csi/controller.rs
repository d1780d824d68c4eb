//! The Controller service, run on every node for that node's pools:
//! volumes, snapshots, clones, growth and capacity.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::caps::{self, unsupported};
use super::proto::controller_service_capability::{rpc, Rpc, Type};
use super::proto::volume_content_source::Type as Src;
use super::proto::*;
use super::{blocking, status, Driver, Id, PoolRef, DEFAULT_VOLUME_BYTES};
use crate::host::pool::{Entry, Source};

pub struct Controller(pub Arc<Driver>);

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

impl Driver {
    fn create_volume(
        &self,
        name: &str,
        size: u64,
        range: Option<CapacityRange>,
        source: Option<Src>,
    ) -> Result<Volume, Status> {
        if let Some((p, e)) = self.find_named(name, false)? {
            let fits = range.is_none_or(|r| {
                e.size >= r.required_bytes.max(0) as u64
                    && (r.limit_bytes <= 0 || e.size <= r.limit_bytes as u64)
            });
            if !fits {
                return Err(Status::already_exists(format!(
                    "volume {name} exists with {} bytes, outside the range asked",
                    e.size
                )));
            }
            return Ok(self.volume_message(&p, &e, source));
        }
        let (p, e) = match &source {
            None => {
                let p = self.roomiest(size)?;
                let e = p.pool.create_volume(name, size, Source::Empty);
                (p, e)
            }
            Some(Src::Snapshot(s)) => {
                let (p, snap) = self
                    .snapshot_entry(&s.snapshot_id)
                    .map_err(|e| self.source_elsewhere(e, "snapshot", &s.snapshot_id))?;
                let e = p
                    .pool
                    .create_volume(name, size.max(snap.size), Source::Snapshot(&snap.id));
                (p, e)
            }
            Some(Src::Volume(v)) => {
                let (p, src) = self
                    .volume(&v.volume_id)
                    .map_err(|e| self.source_elsewhere(e, "volume", &v.volume_id))?;
                // A clone of a live volume is taken like a snapshot: with
                // its filesystem frozen.
                let e = super::nodeops::frozen(&src.path, || {
                    p.pool
                        .create_volume(name, size.max(src.size), Source::Volume(&src.id))
                })?;
                (p, e)
            }
        };
        let e = e.map_err(status)?;
        tracing::info!(
            volume = Id::format(&p.id, &e.id),
            bytes = e.size,
            "volume created"
        );
        Ok(self.volume_message(&p, &e, source))
    }

    /// A restore's or clone's source not found here: most likely it lives on
    /// another node (a copy is made in its source's pool), which the
    /// scheduler did not know when it placed the pod; say so.
    fn source_elsewhere(&self, e: Status, what: &str, id: &str) -> Status {
        if e.code() != tonic::Code::NotFound {
            return e;
        }
        Status::not_found(format!(
            "source {what} {id} is not on node {}: a restore or a clone is made on the node that holds its source, so give the claim's pod that node (nodeAffinity or nodeName); {}",
            self.node.name,
            e.message()
        ))
    }

    /// The pool with the most room, if it has `size` bytes available.
    fn roomiest(&self, size: u64) -> Result<PoolRef, Status> {
        let pools = self.available()?;
        let seen: Vec<String> = pools
            .iter()
            .map(|(p, a)| format!("{} {a} bytes", p.id))
            .collect();
        // The first of the roomiest, in the pools' order.
        let best = pools.into_iter().rev().max_by_key(|(_, a)| *a);
        match best {
            Some((p, a)) if a >= size => Ok(p),
            _ => Err(Status::resource_exhausted(format!(
                "no pool on node {} has {size} bytes available (pools: {})",
                self.node.name,
                if seen.is_empty() {
                    "none mounted".to_string()
                } else {
                    seen.join(", ")
                }
            ))),
        }
    }

    fn snapshot_entry(&self, snapshot_id: &str) -> Result<(PoolRef, Entry), Status> {
        let missing = || Status::not_found(format!("snapshot {snapshot_id} does not exist"));
        let id = Id::parse(snapshot_id).ok_or_else(missing)?;
        let p = self.pool(&id.pool).map_err(|_| missing())?;
        match p.pool.snapshot(&id.name) {
            Ok(Some(e)) => Ok((p, e)),
            _ => Err(missing()),
        }
    }

    fn volume_message(&self, p: &PoolRef, e: &Entry, source: Option<Src>) -> Volume {
        Volume {
            capacity_bytes: e.size as i64,
            volume_id: Id::format(&p.id, &e.id),
            volume_context: [("disklet.io/pool-class".to_string(), p.class.clone())].into(),
            content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
            accessible_topology: vec![caps::topology(&self.node.topology)],
        }
    }

    fn snapshot_message(&self, p: &PoolRef, e: &Entry, source: &str) -> Snapshot {
        let t = std::fs::metadata(&e.path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Snapshot {
            size_bytes: e.size as i64,
            snapshot_id: Id::format(&p.id, &e.id),
            source_volume_id: Id::format(&p.id, source),
            creation_time: Some(prost_types::Timestamp::from(t)),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    fn create_snapshot(&self, name: &str, source_id: &str) -> Result<Snapshot, Status> {
        let (p, vol) = self.volume(source_id)?;
        if let Some((q, e)) = self.find_named(name, true)? {
            let src = q.pool.snapshot_source(&e.id).map_err(status)?;
            if q.id != p.id || src.as_deref() != Some(vol.id.as_str()) {
                return Err(Status::already_exists(format!(
                    "snapshot {name} exists, of another volume"
                )));
            }
            return Ok(self.snapshot_message(&q, &e, &vol.id));
        }
        let e = super::nodeops::frozen(&vol.path, || p.pool.create_snapshot(name, &vol.id))?
            .map_err(status)?;
        tracing::info!(
            snapshot = Id::format(&p.id, name),
            volume = source_id,
            "snapshot taken"
        );
        Ok(self.snapshot_message(&p, &e, &vol.id))
    }

    /// Every snapshot, with the filters of a ListSnapshots request, in id
    /// order.
    fn snapshots(&self, snapshot_id: &str, source: &str) -> Result<Vec<Snapshot>, Status> {
        let mut out = Vec::new();
        for p in self.pools()? {
            for e in p.pool.snapshots().map_err(status)? {
                let src = p
                    .pool
                    .snapshot_source(&e.id)
                    .map_err(status)?
                    .unwrap_or_default();
                let s = self.snapshot_message(&p, &e, &src);
                if (snapshot_id.is_empty() || s.snapshot_id == snapshot_id)
                    && (source.is_empty() || s.source_volume_id == source)
                {
                    out.push(s);
                }
            }
        }
        out.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        Ok(out)
    }

    /// Deletes a volume or snapshot by id: one that is not ours is gone
    /// already; one on a pool not mounted now cannot be destroyed yet.
    fn delete(&self, id: &str, snapshot: bool) -> Result<(), Status> {
        let Some(id) = Id::parse(id) else {
            return Ok(());
        };
        let p = self.pool(&id.pool).map_err(|e| {
            Status::failed_precondition(format!(
                "{}; its data is destroyed when the pool is back",
                e.message()
            ))
        })?;
        let done = if snapshot {
            p.pool.delete_snapshot(&id.name)
        } else {
            p.pool.delete_volume(&id.name)
        };
        match done {
            Ok(()) | Err(crate::host::pool::PoolError::BadId { .. }) => Ok(()),
            Err(e) => Err(status(e)),
        }
    }
}

#[tonic::async_trait]
impl controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = required(&r.name, "name")?.to_string();
        caps::require_all(&r.volume_capabilities)?;
        caps::parameters(&r.parameters)?;
        let size = caps::size_for(r.capacity_range.as_ref(), DEFAULT_VOLUME_BYTES)?;
        let d = self.0.clone();
        if !caps::reachable(&d.node.topology, r.accessibility_requirements.as_ref()) {
            return Err(Status::resource_exhausted(format!(
                "node {} lies outside the requested topology",
                d.node.name
            )));
        }
        let source = r.volume_content_source.and_then(|s| s.r#type);
        let guard = d.lock(&[&name])?;
        let range = r.capacity_range;
        let volume = blocking(move || {
            let _g = guard;
            d.create_volume(&name, size, range, source)
        })
        .await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = required(&req.get_ref().volume_id, "volume id")?.to_string();
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            d.delete(&id, false)
        })
        .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume id")?.to_string();
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume capabilities are required"));
        }
        let d = self.0.clone();
        blocking(move || d.volume(&id).map(|_| ())).await?;
        let resp = match r.volume_capabilities.iter().find_map(unsupported) {
            Some(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    /// What the node's pools can still give: the sum, and the largest
    /// volume one pool can hold (what the scheduler compares a claim with).
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let d = self.0.clone();
        let ours = r.accessible_topology.as_ref().is_none_or(|t| {
            t.segments
                .iter()
                .all(|(k, v)| d.node.topology.get(k) == Some(v))
        });
        if !ours
            || r.volume_capabilities
                .iter()
                .any(|c| unsupported(c).is_some())
        {
            return Ok(Response::new(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            }));
        }
        let (sum, max) = blocking(move || {
            let pools = d.available()?;
            let sum = pools.iter().map(|(_, a)| a).sum::<u64>();
            let max = pools.iter().map(|(_, a)| *a).max().unwrap_or(0);
            Ok((sum, max))
        })
        .await?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: sum as i64,
            maximum_volume_size: Some(max as i64),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let expand = (self.0.expansion == super::Expansion::Controller).then_some(T::ExpandVolume);
        let capabilities = [
            T::CreateDeleteVolume,
            T::GetCapacity,
            T::CreateDeleteSnapshot,
            T::ListSnapshots,
            T::CloneVolume,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .chain(expand)
        .map(|t| ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let name = required(&r.name, "snapshot name")?.to_string();
        let source = required(&r.source_volume_id, "source volume id")?.to_string();
        let d = self.0.clone();
        let guard = d.lock(&[&name, &source])?;
        let snapshot = blocking(move || {
            let _g = guard;
            d.create_snapshot(&name, &source)
        })
        .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = required(&req.get_ref().snapshot_id, "snapshot id")?.to_string();
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        blocking(move || {
            let _g = guard;
            d.delete(&id, true)
        })
        .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let start: usize = if r.starting_token.is_empty() {
            0
        } else {
            r.starting_token.parse().map_err(|_| {
                Status::aborted(format!(
                    "starting token {:?} is not one of ours",
                    r.starting_token
                ))
            })?
        };
        let d = self.0.clone();
        let (id, src) = (r.snapshot_id.clone(), r.source_volume_id.clone());
        let all = blocking(move || d.snapshots(&id, &src)).await?;
        if start > all.len() {
            return Err(Status::aborted(format!(
                "starting token {start} is past the end"
            )));
        }
        let take = if r.max_entries == 0 {
            usize::MAX
        } else {
            r.max_entries as usize
        };
        let end = start.saturating_add(take).min(all.len());
        let next_token = if end < all.len() {
            end.to_string()
        } else {
            String::new()
        };
        let entries = all[start..end]
            .iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(s.clone()),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume id")?.to_string();
        let range = r
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity range is required"))?;
        let node_expansion_required = !matches!(
            r.volume_capability.and_then(|c| c.access_type),
            Some(volume_capability::AccessType::Block(_))
        );
        let d = self.0.clone();
        let guard = d.lock(&[&id])?;
        let size = blocking(move || {
            let _g = guard;
            d.grow(&id, Some(&range)).map(|e| e.size)
        })
        .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required,
        }))
    }
}
