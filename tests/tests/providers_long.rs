//! Long operations through the real binary: `X-Sidecar-Expected-Duration` and
//! `POST /v1/token/ensure` need a token that outlives the operation, and never storm the IdP.

mod support;

use std::time::Duration;

use sidecar_mocks::{Failure, MockUpstream, UpstreamConfig};
use support::providers::{
    cc_provider, force_refresh, healthy, idp_ttl, provider_status, through, token_of, wait_tokens,
    HOUR, REFRESH,
};
use support::Sidecar;

#[tokio::test]
async fn expected_duration_header_needs_one_and_a_half_times_the_ttl_and_is_not_forwarded() {
    let idp = idp_ttl(5 * HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        cc_provider("main", &idp, REFRESH),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    let long = |path: &str, value: &str| {
        client
            .get(sc.url(path))
            .header("X-Sidecar-Expected-Duration", value)
            .send()
    };

    // 5 h tokens cover 1.5 × 3 h.
    let r = long("/report", "3h").await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = api.requests().pop().unwrap();
    assert!(idp.registry().is_valid(seen.token.as_deref().unwrap()));
    assert_eq!(seen.header("x-sidecar-expected-duration"), None);
    assert!(!seen.headers.iter().any(|(n, _)| n.starts_with("x-sidecar")));

    // The IdP now issues 2 h tokens: a 3 h operation cannot be covered, even after a refresh.
    idp.set_ttl(2 * HOUR);
    force_refresh(&sc, "main").await;
    let count = api.count();
    let r = long("/report", "3h").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable", "{body}");
    assert_eq!(
        api.count(),
        count,
        "the request must not reach the upstream"
    );
    // A shorter operation fits (1.5 × 1 h < 2 h), and plain requests are unaffected.
    assert_eq!(long("/short", "1h").await.unwrap().status(), 200);
    assert_eq!(
        api.requests()
            .pop()
            .unwrap()
            .header("x-sidecar-expected-duration"),
        None
    );
    through(&sc, &api, "/plain").await;

    // Back to 5 h tokens: the held 2 h one is not enough, so the sidecar refreshes first.
    idp.set_ttl(5 * HOUR);
    let calls = idp.calls();
    let held = token_of(&api.requests().pop().unwrap());
    let r = long("/report", "3h").await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    assert_eq!(idp.calls(), calls + 1);
    let seen = api.requests().pop().unwrap();
    assert_ne!(token_of(&seen), held);
    assert!(idp.registry().is_valid(&token_of(&seen)));
    assert_eq!(seen.header("x-sidecar-expected-duration"), None);

    // A value that is not a duration.
    for bad in ["three hours", "-3h", ""] {
        let count = api.count();
        let r = long("/report", bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "bad_request");
        assert_eq!(api.count(), count);
    }
    healthy(&sc).await;
}

#[tokio::test]
async fn ensure_answers_200_when_the_ttl_can_be_had_and_503_when_not() {
    let long_idp = idp_ttl(5 * HOUR).await;
    let short_idp = idp_ttl(2 * HOUR).await;
    let yaml = format!(
        "providers:\n{}{}",
        cc_provider("long", &long_idp, REFRESH),
        cc_provider("short", &short_idp, REFRESH)
    );
    let sc = Sidecar::start(&yaml).await;
    wait_tokens(&sc, &["long", "short"]).await;
    let client = reqwest::Client::new();
    let ensure = |query: &str| {
        client
            .post(sc.admin_url(&format!("/v1/token/ensure?{query}")))
            .send()
    };

    let r = ensure("provider=long&min_ttl=3h").await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let status: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status["provider"], "long");
    assert!(status["ttl_seconds"].as_f64().unwrap() >= 3.0 * 3600.0);
    assert_eq!(long_idp.calls(), 1, "the held token was enough");

    let r = ensure("provider=short&min_ttl=3h").await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(short_idp.calls(), 2, "ensure refreshes first");
    // The short provider's token still serves what fits.
    assert_eq!(
        ensure("provider=short&min_ttl=1h").await.unwrap().status(),
        200
    );

    // When the IdP starts issuing longer tokens, ensure gets one.
    short_idp.set_ttl(4 * HOUR);
    let r = ensure("provider=short&min_ttl=3h").await.unwrap();
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json().await.unwrap();
    assert!(status["ttl_seconds"].as_f64().unwrap() >= 3.0 * 3600.0);

    let r = ensure("provider=nope&min_ttl=3h").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        ensure("provider=long&min_ttl=soon").await.unwrap().status(),
        400
    );
    assert_eq!(ensure("provider=long").await.unwrap().status(), 400);
    healthy(&sc).await;
}

#[tokio::test]
async fn long_operations_never_storm_the_idp() {
    // Spaced: 2 h tokens with min_interval 30 min (the cap: a quarter of the lifetime).
    let short_idp = idp_ttl(2 * HOUR).await;
    // Failing: every answer is a 500; the backoff after it is an hour.
    let failing_idp = idp_ttl(5 * HOUR).await;
    failing_idp.set_failure(Some(Failure::Status(500)));
    let api = MockUpstream::start(UpstreamConfig::checking(short_idp.registry())).await;
    let yaml = format!(
        r#"providers:
  spaced:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh: {{ min_interval: 1h }}
  failing:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh: {{ backoff: [1h] }}
upstreams:
  - {{ name: api, url: "{}", provider: spaced }}
"#,
        short_idp.token_url(),
        failing_idp.token_url(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    wait_tokens(&sc, &["spaced"]).await;
    sc.wait_status(Duration::from_secs(15), |v| {
        provider_status(v, "failing")["refresh_failed"] == 1
    })
    .await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let r = client
            .get(sc.url("/report"))
            .header("X-Sidecar-Expected-Duration", "3h")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let r = client
            .post(sc.admin_url("/v1/token/ensure?provider=spaced&min_ttl=3h"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let r = client
            .post(sc.admin_url("/v1/token/ensure?provider=failing&min_ttl=3h"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("injected failure"),
            "{body}"
        );
    }
    assert_eq!(short_idp.calls(), 1, "a refresh per long operation");
    assert_eq!(failing_idp.calls(), 1, "ensure ignored the failure backoff");
    // Requests that fit the held token are unaffected.
    through(&sc, &api, "/plain").await;
    assert_eq!(
        client
            .get(sc.url("/short"))
            .header("X-Sidecar-Expected-Duration", "1h")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    healthy(&sc).await;
}
