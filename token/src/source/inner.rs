//! What every clone of a `TokenSource` shares: the current token, the bookkeeping of refreshes
//! behind a short mutex, and the state machine read from both.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, Shared};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::error::RefreshError;
use super::state::State;
use crate::provider::Provider;
use crate::schedule::Schedule;
use crate::shared::SharedTokens;
use crate::store::Store;
use crate::token::Token;

pub(super) type RefreshFuture = Shared<BoxFuture<'static, Result<Arc<Token>, RefreshError>>>;

/// Bookkeeping behind a short std mutex; never held across an await.
#[derive(Default)]
pub(super) struct Book {
    pub(super) inflight: Option<RefreshFuture>,
    /// The in-flight refresh has passed its gate and is talking to the identity provider.
    pub(super) calling: bool,
    pub(super) generation: u64,
    pub(super) last_refresh_at: Option<SystemTime>,
    pub(super) last_attempt_at: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) ok: u64,
    pub(super) failed: u64,
    pub(super) consecutive_failures: u32,
    pub(super) retry_at: Option<Instant>,
    /// The refresh token to use next (from the last answer or the store).
    pub(super) refresh_token: Option<String>,
    /// The store was read (once, by the first refresh).
    pub(super) store_read: bool,
}

pub(super) struct Inner {
    pub(super) name: String,
    pub(super) provider: Box<dyn Provider>,
    pub(super) schedule: Schedule,
    pub(super) default_ttl: Duration,
    pub(super) current: ArcSwapOption<Token>,
    /// The newest generation an upstream rejected while its replacement is being fetched (0:
    /// none). Such a token is not handed out: a request would only be sent to be refused.
    pub(super) rejected: AtomicU64,
    pub(super) book: Mutex<Book>,
    /// Bumped after every finished refresh attempt, to wake waiters and the refresher.
    pub(super) changed: watch::Sender<u64>,
    /// Where identity-provider calls run, whatever runtime asked for them.
    pub(super) handle: tokio::runtime::Handle,
    pub(super) refresher: Mutex<Option<AbortHandle>>,
    /// Encrypted persistence, if configured.
    pub(super) store: Option<Arc<Store>>,
    /// The replicas' shared state, for a provider shared through Redis (set once, before the
    /// first refresh).
    pub(super) shared: std::sync::OnceLock<Arc<SharedTokens>>,
    /// Failures in a row after which they are logged at error level.
    pub(super) escalate_after: u32,
    /// Test hook: a refresh stops for good right after the store write, as if the process were
    /// killed between persisting the new refresh token and publishing the new access token.
    #[cfg(test)]
    pub(super) kill_after_store: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Inner {
    /// The current token if requests may still use it. One atomic load: the request fast path.
    pub(super) fn usable(&self) -> Option<Arc<Token>> {
        let token = self.current.load_full()?;
        (Instant::now() < token.usable_until).then_some(token)
    }

    /// The state machine's current state.
    pub(super) fn state(&self) -> State {
        let book = lock(&self.book);
        self.state_locked(&book)
    }

    pub(super) fn state_locked(&self, book: &Book) -> State {
        let usable = self.usable().is_some();
        match (
            book.inflight.is_some(),
            usable,
            book.consecutive_failures > 0,
        ) {
            (true, _, _) if book.calling => State::Refreshing,
            (true, true, false) => State::Valid,
            (true, true, true) => State::Error,
            (true, false, _) if book.generation == 0 && book.failed == 0 => State::Initial,
            (true, false, _) => State::Expired,
            (false, true, false) => State::Valid,
            (false, true, true) => State::Error,
            (false, false, _) if book.generation == 0 && book.failed == 0 => State::Initial,
            (false, false, _) => State::Expired,
        }
    }

    /// Sets the provider's gauges to what holds now: the state, the current token's remaining
    /// lifetime (negative once expired) and its expiry as a Unix time. Called after every refresh
    /// attempt and before every scrape, so that a scrape never shows a value from the last event.
    pub(super) fn publish_metrics(&self) {
        let state = self.state();
        for s in State::ALL {
            metrics::gauge!("sidecar_token_state", "provider" => self.name.clone(), "state" => s.as_str())
                .set(if s == state { 1.0 } else { 0.0 });
        }
        let Some(token) = self.current.load_full() else {
            return;
        };
        let now = Instant::now();
        let ttl = if token.expires_at >= now {
            token.expires_at.duration_since(now).as_secs_f64()
        } else {
            -now.duration_since(token.expires_at).as_secs_f64()
        };
        metrics::gauge!("sidecar_token_ttl_seconds", "provider" => self.name.clone()).set(ttl);
        let expiry = token
            .expires_at_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!("sidecar_token_expiry_timestamp_seconds", "provider" => self.name.clone())
            .set(expiry);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
