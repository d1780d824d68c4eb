//! The agent's main loop: sources (device events, mount table, discovery
//! dirs, the PV watch) kick a pass; a resync timer is the safety net; a
//! settle timer wakes it when a device has been stable long enough.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::runtime::reflector::Store;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Agent, Outcome, ReconcileError, DEBOUNCE, READ_YOUR_WRITES};
use crate::host::events::{self, Kick};

/// What feeds the loop: the kicks, and this node's PVs as the watch shows
/// them.
struct Sources {
    kicks: mpsc::Receiver<Kick>,
    store: Store<PersistentVolume>,
    /// Notified after every change the watch brings into `store`.
    seen: Arc<Notify>,
    /// The PV watch and its forwarder, aborted on exit.
    tasks: Vec<JoinHandle<()>>,
    /// Kept alive while the loop runs.
    _dir_watch: Option<notify::RecommendedWatcher>,
}

/// When the next pass is due, and how the last ones went.
struct Pacing {
    resync: Duration,
    wake_at: Option<Instant>,
    backoff: Duration,
    failures: u32,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Passes in a row while each changes the host (a format, then its mount,
/// then its publication).
const MAX_PASSES: u32 = 5;

impl Agent {
    /// Runs until `shutdown` resolves. Mounts stay in place on exit: pods use them.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ReconcileError> {
        let mut src = self.start_sources();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut pace = Pacing {
            resync: Duration::from_secs(self.cfg.resync_seconds),
            wake_at: None,
            backoff: FIRST_BACKOFF,
            failures: 0,
        };
        let mut kicked = true;
        loop {
            if !kicked && wait_for_kick(&mut src.kicks, &mut shutdown, &pace).await {
                break;
            }
            kicked = false;
            if self.passes(&src, &mut shutdown, &mut pace).await {
                break;
            }
        }
        for t in &src.tasks {
            t.abort();
        }
        Ok(())
    }

    /// Starts the event sources and the PV watch.
    fn start_sources(&self) -> Sources {
        let (tx, kicks) = mpsc::channel::<Kick>(256);
        events::spawn_device_monitors(&tx, &self.probes.events);
        if let Err(e) = events::spawn_mount_watch(&self.cfg.mount_info, tx.clone()) {
            warn!(error = %e, "cannot watch the mount table; relying on resync");
        }
        let dirs: Vec<PathBuf> = self
            .cfg
            .classes
            .iter()
            .flat_map(|c| c.discovery_dirs.clone())
            .collect();
        let dir_watch = events::watch_dirs(&dirs, tx.clone());
        let (pv_tx, mut pv_rx) = mpsc::channel::<()>(16);
        let seen = Arc::new(Notify::new());
        let (store, drive) = self.kube.pv_reflector(pv_tx, seen.clone());
        let watch = tokio::spawn(drive);
        let fwd = tokio::spawn(async move {
            while pv_rx.recv().await.is_some() {
                if tx.send(Kick::Pv).await.is_err() {
                    return;
                }
            }
        });
        Sources {
            kicks,
            store,
            seen,
            tasks: vec![watch, fwd],
            _dir_watch: dir_watch,
        }
    }

    /// Passes in a row while each changed the host (at most `MAX_PASSES`),
    /// or one that failed. Returns whether to stop.
    async fn passes<F: Future<Output = ()>>(
        &mut self,
        src: &Sources,
        shutdown: &mut Pin<&mut F>,
        pace: &mut Pacing,
    ) -> bool {
        for _ in 0..MAX_PASSES {
            let pass = async {
                if pvs_listed(&src.store).await {
                    self.await_own_writes(&src.store, &src.seen).await;
                    let pvs: Vec<PersistentVolume> =
                        src.store.state().iter().map(|p| (**p).clone()).collect();
                    self.reconcile(&pvs).await
                } else {
                    Err(ReconcileError::PvsNotListed)
                }
            };
            // A stop is not made to wait for the pass: with a hung API
            // each of its calls would wait out its 60 s deadline, past
            // any grace period. The pass is dropped at its next await,
            // which is always between steps: a host step (mkfs, wipe,
            // mount) runs to its end inside one poll (`block_in_place`).
            // What is left undone is what a SIGKILL would leave, and the
            // next agent finishes it (tests/crash_points.rs).
            let result = tokio::select! {
                r = pass => r,
                _ = shutdown.as_mut() => {
                    info!("stopping in the middle of a pass; the next start finishes its work");
                    return true;
                }
            };
            match result {
                Ok(o) if self.passed(&o, pace) => {}
                Ok(_) => return false,
                Err(e) => {
                    self.failed(e, pace);
                    return false;
                }
            }
        }
        false
    }

    /// Books a pass that went through; returns whether to pass again at
    /// once (it changed the host).
    fn passed(&self, o: &Outcome, pace: &mut Pacing) -> bool {
        pace.wake_at = o.wake_at;
        pace.backoff = FIRST_BACKOFF;
        if pace.failures > 0 {
            info!(failures = pace.failures, "reconcile recovered");
            pace.failures = 0;
        }
        if !self.status.ready.swap(true, Ordering::Relaxed) {
            info!(actions = o.actions, "ready: first reconcile done");
        }
        o.host_changed
    }

    /// Books a failed pass: the next is due after the backoff (doubling, at
    /// most 30 s).
    fn failed(&self, e: ReconcileError, pace: &mut Pacing) {
        pace.failures += 1;
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.error(match &e {
            ReconcileError::Kube(k) => k.kind(),
            ReconcileError::Host(_) => "host",
            ReconcileError::PvsNotListed => "pvs-not-listed",
        });
        warn!(error = %e, retry_in_ms = pace.backoff.as_millis() as u64, "reconcile failed");
        pace.wake_at = Some(Instant::now() + pace.backoff);
        pace.backoff = (pace.backoff * 2).min(Duration::from_secs(30));
    }

    /// Waits (at most `READ_YOUR_WRITES`) until the PV watch shows the PVs
    /// this agent created or deleted in its last pass. Without it a pass
    /// right after one that created a PV may not see it and apply it again
    /// (seen with a slow API server: tests/agent_api_faults.rs).
    pub(super) async fn await_own_writes(
        &mut self,
        store: &Store<PersistentVolume>,
        seen: &Notify,
    ) {
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES;
        loop {
            // Registered before the check, so no change is missed between.
            let notified = seen.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            self.written.retain(|w| !w.seen(store));
            if self.written.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                debug!(writes = ?self.written, "the PV watch does not show this agent's last writes yet; deciding without them");
                self.written.clear();
                return;
            }
        }
    }
}

/// Waits for a kick, the resync timer or the settle time, then debounces.
/// Returns whether to stop.
async fn wait_for_kick<F: Future<Output = ()>>(
    kicks: &mut mpsc::Receiver<Kick>,
    shutdown: &mut Pin<&mut F>,
    pace: &Pacing,
) -> bool {
    let settle = async {
        match pace.wake_at {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    let mut settle = std::pin::pin!(settle);
    // A kick already waiting came while the last pass ran: a burst still
    // arriving, gathered for DEBOUNCE into one pass. A kick that finds the
    // agent idle (a hot-added disk) is acted on at once.
    let burst = pace.failures == 0 && !kicks.is_empty();
    if burst {
        tokio::time::sleep(DEBOUNCE).await;
    } else {
        let stop = loop {
            tokio::select! {
                _ = shutdown.as_mut() => break true,
                k = kicks.recv() => {
                    if k.is_none() { break true }
                    // While backing off after a failure, events do not cut the
                    // wait short: the next pass is due at `wake_at` anyway and
                    // sees them all, and an API in trouble is not asked again
                    // per event.
                    if pace.failures == 0 { break false }
                }
                _ = tokio::time::sleep(pace.resync) => break false,
                _ = &mut settle => break false,
            }
        };
        if stop {
            return true;
        }
    }
    while kicks.try_recv().is_ok() {}
    false
}

/// Decisions need the PVs: a pass waits a little (5 s) for the first list,
/// and fails (with backoff) while there is none. A dropped writer is no
/// list either.
async fn pvs_listed(store: &Store<PersistentVolume>) -> bool {
    use futures::FutureExt;
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
        || matches!(
            tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready()).await,
            Ok(Ok(()))
        )
}
