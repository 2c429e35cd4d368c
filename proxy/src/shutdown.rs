//! Signals. SIGTERM: `/readyz` answers 503 at once (the admin listener keeps serving), new
//! requests are still taken for `shutdown_delay` (for an app that drains after the sidecar got
//! its SIGTERM), then new connections are closed and in-flight requests get at most
//! `shutdown_grace` to finish (exit at once when idle). SIGINT stops at once, SIGQUIT hands the
//! listeners to a new process (Pingora's upgrade), SIGHUP reloads the config.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::app::App;

/// The signal watcher handed to Pingora's `Server::run`.
pub struct Signals {
    app: Arc<App>,
    reload: Box<dyn Fn() + Send + Sync>,
}

impl Signals {
    /// Watches signals for `app`; `reload` runs on SIGHUP.
    pub fn new(app: Arc<App>, reload: Box<dyn Fn() + Send + Sync>) -> Signals {
        Signals { app, reload }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {
                    let (delay, grace) = {
                        let live = self.app.live.load();
                        (live.config.shutdown_delay, live.config.shutdown_grace)
                    };
                    self.app.draining.store(true, Ordering::Release);
                    if !delay.is_zero() {
                        tracing::info!(delay_ms = delay.as_millis() as u64, "SIGTERM: not ready any more; taking new requests for shutdown_delay");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = int.recv() => return ShutdownSignal::FastShutdown,
                        }
                    }
                    self.app.closing.store(true, Ordering::Release);
                    let inflight = self.app.inflight.now();
                    tracing::info!(inflight, grace_ms = grace.as_millis() as u64, "SIGTERM: no new requests; finishing in-flight requests");
                    let drained = tokio::select! {
                        d = self.app.inflight.settle(grace) => d,
                        _ = int.recv() => return ShutdownSignal::FastShutdown,
                    };
                    if drained {
                        tracing::info!("all requests finished; exiting");
                    } else {
                        tracing::warn!(inflight = self.app.inflight.now(), "grace period over; exiting with requests in flight");
                    }
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = quit.recv() => {
                    // The new process serves the listeners now: a Unix socket file stays.
                    self.app.upgrading.store(true, Ordering::Release);
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = hup.recv() => (self.reload)(),
            }
        }
    }
}
