//! Honouring the API server's `Retry-After`.
//!
//! An API server under load answers 429 (API Priority and Fairness) or 503
//! with `Retry-After: N`. kube's built-in retry is off (it could hold one
//! request for minutes, see `client.rs`), and the reconcile loop's and the
//! watcher's own backoffs know nothing of the header. This layer sits in the
//! client's tower stack, below every caller: once an answer carries
//! `Retry-After`, every later request from this process waits until then.
//! Fifty agents told to wait a second all wait a second, whatever they were
//! about to ask.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The longest wait disklet grants one `Retry-After`: a broken or hostile
/// proxy must not park the agent for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Shared gate: when the next request may go out.
#[derive(Clone, Default)]
pub struct RetryAfter {
    until: Arc<Mutex<Option<Instant>>>,
    /// Answers that carried a `Retry-After` so far.
    pub seen: Arc<AtomicU64>,
    /// Requests that were held back by one.
    pub held: Arc<AtomicU64>,
}

impl RetryAfter {
    fn until(&self) -> Option<Instant> {
        match self.until.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Records a `Retry-After` of `wait` from now (capped), never shortening
    /// a wait already in force.
    pub fn hold_for(&self, wait: Duration) {
        let at = Instant::now() + wait.min(MAX_RETRY_AFTER);
        let mut g = match self.until.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none_or(|t| t < at) {
            *g = Some(at);
        }
        self.seen.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until the gate is open.
    pub async fn ready(&self) {
        if let Some(t) = self.until() {
            if t > Instant::now() {
                self.held.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(t).await;
            }
        }
    }
}

/// `Retry-After` in seconds, as Kubernetes sends it (the HTTP-date form is
/// not used by the API server and is ignored).
pub fn retry_after<B>(resp: &Response<B>) -> Option<Duration> {
    if !matches!(resp.status().as_u16(), 429 | 503) {
        return None;
    }
    let v = resp.headers().get(http::header::RETRY_AFTER)?;
    let secs: u64 = v.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

impl<S> Layer<S> for RetryAfter {
    type Service = RetryAfterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryAfterService {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            gate: self.clone(),
        }
    }
}

/// The service the layer wraps around the client's stack.
pub struct RetryAfterService<S> {
    // The inner stack is not `Clone`; the lock is held only while a request
    // is handed to it, never while its answer is awaited.
    inner: Arc<tokio::sync::Mutex<S>>,
    gate: RetryAfter,
}

impl<S> Clone for RetryAfterService<S> {
    fn clone(&self) -> Self {
        RetryAfterService {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

type BoxFut<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqB, B> Service<Request<ReqB>> for RetryAfterService<S>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxFut<Response<B>, S::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the inner stack is awaited per call, under the lock.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let inner = self.inner.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            gate.ready().await;
            let fut = {
                let mut svc = inner.lock().await;
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                svc.call(req)
            };
            let resp = fut.await?;
            if let Some(wait) = retry_after(&resp) {
                tracing::warn!(
                    status = resp.status().as_u16(),
                    retry_after_s = wait.as_secs(),
                    "the API server asked to retry later; every request waits"
                );
                gate.hold_for(wait);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(code: u16, ra: Option<&str>) -> Response<()> {
        let mut b = Response::builder().status(code);
        if let Some(v) = ra {
            b = b.header("Retry-After", v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_429_and_503_with_seconds_count() {
        assert_eq!(
            retry_after(&resp(429, Some("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&resp(503, Some(" 1 "))),
            Some(Duration::from_secs(1))
        );
        assert_eq!(retry_after(&resp(500, Some("3"))), None);
        assert_eq!(retry_after(&resp(429, None)), None);
        assert_eq!(
            retry_after(&resp(429, Some("Wed, 21 Oct 2015 07:28:00 GMT"))),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_holds_every_later_request_and_is_capped() {
        let g = RetryAfter::default();
        let t0 = Instant::now();
        g.ready().await;
        assert_eq!(Instant::now(), t0, "open gate: no wait");
        g.hold_for(Duration::from_secs(5));
        g.hold_for(Duration::from_secs(1)); // never shortens
        g.ready().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        g.hold_for(Duration::from_secs(3600));
        let t1 = Instant::now();
        g.ready().await;
        assert_eq!(Instant::now() - t1, MAX_RETRY_AFTER);
        assert_eq!(g.held.load(Ordering::Relaxed), 2);
    }
}
