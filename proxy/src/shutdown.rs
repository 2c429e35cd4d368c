//! Signals: SIGTERM drains in-flight requests for at most `shutdown_grace` (and exits at once when
//! idle), SIGINT stops at once, SIGQUIT hands the listeners to a new process (Pingora's upgrade),
//! SIGHUP reloads the config.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

/// Waits until no request is in flight, or `grace` has passed. Returns whether it went idle.
pub async fn drain(app: &App, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let idle = app.idle.notified();
        if app.inflight.load(Ordering::Acquire) == 0 {
            return true;
        }
        tokio::select! {
            _ = idle => {}
            _ = tokio::time::sleep_until(deadline) => return false,
        }
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
                    let grace = self.app.live.load().config.shutdown_grace;
                    let inflight = self.app.inflight.load(Ordering::Acquire);
                    tracing::info!(inflight, grace_ms = grace.as_millis() as u64, "SIGTERM: finishing in-flight requests");
                    if drain(&self.app, grace).await {
                        tracing::info!("all requests finished; exiting");
                    } else {
                        tracing::warn!(inflight = self.app.inflight.load(Ordering::Acquire), "grace period over; exiting with requests in flight");
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
