//! Upstream back-pressure: after a 429 or 503 with `Retry-After`, further requests to that
//! upstream wait until then, and the header's two forms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Per-upstream holds. Lives as long as the process (not per config), so a reload does not
/// forget an upstream's pushback; the bound can follow the config via [`UpstreamHolds::set_max`].
#[derive(Debug)]
pub struct UpstreamHolds {
    max_nanos: AtomicU64,
    /// Fast path: no hold anywhere means no lock per request.
    any: AtomicBool,
    until: Mutex<HashMap<String, Instant>>,
}

impl UpstreamHolds {
    /// No holds yet; none will last longer than `max` (`retry.max_retry_after`).
    pub fn new(max: Duration) -> UpstreamHolds {
        let holds = UpstreamHolds {
            max_nanos: AtomicU64::new(0),
            any: AtomicBool::new(false),
            until: Mutex::new(HashMap::new()),
        };
        holds.set_max(max);
        holds
    }

    /// Changes the bound for holds placed from now on (config reload).
    pub fn set_max(&self, max: Duration) {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        self.max_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Holds `upstream` for `delay` from now (a parsed `Retry-After`), within the bound.
    pub fn hold_for(&self, upstream: &str, delay: Duration) -> Instant {
        let now = Instant::now();
        self.hold_until(
            upstream,
            now.checked_add(delay).unwrap_or_else(|| self.cap(now)),
        )
    }

    /// Holds `upstream` until `until`, capped at now + the bound. A hold only ever grows: an
    /// earlier `until` than the current one changes nothing. Returns the hold in force.
    pub fn hold_until(&self, upstream: &str, until: Instant) -> Instant {
        let until = until.min(self.cap(Instant::now()));
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let held = map
            .entry(upstream.to_string())
            .and_modify(|u| *u = (*u).max(until))
            .or_insert(until);
        self.any.store(true, Ordering::Release);
        *held
    }

    fn cap(&self, now: Instant) -> Instant {
        let max = Duration::from_nanos(self.max_nanos.load(Ordering::Relaxed));
        now.checked_add(max).unwrap_or(now)
    }

    /// Until when requests to `upstream` must wait; `None` when they may go now. Call before
    /// sending (after the rate limits); sleep until the answer, then send.
    pub fn held_until(&self, upstream: &str) -> Option<Instant> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until > now);
        if map.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        map.get(upstream).copied()
    }
}

/// Reads a `Retry-After` value: whole seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015
/// 07:28:00 GMT`), relative to `now` (a date in the past means zero). `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A delay as a `Retry-After` value: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}
