//! The count of requests in flight, which graceful shutdown waits on.
//!
//! Every request counts itself in and out, on whichever worker thread serves it. The count and
//! what its guards hold live in an allocation of their own: a request's guard writes only
//! there, not to the `App`'s or the live config's cache lines, which every request on every
//! worker reads. (On this project's 2-core machine no gain from that was measurable:
//! bench/PROFILE.md §8.8.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Requests being proxied now.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    /// Wakes [`Inflight::settle`] when `count` drops to zero.
    idle: Notify,
}

impl Inflight {
    /// Counts a request as in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InflightGuard(Arc::clone(self))
    }

    /// How many requests are in flight.
    pub fn now(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight, or `grace` has passed. Returns whether it went idle.
    pub async fn settle(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // Registered before the count is read: a guard dropping in between still wakes it.
            let idle = self.idle.notified();
            if self.now() == 0 {
                return true;
            }
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Decrements the in-flight count when a request ends, however it ends.
pub struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait ends when the last guard drops, not before, and at once with none in flight.
    #[tokio::test(start_paused = true)]
    async fn settle_ends_when_the_last_request_ends() {
        let inflight = Arc::new(Inflight::default());
        assert!(inflight.settle(Duration::ZERO).await);
        let (first, second) = (inflight.enter(), inflight.enter());
        assert_eq!(inflight.now(), 2);
        let waiting = tokio::spawn({
            let inflight = Arc::clone(&inflight);
            async move { inflight.settle(Duration::from_secs(60)).await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(second);
        assert!(waiting.await.unwrap());
        assert_eq!(inflight.now(), 0);
    }

    /// With a request still in flight the wait gives up after `grace`.
    #[tokio::test(start_paused = true)]
    async fn settle_gives_up_after_the_grace_period() {
        let inflight = Arc::new(Inflight::default());
        let _request = inflight.enter();
        let start = tokio::time::Instant::now();
        assert!(!inflight.settle(Duration::from_secs(5)).await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
