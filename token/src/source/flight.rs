//! The single-flight refresh: every concurrent request for a new token joins one flight, which
//! waits out `min_interval` and the failure backoff (the gate), calls the identity provider once
//! in a task of its own, and lands (settles) as the new token or a counted, logged failure.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::FutureExt;
use sidecar_config::MAX_DURATION;
use tokio::time::Instant;
use tracing::Instrument;

use super::error::RefreshError;
use super::inner::{lock, Book, Inner};
use super::persist::{persist, record_of, restore, usable_token};
use super::state::Trigger;
use crate::provider::{Fetched, Held, ProviderError};
use crate::shared::{Commit, Outcome};
use crate::store::Record;
use crate::token::{jwt_exp_claim, JwtExp, Token};

/// Obtains a new token, joining a refresh already in flight. With `stale = Some(g)` (a
/// request whose token of generation `g` was rejected) no refresh starts when a newer token
/// than `g` is already held: that one is returned.
pub(super) async fn refresh(
    shared: &Arc<Inner>,
    trigger: Trigger,
    stale: Option<u64>,
) -> Result<Arc<Token>, RefreshError> {
    let flight = {
        let mut book = lock(&shared.book);
        if let (Some(g), Some(cur)) = (stale, shared.current.load_full()) {
            if cur.generation > g {
                return Ok(cur);
            }
            if trigger == Trigger::Unauthorized {
                // Until the refresh ends, requests holding this token join it.
                shared.rejected.fetch_max(g, Ordering::Relaxed);
            }
        }
        match &book.inflight {
            Some(f) => f.clone(),
            None => {
                let gate = gate(shared, &book).filter(|_| !shared.provider.local());
                let inner = shared.clone();
                let task = shared.handle.spawn(async move {
                    if let Some(at) = gate {
                        tokio::time::sleep_until(at).await;
                    }
                    let run = AssertUnwindSafe(run_refresh(inner.clone(), trigger));
                    match run.catch_unwind().await {
                        Ok(result) => result,
                        // A bug must not leave the provider with a flight that never
                        // lands: it counts as a failed refresh and backs off.
                        Err(_) => settle(
                            &inner,
                            trigger,
                            Err(ProviderError::Internal("the refresh panicked".into())),
                            None,
                            Duration::ZERO,
                        ),
                    }
                });
                let inner = shared.clone();
                let f = async move {
                    task.await.unwrap_or_else(|_| {
                        // Cancelled with its runtime: nobody else will land this flight.
                        let error = ProviderError::Internal("refresh task stopped".into());
                        settle(&inner, trigger, Err(error), None, Duration::ZERO)
                    })
                }
                .boxed()
                .shared();
                book.inflight = Some(f.clone());
                f
            }
        }
    };
    shared.publish_metrics();
    flight.await
}

/// When the next identity-provider call may start, if not now: never sooner than
/// `min_interval` after the last one, nor inside the failure backoff, whatever asks for it
/// (proactive, a rejected token, `ensure`, a manual refresh).
pub(super) fn gate(inner: &Inner, book: &Book) -> Option<Instant> {
    let spacing = inner
        .current
        .load_full()
        .map_or(inner.schedule.min_interval(Duration::MAX), |t| {
            inner.schedule.min_interval(t.lifetime())
        });
    let after_last = book.last_attempt_at.map(|last| last + spacing);
    after_last
        .max(book.retry_at)
        .filter(|at| *at > Instant::now())
}

/// The lifetime of a fetched token: `expires_in`, else the JWT `exp`, else `default_ttl`. A
/// token that is born expired, or whose expiry lies past [`MAX_DURATION`], is unusable.
pub(super) fn ttl_of(fetched: &Fetched, default_ttl: Duration) -> Result<Duration, ProviderError> {
    let ttl = match fetched.expires_in {
        Some(d) => d,
        None => match jwt_exp_claim(&fetched.access_token) {
            JwtExp::At(exp) => Duration::from_secs(exp)
                .checked_sub(unix_now())
                .unwrap_or(Duration::ZERO),
            JwtExp::TooFar => {
                return Err(ProviderError::Malformed(
                    "the token's JWT exp is more than 100 years away".into(),
                ))
            }
            JwtExp::Absent => default_ttl,
        },
    };
    if ttl > MAX_DURATION {
        return Err(ProviderError::Malformed(
            "the token's expiry is more than 100 years away".into(),
        ));
    }
    if ttl.is_zero() {
        return Err(ProviderError::Malformed(
            "the identity provider issued a token that has already expired".into(),
        ));
    }
    Ok(ttl)
}

pub(super) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// One refresh, run as its own task so that callers that give up do not cancel it.
async fn run_refresh(inner: Arc<Inner>, trigger: Trigger) -> Result<Arc<Token>, RefreshError> {
    if let Some(token) = restore(&inner).await {
        if matches!(trigger, Trigger::Initial | Trigger::Expired) {
            lock(&inner.book).inflight = None;
            finish(&inner);
            return Ok(token);
        }
    }
    // Shared with other replicas: one of them calls the identity provider, the others adopt
    // its token.
    let mut lease = None;
    if let Some(shared) = inner.shared.get().cloned() {
        let local = lock(&inner.book).generation;
        match shared.coordinate(local).await {
            Outcome::Adopt(record) => return adopt(&inner, trigger, record).await,
            Outcome::Refuse(why) => {
                return settle(
                    &inner,
                    trigger,
                    Err(ProviderError::Shared(why)),
                    None,
                    Duration::ZERO,
                )
            }
            Outcome::Call {
                lease: held_lease,
                record,
                floor,
            } => {
                let mut book = lock(&inner.book);
                // The generation only moves forward, past whatever Redis holds.
                book.generation = book.generation.max(floor);
                if let Some(rt) = record.and_then(|r| r.refresh_token) {
                    book.refresh_token = Some(rt);
                }
                lease = held_lease;
            }
        }
    }
    let started = Instant::now();
    let held = {
        let mut book = lock(&inner.book);
        book.last_attempt_at = Some(started);
        book.calling = true;
        Held {
            access_token: inner
                .current
                .load_full()
                .filter(|t| Instant::now() < t.expires_at)
                .map(|t| t.expose().to_string()),
            refresh_token: book.refresh_token.clone(),
        }
    };
    // Providers log (a refused refresh token, stderr of a command) inside this span.
    let span = tracing::info_span!("token_fetch", provider = %inner.name);
    let result = inner.provider.fetch(&held).instrument(span).await;
    drop(held);
    let elapsed = started.elapsed();
    // Build the token first; it is published only after the store has it.
    let mut orphan_refresh_token = None;
    let built = result.and_then(|fetched| {
        let ttl = match ttl_of(&fetched, inner.default_ttl) {
            Ok(ttl) => ttl,
            Err(e) => {
                // The grant may have rotated the refresh token: keep the new one all the same.
                orphan_refresh_token = fetched.refresh_token;
                return Err(e);
            }
        };
        let generation = lock(&inner.book).generation + 1;
        let mut token = Token::new(fetched.access_token, generation, ttl);
        token.usable_until = inner
            .schedule
            .usable_until(token.issued_at, token.expires_at);
        if token.is_header_safe() {
            Ok((Arc::new(token), fetched.refresh_token))
        } else {
            // The grant may have rotated the refresh token: keep the new one all the same.
            orphan_refresh_token = fetched.refresh_token;
            Err(ProviderError::Malformed(
                "token contains characters not allowed in a header".into(),
            ))
        }
    });
    if let (Some(rt), Some(current)) = (&orphan_refresh_token, inner.current.load_full()) {
        persist(&inner, &current, Some(rt.clone())).await;
    }
    if let Some(lease) = lease {
        match &built {
            // Shared before it is used: the others adopt it instead of spending the refresh
            // token again.
            Ok((token, refresh_token)) => {
                match lease.commit(&record_of(token, refresh_token.clone())).await {
                    Commit::Done => {}
                    Commit::Conflict(found) => {
                        tracing::warn!(provider = %inner.name, found, "another replica committed a token while this refresh ran (its lease ran out); keeping this one locally")
                    }
                    Commit::Failed(e) => {
                        tracing::warn!(provider = %inner.name, error = %e, "cannot share the new token; keeping it locally")
                    }
                }
            }
            Err(_) => lease.release().await,
        }
    }
    if let Ok((token, refresh_token)) = &built {
        persist(&inner, token, refresh_token.clone()).await;
        #[cfg(test)]
        {
            let killed = lock(&inner.kill_after_store).take();
            if let Some(killed) = killed {
                let _ = killed.send(());
                return std::future::pending().await;
            }
        }
    }
    settle(&inner, trigger, built, orphan_refresh_token, elapsed)
}

/// Takes the token another replica obtained and shared: no identity-provider call. Stored
/// locally (if a store is set) before it is used, like a token of our own.
async fn adopt(
    inner: &Arc<Inner>,
    trigger: Trigger,
    record: Record,
) -> Result<Arc<Token>, RefreshError> {
    let Some(token) = usable_token(inner, &record, SystemTime::now()) else {
        let error = ProviderError::Shared("the token another replica shared is unusable".into());
        return settle(inner, trigger, Err(error), None, Duration::ZERO);
    };
    let token = Arc::new(token);
    persist(inner, &token, record.refresh_token.clone()).await;
    tracing::info!(provider = %inner.name, generation = token.generation, fingerprint = %token.fingerprint, "token adopted from another replica");
    settle(
        inner,
        trigger,
        Ok((token, record.refresh_token.clone())),
        None,
        Duration::ZERO,
    )
}

/// Lands a refresh attempt: publishes the token or records the failure and its backoff, counts
/// and logs it, and wakes everyone waiting. Every flight ends here, a panicked one included.
fn settle(
    inner: &Arc<Inner>,
    trigger: Trigger,
    built: Result<(Arc<Token>, Option<String>), ProviderError>,
    orphan_refresh_token: Option<String>,
    elapsed: Duration,
) -> Result<Arc<Token>, RefreshError> {
    let outcome = {
        let mut book = lock(&inner.book);
        book.inflight = None;
        book.calling = false;
        match built {
            Ok((token, refresh_token)) => {
                book.generation = token.generation;
                book.refresh_token = refresh_token;
                inner.current.store(Some(token.clone()));
                book.ok += 1;
                book.consecutive_failures = 0;
                book.retry_at = None;
                book.last_error = None;
                book.last_refresh_at = Some(SystemTime::now());
                Ok(token)
            }
            Err(error) => {
                // Nothing newer came: the refused token is the best there is again (another
                // upstream may still take it; the next refusal starts another refresh).
                inner.rejected.store(0, Ordering::Relaxed);
                if error.is_invalid_grant() {
                    // A refused refresh token never works again; the next attempt logs in.
                    book.refresh_token = None;
                }
                if let Some(rt) = orphan_refresh_token {
                    book.refresh_token = Some(rt);
                }
                book.failed += 1;
                book.consecutive_failures += 1;
                let spread = rand::random::<f64>() * 2.0 - 1.0;
                let wait = inner.schedule.backoff(book.consecutive_failures, spread);
                book.retry_at = Some(Instant::now() + wait);
                book.last_error = Some(error.to_string());
                Err((error, book.consecutive_failures, wait))
            }
        }
    };
    let provider = inner.name.clone();
    let result_label = if outcome.is_ok() {
        "success"
    } else {
        "failure"
    };
    metrics::counter!("sidecar_token_refresh_total", "provider" => provider.clone(), "trigger" => trigger.as_str(), "result" => result_label).increment(1);
    metrics::histogram!("sidecar_token_refresh_duration_seconds", "provider" => provider.clone())
        .record(elapsed.as_secs_f64());
    let result = match outcome {
        Ok(token) => {
            tracing::info!(
                provider = %provider,
                trigger = trigger.as_str(),
                generation = token.generation,
                fingerprint = %token.fingerprint,
                ttl_s = token.lifetime().as_secs(),
                took_ms = elapsed.as_millis() as u64,
                "token refreshed"
            );
            Ok(token)
        }
        Err((error, failures, wait)) => {
            let retry_in =
                humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                    .to_string();
            if failures >= inner.escalate_after {
                tracing::error!(provider = %provider, trigger = trigger.as_str(), failures, retry_in = %retry_in, error = %error, "token refresh keeps failing");
            } else {
                tracing::warn!(provider = %provider, trigger = trigger.as_str(), failures, retry_in = %retry_in, error = %error, "token refresh failed");
            }
            Err(RefreshError { provider, error })
        }
    };
    finish(inner);
    result
}

/// After every refresh attempt: state gauge, TTL gauge, and a wake-up for waiters and the
/// refresher.
fn finish(inner: &Arc<Inner>) {
    inner.publish_metrics();
    inner.changed.send_modify(|n| *n += 1);
}
