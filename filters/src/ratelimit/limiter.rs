//! The decision the proxy asks for once per request: go now, go after a wait, or 429.
//!
//! Every rule that matches a request applies. A request consumes from its rules only when it
//! conforms to all of them at the same instant, so a request one rule turns away never drains
//! another. Requests that must wait are queued per bucket in arrival order (a global ticket), and
//! a newcomer may only pass queued waiters when the bucket has room for all of them and for it,
//! so nobody starves. A waiter sleeps until the slot GCRA gives it and is admitted *at that
//! slot*: a timer that fires a little late does not push every later slot back, which keeps the
//! delivered rate at the configured rate under sustained overload.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use http::{HeaderMap, Method};
use sidecar_config::{RateLimit, RateLimitMode};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::bucket::{BucketKey, Waiter};
use super::rule::{RuleInner, RuleState};

/// How much timer lateness a waiter is forgiven: admitted at its slot if it wakes at most this
/// late. Larger stalls (an overloaded runtime) are not made up for, so the upstream never sees
/// a catch-up burst bigger than this.
const MAX_CATCH_UP: Duration = Duration::from_millis(10);

/// Orders every waiter of every rule: smaller tickets arrived first.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// What the rate limiter needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct RateRequest<'a> {
    /// Name of the upstream the route picked.
    pub upstream: &'a str,
    /// Request method.
    pub method: &'a Method,
    /// The client's path, normalised (`Route::Upstream::normalized`: before any prefix
    /// stripping), without the query.
    pub path: &'a str,
    /// The client's address, for rules keyed by `client_ip`.
    pub client_ip: Option<IpAddr>,
    /// Request headers, for rules keyed by a header.
    pub headers: Option<&'a HeaderMap>,
}

/// The rate limiter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send it now. The rules' capacity has been consumed.
    Go {
        /// How long the request was held back (zero when it conformed at once).
        waited: Duration,
        /// Names of the rules that counted it (for the access log).
        rules: Vec<Arc<str>>,
    },
    /// Answer 429 `rate_limited`; nothing was consumed.
    Reject {
        /// The rule that refused it.
        rule: Arc<str>,
        /// When it would have conformed; send as `Retry-After` via [`super::retry_after_secs`].
        retry_after: Duration,
    },
}

/// The configured rate limits with their state. Build one per config; on reload build the next
/// with [`RateLimiter::rebuild`] so unchanged rules keep their buckets and queues.
#[derive(Default)]
pub struct RateLimiter {
    rules: Vec<Arc<RuleState>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|r| &r.name))
            .finish()
    }
}

impl RateLimiter {
    /// Fresh state for every rule (start-up).
    pub fn new(rules: &[RateLimit]) -> RateLimiter {
        RateLimiter {
            rules: rules.iter().map(|r| Arc::new(RuleState::new(r))).collect(),
        }
    }

    /// The limiter for a reloaded config: a rule whose settings are unchanged keeps its state
    /// (the same `Arc`), a new or changed one starts fresh. Requests waiting in this limiter
    /// finish under it.
    pub fn rebuild(&self, rules: &[RateLimit]) -> RateLimiter {
        RateLimiter {
            rules: rules
                .iter()
                .map(|r| {
                    self.rules
                        .iter()
                        .find(|old| old.config == *r)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(RuleState::new(r)))
                })
                .collect(),
        }
    }

    /// No rules: every request goes at once.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether rule `name` shares its state with the same rule in `other` (it survived a
    /// reload). For logs and tests.
    pub fn shares_rule_with(&self, other: &RateLimiter, name: &str) -> bool {
        let find = |l: &RateLimiter| l.rules.iter().find(|r| &*r.name == name).cloned();
        match (find(self), find(other)) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a, &b),
            _ => false,
        }
    }

    /// Buckets (keys) rule `name` holds now; `None` for an unknown rule.
    pub fn keys(&self, name: &str) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| &*r.name == name)
            .map(|r| r.bucket_count())
    }

    /// Decides `req`, waiting first when a `wait` rule says so. Call once per request, before
    /// anything is sent upstream. Dropping the future (the client went away) gives up the
    /// request's place in every queue.
    pub async fn admit(&self, req: &RateRequest<'_>) -> Admission {
        let mut rules: Vec<Arc<RuleState>> = self
            .rules
            .iter()
            .filter(|r| r.matches(req))
            .cloned()
            .collect();
        if rules.is_empty() {
            return Admission::Go {
                waited: Duration::ZERO,
                rules: Vec::new(),
            };
        }
        rules.sort_by_key(|r| r.id);
        let hits = rules
            .iter()
            .map(|r| Hit {
                key: r.key_of(req),
                queued: false,
                delayed: false,
            })
            .collect();
        let arrival = Instant::now();
        let mut pending = Pending {
            rules,
            hits,
            waiter: None,
            arrival,
            give_up: arrival,
        };
        let mut target = None;
        loop {
            match pending.step(target) {
                Step::Admit => return pending.admitted(),
                Step::Reject { rule, retry_after } => {
                    metrics::counter!("sidecar_ratelimit_rejected_total", "rule" => rule.clone())
                        .increment(1);
                    return Admission::Reject { rule, retry_after };
                }
                Step::Sleep(until) => {
                    let Some(waiter) = pending.waiter.clone() else {
                        // A plan without a ticket cannot happen; never spin if it does.
                        tokio::time::sleep_until(until).await;
                        target = None;
                        continue;
                    };
                    tokio::select! {
                        () = waiter.notify.notified() => target = None,
                        () = tokio::time::sleep_until(until) => target = Some(until),
                    }
                }
            }
        }
    }
}

/// This request's place in one matched rule.
struct Hit {
    key: BucketKey,
    /// Queued in the rule's bucket now.
    queued: bool,
    /// Was ever queued there: this rule held the request back.
    delayed: bool,
}

/// A request being decided. Dropping it takes it out of every queue it is in.
struct Pending {
    /// The matched rules, sorted by id: locks are taken in that order.
    rules: Vec<Arc<RuleState>>,
    /// Per rule in `rules`.
    hits: Vec<Hit>,
    /// Set once the request has to wait.
    waiter: Option<Arc<Waiter>>,
    arrival: Instant,
    /// After this a waiter gives up (the smallest `max_wait` of its `wait` rules).
    give_up: Instant,
}

enum Step {
    Admit,
    Reject {
        rule: Arc<str>,
        retry_after: Duration,
    },
    Sleep(Instant),
}

impl Pending {
    /// One decision under the locks of all matched rules. `target` is the slot a timer was set
    /// for, when that timer is what woke us.
    fn step(&mut self, target: Option<Instant>) -> Step {
        let now = Instant::now();
        let mut guards: Vec<MutexGuard<'_, RuleInner>> =
            self.rules.iter().map(|r| r.lock()).collect();
        let ticket = self.waiter.as_ref().map(|w| w.ticket);

        // Admit at the slot we slept for if we woke a little late, else now.
        let floor = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
        let late_slot = target.map(|t| t.max(floor)).filter(|t| *t < now);
        for at in late_slot.into_iter().chain([now]) {
            let clear = guards.iter_mut().zip(&self.hits).all(|(g, h)| {
                let RuleInner { gate, buckets } = &mut **g;
                let b = buckets.get(&h.key);
                gate.slot(b.tat, b.ahead_of(ticket), at) <= at
                    && gate.check(&mut b.tat, at, false).is_ok()
            });
            if clear {
                for (g, h) in guards.iter_mut().zip(&mut self.hits) {
                    let RuleInner { gate, buckets } = &mut **g;
                    let b = buckets.get(&h.key);
                    // Cannot fail: the dry run just passed under the same lock.
                    let _ = gate.check(&mut b.tat, at, true);
                    if h.queued {
                        if let Some(t) = ticket {
                            b.dequeue(t, false);
                        }
                        h.queued = false;
                    }
                }
                return Step::Admit;
            }
        }

        // Not now: when, and which rule is the reason.
        let mut slot = now;
        let mut worst = 0;
        let mut refusing = None;
        let mut clear_at = vec![true; self.hits.len()];
        for (i, (g, h)) in guards.iter_mut().zip(&self.hits).enumerate() {
            let RuleInner { gate, buckets } = &mut **g;
            let b = buckets.get(&h.key);
            let mut s = gate.slot(b.tat, b.ahead_of(ticket), now);
            if s <= now {
                if let Err(earliest) = gate.check(&mut b.tat, now, false) {
                    s = earliest.max(now + Duration::from_millis(1));
                }
            }
            if s > now {
                clear_at[i] = false;
                if self.rules[i].mode() == RateLimitMode::Reject && refusing.is_none() {
                    refusing = Some(i);
                }
            }
            if s > slot {
                slot = s;
                worst = i;
            }
        }
        let wait = slot - now;

        if self.waiter.is_none() {
            let max_wait = self
                .rules
                .iter()
                .filter(|r| r.mode() == RateLimitMode::Wait)
                .map(|r| r.max_wait())
                .min();
            let refused = match (refusing, max_wait) {
                (Some(i), _) => Some(i),
                (None, None) => Some(worst),
                (None, Some(m)) if wait > m => Some(worst),
                _ => None,
            };
            if let Some(i) = refused {
                return Step::Reject {
                    rule: self.rules[i].name.clone(),
                    retry_after: wait,
                };
            }
            let max_wait = max_wait.unwrap_or_default();
            // A huge `max_wait` (config allows any duration) must not overflow the clock.
            self.give_up = self
                .arrival
                .checked_add(max_wait)
                .unwrap_or(self.arrival + Duration::from_secs(100 * 365 * 24 * 3600));
            self.waiter = Some(Arc::new(Waiter {
                ticket: NEXT_TICKET.fetch_add(1, Ordering::Relaxed),
                notify: Notify::new(),
            }));
        } else if now >= self.give_up {
            let ticket = ticket.unwrap_or_default();
            for (g, h) in guards.iter_mut().zip(&mut self.hits) {
                if h.queued {
                    if let Some(b) = g.buckets.peek(&h.key) {
                        b.dequeue(ticket, true);
                    }
                    h.queued = false;
                }
            }
            return Step::Reject {
                rule: self.rules[worst].name.clone(),
                retry_after: wait,
            };
        }

        // Hold a place in every bucket that is short of room for us.
        if let Some(w) = &self.waiter {
            for ((g, h), clear) in guards.iter_mut().zip(&mut self.hits).zip(clear_at) {
                if !clear && !h.queued {
                    g.buckets.get(&h.key).enqueue(w);
                    h.queued = true;
                    h.delayed = true;
                }
            }
        }
        Step::Sleep(slot.min(self.give_up).max(now + Duration::from_micros(1)))
    }

    fn admitted(&self) -> Admission {
        let waited = Instant::now().saturating_duration_since(self.arrival);
        for (r, h) in self.rules.iter().zip(&self.hits) {
            let rule = r.name.clone();
            if h.delayed {
                metrics::counter!("sidecar_ratelimit_delayed_total", "rule" => rule.clone())
                    .increment(1);
            }
            metrics::histogram!("sidecar_ratelimit_wait_seconds", "rule" => rule)
                .record(waited.as_secs_f64());
        }
        Admission::Go {
            waited,
            rules: self.rules.iter().map(|r| r.name.clone()).collect(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(w) = &self.waiter else { return };
        for (r, h) in self.rules.iter().zip(&self.hits).filter(|(_, h)| h.queued) {
            if let Some(b) = r.lock().buckets.peek(&h.key) {
                b.dequeue(w.ticket, true);
            }
        }
    }
}
