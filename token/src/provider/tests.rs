//! Every provider type against the mock IdP (or a tiny in-test server / a real command), built
//! from YAML through the config crate so the providers' config keys are exercised too.

use std::path::Path;
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

use super::lifetime::{seconds, until};
use super::redact::{lower_hex, Redactor};
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
    build_provider(&config(body).kind, &sidecar_config::Tls::default()).unwrap()
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
        r#"{"data":{"jwt":"tok-abc","exp":"2099-01-01T00:00:00Z"},"ok":"true"}"#,
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
        r#"echo '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"t-k8s","expirationTimestamp":"2099-01-01T00:00:00Z"}}'"#,
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
    // A helper that echoes its environment on failure: the `env:` values stay out.
    let err = exec(
        "echo \"auth with $TOKEN_TEST_VALUE failed\" >&2; exit 2",
        "5s",
    )
    .fetch(&Held::default())
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth with <redacted> failed"), "{err}");
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

// ---------------------------------------------------------------------------------------------
// Hostile identity providers (issue 11)
// ---------------------------------------------------------------------------------------------

use base64::engine::general_purpose::STANDARD;
use sidecar_config::MAX_DURATION;
use sidecar_mocks::{Catcher, Hostile};

/// The configs of every provider that sends credentials to an IdP URL, against `idp`; the
/// secrets they send are `cs/+ SECRET=1&x` (client), `pw/+ SECRET"2` (password) and
/// `key/+ SECRET"3` (API key, by `var`).
fn credential_providers(idp: &MockIdp, var: &str) -> Vec<(&'static str, Box<dyn Provider>)> {
    std::env::set_var(var, "key/+ SECRET\"3");
    let cc = |auth: &str| {
        build(&format!(
            "{{ type: oauth2_client_credentials, token_url: '{}', client_id: 'demo client', \
             client_secret: 'cs/+ SECRET=1&x', client_auth: {auth} }}",
            idp.token_url()
        ))
    };
    vec![
        ("client_secret_basic", cc("client_secret_basic")),
        ("client_secret_post", cc("client_secret_post")),
        (
            "password",
            build(&format!(
                "{{ type: oauth2_password, token_url: '{}', client_id: demo-client, \
                 client_secret: 'cs/+ SECRET=1&x', username: alice, password: 'pw/+ SECRET\"2' }}",
                idp.token_url()
            )),
        ),
        (
            "json_login",
            build(&format!(
                "{{ type: json_login, login: {{ url: '{}', body: {{ userName: demo-user, \
                 apiKey: '${{env:{var}}}' }}, token_pointer: /token, success_pointer: /success }} }}",
                idp.login_url()
            )),
        ),
    ]
}

#[tokio::test]
async fn redirects_are_refused_and_nothing_reaches_the_redirect_target() {
    let idp = idp().await;
    let elsewhere = Catcher::start().await;
    idp.set_hostile(Some(Hostile::Redirect(elsewhere.url())));
    for (what, p) in credential_providers(&idp, "SIDECAR_TOKEN_TEST_KEY_REDIRECT") {
        let err = p.fetch(&Held::default()).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ProviderError::Rejected { status: 307, .. }),
            "{what}: {text}"
        );
        assert!(text.contains("not followed"), "{what}: {text}");
        assert!(!text.contains("SECRET"), "{what}: {text}");
    }
    assert_eq!(idp.calls(), 4, "each provider asked the IdP once");
    assert_eq!(
        elsewhere.connections(),
        0,
        "the redirect target was contacted: {:?}",
        String::from_utf8_lossy(&elsewhere.received())
    );
}

/// Every way the secrets of [`credential_providers`] may come back from an IdP that echoes
/// the request: raw, form-encoded, percent-encoded, JSON-escaped, base64 of `id:secret`.
fn forbidden_encodings() -> Vec<String> {
    let form = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let mut out = Vec::new();
    for s in ["cs/+ SECRET=1&x", "pw/+ SECRET\"2", "key/+ SECRET\"3"] {
        out.push(s.to_string());
        out.push(form(s));
        out.push(form(s).replace('+', "%20"));
        out.push(
            serde_json::to_string(s)
                .unwrap()
                .trim_matches('"')
                .to_string(),
        );
    }
    for id in ["demo client", "demo-client"] {
        for pair in [
            format!("{id}:cs/+ SECRET=1&x"),
            format!("{}:{}", form(id), form("cs/+ SECRET=1&x")),
        ] {
            out.push(STANDARD.encode(&pair).trim_end_matches('=').to_string());
        }
    }
    out
}

#[tokio::test]
async fn echoed_credentials_are_scrubbed_in_every_encoding() {
    let idp = idp().await;
    idp.set_hostile(Some(Hostile::EchoCredentials));
    for (what, p) in credential_providers(&idp, "SIDECAR_TOKEN_TEST_KEY_ECHO") {
        let text = p.fetch(&Held::default()).await.unwrap_err().to_string();
        // The echo is there (the message is not simply dropped), its secrets are not.
        assert!(
            text.contains("rejected") && text.contains("<redacted>"),
            "{what}: {text}"
        );
        for bad in forbidden_encodings() {
            assert!(!text.contains(&bad), "{what}: {bad:?} in {text}");
        }
        assert!(!text.contains("SECRET"), "{what}: {text}");
    }
}

#[test]
fn scrubbing_happens_before_cutting() {
    let mut r = Redactor::default();
    r.secret("a-long-SECRET-value");
    // The secret straddles the 200-byte cut: cutting first would leave its first half.
    let text = format!("{}a-long-SECRET-value", "x".repeat(190));
    let clean = r.clean(&text);
    assert!(!clean.contains("a-long"), "{clean}");
    assert!(r
        .clean("line\nbreak\u{1b}[31m")
        .chars()
        .all(|c| !c.is_control()));
}

/// Waits (bounded) until the mock has no huge answer in flight, then returns what it sent.
async fn streamed_when_closed(idp: &MockIdp) -> u64 {
    for _ in 0..500 {
        if idp.streams_open() == 0 {
            return idp.streamed_bytes();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the huge answer was never closed");
}

#[tokio::test]
async fn huge_answers_are_refused_without_reading_them() {
    const HUGE: u64 = 50_000_000;
    for declare_length in [false, true] {
        let idp = idp().await;
        idp.set_hostile(Some(Hostile::HugeBody {
            bytes: HUGE,
            declare_length,
        }));
        let providers = credential_providers(&idp, "SIDECAR_TOKEN_TEST_KEY_HUGE");
        let answers = providers.len() as u64;
        for (what, p) in providers {
            let err = p.fetch(&Held::default()).await.unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, ProviderError::Malformed(_)) && text.contains("larger than 1 MiB"),
                "{what} (length declared: {declare_length}): {text}"
            );
        }
        // Four answers of 50 MB were refused; what the mock could push before the client hung
        // up is bounded by the socket buffers (a few MiB per connection on loopback), not by
        // the answers.
        let sent = streamed_when_closed(&idp).await;
        assert!(
            sent < answers * HUGE / 2,
            "{sent} bytes sent (length declared: {declare_length})"
        );
    }
}

/// Answers every connection with `200 {"access_token": <token>, <extra>}`.
async fn token_answer(token: &str, extra: &str) -> String {
    let body: &'static str =
        Box::leak(format!(r#"{{"access_token":"{token}"{extra}}}"#).into_boxed_str());
    fixed_server(200, body).await
}

fn jwt_with(claims: &str) -> String {
    format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    )
}

fn cc_at(url: &str) -> Box<dyn Provider> {
    build(&format!(
        "{{ type: oauth2_client_credentials, token_url: '{url}', client_id: c, client_secret: s3cret }}"
    ))
}

#[tokio::test]
async fn absurd_lifetimes_are_unusable_answers_not_tokens() {
    for expires_in in [
        "1e300",
        "18446744073709551615",
        "9223372036854775807",
        "\"1e300\"",
        "\"inf\"",
        "3155760001",
    ] {
        let url = token_answer("tok", &format!(r#","expires_in":{expires_in}"#)).await;
        let err = cc_at(&url).fetch(&Held::default()).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::Malformed(ref m) if m.contains("100 years")),
            "expires_in {expires_in}: {err}"
        );
    }
    // Nothing usable: the lifetime comes from elsewhere (JWT, default_ttl), no error.
    for expires_in in ["-5", "0", "\"NaN\"", "\"-inf\"", "\"soon\"", "null", "[]"] {
        let url = token_answer("tok", &format!(r#","expires_in":{expires_in}"#)).await;
        let f = cc_at(&url).fetch(&Held::default()).await.unwrap();
        assert_eq!(f.expires_in, None, "expires_in {expires_in}");
    }
    // (A JWT `exp` past 100 years is refused by the token source: source::tests.)
    // A sane JWT exp goes through.
    let jwt = jwt_with(r#"{"exp":1900000000}"#);
    let url = token_answer(&jwt, "").await;
    assert_eq!(
        cc_at(&url)
            .fetch(&Held::default())
            .await
            .unwrap()
            .access_token,
        jwt
    );
    // expires_at far away (json_login): refused; within 100 years: read.
    for (at, ok) in [
        ("\"9999-01-01T00:00:00Z\"", false),
        ("18446744073709551615", false),
        ("1e300", false),
        ("4000000000", true),
        ("4000000000000", true),
    ] {
        let body: &'static str =
            Box::leak(format!(r#"{{"token":"t","at":{at}}}"#).into_boxed_str());
        let url = fixed_server(200, body).await;
        let p = build(&format!(
            "{{ type: json_login, login: {{ url: '{url}', token_pointer: /token, expires_at_pointer: /at }} }}"
        ));
        let got = p.fetch(&Held::default()).await;
        assert_eq!(got.is_ok(), ok, "expires_at {at}: {got:?}");
    }
}

#[tokio::test]
async fn exec_output_past_1_mib_is_an_error_not_a_hang() {
    for (script, stream) in [
        ("yes token-line", "standard output"),
        ("yes noise >&2", "standard error"),
    ] {
        let err = exec(script, "60s")
            .fetch(&Held::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("more than 1 MiB to {stream}")),
            "{script}: {err}"
        );
    }
    // Exactly 1 MiB of token is still read.
    let f = exec("head -c 1048575 /dev/zero | tr '\\0' a; echo", "60s")
        .fetch(&Held::default())
        .await
        .unwrap();
    assert_eq!(f.access_token.len(), (1 << 20) - 1);
}

#[cfg(unix)]
#[tokio::test]
async fn token_files_that_are_devices_fifos_or_huge_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!(
        "sidecar-hostile-file-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let huge = dir.join("huge");
    std::fs::write(&huge, vec![b'a'; (1 << 20) + 1]).unwrap();
    for (path, expect) in [
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (fifo.as_path(), "is a FIFO, not a regular file"),
        (huge.as_path(), "larger than 1 MiB"),
    ] {
        let p = build(&format!("{{ type: file, path: '{}' }}", path.display()));
        // Bounded so that a hang fails the test instead of stalling it.
        let got = tokio::time::timeout(Duration::from_secs(30), p.fetch(&Held::default()))
            .await
            .unwrap_or_else(|_| panic!("reading {} hung", path.display()));
        let err = got.unwrap_err().to_string();
        assert!(err.contains(expect), "{}: {err}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Property tests of the parsers of identity-provider answers
// ---------------------------------------------------------------------------------------------

mod props {
    use proptest::prelude::*;

    use super::*;

    /// Strings of `len` characters out of `set` (cheaper than a regex strategy).
    fn chars(set: &'static str, len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        let set: Vec<char> = set.chars().collect();
        proptest::collection::vec(prop::sample::select(set), len)
            .prop_map(|cs| cs.into_iter().collect())
    }

    /// Any JSON value a lifetime field may hold: numbers of every range and kind, numeric and
    /// other strings, other types.
    fn lifetime_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            (0u64..20_000_000_000).prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::Value::from(f.to_string())),
            chars("-+0123456789.eE ", 0..24).prop_map(serde_json::Value::from),
            prop::sample::select(&["NaN", "inf", "-inf", "infinity", "1e309", "-0", ""][..])
                .prop_map(serde_json::Value::from),
            chars(" !\"#09:AZaz~-T", 0..30).prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// `expires_in`: never a panic, never more than MAX_DURATION; a number past it is an
        /// unusable answer.
        #[test]
        fn expires_in_is_bounded(v in lifetime_value()) {
            let got = seconds(&v, "expires_in");
            let n = match &v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match got {
                Ok(Some(d)) => prop_assert!(d <= MAX_DURATION),
                Ok(None) => prop_assert!(n.is_none_or(|n| n.is_nan() || n <= 0.0)),
                Err(e) => {
                    prop_assert!(matches!(e, ProviderError::Malformed(_)));
                    prop_assert!(n.is_some_and(|n| n > MAX_DURATION.as_secs_f64()));
                }
            }
        }

        /// `expires_at`: never a panic, the time left is never more than MAX_DURATION.
        #[test]
        fn expires_at_is_bounded(v in lifetime_value()) {
            match until(&v, "expires_at") {
                Ok(Some(d)) => prop_assert!(d <= MAX_DURATION),
                Ok(None) => {}
                Err(e) => prop_assert!(e.to_string().contains("100 years")),
            }
        }

        /// Command output: arbitrary bytes never panic; what is accepted has a bounded lifetime.
        #[test]
        fn exec_output_never_panics(out in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(f) = exec::parse_output(&out) {
                prop_assert!(!f.access_token.is_empty());
                prop_assert!(f.expires_in.is_none_or(|d| d <= MAX_DURATION));
            }
        }

        /// Command output in each JSON shape, with any lifetime value.
        #[test]
        fn exec_json_lifetimes_are_bounded(v in lifetime_value(), shape in 0..3usize) {
            let json = match shape {
                0 => serde_json::json!({"token": "t", "expires_in": v}),
                1 => serde_json::json!({"access_token": "t", "expires_at": v}),
                _ => serde_json::json!({"kind": "ExecCredential", "status": {"token": "t", "expirationTimestamp": v}}),
            };
            match exec::parse_output(json.to_string().as_bytes()) {
                Ok(f) => prop_assert!(f.expires_in.is_none_or(|d| d <= MAX_DURATION)),
                Err(e) => prop_assert!(e.to_string().contains("100 years"), "{e}"),
            }
        }

        /// Whatever the encoding a secret comes back in, and whatever surrounds it, none is
        /// left after cleaning.
        #[test]
        fn every_encoding_of_a_secret_is_scrubbed(
            id in chars("abcxyz0189 -", 1..12),
            secret in chars("AZaz09+/=&%\" \\:", 4..24),
            before in chars("~#!", 0..10),
            after in chars("~#!", 0..10),
            which in 0..9usize,
        ) {
            let mut r = Redactor::default();
            r.basic(&id, &secret);
            let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            let forms = [
                secret.clone(),
                form.clone(),
                form.replace('+', "%20"),
                serde_json::to_string(&secret).unwrap().trim_matches('"').to_string(),
                STANDARD.encode(&secret),
                URL_SAFE_NO_PAD.encode(&secret),
                STANDARD.encode(format!("{id}:{secret}")),
                STANDARD.encode(format!("{}:{form}", url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>())),
                lower_hex(&form),
            ];
            let echoed = &forms[which];
            let clean = r.clean(&format!("{before}{echoed}{after}")).replace("<redacted>", "\u{0}");
            prop_assert!(!clean.contains(echoed.trim_end_matches('=')), "{echoed:?} left in {clean:?}");
            prop_assert!(!clean.contains(&secret), "{clean:?}");
        }
    }
}

/// An identity-provider client that cannot take its TLS settings is an error naming them; before,
/// a failed builder fell back to a default client that silently trusted other roots and
/// presented no client certificate.
#[test]
fn an_http_client_without_its_tls_settings_is_an_error_not_a_default_client() {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let tls = sidecar_config::Tls {
        ca: None,
        identity: Some(sidecar_config::Identity {
            chain: Arc::from(vec![CertificateDer::from(vec![0x30, 0x00])]),
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![
                0u8;
                16
            ]))),
        }),
    };
    let kind = config(
        "{ type: oauth2_client_credentials, token_url: \"https://idp.example/t\", client_id: c, client_secret: s }",
    )
    .kind;
    match build_provider(&kind, &tls) {
        Err(ProviderError::Setup(m)) => assert!(m.contains("tls.client_cert"), "{m}"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a provider was built without its client certificate"),
    }
}
