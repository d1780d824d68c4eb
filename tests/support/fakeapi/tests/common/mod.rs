//! Shared helpers for the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use disklet_fakeapi::{FakeApiServer, Options};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A running server with a kubeconfig in a temp dir.
pub struct Env {
    pub srv: FakeApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

pub async fn start() -> Env {
    start_with(Options::default()).await
}

pub async fn start_with(opts: Options) -> Env {
    let srv = FakeApiServer::start(opts)
        .await
        .expect("start fake apiserver");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
    Env {
        srv,
        dir,
        kubeconfig,
    }
}

/// A local PV as disklet would create it.
pub fn pv(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"disklet.io/node": node}},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "local",
            "local": {"path": format!("/mnt/disks/{name}")},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
            ]}]}}
        }
    })
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    pub base: String,
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Http {
    pub fn new(base: &str) -> Self {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Http {
            client,
            base: base.to_string(),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Option<&str>,
    ) -> http::Request<Full<Bytes>> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .expect("request")
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Option<&str>,
    ) -> Result<Resp, hyper_util::client::legacy::Error> {
        let resp = self
            .client
            .request(self.request(method, path, ct, body))
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            body,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None, None).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.send(
            "POST",
            path,
            Some("application/json"),
            Some(&body.to_string()),
        )
        .await
        .expect("POST")
    }

    pub async fn patch(&self, path: &str, ct: &str, body: &str) -> Resp {
        self.send("PATCH", path, Some(ct), Some(body))
            .await
            .expect("PATCH")
    }

    pub async fn put(&self, path: &str, body: &Value) -> Resp {
        self.send(
            "PUT",
            path,
            Some("application/json"),
            Some(&body.to_string()),
        )
        .await
        .expect("PUT")
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path, None, None).await.expect("DELETE")
    }

    /// Open a watch; fails the test if the status is not 200.
    pub async fn watch(&self, path: &str) -> WatchStream {
        let resp = self
            .client
            .request(self.request("GET", path, None, None))
            .await
            .expect("watch request");
        assert_eq!(resp.status().as_u16(), 200, "watch {path}");
        WatchStream {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

pub struct WatchStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl WatchStream {
    /// Next event, or None when the server ended the stream.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("watch line is JSON"));
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Next event within a deadline (the deadline only bounds a hung test).
    pub async fn next_within(&mut self, secs: u64) -> Option<Value> {
        tokio::time::timeout(Duration::from_secs(secs), self.next())
            .await
            .expect("timed out waiting for a watch event")
    }

    /// Whether the stream ends (None) before the deadline.
    pub async fn ends_within(&mut self, secs: u64) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(secs), self.next()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub fn ev_type(e: &Value) -> &str {
    e["type"].as_str().unwrap_or("")
}

pub fn ev_name(e: &Value) -> &str {
    e["object"]["metadata"]["name"].as_str().unwrap_or("")
}

pub fn rv_of(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_string()
}
