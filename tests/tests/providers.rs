//! Every provider type end to end through the real sidecar binary, the encrypted token store
//! across restarts, corruption and kill -9, long-operation checks (`X-Sidecar-Expected-Duration`,
//! `/v1/token/ensure`), several providers at once, and no secret in the logs (SPEC §5, §9).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use sidecar_mocks::{Failure, IdpConfig, MockIdp, MockUpstream, Recorded, UpstreamConfig};
use support::{run_cli, wait_until, Scratch, Sidecar};

const HOUR: Duration = Duration::from_secs(3600);
/// Refresh settings that keep the tests quick and deterministic: no skew, no spacing between
/// refreshes (an `ensure` right after a refresh may refresh again), short backoff.
const REFRESH: &str = "refresh: { skew: 0s, min_interval: 0s, backoff: [200ms] }";
const USER: &str = "alice";
const PASSWORD: &str = "pw-alice-5b0e71";

/// A throw-away key of the token crate's unit tests.
fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../token/src/provider/testdata")
        .join(name)
}

fn with_users() -> IdpConfig {
    IdpConfig {
        users: vec![(USER.to_owned(), PASSWORD.to_owned())],
        ..IdpConfig::default()
    }
}

async fn idp_ttl(ttl: Duration) -> MockIdp {
    MockIdp::start(IdpConfig {
        ttl,
        ..with_users()
    })
    .await
}

/// GETs `path` through the sidecar, asserts 200 and returns what the upstream recorded for it,
/// whose token must be one the IdP issued and still valid.
async fn through(sc: &Sidecar, api: &MockUpstream, path: &str) -> Recorded {
    let r = reqwest::get(sc.url(path)).await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "GET {path}: {body}\n{}", sc.logs());
    let seen = api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the upstream never saw {path}"));
    assert_eq!(seen.status, 200);
    let token = seen.token.as_deref().expect("a token reached the upstream");
    let registry = api.registry().expect("a checking upstream");
    assert!(registry.is_valid(token), "{path}: token not valid");
    seen
}

fn token_of(r: &Recorded) -> String {
    r.token.clone().unwrap()
}

/// `POST /v1/token/refresh?provider=NAME`, which must succeed; returns the new status.
async fn force_refresh(sc: &Sidecar, provider: &str) -> serde_json::Value {
    let r = sc
        .admin_post(&format!("/v1/token/refresh?provider={provider}"))
        .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "refresh {provider}: {text}\n{}", sc.logs());
    serde_json::from_str(&text).unwrap()
}

/// The status entry of one provider.
fn provider_status<'a>(all: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    all["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["provider"] == name))
        .unwrap_or_else(|| panic!("no provider {name} in {all}"))
}

/// Waits until every named provider has a token (its first one, or one from the store).
async fn wait_tokens(sc: &Sidecar, names: &[&str]) -> serde_json::Value {
    sc.wait_status(Duration::from_secs(15), |v| {
        names
            .iter()
            .all(|n| provider_status(v, n)["state"] == "valid")
    })
    .await
}

/// Writes `text` next to `path` and renames it over `path`, like Kubernetes and vault agents do.
fn replace_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn keygen() -> String {
    let (code, out, err) = run_cli(&["keygen"], &[]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_owned()
}

/// Stops a sidecar with SIGTERM and waits for it to exit cleanly.
async fn stop(sc: &mut Sidecar) {
    sc.signal("TERM");
    let status = sc
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("sidecar did not stop");
    assert!(status.success(), "{status}\n{}", sc.logs());
}

async fn healthy(sc: &Sidecar) {
    let r = reqwest::get(sc.admin_url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let logs = sc.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

fn jwt_header(jwt: &str) -> serde_json::Value {
    let head = jwt.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Every provider type
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_with_client_secret_post_and_private_key_jwt() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        r#"providers:
  post:
    type: oauth2_client_credentials
    token_url: "{t}"
    client_id: demo-client
    client_secret: "${{env:CC_SECRET}}"
    client_auth: client_secret_post
    scopes: [api.read, api.write]
    params: {{ audience: "https://api.example.com" }}
    {REFRESH}
  rsa:
    type: oauth2_client_credentials
    token_url: "{t}"
    client_id: demo-client
    client_auth: private_key_jwt
    private_key: "${{file:{rsa}}}"
    key_id: test-rsa
    {REFRESH}
  ec:
    type: oauth2_client_credentials
    token_url: "{t}"
    client_id: demo-client
    client_auth: private_key_jwt
    private_key: "${{file:{ec}}}"
    {REFRESH}
upstreams:
  - {{ name: post, url: "{u}", provider: post, match: {{ path_prefix: /post }} }}
  - {{ name: rsa, url: "{u}", provider: rsa, match: {{ path_prefix: /rsa }} }}
  - {{ name: ec, url: "{u}", provider: ec, match: {{ path_prefix: /ec }} }}
"#,
        t = idp.token_url(),
        u = api.url(),
        rsa = testdata("rsa-test-key.pem").display(),
        ec = testdata("ec-pkcs8.pem").display(),
    );
    let sc = Sidecar::start_with_env(&yaml, &[("CC_SECRET", "demo-secret")]).await;
    let post = token_of(&through(&sc, &api, "/post/x").await);
    let rsa = token_of(&through(&sc, &api, "/rsa/x").await);
    let ec = token_of(&through(&sc, &api, "/ec/x").await);
    assert!(post != rsa && rsa != ec && post != ec);

    let requests = idp.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    assert!(requests
        .iter()
        .all(|r| r.grant_type == "client_credentials"));
    let by_post: Vec<_> = requests
        .iter()
        .filter(|r| r.auth_method == "post")
        .collect();
    assert_eq!(by_post.len(), 1, "{requests:#?}");
    assert_eq!(by_post[0].client_id.as_deref(), Some("demo-client"));
    assert_eq!(by_post[0].scope.as_deref(), Some("api.read api.write"));
    assert_eq!(
        by_post[0].params.get("audience").map(String::as_str),
        Some("https://api.example.com")
    );
    let mut algs: Vec<(String, Option<String>)> = requests
        .iter()
        .filter(|r| r.auth_method == "private_key_jwt")
        .map(|r| {
            assert_eq!(r.client_id.as_deref(), Some("demo-client"));
            assert!(!r.params.contains_key("client_secret"));
            let head = jwt_header(&r.params["client_assertion"]);
            (
                head["alg"].as_str().unwrap().to_owned(),
                head["kid"].as_str().map(str::to_owned),
            )
        })
        .collect();
    algs.sort();
    assert_eq!(
        algs,
        vec![
            ("ES256".to_owned(), None),
            ("RS256".to_owned(), Some("test-rsa".to_owned()))
        ]
    );

    // A refresh signs a new assertion (never a replayed one) and the new token reaches the API.
    force_refresh(&sc, "rsa").await;
    let rsa2 = token_of(&through(&sc, &api, "/rsa/y").await);
    assert_ne!(rsa, rsa2);
    let assertions: std::collections::HashSet<_> = idp
        .requests()
        .iter()
        .filter_map(|r| r.params.get("client_assertion").cloned())
        .collect();
    assert_eq!(assertions.len(), 3);
    healthy(&sc).await;
}

#[tokio::test]
async fn password_grant_then_refresh_grant_then_password_again_on_invalid_grant() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        r#"providers:
  pw:
    type: oauth2_password
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    username: {USER}
    password: "${{env:PW}}"
    scopes: [trade]
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: pw }}
"#,
        idp.token_url(),
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("PW", PASSWORD)]).await;
    let first = token_of(&through(&sc, &api, "/a").await);
    let grants = |idp: &MockIdp| -> Vec<String> {
        idp.requests()
            .into_iter()
            .map(|r| r.grant_type)
            .collect::<Vec<_>>()
    };
    assert_eq!(grants(&idp), ["password"]);
    assert_eq!(idp.requests()[0].scope.as_deref(), Some("trade"));

    // While the refresh token works, refreshes use it rather than the password.
    force_refresh(&sc, "pw").await;
    let second = token_of(&through(&sc, &api, "/b").await);
    assert_ne!(first, second);
    assert_eq!(grants(&idp), ["password", "refresh_token"]);
    let rt1 = idp.requests()[1].params["refresh_token"].clone();
    assert!(
        !idp.refresh_token_valid(&rt1),
        "the rotated-out refresh token must have been consumed"
    );
    force_refresh(&sc, "pw").await;
    let rt2 = idp.requests()[2].params["refresh_token"].clone();
    assert_ne!(rt1, rt2, "the rotated refresh token is used next time");
    let third = token_of(&through(&sc, &api, "/c").await);
    assert_ne!(second, third);

    // The IdP forgets every refresh token: the next refresh logs in with the password again.
    idp.revoke_refresh_tokens();
    force_refresh(&sc, "pw").await;
    let fourth = token_of(&through(&sc, &api, "/d").await);
    assert_ne!(third, fourth);
    assert_eq!(
        grants(&idp),
        [
            "password",
            "refresh_token",
            "refresh_token",
            "refresh_token",
            "password"
        ]
    );
    healthy(&sc).await;
}

#[tokio::test]
async fn refresh_token_provider_rotates_and_falls_back_to_login_on_invalid_grant() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let rt0 = idp.issue_refresh_token();
    let yaml = format!(
        r#"providers:
  rt:
    type: oauth2_refresh_token
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh_token: "${{env:RT}}"
    login: {{ type: oauth2_password, username: {USER}, password: "${{env:PW}}" }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: rt }}
"#,
        idp.token_url(),
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("RT", &rt0), ("PW", PASSWORD)]).await;
    let t1 = token_of(&through(&sc, &api, "/a").await);
    let reqs = idp.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].grant_type, "refresh_token");
    assert_eq!(reqs[0].params["refresh_token"], rt0);
    assert!(!idp.refresh_token_valid(&rt0), "rt0 was rotated out");

    // Each refresh presents the refresh token the previous answer rotated in.
    let mut presented = vec![rt0.clone()];
    let mut tokens = vec![t1];
    for round in 0..3 {
        force_refresh(&sc, "rt").await;
        tokens.push(token_of(&through(&sc, &api, &format!("/r{round}")).await));
        let reqs = idp.requests();
        let last = reqs.last().unwrap();
        assert_eq!(last.grant_type, "refresh_token");
        let rt = last.params["refresh_token"].clone();
        assert!(
            !presented.contains(&rt),
            "a consumed refresh token was sent again"
        );
        assert!(!idp.refresh_token_valid(&rt));
        presented.push(rt);
    }
    assert_eq!(idp.calls(), 4);
    let distinct: std::collections::HashSet<_> = tokens.iter().collect();
    assert_eq!(distinct.len(), tokens.len());

    // invalid_grant (the IdP revoked them all): the configured login takes over.
    idp.revoke_refresh_tokens();
    force_refresh(&sc, "rt").await;
    let after = token_of(&through(&sc, &api, "/after").await);
    assert!(!tokens.contains(&after));
    let grants: Vec<String> = idp.requests().into_iter().map(|r| r.grant_type).collect();
    assert_eq!(grants[4..], ["refresh_token", "password"]);
    assert!(sc.logs().contains("refresh token refused"), "{}", sc.logs());

    // The password grant's refresh token is used from then on; no more password logins.
    force_refresh(&sc, "rt").await;
    through(&sc, &api, "/later").await;
    let reqs = idp.requests();
    assert_eq!(reqs.len(), 7);
    assert_eq!(reqs[6].grant_type, "refresh_token");
    assert!(!presented.contains(&reqs[6].params["refresh_token"]));
    let status = reqwest::get(sc.admin_url("/v1/token/status"))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(provider_status(&status, "rt")["state"], "valid");
    healthy(&sc).await;
}

#[tokio::test]
async fn json_login_logs_in_renews_and_logs_in_again_when_renew_fails() {
    let idp = MockIdp::start(IdpConfig {
        api_keys: vec![("trader".to_owned(), "ak-trader-33f1c9".to_owned())],
        ..IdpConfig::default()
    })
    .await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        r#"providers:
  jl:
    type: json_login
    login:
      url: "{}"
      method: POST
      body: {{ userName: trader, apiKey: "${{env:API_KEY}}" }}
      token_pointer: /token
      expires_in_pointer: /expiresIn
      success_pointer: /success
    renew: {{ url: "{}", token_pointer: /newToken, success_pointer: /success }}
    default_ttl: 1h
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: jl }}
"#,
        idp.login_url(),
        idp.validate_url(),
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("API_KEY", "ak-trader-33f1c9")]).await;
    let t1 = token_of(&through(&sc, &api, "/a").await);
    let kinds = |idp: &MockIdp| -> Vec<String> {
        idp.requests().into_iter().map(|r| r.grant_type).collect()
    };
    assert_eq!(kinds(&idp), ["json_login"]);
    assert_eq!(idp.requests()[0].client_id.as_deref(), Some("trader"));

    // A refresh renews: the current token as Bearer, a new one back.
    force_refresh(&sc, "jl").await;
    let t2 = token_of(&through(&sc, &api, "/b").await);
    assert_ne!(t1, t2);
    assert_eq!(kinds(&idp), ["json_login", "json_renew"]);
    assert_eq!(idp.requests()[1].auth_method, "bearer");

    // The session is gone on the IdP's side: the renew is refused, the sidecar logs in again.
    idp.registry().revoke_all();
    force_refresh(&sc, "jl").await;
    let t3 = token_of(&through(&sc, &api, "/c").await);
    assert!(t3 != t1 && t3 != t2);
    assert_eq!(
        kinds(&idp),
        ["json_login", "json_renew", "json_renew", "json_login"]
    );
    let logs = sc.logs();
    assert!(
        logs.contains("token renew failed") && logs.contains("Session expired"),
        "{logs}"
    );
    healthy(&sc).await;
}

#[tokio::test]
async fn exec_provider_runs_the_command_for_every_token() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("exec");
    let script = dir.path("get-token.sh");
    let write_script = |token: &str| {
        replace_atomically(
            &script,
            &format!(
                "#!/bin/sh\necho \"get-token: issuing for $TOKEN_AUDIENCE\" >&2\nprintf '%s\\n' '{{\"token\": \"{token}\", \"expires_in\": 3600}}'\n"
            ),
        );
    };
    let t1 = idp.registry().issue(HOUR);
    write_script(&t1);
    let yaml = format!(
        r#"providers:
  ex:
    type: exec
    command: ["/bin/sh", "{}"]
    timeout: 10s
    env: {{ TOKEN_AUDIENCE: orders-api }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: ex }}
"#,
        script.display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);
    let status = force_refresh(&sc, "ex").await;
    assert_eq!(status["generation"], 2);
    // The command's expires_in is the token's lifetime.
    let ttl = status["ttl_seconds"].as_f64().unwrap();
    assert!(ttl > 3000.0 && ttl <= 3600.0, "{status}");

    let t2 = idp.registry().issue(HOUR);
    write_script(&t2);
    force_refresh(&sc, "ex").await;
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    let logs = sc.logs();
    // stderr is logged (with the env the sidecar passed), stdout never.
    assert!(logs.contains("get-token: issuing for orders-api"), "{logs}");
    assert!(
        !logs.contains(&t1) && !logs.contains(&t2),
        "stdout of the command leaked into the logs:\n{}",
        logs.replace(&t1, "<token 1>").replace(&t2, "<token 2>")
    );
    healthy(&sc).await;
}

/// `2026-11-22T08:00:00Z` for a Unix time (days-to-civil, proleptic Gregorian).
fn rfc3339(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn exec_provider_reads_exec_credentials_expires_at_and_bare_lines_and_logs_failures() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("exec-formats");
    let registry = idp.registry();
    let (k8s, at, bare, hidden) = (
        registry.issue(HOUR),
        registry.issue(HOUR),
        registry.issue(HOUR),
        registry.issue(HOUR),
    );
    let now = unix_now();
    let scripts = [
        (
            "k8s",
            format!(
                r#"{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"{k8s}","expirationTimestamp":"{}"}}}}"#,
                rfc3339(now + 7200)
            ),
            0,
        ),
        (
            "at",
            format!(r#"{{"token":"{at}","expires_at":{}}}"#, now + 5400),
            0,
        ),
        ("bare", format!("{bare}\nsecond line ignored"), 0),
        ("fails", hidden.clone(), 3),
    ];
    let mut yaml = String::from("providers:\n");
    let mut routes = String::from("upstreams:\n");
    for (name, out, code) in &scripts {
        let path = dir.path(&format!("{name}.sh"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\necho '{name}: vault is sealed' >&2\nexit {code}\n"),
        )
        .unwrap();
        yaml += &format!(
            "  {name}: {{ type: exec, command: [\"/bin/sh\", \"{}\"], default_ttl: 45m, {REFRESH} }}\n",
            path.display()
        );
        routes += &format!(
            "  - {{ name: {name}, url: \"{}\", provider: {name}, match: {{ path_prefix: /{name} }} }}\n",
            api.url()
        );
    }
    // A command that hangs is killed after its timeout.
    yaml += "  hangs: { type: exec, command: [\"/bin/sh\", \"-c\", \"exec sleep 60\"], timeout: 300ms, refresh: { backoff: [1h] } }\n";
    yaml += &routes;
    yaml += "replay: { wait_for_token: 1s }\n";
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/k8s").await), k8s);
    assert_eq!(token_of(&through(&sc, &api, "/at").await), at);
    assert_eq!(token_of(&through(&sc, &api, "/bare").await), bare);
    let status = sc
        .wait_status(Duration::from_secs(15), |v| {
            ["fails", "hangs"]
                .iter()
                .all(|n| provider_status(v, n)["refresh_failed"].as_u64() >= Some(1))
        })
        .await;
    // Lifetimes: the ExecCredential's expirationTimestamp (2 h), expires_at (1.5 h), and
    // default_ttl (45 min) for a bare line.
    let ttl = |name: &str| {
        provider_status(&status, name)["ttl_seconds"]
            .as_f64()
            .unwrap()
    };
    assert!(ttl("k8s") > 6000.0 && ttl("k8s") <= 7200.0, "{status}");
    assert!(ttl("at") > 4000.0 && ttl("at") <= 5400.0, "{status}");
    assert!(ttl("bare") > 2000.0 && ttl("bare") <= 2700.0, "{status}");

    let fails = provider_status(&status, "fails");
    assert_ne!(fails["state"], "valid");
    let error = fails["last_error"].as_str().unwrap();
    assert!(
        error.contains("exited with 3") && error.contains("vault is sealed"),
        "{status}"
    );
    let hangs = provider_status(&status, "hangs")["last_error"]
        .as_str()
        .unwrap();
    assert!(hangs.contains("did not finish within"), "{status}");
    let r = reqwest::get(sc.url("/fails")).await.unwrap();
    assert_eq!(r.status(), 503);
    let logs = sc.logs();
    assert!(logs.contains("fails: vault is sealed"), "{logs}");
    for t in [&k8s, &at, &bare, &hidden] {
        assert!(
            !logs.contains(t.as_str()),
            "stdout of a command leaked into the logs"
        );
    }
    healthy(&sc).await;
}

#[tokio::test]
async fn file_provider_picks_up_a_replaced_token_file() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("file");
    let file = dir.path("api-token");
    let t1 = idp.registry().issue(HOUR);
    replace_atomically(&file, &format!("{t1}\n"));
    let yaml = format!(
        r#"providers:
  fi:
    type: file
    path: "{}"
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: fi }}
"#,
        file.display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);

    // Replaced by rename (a new inode), like a projected service-account token.
    let t2 = idp.registry().issue(HOUR);
    replace_atomically(&file, &format!("{t2}\n"));
    wait_until(
        Duration::from_secs(20),
        || async {
            let seen = token_of(&through(&sc, &api, "/poll").await);
            // Until the new token is picked up, the old one is sent.
            assert!(
                seen == t2 || seen == t1,
                "neither the old nor the new token"
            );
            seen == t2
        },
        || format!("the new token file was never picked up\n{}", sc.logs()),
    )
    .await;
    // From then on only the new token is sent.
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    healthy(&sc).await;
}

#[tokio::test]
async fn file_provider_follows_a_kubernetes_style_symlink_swap() {
    use std::os::unix::fs::symlink;
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("file-k8s");
    // token -> ..data/token, ..data -> ..v1: how kubelet lays out projected volumes.
    let version = |name: &str, token: &str| {
        std::fs::create_dir(dir.path(name)).unwrap();
        std::fs::write(dir.path(name).join("token"), token).unwrap();
    };
    let t1 = idp.registry().issue(HOUR);
    version("..v1", &t1);
    symlink("..v1", dir.path("..data")).unwrap();
    symlink("..data/token", dir.path("token")).unwrap();
    let yaml = format!(
        "providers:\n  fi: {{ type: file, path: \"{}\", {REFRESH} }}\nupstreams:\n  - {{ name: api, url: \"{}\", provider: fi }}\n",
        dir.path("token").display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);

    // kubelet writes a new version and swaps the ..data symlink atomically.
    let t2 = idp.registry().issue(HOUR);
    version("..v2", &t2);
    symlink("..v2", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    wait_until(
        Duration::from_secs(20),
        || async { token_of(&through(&sc, &api, "/poll").await) == t2 },
        || format!("the swapped token was never picked up\n{}", sc.logs()),
    )
    .await;
    std::fs::remove_dir_all(dir.path("..v1")).unwrap();
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    healthy(&sc).await;
}

#[tokio::test]
async fn static_provider_injects_its_fixed_token() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let token = idp.registry().issue(HOUR);
    let yaml = format!(
        "providers:\n  st: {{ type: static, token: \"${{env:API_TOKEN}}\" }}\nupstreams:\n  - {{ name: api, url: \"{}\", provider: st }}\n",
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("API_TOKEN", &token)]).await;
    for path in ["/a", "/b", "/c"] {
        let seen = through(&sc, &api, path).await;
        assert_eq!(token_of(&seen), token);
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
    }
    assert_eq!(idp.calls(), 0);
    healthy(&sc).await;
}

// ---------------------------------------------------------------------------------------------
// 2-4. The encrypted store
// ---------------------------------------------------------------------------------------------

fn cc_with_store(name: &str, idp: &MockIdp, api: &MockUpstream, store: &Path) -> String {
    format!(
        r#"providers:
  {name}:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    store: {{ path: "{}", key: "${{env:STORE_KEY}}" }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: {name} }}
"#,
        idp.token_url(),
        store.display(),
        api.url()
    )
}

#[tokio::test]
async fn restart_with_store_serves_without_calling_the_idp() {
    restart_with_store(&keygen()).await;
}

#[tokio::test]
async fn restart_with_a_passphrase_store_serves_without_calling_the_idp() {
    restart_with_store("correct horse battery staple").await;
}

/// Start, one request, SIGTERM; a second start on the same store serves with the stored token.
async fn restart_with_store(key: &str) {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("store");
    let store = dir.path("main.tok");
    let yaml = cc_with_store("main", &idp, &api, &store);

    let mut first = Sidecar::start_with_env(&yaml, &[("STORE_KEY", key)]).await;
    let token = token_of(&through(&first, &api, "/a").await);
    assert_eq!(idp.calls(), 1);
    let meta = std::fs::metadata(&store).expect("the store file was written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(&store).unwrap();
    assert!(
        !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
        "the store holds the token in clear"
    );
    stop(&mut first).await;

    let second = Sidecar::start_with_env(&yaml, &[("STORE_KEY", key)]).await;
    let status = wait_tokens(&second, &["main"]).await;
    assert_eq!(provider_status(&status, "main")["generation"], 1);
    for path in ["/b", "/c", "/d"] {
        assert_eq!(token_of(&through(&second, &api, path).await), token);
    }
    assert_eq!(idp.calls(), 1, "the second start called the IdP");
    assert!(
        second.logs().contains("token restored from the store"),
        "{}",
        second.logs()
    );
    // And it goes on from the stored generation.
    let status = force_refresh(&second, "main").await;
    assert_eq!(status["generation"], 2);
    assert_ne!(token_of(&through(&second, &api, "/e").await), token);
    for logs in [first.logs(), second.logs()] {
        assert!(!logs.contains(key), "the store key leaked into the logs");
    }
    healthy(&second).await;
}

#[tokio::test]
async fn corrupt_truncated_wrong_key_and_foreign_stores_are_ignored_with_a_warning() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("corrupt");
    let store = dir.path("main.tok");
    let key = keygen();
    let yaml = cc_with_store("main", &idp, &api, &store);

    let mut sc = Sidecar::start_with_env(&yaml, &[("STORE_KEY", &key)]).await;
    let mut tokens = vec![token_of(&through(&sc, &api, "/a").await)];
    stop(&mut sc).await;

    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 4] = [
        ("flipped ciphertext bits", |b: &mut Vec<u8>| {
            let n = b.len();
            b[n - 20] ^= 0x5a;
            b[n - 1] ^= 0x01;
        }),
        ("flipped header bytes", |b: &mut Vec<u8>| {
            b[0] ^= 0xff;
            b[8] ^= 0x10;
        }),
        ("truncated file", |b: &mut Vec<u8>| b.truncate(b.len() / 2)),
        ("garbage", |b: &mut Vec<u8>| {
            *b = b"not a store file at all".to_vec()
        }),
    ];
    for (what, damage) in damages {
        let mut bytes = std::fs::read(&store).unwrap();
        damage(&mut bytes);
        std::fs::write(&store, &bytes).unwrap();
        let calls = idp.calls();
        let mut sc = Sidecar::start_with_env(&yaml, &[("STORE_KEY", &key)]).await;
        let token = token_of(&through(&sc, &api, "/after").await);
        assert!(!tokens.contains(&token), "{what}: an old token was used");
        assert_eq!(idp.calls(), calls + 1, "{what}: no fresh login");
        let logs = sc.logs();
        assert!(
            logs.contains("token store ignored") && logs.contains("WARN"),
            "{what}: no warning\n{logs}"
        );
        healthy(&sc).await;
        tokens.push(token);
        // The fresh login replaced the damaged file.
        stop(&mut sc).await;
    }

    // A wrong key (another keygen key): ignored, log in afresh, the file is rewritten with the
    // new key.
    let other = keygen();
    let calls = idp.calls();
    let mut sc = Sidecar::start_with_env(&yaml, &[("STORE_KEY", &other)]).await;
    let token = token_of(&through(&sc, &api, "/wrong-key").await);
    assert!(!tokens.contains(&token));
    assert_eq!(idp.calls(), calls + 1);
    let logs = sc.logs();
    assert!(
        logs.contains("token store ignored") && logs.contains("cannot decrypt"),
        "{logs}"
    );
    healthy(&sc).await;
    stop(&mut sc).await;
    // With the new key the rewritten file is read back without an IdP call.
    let mut sc = Sidecar::start_with_env(&yaml, &[("STORE_KEY", &other)]).await;
    wait_tokens(&sc, &["main"]).await;
    assert_eq!(token_of(&through(&sc, &api, "/again").await), token);
    assert_eq!(idp.calls(), calls + 1);
    healthy(&sc).await;
    stop(&mut sc).await;
    tokens.push(token);

    // A file written for another provider (right key, same path, another name).
    let calls = idp.calls();
    let renamed = cc_with_store("other", &idp, &api, &store);
    let sc = Sidecar::start_with_env(&renamed, &[("STORE_KEY", &other)]).await;
    let token = token_of(&through(&sc, &api, "/other-provider").await);
    assert!(
        !tokens.contains(&token),
        "another provider's token was used"
    );
    assert_eq!(idp.calls(), calls + 1);
    let logs = sc.logs();
    assert!(
        logs.contains("token store ignored") && logs.contains("written for provider"),
        "{logs}"
    );
    healthy(&sc).await;
}

#[tokio::test]
async fn kill_9_right_after_a_rotation_restarts_with_a_usable_refresh_token() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("rotation");
    let store = dir.path("rt.tok");
    let key = keygen();
    let rt0 = idp.issue_refresh_token();
    // No login fallback: a lost refresh token would be a permanent invalid_grant failure.
    let yaml = format!(
        r#"providers:
  rt:
    type: oauth2_refresh_token
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh_token: "${{env:RT}}"
    store: {{ path: "{}", key: "${{env:STORE_KEY}}" }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: rt }}
"#,
        idp.token_url(),
        store.display(),
        api.url()
    );
    let env = [("RT", rt0.as_str()), ("STORE_KEY", key.as_str())];

    for life in 0..3 {
        let mut sc = Sidecar::start_with_env(&yaml, &env).await;
        wait_tokens(&sc, &["rt"]).await;
        let calls = idp.calls();
        through(&sc, &api, "/before").await;
        // Rotate, then die the moment the refresh is answered.
        let status = force_refresh(&sc, "rt").await;
        sc.signal("KILL");
        sc.wait_exit(Duration::from_secs(10))
            .await
            .expect("kill -9 did not end the sidecar");
        let reqs = idp.requests();
        assert_eq!(reqs.len(), calls + 1, "life {life}");
        let consumed = &reqs.last().unwrap().params["refresh_token"];
        assert!(
            !idp.refresh_token_valid(consumed),
            "life {life}: the refresh did not rotate"
        );
        assert_eq!(status["state"], "valid");
    }

    // The last life's token and rotated refresh token are on disk: the next start uses the
    // token without an IdP call, and its refresh token still works.
    let calls = idp.calls();
    let sc = Sidecar::start_with_env(&yaml, &env).await;
    wait_tokens(&sc, &["rt"]).await;
    through(&sc, &api, "/restored").await;
    assert_eq!(idp.calls(), calls);
    let status = force_refresh(&sc, "rt").await;
    assert_eq!(status["state"], "valid");
    assert!(status["last_error"].is_null(), "{status}");
    through(&sc, &api, "/refreshed").await;
    let reqs = idp.requests();
    assert_eq!(reqs.len(), calls + 1);
    assert!(reqs.iter().all(|r| r.grant_type == "refresh_token"));
    assert!(!sc.logs().contains("invalid_grant"), "{}", sc.logs());
    healthy(&sc).await;
}

#[tokio::test]
async fn a_refused_stored_refresh_token_gives_way_to_a_newly_configured_one() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("rt-replaced");
    let store = dir.path("rt.tok");
    let key = keygen();
    let yaml = format!(
        r#"providers:
  rt:
    type: oauth2_refresh_token
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    refresh_token: "${{env:RT}}"
    store: {{ path: "{}", key: "${{env:STORE_KEY}}" }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: rt }}
"#,
        idp.token_url(),
        store.display(),
        api.url()
    );
    let rt0 = idp.issue_refresh_token();
    let mut sc = Sidecar::start_with_env(&yaml, &[("RT", &rt0), ("STORE_KEY", &key)]).await;
    through(&sc, &api, "/a").await;
    stop(&mut sc).await;

    // The IdP revoked the whole family; the operator configures a newly issued refresh token.
    idp.revoke_refresh_tokens();
    let fresh = idp.issue_refresh_token();
    let sc = Sidecar::start_with_env(&yaml, &[("RT", &fresh), ("STORE_KEY", &key)]).await;
    wait_tokens(&sc, &["rt"]).await;
    // The stored access token still serves; the next refresh finds the stored refresh token
    // refused and then uses the configured one.
    through(&sc, &api, "/b").await;
    let calls = idp.calls();
    let _ = sc.admin_post("/v1/token/refresh?provider=rt").await;
    let status = sc
        .wait_status(Duration::from_secs(15), |v| {
            let p = provider_status(v, "rt");
            p["state"] == "valid" && p["generation"].as_u64() >= Some(2)
        })
        .await;
    assert!(
        provider_status(&status, "rt")["last_error"].is_null(),
        "{status}"
    );
    let after = token_of(&through(&sc, &api, "/c").await);
    assert!(idp.registry().is_valid(&after));
    let presented: Vec<String> = idp.requests()[calls..]
        .iter()
        .map(|r| r.params["refresh_token"].clone())
        .collect();
    assert!(presented.contains(&fresh), "{presented:?}");
    assert!(!presented.contains(&rt0));
    healthy(&sc).await;
}

// ---------------------------------------------------------------------------------------------
// 5-6. Long operations
// ---------------------------------------------------------------------------------------------

fn cc_yaml(name: &str, idp: &MockIdp) -> String {
    format!(
        "  {name}:\n    type: oauth2_client_credentials\n    token_url: \"{}\"\n    client_id: demo-client\n    client_secret: demo-secret\n    {REFRESH}\n",
        idp.token_url()
    )
}

#[tokio::test]
async fn expected_duration_header_needs_one_and_a_half_times_the_ttl_and_is_not_forwarded() {
    let idp = idp_ttl(5 * HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        cc_yaml("main", &idp),
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
        cc_yaml("long", &long_idp),
        cc_yaml("short", &short_idp)
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

// ---------------------------------------------------------------------------------------------
// 7. Several providers
// ---------------------------------------------------------------------------------------------

/// The `sidecar_waiting_requests` gauge.
async fn waiting_requests(sc: &Sidecar) -> f64 {
    let text = sc.admin_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("sidecar_waiting_requests "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn each_upstream_uses_its_own_provider_and_a_failing_idp_blocks_only_its_own() {
    let idp_a = idp_ttl(HOUR).await;
    let idp_b = idp_ttl(HOUR).await;
    idp_b.set_failure(Some(Failure::Down));
    let api_a = MockUpstream::start(UpstreamConfig::checking(idp_a.registry())).await;
    let api_b = MockUpstream::start(UpstreamConfig::checking(idp_b.registry())).await;
    let yaml = format!(
        "providers:\n{}{}upstreams:\n  - {{ name: a, url: \"{}\", provider: pa, match: {{ path_prefix: /a }} }}\n  - {{ name: b, url: \"{}\", provider: pb, match: {{ path_prefix: /b }} }}\nreplay: {{ wait_for_token: 60s }}\n",
        cc_yaml("pa", &idp_a),
        cc_yaml("pb", &idp_b),
        api_a.url(),
        api_b.url()
    );
    let sc = Sidecar::start(&yaml).await;

    // Requests for b wait for a token that cannot be had while the IdP of b is down...
    let client = reqwest::Client::new();
    let waiting: Vec<_> = (0..5)
        .map(|i| {
            let req = client.get(sc.url(&format!("/b/{i}"))).send();
            tokio::spawn(async move { req.await.map(|r| r.status().as_u16()) })
        })
        .collect();
    wait_until(
        Duration::from_secs(20),
        || async { waiting_requests(&sc).await >= 5.0 },
        || format!("the b requests never waited\n{}", sc.logs()),
    )
    .await;
    // Meanwhile a is served, with a's tokens.
    for i in 0..20 {
        through(&sc, &api_a, &format!("/a/{i}")).await;
    }
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "b answered without a token"
    );
    assert_eq!(api_b.count(), 0);
    let ready = reqwest::get(sc.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let why: serde_json::Value = ready.json().await.unwrap();
    let names: Vec<_> = why["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["provider"].clone())
        .collect();
    assert_eq!(names, ["pb"], "{why}");

    // The IdP of b comes back: the waiting requests go out with b's tokens.
    idp_b.set_failure(None);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap(), 200, "{}", sc.logs());
    }
    through(&sc, &api_b, "/b/after").await;
    for r in api_a.requests() {
        let t = r.token.unwrap();
        assert!(idp_a.registry().is_valid(&t) && !idp_b.registry().is_valid(&t));
    }
    for r in api_b.requests() {
        let t = r.token.unwrap();
        assert!(idp_b.registry().is_valid(&t) && !idp_a.registry().is_valid(&t));
    }
    assert_eq!(idp_a.calls(), 1);
    assert_eq!(
        reqwest::get(sc.admin_url("/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    healthy(&sc).await;
}

// ---------------------------------------------------------------------------------------------
// 8. No secret in the logs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_secret_or_token_in_debug_logs_for_any_provider_type() {
    const CLIENT_SECRET: &str = "cs-logs-8e41d0a7";
    const API_KEY: &str = "ak-logs-2c95f1b3";
    const WRONG_PASSWORD: &str = "pw-wrong-71ad3e09";
    const WRONG_API_KEY: &str = "ak-wrong-9f04b2c6";
    let idp = MockIdp::start(IdpConfig {
        client_id: "logs-client".to_owned(),
        client_secret: CLIENT_SECRET.to_owned(),
        users: vec![(USER.to_owned(), PASSWORD.to_owned())],
        api_keys: vec![("trader".to_owned(), API_KEY.to_owned())],
        ..IdpConfig::default()
    })
    .await;
    let registry = idp.registry();
    let api = MockUpstream::start(UpstreamConfig::checking(registry.clone())).await;
    let dir = Scratch::new("logs");
    let rt0 = idp.issue_refresh_token();
    let exec_token = registry.issue(HOUR);
    let script = dir.path("get-token.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho 'get-token: fetched' >&2\necho '{{\"token\": \"{exec_token}\", \"expires_in\": 3600}}'\n"),
    )
    .unwrap();
    let file_token = registry.issue(HOUR);
    let token_file = dir.path("token");
    std::fs::write(&token_file, &file_token).unwrap();
    let static_token = registry.issue(HOUR);
    let store_key = keygen();

    let t = idp.token_url();
    let oauth = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    token_url: \"{t}\"\n    client_id: logs-client\n    {REFRESH}\n{extra}"
        )
    };
    let mut yaml = String::from("providers:\n");
    yaml += &oauth(
        "cc",
        "    type: oauth2_client_credentials\n    client_secret: \"${env:CS}\"\n",
    );
    yaml += &oauth(
        "post",
        &format!("    type: oauth2_client_credentials\n    client_secret: {CLIENT_SECRET}\n    client_auth: client_secret_post\n"),
    );
    yaml += &oauth(
        "jwt",
        &format!(
            "    type: oauth2_client_credentials\n    client_auth: private_key_jwt\n    private_key: \"${{file:{}}}\"\n",
            testdata("rsa-test-key.pem").display()
        ),
    );
    yaml += &oauth(
        "pw",
        &format!("    type: oauth2_password\n    client_secret: \"${{env:CS}}\"\n    username: {USER}\n    password: \"${{env:PW}}\"\n"),
    );
    yaml += &oauth(
        "rt",
        &format!(
            "    type: oauth2_refresh_token\n    client_secret: \"${{env:CS}}\"\n    refresh_token: \"${{env:RT}}\"\n    login: {{ type: oauth2_password, username: {USER}, password: \"${{env:PW}}\" }}\n    store: {{ path: \"{}\", key: \"${{env:STORE_KEY}}\" }}\n",
            dir.path("rt.tok").display()
        ),
    );
    yaml += &oauth(
        "badpw",
        &format!("    type: oauth2_password\n    client_secret: \"${{env:CS}}\"\n    username: {USER}\n    password: {WRONG_PASSWORD}\n"),
    );
    yaml += &format!(
        r#"  jl:
    type: json_login
    login: {{ url: "{login}", body: {{ userName: trader, apiKey: "${{env:API_KEY}}" }}, token_pointer: /token, expires_in_pointer: /expiresIn, success_pointer: /success }}
    renew: {{ url: "{validate}", token_pointer: /newToken }}
    {REFRESH}
  badjl:
    type: json_login
    login: {{ url: "{login}", body: {{ userName: trader, apiKey: {WRONG_API_KEY} }}, token_pointer: /token, success_pointer: /success }}
    {REFRESH}
  ex: {{ type: exec, command: ["/bin/sh", "{script}"], {REFRESH} }}
  fi: {{ type: file, path: "{file}", {REFRESH} }}
  st: {{ type: static, token: "${{env:STATIC}}" }}
"#,
        login = idp.login_url(),
        validate = idp.validate_url(),
        script = script.display(),
        file = token_file.display(),
    );
    let good = ["cc", "post", "jwt", "pw", "rt", "jl", "ex", "fi", "st"];
    yaml += "upstreams:\n";
    for name in good.iter().chain(&["badpw", "badjl"]) {
        yaml += &format!(
            "  - {{ name: {name}, url: \"{}\", provider: {name}, match: {{ path_prefix: /{name} }} }}\n",
            api.url()
        );
    }
    yaml += "replay: { wait_for_token: 2s }\nlog: { level: debug }\n";
    let sc = Sidecar::start_with_env(
        &yaml,
        &[
            ("CS", CLIENT_SECRET),
            ("PW", PASSWORD),
            ("RT", &rt0),
            ("API_KEY", API_KEY),
            ("STATIC", &static_token),
            ("STORE_KEY", &store_key),
        ],
    )
    .await;

    // Every provider's first token, a refresh (rotation, renew, re-run, re-read) and its second.
    for name in good {
        through(&sc, &api, &format!("/{name}/first")).await;
        force_refresh(&sc, name).await;
        through(&sc, &api, &format!("/{name}/second")).await;
    }
    // The refresh-token fallback path: invalid_grant, then the password login.
    idp.revoke_refresh_tokens();
    force_refresh(&sc, "rt").await;
    through(&sc, &api, "/rt/third").await;

    // Failed logins: their errors are logged and they stay unusable.
    let status = sc
        .wait_status(Duration::from_secs(15), |v| {
            ["badpw", "badjl"]
                .iter()
                .all(|n| provider_status(v, n)["refresh_failed"].as_u64() >= Some(1))
        })
        .await;
    assert!(
        provider_status(&status, "badpw")["last_error"]
            .as_str()
            .unwrap()
            .contains("wrong username or password"),
        "{status}"
    );
    for name in ["badpw", "badjl"] {
        let r = reqwest::get(sc.url(&format!("/{name}/x"))).await.unwrap();
        assert_eq!(r.status(), 503);
    }
    let logs = sc.logs();
    assert!(logs.contains("wrong username or password"), "{logs}");
    assert!(logs.contains("Invalid user name or API key"), "{logs}");
    assert!(logs.contains("DEBUG"), "debug logging is not on");

    // Everything secret that was in play.
    let mut secrets: Vec<(String, String)> = vec![
        ("client secret".into(), CLIENT_SECRET.into()),
        ("password".into(), PASSWORD.into()),
        ("wrong password".into(), WRONG_PASSWORD.into()),
        ("api key".into(), API_KEY.into()),
        ("wrong api key".into(), WRONG_API_KEY.into()),
        ("initial refresh token".into(), rt0.clone()),
        ("store key".into(), store_key.clone()),
        ("exec token".into(), exec_token.clone()),
        ("file token".into(), file_token.clone()),
        ("static token".into(), static_token.clone()),
    ];
    let pem = std::fs::read_to_string(testdata("rsa-test-key.pem")).unwrap();
    let pem_line = pem.lines().nth(1).unwrap().to_owned();
    secrets.push(("private key".into(), pem_line));
    for r in idp.requests() {
        for field in ["refresh_token", "client_assertion", "password"] {
            if let Some(v) = r.params.get(field) {
                secrets.push((field.into(), v.clone()));
            }
        }
    }
    for r in api.requests() {
        if let Some(t) = r.token {
            secrets.push(("access token".into(), t));
        }
    }
    assert!(secrets.len() > 30, "{}", secrets.len());
    let admin = sc.admin_text("/v1/token/status").await;
    let metrics = sc.admin_text("/metrics").await;
    for (what, secret) in &secrets {
        // The offending lines are shown with the secret itself masked.
        let leaks: Vec<String> = logs
            .lines()
            .filter(|l| l.contains(secret.as_str()))
            .map(|l| l.replace(secret.as_str(), &format!("<{what}>")))
            .collect();
        assert!(leaks.is_empty(), "{what} in the logs: {leaks:#?}");
        assert!(!admin.contains(secret.as_str()), "{what} in the status");
        assert!(!metrics.contains(secret.as_str()), "{what} in the metrics");
    }
    healthy(&sc).await;
}
