//! The background refresher: obtains the first token, refreshes ahead of expiry, retries
//! failures after their backoff, and is restarted if it panics.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::future::FutureExt;
use tokio::time::Instant;

use super::inner::lock;
use super::state::Trigger;
use super::TokenSource;
use crate::token::Token;

impl TokenSource {
    /// Starts the background refresher on the source's runtime: it obtains the first token, then
    /// refreshes ahead of expiry and retries failures after their backoff.
    pub fn start(&self) {
        let me = self.clone();
        let task = self.inner.handle.spawn(async move { me.supervise().await });
        if let Some(old) = lock(&self.inner.refresher).replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Stops the background refresher (the source is being replaced or the process stops).
    pub fn stop(&self) {
        if let Some(task) = lock(&self.inner.refresher).take() {
            task.abort();
        }
    }

    /// Runs the refresher, restarting it after a panic (counted and logged) so that a bug in
    /// one computation never leaves the provider without refreshes.
    async fn supervise(self) {
        loop {
            match AssertUnwindSafe(self.clone().refresher())
                .catch_unwind()
                .await
            {
                Ok(()) => return,
                Err(_) => {
                    tracing::error!(provider = %self.inner.name, "token refresher panicked; restarting it in 1s");
                    metrics::counter!("sidecar_refresher_restarts_total", "provider" => self.inner.name.clone()).increment(1);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn refresher(self) {
        let mut changes = self.inner.changed.subscribe();
        loop {
            let due = self.next_refresh_due();
            let outside = async {
                match self.inner.provider.changed() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {
                    let trigger = match self.current() {
                        None => Trigger::Initial,
                        Some(_) if self.usable().is_some() => Trigger::Proactive,
                        Some(_) => Trigger::Expired,
                    };
                    let _ = self.refresh(trigger, None).await;
                }
                _ = outside => {
                    tracing::info!(provider = %self.inner.name, "token source changed; reading it again");
                    let _ = self.refresh(Trigger::Proactive, None).await;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            changes.borrow_and_update();
        }
    }

    fn next_refresh_due(&self) -> Instant {
        let book = lock(&self.inner.book);
        let now = Instant::now();
        if book.consecutive_failures > 0 {
            return book.retry_at.unwrap_or(now);
        }
        match self.current() {
            None => now,
            Some(t) => {
                let due = self
                    .inner
                    .schedule
                    .refresh_at(t.issued_at, t.expires_at, spread_of(&t));
                let spacing = self.inner.schedule.min_interval(t.lifetime());
                match book.last_attempt_at {
                    Some(last) => due.max(last + spacing),
                    None => due,
                }
            }
        }
    }
}

/// A per-token point in `[-1, 1]` for the refresh jitter, taken from its fingerprint so it is
/// stable for one token and differs between tokens.
fn spread_of(t: &Token) -> f64 {
    let n = u32::from_str_radix(&t.fingerprint, 16).unwrap_or(0);
    f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0
}
