use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use sidecar_config::{RefreshPolicy, MAX_DURATION};

use super::flight::{ttl_of, unix_now};
use super::*;
use crate::provider::{Fetched, Held, ProviderError};
use crate::store::Store;

/// A provider whose answers the test scripts: it counts calls, takes `latency`, and fails while
/// `failing` is set.
struct Fake {
    calls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    ttl: Duration,
    latency: Duration,
    /// The next fetch panics (a bug in a provider or in the arithmetic around it).
    panic_next: Arc<std::sync::atomic::AtomicBool>,
    /// The next `changed()` watch panics inside the background refresher.
    panic_watch: Arc<std::sync::atomic::AtomicBool>,
}

impl Provider for Fake {
    fn fetch<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.latency).await;
            if self.panic_next.swap(false, Ordering::SeqCst) {
                panic!("provider bug");
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(ProviderError::Rejected {
                    status: 500,
                    message: "server_error: down".into(),
                });
            }
            Ok(Fetched::token(format!("token-{n}"), Some(self.ttl)))
        })
    }

    fn changed(&self) -> Option<BoxFuture<'_, ()>> {
        let panic = self.panic_watch.swap(false, Ordering::SeqCst);
        Some(Box::pin(async move {
            if panic {
                panic!("watch bug");
            }
            std::future::pending().await
        }))
    }
}

struct Rig {
    source: TokenSource,
    calls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    panic_next: Arc<std::sync::atomic::AtomicBool>,
    panic_watch: Arc<std::sync::atomic::AtomicBool>,
}

fn rig(ttl: Duration, latency: Duration) -> Rig {
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = ProviderConfig {
        name: "test".into(),
        kind: sidecar_config::ProviderKind::Static {
            token: sidecar_config::Secret::new("unused"),
        },
        default_ttl: Duration::from_secs(3600),
        refresh: RefreshPolicy {
            before_expiry: Duration::from_secs(30 * 60),
            jitter: 0.0,
            skew: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            backoff: vec![Duration::from_secs(30), Duration::from_secs(60)],
            escalate_after: 3,
        },
        store: None,
        shared: false,
        tls_config: Default::default(),
    };
    let panic_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let panic_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fake = Fake {
        calls: calls.clone(),
        failing: failing.clone(),
        ttl,
        latency,
        panic_next: panic_next.clone(),
        panic_watch: panic_watch.clone(),
    };
    let source =
        TokenSource::with_provider(&config, Box::new(fake), tokio::runtime::Handle::current());
    Rig {
        source,
        calls,
        failing,
        panic_next,
        panic_watch,
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn concurrent_waiters_share_one_call() {
    let r = rig(HOUR, Duration::from_millis(50));
    assert_eq!(r.source.state(), State::Initial);
    let waiters: Vec<_> = (0..200)
        .map(|_| {
            let s = r.source.clone();
            tokio::spawn(async move { s.wait_usable(Duration::from_secs(10)).await })
        })
        .collect();
    for w in waiters {
        let t = w.await.unwrap().unwrap();
        assert_eq!(t.generation, 1);
    }
    assert_eq!(r.calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.source.state(), State::Valid);
}

#[tokio::test(start_paused = true)]
async fn stale_generation_reuses_the_newer_token() {
    let r = rig(HOUR, Duration::ZERO);
    let first = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    let second = r
        .source
        .refresh(Trigger::Unauthorized, Some(first.generation))
        .await
        .unwrap();
    assert_eq!(second.generation, 2);
    // A request that failed with generation 1 now finds generation 2 and does not refresh.
    let again = r
        .source
        .refresh(Trigger::Unauthorized, Some(first.generation))
        .await
        .unwrap();
    assert_eq!(again.generation, 2);
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_unauthorized_refreshes_coalesce() {
    let r = rig(HOUR, Duration::from_millis(100));
    let first = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let s = r.source.clone();
            let g = first.generation;
            tokio::spawn(async move { s.refresh(Trigger::Unauthorized, Some(g)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().generation, 2);
    }
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_is_marked_until_its_replacement_arrives() {
    let r = rig(HOUR, Duration::from_millis(50));
    let first = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert!(!r.source.is_rejected(&first));
    // An upstream refuses generation 1: the refresh takes 50 ms.
    let s = r.source.clone();
    let refusal = tokio::spawn(async move { s.refresh(Trigger::Unauthorized, Some(1)).await });
    tokio::task::yield_now().await;
    assert!(r.source.is_rejected(&first), "refused token not marked");
    // A request holding it joins the refresh in flight: still one identity-provider call.
    let joined = r
        .source
        .refresh(Trigger::Unauthorized, Some(first.generation))
        .await
        .unwrap();
    assert_eq!(joined.generation, 2);
    assert_eq!(refusal.await.unwrap().unwrap().generation, 2);
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    assert!(!r.source.is_rejected(&joined));

    // When no replacement can be had, the mark goes: the refused token is the best there is.
    r.failing.store(true, Ordering::SeqCst);
    assert!(r
        .source
        .refresh(Trigger::Unauthorized, Some(2))
        .await
        .is_err());
    assert!(!r.source.is_rejected(&joined));
    assert_eq!(r.source.usable().unwrap().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn refresher_renews_before_expiry_and_requests_never_wait() {
    let r = rig(Duration::from_secs(3), Duration::from_millis(20));
    r.source.start();
    let first = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.generation, 1);
    // Over 10 simulated seconds a 3 s token is always usable and renewed about every 1.5 s.
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        assert!(
            r.source.usable().is_some(),
            "no usable token at {:?}",
            end - Instant::now()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = r.calls.load(Ordering::SeqCst);
    assert!((6..=9).contains(&calls), "{calls} calls");
    r.source.stop();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_keep_the_old_token() {
    let r = rig(Duration::from_secs(120), Duration::ZERO);
    let first = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    r.failing.store(true, Ordering::SeqCst);
    r.source.start();
    // Proactive refresh at 60 s fails; the old token stays in use.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    assert_eq!(r.source.state(), State::Error);
    assert_eq!(r.source.usable().unwrap().generation, first.generation);
    // The next attempt waits for the first backoff step (30 s), not earlier.
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 3);
    let status = r.source.status();
    assert_eq!(status.consecutive_failures, 2);
    assert!(status.last_error.unwrap().contains("server_error"));
    // Recovery: the IdP works again; the following attempt (after 60 s) succeeds.
    r.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(r.source.state(), State::Valid);
    assert!(r.source.usable().unwrap().generation > first.generation);
    r.source.stop();
}

#[tokio::test(start_paused = true)]
async fn no_token_and_idp_down_gives_unavailable_within_bound() {
    let r = rig(HOUR, Duration::ZERO);
    r.failing.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = r
        .source
        .wait_usable(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(err.last_error.unwrap().contains("server_error"));
    // One attempt, then the backoff (30 s) kept further waiters from hammering the IdP.
    assert_eq!(r.calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.source.state(), State::Expired);
}

#[tokio::test(start_paused = true)]
async fn ensure_refreshes_for_a_longer_ttl() {
    let r = rig(Duration::from_secs(4 * 3600), Duration::ZERO);
    let t = r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    // 3 h left: enough for 2 h, not for 3.5 h.
    assert_eq!(
        r.source
            .ensure(Duration::from_secs(7200), Duration::from_secs(1))
            .await
            .unwrap()
            .generation,
        t.generation
    );
    let fresh = r
        .source
        .ensure(Duration::from_secs(12600), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(fresh.generation, t.generation + 1);
    // More than the IdP ever issues: unavailable.
    assert!(r
        .source
        .ensure(Duration::from_secs(5 * 3600), Duration::from_secs(1))
        .await
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn status_never_shows_the_token() {
    let r = rig(HOUR, Duration::ZERO);
    r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    let json = serde_json::to_string(&r.source.status()).unwrap();
    assert!(!json.contains("token-1"), "{json}");
    assert!(json.contains(&crate::fingerprint("token-1")));
}

// ---- store, crash safety, escalation -------------------------------------------------------

const STORE_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn temp_store_path(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sidecar-src-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("p.tok")
}

fn stored_config(path: &std::path::Path, kind: sidecar_config::ProviderKind) -> ProviderConfig {
    ProviderConfig {
        name: "p".into(),
        kind,
        default_ttl: HOUR,
        refresh: RefreshPolicy {
            before_expiry: Duration::from_secs(30 * 60),
            jitter: 0.0,
            skew: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            backoff: vec![Duration::from_secs(30)],
            escalate_after: 2,
        },
        tls_config: Default::default(),
        store: Some(sidecar_config::Store {
            path: path.to_path_buf(),
            key: sidecar_config::Secret::new(STORE_KEY),
        }),
        shared: false,
    }
}

/// The refresh tokens a provider was handed, call by call.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// Issues `access-N` / `refresh-N` and records the refresh token it was handed.
struct Rotating {
    calls: Arc<AtomicUsize>,
    seen: Seen,
}

impl Provider for Rotating {
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            lock(&self.seen).push(held.refresh_token.clone());
            Ok(Fetched {
                access_token: format!("access-{n}"),
                expires_in: Some(HOUR),
                refresh_token: Some(format!("refresh-{n}")),
            })
        })
    }
}

fn rotating(path: &std::path::Path) -> (TokenSource, Arc<AtomicUsize>, Seen) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = stored_config(
        path,
        sidecar_config::ProviderKind::Static {
            token: sidecar_config::Secret::new("unused"),
        },
    );
    let p = Rotating {
        calls: calls.clone(),
        seen: seen.clone(),
    };
    let source =
        TokenSource::with_provider(&config, Box::new(p), tokio::runtime::Handle::current());
    (source, calls, seen)
}

#[tokio::test(start_paused = true)]
async fn restart_uses_the_stored_token_without_an_idp_call() {
    let path = temp_store_path("restart");
    let (first, calls, _) = rotating(&path);
    let t1 = first.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert_eq!((t1.generation, calls.load(Ordering::SeqCst)), (1, 1));
    drop(first);

    let (second, calls2, seen2) = rotating(&path);
    let restored = second.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert_eq!(calls2.load(Ordering::SeqCst), 0, "the IdP was called");
    assert_eq!(restored.expose(), "access-1");
    assert_eq!(restored.generation, 1);
    assert_eq!(second.state(), State::Valid);
    assert!(restored.lifetime() > Duration::from_secs(3500));
    // Generations continue, and the stored refresh token seeds the next grant.
    let next = second.refresh(Trigger::Manual, None).await.unwrap();
    assert_eq!(next.generation, 2);
    assert_eq!(lock(&seen2).as_slice(), [Some("refresh-1".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn an_expired_stored_token_seeds_the_refresh_token_grant() {
    let path = temp_store_path("expired");
    let now = crate::Record::unix_ms(SystemTime::now());
    Store::new(&path, STORE_KEY, "p")
        .save(&crate::Record {
            access_token: "old-access".into(),
            refresh_token: Some("stored-refresh".into()),
            generation: 41,
            issued_at_ms: now - 7_200_000,
            expires_at_ms: now - 3_600_000,
        })
        .unwrap();
    let (source, calls, seen) = rotating(&path);
    let t = source.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(t.expose(), "access-1");
    assert_eq!(t.generation, 42);
    assert_eq!(lock(&seen).as_slice(), [Some("stored-refresh".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn a_bad_store_file_is_ignored_and_overwritten() {
    for (tag, content) in [
        ("garbage", b"not a store at all".to_vec()),
        ("truncated", b"TSK1\x01".to_vec()),
    ] {
        let path = temp_store_path(tag);
        std::fs::write(&path, &content).unwrap();
        let (source, calls, seen) = rotating(&path);
        let t = source.wait_usable(Duration::from_secs(1)).await.unwrap();
        assert_eq!((t.generation, calls.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(lock(&seen).as_slice(), [None]);
        let back = Store::new(&path, STORE_KEY, "p").load().unwrap().unwrap();
        assert_eq!(back.access_token, "access-1");
    }
    // A file sealed with another key: ignored, logged in afresh.
    let path = temp_store_path("otherkey");
    Store::with_iterations(&path, "some passphrase", "p", 1000)
        .save(&crate::Record {
            access_token: "x".into(),
            refresh_token: None,
            generation: 5,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX / 2,
        })
        .unwrap();
    let (source, calls, _) = rotating(&path);
    assert_eq!(
        source
            .wait_usable(Duration::from_secs(1))
            .await
            .unwrap()
            .generation,
        1
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Kill between the writes: a refresh token grant rotates at the mock IdP, the new pair is
/// stored, and the process "dies" before the new access token is published. The next start
/// still holds a refresh token the IdP accepts.
#[tokio::test]
async fn killed_after_rotation_still_has_a_usable_refresh_token() {
    let idp = sidecar_mocks::MockIdp::start(sidecar_mocks::IdpConfig::default()).await;
    let path = temp_store_path("crash");
    let kind = sidecar_config::ProviderKind::RefreshToken {
        client: sidecar_config::OAuthClient {
            token_url: idp.token_url(),
            client_id: "demo-client".into(),
            credential: sidecar_config::ClientCredential::SecretBasic(sidecar_config::Secret::new(
                "demo-secret",
            )),
        },
        refresh_token: sidecar_config::Secret::new(idp.issue_refresh_token()),
        scopes: vec![],
        params: Default::default(),
        fallback: None,
    };
    let config = stored_config(&path, kind);
    let handle = tokio::runtime::Handle::current();
    let first = TokenSource::new(&config, handle.clone()).unwrap();
    let t1 = first.wait_usable(Duration::from_secs(5)).await.unwrap();
    let stored1 = Store::new(&path, STORE_KEY, "p").load().unwrap().unwrap();
    let rt1 = stored1.refresh_token.clone().unwrap();
    assert!(idp.refresh_token_valid(&rt1));

    let (killed_tx, killed) = tokio::sync::oneshot::channel();
    *lock(&first.inner.kill_after_store) = Some(killed_tx);
    let in_flight = tokio::spawn({
        let first = first.clone();
        async move { first.refresh(Trigger::Manual, None).await }
    });
    killed.await.unwrap();
    // The rotation happened at the IdP: the old refresh token is spent.
    assert!(!idp.refresh_token_valid(&rt1));
    // The process died before publishing: its requests still saw the old token.
    assert_eq!(first.current().unwrap().generation, t1.generation);
    in_flight.abort();
    first.stop();
    drop(first);

    let calls_before = idp.calls();
    let second = TokenSource::new(&config, handle).unwrap();
    let restored = second.wait_usable(Duration::from_secs(5)).await.unwrap();
    assert_eq!(idp.calls(), calls_before, "restart needed no IdP call");
    assert_eq!(restored.generation, t1.generation + 1);
    assert!(idp.registry().is_valid(restored.expose()));
    // And the stored refresh token works.
    let next = second.refresh(Trigger::Manual, None).await.unwrap();
    assert!(idp.registry().is_valid(next.expose()));
    assert_eq!(idp.calls(), calls_before + 1);
}

/// Counts events at ERROR level (the escalation) on the current thread.
#[derive(Default, Clone)]
struct ErrorCounter(Arc<AtomicUsize>);

impl tracing::Subscriber for ErrorCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        if *e.metadata().level() == tracing::Level::ERROR {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn failures_escalate_after_the_configured_count() {
    let errors = ErrorCounter::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let _guard = tracing::subscriber::set_default(errors.clone());
    rt.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut config = stored_config(
            std::path::Path::new("/unused"),
            sidecar_config::ProviderKind::Static {
                token: sidecar_config::Secret::new("unused"),
            },
        );
        config.store = None;
        config.refresh.escalate_after = 3;
        let fake = Fake {
            calls: calls.clone(),
            failing,
            ttl: HOUR,
            latency: Duration::ZERO,
            panic_next: Default::default(),
            panic_watch: Default::default(),
        };
        let source =
            TokenSource::with_provider(&config, Box::new(fake), tokio::runtime::Handle::current());
        for expected_errors in [0, 0, 1, 2] {
            let _ = source.refresh(Trigger::Manual, None).await;
            assert_eq!(errors.0.load(Ordering::SeqCst), expected_errors);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(source.state(), State::Expired);
        assert_eq!(source.status().consecutive_failures, 4);
    });
}

/// Hands out `r1` once, then refuses every refresh token with `invalid_grant`.
struct Refusing {
    seen: Seen,
}

impl Provider for Refusing {
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            lock(&self.seen).push(held.refresh_token.clone());
            if held.refresh_token.is_some() {
                return Err(ProviderError::Rejected {
                    status: 400,
                    message: "invalid_grant: refresh token revoked".into(),
                });
            }
            Ok(Fetched {
                access_token: "a".into(),
                expires_in: Some(HOUR),
                refresh_token: Some("r1".into()),
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_refresh_token_is_dropped() {
    let seen = Seen::default();
    let mut config = stored_config(
        std::path::Path::new("/unused"),
        sidecar_config::ProviderKind::Static {
            token: sidecar_config::Secret::new("unused"),
        },
    );
    config.store = None;
    let source = TokenSource::with_provider(
        &config,
        Box::new(Refusing { seen: seen.clone() }),
        tokio::runtime::Handle::current(),
    );
    source.refresh(Trigger::Manual, None).await.unwrap();
    let err = source.refresh(Trigger::Manual, None).await.unwrap_err();
    assert!(err.error.is_invalid_grant());
    source.refresh(Trigger::Manual, None).await.unwrap();
    assert_eq!(
        lock(&seen).as_slice(),
        [None, Some("r1".to_string()), None],
        "the refused token was sent again"
    );
}

/// Answers with an access token that cannot go in a header, but a rotated refresh token.
struct BadAccessToken {
    seen: Seen,
}

impl Provider for BadAccessToken {
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            lock(&self.seen).push(held.refresh_token.clone());
            let n = lock(&self.seen).len();
            Ok(Fetched {
                access_token: "bad\ntoken".into(),
                expires_in: Some(HOUR),
                refresh_token: Some(format!("r{n}")),
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_rotated_refresh_token_survives_an_unusable_access_token() {
    let path = temp_store_path("orphan");
    let seen = Seen::default();
    let config = stored_config(
        &path,
        sidecar_config::ProviderKind::Static {
            token: sidecar_config::Secret::new("unused"),
        },
    );
    let source = TokenSource::with_provider(
        &config,
        Box::new(BadAccessToken { seen: seen.clone() }),
        tokio::runtime::Handle::current(),
    );
    assert!(source.refresh(Trigger::Manual, None).await.is_err());
    assert!(source.refresh(Trigger::Manual, None).await.is_err());
    assert_eq!(lock(&seen).as_slice(), [None, Some("r1".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn the_refresher_picks_up_a_replaced_token_file() {
    let path = temp_store_path("file").with_file_name("token");
    std::fs::write(&path, "first-token\n").unwrap();
    let mut config = stored_config(
        &path,
        sidecar_config::ProviderKind::File { path: path.clone() },
    );
    config.store = None;
    let source = TokenSource::new(&config, tokio::runtime::Handle::current()).unwrap();
    source.start();
    let first = source.wait_usable(Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.expose(), "first-token");
    let tmp = path.with_file_name(".token.new");
    std::fs::write(&tmp, "second-token\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // Within a few poll intervals (paused clock), and long before any proactive refresh.
    let mut seen = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = source.usable().unwrap();
        if t.generation > first.generation {
            seen = Some(t);
            break;
        }
    }
    let t = seen.expect("the new file was not picked up");
    assert_eq!(t.expose(), "second-token");
    source.stop();
}

#[tokio::test(start_paused = true)]
async fn ensure_respects_min_interval_and_the_failure_backoff() {
    let r = rig(2 * HOUR, Duration::ZERO);
    r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    let ensure = || r.source.ensure(3 * HOUR, Duration::from_secs(1));
    // The 2 h token is fresh (younger than min_interval, 5 s): no call could do better now.
    for _ in 0..5 {
        assert!(ensure().await.is_err());
    }
    assert_eq!(r.calls.load(Ordering::SeqCst), 1);
    // Once min_interval has passed, one more try; then held back again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(ensure().await.is_err());
    assert!(ensure().await.is_err());
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    // A failure starts the backoff (30 s): ensure does not hammer the failing IdP.
    r.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let err = ensure().await.unwrap_err();
    assert!(err.last_error.unwrap().contains("server_error"));
    for _ in 0..5 {
        let err = ensure().await.unwrap_err();
        assert!(err.last_error.unwrap().contains("server_error"));
    }
    assert_eq!(r.calls.load(Ordering::SeqCst), 3);
    // After the backoff the IdP is asked again; what fits the held token needs no call.
    r.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(ensure().await.is_err());
    assert_eq!(r.calls.load(Ordering::SeqCst), 4);
    assert!(r.source.ensure(HOUR, Duration::from_secs(1)).await.is_ok());
    assert_eq!(r.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_is_a_failed_refresh_and_the_next_one_runs() {
    let r = rig(HOUR, Duration::ZERO);
    r.panic_next.store(true, Ordering::SeqCst);
    let err = r.source.refresh(Trigger::Initial, None).await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    // The flight landed: no refresh stays "in flight" for ever, the failure backs off.
    assert_eq!(r.source.state(), State::Expired);
    assert_eq!(r.source.status().consecutive_failures, 1);
    // Waiting for a token takes the next attempt after the backoff (30 s) and gets one.
    let t = r.source.wait_usable(Duration::from_secs(40)).await.unwrap();
    assert_eq!(t.generation, 1);
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_refresher_is_restarted_after_a_panic() {
    let r = rig(Duration::from_secs(60), Duration::ZERO);
    r.panic_watch.store(true, Ordering::SeqCst);
    r.source.start();
    // 60 s tokens over 5 simulated minutes: the refresher keeps renewing them although its
    // first loop panicked.
    let end = Instant::now() + Duration::from_secs(300);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(!r.panic_watch.load(Ordering::SeqCst), "the watch never ran");
    assert!(
        r.source.usable().is_some(),
        "no usable token: the refresher died"
    );
    assert!(r.calls.load(Ordering::SeqCst) >= 5);
    r.source.stop();
}

#[tokio::test(start_paused = true)]
async fn every_trigger_waits_out_min_interval() {
    let r = rig(HOUR, Duration::ZERO);
    let started = Instant::now();
    r.source.wait_usable(Duration::from_secs(1)).await.unwrap();
    // An upstream that refuses every token, a manual refresh loop, ensure calls: whatever asks,
    // the identity provider is called at most once per min_interval (5 s).
    for i in 0..60u32 {
        let current = r.source.current().unwrap().generation;
        let trigger = [Trigger::Unauthorized, Trigger::Manual, Trigger::Proactive][i as usize % 3];
        r.source.refresh(trigger, Some(current)).await.unwrap();
    }
    let calls = r.calls.load(Ordering::SeqCst) as u32;
    assert_eq!(calls, 61);
    let spacing = Duration::from_secs(5);
    assert!(
        started.elapsed() >= spacing * (calls - 1),
        "{calls} calls in {:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_born_expired_is_a_failed_refresh() {
    let r = rig(Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    let err = r
        .source
        .wait_usable(Duration::from_secs(100))
        .await
        .unwrap_err();
    assert!(
        err.last_error
            .as_deref()
            .unwrap()
            .contains("already expired"),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(100));
    // At 0 s, then after the backoff of 30 s and 60 s: three calls in 100 s, not one per
    // waiter loop.
    assert_eq!(r.calls.load(Ordering::SeqCst), 3);
    assert_eq!(r.source.state(), State::Expired);
}

#[tokio::test(start_paused = true)]
async fn an_expiry_beyond_a_century_is_unusable_not_a_panic() {
    for ttl in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        MAX_DURATION * 2,
    ] {
        let r = rig(ttl, Duration::ZERO);
        let err = r.source.refresh(Trigger::Initial, None).await.unwrap_err();
        assert!(err.to_string().contains("100 years"), "{err}");
        // The status answer (what /v1/token/status renders) does not panic either.
        let _ = r.source.status();
    }
}

#[test]
fn a_jwt_exp_past_a_century_or_in_the_past_is_unusable() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let jwt = |exp: &str| {
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        Fetched::token(format!("eyJhbGciOiJub25lIn0.{claims}.sig"), None)
    };
    for exp in [
        "9223372036854775807",
        "18446744073709551615",
        "1e300",
        "99999999999",
    ] {
        let err = ttl_of(&jwt(exp), HOUR).unwrap_err();
        assert!(err.to_string().contains("JWT exp"), "exp {exp}: {err}");
    }
    let err = ttl_of(&jwt("946684800"), HOUR).unwrap_err();
    assert!(err.to_string().contains("already expired"), "{err}");
    let in_a_day = unix_now().as_secs() + 86_400;
    let ttl = ttl_of(&jwt(&in_a_day.to_string()), HOUR).unwrap();
    assert!(ttl > Duration::from_secs(86_000) && ttl <= Duration::from_secs(86_400));
    // Not a JWT: default_ttl.
    assert_eq!(
        ttl_of(&Fetched::token("opaque".into(), None), HOUR).unwrap(),
        HOUR
    );
}
