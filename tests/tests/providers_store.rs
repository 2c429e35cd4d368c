//! The encrypted token store through the real binary: restarts served from it without
//! an IdP call (key or passphrase), corrupt, truncated, wrong-key and foreign files ignored with a
//! warning, kill -9 right after a rotation, and a refused stored refresh token.

mod support;

use std::path::Path;
use std::time::Duration;

use sidecar_mocks::{MockIdp, MockUpstream, UpstreamConfig};
use support::providers::{
    force_refresh, healthy, idp_ttl, keygen, provider_status, through, token_of, wait_tokens, HOUR,
    REFRESH,
};
use support::{Scratch, Sidecar};

/// Stops a sidecar with SIGTERM and waits for it to exit cleanly.
async fn stop(sc: &mut Sidecar) {
    sc.signal("TERM");
    let status = sc
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("sidecar did not stop");
    assert!(status.success(), "{status}\n{}", sc.logs());
}

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
    let yaml = rt_with_store(&idp, &store, &api);
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
    let yaml = rt_with_store(&idp, &store, &api);
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

/// A refresh-token provider `rt` without login fallback whose tokens are kept in `store` (key in
/// `STORE_KEY`, first refresh token in `RT`), in front of `api`.
fn rt_with_store(idp: &MockIdp, store: &Path, api: &MockUpstream) -> String {
    format!(
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
    )
}
