//! What the sidecar tells its operators, through the real binary: Prometheus text on
//! `/metrics` that moves with traffic and refreshes and carries no path, ID or secret in a label;
//! JSON logs with one access line per request and no token; `log.access_log` on and off.

mod support;

use std::time::Duration;

use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::logs::{access_lines, json_lines};
use support::metrics::{parse_value, scrape, wait_reloads};
use support::providers::{cc_provider, provider_status};
use support::{get_status, rewrite, wait_until, Sidecar};

/// A mock IdP, an upstream that accepts only its tokens, and a sidecar with provider `main` and
/// the upstream `api` on `/api`, plus `extra` YAML.
async fn main_stack(extra: &str) -> (MockIdp, MockUpstream, Sidecar) {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main, match: {{ path_prefix: /api }} }}\n{extra}",
        cc_provider("main", &idp, "scopes: [read]"),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    (idp, api, sc)
}

#[tokio::test]
async fn metrics_are_prometheus_text_that_moves_with_traffic_and_refreshes() {
    let (_idp, api, sc) = main_stack("").await;
    sc.wait_status(Duration::from_secs(10), |v| {
        provider_status(v, "main")["generation"] == 1
    })
    .await;
    let before = scrape(&sc).await;
    let ok = [("upstream", "api"), ("method", "GET"), ("status", "200")];
    let client = reqwest::Client::new();
    for id in 0..5 {
        let url = sc.url(&format!("/api/orders/{}?customer=c-{id}", 917_000 + id));
        assert_eq!(get_status(&client, url).await, 200);
    }
    assert_eq!(get_status(&client, sc.url("/unrouted/4242")).await, 404);
    let r = sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_eq!(r.status(), 200);
    let after = scrape(&sc).await;

    let moved =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(moved("sidecar_requests_total", &ok), 5.0);
    assert_eq!(moved("sidecar_requests_total", &[("status", "404")]), 1.0);
    let buckets = "sidecar_request_duration_seconds_bucket";
    assert_eq!(moved(buckets, &[("upstream", "api"), ("le", "+Inf")]), 5.0);
    assert_eq!(
        moved(
            "sidecar_request_duration_seconds_count",
            &[("upstream", "api")]
        ),
        5.0
    );
    let refresh = [
        ("provider", "main"),
        ("trigger", "manual"),
        ("result", "success"),
    ];
    assert_eq!(moved("sidecar_token_refresh_total", &refresh), 1.0);
    assert_eq!(
        after.sum(
            "sidecar_token_refresh_total",
            &[("provider", "main"), ("trigger", "initial")]
        ),
        1.0
    );
    assert_eq!(
        after
            .types
            .get("sidecar_requests_total")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        after
            .types
            .get("sidecar_request_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    // Buckets suited to a proxy: the smallest is at most 100 µs.
    let smallest = after
        .samples
        .iter()
        .filter(|s| s.name == buckets)
        .filter_map(|s| parse_value(&s.labels["le"]).ok())
        .fold(f64::INFINITY, f64::min);
    assert!(smallest <= 0.0001, "smallest bucket {smallest}");

    // No label carries a raw path, an ID, a query, a token or a secret.
    let tokens: Vec<String> = api.requests().into_iter().filter_map(|r| r.token).collect();
    assert!(!tokens.is_empty());
    for s in &after.samples {
        for (k, v) in &s.labels {
            let bad = v.contains('/')
                || v.contains('?')
                || v.contains("917")
                || v.contains("4242")
                || v.contains("demo-secret")
                || tokens.iter().any(|t| v.contains(t.as_str()));
            // Shown with any token masked.
            let shown = tokens
                .iter()
                .fold(v.replace("demo-secret", "<secret>"), |v, t| {
                    v.replace(t.as_str(), "<token>")
                });
            assert!(!bad, "label {k}={shown:?} on {}", s.name);
        }
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_an_access_line_per_request_and_no_token() {
    let (_idp, api, sc) = main_stack("log: { format: json }\n").await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/api/items")).await, 200);
    let r = client
        .post(sc.url("/api/items"))
        .header("authorization", "Bearer the-clients-own")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_status(&client, sc.url("/nowhere")).await, 404);
    sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_eq!(get_status(&client, sc.url("/api/again")).await, 200);

    wait_until(
        Duration::from_secs(10),
        || async { access_lines(&json_lines(&sc.logs())).len() >= 4 },
        || format!("fewer than 4 access lines\n{}", sc.logs()),
    )
    .await;
    let lines = json_lines(&sc.logs());
    let access = access_lines(&lines);
    assert_eq!(access.len(), 4, "{lines:#?}");
    for l in &access {
        for field in [
            "method",
            "upstream",
            "status",
            "duration_ms",
            "attempts",
            "replayed",
            "generation",
        ] {
            assert!(l.contains_key(field), "no {field} in {l:?}");
        }
        assert!(l.contains_key("path") || l.contains_key("route"), "{l:?}");
    }
    let line = |method: &str, path: &str| {
        access
            .iter()
            .find(|l| l["method"] == method && l["path"] == path)
            .unwrap_or_else(|| panic!("no access line for {method} {path}: {access:#?}"))
    };
    let get = line("GET", "/api/items");
    assert_eq!(get["status"], 200);
    assert_eq!(get["upstream"], "api");
    assert_eq!(get["generation"], 1);
    assert_eq!(get["attempts"], 1);
    assert_eq!(get["replayed"], 0);
    assert_eq!(line("POST", "/api/items")["status"], 200);
    assert_eq!(line("GET", "/nowhere")["status"], 404);
    assert_eq!(line("GET", "/api/again")["generation"], 2);
    // Refresh events say what triggered them.
    let refreshes: Vec<_> = lines
        .iter()
        .filter(|l| l.get("message").and_then(|m| m.as_str()) == Some("token refreshed"))
        .map(|l| l["trigger"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(refreshes, ["initial", "manual"], "{lines:#?}");

    let logs = sc.logs();
    let tokens: Vec<String> = api.requests().into_iter().filter_map(|r| r.token).collect();
    assert_eq!(tokens.len(), 3);
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token is in the log");
    }
    assert!(!logs.contains("demo-secret") && !logs.contains("the-clients-own"));
}

#[tokio::test]
async fn access_log_false_turns_access_lines_off_and_a_reload_turns_them_on() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = |on: bool| {
        format!(
            "upstreams:\n  - {{ name: api, url: \"{}\" }}\nlog: {{ format: json, access_log: {on} }}\n",
            api.url()
        )
    };
    let sc = Sidecar::start(&yaml(false)).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(get_status(&client, sc.url("/quiet")).await, 200);
    }
    assert_eq!(api.count(), 3);
    assert!(
        access_lines(&json_lines(&sc.logs())).is_empty(),
        "{}",
        sc.logs()
    );

    rewrite(&sc, &yaml(true), true);
    wait_reloads(&sc, "success", 1).await;
    assert_eq!(get_status(&client, sc.url("/loud")).await, 200);
    wait_until(
        Duration::from_secs(10),
        || async { !access_lines(&json_lines(&sc.logs())).is_empty() },
        || format!("no access line\n{}", sc.logs()),
    )
    .await;
    let lines = json_lines(&sc.logs());
    let access = access_lines(&lines);
    assert_eq!(access.len(), 1, "{lines:#?}");
    assert_eq!(access[0]["path"], "/loud");
    // A request id is made up only for an access line: none went upstream while they were off,
    // and the logged one did.
    let ids: Vec<Option<String>> = api
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").map(str::to_owned))
        .collect();
    assert_eq!(ids[..3], [None, None, None], "{ids:?}");
    assert_eq!(
        ids[3].as_deref(),
        access[0]["request_id"].as_str(),
        "{ids:?}"
    );
    assert_eq!(ids[3].as_ref().map(String::len), Some(32), "{ids:?}");
}

/// `log.access_log: false` should silence every access line, also those of answers the sidecar
/// gives itself (404 no_route, 429 rate_limited, ...), and a rate-limited request belongs to the
/// upstream it matched.
#[tokio::test]
async fn access_log_false_also_silences_local_answers() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&format!(
        "upstreams:\n  - {{ name: api, url: \"{}\", match: {{ path_prefix: /api }} }}\nrate_limits:\n  - {{ name: one, upstream: api, rate: 1/60s, burst: 1, mode: reject }}\nlog: {{ format: json, access_log: false }}\n",
        api.url()
    ))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/api/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/api/b")).await, 429);
    assert_eq!(get_status(&client, sc.url("/elsewhere")).await, 404);
    let counted = scrape(&sc).await.sum(
        "sidecar_requests_total",
        &[("upstream", "api"), ("status", "429")],
    );
    let lines = json_lines(&sc.logs());
    let access = access_lines(&lines);
    assert!(
        counted == 1.0 && access.is_empty(),
        "429s counted for upstream api: {counted}; access lines: {access:#?}"
    );
}
