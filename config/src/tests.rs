use super::*;

const FULL: &str = r#"
listen: "127.0.0.1:8080"
admin_listen: "127.0.0.1:9901"
shutdown_grace: 5s
providers:
  main:
    type: oauth2_client_credentials
    token_url: "https://idp.example.com/oauth2/token"
    client_id: "my-client"
    client_secret: "${env:SIDECAR_TEST_CLIENT_SECRET}"
    scopes: ["api.read"]
    params: { audience: "https://api.example.com" }
    refresh:
      before_expiry: 30m
      jitter: 10%
      skew: 30s
      min_interval: 5s
      backoff: [30s, 60s, 120s, 300s]
  fixed:
    type: static
    token: "abc"
upstreams:
  - name: api
    url: "https://api.example.com/v2/"
    provider: main
    match: { path_prefix: "/api/", strip_prefix: true }
    inject: { header: Authorization, scheme: Bearer }
    client_authorization: overwrite
    replay: true
    timeouts: { connect: 5s, read: 60s, idle: 90s }
    tls: { ca_file: null, server_name: null }
    expiry:
      statuses: [401]
      body_patterns: ["Token Is Expired"]
      body_statuses: [401, 403]
  - name: hub
    url: "http://127.0.0.1:9000"
    provider: fixed
    match: { host: "Hub.Local" }
    inject: { header: null, query: access_token }
replay:
  max_attempts: 3
  max_body: 1MiB
  idempotent_methods: [GET, HEAD, OPTIONS, PUT, DELETE]
  idempotency_header: Idempotency-Key
  wait_for_token: 10s
  max_waiting: 100
retry:
  statuses: [502, 503, 504]
  backoff: [100ms, 500ms, 2s]
  respect_retry_after: true
  max_retry_after: 30s
log: { level: info, format: json }
"#;

fn with_secret() {
    std::env::set_var("SIDECAR_TEST_CLIENT_SECRET", "s3cr3t-value");
}

#[test]
fn full_example_parses() {
    with_secret();
    let c = Config::parse(FULL, "sidecar.yaml").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    let main = &c.providers["main"];
    match &main.kind {
        ProviderKind::ClientCredentials { client, params, .. } => {
            assert_eq!(
                client.credential,
                ClientCredential::SecretBasic(Secret::new("s3cr3t-value"))
            );
            assert_eq!(params["audience"], "https://api.example.com");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(main.refresh.jitter, 0.10);
    let api = &c.upstreams[0];
    assert!(api.tls);
    assert_eq!((api.host.as_str(), api.port), ("api.example.com", 443));
    assert_eq!(api.authority, "api.example.com");
    assert_eq!(api.base_path, "/v2");
    assert_eq!(api.path_prefix, "/api");
    assert_eq!(
        api.expiry.body_patterns,
        vec!["token is expired".to_string()]
    );
    let hub = &c.upstreams[1];
    assert!(hub.inject.header.is_none());
    assert_eq!(hub.inject.query.as_deref(), Some("access_token"));
    assert_eq!(hub.match_host.as_deref(), Some("hub.local"));
    assert_eq!(hub.authority, "127.0.0.1:9000");
    assert_eq!(c.replay.max_body, 1 << 20);
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn defaults_fill_an_almost_empty_file() {
    let c = Config::parse("upstreams: []\n", "x.yaml").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.replay.max_attempts, 3);
    assert_eq!(c.replay.wait_for_token, Duration::from_secs(10));
    assert_eq!(c.replay.idempotent_methods.len(), 5);
}

#[test]
fn redacted_output_hides_secrets() {
    with_secret();
    let c = Config::parse(FULL, "sidecar.yaml").unwrap();
    let out = c.redacted_yaml();
    assert!(!out.contains("s3cr3t-value"), "{out}");
    assert!(!out.contains("abc"), "{out}");
    assert!(out.contains("<redacted>"));
    assert!(out.contains("api.example.com"));
    // The printed config is itself a valid config (modulo the redaction).
    let again: RawConfig = serde_yaml::from_str(&out).unwrap();
    assert_eq!(again.upstreams.len(), 2);
}

fn err(text: &str) -> String {
    Config::parse(text, "bad.yaml").unwrap_err().to_string()
}

#[test]
fn unknown_key_is_located() {
    let e = err(
        "listen: \"127.0.0.1:1\"\nupstreams:\n  - name: a\n    url: http://x\n    provdier: p\n",
    );
    assert!(e.starts_with("bad.yaml:5:"), "{e}");
    assert!(e.contains("provdier"), "{e}");
}

#[test]
fn bad_duration_is_located() {
    let e = err("shutdown_grace: 5 parsecs\n");
    assert!(e.starts_with("bad.yaml:1:"), "{e}");
    assert!(e.contains("invalid duration"), "{e}");
}

#[test]
fn missing_env_reference_is_an_error() {
    let e = err("providers:\n  s:\n    type: static\n    token: ${env:SIDECAR_SURELY_UNSET_123}\n");
    // serde_yaml places errors from inside a mapping at the mapping itself.
    assert!(
        e.starts_with("bad.yaml:3:") || e.starts_with("bad.yaml:4:"),
        "{e}"
    );
    assert!(e.contains("SIDECAR_SURELY_UNSET_123"), "{e}");
}

#[test]
fn unknown_provider_reference_is_located() {
    let e = err("upstreams:\n  - name: a\n    url: http://x\n    provider: nope\n");
    assert!(e.starts_with("bad.yaml:2:"), "{e}");
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn provider_missing_fields() {
    let e = err("providers:\n  cc:\n    type: oauth2_client_credentials\n    client_id: x\n");
    assert!(e.contains("token_url"), "{e}");
    assert!(e.starts_with("bad.yaml:2:"), "{e}");
    let e = err("providers:\n  cc:\n    type: kerberos\n");
    assert!(e.contains("kerberos"), "{e}");
}

#[test]
fn bad_upstreams() {
    assert!(err("upstreams:\n  - name: a\n    url: ftp://x\n").contains("ftp"));
    assert!(
        err("upstreams:\n  - name: a\n    url: http://x\n  - name: a\n    url: http://y\n")
            .contains("twice")
    );
    assert!(
        err("upstreams:\n  - name: a\n    url: http://x\n    inject: { header: null }\n")
            .contains("inject")
    );
    assert!(
        err("upstreams:\n  - name: a\n    url: http://x\n    expiry: { statuses: [99] }\n")
            .contains("99")
    );
    assert!(err(
        "upstreams:\n  - name: a\n    url: http://x\n    expiry: { body_statuses: [200] }\n"
    )
    .contains("200 is not an error status"));
    let e = err("upstreams: []\nretry:\n  statuses: [502, 302]\n");
    assert!(
        e.starts_with("bad.yaml:3:") && e.contains("302 is not an error status"),
        "{e}"
    );
    assert!(err("listen: nowhere\n").starts_with("bad.yaml:1:"));
}

#[test]
fn secrets_do_not_leak_into_errors() {
    std::env::set_var("SIDECAR_TEST_LEAKY", "leaky-secret-value");
    let e = err("providers:\n  s:\n    type: static\n    token: ${env:SIDECAR_TEST_LEAKY}\n    token_url: http://x\n");
    assert!(!e.contains("leaky-secret-value"), "{e}");
}

const RATE_BASE: &str = r#"
upstreams:
  - { name: api, url: "http://127.0.0.1:1" }
rate_limits:
"#;

#[test]
fn rate_limits_parse_with_defaults() {
    let text = format!(
        "{RATE_BASE}  - name: history
    upstream: api
    match: {{ methods: [post], path: \"/api/History/**\" }}
    rate: 50/30s
  - name: general
    upstream: api
    rate: 200/60s
    burst: 10
    mode: reject
    max_wait: 2s
    key: {{ header: X-Tenant }}
    max_keys: 5
"
    );
    let c = Config::parse(&text, "t.yaml").unwrap();
    let h = &c.rate_limits[0];
    assert_eq!(h.name, "history");
    assert_eq!(h.methods, vec![Method::POST]);
    assert_eq!(h.rate.count, 50);
    assert_eq!(h.rate.per, Duration::from_secs(30));
    assert_eq!(h.burst, 50, "burst defaults to the count");
    assert_eq!(h.mode, RateLimitMode::Wait);
    assert_eq!(h.max_wait, Duration::from_secs(30));
    assert_eq!(h.key, None);
    assert_eq!(h.max_keys, 10_000);
    let m = h.path.as_ref().unwrap().compile_matcher();
    assert!(m.is_match("/api/History/a/b"));
    assert!(!m.is_match("/api/Other/a"));
    let g = &c.rate_limits[1];
    assert!(g.methods.is_empty() && g.path.is_none());
    assert_eq!(
        (g.burst, g.mode, g.max_keys),
        (10, RateLimitMode::Reject, 5)
    );
    assert_eq!(g.max_wait, Duration::from_secs(2));
    assert_eq!(
        g.key,
        Some(RateKey::Header(HeaderName::from_static("x-tenant")))
    );
    // `check` prints what was written.
    assert!(
        c.redacted_yaml().contains("rate: 50/30s"),
        "{}",
        c.redacted_yaml()
    );
}

#[test]
fn single_star_is_one_segment() {
    let text = format!(
        "{RATE_BASE}  - {{ name: a, upstream: api, rate: 1/1s, match: {{ path: \"/x/*\" }} }}\n"
    );
    let c = Config::parse(&text, "t.yaml").unwrap();
    let m = c.rate_limits[0].path.as_ref().unwrap().compile_matcher();
    assert!(m.is_match("/x/y"));
    assert!(!m.is_match("/x/y/z"));
}

#[test]
fn bad_rates_are_located() {
    for (rate, want) in [
        ("50/0s", "more than 0"),
        ("x/1s", "not a count"),
        ("0/1s", "at least 1"),
    ] {
        let text = format!("{RATE_BASE}  - name: a\n    upstream: api\n    rate: {rate}\n");
        let e = err(&text);
        assert!(e.starts_with("bad.yaml:7:"), "{rate}: {e}");
        assert!(e.contains(want), "{rate}: {e}");
    }
}

#[test]
fn bad_rate_limits_are_located() {
    let cases = [
        (
            "upstream: nope\n    rate: 1/1s",
            "not defined under upstreams",
        ),
        (
            "upstream: api\n    rate: 1/1s\n    burst: 0",
            "burst must be at least 1",
        ),
        ("upstream: api\n    rate: 1/1s\n    key: {}", "exactly one"),
        (
            "upstream: api\n    rate: 1/1s\n    key: { client_ip: true, header: X-A }",
            "exactly one",
        ),
        (
            "upstream: api\n    rate: 1/1s\n    match: { path: \"api/**\" }",
            "must start with /",
        ),
        ("upstream: api\n    rate: 1/1s\n    max_keys: 0", "max_keys"),
        (
            "upstream: api\n    rate: 1/1s\n    mode: later",
            "unknown variant",
        ),
        (
            "upstream: api\n    rate: 1/1s\n    ratee: 1",
            "unknown field",
        ),
    ];
    for (body, want) in cases {
        let text = format!("{RATE_BASE}  - name: a\n    {body}\n");
        let e = err(&text);
        assert!(e.starts_with("bad.yaml:"), "{body}: {e}");
        assert!(!e.starts_with("bad.yaml: "), "no location for {body}: {e}");
        assert!(e.contains(want), "{body}: {e}");
    }
    let dup = format!("{RATE_BASE}  - {{ name: a, upstream: api, rate: 1/1s }}\n  - {{ name: a, upstream: api, rate: 1/1s }}\n");
    assert!(err(&dup).contains("used twice"), "{}", err(&dup));
}

#[test]
fn absurd_rate_windows_are_refused() {
    let text =
        format!("{RATE_BASE}  - {{ name: a, upstream: api, rate: 1/100000h, burst: 1000 }}\n");
    assert!(err(&text).contains("10 years"), "{}", err(&text));
}

#[test]
fn downstream_defaults_follow_the_spec() {
    let c = Config::parse("upstreams: []\n", "x.yaml").unwrap();
    assert_eq!(c.downstream.header_timeout, Duration::from_secs(10));
    assert_eq!(c.downstream.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.downstream.max_connections, 10_000);
}

#[test]
fn downstream_settings_parse() {
    let c = Config::parse(
        "downstream: { header_timeout: 1500ms, idle_timeout: 2m, max_connections: 5 }\n",
        "x.yaml",
    )
    .unwrap();
    assert_eq!(c.downstream.header_timeout, Duration::from_millis(1500));
    assert_eq!(c.downstream.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.downstream.max_connections, 5);
    // `check` prints them back in a form that loads again.
    let again = Config::parse(&c.redacted_yaml(), "again.yaml").unwrap();
    assert_eq!(again.downstream, c.downstream);
}

#[test]
fn bad_downstream_settings_are_located() {
    for (body, line, want) in [
        (
            "downstream:\n  header_timeout: 0\n",
            2,
            "header_timeout must be more than 0",
        ),
        (
            "downstream:\n  idle_timeout: 0\n",
            2,
            "idle_timeout must be more than 0",
        ),
        (
            "downstream:\n  max_connections: 0\n",
            2,
            "max_connections must be at least 1",
        ),
        ("downstream:\n  idle_timeout: soon\n", 2, "invalid duration"),
        ("downstream:\n  max_connections: -1\n", 2, "max_connections"),
        ("downstream:\n  idle: 5s\n", 2, "unknown field"),
    ] {
        let e = err(body);
        assert!(e.starts_with(&format!("bad.yaml:{line}:")), "{body}: {e}");
        assert!(e.contains(want), "{body}: {e}");
    }
}
