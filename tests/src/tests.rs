//! Self-tests of the mocks.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{Failure, IdpConfig, MockIdp, MockUpstream, Scripted, TokenRegistry, UpstreamConfig};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

async fn pair() -> (MockIdp, MockUpstream) {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let upstream = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    (idp, upstream)
}

/// Fetches a token with Basic client auth and returns the parsed answer.
async fn fetch_token(idp: &MockIdp) -> Value {
    let resp = client()
        .post(idp.token_url())
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("token json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_token_accepted_until_revoked() {
    let (idp, upstream) = pair().await;
    let answer = fetch_token(&idp).await;
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 3600);
    assert!(answer.get("scope").is_none());
    let token = answer["access_token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("tok_") && token.len() == 36, "{token}");

    let http = client();
    let resp = http
        .post(format!("{}/v1/items?x=1", upstream.url()))
        .bearer_auth(&token)
        .body("hello")
        .send()
        .await
        .expect("upstream request");
    assert_eq!(resp.status(), 200);
    let summary: Value = resp.json().await.expect("summary json");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["method"], "POST");
    assert_eq!(summary["path"], "/v1/items");
    assert_eq!(summary["query"], "x=1");
    assert_eq!(summary["body_len"], 5);
    assert_eq!(
        summary["body_sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );

    idp.registry().revoke_all();
    let resp = http
        .get(format!("{}/v1/items", upstream.url()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("upstream request");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["content-type"].to_str().ok(),
        Some("application/json")
    );
    assert_eq!(
        resp.text().await.expect("body"),
        r#"{"message":"token is expired"}"#
    );

    // A token issued after the revocation is fine, also via the query string.
    let fresh = fetch_token(&idp).await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let resp = http
        .get(format!("{}/q?access_token={fresh}", upstream.url()))
        .send()
        .await
        .expect("upstream request");
    assert_eq!(resp.status(), 200);

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[0].status, 200);
    assert_eq!(recorded[0].token.as_deref(), Some(token.as_str()));
    assert_eq!(recorded[0].header("Content-Length"), Some("5"));
    assert_eq!(recorded[1].status, 401);
    assert_eq!(recorded[2].token.as_deref(), Some(fresh.as_str()));
    assert_eq!(idp.calls(), 2);
    assert_eq!(idp.registry().issued_count(), 2);

    idp.registry().set_reject_all(true);
    let resp = http
        .get(upstream.url())
        .bearer_auth(&fresh)
        .send()
        .await
        .expect("upstream request");
    assert_eq!(resp.status(), 401);
    upstream.clear();
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_methods() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let http = client();

    let basic = http
        .post(idp.token_url())
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "read write"),
            ("audience", "https://api.example"),
        ])
        .send()
        .await
        .expect("basic");
    assert_eq!(basic.status(), 200);
    let body: Value = basic.json().await.expect("json");
    assert_eq!(body["scope"], "read write");

    let post = http
        .post(idp.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(post.status(), 200);

    for wrong in [
        http.post(idp.token_url())
            .basic_auth("demo-client", Some("nope")),
        http.post(idp.token_url()).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "nope"),
        ]),
        http.post(idp.token_url())
            .form(&[("grant_type", "client_credentials")]),
        http.post(idp.token_url())
            .header("authorization", "Basic !!!not-base64"),
    ] {
        let resp = wrong.send().await.expect("wrong");
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": "client authentication failed"
            })
        );
    }

    let grant = http
        .post(idp.token_url())
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .expect("grant");
    assert_eq!(grant.status(), 400);
    assert_eq!(
        grant.text().await.expect("body"),
        r#"{"error":"unsupported_grant_type"}"#
    );

    let calls = idp.requests();
    assert_eq!(idp.calls(), 7);
    assert_eq!(calls[0].auth_method, "basic");
    assert_eq!(calls[0].scope.as_deref(), Some("read write"));
    assert_eq!(calls[0].client_id.as_deref(), Some("demo-client"));
    assert_eq!(
        calls[0].params.get("audience").map(String::as_str),
        Some("https://api.example")
    );
    assert_eq!(calls[1].auth_method, "post");
    assert!(calls[1].params.is_empty(), "{:?}", calls[1].params);
    assert_eq!(calls[2].auth_method, "basic");
    assert_eq!(calls[3].auth_method, "post");
    assert_eq!(calls[4].auth_method, "none");
    assert_eq!(calls[6].grant_type, "password");
    assert_eq!(idp.registry().issued_count(), 2);
}

#[tokio::test]
async fn scripted_answer_served_once() {
    let upstream = MockUpstream::start(UpstreamConfig::open()).await;
    upstream.push_script(
        Scripted::status(503)
            .with_body("busy")
            .with_header("retry-after", "1"),
    );
    let http = client();
    let first = http.get(upstream.url()).send().await.expect("first");
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "1");
    assert_eq!(first.text().await.expect("body"), "busy");
    let second = http.get(upstream.url()).send().await.expect("second");
    assert_eq!(second.status(), 200);
    let statuses: Vec<u16> = upstream.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_idp_failures() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let http = client();
    let request = || {
        http.post(idp.token_url())
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[("grant_type", "client_credentials")])
    };

    idp.set_failure(Some(Failure::Status(503)));
    let resp = request().send().await.expect("status");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "server_error");
    assert_eq!(body["error_description"], "injected failure");

    idp.set_failure(Some(Failure::Garbage));
    let resp = request().send().await.expect("garbage");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "<html>oops");

    idp.set_failure(Some(Failure::Down));
    assert!(request().send().await.is_err());
    assert!(client().post(idp.token_url()).send().await.is_err());

    idp.set_failure(None);
    idp.set_ttl(Duration::from_millis(300));
    let resp = request().send().await.expect("healed");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["expires_in"], 1);
    assert_eq!(idp.calls(), 3);
    assert_eq!(idp.registry().issued_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_requires_token() {
    let (idp, upstream) = pair().await;
    let ws_url = format!("ws://{}/ws", upstream.addr());

    let err = tokio_tungstenite::connect_async(ws_url.as_str()).await;
    assert!(err.is_err());

    let token = fetch_token(&idp).await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut request = ws_url.as_str().into_client_request().expect("ws request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("ws connect");
    ws.send(WsMessage::text("ping")).await.expect("send");
    let echoed = ws.next().await.expect("echo").expect("echo ok");
    assert_eq!(echoed, WsMessage::text("ping"));
    ws.send(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    let echoed = ws.next().await.expect("echo").expect("echo ok");
    assert_eq!(echoed, WsMessage::binary(vec![1u8, 2, 3]));
    ws.close(None).await.expect("close");

    let statuses: Vec<u16> = upstream.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 101]);
}

#[tokio::test]
async fn slow_and_malformed_requests() {
    let upstream = MockUpstream::start(UpstreamConfig::open()).await;
    let http = client();
    let resp = http
        .get(format!("{}/slow?ms=20", upstream.url()))
        .send()
        .await
        .expect("slow");
    assert_eq!(resp.status(), 200);
    let resp = http
        .get(format!("{}/slow?ms=abc", upstream.url()))
        .send()
        .await
        .expect("slow");
    assert_eq!(resp.status(), 400);
    let resp = http
        .get(format!("{}/ws", upstream.url()))
        .header("upgrade", "websocket")
        .send()
        .await
        .expect("bad upgrade");
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

/// Polls `cond` (yielding, not sleeping) until it holds, for at most 5 s.
async fn eventually(mut cond: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cond().await {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let upstream = MockUpstream::start(UpstreamConfig::open()).await;
    let slow = tokio::spawn(
        client()
            .get(format!("{}/slow?ms=200", upstream.url()))
            .send(),
    );
    eventually(async || upstream.count() == 1).await;
    upstream.shutdown();
    let resp = slow.await.expect("join").expect("slow request");
    assert_eq!(resp.status(), 200);
    let addr = upstream.addr();
    eventually(async || tokio::net::TcpStream::connect(addr).await.is_err()).await;
}

#[test]
fn registry_expiry_and_revocation() {
    let registry = TokenRegistry::new();
    let expired = registry.issue(Duration::ZERO);
    assert!(!registry.is_valid(&expired));
    let huge = registry.issue(Duration::MAX);
    assert!(registry.is_valid(&huge));
    assert!(!registry.is_valid("tok_unknown"));
    registry.revoke_all();
    assert!(!registry.is_valid(&huge));
    let after = registry.issue(Duration::from_secs(60));
    assert!(registry.is_valid(&after));
    registry.set_reject_all(true);
    assert!(!registry.is_valid(&after));
    registry.set_reject_all(false);
    assert!(registry.is_valid(&after));
    assert_eq!(registry.issued_count(), 3);
}

#[tokio::test]
async fn password_refresh_rotation_and_json_login() {
    let idp = MockIdp::start(IdpConfig {
        users: vec![("alice".into(), "pw".into())],
        ..IdpConfig::default()
    })
    .await;
    let http = client();
    let grant = |form: Vec<(&'static str, String)>| {
        http.post(idp.token_url())
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&form)
            .send()
    };
    let first: Value = grant(vec![
        ("grant_type", "password".into()),
        ("username", "alice".into()),
        ("password", "pw".into()),
    ])
    .await
    .expect("password")
    .json()
    .await
    .expect("json");
    let rt1 = first["refresh_token"].as_str().expect("rt").to_owned();
    let second: Value = grant(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", rt1.clone()),
    ])
    .await
    .expect("refresh")
    .json()
    .await
    .expect("json");
    assert_ne!(second["refresh_token"].as_str(), Some(rt1.as_str()));
    // A spent refresh token is refused.
    let reused = grant(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", rt1),
    ])
    .await
    .expect("reuse");
    assert_eq!(reused.status(), 400);
    let body: Value = reused.json().await.expect("json");
    assert_eq!(body["error"], "invalid_grant");

    let login: Value = http
        .post(idp.login_url())
        .json(&serde_json::json!({"userName": "demo-user", "apiKey": "demo-api-key"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    assert_eq!(login["success"], true);
    let token = login["token"].as_str().expect("token").to_owned();
    assert!(idp.registry().is_valid(&token));
    let renewed: Value = http
        .post(idp.validate_url())
        .bearer_auth(&token)
        .send()
        .await
        .expect("validate")
        .json()
        .await
        .expect("json");
    assert!(idp
        .registry()
        .is_valid(renewed["newToken"].as_str().expect("newToken")));
    let refused: Value = http
        .post(idp.login_url())
        .json(&serde_json::json!({"userName": "demo-user", "apiKey": "nope"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    assert_eq!(refused["success"], false);
    let kinds: Vec<String> = idp.requests().into_iter().map(|r| r.grant_type).collect();
    assert_eq!(
        kinds,
        [
            "password",
            "refresh_token",
            "refresh_token",
            "json_login",
            "json_renew",
            "json_login"
        ]
    );
}
