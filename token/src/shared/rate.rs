//! Rate limits held across replicas: GCRA state in Redis, advanced by a Lua script on the
//! server's clock (`TIME`), so every replica's requests draw from one budget. A replica leases
//! a few cells at a time (at most 50 ms worth of the rate) so Redis is not called for every
//! request; a leased cell not spent within its share of the emission schedule is dropped, so
//! no replica can hoard capacity and release it later as a burst: the combined rate the
//! upstream sees stays within the rule.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use sidecar_config::{RateLimit, RateLimitMode};
use tokio::time::Instant;

use super::backend::SharedBackend;

/// At most this much of the rate is leased at once.
const LEASE_SPAN: Duration = Duration::from_millis(50);

/// GCRA on the server's clock. KEYS[1]: the theoretical arrival time (µs). ARGV: emission
/// interval (µs), burst tolerance (µs), cells wanted. Returns {granted, wait µs}.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = now
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  local v = tonumber(redis.call('GET', KEYS[1]))
  if v and v > now and v < now + tolerance + interval * (want + 1) then tat = v end
end
local granted = 0
while granted < want and tat <= now + tolerance do
  tat = tat + interval
  granted = granted + 1
end
if granted == 0 then return {0, tat - tolerance - now} end
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return {granted, 0}
",
    )
});

/// The shared rules of one config.
#[derive(Clone, Default)]
pub struct SharedRateLimits {
    rules: HashMap<String, Arc<SharedRule>>,
}

struct SharedRule {
    key: String,
    interval: Duration,
    tolerance: Duration,
    lease: u32,
    mode: RateLimitMode,
    max_wait: Duration,
    backend: SharedBackend,
    /// Leased cells and until when they may be spent; one refill at a time, in arrival order.
    pool: tokio::sync::Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    cells: u32,
    until: Option<Instant>,
}

/// What a shared rule says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedAdmission {
    /// Go (after `waited`).
    Go {
        /// Time spent waiting for a cell.
        waited: Duration,
    },
    /// 429: no cell within `max_wait` (or `mode: reject`).
    Reject {
        /// When a cell is expected.
        retry_after: Duration,
    },
    /// Redis is down: only the replica's own limit applied.
    Local,
}

impl SharedRateLimits {
    /// The shared rules among `rules`, drawing from `backend`.
    pub fn new(rules: &[RateLimit], backend: &SharedBackend) -> SharedRateLimits {
        let rules = rules
            .iter()
            .filter(|r| r.shared)
            .map(|r| {
                let interval = r.rate.per / r.rate.count.max(1);
                let interval = interval.max(Duration::from_micros(1));
                let tolerance = interval.saturating_mul(r.burst.saturating_sub(1));
                let lease = (LEASE_SPAN.as_micros() / interval.as_micros().max(1))
                    .clamp(1, u128::from(r.burst.max(1))) as u32;
                let rule = SharedRule {
                    key: backend.key(&["rate", &r.name]),
                    interval,
                    tolerance,
                    lease,
                    mode: r.mode,
                    max_wait: r.max_wait,
                    backend: backend.clone(),
                    pool: tokio::sync::Mutex::new(Pool::default()),
                };
                (r.name.clone(), Arc::new(rule))
            })
            .collect();
        SharedRateLimits { rules }
    }

    /// Whether rule `name` is held across replicas.
    pub fn covers(&self, name: &str) -> bool {
        self.rules.contains_key(name)
    }

    /// Takes one cell of rule `name` (waiting in `mode: wait`, up to `max_wait`).
    pub async fn admit(&self, name: &str) -> SharedAdmission {
        let Some(rule) = self.rules.get(name) else {
            return SharedAdmission::Go {
                waited: Duration::ZERO,
            };
        };
        rule.admit().await
    }
}

impl SharedRule {
    async fn admit(&self) -> SharedAdmission {
        let started = Instant::now();
        let deadline = started + self.max_wait;
        let mut pool = self.pool.lock().await;
        loop {
            let now = Instant::now();
            if pool.cells > 0 && pool.until.is_some_and(|u| now < u) {
                pool.cells -= 1;
                return SharedAdmission::Go {
                    waited: now - started,
                };
            }
            let (key, interval, tolerance, want) = (
                self.key.clone(),
                self.interval.as_micros() as u64,
                self.tolerance.as_micros() as u64,
                self.lease,
            );
            let answer: Result<(u64, u64), _> = self
                .backend
                .call("rate", |mut c| async move {
                    LEASE
                        .key(key)
                        .arg(interval)
                        .arg(tolerance)
                        .arg(want)
                        .invoke_async(&mut c)
                        .await
                })
                .await;
            match answer {
                Ok((granted, _)) if granted > 0 => {
                    let granted = u32::try_from(granted).unwrap_or(1).min(self.lease);
                    pool.cells = granted - 1;
                    // Cells not spent on their own schedule are dropped: no hoarding.
                    pool.until = Some(Instant::now() + self.interval.saturating_mul(granted));
                    return SharedAdmission::Go {
                        waited: Instant::now() - started,
                    };
                }
                Ok((_, wait_us)) => {
                    let wait = Duration::from_micros(wait_us.max(1)).min(Duration::from_secs(3600));
                    let at = Instant::now() + wait;
                    if self.mode == RateLimitMode::Reject || at > deadline {
                        return SharedAdmission::Reject { retry_after: wait };
                    }
                    tokio::time::sleep_until(at).await;
                }
                Err(_) => return SharedAdmission::Local,
            }
        }
    }
}
