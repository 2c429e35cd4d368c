//! GCRA decisions for one rule, made by `governor` at times the scheduler chooses.
//!
//! governor normally reads its own clock and keeps its own state. The scheduler needs two things
//! governor's built-in stores cannot give: a *dry run* (does this cell conform in every rule the
//! request matches? only then is anything consumed) and evaluation at a chosen instant (a waiter
//! is admitted at the slot it was scheduled for, not at the moment its timer fired, so timer
//! lateness does not erode the delivered rate). So each check hands governor the time through a
//! [`PinnedClock`] and the theoretical arrival time (TAT) through a [`Probe`] key; the GCRA
//! arithmetic itself is governor's.

use std::cell::Cell;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::KeyedStateStore;
use governor::state::StateStore;
use governor::Quota;
use tokio::time::Instant;

/// A governor clock that reads whatever the scheduler pinned: nanoseconds since the gate's epoch.
#[derive(Debug, Default)]
pub(crate) struct PinnedClock(AtomicU64);

impl Clock for PinnedClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// Carries one bucket's TAT into governor and, when `commit` is set, the updated TAT back out.
pub(crate) struct Probe {
    tat: Cell<Option<Nanos>>,
    commit: bool,
}

impl Hash for Probe {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

/// The state store behind [`Probe`]: it keeps nothing itself.
#[derive(Debug, Default)]
pub(crate) struct ProbeStore;

impl StateStore for ProbeStore {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, key: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let (outcome, next) = f(key.tat.get())?;
        if key.commit {
            key.tat.set(Some(next));
        }
        Ok(outcome)
    }
}

impl KeyedStateStore<Probe> for ProbeStore {}

/// One rule's GCRA: governor's limiter plus the numbers the scheduler needs to plan ahead.
/// Only used under the rule's lock, which is what makes pinning the clock safe.
pub(crate) struct Gate {
    limiter: governor::RateLimiter<Probe, ProbeStore, PinnedClock, NoOpMiddleware<Duration>>,
    epoch: Instant,
    /// Emission interval: one request per `interval`.
    interval: Duration,
    /// How far ahead of the TAT a request may still conform: `(burst - 1) * interval`.
    tau: Duration,
}

/// A bucket's state: the TAT as governor keeps it, relative to the gate's epoch.
pub(crate) type Tat = Option<Nanos>;

impl Gate {
    /// `count` requests per `per`, `burst` at once. Callers validated that all are non-zero.
    pub(crate) fn new(count: u32, per: Duration, burst: u32) -> Gate {
        let interval = (per / count.max(1)).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let interval = quota.replenish_interval();
        let tau = interval.saturating_mul(burst.get() - 1);
        Gate {
            limiter: governor::RateLimiter::new(quota, ProbeStore, PinnedClock::default()),
            epoch: Instant::now(),
            interval,
            tau,
        }
    }

    /// Asks governor whether a cell conforms at `at`; with `commit`, it is consumed.
    /// `Err` carries the earliest instant it would conform.
    pub(crate) fn check(&self, tat: &mut Tat, at: Instant, commit: bool) -> Result<(), Instant> {
        let since = at.saturating_duration_since(self.epoch);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.limiter.clock().0.store(nanos, Ordering::Relaxed);
        let probe = Probe {
            tat: Cell::new(*tat),
            commit,
        };
        match self.limiter.check_key(&probe) {
            Ok(()) => {
                *tat = probe.tat.get();
                Ok(())
            }
            Err(not_until) => Err(self.epoch + not_until.earliest_possible()),
        }
    }

    /// When the cell after `ahead` others (queued before it, each taking the earliest slot)
    /// conforms, judged at `at`: `max(TAT, at) - tau + ahead * interval`, never before `at`.
    pub(crate) fn slot(&self, tat: Tat, ahead: usize, at: Instant) -> Instant {
        let tat = tat.map_or(at, |t| self.epoch + Duration::from(t)).max(at);
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        let slot = tat
            .checked_sub(self.tau)
            .unwrap_or(self.epoch)
            .checked_add(self.interval.saturating_mul(ahead))
            .unwrap_or(tat);
        slot.max(at)
    }
}
