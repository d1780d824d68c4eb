//! The Identity service: who the driver is, what it offers, whether it is
//! ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::identity_server;
use super::proto::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use super::proto::*;
use super::Driver;

pub struct Identity(pub Arc<Driver>);

#[tonic::async_trait]
impl identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: [("commit".to_string(), env!("DISKLET_COMMIT").to_string())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// Ready when the mount table can be read: a node with no pool mounted
    /// yet is ready too, and reports no capacity.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let d = self.0.clone();
        super::blocking(move || d.pools().map(|_| ())).await?;
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
