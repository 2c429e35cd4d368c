use std::sync::atomic::{AtomicUsize, Ordering};

use sidecar_config::RefreshPolicy;

use super::*;
use crate::provider::Fetched;

/// A provider whose answers the test scripts: it counts calls, takes `latency`, and fails while
/// `failing` is set.
struct Fake {
    calls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    ttl: Duration,
    latency: Duration,
}

impl Provider for Fake {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.latency).await;
            if self.failing.load(Ordering::SeqCst) {
                return Err(ProviderError::Rejected {
                    status: 500,
                    message: "server_error: down".into(),
                });
            }
            Ok(Fetched {
                access_token: format!("token-{n}"),
                expires_in: Some(self.ttl),
            })
        })
    }
}

struct Rig {
    source: TokenSource,
    calls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
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
        },
    };
    let fake = Fake {
        calls: calls.clone(),
        failing: failing.clone(),
        ttl,
        latency,
    };
    let source =
        TokenSource::with_provider(&config, Box::new(fake), tokio::runtime::Handle::current());
    Rig {
        source,
        calls,
        failing,
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
