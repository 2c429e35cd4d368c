//! [`TokenSource`]: one provider's current token, its state machine, the single-flight refresh
//! and the background refresher.
//!
//! This file is the API requests and the admin endpoints use. Underneath, one concept a file and
//! no file calling back into one above it: `state` and `error` hold the values it reports,
//! `inner` the state every clone shares, `persist` the encrypted store, `flight` the
//! single-flight refresh, and `refresher` the background task built on this API.

mod error;
mod flight;
mod inner;
mod persist;
mod refresher;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use sidecar_config::Provider as ProviderConfig;
use tokio::sync::watch;
use tokio::time::Instant;

pub use error::{RefreshError, Unavailable};
pub use state::{State, Status, Trigger};

use crate::provider::{build_provider, Provider};
use crate::schedule::Schedule;
use crate::shared::{SharedBackend, SharedTokens};
use crate::store::Store;
use crate::token::Token;
use inner::{lock, Book, Inner};

/// One provider's tokens. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl TokenSource {
    /// A source for a configured provider. Identity-provider calls run on `handle`. Fails when
    /// the provider cannot be built (its HTTP client with the configured TLS).
    pub fn new(
        config: &ProviderConfig,
        handle: tokio::runtime::Handle,
    ) -> Result<TokenSource, crate::ProviderError> {
        let provider = build_provider(&config.kind, &config.tls_config)?;
        Ok(TokenSource::with_provider(config, provider, handle))
    }

    /// A source with a provider built elsewhere (tests, embedders). The config's `store`, if
    /// any, is used; it is first read by the first refresh, not here.
    pub fn with_provider(
        config: &ProviderConfig,
        provider: Box<dyn Provider>,
        handle: tokio::runtime::Handle,
    ) -> TokenSource {
        let store = config
            .store
            .as_ref()
            .map(|s| Arc::new(Store::new(&s.path, s.key.expose(), &config.name)));
        TokenSource::with_store(config, provider, store, handle)
    }

    /// Like [`TokenSource::with_provider`] with a store built elsewhere (tests use a cheap KDF).
    pub fn with_store(
        config: &ProviderConfig,
        provider: Box<dyn Provider>,
        store: Option<Arc<Store>>,
        handle: tokio::runtime::Handle,
    ) -> TokenSource {
        let (changed, _) = watch::channel(0);
        let source = TokenSource {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                provider,
                schedule: Schedule::new(config.refresh.clone()),
                default_ttl: config.default_ttl,
                current: ArcSwapOption::empty(),
                rejected: AtomicU64::new(0),
                book: Mutex::new(Book::default()),
                changed,
                handle,
                refresher: Mutex::new(None),
                store,
                shared: std::sync::OnceLock::new(),
                escalate_after: config.refresh.escalate_after.max(1),
                #[cfg(test)]
                kill_after_store: Mutex::new(None),
            }),
        };
        source.inner.publish_metrics();
        source
    }

    /// Shares this provider's tokens with the other replicas through `backend` (before
    /// [`TokenSource::start`]): one identity-provider call per rotation across all of them.
    /// A replica whose refresh finds another one refreshing waits up to `wait` for its token.
    pub fn share_through(&self, backend: &SharedBackend, config: &ProviderConfig, wait: Duration) {
        // With a store key the record is always sealed; plain text only when the config says so
        // (validation refuses a shared provider with neither).
        let key = config.store.as_ref().map(|s| s.key.expose());
        if key.is_none() && !backend.config().plaintext_tokens {
            tracing::error!(provider = %self.inner.name, "no store key to seal the shared token with; this provider is not shared");
            return;
        }
        let shared = SharedTokens::new(backend.clone(), &self.inner.name, key, wait);
        let _ = self.inner.shared.set(Arc::new(shared));
    }

    /// Whether both handles share one source (a reload kept it).
    pub fn same_as(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current token if requests may still use it. One atomic load: the request fast path.
    pub fn usable(&self) -> Option<Arc<Token>> {
        self.inner.usable()
    }

    /// An upstream refused this token and the refresh that replaces it is in flight: a request
    /// holding it had better join that refresh ([`TokenSource::refresh`] with
    /// `Trigger::Unauthorized` and its generation) than be sent to be refused too.
    pub fn is_rejected(&self, token: &Token) -> bool {
        token.generation <= self.inner.rejected.load(Ordering::Relaxed)
    }

    /// The current token, usable or not.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }

    /// Obtains a new token, joining a refresh already in flight. With `stale = Some(g)` (a
    /// request whose token of generation `g` was rejected) no refresh starts when a newer token
    /// than `g` is already held: that one is returned.
    pub async fn refresh(
        &self,
        trigger: Trigger,
        stale: Option<u64>,
    ) -> Result<Arc<Token>, RefreshError> {
        flight::refresh(&self.inner, trigger, stale).await
    }

    /// A usable token, waiting up to `timeout` for one. Starts a refresh when none is in flight
    /// and the failure backoff allows; otherwise waits for the refresher.
    pub async fn wait_usable(&self, timeout: Duration) -> Result<Arc<Token>, Unavailable> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.inner.changed.subscribe();
        loop {
            if let Some(t) = self.usable() {
                return Ok(t);
            }
            let (may_start, retry_at) = {
                let book = lock(&self.inner.book);
                let now = Instant::now();
                let open = book.retry_at.is_none_or(|r| now >= r);
                (book.inflight.is_some() || open, book.retry_at)
            };
            if may_start {
                let trigger = if self.current().is_none() {
                    Trigger::Initial
                } else {
                    Trigger::Expired
                };
                match tokio::time::timeout_at(deadline, self.refresh(trigger, None)).await {
                    Ok(Ok(token)) => return Ok(token),
                    Ok(Err(_)) => {}
                    Err(_) => return Err(self.unavailable(timeout)),
                }
            } else {
                let until = retry_at.map_or(deadline, |r| r.min(deadline));
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(self.unavailable(timeout));
            }
        }
    }

    /// A token with at least `min_ttl` left, refreshing once if the current one has less.
    pub async fn ensure(
        &self,
        min_ttl: Duration,
        timeout: Duration,
    ) -> Result<Arc<Token>, Unavailable> {
        let enough =
            |t: &Arc<Token>| t.expires_at.saturating_duration_since(Instant::now()) >= min_ttl;
        if let Some(t) = self.usable().filter(enough) {
            return Ok(t);
        }
        // Long operations must not turn into a refresh per request: while the failure backoff
        // runs, or the too-short token is younger than `min_interval`, another identity-provider
        // call would only repeat its last answer.
        if let Some(why) = self.ensure_held_back(min_ttl) {
            return Err(Unavailable {
                provider: self.inner.name.clone(),
                waited: Duration::ZERO,
                last_error: Some(why),
            });
        }
        let stale = self.current().map(|t| t.generation);
        match tokio::time::timeout(timeout, self.refresh(Trigger::Ensure, stale)).await {
            Ok(Ok(t)) if enough(&t) => Ok(t),
            Ok(Ok(_)) => Err(Unavailable {
                provider: self.inner.name.clone(),
                waited: timeout,
                last_error: Some(format!(
                    "the identity provider issues tokens shorter than {}",
                    humantime::format_duration(min_ttl)
                )),
            }),
            _ => Err(self.unavailable(timeout)),
        }
    }

    /// Why `ensure` may not call the identity provider now; `None` when it may (or a refresh
    /// is already in flight, which it joins at no cost).
    fn ensure_held_back(&self, min_ttl: Duration) -> Option<String> {
        let book = lock(&self.inner.book);
        if book.inflight.is_some() {
            return None;
        }
        let now = Instant::now();
        if book.retry_at.is_some_and(|r| now < r) {
            return Some(
                book.last_error
                    .clone()
                    .unwrap_or_else(|| "the last refresh failed".into()),
            );
        }
        // The backoff is over: only min_interval since the last call can hold it back.
        self.current()?;
        flight::gate(&self.inner, &book).map(|_| {
            format!(
                "the identity provider issues tokens shorter than {}",
                humantime::format_duration(min_ttl)
            )
        })
    }

    /// How long until the identity provider is called again after a failure (at least 1 s): the
    /// `Retry-After` of a `token_unavailable` answer.
    pub fn retry_in(&self) -> Duration {
        let book = lock(&self.inner.book);
        book.retry_at
            .map_or(Duration::ZERO, |r| {
                r.saturating_duration_since(Instant::now())
            })
            .max(Duration::from_secs(1))
    }

    /// Why no usable token is held: the provider, the wait, the last refresh error.
    pub fn unavailable(&self, waited: Duration) -> Unavailable {
        Unavailable {
            provider: self.inner.name.clone(),
            waited,
            last_error: lock(&self.inner.book).last_error.clone(),
        }
    }

    /// Sets `sidecar_token_state`, `sidecar_token_ttl_seconds` and
    /// `sidecar_token_expiry_timestamp_seconds` to what holds now. `/metrics` calls it before
    /// rendering: refreshes alone would leave the TTL at its value of the last refresh.
    pub fn publish_metrics(&self) {
        self.inner.publish_metrics();
    }

    /// The state machine's current state.
    pub fn state(&self) -> State {
        self.inner.state()
    }

    /// What `/v1/token/status` shows.
    pub fn status(&self) -> Status {
        let book = lock(&self.inner.book);
        let token = self.current();
        let now = Instant::now();
        Status {
            provider: self.inner.name.clone(),
            state: self.inner.state_locked(&book),
            generation: token.as_ref().map_or(0, |t| t.generation),
            expires_at: token.as_ref().map(|t| rfc3339(t.expires_at_wall)),
            ttl_seconds: token.as_ref().map(|t| {
                if t.expires_at >= now {
                    t.expires_at.duration_since(now).as_secs_f64()
                } else {
                    -now.duration_since(t.expires_at).as_secs_f64()
                }
            }),
            last_refresh_at: book.last_refresh_at.map(rfc3339),
            last_error: book.last_error.clone(),
            refresh_ok: book.ok,
            refresh_failed: book.failed,
            consecutive_failures: book.consecutive_failures,
            fingerprint: token.as_ref().map(|t| t.fingerprint.clone()),
            shared: self.inner.shared.get().map(|s| s.backend().state()),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests;
