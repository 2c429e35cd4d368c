//! The provider types that log in at an identity provider, end to end through the real binary
//!: OAuth2 client credentials (client_secret_post, private_key_jwt with RSA and EC),
//! password grant, refresh token with rotation and login fallback, JSON login with renew.

mod support;

use base64::Engine as _;
use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::providers::{
    force_refresh, healthy, idp_ttl, provider_status, testdata, through, token_of, HOUR, PASSWORD,
    REFRESH, USER,
};
use support::Sidecar;

fn jwt_header(jwt: &str) -> serde_json::Value {
    let head = jwt.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

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
