//! One configured rule, compiled: which requests it counts, how it keys them, and its buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use globset::GlobMatcher;
use sidecar_config::{RateKey, RateLimit, RateLimitMode};

use super::bucket::{BucketKey, Buckets};
use super::gate::Gate;
use super::limiter::RateRequest;

/// Gives every rule state a distinct id; locks are always taken in id order.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A rule with its state. Shared by `Arc` between limiter generations while its config is
/// unchanged, so a reload does not reset it.
pub(crate) struct RuleState {
    pub(crate) id: u64,
    pub(crate) config: RateLimit,
    pub(crate) name: Arc<str>,
    path: Option<GlobMatcher>,
    inner: Mutex<RuleInner>,
}

/// What the rule's lock guards.
pub(crate) struct RuleInner {
    pub(crate) gate: Gate,
    pub(crate) buckets: Buckets,
}

impl RuleState {
    pub(crate) fn new(config: &RateLimit) -> RuleState {
        RuleState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: Arc::from(config.name.as_str()),
            path: config.path.as_ref().map(|g| g.compile_matcher()),
            inner: Mutex::new(RuleInner {
                gate: Gate::new(config.rate.count, config.rate.per, config.burst),
                buckets: Buckets::new(if config.key.is_some() {
                    config.max_keys
                } else {
                    1
                }),
            }),
            config: config.clone(),
        }
    }

    /// Does this rule count `req`?
    pub(crate) fn matches(&self, req: &RateRequest<'_>) -> bool {
        self.config.upstream == req.upstream
            && (self.config.methods.is_empty() || self.config.methods.contains(req.method))
            && self.path.as_ref().is_none_or(|m| m.is_match(req.path))
    }

    /// The bucket `req` counts against.
    pub(crate) fn key_of(&self, req: &RateRequest<'_>) -> BucketKey {
        match &self.config.key {
            None => BucketKey::All,
            Some(RateKey::ClientIp) => req.client_ip.map_or(BucketKey::Missing, BucketKey::Ip),
            Some(RateKey::Header(name)) => req
                .headers
                .and_then(|h| h.get(name))
                .map_or(BucketKey::Missing, |v| {
                    BucketKey::Value(v.as_bytes().into())
                }),
        }
    }

    pub(crate) fn mode(&self) -> RateLimitMode {
        self.config.mode
    }

    pub(crate) fn max_wait(&self) -> Duration {
        self.config.max_wait
    }

    /// The rule's lock. A panic while it was held cannot leave the GCRA state half-written (each
    /// update is one assignment), so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, RuleInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buckets held now (for tests and the admin view).
    pub(crate) fn bucket_count(&self) -> usize {
        self.lock().buckets.len()
    }
}
