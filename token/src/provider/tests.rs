//! Every provider type against the mock IdP (or a tiny in-test server / a real command), built
//! from YAML through the config crate so the keys of SPEC §5 are exercised too.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_2048_8192_SHA256,
};
use sidecar_config::{Config, Provider as ProviderConfig};
use sidecar_mocks::{IdpConfig, MockIdp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const RSA_PKCS8: &str = include_str!("testdata/rsa-test-key.pem");
const RSA_PKCS1: &str = include_str!("testdata/rsa-test-key-pkcs1.pem");
const EC_PKCS8: &str = include_str!("testdata/ec-pkcs8.pem");
const EC_SEC1: &str = include_str!("testdata/ec-sec1.pem");

/// Parses `providers: { p: <body> }` and returns provider `p`.
fn config(body: &str) -> ProviderConfig {
    let yaml = format!("providers:\n  p: {body}\n");
    match Config::parse(&yaml, "test.yaml") {
        Ok(c) => c.providers["p"].clone(),
        Err(e) => panic!("{e}\n{yaml}"),
    }
}

fn build(body: &str) -> Box<dyn Provider> {
    build_provider(&config(body).kind)
}

async fn idp() -> MockIdp {
    MockIdp::start(IdpConfig {
        users: vec![("alice".into(), "pa55-SECRET-word".into())],
        ..IdpConfig::default()
    })
    .await
}

fn grants(idp: &MockIdp) -> Vec<String> {
    idp.requests().into_iter().map(|r| r.grant_type).collect()
}

/// Tolerates YAML quoting of a PEM key: written to a file and referenced with `${file:}`.
fn key_file(pem: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "sidecar-key-{}-{:x}.pem",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn client_credentials_basic_and_post() {
    let idp = idp().await;
    for auth in ["client_secret_basic", "client_secret_post"] {
        let p = build(&format!(
            "{{ type: oauth2_client_credentials, token_url: '{}', client_id: demo-client, \
             client_secret: demo-secret, client_auth: {auth}, scopes: [a, b] }}",
            idp.token_url()
        ));
        let f = p.fetch(&Held::default()).await.unwrap();
        assert!(idp.registry().is_valid(&f.access_token));
        assert_eq!(f.expires_in, Some(Duration::from_secs(3600)));
        assert!(f.refresh_token.is_none());
    }
    let methods: Vec<String> = idp.requests().into_iter().map(|r| r.auth_method).collect();
    assert_eq!(methods, ["basic", "post"]);
    assert_eq!(idp.requests()[0].scope.as_deref(), Some("a b"));
}

fn verify_assertion(idp: &MockIdp, verify: impl Fn(&[u8], &[u8]) -> bool, alg: &str) {
    let req = idp.requests().pop().unwrap();
    assert_eq!(req.auth_method, "private_key_jwt");
    assert_eq!(
        req.params["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    let jwt = &req.params["client_assertion"];
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    assert!(
        verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap()),
        "bad signature"
    );
    let (header, claims) = input.split_once('.').unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(header["alg"], alg);
    assert_eq!(header["kid"], "key-1");
    assert_eq!(claims["iss"], "demo-client");
    assert_eq!(claims["sub"], "demo-client");
    assert_eq!(claims["aud"], idp.token_url());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        60
    );
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16));
}

fn jwt_provider(idp: &MockIdp, pem: &str) -> Box<dyn Provider> {
    build(&format!(
        "{{ type: oauth2_client_credentials, token_url: '{}', client_id: demo-client, \
         client_auth: private_key_jwt, private_key: '${{file:{}}}', key_id: key-1 }}",
        idp.token_url(),
        key_file(pem)
    ))
}

#[tokio::test]
async fn private_key_jwt_es256() {
    let idp = idp().await;
    let p = jwt_provider(&idp, EC_PKCS8);
    let f = p.fetch(&Held::default()).await.unwrap();
    assert!(idp.registry().is_valid(&f.access_token));
    let (_, der) = assertion::pem_block(EC_PKCS8).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).unwrap();
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, kp.public_key().as_ref().to_vec());
    verify_assertion(&idp, |m, s| public.verify(m, s).is_ok(), "ES256");
}

#[tokio::test]
async fn private_key_jwt_rs256_pkcs8_and_pkcs1() {
    let idp = idp().await;
    let (_, der) = assertion::pem_block(RSA_PKCS8).unwrap();
    let kp = RsaKeyPair::from_pkcs8(&der).unwrap();
    let public = UnparsedPublicKey::new(
        &RSA_PKCS1_2048_8192_SHA256,
        kp.public_key().as_ref().to_vec(),
    );
    for pem in [RSA_PKCS8, RSA_PKCS1] {
        let p = jwt_provider(&idp, pem);
        p.fetch(&Held::default()).await.unwrap();
        verify_assertion(&idp, |m, s| public.verify(m, s).is_ok(), "RS256");
    }
}

#[tokio::test]
async fn unusable_private_keys_fail_clearly_without_showing_the_key() {
    let idp = idp().await;
    let broken = EC_PKCS8.replace("MIG", "AAA");
    for (pem, expect) in [(EC_SEC1, "SEC1"), (broken.as_str(), "key")] {
        let p = jwt_provider(&idp, pem);
        let err = p.fetch(&Held::default()).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ProviderError::Setup(_)), "{text}");
        assert!(text.contains(expect), "{text}");
        let body: String = pem.lines().nth(1).unwrap().to_string();
        assert!(!text.contains(&body[..20]), "{text}");
    }
    assert_eq!(idp.calls(), 0, "nothing was sent");
    let path = key_file(EC_SEC1);
    let bad = config(&format!(
        "{{ type: oauth2_client_credentials, token_url: 'http://x/t', client_id: c, \
         client_auth: private_key_jwt, private_key: '${{file:{path}}}' }}"
    ));
    let err = check_provider(&bad.kind).unwrap_err();
    assert!(err.contains("SEC1") && !err.contains("BEGIN"), "{err}");
    let good = config(&format!(
        "{{ type: oauth2_client_credentials, token_url: 'http://x/t', client_id: c, \
         client_auth: private_key_jwt, private_key: '${{file:{}}}' }}",
        key_file(RSA_PKCS1)
    ));
    assert_eq!(check_provider(&good.kind), Ok(()));
}

#[tokio::test]
async fn password_then_refresh_grants_then_password_again() {
    let idp = idp().await;
    let p = build(&format!(
        "{{ type: oauth2_password, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, username: alice, password: pa55-SECRET-word }}",
        idp.token_url()
    ));
    let first = p.fetch(&Held::default()).await.unwrap();
    let rt1 = first.refresh_token.clone().unwrap();
    let held = Held {
        access_token: Some(first.access_token),
        refresh_token: Some(rt1.clone()),
    };
    let second = p.fetch(&held).await.unwrap();
    let rt2 = second.refresh_token.clone().unwrap();
    assert_ne!(rt1, rt2, "rotated");
    assert!(!idp.refresh_token_valid(&rt1) && idp.refresh_token_valid(&rt2));
    // The IdP forgets the session: invalid_grant, and the provider logs in with the password.
    idp.revoke_refresh_tokens();
    let third = p
        .fetch(&Held {
            access_token: None,
            refresh_token: Some(rt2),
        })
        .await
        .unwrap();
    assert!(idp.refresh_token_valid(third.refresh_token.as_deref().unwrap()));
    assert_eq!(
        grants(&idp),
        ["password", "refresh_token", "refresh_token", "password"]
    );
    // A wrong password is a refusal whose message never shows the password.
    let wrong = build(&format!(
        "{{ type: oauth2_password, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, username: alice, password: WRONG-SECRET-pw }}",
        idp.token_url()
    ));
    let err = wrong.fetch(&Held::default()).await.unwrap_err();
    assert!(err.is_invalid_grant(), "{err}");
    assert!(!err.to_string().contains("SECRET"), "{err}");
}

#[tokio::test]
async fn refresh_token_rotates_and_falls_back_to_login() {
    let idp = idp().await;
    let initial = idp.issue_refresh_token();
    let p = build(&format!(
        "{{ type: oauth2_refresh_token, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, refresh_token: '{initial}', \
         login: {{ type: oauth2_password, username: alice, password: pa55-SECRET-word }} }}",
        idp.token_url()
    ));
    let first = p.fetch(&Held::default()).await.unwrap();
    let rt1 = first.refresh_token.clone().unwrap();
    assert!(
        !idp.refresh_token_valid(&initial),
        "the initial one was consumed"
    );
    let held = Held {
        access_token: None,
        refresh_token: Some(rt1.clone()),
    };
    let second = p.fetch(&held).await.unwrap();
    assert_ne!(second.refresh_token.as_deref(), Some(rt1.as_str()));
    idp.revoke_refresh_tokens();
    let third = p
        .fetch(&Held {
            access_token: None,
            refresh_token: second.refresh_token,
        })
        .await
        .unwrap();
    assert!(idp.registry().is_valid(&third.access_token));
    assert_eq!(
        grants(&idp),
        [
            "refresh_token",
            "refresh_token",
            "refresh_token",
            "password"
        ]
    );
}

#[tokio::test]
async fn refresh_token_without_rotation_keeps_the_old_one() {
    let idp = idp().await;
    idp.set_rotate_refresh_tokens(false);
    let initial = idp.issue_refresh_token();
    let p = build(&format!(
        "{{ type: oauth2_refresh_token, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, refresh_token: '{initial}' }}",
        idp.token_url()
    ));
    let f = p.fetch(&Held::default()).await.unwrap();
    assert_eq!(f.refresh_token.as_deref(), Some(initial.as_str()));
}

#[tokio::test]
async fn refused_initial_refresh_token_is_never_sent_again() {
    let idp = idp().await;
    let p = build(&format!(
        "{{ type: oauth2_refresh_token, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, refresh_token: rt-never-issued-SECRET }}",
        idp.token_url()
    ));
    let err = p.fetch(&Held::default()).await.unwrap_err();
    assert!(err.is_invalid_grant(), "{err}");
    let err = p.fetch(&Held::default()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Setup(_)), "{err}");
    assert!(!err.to_string().contains("SECRET"));
    assert_eq!(idp.calls(), 1, "the refused token was sent once");
    // With a client-credentials fallback the provider keeps working.
    let p = build(&format!(
        "{{ type: oauth2_refresh_token, token_url: '{}', client_id: demo-client, \
         client_secret: demo-secret, refresh_token: rt-never-issued, \
         login: {{ type: oauth2_client_credentials }} }}",
        idp.token_url()
    ));
    p.fetch(&Held::default()).await.unwrap();
    p.fetch(&Held::default()).await.unwrap();
    assert_eq!(
        grants(&idp)[1..],
        ["refresh_token", "client_credentials", "client_credentials"]
    );
}

/// `var` is a per-test environment variable: tests run in parallel.
fn json_login(idp: &MockIdp, var: &str, api_key: &str, renew: bool) -> Box<dyn Provider> {
    std::env::set_var(var, api_key);
    let renew = if renew {
        format!(
            ", renew: {{ url: '{}', token_pointer: /newToken }}",
            idp.validate_url()
        )
    } else {
        String::new()
    };
    build(&format!(
        "{{ type: json_login, login: {{ url: '{}', method: POST, headers: {{ X-Client: tests }}, \
         body: {{ userName: demo-user, apiKey: '${{env:{var}}}' }}, \
         token_pointer: /token, expires_in_pointer: /expiresIn, success_pointer: /success }}{renew} }}",
        idp.login_url()
    ))
}

#[tokio::test]
async fn json_login_and_renew() {
    let idp = idp().await;
    let p = json_login(&idp, "SIDECAR_TOKEN_TEST_KEY_OK", "demo-api-key", true);
    let first = p.fetch(&Held::default()).await.unwrap();
    assert!(idp.registry().is_valid(&first.access_token));
    assert_eq!(first.expires_in, Some(Duration::from_secs(3600)));
    let held = Held {
        access_token: Some(first.access_token.clone()),
        refresh_token: None,
    };
    let renewed = p.fetch(&held).await.unwrap();
    assert_ne!(renewed.access_token, first.access_token);
    assert!(idp.registry().is_valid(&renewed.access_token));
    let requests = idp.requests();
    assert_eq!(requests[1].auth_method, "bearer");
    // The session died: renew fails, the provider logs in again.
    idp.registry().revoke_all();
    let again = p.fetch(&held).await.unwrap();
    assert!(idp.registry().is_valid(&again.access_token));
    assert_eq!(
        grants(&idp),
        ["json_login", "json_renew", "json_renew", "json_login"]
    );
}

#[tokio::test]
async fn json_login_failure_carries_the_message_not_the_key() {
    let idp = idp().await;
    let p = json_login(
        &idp,
        "SIDECAR_TOKEN_TEST_KEY_WRONG",
        "wrong-SECRET-key",
        false,
    );
    let err = p.fetch(&Held::default()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Invalid user name or API key"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}

/// Answers every connection with one fixed HTTP response; returns its URL.
async fn fixed_server(status: u16, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn json_login_pointers_and_error_shapes() {
    let ok = fixed_server(
        200,
        r#"{"data":{"jwt":"tok-abc","exp":"2999-01-01T00:00:00Z"},"ok":"true"}"#,
    )
    .await;
    let p = build(&format!(
        "{{ type: json_login, login: {{ url: '{ok}', token_pointer: /data/jwt, \
         expires_at_pointer: /data/exp, success_pointer: /ok }} }}"
    ));
    let f = p.fetch(&Held::default()).await.unwrap();
    assert_eq!(f.access_token, "tok-abc");
    assert!(f.expires_in.unwrap() > Duration::from_secs(365 * 24 * 3600));
    // An error the IdP writes with the secret in it: scrubbed.
    let echo = fixed_server(
        200,
        r#"{"success":false,"error":{"text":"bad key echo-SECRET-key"}}"#,
    )
    .await;
    std::env::set_var("SIDECAR_TOKEN_TEST_ECHO", "echo-SECRET-key");
    let p = build(&format!(
        "{{ type: json_login, login: {{ url: '{echo}', body: {{ k: '${{env:SIDECAR_TOKEN_TEST_ECHO}}' }}, \
         token_pointer: /token, success_pointer: /success, error_pointer: /error/text }} }}"
    ));
    let err = p.fetch(&Held::default()).await.unwrap_err().to_string();
    assert!(err.contains("bad key <redacted>"), "{err}");
    // Not JSON, and a 500 with a message.
    let html = fixed_server(200, "<html>").await;
    let p = build(&format!(
        "{{ type: json_login, login: {{ url: '{html}', token_pointer: /token }} }}"
    ));
    assert!(matches!(
        p.fetch(&Held::default()).await,
        Err(ProviderError::Malformed(_))
    ));
    let down = fixed_server(500, r#"{"message":"maintenance"}"#).await;
    let p = build(&format!(
        "{{ type: json_login, login: {{ url: '{down}', token_pointer: /token }} }}"
    ));
    let err = p.fetch(&Held::default()).await.unwrap_err().to_string();
    assert!(err.contains("500") && err.contains("maintenance"), "{err}");
}

#[tokio::test]
async fn oauth_error_messages_scrub_echoed_secrets() {
    let url = fixed_server(
        401,
        r#"{"error":"invalid_client","error_description":"secret cs-SECRET-value is wrong"}"#,
    )
    .await;
    let p = build(&format!(
        "{{ type: oauth2_client_credentials, token_url: '{url}', client_id: c, \
         client_secret: cs-SECRET-value }}"
    ));
    let err = p.fetch(&Held::default()).await.unwrap_err().to_string();
    assert!(
        err.contains("invalid_client") && err.contains("<redacted>"),
        "{err}"
    );
    assert!(!err.contains("SECRET"), "{err}");
}

fn exec(script: &str, timeout: &str) -> Box<dyn Provider> {
    let script = script.replace('\'', "''");
    build(&format!(
        "{{ type: exec, command: [sh, -c, '{script}'], timeout: {timeout}, \
         env: {{ TOKEN_TEST_VALUE: from-env }} }}"
    ))
}

#[tokio::test]
async fn exec_reads_every_output_shape() {
    let f = exec("echo \"$TOKEN_TEST_VALUE\"; echo second-line", "5s")
        .fetch(&Held::default())
        .await
        .unwrap();
    assert_eq!(f.access_token, "from-env");
    assert_eq!(f.expires_in, None);
    let f = exec(r#"echo '{"token":"t-json","expires_in":120}'"#, "5s")
        .fetch(&Held::default())
        .await
        .unwrap();
    assert_eq!(
        (f.access_token.as_str(), f.expires_in),
        ("t-json", Some(Duration::from_secs(120)))
    );
    let f = exec(
        r#"echo '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"t-k8s","expirationTimestamp":"2999-01-01T00:00:00Z"}}'"#,
        "5s",
    )
    .fetch(&Held::default())
    .await
    .unwrap();
    assert_eq!(f.access_token, "t-k8s");
    assert!(f.expires_in.unwrap() > Duration::from_secs(3600));
}

#[tokio::test]
async fn exec_failures_name_the_exit_and_stderr_but_not_stdout() {
    let err = exec("echo stdout-SECRET; echo 'login expired' >&2; exit 3", "5s")
        .fetch(&Held::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exited with 3") && err.contains("login expired"),
        "{err}"
    );
    assert!(!err.contains("SECRET"), "{err}");
    let err = exec("sleep 30", "200ms")
        .fetch(&Held::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not finish within 200ms"), "{err}");
    let missing = build("{ type: exec, command: [/nonexistent/get-token] }");
    let err = missing.fetch(&Held::default()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Setup(_)), "{err}");
    for out in ["", "{\"nope\":1}", "{broken"] {
        assert!(exec::parse_output(out.as_bytes()).is_err(), "{out:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn file_is_reread_when_replaced_by_rename() {
    let dir = std::env::temp_dir().join(format!(
        "sidecar-file-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, "first-token\n").unwrap();
    let p = build(&format!("{{ type: file, path: '{}' }}", path.display()));
    assert_eq!(
        p.fetch(&Held::default()).await.unwrap().access_token,
        "first-token"
    );
    // Unchanged: no wake-up.
    let quiet = tokio::time::timeout(Duration::from_secs(5), p.changed().unwrap()).await;
    assert!(quiet.is_err(), "woke up without a change");
    // Replaced the way kubelet and vault agents do it: write elsewhere, rename over.
    let tmp = dir.join(".token.new");
    std::fs::write(&tmp, "second-token").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    tokio::time::timeout(Duration::from_secs(5), p.changed().unwrap())
        .await
        .expect("the replacement was not noticed");
    assert_eq!(
        p.fetch(&Held::default()).await.unwrap().access_token,
        "second-token"
    );
    std::fs::write(&path, "  \n").unwrap();
    assert!(p.fetch(&Held::default()).await.is_err(), "empty file");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(
        p.fetch(&Held::default()).await,
        Err(ProviderError::Setup(_))
    ));
}

#[test]
fn debug_output_never_shows_secrets() {
    std::env::set_var("SIDECAR_TOKEN_TEST_KEY_DEBUG", "apikey-SECRET");
    let configs = [
        "{ type: oauth2_client_credentials, token_url: 'http://x/t', client_id: c, client_secret: cs-SECRET }".to_string(),
        "{ type: oauth2_refresh_token, token_url: 'http://x/t', client_id: c, client_secret: cs-SECRET, refresh_token: rt-SECRET, login: { type: oauth2_password, username: u, password: pw-SECRET } }".to_string(),
        "{ type: oauth2_password, token_url: 'http://x/t', client_id: c, username: u, password: pw-SECRET }".to_string(),
        "{ type: json_login, login: { url: 'http://x/l', headers: { X-Api-Key: hdr-SECRET }, body: { apiKey: '${env:SIDECAR_TOKEN_TEST_KEY_DEBUG}' }, token_pointer: /token } }".to_string(),
        "{ type: exec, command: [x], env: { K: env-SECRET } }".to_string(),
        "{ type: static, token: st-SECRET, store: { path: /tmp/x.tok, key: store-SECRET } }".to_string(),
    ];
    for c in &configs {
        let p = config(c);
        let debug = format!("{p:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        let yaml = format!("providers:\n  p: {c}\n");
        let printed = Config::parse(&yaml, "t.yaml").unwrap().redacted_yaml();
        assert!(!printed.contains("SECRET"), "{printed}");
    }
    let f = Fetched {
        access_token: "at-SECRET".into(),
        expires_in: None,
        refresh_token: Some("rt-SECRET".into()),
    };
    let h = Held {
        access_token: Some("at-SECRET".into()),
        refresh_token: Some("rt-SECRET".into()),
    };
    let signer = AssertionSigner::from_pem(EC_PKCS8, None).unwrap();
    for d in [format!("{f:?}"), format!("{h:?}"), format!("{signer:?}")] {
        assert!(!d.contains("SECRET") && !d.contains("MIG"), "{d}");
    }
}
