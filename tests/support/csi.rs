//! A gRPC client of `disklet csi` over its unix socket, as the sidecars and
//! kubelet call it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use disklet::csi::proto::controller_client::ControllerClient;
use disklet::csi::proto::volume_content_source::Type as Src;
use disklet::csi::proto::{
    CapacityRange, CreateVolumeRequest, Volume, VolumeCapability, VolumeContentSource,
};
use tonic::transport::Channel;

/// A channel to the driver's socket.
pub async fn channel(sock: PathBuf) -> Channel {
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// CreateVolume of `bytes` with one capability, from `source` if given.
pub async fn create(
    c: &mut ControllerClient<Channel>,
    name: &str,
    bytes: u64,
    cap: VolumeCapability,
    source: Option<Src>,
) -> Volume {
    c.create_volume(CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume
    .unwrap()
}
