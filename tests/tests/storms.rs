//! Refresh storms and hostile request headers: whatever clients, upstreams
//! and identity providers do, the identity provider is called at most once per `min_interval`
//! (and never inside the failure backoff), and no input panics the proxy.

mod support;

use std::time::{Duration, Instant};

use sidecar_mocks::{Failure, IdpConfig, MockIdp, MockUpstream, Scripted, UpstreamConfig};
use support::providers::cc_provider;
use support::{wait_until, Scratch, Sidecar};

/// A sidecar in front of `api` whose provider `main` uses the mock IdP; `refresh` is the
/// provider's refresh block, `extra` more top-level YAML.
async fn start(idp: &MockIdp, api: &MockUpstream, refresh: &str, extra: &str) -> Sidecar {
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n{extra}",
        cc_provider("main", idp, &format!("refresh: {refresh}")),
        api.url()
    );
    // The first token, before the test measures IdP calls.
    let sc = Sidecar::start_with_first_token(&yaml).await;
    sc
}

/// At most one call per `spacing` since `since`, plus the one a window may start with.
fn assert_spaced(calls: usize, since: Instant, spacing: Duration, what: &str, logs: &str) {
    let allowed = 1 + (since.elapsed().as_secs_f64() / spacing.as_secs_f64()).floor() as usize;
    eprintln!(
        "{what}: {calls} identity-provider calls in {:?}",
        since.elapsed()
    );
    assert!(
        calls <= allowed,
        "{what}: {calls} identity-provider calls in {:?}, at most {allowed} allowed\n{logs}",
        since.elapsed()
    );
}

#[tokio::test]
async fn an_upstream_refusing_every_token_costs_one_idp_call_per_min_interval() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let spacing = Duration::from_secs(1);
    let sc = start(
        &idp,
        &api,
        "{ min_interval: 1s, backoff: [1s] }",
        "replay: { wait_for_token: 300ms }",
    )
    .await;
    for _ in 0..400 {
        api.push_script(Scripted::status(401));
    }
    let client = reqwest::Client::new();
    let before = idp.calls();
    let since = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = client
            .get(sc.url(&format!("/loop/{i}")))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 503),
        "{statuses:?}"
    );
    assert_spaced(
        idp.calls() - before,
        since,
        spacing,
        "client loop against a refusing upstream",
        &sc.logs(),
    );
    // Manual refreshes in a loop are spaced the same way.
    let before = idp.calls();
    let since = Instant::now();
    for _ in 0..4 {
        sc.admin_post("/v1/token/refresh?provider=main").await;
    }
    assert_spaced(
        idp.calls() - before,
        since,
        spacing,
        "POST /v1/token/refresh loop",
        &sc.logs(),
    );
}

const BORN_DEAD: &str = "eyJhbGciOiJub25lIn0.eyJleHAiOjk0NjY4NDgwMH0.c2ln";

#[tokio::test]
async fn tokens_born_expired_count_as_failures_and_back_off() {
    // An identity provider (here a command) whose tokens have already expired when they arrive.
    let dir = Scratch::new("born-expired");
    let calls = dir.path("calls");
    let script = dir.path("get-token.sh");
    std::fs::write(
        &script,
        format!(
            // A JWT whose `exp` is 2000-01-01, printed as a bare token line.
            "#!/bin/sh\necho x >> {}\necho {BORN_DEAD}\n",
            calls.display()
        ),
    )
    .unwrap();
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        r#"providers:
  main:
    type: exec
    command: ["/bin/sh", "{}"]
    refresh: {{ min_interval: 0s, backoff: [500ms] }}
upstreams:
  - {{ name: api, url: "{}", provider: main }}
"#,
        script.display(),
        api.url()
    );
    let since = Instant::now();
    let sc = Sidecar::start(&yaml).await;
    let count = || {
        std::fs::read_to_string(&calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    // Observed: the second call comes after a backoff, not at once.
    wait_until(
        Duration::from_secs(10),
        || async { count() >= 3 },
        || format!("fewer than 3 calls\n{}", sc.logs()),
    )
    .await;
    assert_spaced(
        count(),
        since,
        Duration::from_millis(400),
        "tokens born expired",
        &sc.logs(),
    );
    let status = sc.admin_text("/v1/token/status").await;
    assert!(status.contains("already expired"), "{status}");
    assert!(!status.contains(BORN_DEAD), "{status}");
}

#[tokio::test]
async fn a_rejected_request_whose_refresh_fails_gets_503_token_unavailable() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let sc = start(
        &idp,
        &api,
        "{ min_interval: 0s, backoff: [200ms] }",
        "replay: { wait_for_token: 1s }",
    )
    .await;
    idp.set_failure(Some(Failure::Status(500)));
    idp.registry().revoke_all();
    let before = idp.calls();
    let r = reqwest::Client::new()
        .get(sc.url("/doc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", sc.logs());
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable", "{body}");
    // It kept trying within wait_for_token (backoff 200 ms), not once.
    assert!(idp.calls() - before >= 2, "{} calls", idp.calls() - before);
    // The identity provider back: the same request succeeds.
    idp.set_failure(None);
    wait_until(
        Duration::from_secs(10),
        || async {
            reqwest::get(sc.url("/doc"))
                .await
                .is_ok_and(|r| r.status() == 200)
        },
        || sc.logs(),
    )
    .await;
}

#[tokio::test]
async fn out_of_range_expected_durations_are_400_not_panics() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let sc = start(&idp, &api, "{ min_interval: 0s }", "").await;
    let client = reqwest::Client::new();
    for value in [
        "400000000000y",
        "18446744073709551615s",
        "101y",
        "-5s",
        "3 parsecs",
    ] {
        let r = client
            .get(sc.url("/long"))
            .header("x-sidecar-expected-duration", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{value}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "bad_request", "{value}");
    }
    let ok = client
        .get(sc.url("/long"))
        .header("x-sidecar-expected-duration", "10m")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let logs = sc.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
