//! A circuit breaker per upstream: after `failures` consecutive network or 5xx failures it fails
//! fast for `cooldown`, then lets one probe through; the probe's outcome closes or re-opens it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the breaker says about a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerVerdict {
    /// Closed: go.
    Allow,
    /// Half-open: this request is the one probe.
    Probe,
    /// Open: fail fast; it may close after this long.
    Reject(Duration),
}

#[derive(Debug, Default)]
struct Open {
    until: Option<Instant>,
    probing: bool,
}

/// The breaker. Closed, it costs one atomic load per request.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    open: Mutex<Open>,
}

impl Breaker {
    /// `threshold` 0 never opens.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            open: Mutex::new(Open::default()),
        }
    }

    /// Decides for a request arriving at `now()`. The clock is read only when the breaker is
    /// open: a closed one costs one atomic load and no clock read.
    pub fn check(&self, now: impl FnOnce() -> Instant) -> BreakerVerdict {
        if self.threshold == 0 || self.failures.load(Ordering::Acquire) < self.threshold {
            return BreakerVerdict::Allow;
        }
        let now = now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.until {
            Some(until) if now < until => BreakerVerdict::Reject(until - now),
            _ if open.probing => BreakerVerdict::Reject(self.cooldown),
            _ => {
                open.probing = true;
                BreakerVerdict::Probe
            }
        }
    }

    /// Records a request's outcome: `ok` is false for network errors, timeouts and 5xx. The
    /// clock (`now()`) is read only for a failure that opens the breaker.
    pub fn record(&self, ok: bool, now: impl FnOnce() -> Instant) {
        if self.threshold == 0 {
            return;
        }
        if ok {
            // A read first: a healthy upstream costs no write to a shared cache line.
            if self.failures.load(Ordering::Acquire) == 0 {
                return;
            }
            if self.failures.swap(0, Ordering::AcqRel) >= self.threshold {
                *self.open.lock().unwrap_or_else(|p| p.into_inner()) = Open::default();
            }
            return;
        }
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.threshold {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.until = Some(now() + self.cooldown);
            open.probing = false;
        }
    }

    /// Open or half-open: enough failures in a row that requests fail fast (or one probes).
    /// For the `sidecar_breaker_open` gauge.
    pub fn is_open(&self) -> bool {
        self.threshold > 0 && self.failures.load(Ordering::Acquire) >= self.threshold
    }

    /// A probe ended without an outcome (the client went away): let another one try.
    pub fn abandon_probe(&self) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            b.record(false, || t0);
        }
        assert_eq!(b.check(|| t0), BreakerVerdict::Allow);
        assert!(!b.is_open());
        b.record(false, || t0);
        assert!(b.is_open());
        assert_eq!(
            b.check(|| t0 + Duration::from_secs(1)),
            BreakerVerdict::Reject(Duration::from_secs(9))
        );
        // After the cool-down exactly one probe goes through.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.check(|| later), BreakerVerdict::Probe);
        assert!(matches!(b.check(|| later), BreakerVerdict::Reject(_)));
        // A failed probe re-opens it for another cool-down.
        b.record(false, || later);
        assert!(matches!(
            b.check(|| later + Duration::from_secs(5)),
            BreakerVerdict::Reject(_)
        ));
        let probe_again = later + Duration::from_secs(10);
        assert_eq!(b.check(|| probe_again), BreakerVerdict::Probe);
        // A successful probe closes it.
        b.record(true, || probe_again);
        assert_eq!(b.check(|| probe_again), BreakerVerdict::Allow);
        assert!(!b.is_open());
    }

    #[test]
    fn success_resets_the_count_and_zero_disables() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let t = Instant::now();
        b.record(false, || t);
        b.record(true, || t);
        b.record(false, || t);
        assert_eq!(b.check(|| t), BreakerVerdict::Allow);
        let off = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            off.record(false, || t);
        }
        assert_eq!(off.check(|| t), BreakerVerdict::Allow);
    }

    #[test]
    fn a_closed_breaker_and_a_success_read_no_clock() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let no_clock = || -> Instant { panic!("the clock was read") };
        assert_eq!(b.check(no_clock), BreakerVerdict::Allow);
        b.record(true, no_clock);
        // A failure below the threshold does not open it: still no clock.
        b.record(false, no_clock);
        assert_eq!(b.check(no_clock), BreakerVerdict::Allow);
        b.record(true, no_clock);
    }

    #[test]
    fn abandoned_probe_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_secs(1));
        let t = Instant::now();
        b.record(false, || t);
        let later = t + Duration::from_secs(2);
        assert_eq!(b.check(|| later), BreakerVerdict::Probe);
        b.abandon_probe();
        assert_eq!(b.check(|| later), BreakerVerdict::Probe);
    }
}
