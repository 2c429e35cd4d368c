//! Expired-token answers: one coalesced refresh, then a safe replay, through the real
//! sidecar binary.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, Scripted, UpstreamConfig};
use support::Sidecar;

async fn setup(extra: &str, upstream_extra: &str) -> (MockIdp, MockUpstream, Sidecar) {
    let idp = MockIdp::start(IdpConfig {
        ttl: Duration::from_secs(3600),
        latency: Duration::from_millis(50),
        ..IdpConfig::default()
    })
    .await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        r#"providers:
  main:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
upstreams:
  - {{ name: api, url: "{}", provider: main{upstream_extra} }}
{extra}"#,
        idp.token_url(),
        api.url()
    );
    // The first token, before the test measures IdP calls.
    let sc = Sidecar::start_with_first_token(&yaml).await;
    (idp, api, sc)
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn revocation_under_200_concurrent_gets_costs_one_idp_call() {
    let (idp, _api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(sc.url("/warm")).send().await.unwrap().status(),
        200
    );
    let before = idp.calls();
    idp.registry().revoke_all();
    let all = futures::future::join_all((0..200).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/items/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    let ok = all.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(
        ok,
        200,
        "{:?}\n{}",
        all.iter()
            .filter(|s| !matches!(s, Ok(200)))
            .collect::<Vec<_>>(),
        sc.logs()
    );
    assert_eq!(idp.calls() - before, 1, "exactly one extra token request");
    // Every request succeeded: nothing for an operator to look at.
    let logs = sc.logs();
    assert!(
        !logs.contains(" WARN ") && !logs.contains(" ERROR "),
        "{logs}"
    );
}

#[tokio::test]
async fn large_put_bodies_are_replayed_byte_exact_and_oversized_ones_are_not() {
    let (idp, api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    for kib in [300usize, 900] {
        idp.registry().revoke_all();
        api.clear();
        let body = body_of(kib * 1024);
        let r = client
            .put(sc.url("/blob"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{kib} KiB\n{}", sc.logs());
        let seen = api.requests();
        assert_eq!(seen.len(), 2, "first attempt + one replay for {kib} KiB");
        for s in &seen {
            assert_eq!(s.body_len, body.len());
            assert_eq!(
                s.body_sha256,
                hex(&body),
                "{kib} KiB body changed on the way"
            );
        }
        assert_eq!(seen[0].status, 401);
        assert_eq!(seen[1].status, 200);
    }
    // The sidecar's own replays (bodies over 64 KiB) ended 200: no ERROR or WARN line.
    let logs = sc.logs();
    assert!(
        !logs.contains(" WARN ") && !logs.contains(" ERROR "),
        "{logs}"
    );
    // 2 MiB is over replay.max_body (1 MiB): streamed once, the 401 comes back unchanged.
    idp.registry().revoke_all();
    api.clear();
    let body = body_of(2 << 20);
    let r = client
        .put(sc.url("/blob"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), r#"{"message":"token is expired"}"#);
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_sha256, hex(&body));
}

#[tokio::test]
async fn small_bodies_replay_through_pingoras_buffer() {
    let (idp, api, sc) = setup("replay: { debug_header: true }\n", "").await;
    idp.registry().revoke_all();
    let body = body_of(10 * 1024);
    let r = reqwest::Client::new()
        .put(sc.url("/small"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-sidecar-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let seen = api.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body_sha256 == hex(&body)));
}

#[tokio::test]
async fn post_is_replayed_only_with_an_idempotency_key() {
    let (idp, api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    idp.registry().revoke_all();
    let r = client
        .post(sc.url("/orders"))
        .body("{\"qty\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a POST without a key must not be replayed");
    assert_eq!(api.count(), 1, "the upstream saw the POST exactly once");
    idp.registry().revoke_all();
    api.clear();
    let r = client
        .post(sc.url("/orders"))
        .header("Idempotency-Key", "order-42")
        .body("{\"qty\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api.count(), 2);
}

#[tokio::test]
async fn credentials_revoked_for_good_pass_401_after_one_forced_refresh() {
    let (idp, api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    let before = idp.calls();
    idp.registry().set_reject_all(true);
    let all = futures::future::join_all((0..100).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/r/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    assert!(all.iter().all(|s| matches!(s, Ok(401))), "{all:?}");
    // Requests that fail with generation g force one refresh to g+1 and pass the next 401
    // through; a request that only started after g+1 existed may force one more. Never one per
    // request.
    let extra = idp.calls() - before;
    assert!(
        (1..=3).contains(&extra),
        "{extra} IdP calls for 100 requests"
    );
    // No loops: never more than max_attempts (3) sends per request; in practice two. Every
    // request did reach the upstream: the 401s are its answers, not the sidecar's.
    let sent = api.count();
    assert!((100..=300).contains(&sent), "{sent} upstream requests");
    let _ = sc;
}

#[tokio::test]
async fn body_pattern_triggers_the_flow_and_other_403s_pass_untouched() {
    let (idp, api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    let expired = r#"{"error":"key not authorized: token is expired"}"#;
    // The token is rejected with a 403 whose body says so (twice: the check and the original).
    idp.registry().revoke_all();
    api.push_script(Scripted::status(403).with_body(expired));
    api.push_script(Scripted::status(403).with_body(expired));
    let before = idp.calls();
    let r = client.get(sc.url("/pattern")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    assert_eq!(idp.calls() - before, 1);
    // A 403 that is about something else reaches the client as it was.
    let forbidden = r#"{"error":"you may not see this"}"#;
    api.push_script(
        Scripted::status(403)
            .with_body(forbidden)
            .with_header("x-reason", "acl"),
    );
    api.push_script(
        Scripted::status(403)
            .with_body(forbidden)
            .with_header("x-reason", "acl"),
    );
    let calls = idp.calls();
    let r = client.get(sc.url("/acl")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers().get("x-reason").unwrap(), "acl");
    assert_eq!(r.text().await.unwrap(), forbidden);
    assert_eq!(idp.calls(), calls, "no refresh for an unrelated 403");
}

#[tokio::test]
async fn replay_false_passes_every_401_through() {
    let (idp, api, sc) = setup("", ", replay: false").await;
    idp.registry().revoke_all();
    let before = idp.calls();
    let r = reqwest::get(sc.url("/x")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), r#"{"message":"token is expired"}"#);
    assert_eq!(api.count(), 1);
    assert_eq!(idp.calls(), before);
}

#[tokio::test]
async fn websocket_upgrade_is_replayed_after_revocation() {
    use futures::{SinkExt, StreamExt};
    let (idp, api, sc) = setup("", "").await;
    idp.registry().revoke_all();
    let before = idp.calls();
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", sc.listen))
        .await
        .expect("upgrade through the sidecar after revocation");
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ping");
    assert_eq!(idp.calls() - before, 1);
    let seen: Vec<u16> = api
        .requests()
        .iter()
        .filter(|r| r.path == "/ws")
        .map(|r| r.status)
        .collect();
    assert_eq!(seen, vec![401, 101]);
}

#[tokio::test]
async fn requests_arriving_during_the_refresh_wait_instead_of_being_refused() {
    let (idp, api, sc) = setup("", "").await;
    let client = reqwest::Client::new();
    idp.set_latency(Duration::from_millis(1500));
    idp.registry().revoke_all();
    api.clear();
    // The first request is refused and starts the refresh (1.5 s at the IdP).
    let first = tokio::spawn({
        let c = client.clone();
        let url = sc.url("/first");
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    sc.wait_status(Duration::from_secs(10), |v| {
        v["providers"][0]["state"] == "refreshing"
    })
    .await;
    // Requests arriving now hold back for the new token: none is sent with the refused one.
    let later = futures::future::join_all((0..20).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/later/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    assert_eq!(first.await.unwrap().unwrap(), 200, "{}", sc.logs());
    assert!(later.iter().all(|s| matches!(s, Ok(200))), "{later:?}");
    let refused: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.status == 401)
        .map(|r| r.path)
        .collect();
    assert_eq!(
        refused,
        vec!["/first".to_string()],
        "only the first request meets the refusal"
    );
    assert_eq!(
        api.count(),
        22,
        "20 requests + the first one and its replay"
    );
}
