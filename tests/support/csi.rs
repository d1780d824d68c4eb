//! A gRPC client of `disklet csi` over its unix socket, as the sidecars and
//! kubelet call it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

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
