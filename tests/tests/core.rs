//! End-to-end tests of the core sidecar: the real binary between a mock identity provider and a
//! mock upstream on loopback.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sidecar_mocks::{Failure, IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::{open_stack, run_cli, wait_until, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider_yaml(idp: &MockIdp, extra: &str) -> String {
    format!(
        r#"providers:
  main:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh: {{ skew: 0s, min_interval: 200ms, backoff: [200ms] }}
{extra}"#,
        idp.token_url()
    )
}

async fn idp_with(ttl: Duration, latency: Duration) -> MockIdp {
    MockIdp::start(IdpConfig {
        ttl,
        latency,
        ..IdpConfig::default()
    })
    .await
}

/// The usual line-up: a mock IdP (`ttl`, `latency`), an upstream that accepts only its tokens,
/// and a sidecar with provider `main` and the upstream list item `item` (`{api}` stands for the
/// upstream's URL), plus `extra` YAML.
async fn stack(
    ttl: Duration,
    latency: Duration,
    item: &str,
    extra: &str,
) -> (MockIdp, MockUpstream, Sidecar) {
    let idp = idp_with(ttl, latency).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "{}upstreams:\n  - {}\n{extra}",
        provider_yaml(&idp, ""),
        item.replace("{api}", &api.url())
    );
    let sc = Sidecar::start(&yaml).await;
    (idp, api, sc)
}

/// Sends raw bytes and returns the status code of the answer.
async fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn injects_the_token_and_overwrites_the_clients() {
    let (idp, api, sc) = stack(Duration::from_secs(3600), Duration::ZERO, "{ name: api, url: \"{api}/base\", provider: main, match: { path_prefix: /api, strip_prefix: true } }", "").await;
    let client = reqwest::Client::new();
    let r = client
        .get(sc.url("/api/orders?page=2"))
        .header("authorization", "Bearer client-own-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    let token = seen[0].token.clone().expect("a token reached the upstream");
    assert_ne!(token, "client-own-token");
    assert!(idp.registry().is_valid(&token));
    assert_eq!(seen[0].path, "/base/orders");
    assert_eq!(seen[0].query.as_deref(), Some("page=2"));
    assert_eq!(
        seen[0].header("host"),
        Some(api.addr().to_string().as_str())
    );
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn route_without_provider_passes_through_untouched() {
    let idp = idp_with(Duration::from_secs(3600), Duration::ZERO).await;
    let open = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "{}upstreams:\n  - {{ name: open, url: \"{}\" }}\n",
        provider_yaml(&idp, ""),
        open.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    let r = client
        .get(sc.url("/x"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(sc.url("/y")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = open.requests();
    assert_eq!(seen[0].header("authorization"), Some("Basic abc"));
    assert_eq!(seen[1].header("authorization"), None);
}

#[tokio::test]
async fn client_authorization_keep_and_reject() {
    let idp = idp_with(Duration::from_secs(3600), Duration::ZERO).await;
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "{}upstreams:\n  - {{ name: keep, url: \"{u}\", provider: main, match: {{ path_prefix: /keep }}, client_authorization: keep }}\n  - {{ name: rej, url: \"{u}\", provider: main, match: {{ path_prefix: /rej }}, client_authorization: reject }}\n",
        provider_yaml(&idp, ""),
        u = api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    let r = client
        .get(sc.url("/keep/a"))
        .header("authorization", "Bearer mine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        api.requests()[0].header("authorization"),
        Some("Bearer mine")
    );
    let r = client
        .get(sc.url("/rej/a"))
        .header("authorization", "Bearer mine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "client_authorization");
    assert_eq!(
        api.count(),
        1,
        "the rejected request must not reach the upstream"
    );
    // Without a header of its own the same route injects.
    let r = client.get(sc.url("/rej/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(api.requests()[1]
        .token
        .as_deref()
        .is_some_and(|t| idp.registry().is_valid(t)));
}

#[tokio::test]
async fn query_injection_replaces_the_clients_value_and_stays_out_of_logs() {
    let (_idp, api, sc) = stack(
        Duration::from_secs(3600),
        Duration::ZERO,
        "{ name: hub, url: \"{api}\", provider: main, inject: { header: null, query: access_token } }",
        "log: { level: debug }\n",
    )
    .await;
    let r = reqwest::get(sc.url("/hub/negotiate?access_token=fake&x=1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = &api.requests()[0];
    assert_eq!(seen.header("authorization"), None);
    let token = seen.token.clone().unwrap();
    assert!(seen.query.as_deref().unwrap().contains("x=1"));
    assert!(!seen.query.as_deref().unwrap().contains("fake"));
    let logs = sc.logs();
    // The offending lines are shown with the token itself masked.
    let leaks: Vec<String> = logs
        .lines()
        .filter(|l| l.contains(&token))
        .map(|l| l.replace(&token, "<token>"))
        .collect();
    assert!(leaks.is_empty(), "token leaked into logs: {leaks:#?}");
}

#[tokio::test]
async fn three_second_tokens_under_ten_seconds_of_traffic_never_401() {
    let (idp, api, sc) = stack(
        Duration::from_secs(3),
        Duration::from_millis(20),
        "{ name: api, url: \"{api}\", provider: main }",
        "",
    )
    .await;
    let client = reqwest::Client::new();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let (mut ok, mut bad) = (0, 0);
    while std::time::Instant::now() < end {
        let r = client.get(sc.url("/ping")).send().await.unwrap();
        if r.status() == 200 {
            ok += 1;
        } else {
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{ok} ok, {bad} failed\n{}", sc.logs());
    assert!(ok > 100, "only {ok} requests");
    // Refreshes at half-life: about 7 in 10 s; never one per request.
    let calls = idp.calls();
    assert!((4..=12).contains(&calls), "{calls} IdP calls");
    let tokens: std::collections::HashSet<_> =
        api.requests().into_iter().filter_map(|r| r.token).collect();
    assert!(tokens.len() >= 4, "tokens did not rotate: {}", tokens.len());
    // No token value anywhere in the logs.
    let logs = sc.logs();
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "token leaked into logs");
    }
    assert!(!logs.contains("demo-secret"));
}

#[tokio::test]
async fn two_hundred_concurrent_requests_before_the_first_token_make_one_idp_call() {
    let (idp, _api, sc) = stack(
        Duration::from_secs(3600),
        Duration::from_millis(1500),
        "{ name: api, url: \"{api}\", provider: main }",
        "replay: { max_waiting: 500 }\n",
    )
    .await;
    // The first token is still being fetched (the IdP takes 1.5 s).
    let status = reqwest::get(sc.admin_url("/readyz"))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 503);
    let client = reqwest::Client::new();
    let all = futures::future::join_all((0..200).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/item/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    let ok = all.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(ok, 200, "{all:?}");
    assert_eq!(idp.calls(), 1);
    assert_eq!(
        reqwest::get(sc.admin_url("/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn idp_down_gives_503_within_the_wait_bound_then_recovers() {
    let idp = idp_with(Duration::from_secs(3600), Duration::ZERO).await;
    idp.set_failure(Some(Failure::Down));
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\nreplay: {{ wait_for_token: 1s }}\n",
        provider_yaml(&idp, ""),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    // The IdP stays down throughout, so only the sidecar's wait bound can end this wait; the
    // limit here only catches a wait that never ends.
    let r = tokio::time::timeout(Duration::from_secs(60), reqwest::get(sc.url("/x")))
        .await
        .unwrap_or_else(|_| panic!("the wait for a token never ended\n{}", sc.logs()))
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    // It waited the configured bound (1 s), not the default (10 s).
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("within 1s"), "{message}");
    assert_eq!(support::metrics::waiting_requests(&sc).await, 0.0);
    assert_eq!(api.count(), 0);
    let ready = reqwest::get(sc.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.unwrap();
    assert!(reason.contains("main"), "{reason}");

    idp.set_failure(None);
    let client = reqwest::Client::new();
    wait_until(
        Duration::from_secs(10),
        || async { client.get(sc.url("/x")).send().await.unwrap().status() == 200 },
        || format!("no recovery after the IdP came back\n{}", sc.logs()),
    )
    .await;
}

#[tokio::test]
async fn forbidden_targets_and_unmatched_paths_never_leave() {
    let idp = idp_with(Duration::from_secs(3600), Duration::ZERO).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let elsewhere = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main, match: {{ path_prefix: /api }} }}\n",
        provider_yaml(&idp, ""),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let other = elsewhere.addr();
    let absolute = format!(
        "GET http://evil.example:{p}/api/x HTTP/1.1\r\nHost: evil.example:{p}\r\n\r\n",
        p = other.port()
    );
    assert_eq!(raw_status(sc.listen, &absolute).await, 403);
    // The configured upstream's host on another port is another target.
    let other_port = format!("GET http://{other}/api/x HTTP/1.1\r\nHost: {other}\r\n\r\n");
    assert_eq!(raw_status(sc.listen, &other_port).await, 403);
    let connect = format!("CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n");
    assert_eq!(raw_status(sc.listen, &connect).await, 403);
    let r = reqwest::get(sc.url("/other")).await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    assert_eq!(api.count(), 0);
    assert_eq!(elsewhere.count(), 0);
}

#[tokio::test]
async fn websocket_upgrade_carries_the_token_and_echoes() {
    let (idp, api, sc) = stack(
        Duration::from_secs(3600),
        Duration::ZERO,
        "{ name: api, url: \"{api}\", provider: main }",
        "",
    )
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", sc.listen))
        .await
        .expect("websocket through the sidecar");
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("hello"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hello");
    let seen = api.requests();
    // The upgrade went through, carrying a token the IdP issued.
    assert!(seen.iter().any(|r| r.path == "/ws"
        && r.status == 101
        && r.token
            .as_deref()
            .is_some_and(|t| idp.registry().is_valid(t))));
}

#[tokio::test]
async fn upstream_unreachable_and_timeout_are_json_errors() {
    let idp = idp_with(Duration::from_secs(3600), Duration::ZERO).await;
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let dead = support::free_port();
    let yaml = format!(
        "{}upstreams:\n  - {{ name: dead, url: \"http://127.0.0.1:{dead}\", match: {{ path_prefix: /dead }} }}\n  - {{ name: slow, url: \"{}\", match: {{ path_prefix: /slow }}, timeouts: {{ read: 300ms }} }}\n",
        provider_yaml(&idp, ""),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let r = reqwest::get(sc.url("/dead/x")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "upstream_unreachable"
    );
    let r = reqwest::get(sc.url("/slow?ms=3000")).await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "upstream_timeout"
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits() {
    let (api, mut sc) = open_stack("shutdown_grace: 20s\n").await;
    let url = sc.url("/slow?ms=1500");
    let inflight =
        tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) });
    // Wait until the upstream has the request, then ask the sidecar to stop.
    wait_until(
        Duration::from_secs(5),
        || async { api.count() >= 1 },
        || "the request never reached the upstream".to_owned(),
    )
    .await;
    assert_eq!(api.count(), 1);
    sc.signal("TERM");
    assert_eq!(inflight.await.unwrap().unwrap(), 200);
    // Exits once the last request is done, long before the 20 s grace.
    let status = sc
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("did not exit after draining");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn sigterm_on_an_idle_sidecar_exits_at_once() {
    let (_api, mut sc) = open_stack("shutdown_grace: 60s\n").await;
    sc.signal("TERM");
    // Far less than the 60 s grace: an idle sidecar does not wait for it.
    let status = sc
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("idle sidecar kept waiting");
    assert!(status.success());
}

#[tokio::test]
async fn status_and_manual_refresh_never_show_the_token() {
    let (_idp, api, sc) = stack(
        Duration::from_secs(3600),
        Duration::ZERO,
        "{ name: api, url: \"{api}\", provider: main }",
        "",
    )
    .await;
    reqwest::get(sc.url("/a")).await.unwrap();
    let first_token = api.requests()[0].token.clone().unwrap();
    let r = sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["generation"], 2);
    assert_eq!(status["state"], "valid");
    assert!(status["fingerprint"].as_str().unwrap().len() == 8);
    reqwest::get(sc.url("/b")).await.unwrap();
    let second_token = api.requests()[1].token.clone().unwrap();
    assert_ne!(first_token, second_token);
    let all = sc.admin_text("/v1/token/status").await;
    for t in [&first_token, &second_token] {
        assert!(!text.contains(t.as_str()) && !all.contains(t.as_str()));
    }
    let metrics = sc.admin_text("/metrics").await;
    assert!(metrics.contains("sidecar_token_refresh_total"), "{metrics}");
    assert!(!metrics.contains(first_token.as_str()));
}

#[test]
fn check_prints_redacted_config_or_a_located_error() {
    let dir = support::Scratch::new("check");
    let good = dir.path("good.yaml");
    std::fs::write(
        &good,
        "providers:\n  p: { type: oauth2_client_credentials, token_url: \"http://127.0.0.1:1/t\", client_id: c, client_secret: \"${env:CHECK_TEST_SECRET}\" }\nupstreams:\n  - { name: a, url: \"http://127.0.0.1:2\", provider: p }\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(
        &["check", "-c", good.to_str().unwrap()],
        &[("CHECK_TEST_SECRET", "sup3r-s3cret")],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("<redacted>") && !out.contains("sup3r-s3cret"),
        "{}",
        out.replace("sup3r-s3cret", "<THE SECRET>")
    );
    let bad = dir.path("bad.yaml");
    std::fs::write(
        &bad,
        "upstreams:\n  - name: a\n    url: http://x\n    provdier: p\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{}:4:", bad.display())), "{err}");
    let (code, _, err) = run_cli(&["check", "-c", good.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "a missing ${{env:}} reference is an error");
    assert!(err.contains("CHECK_TEST_SECRET"), "{err}");
}

#[test]
fn keygen_prints_a_32_byte_key() {
    let (code, out, _) = run_cli(&["keygen"], &[]);
    assert_eq!(code, 0);
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(out.trim())
        .unwrap();
    assert_eq!(key.len(), 32);
    let (_, again, _) = run_cli(&["keygen"], &[]);
    assert_ne!(out, again);
}

#[test]
fn demo_runs_its_script_and_every_step_succeeds() {
    let listen = format!("127.0.0.1:{}", support::free_port());
    let admin = format!("127.0.0.1:{}", support::free_port());
    let (code, out, err) = run_cli(
        &[
            "demo",
            "--exit",
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("60 answered 200, 0 did not"), "{out}");
    assert!(out.contains("50/50 answered 200"), "{out}");
    assert!(out.contains("made 1 identity-provider call(s)"), "{out}");
    assert!(out.contains("got 429 rate_limited"), "{out}");
    // The number of 401s depends on timing: the demo says how many it saw, not "fifty".
    let rejected: usize = out
        .split(" of them reached the API with the revoked token and got 401")
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of 401s: {out}"));
    assert!((1..=50).contains(&rejected), "{out}");
    // Under --exit it ends: no "keeps serving … Ctrl-C".
    assert!(out.contains("--exit: the demo ends here."), "{out}");
    assert!(
        !out.contains("keeps serving") && !out.contains("Ctrl-C"),
        "{out}"
    );
}

#[tokio::test]
async fn expected_duration_header_is_never_forwarded_even_without_a_provider() {
    let (open, sc) = open_stack("").await;
    let r = reqwest::Client::new()
        .get(sc.url("/x"))
        .header("x-sidecar-expected-duration", "3h")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        open.requests()[0].header("x-sidecar-expected-duration"),
        None
    );
}

#[tokio::test]
async fn error_logs_never_print_query_strings() {
    // Pingora's own error lines summarise the request; a browser client may carry a token in
    // the query (SignalR), so the summary must not include it.
    let dead = support::free_port();
    let sc = Sidecar::start(&format!(
        "upstreams:\n  - {{ name: dead, url: \"http://127.0.0.1:{dead}\" }}\nretry: {{ backoff: [10ms] }}\n"
    ))
    .await;
    let r = reqwest::get(sc.url("/hub?access_token=query-secret-from-client"))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    sc.wait_log_line(&["/hub", "status=502"]).await;
    let logs = sc.logs();
    assert!(
        !logs.contains("query-secret-from-client"),
        "{}",
        logs.replace("query-secret-from-client", "<THE SECRET>")
    );
}

/// The value of `name{labels…}` in Prometheus text, 0 when absent (no sample yet).
fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `sidecar_upstream_duration_seconds` is a histogram per upstream with one sample
/// per attempt that got an answer, measuring the upstream's part: a 503 retried once is two
/// samples, and an upstream that takes 300 ms to answer adds at least that.
#[tokio::test]
async fn upstream_duration_is_recorded_per_attempt() {
    use sidecar_mocks::Scripted;
    let (api, sc) = open_stack("").await;
    let name = "sidecar_upstream_duration_seconds";
    let before = sc.admin_text("/metrics").await;
    assert!(
        before.contains(&format!("# TYPE {name} histogram")),
        "{name} is not a histogram:\n{before}"
    );
    let count = |m: &str| sample(m, &format!("{name}_count"), "upstream=\"api\"");
    let sum = |m: &str| sample(m, &format!("{name}_sum"), "upstream=\"api\"");
    api.push_script(Scripted::status(503));
    api.push_script(Scripted::status(200).with_delay(Duration::from_millis(300)));
    let r = reqwest::get(sc.url("/items")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api.count(), 2, "one transient retry");
    let after = sc.admin_text("/metrics").await;
    assert_eq!(count(&after) - count(&before), 2.0, "{after}");
    assert!(sum(&after) - sum(&before) >= 0.3, "{after}");
}
