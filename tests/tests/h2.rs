//! TLS upstreams (`tls`): trust from `ca_file`, SNI from `server_name`, HTTP/2 by ALPN,
//! and the expired-token flow over that connection, through the real sidecar binary.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, TlsMaterial, UpstreamConfig};
use support::{Scratch, Sidecar};

/// How the sidecar is told about the TLS mock.
enum Trust {
    /// `tls: { ca_file: <the mock's CA>, server_name: localhost }`.
    MockCa,
    /// `tls: { server_name: localhost }`: the system trust store, which does not know the mock's
    /// CA.
    BuiltIn,
}

struct Setup {
    idp: MockIdp,
    api: MockUpstream,
    sc: Sidecar,
    _tls: TlsMaterial,
    _scratch: Scratch,
}

async fn setup(trust: Trust) -> Setup {
    let idp = MockIdp::start(IdpConfig {
        ttl: Duration::from_secs(3600),
        latency: Duration::from_millis(50),
        ..IdpConfig::default()
    })
    .await;
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::checking(idp.registry())).await;
    assert!(api.url().starts_with("https://127.0.0.1:"), "{}", api.url());
    let scratch = Scratch::new("h2");
    let ca = scratch.path("mock-ca.pem");
    tls.write_ca(&ca).unwrap();
    let tls_yaml = match trust {
        Trust::MockCa => format!(
            "{{ ca_file: \"{}\", server_name: localhost }}",
            ca.display()
        ),
        Trust::BuiltIn => "{ server_name: localhost }".to_owned(),
    };
    let yaml = format!(
        r#"providers:
  main:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
upstreams:
  - {{ name: api, url: "{}", provider: main, tls: {tls_yaml} }}
"#,
        idp.token_url(),
        api.url()
    );
    // The first token, before the test measures IdP calls.
    let sc = Sidecar::start_with_first_token(&yaml).await;
    Setup {
        idp,
        api,
        sc,
        _tls: tls,
        _scratch: scratch,
    }
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn https_upstream_is_reached_over_h2_with_an_issued_token() {
    let Setup { idp, api, sc, .. } = setup(Trust::MockCa).await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let r = client
            .get(sc.url(&format!("/items/{i}?q=1")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", sc.logs());
        let summary: serde_json::Value = r.json().await.unwrap();
        assert_eq!(summary["path"], format!("/items/{i}"));
    }
    let seen = api.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!(s.version, "HTTP/2.0", "ALPN should pick h2: {s:?}");
        assert_eq!(s.status, 200);
        let token = s.token.as_deref().expect("a bearer token was injected");
        assert!(
            idp.registry().is_valid(token),
            "the injected token was not issued by the IdP"
        );
    }
    assert_eq!(seen[0].query.as_deref(), Some("q=1"));
    assert_eq!(idp.calls(), 1, "one token serves every request");
}

#[tokio::test]
async fn revocation_under_100_concurrent_h2_gets_costs_one_idp_call() {
    let Setup { idp, api, sc, .. } = setup(Trust::MockCa).await;
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(sc.url("/warm")).send().await.unwrap().status(),
        200
    );
    let before = idp.calls();
    idp.registry().revoke_all();
    api.clear();
    let all = futures::future::join_all((0..100).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/items/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    let ok = all.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(
        ok,
        100,
        "{:?}\n{}",
        all.iter()
            .filter(|s| !matches!(s, Ok(200)))
            .collect::<Vec<_>>(),
        sc.logs()
    );
    assert_eq!(idp.calls() - before, 1, "exactly one extra token request");
    let seen = api.requests();
    assert!(seen.iter().all(|s| s.version == "HTTP/2.0"), "{seen:?}");
    // Every request ended with one 200 at the upstream, under the one new token.
    let fresh: Vec<_> = seen.iter().filter(|s| s.status == 200).collect();
    assert_eq!(fresh.len(), 100);
    assert!(fresh.iter().all(|s| s.token == fresh[0].token));
}

#[tokio::test]
async fn large_put_is_replayed_byte_exact_over_h2() {
    let Setup { idp, api, sc, .. } = setup(Trust::MockCa).await;
    let client = reqwest::Client::new();
    idp.registry().revoke_all();
    let before = idp.calls();
    let body = body_of(300 * 1024);
    let r = client
        .put(sc.url("/blob"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let summary: serde_json::Value = r.json().await.unwrap();
    assert_eq!(summary["body_sha256"], hex(&body));
    let seen = api.requests();
    assert_eq!(seen.len(), 2, "first attempt + one replay: {seen:?}");
    for s in &seen {
        assert_eq!(s.version, "HTTP/2.0", "{s:?}");
        assert_eq!(s.body_len, body.len());
        assert_eq!(s.body_sha256, hex(&body), "body changed on the way");
    }
    assert_eq!((seen[0].status, seen[1].status), (401, 200));
    assert_ne!(seen[0].token, seen[1].token);
    assert_eq!(idp.calls() - before, 1);
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_a_502_that_never_reaches_it() {
    let Setup { idp, api, sc, .. } = setup(Trust::BuiltIn).await;
    let r = reqwest::get(sc.url("/secret")).await.unwrap();
    assert_eq!(r.status(), 502, "{}", sc.logs());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable", "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(api.count(), 0, "no request may pass an untrusted handshake");
    // The token was fetched (the IdP is plain HTTP) but never sent anywhere.
    assert_eq!(idp.calls(), 1);
}
