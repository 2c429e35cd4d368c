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
    assert_eq!(
        c.retry,
        crate::Retry {
            statuses: vec![502, 503, 504],
            backoff: vec![
                Duration::from_millis(100),
                Duration::from_millis(500),
                Duration::from_secs(2)
            ],
            respect_retry_after: true,
            max_retry_after: Duration::from_secs(30),
        }
    );
    assert!(c.log.access_log);
}

#[test]
fn retry_is_parsed_into_durations() {
    let c = Config::parse(
        "upstreams: []\nretry: { statuses: [429], backoff: [1s, 250ms], respect_retry_after: false, max_retry_after: 3s }\n",
        "x.yaml",
    )
    .unwrap();
    assert_eq!(c.retry.statuses, vec![429]);
    assert_eq!(
        c.retry.backoff,
        vec![Duration::from_secs(1), Duration::from_millis(250)]
    );
    assert!(!c.retry.respect_retry_after);
    assert_eq!(c.retry.max_retry_after, Duration::from_secs(3));
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
    assert!(e.starts_with("bad.yaml:4:5: "), "{e}");
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

#[test]
fn threads_default_to_one_and_auto_is_the_cores() {
    let c = Config::parse("upstreams: []\n", "x.yaml").unwrap();
    assert_eq!(c.threads, 1);
    assert_eq!(c.downstream.read_buffer, 0);
    let c = Config::parse("threads: 3\n", "x.yaml").unwrap();
    assert_eq!(c.threads, 3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for auto in ["threads: auto\n", "threads: \"auto\"\n", "threads: AUTO\n"] {
        let c = Config::parse(auto, "x.yaml").unwrap();
        assert_eq!(c.threads, cores.min(256), "{auto}");
        // `check` prints `auto`, not this machine's count.
        assert!(
            c.redacted_yaml().contains("threads: auto"),
            "{}",
            c.redacted_yaml()
        );
        let again = Config::parse(&c.redacted_yaml(), "again.yaml").unwrap();
        assert_eq!(again.threads, c.threads);
    }
}

#[test]
fn read_buffer_parses_and_prints_back() {
    let c = Config::parse("downstream: { read_buffer: 16KiB }\n", "x.yaml").unwrap();
    assert_eq!(c.downstream.read_buffer, 16 * 1024);
    let again = Config::parse(&c.redacted_yaml(), "again.yaml").unwrap();
    assert_eq!(again.downstream, c.downstream);
    let c = Config::parse("downstream: { read_buffer: 1MiB }\n", "x.yaml").unwrap();
    assert_eq!(c.downstream.read_buffer, 1 << 20);
}

#[test]
fn bad_threads_and_read_buffers_are_located() {
    for (body, line, want) in [
        (
            "listen: \"127.0.0.1:1\"\nthreads: 0\n",
            2,
            "between 1 and 256",
        ),
        ("threads: 257\n", 1, "between 1 and 256"),
        ("threads: -2\n", 1, "at least 1"),
        ("threads: many\n", 1, "a number of threads or auto"),
        (
            "threads: 1.5\n",
            1,
            "a number of threads (1, 2, ...) or auto",
        ),
        (
            "downstream:\n  read_buffer: 2MiB\n",
            2,
            "read_buffer must be at most 1MiB",
        ),
        ("downstream:\n  read_buffer: lots\n", 2, "read_buffer"),
    ] {
        let e = err(body);
        assert!(e.starts_with(&format!("bad.yaml:{line}:")), "{body}: {e}");
        assert!(e.contains(want), "{body}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile and odd input (issue 11).

/// Writes `text` to a file of its own and loads it the way `check` and a reload do.
fn load_text(tag: &str, text: &[u8]) -> (String, Result<Config, ConfigError>) {
    let dir = std::env::temp_dir().join(format!("sidecar-cfg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sidecar.yaml");
    std::fs::write(&path, text).unwrap();
    let result = Config::load(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    (path.display().to_string(), result)
}

#[test]
fn durations_past_100_years_are_errors_at_their_place() {
    let cases = [
        (
            "durations-backoff",
            "providers:\n  s:\n    type: static\n    token: t\n    refresh:\n      backoff: [500000000000y]\n",
            (6, 17),
        ),
        (
            "durations-ttl",
            "providers:\n  s:\n    type: static\n    token: t\n    default_ttl: 400000000000y\n",
            (5, 18),
        ),
        (
            "durations-wait",
            "upstreams: []\nreplay:\n  wait_for_token: 400000000000y\n",
            (3, 19),
        ),
    ];
    for (tag, text, (line, col)) in cases {
        let (file, result) = load_text(tag, text.as_bytes());
        let e = result.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{file}:{line}:{col}: ")),
            "{tag}: want {line}:{col}: {e}"
        );
        assert!(e.contains("too long (at most 100 years)"), "{tag}: {e}");
    }
    // 100 years is the longest accepted, everywhere a duration goes.
    let c = Config::parse(
        "providers:\n  s: { type: static, token: t, default_ttl: 100y, refresh: { backoff: [100y] } }\nreplay: { wait_for_token: 100y }\n",
        "ok.yaml",
    )
    .unwrap();
    assert_eq!(c.providers["s"].default_ttl, MAX_DURATION);
    assert_eq!(c.replay.wait_for_token, MAX_DURATION);
}

#[test]
fn sizes_past_1_tib_are_errors_at_their_place() {
    for body in ["2TiB", "1099511627777", "99999999999999999999GiB"] {
        let e = err(&format!("upstreams: []\nreplay:\n  max_body: {body}\n"));
        assert!(e.starts_with("bad.yaml:3:13: "), "{body}: {e}");
    }
}

#[test]
fn an_empty_file_is_not_a_config() {
    for text in ["", "\n", "# nothing yet\n", "---\n", "~\n"] {
        let (file, result) = load_text("empty", text.as_bytes());
        let e = result.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{file}: ")) && e.contains("holds no settings"),
            "{text:?}: {e}"
        );
    }
    // `{}` says "all defaults" on purpose.
    assert!(Config::parse("{}\n", "x.yaml").is_ok());
}

#[test]
fn a_key_written_twice_is_an_error_at_the_second() {
    let e = err("providers:\n  main: { type: static, token: a }\n  main: { type: static, token: b }\nupstreams: []\n");
    assert!(e.starts_with("bad.yaml:3:3: "), "{e}");
    assert!(e.contains("duplicate key \"main\""), "{e}");
    // Struct fields too, and inside a list item.
    assert!(err("listen: \"127.0.0.1:1\"\nlisten: \"127.0.0.1:2\"\n").starts_with("bad.yaml:2:1: "));
    let e = err("upstreams:\n  - name: a\n    url: http://x\n    url: http://y\n");
    assert!(e.starts_with("bad.yaml:4:5: "), "{e}");
}

#[test]
fn a_custom_tag_is_an_error_at_its_place() {
    let e = err("providers:\n  s:\n    type: static\n    token: !vault secret/data/api\n");
    assert!(e.starts_with("bad.yaml:4:12: "), "{e}");
    assert!(e.contains("!vault") && e.contains("not supported"), "{e}");
    assert!(err("upstreams: !list []\n").contains("not supported"));
}

#[test]
fn a_number_where_a_secret_belongs_is_an_error_that_does_not_show_it() {
    let e = err("providers:\n  s:\n    type: static\n    token: 31415926535\n");
    assert!(e.starts_with("bad.yaml:4:12: "), "{e}");
    assert!(e.contains("quote it"), "{e}");
    assert!(!e.contains("31415926535"), "{e}");
    let e = err("providers:\n  cc: { type: oauth2_client_credentials, token_url: \"https://idp/t\", client_id: c, client_secret: 27182818 }\n");
    assert!(e.contains("quote it") && !e.contains("27182818"), "{e}");
    // Quoted, it is the text.
    let c = Config::parse(
        "providers:\n  s: { type: static, token: \"31415926535\" }\n",
        "ok.yaml",
    )
    .unwrap();
    match &c.providers["s"].kind {
        ProviderKind::Static { token } => assert_eq!(token.expose(), "31415926535"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn url_credentials_are_refused_and_never_shown() {
    for (yaml, what) in [
        (
            "providers:\n  cc: { type: oauth2_client_credentials, token_url: \"http://client:hunter2@idp.example/token\", client_id: c, client_secret: s }\n",
            "token_url",
        ),
        (
            "providers:\n  cc: { type: oauth2_client_credentials, token_url: \"http://client:hunter2@idp.example:999999/token\", client_id: c, client_secret: s }\n",
            "token_url",
        ),
        (
            "providers:\n  j: { type: json_login, login: { url: \"https://me:hunter2@api/login\", token_pointer: /t } }\n",
            "login.url",
        ),
        (
            "providers:\n  j: { type: json_login, login: { url: \"https://api/login\", token_pointer: /t }, renew: { url: \"https://me:hunter2@api/renew\", token_pointer: /t } }\n",
            "renew.url",
        ),
        (
            "upstreams:\n  - { name: a, url: \"http://me:hunter2@api.example\" }\n",
            "url",
        ),
        (
            "upstreams:\n  - { name: a, url: \"http://me:hunter2@[::1\" }\n",
            "url",
        ),
    ] {
        let e = err(yaml);
        assert!(!e.contains("hunter2"), "{yaml}: {e}");
        assert!(e.starts_with("bad.yaml:2:"), "{yaml}: {e}");
        assert!(e.contains(what), "{yaml}: {e}");
        assert!(
            e.contains("must not carry credentials") || e.contains("<redacted>@"),
            "{yaml}: {e}"
        );
    }
    assert_eq!(
        validate::urls::shown_url("https://u:p@h:1/x@y?q=a@b"),
        "https://<redacted>@h:1/x@y?q=a@b"
    );
    assert_eq!(validate::urls::shown_url("https://h/x@y"), "https://h/x@y");
}

#[test]
fn a_config_file_is_a_regular_file_of_at_most_4_mib_of_utf8() {
    let e = Config::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/dev/zero: ") && e.contains("not a regular file"),
        "{e}"
    );
    let mut big = b"upstreams: []\n".to_vec();
    big.resize(MAX_FILE as usize + 1, b'#');
    let (file, result) = load_text("big", &big);
    let e = result.unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{file}: ")) && e.contains("larger than 4 MiB"),
        "{e}"
    );
    let (file, result) = load_text("latin1", b"upstreams: []\n# caf\xe9\n");
    let e = result.unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{file}:2:6: ")) && e.contains("not UTF-8"),
        "{e}"
    );
}

#[test]
fn file_references_are_bounded_and_typed() {
    let e = err("providers:\n  s:\n    type: static\n    token: \"${file:/dev/zero}\"\n");
    assert!(e.starts_with("bad.yaml:4:"), "{e}");
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const UNITS: &[&str] = &["", "ms", "s", "m", "h", "y", "KiB", "GiB", "%"];
    const KEYS: &[&str] = &[
        "listen",
        "admin_listen",
        "dns",
        "nameservers",
        "min_ttl",
        "max_ttl",
        "protocol",
        "shutdown_grace",
        "providers",
        "upstreams",
        "replay",
        "retry",
        "rate_limits",
        "log",
        "main",
        "type",
        "token",
        "name",
        "url",
        "provider",
        "backoff",
        "default_ttl",
        "wait_for_token",
        "max_body",
        "rate",
        "jitter",
        "refresh",
        "<<",
    ];
    const VALUES: &[&str] = &[
        "static",
        "t",
        "http://127.0.0.1:1",
        "[]",
        "{}",
        "~",
        "!tag x",
        "&a x",
        "*a",
        "\"${env:SIDECAR_PROP_UNSET}\"",
        "unix:/run/s.sock",
        "unix:rel",
        "h2c",
        "[\"127.0.0.1:53\"]",
    ];

    /// Lines of config-like YAML: real keys and values, nesting, flow style, tags, anchors,
    /// duplicates, and some noise.
    fn yamlish() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            prop::sample::select(VALUES).prop_map(str::to_string),
            // Built from parts rather than regexes, which are slow to generate from.
            (0u64..100_000_000_000_000, prop::sample::select(UNITS))
                .prop_map(|(n, unit)| format!("{n}{unit}")),
            (0u32..100_000, 0u32..10_000, prop::sample::select(UNITS))
                .prop_map(|(n, p, unit)| format!("{n}/{p}{unit}")),
            prop::collection::vec(0x20u8..0x7f, 0..12)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ];
        let key = prop::sample::select(KEYS);
        let line = (0usize..4, key, prop::option::of(value), any::<bool>()).prop_map(
            |(indent, key, value, dash)| {
                let pad = "  ".repeat(indent);
                let dash = if dash { "- " } else { "" };
                match value {
                    Some(v) => format!("{pad}{dash}{key}: {v}\n"),
                    None => format!("{pad}{dash}{key}:\n"),
                }
            },
        );
        prop::collection::vec(line, 0..16).prop_map(|lines| lines.concat())
    }

    fn check_error(text: &str, e: &ConfigError) -> Result<(), TestCaseError> {
        // Every break YAML counts (libyaml also breaks lines at \r, NEL, LS and PS).
        let lines = text
            .chars()
            .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
            .count()
            + 1;
        match e {
            ConfigError::At {
                file, line, col, ..
            } => {
                prop_assert_eq!(file, "p.yaml");
                // libyaml places "unexpected end" at the start of the line after the last one.
                prop_assert!(
                    *line >= 1 && *line <= lines + 1,
                    "line {} of {}: {}",
                    line,
                    lines,
                    e
                );
                prop_assert!(*col >= 1, "{}", e);
            }
            ConfigError::Invalid { file, message } => {
                prop_assert_eq!(file, "p.yaml");
                prop_assert!(!message.is_empty());
            }
            ConfigError::Read { .. } => prop_assert!(false, "parse never reads: {}", e),
        }
        prop_assert!(e.to_string().starts_with("p.yaml:"), "{}", e);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn config_like_text_never_panics_and_errors_name_the_file(text in yamlish()) {
            if let Err(e) = Config::parse(&text, "p.yaml") {
                check_error(&text, &e)?;
            }
        }

        #[test]
        fn any_threads_value_is_a_count_in_range_or_a_located_error(
            value in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                (0u64..400).prop_map(|n| n.to_string()),
                prop::collection::vec(0x20u8..0x7f, 0..8)
                    .prop_map(|b| format!("{:?}", String::from_utf8_lossy(&b))),
                Just("auto".to_string()),
            ]
        ) {
            let text = format!("threads: {value}\n");
            match Config::parse(&text, "p.yaml") {
                Ok(c) => prop_assert!((1..=256).contains(&c.threads), "{}: {}", value, c.threads),
                Err(e) => {
                    check_error(&text, &e)?;
                    prop_assert!(e.to_string().contains("threads"), "{}", e);
                }
            }
        }

        #[test]
        fn any_text_never_panics(text in any::<String>()) {
            if let Err(e) = Config::parse(&text, "p.yaml") {
                check_error(&text, &e)?;
            }
        }

        #[test]
        fn a_cut_or_damaged_full_config_never_panics(cut in 0..FULL.len(), at in 0..FULL.len(), byte in any::<u8>()) {
            with_secret();
            let mut bytes = FULL.as_bytes()[..cut].to_vec();
            let at = at.min(bytes.len());
            bytes.insert(at, byte);
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = Config::parse(&text, "p.yaml") {
                check_error(&text, &e)?;
            }
        }
    }
}
