//! `/metrics`, `/healthz` (the process answers) and `/readyz` (the first
//! reconcile is done; it does not flip back on later errors, which the
//! metrics and Events report, so a harmless leftover never restarts the pod).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::reconcile::Status;

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds and serves in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let status = status.clone();
                    async move {
                        let r = match req.uri().path() {
                            "/metrics" => reply(
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                metrics.encode(),
                            ),
                            "/healthz" | "/livez" => {
                                reply(StatusCode::OK, "text/plain", "ok\n".into())
                            }
                            "/readyz" if status.ready.load(Ordering::Relaxed) => {
                                reply(StatusCode::OK, "text/plain", "ok\n".into())
                            }
                            "/readyz" => reply(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                "first reconcile not done\n".into(),
                            ),
                            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}
