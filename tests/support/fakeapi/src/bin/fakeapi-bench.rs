//! Rough performance numbers: `cargo run --release --bin fakeapi-bench [N]`.
//! Seeds N PVs (100 nodes) through the store, then times HTTP lists.

use disklet_fakeapi::{FakeApiServer, Options};
use serde_json::json;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(usize, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let len = buf.len();
    Ok((len, buf))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let srv = FakeApiServer::start(Options::default()).await?;
    let store = srv.store();
    let t = Instant::now();
    for i in 0..n {
        let node = format!("n{}", i % 100);
        store
            .create(json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("pv-{i:06}"), "labels": {"disklet.io/node": node}},
                "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                    "local": {"path": format!("/mnt/{i}")},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}
            }))
            .await?;
    }
    println!("create {n} PVs via store: {:?}", t.elapsed());
    // The same again as a client that server-side applies them (disklet's way).
    let t = Instant::now();
    for i in 0..n {
        let node = format!("n{}", i % 100);
        let name = format!("applied-{i:06}");
        let body = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"disklet.io/node": node, "disklet.io/class": "fast"},
                "annotations": {"pv.kubernetes.io/provisioned-by": "disklet", "disklet.io/fs-uuid": format!("{i:032x}")}},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "local-fast",
                "volumeMode": "Filesystem", "mountOptions": ["noatime"],
                "local": {"path": format!("/mnt/{i}/vol")},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}
        });
        store
            .patch(
                "persistentvolumes",
                None,
                &name,
                disklet_fakeapi::PatchType::Apply,
                &body,
                false,
                Some("disklet"),
                true,
            )
            .await?;
    }
    println!(
        "server-side apply {n} more PVs via store: {:?}",
        t.elapsed()
    );
    for (what, path) in [
        (
            "list by label selector (1% match)",
            "/api/v1/persistentvolumes?labelSelector=disklet.io%2Fnode%3Dn7",
        ),
        (
            "list by label selector, limit=500",
            "/api/v1/persistentvolumes?labelSelector=disklet.io%2Fnode%3Dn7&limit=500",
        ),
        ("list all", "/api/v1/persistentvolumes"),
    ] {
        let t = Instant::now();
        let (bytes, _) = http_get(srv.addr(), path).await?;
        println!("{what}: {:?} ({bytes} bytes)", t.elapsed());
    }
    srv.shutdown().await;
    Ok(())
}
