//! Rate limits held across replicas: GCRA state in Redis, advanced by a Lua script on the
//! server's clock (`TIME`), so every replica's requests draw from one budget. A replica leases
//! a few cells at a time (at most 50 ms worth of the rate) so Redis is not called for every
//! request; a leased cell not spent within 50 ms of its lease is dropped, so no replica can
//! hoard capacity and release it later as a burst: the combined rate the upstream sees stays
//! within the rule.
//!
//! A dropped cell is still spent from the shared budget, so a lease is sized to the replica's
//! own traffic ([`next_lease`]): what it spent of its last lease, scaled to 50 ms, at least one
//! cell and at most 50 ms worth of the rule. A replica with a trickle of requests then takes a cell or two at a time, and replicas sharing
//! a rule below its rate are all admitted. When Redis says no cell is free before some instant,
//! the replica remembers it and answers until then without asking again.
//!
//! While Redis is down, each replica applies its share of the rule instead: the rate and the
//! burst divided by the number of replicas it last saw in Redis, so the replicas together still
//! stay within the rule.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
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
    /// The rule as written: `count` per `per`, `burst`.
    count: u32,
    per: Duration,
    burst: u32,
    /// The theoretical arrival time of this replica's share while Redis is down.
    fallback: Mutex<Option<Instant>>,
}

/// This replica's share of a shared rule while Redis is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Share {
    /// One cell every `interval`.
    pub(crate) interval: Duration,
    /// Cells that may go at once.
    pub(crate) burst: u32,
}

/// The share of a rule of `count` per `per` with `burst`, for one of `replicas` replicas (the
/// number last seen in Redis; 0, never seen, counts as 1): the rate divided by the replicas and
/// the burst too, rounded down but at least 1, so the replicas together never exceed the rule
/// (beyond a burst of one each when the burst is smaller than the number of replicas).
pub(crate) fn share(count: u32, per: Duration, burst: u32, replicas: u32) -> Share {
    let replicas = replicas.max(1);
    let interval = per.saturating_mul(replicas) / count.max(1);
    Share {
        interval: interval.max(Duration::from_micros(1)),
        burst: (burst / replicas).max(1),
    }
}

#[derive(Default)]
struct Pool {
    /// Leased cells left, spendable until `until`.
    cells: u32,
    until: Option<Instant>,
    /// The last lease: when it was granted and how many cells.
    leased_at: Option<Instant>,
    granted: u32,
    /// Redis said no cell is free before this instant.
    closed_until: Option<Instant>,
}

/// The size of the next lease: the rate at which the replica spent its last lease (`spent`
/// cells in `elapsed`) over [`LEASE_SPAN`], at least 1 and at most `max`. A cell leased and not
/// spent was taken from the shared budget for nothing: the lease follows this replica's own
/// traffic, not the rule's rate.
fn next_lease(spent: u32, elapsed: Duration, max: u32) -> u32 {
    let elapsed = elapsed.as_micros().max(1000);
    let want = (u128::from(spent) * LEASE_SPAN.as_micros()).div_ceil(elapsed);
    want.clamp(1, u128::from(max.max(1))) as u32
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
                    count: r.rate.count,
                    per: r.rate.per,
                    burst: r.burst,
                    fallback: Mutex::new(None),
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
            let live = pool.until.is_some_and(|u| now < u);
            if pool.cells > 0 && live {
                pool.cells -= 1;
                return SharedAdmission::Go {
                    waited: now - started,
                };
            }
            if let Some(at) = pool.closed_until.filter(|at| now < *at) {
                // No cell before `at`, as Redis said: other replicas can only make it later.
                if self.mode == RateLimitMode::Reject || at > deadline {
                    return SharedAdmission::Reject {
                        retry_after: at - now,
                    };
                }
                tokio::time::sleep_until(at).await;
                continue;
            }
            let want = match pool.leased_at {
                Some(at) => next_lease(
                    pool.granted.saturating_sub(pool.cells),
                    now - at,
                    self.lease,
                ),
                None => 1,
            };
            let (key, interval, tolerance) = (
                self.key.clone(),
                self.interval.as_micros() as u64,
                self.tolerance.as_micros() as u64,
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
                    let granted = u32::try_from(granted).unwrap_or(1).min(want);
                    let now = Instant::now();
                    pool.cells = granted - 1;
                    pool.granted = granted;
                    pool.leased_at = Some(now);
                    pool.closed_until = None;
                    // Cells not spent within the lease's span are dropped: no hoarding.
                    pool.until = Some(now + LEASE_SPAN);
                    return SharedAdmission::Go {
                        waited: Instant::now() - started,
                    };
                }
                Ok((_, wait_us)) => {
                    let wait = Duration::from_micros(wait_us.max(1)).min(Duration::from_secs(3600));
                    pool.cells = 0;
                    pool.granted = 0;
                    pool.closed_until = Some(Instant::now() + wait);
                }
                Err(_) => {
                    drop(pool);
                    return self.alone(started, deadline).await;
                }
            }
        }
    }

    /// Redis is down: this replica's share of the rule, from the replicas it last saw.
    async fn alone(&self, started: Instant, deadline: Instant) -> SharedAdmission {
        let share = share(
            self.count,
            self.per,
            self.burst,
            self.backend.replicas_seen(),
        );
        let tolerance = share.interval.saturating_mul(share.burst - 1);
        loop {
            let now = Instant::now();
            let wait = {
                let mut tat = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
                let at = tat.filter(|t| *t > now).unwrap_or(now);
                if at <= now + tolerance {
                    *tat = Some(at + share.interval);
                    return SharedAdmission::Go {
                        waited: now - started,
                    };
                }
                at - tolerance - now
            };
            if self.mode == RateLimitMode::Reject || now + wait > deadline {
                return SharedAdmission::Reject { retry_after: wait };
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_of_each_replica() {
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        // count, per, burst, replicas seen, expected interval, expected burst, why.
        #[rustfmt::skip]
        let table: &[(u32, Duration, u32, u32, Duration, u32, &str)] = &[
            (50, s, 5, 0, ms(20), 5, "never saw Redis: the whole rule"),
            (50, s, 5, 1, ms(20), 5, "alone: the whole rule"),
            (50, s, 5, 2, ms(40), 2, "two replicas: half the rate, burst rounded down"),
            (50, s, 6, 3, ms(60), 2, "three replicas: a third"),
            (50, s, 1, 3, ms(60), 1, "burst never below 1"),
            (10, s, 20, 10, s, 2, "ten replicas of 10/s: 1/s each"),
            (1, Duration::from_secs(60), 1, 4, Duration::from_secs(240), 1, "slow rule"),
            (0, s, 0, 2, Duration::from_secs(2), 1, "degenerate rule: no division by zero"),
            (1_000_000, Duration::from_micros(1), 1, 1, Duration::from_micros(1), 1, "interval at least 1 µs"),
        ];
        for (count, per, burst, replicas, interval, want_burst, why) in table {
            assert_eq!(
                share(*count, *per, *burst, *replicas),
                Share {
                    interval: *interval,
                    burst: *want_burst
                },
                "{why}"
            );
        }
    }

    #[test]
    fn lease_sizes_follow_the_replicas_own_traffic() {
        let ms = Duration::from_millis;
        // spent of the last lease, over how long, max, expected, why.
        #[rustfmt::skip]
        let table: &[(u32, Duration, u32, u32, &str)] = &[
            (0, ms(50), 15, 1, "nothing spent (a refusal, cells expired): one"),
            (1, ms(100), 15, 1, "a request every 100 ms: one cell"),
            (1, ms(13), 15, 4, "a request every 13 ms: four per 50 ms"),
            (4, ms(50), 15, 4, "spent in step with the span: kept"),
            (10, ms(5), 15, 15, "a burst: at most 50 ms of the rule"),
            (3, Duration::ZERO, 15, 15, "no time at all counts as 1 ms"),
            (1, Duration::from_secs(3600), 15, 1, "idle for an hour: one"),
            (u32::MAX, ms(1), 15, 15, "no overflow"),
            (5, ms(10), 0, 1, "a degenerate maximum still leases one"),
        ];
        for (spent, elapsed, max, want, why) in table {
            assert_eq!(next_lease(*spent, *elapsed, *max), *want, "{why}");
        }
    }

    #[test]
    fn replicas_together_stay_within_the_rule() {
        // N shares over any window allow at most the rule's rate (plus each share's burst).
        for n in 1..=16u32 {
            let s = share(50, Duration::from_secs(1), 10, n);
            let per_replica = 1.0 / s.interval.as_secs_f64();
            assert!(
                per_replica * f64::from(n) <= 50.0 + 1e-9,
                "{n}: {per_replica}"
            );
            assert!(s.burst * n <= 10 || s.burst == 1, "{n}: burst {}", s.burst);
        }
    }
}
