//! Many providers in one sidecar, through the real binary: each upstream uses its
//! own provider and a failing IdP blocks only its own; no secret or token of any provider type
//! reaches the debug logs, the status or the metrics.

mod support;

use std::time::Duration;

use sidecar_mocks::{Failure, IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::metrics::waiting_requests;
use support::providers::{
    cc_provider, force_refresh, healthy, idp_ttl, keygen, provider_status, testdata, through, HOUR,
    PASSWORD, REFRESH, USER,
};
use support::{wait_until, Scratch, Sidecar};

#[tokio::test]
async fn each_upstream_uses_its_own_provider_and_a_failing_idp_blocks_only_its_own() {
    let idp_a = idp_ttl(HOUR).await;
    let idp_b = idp_ttl(HOUR).await;
    idp_b.set_failure(Some(Failure::Down));
    let api_a = MockUpstream::start(UpstreamConfig::checking(idp_a.registry())).await;
    let api_b = MockUpstream::start(UpstreamConfig::checking(idp_b.registry())).await;
    let yaml = format!(
        "providers:\n{}{}upstreams:\n  - {{ name: a, url: \"{}\", provider: pa, match: {{ path_prefix: /a }} }}\n  - {{ name: b, url: \"{}\", provider: pb, match: {{ path_prefix: /b }} }}\nreplay: {{ wait_for_token: 60s }}\n",
        cc_provider("pa", &idp_a, REFRESH),
        cc_provider("pb", &idp_b, REFRESH),
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
