//! Client-side rate limits, upstream back-pressure, transient retries and the circuit breaker
//!, through the real sidecar binary.

mod support;

use std::time::Duration;

use sidecar_mocks::{MockUpstream, Scripted, UpstreamConfig};
use support::Sidecar;

/// These tests look at arrival times: they run one at a time so that they do not disturb each
/// other's timing on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn open_api(extra: &str) -> (MockUpstream, Sidecar) {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "upstreams:\n  - {{ name: api, url: \"{}\", circuit_breaker: {{ failures: 0 }} }}\n{extra}",
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    (api, sc)
}

async fn burst(sc: &Sidecar, n: usize, path: &str) -> Vec<reqwest::Response> {
    let client = reqwest::Client::new();
    futures::future::join_all((0..n).map(|_| client.get(sc.url(path)).send()))
        .await
        .into_iter()
        .map(|r| r.expect("request failed"))
        .collect()
}

#[tokio::test]
async fn wait_mode_paces_sixty_requests_to_twenty_per_second() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api(
        "rate_limits:\n  - { name: general, upstream: api, match: { path: \"/**\" }, rate: 20/1s, burst: 1, mode: wait }\n",
    )
    .await;
    let started = std::time::Instant::now();
    let answers = burst(&sc, 60, "/items").await;
    let took = started.elapsed();
    assert!(answers.iter().all(|r| r.status() == 200));
    let mut at: Vec<_> = api.requests().into_iter().map(|r| r.at).collect();
    at.sort();
    assert_eq!(at.len(), 60);
    for (i, first) in at.iter().enumerate() {
        let in_window = at[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 21, "{in_window} arrivals within 1 s");
    }
    // 60 requests at 20/s with a burst of 1 cannot finish sooner.
    assert!(took >= Duration::from_millis(2500), "took {took:?}");
}

#[tokio::test]
async fn reject_mode_answers_429_with_retry_after() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api(
        "rate_limits:\n  - { name: general, upstream: api, match: { path: \"/**\" }, rate: 20/1s, burst: 1, mode: reject }\n",
    )
    .await;
    let answers = burst(&sc, 60, "/items").await;
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    let limited: Vec<_> = answers.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(ok + limited.len(), 60);
    assert!((1..=5).contains(&ok), "{ok} got through a burst of 1");
    assert_eq!(api.count(), ok);
    for r in &limited {
        let secs: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs >= 1);
    }
    let again = burst(&sc, 10, "/x").await;
    let refused = again
        .into_iter()
        .find(|r| r.status() == 429)
        .expect("a 429 among 10 at once");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
}

#[tokio::test]
async fn the_stricter_rule_governs_and_does_not_drain_the_other() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api(
        "rate_limits:\n  - { name: strict, upstream: api, match: { path: \"/strict/**\" }, rate: 2/60s, mode: reject }\n  - { name: general, upstream: api, match: { path: \"/**\" }, rate: 10/60s, mode: reject }\n",
    )
    .await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            client
                .get(sc.url("/strict/a"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
    // general spent 2 of 10: the 3 requests `strict` rejected took nothing from it.
    let mut ok = 0;
    for _ in 0..9 {
        if client.get(sc.url("/other")).send().await.unwrap().status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 8);
    assert_eq!(api.count(), 10);
}

#[tokio::test]
async fn waiting_longer_than_max_wait_is_refused() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api(
        "rate_limits:\n  - { name: slow, upstream: api, match: { path: \"/**\" }, rate: 1/10s, burst: 1, mode: wait, max_wait: 1s }\n",
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(sc.url("/a")).send().await.unwrap().status(), 200);
    let r = client.get(sc.url("/b")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(api.count(), 1);
}

#[tokio::test]
async fn upstream_429_with_retry_after_holds_and_retries_idempotent_requests() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api("").await;
    let client = reqwest::Client::new();
    api.push_script(Scripted::status(429).with_header("retry-after", "2"));
    let r = client.get(sc.url("/held")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = api.requests();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(gap >= Duration::from_millis(1500), "retried after {gap:?}");
    // A POST without an idempotency key is not retried: the client gets the 429.
    api.clear();
    api.push_script(Scripted::status(429).with_header("retry-after", "1"));
    let r = client
        .post(sc.url("/orders"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(api.count(), 1);
}

#[tokio::test]
async fn transient_503s_are_retried_for_a_get() {
    let _serial = SERIAL.lock().await;
    let (api, sc) = open_api("retry: { backoff: [50ms, 50ms, 50ms] }\n").await;
    api.push_script(Scripted::status(503));
    api.push_script(Scripted::status(503));
    let r = reqwest::get(sc.url("/flaky")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api.count(), 3);
    // A POST is never sent twice.
    api.clear();
    api.push_script(Scripted::status(503));
    let r = reqwest::Client::new()
        .post(sc.url("/flaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(api.count(), 1);
}

#[tokio::test]
async fn circuit_breaker_fails_fast_after_repeated_failures() {
    let _serial = SERIAL.lock().await;
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "upstreams:\n  - {{ name: api, url: \"{}\", circuit_breaker: {{ failures: 2, cooldown: 60s }} }}\n",
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    api.push_script(Scripted::status(500));
    api.push_script(Scripted::status(500));
    assert_eq!(client.get(sc.url("/a")).send().await.unwrap().status(), 500);
    assert_eq!(client.get(sc.url("/b")).send().await.unwrap().status(), 500);
    let r = client.get(sc.url("/c")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "upstream_unreachable"
    );
    assert_eq!(api.count(), 2, "the open breaker sent nothing");
}
