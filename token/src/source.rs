//! [`TokenSource`]: one provider's current token, its state machine, the single-flight refresh
//! and the background refresher.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;
use sidecar_config::{Provider as ProviderConfig, MAX_DURATION};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::provider::{build_provider, Fetched, Held, Provider, ProviderError};
use crate::schedule::Schedule;
use crate::store::{Record, Store};
use crate::token::{jwt_exp_claim, JwtExp, Token};

/// Why a refresh started; a label of `sidecar_token_refresh_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first token.
    Initial,
    /// Ahead of expiry, in the background.
    Proactive,
    /// A request found no usable token.
    Expired,
    /// The upstream rejected the current token.
    Unauthorized,
    /// An `ensure` call or a long operation needed more TTL.
    Ensure,
    /// `POST /v1/token/refresh`.
    Manual,
}

impl Trigger {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Initial => "initial",
            Trigger::Proactive => "proactive",
            Trigger::Expired => "expired",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Ensure => "ensure",
            Trigger::Manual => "manual",
        }
    }
}

/// Token state of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No token yet and no refresh failed yet.
    Initial,
    /// A usable token.
    Valid,
    /// A refresh is in flight.
    Refreshing,
    /// The last refresh failed; the old token is still usable.
    Error,
    /// No usable token.
    Expired,
}

impl State {
    /// All states, for the `token_state` gauge.
    pub const ALL: [State; 5] = [
        State::Initial,
        State::Valid,
        State::Refreshing,
        State::Error,
        State::Expired,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initial => "initial",
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Error => "error",
            State::Expired => "expired",
        }
    }
}

/// A refresh that failed, as every caller who joined it sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("provider {provider}: {error}")]
pub struct RefreshError {
    /// The provider's name.
    pub provider: String,
    /// What went wrong.
    pub error: ProviderError,
}

/// No usable token could be had in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no usable token from provider {provider} within {waited:?}{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct Unavailable {
    /// The provider.
    pub provider: String,
    /// How long the caller waited.
    pub waited: Duration,
    /// The last refresh error, if any.
    pub last_error: Option<String>,
}

/// What `/v1/token/status` shows of one provider. Never the token.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Provider name.
    pub provider: String,
    /// State.
    pub state: State,
    /// Generation of the current token (0: none yet).
    pub generation: u64,
    /// RFC 3339 expiry of the current token.
    pub expires_at: Option<String>,
    /// Seconds until it expires (negative: expired).
    pub ttl_seconds: Option<f64>,
    /// RFC 3339 time of the last successful refresh.
    pub last_refresh_at: Option<String>,
    /// The last refresh error, cleared by a success.
    pub last_error: Option<String>,
    /// Successful refreshes.
    pub refresh_ok: u64,
    /// Failed refreshes.
    pub refresh_failed: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// First 8 hex of the token's SHA-256.
    pub fingerprint: Option<String>,
}

type RefreshFuture = Shared<BoxFuture<'static, Result<Arc<Token>, RefreshError>>>;

/// Bookkeeping behind a short std mutex; never held across an await.
#[derive(Default)]
struct Book {
    inflight: Option<RefreshFuture>,
    /// The in-flight refresh has passed its gate and is talking to the identity provider.
    calling: bool,
    generation: u64,
    last_refresh_at: Option<SystemTime>,
    last_attempt_at: Option<Instant>,
    last_error: Option<String>,
    ok: u64,
    failed: u64,
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    /// The refresh token to use next (from the last answer or the store).
    refresh_token: Option<String>,
    /// The store was read (once, by the first refresh).
    store_read: bool,
}

struct Inner {
    name: String,
    provider: Box<dyn Provider>,
    schedule: Schedule,
    default_ttl: Duration,
    current: ArcSwapOption<Token>,
    /// The newest generation an upstream rejected while its replacement is being fetched (0:
    /// none). Such a token is not handed out: a request would only be sent to be refused.
    rejected: AtomicU64,
    book: Mutex<Book>,
    /// Bumped after every finished refresh attempt, to wake waiters and the refresher.
    changed: watch::Sender<u64>,
    /// Where identity-provider calls run, whatever runtime asked for them.
    handle: tokio::runtime::Handle,
    refresher: Mutex<Option<AbortHandle>>,
    /// Encrypted persistence, if configured.
    store: Option<Arc<Store>>,
    /// Failures in a row after which they are logged at error level.
    escalate_after: u32,
    /// Test hook: a refresh stops for good right after the store write, as if the process were
    /// killed between persisting the new refresh token and publishing the new access token.
    #[cfg(test)]
    kill_after_store: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// One provider's tokens. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl TokenSource {
    /// A source for a configured provider. Identity-provider calls run on `handle`.
    pub fn new(config: &ProviderConfig, handle: tokio::runtime::Handle) -> TokenSource {
        TokenSource::with_provider(config, build_provider(&config.kind), handle)
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
                escalate_after: config.refresh.escalate_after.max(1),
                #[cfg(test)]
                kill_after_store: Mutex::new(None),
            }),
        };
        source.publish_state();
        source
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
        let token = self.inner.current.load_full()?;
        (Instant::now() < token.usable_until).then_some(token)
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
        let flight = {
            let mut book = lock(&self.inner.book);
            if let (Some(g), Some(cur)) = (stale, self.inner.current.load_full()) {
                if cur.generation > g {
                    return Ok(cur);
                }
                if trigger == Trigger::Unauthorized {
                    // Until the refresh ends, requests holding this token join it.
                    self.inner.rejected.fetch_max(g, Ordering::Relaxed);
                }
            }
            match &book.inflight {
                Some(f) => f.clone(),
                None => {
                    let gate = self.gate(&book).filter(|_| !self.inner.provider.local());
                    let inner = self.inner.clone();
                    let task = self.inner.handle.spawn(async move {
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
                    let inner = self.inner.clone();
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
        self.publish_state();
        flight.await
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
        let current = self.current()?;
        let spacing = self.inner.schedule.min_interval(current.lifetime());
        let recent = book
            .last_attempt_at
            .is_some_and(|last| now < last + spacing);
        recent.then(|| {
            format!(
                "the identity provider issues tokens shorter than {}",
                humantime::format_duration(min_ttl)
            )
        })
    }

    /// When the next identity-provider call may start, if not now: never sooner than
    /// `min_interval` after the last one, nor inside the failure backoff, whatever asks for it
    /// (proactive, a rejected token, `ensure`, a manual refresh).
    fn gate(&self, book: &Book) -> Option<Instant> {
        let spacing = self
            .current()
            .map_or(self.inner.schedule.min_interval(Duration::MAX), |t| {
                self.inner.schedule.min_interval(t.lifetime())
            });
        let after_last = book.last_attempt_at.map(|last| last + spacing);
        after_last
            .max(book.retry_at)
            .filter(|at| *at > Instant::now())
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

    /// The state machine's current state.
    pub fn state(&self) -> State {
        let book = lock(&self.inner.book);
        self.state_locked(&book)
    }

    fn state_locked(&self, book: &Book) -> State {
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

    /// What `/v1/token/status` shows.
    pub fn status(&self) -> Status {
        let book = lock(&self.inner.book);
        let token = self.current();
        let now = Instant::now();
        Status {
            provider: self.inner.name.clone(),
            state: self.state_locked(&book),
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
        }
    }

    /// Starts the background refresher on the source's runtime: it obtains the first token, then
    /// refreshes ahead of expiry and retries failures after their backoff.
    pub fn start(&self) {
        let me = self.clone();
        let task = self.inner.handle.spawn(async move { me.supervise().await });
        if let Some(old) = lock(&self.inner.refresher).replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Stops the background refresher (the source is being replaced or the process stops).
    pub fn stop(&self) {
        if let Some(task) = lock(&self.inner.refresher).take() {
            task.abort();
        }
    }

    /// Runs the refresher, restarting it after a panic (counted and logged) so that a bug in
    /// one computation never leaves the provider without refreshes.
    async fn supervise(self) {
        loop {
            match AssertUnwindSafe(self.clone().refresher())
                .catch_unwind()
                .await
            {
                Ok(()) => return,
                Err(_) => {
                    tracing::error!(provider = %self.inner.name, "token refresher panicked; restarting it in 1s");
                    metrics::counter!("sidecar_refresher_restarts_total", "provider" => self.inner.name.clone()).increment(1);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn refresher(self) {
        let mut changes = self.inner.changed.subscribe();
        loop {
            let due = self.next_refresh_due();
            let outside = async {
                match self.inner.provider.changed() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {
                    let trigger = match self.current() {
                        None => Trigger::Initial,
                        Some(_) if self.usable().is_some() => Trigger::Proactive,
                        Some(_) => Trigger::Expired,
                    };
                    let _ = self.refresh(trigger, None).await;
                }
                _ = outside => {
                    tracing::info!(provider = %self.inner.name, "token source changed; reading it again");
                    let _ = self.refresh(Trigger::Proactive, None).await;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            changes.borrow_and_update();
        }
    }

    fn next_refresh_due(&self) -> Instant {
        let book = lock(&self.inner.book);
        let now = Instant::now();
        if book.consecutive_failures > 0 {
            return book.retry_at.unwrap_or(now);
        }
        match self.current() {
            None => now,
            Some(t) => {
                let due = self
                    .inner
                    .schedule
                    .refresh_at(t.issued_at, t.expires_at, spread_of(&t));
                let spacing = self.inner.schedule.min_interval(t.lifetime());
                match book.last_attempt_at {
                    Some(last) => due.max(last + spacing),
                    None => due,
                }
            }
        }
    }

    fn publish_state(&self) {
        let state = self.state();
        for s in State::ALL {
            metrics::gauge!("sidecar_token_state", "provider" => self.inner.name.clone(), "state" => s.as_str())
                .set(if s == state { 1.0 } else { 0.0 });
        }
    }
}

/// A per-token point in `[-1, 1]` for the refresh jitter, taken from its fingerprint so it is
/// stable for one token and differs between tokens.
fn spread_of(t: &Token) -> f64 {
    let n = u32::from_str_radix(&t.fingerprint, 16).unwrap_or(0);
    f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads the store once, before the first identity-provider call: a stored refresh token seeds
/// the next grant, and a still-usable stored access token is published as is (its generation
/// continues). Returns that token. A bad file is logged (never its contents) and ignored.
async fn restore(inner: &Arc<Inner>) -> Option<Arc<Token>> {
    let store = inner.store.clone()?;
    {
        let mut book = lock(&inner.book);
        if book.store_read {
            return None;
        }
        book.store_read = true;
    }
    let loaded = tokio::task::spawn_blocking(move || store.load()).await;
    let record = match loaded {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::warn!(provider = %inner.name, error = %e, "token store ignored; logging in afresh");
            return None;
        }
        Err(_) => return None,
    };
    let now = SystemTime::now();
    let mut book = lock(&inner.book);
    book.refresh_token = record.refresh_token.clone();
    book.generation = book.generation.max(record.generation);
    if inner.current.load().is_some() {
        return None;
    }
    let mut token = Token::restored(
        record.access_token.clone(),
        record.generation,
        record.age(now),
        record.ttl_left(now),
    );
    token.usable_until = inner
        .schedule
        .usable_until(token.issued_at, token.expires_at);
    if Instant::now() >= token.usable_until || !token.is_header_safe() {
        return None;
    }
    let token = Arc::new(token);
    inner.current.store(Some(token.clone()));
    book.last_refresh_at = Some(now);
    tracing::info!(
        provider = %inner.name,
        generation = token.generation,
        fingerprint = %token.fingerprint,
        ttl_s = record.ttl_left(now).as_secs(),
        "token restored from the store"
    );
    Some(token)
}

/// Persists a new token and refresh token; `Ok` means durable. Runs before the token is
/// published, so a crash never leaves only a consumed refresh token on disk.
async fn persist(inner: &Arc<Inner>, token: &Token, refresh_token: Option<String>) {
    let Some(store) = inner.store.clone() else {
        return;
    };
    let record = Record {
        access_token: token.expose().to_string(),
        refresh_token,
        generation: token.generation,
        issued_at_ms: Record::unix_ms(SystemTime::now()),
        expires_at_ms: Record::unix_ms(token.expires_at_wall),
    };
    match tokio::task::spawn_blocking(move || store.save(&record)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(provider = %inner.name, error = %e, "cannot write the token store; the new token is kept in memory only")
        }
        Err(_) => tracing::error!(provider = %inner.name, "token store write was cancelled"),
    }
}

/// The lifetime of a fetched token: `expires_in`, else the JWT `exp`, else `default_ttl`. A
/// token that is born expired, or whose expiry lies past [`MAX_DURATION`], is unusable.
fn ttl_of(fetched: &Fetched, default_ttl: Duration) -> Result<Duration, ProviderError> {
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

fn unix_now() -> Duration {
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
    if let Some(token) = inner.current.load_full() {
        metrics::gauge!("sidecar_token_ttl_seconds", "provider" => inner.name.clone())
            .set(token.lifetime().as_secs_f64());
    }
    let source = TokenSource {
        inner: inner.clone(),
    };
    source.publish_state();
    inner.changed.send_modify(|n| *n += 1);
}

#[cfg(test)]
mod tests;
