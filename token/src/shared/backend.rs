//! The connection to the Redis the replicas share: a `redis` connection manager (it reconnects
//! by itself once it has connected), a task that keeps trying until the first connection works
//! and pings so `shared: connected|down` follows reality, and a pub/sub task that wakes the
//! replicas waiting for a token another replica publishes (re-subscribing after Redis returns).
//! Every call has a timeout; the password appears nowhere but in the client.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sidecar_config::{OnRedisDown, Shared};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How often the health task pings, and the longest pause between connection attempts.
const PING_EVERY: Duration = Duration::from_millis(500);
/// A replica not heard of for this long (six pings missed) no longer counts as one.
const PRESENCE_TTL: Duration = Duration::from_secs(3);

/// The health ping: marks this replica present (scored by the Redis server's clock, so the
/// replicas' own clocks do not matter), forgets replicas silent for longer than the TTL and
/// counts the rest. KEYS[1]: the sorted set. ARGV: replica id, TTL (ms).
static PRESENCE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
",
    )
});

/// Why a shared call did not answer. Never carries the URL's password.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SharedError {
    /// No connection, a connection error or a timeout: Redis counts as down.
    #[error("redis is unreachable: {0}")]
    Down(String),
    /// Redis answered with an error (a script error, a wrong type): it is up.
    #[error("redis refused the call: {0}")]
    Refused(String),
}

/// The shared Redis of one config. Cheap to clone.
#[derive(Clone)]
pub struct SharedBackend {
    inner: Arc<BackendInner>,
}

struct BackendInner {
    client: redis::Client,
    config: Shared,
    /// The password of the URL, to scrub it out of any error text.
    password: Option<String>,
    conn: Mutex<Option<ConnectionManager>>,
    up: AtomicBool,
    /// Becomes true when the first connection attempt has ended (either way): a call made at
    /// start waits for it rather than counting Redis as down before it was even tried.
    tried: watch::Sender<bool>,
    /// Bumped on every publication seen (and every (re)subscription): waiters look again.
    published: watch::Sender<u64>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Upstream holds (429/503 `Retry-After`) other replicas published, by upstream.
    remote_holds: Mutex<HashMap<String, Instant>>,
    any_hold: AtomicBool,
    /// This replica's name in the presence set (random per backend).
    id: String,
    /// Replicas (this one included) present at the last successful ping; 0 before the first.
    replicas_seen: AtomicU32,
}

/// The longest hold a publication can impose (the proxy caps it further by
/// `retry.max_retry_after`).
const MAX_HOLD: Duration = Duration::from_secs(3600);
/// A hold publication is `<milliseconds> <upstream>`; anything longer is not one.
const MAX_HOLD_MESSAGE: usize = 512;

impl Drop for BackendInner {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl std::fmt::Debug for SharedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBackend")
            .field("url", &self.inner.config.shown_url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedBackend {
    /// Starts connecting (on `handle`) to the configured Redis. Never fails because Redis is
    /// unreachable or refuses the password: the replica starts in the `on_redis_down` mode
    /// and connects when it can. Fails only for a URL the client cannot use.
    pub fn start(
        config: &Shared,
        handle: &tokio::runtime::Handle,
    ) -> Result<SharedBackend, String> {
        describe();
        let client = redis::Client::open(config.url.expose()).map_err(|_| {
            format!(
                "shared.redis.url {}: not a usable Redis URL",
                config.shown_url
            )
        })?;
        let password = url::Url::parse(config.url.expose())
            .ok()
            .and_then(|u| u.password().map(str::to_string))
            .filter(|p| !p.is_empty());
        let (published, _) = watch::channel(0);
        let (tried, _) = watch::channel(false);
        let backend = SharedBackend {
            inner: Arc::new(BackendInner {
                client,
                config: config.clone(),
                password,
                conn: Mutex::new(None),
                up: AtomicBool::new(false),
                tried,
                published,
                tasks: Mutex::new(Vec::new()),
                remote_holds: Mutex::new(HashMap::new()),
                any_hold: AtomicBool::new(false),
                id: format!("{:016x}", rand::rng().random::<u64>()),
                replicas_seen: AtomicU32::new(0),
            }),
        };
        backend.set_up(false);
        let weak = Arc::downgrade(&backend.inner);
        let health = handle.spawn(health(weak.clone()));
        let subscriber = handle.spawn(subscribe(weak));
        lock(&backend.inner.tasks).extend([health.abort_handle(), subscriber.abort_handle()]);
        tracing::info!(url = %config.shown_url, prefix = %config.key_prefix, "sharing tokens and rate limits through redis");
        Ok(backend)
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// `connected` or `down`, for `/v1/token/status`.
    pub fn state(&self) -> &'static str {
        if self.is_up() {
            "connected"
        } else {
            "down"
        }
    }

    /// How many replicas (this one included) shared the Redis at the last ping that reached it;
    /// 0 before the first. Kept while Redis is down: the last count seen.
    pub fn replicas_seen(&self) -> u32 {
        self.inner.replicas_seen.load(Ordering::Relaxed)
    }

    /// Whether both handles are one backend (a reload kept it).
    pub fn same_as(&self, other: &SharedBackend) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The settings it was started with.
    pub fn config(&self) -> &Shared {
        &self.inner.config
    }

    pub(crate) fn mode(&self) -> OnRedisDown {
        self.inner.config.on_redis_down
    }

    /// The key of `parts` under the configured prefix.
    pub(crate) fn key(&self, parts: &[&str]) -> String {
        let mut k = self.inner.config.key_prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// The channel every publication goes to.
    pub(crate) fn channel(&self) -> String {
        self.key(&["published"])
    }

    /// A receiver that changes whenever something was published (or the subscription was
    /// re-established, which may have missed a publication).
    pub(crate) fn publications(&self) -> watch::Receiver<u64> {
        self.inner.published.subscribe()
    }

    /// Tells the other replicas that `upstream` asked (429/503 `Retry-After`) not to be sent
    /// anything for `delay`. Fire and forget: the request path does not wait for Redis.
    pub fn publish_hold(&self, upstream: &str, delay: Duration) {
        let backend = self.clone();
        let message = format!("{} {upstream}", delay.min(MAX_HOLD).as_millis());
        let channel = self.key(&["holds"]);
        tokio::spawn(async move {
            let _ = backend
                .call("hold", |mut c| async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(message)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        });
    }

    /// Until when another replica's published hold keeps requests to `upstream` back.
    pub fn held_until(&self, upstream: &str) -> Option<Instant> {
        if !self.inner.any_hold.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        lock(&self.inner.remote_holds)
            .get(upstream)
            .copied()
            .filter(|u| *u > now)
    }

    /// The lease of the refresh lock.
    pub(crate) fn lease(&self) -> Duration {
        self.inner.config.lease
    }

    fn set_up(&self, up: bool) {
        set_up(&self.inner, up);
    }

    /// One call to Redis, bounded by `shared.redis.timeout`, counted in
    /// `sidecar_shared_ops_total{op,result}`, and marking Redis up or down.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, SharedError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut conn = lock(&self.inner.conn).clone();
        if conn.is_none() && !*self.inner.tried.borrow() {
            let mut tried = self.inner.tried.subscribe();
            let first = self.inner.config.timeout.saturating_mul(5);
            let _ = tokio::time::timeout(first, tried.wait_for(|t| *t)).await;
            conn = lock(&self.inner.conn).clone();
        }
        let Some(conn) = conn else {
            count(op, "down");
            self.set_up(false);
            return Err(SharedError::Down("not connected".into()));
        };
        match tokio::time::timeout(self.inner.config.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                count(op, "ok");
                self.set_up(true);
                Ok(v)
            }
            Ok(Err(e)) if is_down(&e) => {
                count(op, "down");
                self.set_up(false);
                Err(SharedError::Down(scrub(&self.inner, &e)))
            }
            Ok(Err(e)) => {
                count(op, "error");
                self.set_up(true);
                Err(SharedError::Refused(scrub(&self.inner, &e)))
            }
            Err(_) => {
                count(op, "timeout");
                self.set_up(false);
                Err(SharedError::Down(format!(
                    "no answer within {}",
                    humantime::format_duration(self.inner.config.timeout)
                )))
            }
        }
    }
}

/// Marks the first connection attempt as ended when dropped (after its outcome is recorded).
struct Tried<'a>(&'a watch::Sender<bool>);

impl Drop for Tried<'_> {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

fn is_down(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::BusyLoadingError
        )
}

/// Error text without the password, whatever the client put in it.
fn scrub(inner: &BackendInner, e: &redis::RedisError) -> String {
    let text = e.to_string();
    match &inner.password {
        Some(p) => text.replace(p.as_str(), "<redacted>"),
        None => text,
    }
}

fn set_up(inner: &BackendInner, up: bool) {
    let was = inner.up.swap(up, Ordering::Relaxed);
    metrics::gauge!("sidecar_shared_backend_up").set(if up { 1.0 } else { 0.0 });
    if was != up {
        if up {
            tracing::info!(url = %inner.config.shown_url, "shared redis connected");
        } else {
            let mode = match inner.config.on_redis_down {
                OnRedisDown::Local => "local",
                OnRedisDown::FailClosed => "fail_closed",
            };
            tracing::warn!(url = %inner.config.shown_url, mode, "shared redis is down; on_redis_down applies");
        }
    }
}

fn count(op: &'static str, result: &'static str) {
    metrics::counter!("sidecar_shared_ops_total", "op" => op, "result" => result).increment(1);
}

fn describe() {
    metrics::describe_gauge!(
        "sidecar_shared_backend_up",
        "1 while the Redis that replicas share answers, 0 while on_redis_down applies"
    );
    metrics::describe_gauge!(
        "sidecar_shared_replicas",
        "Replicas sharing the Redis at the last ping (kept while it is down: the last count seen)"
    );
    metrics::describe_counter!(
        "sidecar_shared_ops_total",
        "Calls to the shared Redis by operation and result (ok, error, down, timeout)"
    );
}

/// Connects (until the first connection works; the manager reconnects by itself after that)
/// and pings, so that the up/down state is right even while no refresh needs Redis.
async fn health(weak: Weak<BackendInner>) {
    let mut last_error = String::new();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let has_conn = lock(&inner.conn).is_some();
        if !has_conn {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(inner.config.timeout)
                .set_response_timeout(inner.config.timeout)
                // No retries inside the client (its backoff starts at a second): this loop and
                // the next call retry, each bounded by the timeout.
                .set_number_of_retries(0);
            let attempt = tokio::time::timeout(
                inner.config.timeout.saturating_mul(4),
                ConnectionManager::new_with_config(inner.client.clone(), config),
            )
            .await;
            // Set after the outcome below, in the same step: callers waiting on it see it.
            let _tried = Tried(&inner.tried);
            match attempt {
                Ok(Ok(conn)) => {
                    *lock(&inner.conn) = Some(conn);
                    set_up(&inner, true);
                }
                Ok(Err(e)) => {
                    let why = scrub(&inner, &e);
                    if why != last_error {
                        tracing::warn!(url = %inner.config.shown_url, error = %why, "cannot connect to the shared redis; retrying");
                        last_error = why;
                    }
                    set_up(&inner, false);
                }
                Err(_) => {
                    let why = "no connection within the timeout".to_string();
                    if why != last_error {
                        tracing::warn!(url = %inner.config.shown_url, error = %why, "cannot connect to the shared redis; retrying");
                        last_error = why;
                    }
                    set_up(&inner, false);
                }
            }
        } else {
            let backend = SharedBackend {
                inner: inner.clone(),
            };
            let key = backend.key(&["replicas"]);
            let id = inner.id.clone();
            let ttl = PRESENCE_TTL.as_millis() as u64;
            let seen = backend
                .call("ping", |mut c| async move {
                    PRESENCE
                        .key(key)
                        .arg(id)
                        .arg(ttl)
                        .invoke_async::<u64>(&mut c)
                        .await
                })
                .await;
            if let Ok(n) = seen {
                let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
                inner.replicas_seen.store(n, Ordering::Relaxed);
                metrics::gauge!("sidecar_shared_replicas").set(f64::from(n));
            }
        }
        drop(inner);
        tokio::time::sleep(PING_EVERY).await;
    }
}

/// Subscribes to the publication channel, and again whenever the subscription breaks.
async fn subscribe(weak: Weak<BackendInner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let me = SharedBackend {
            inner: inner.clone(),
        };
        let channel = me.channel();
        let holds = me.key(&["holds"]);
        drop(me);
        let client = inner.client.clone();
        let timeout = inner.config.timeout;
        let published = inner.published.clone();
        drop(inner);
        let connected = tokio::time::timeout(timeout.saturating_mul(4), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            pubsub.subscribe(&holds).await?;
            redis::RedisResult::Ok(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            count("subscribe", "ok");
            // Whatever was published while unsubscribed: waiters read Redis again.
            published.send_modify(|n| *n = n.wrapping_add(1));
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                if msg.get_channel_name() == holds {
                    if let (Some(inner), Some((upstream, delay))) =
                        (weak.upgrade(), parse_hold(msg.get_payload_bytes()))
                    {
                        let until = Instant::now() + delay;
                        let mut map = lock(&inner.remote_holds);
                        let held = map.entry(upstream).or_insert(until);
                        *held = (*held).max(until);
                        inner.any_hold.store(true, Ordering::Release);
                        count("hold_received", "ok");
                    }
                    continue;
                }
                // The payload is not trusted or parsed: any message means "read Redis again".
                published.send_modify(|n| *n = n.wrapping_add(1));
            }
        } else {
            count("subscribe", "down");
        }
        drop(published);
        tokio::time::sleep(PING_EVERY).await;
    }
}

/// `<milliseconds> <upstream>`, bounded; anything else is ignored.
fn parse_hold(payload: &[u8]) -> Option<(String, Duration)> {
    if payload.len() > MAX_HOLD_MESSAGE {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let (ms, upstream) = text.split_once(' ')?;
    if ms.len() > 10 || upstream.is_empty() {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    Some((
        upstream.to_string(),
        Duration::from_millis(ms).min(MAX_HOLD),
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hold_messages() {
        assert_eq!(
            parse_hold(b"1500 api"),
            Some(("api".to_string(), Duration::from_millis(1500)))
        );
        assert_eq!(parse_hold(b"99999999999 api"), None);
        assert_eq!(parse_hold(b"9999999999 api").unwrap().1, MAX_HOLD);
        assert_eq!(parse_hold(b"x api"), None);
        assert_eq!(parse_hold(b"15 "), None);
        assert_eq!(parse_hold(&[b'1'; 600]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Whatever is published on the holds channel, reading it never panics and never
        /// holds an upstream longer than the bound.
        #[test]
        fn any_hold_message_is_bounded(payload in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Some((_, d)) = parse_hold(&payload) {
                prop_assert!(d <= MAX_HOLD);
            }
        }
    }
}
