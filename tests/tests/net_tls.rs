//! Trust and client certificates (per provider and per upstream `tls:`), the system trust store
//! as `SSL_CERT_FILE` points at it, and an egress proxy (`HTTPS_PROXY`/`NO_PROXY`) for
//! identity-provider calls — through the real sidecar binary, with private CAs the mocks mint.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sidecar_mocks::{
    unrelated_ca_pem, ClientAuth, IdpConfig, MockIdp, MockUpstream, TlsMaterial, UpstreamConfig,
};
use support::{Scratch, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A provider `main` on `idp` with `tls` (a YAML flow mapping, or `None`) and a 2 s token wait.
fn provider(idp: &MockIdp, tls: Option<&str>) -> String {
    let tls = tls.map(|t| format!("\n    tls: {t}")).unwrap_or_default();
    format!(
        "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: \"{}\"\n    client_id: demo-client\n    client_secret: demo-secret\n    refresh: {{ min_interval: 0s, backoff: [200ms] }}{tls}\nreplay: {{ wait_for_token: 2s }}\n",
        idp.token_url()
    )
}

/// Writes `pem` into `scratch` as `name`; its path for YAML.
fn file(scratch: &Scratch, name: &str, pem: &str) -> String {
    let p = scratch.path(name);
    std::fs::write(&p, pem).unwrap();
    p.display().to_string()
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// GETs `path` through the sidecar; status and JSON body (`null` if not JSON).
async fn get(sc: &Sidecar, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(sc.url(path)).await.unwrap();
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test]
async fn idp_over_tls_is_trusted_through_its_ca_file() {
    let (idp, tls) = MockIdp::start_tls(IdpConfig::default(), ClientAuth::None).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-idp");
    let ca = file(&scratch, "idp-ca.pem", tls.ca_pem());
    assert!(idp.token_url().starts_with("https://127.0.0.1:"));
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        provider(&idp, Some(&format!("{{ ca_file: \"{ca}\" }}"))),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let (status, _) = get(&sc, "/x").await;
    assert_eq!(status, 200, "{}", sc.logs());
    let token = api.requests()[0].token.clone().expect("a token");
    assert!(idp.registry().is_valid(&token));
    assert_eq!(idp.calls(), 1);
    assert!(tls.completed_handshakes() >= 1);
}

/// Without `ca_file` the IdP client trusts the system store, and `SSL_CERT_FILE` is where that
/// store is (as for OpenSSL-based tools). Before: built-in web PKI roots only, `UnknownIssuer`.
#[tokio::test]
async fn idp_over_tls_is_trusted_through_ssl_cert_file_alone() {
    let (idp, tls) = MockIdp::start_tls(IdpConfig::default(), ClientAuth::None).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-idp-env");
    let ca = file(&scratch, "system.pem", tls.ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        provider(&idp, None),
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("SSL_CERT_FILE", &ca)]).await;
    let (status, body) = get(&sc, "/x").await;
    assert_eq!(status, 200, "{body}\n{}", sc.logs());
    assert_eq!(idp.calls(), 1);
}

/// An upstream trusted only through `SSL_CERT_FILE` (no `ca_file`): Pingora's path and the
/// sidecar's own replay (a 300 KiB body, beyond Pingora's retry buffer) trust the same store.
/// Before: Pingora reached it, the replay trusted built-in roots only and answered 502 with
/// nothing logged.
#[tokio::test]
async fn large_put_replayed_over_tls_trusted_by_the_system_store() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-replay");
    let ca = file(&scratch, "system.pem", tls.ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main, tls: {{ server_name: localhost }} }}\n",
        provider(&idp, None),
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("SSL_CERT_FILE", &ca)]).await;
    assert_eq!(get(&sc, "/warm").await.0, 200, "{}", sc.logs());
    idp.registry().revoke_all();
    api.clear();
    let body: Vec<u8> = (0..300 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let r = reqwest::Client::new()
        .put(sc.url("/blob"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = api.requests();
    assert_eq!(
        seen.len(),
        2,
        "first attempt + the sidecar's replay: {seen:?}"
    );
    assert_eq!((seen[0].status, seen[1].status), (401, 200));
    assert_eq!(seen[1].body_sha256, hex(&body), "body changed on the way");
    let fresh = seen[1].token.as_deref().expect("a token on the replay");
    assert_ne!(seen[0].token.as_deref(), Some(fresh));
    assert!(
        idp.registry().is_valid(fresh),
        "the replay carries the new token"
    );
}

/// An upstream that refuses connections without a client certificate: the route with
/// `client_cert`/`client_key` gets through (Pingora's path and the own replay of a 300 KiB body
/// alike), the route without gets a JSON 502 and the upstream never sees its request.
#[tokio::test]
async fn mtls_upstream_takes_only_the_route_with_the_client_certificate() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let (api, tls) = MockUpstream::start_tls_with(
        UpstreamConfig::checking(idp.registry()),
        ClientAuth::Required,
    )
    .await;
    let scratch = Scratch::new("tls-mtls-up");
    let ca = file(&scratch, "ca.pem", tls.ca_pem());
    let cert = file(&scratch, "client.pem", tls.client_cert_pem());
    let key = file(&scratch, "client.key", tls.client_key_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: with, url: \"{url}\", provider: main, match: {{ path_prefix: /with, strip_prefix: true }}, tls: {{ ca_file: \"{ca}\", client_cert: \"{cert}\", client_key: \"{key}\" }} }}\n  - {{ name: without, url: \"{url}\", provider: main, match: {{ path_prefix: /without, strip_prefix: true }}, tls: {{ ca_file: \"{ca}\" }} }}\n",
        provider(&idp, None),
        url = api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let (status, _) = get(&sc, "/with/a").await;
    assert_eq!(status, 200, "{}", sc.logs());
    assert!(tls.client_cert_handshakes() >= 1);
    let (status, body) = get(&sc, "/without/b").await;
    assert_eq!(status, 502, "{body}\n{}", sc.logs());
    assert_eq!(body["error"], "upstream_unreachable", "{body}");
    let paths: Vec<_> = api.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/a"],
        "only the request with a client certificate arrives"
    );

    idp.registry().revoke_all();
    api.clear();
    let big: Vec<u8> = vec![7; 300 * 1024];
    let r = reqwest::Client::new()
        .put(sc.url("/with/blob"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let seen = api.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].status, seen[1].status), (401, 200));
    assert_eq!(seen[1].body_sha256, hex(&big));
}

/// RFC 8705 `tls_client_auth`: the token endpoint gets the configured client certificate.
#[tokio::test]
async fn mtls_idp_sees_the_client_certificate() {
    let (idp, tls) = MockIdp::start_tls(IdpConfig::default(), ClientAuth::Required).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-mtls-idp");
    let ca = file(&scratch, "ca.pem", tls.ca_pem());
    let cert = file(&scratch, "client.pem", tls.client_cert_pem());
    let key = file(&scratch, "client.key", tls.client_key_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        provider(
            &idp,
            Some(&format!(
                "{{ ca_file: \"{ca}\", client_cert: \"{cert}\", client_key: \"{key}\" }}"
            ))
        ),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let (status, _) = get(&sc, "/x").await;
    assert_eq!(status, 200, "{}", sc.logs());
    assert_eq!(idp.calls(), 1);
    assert!(
        tls.client_cert_handshakes() >= 1,
        "the IdP saw no client certificate"
    );
    assert_eq!(tls.failed_handshakes(), 0);
}

/// The upstream's certificate does not verify against `ca_file`: a JSON 502, a log line naming
/// the host and rustls's reason, and no handshake ever completed (so no token left).
#[tokio::test]
async fn wrong_ca_for_an_upstream_is_a_logged_502_before_any_http() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-wrong-up");
    let wrong = file(&scratch, "wrong.pem", &unrelated_ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main, tls: {{ ca_file: \"{wrong}\", server_name: localhost }} }}\n",
        provider(&idp, None),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    for path in ["/a", "/b"] {
        let (status, body) = get(&sc, path).await;
        assert_eq!(status, 502, "{body}\n{}", sc.logs());
        assert_eq!(body["error"], "upstream_unreachable", "{body}");
    }
    let line = sc
        .wait_log_line(&[
            "TLS handshake with the upstream failed",
            "localhost",
            "UnknownIssuer",
        ])
        .await;
    assert!(
        line.contains("upstream=api") || line.contains("\"api\""),
        "{line}"
    );
    assert_eq!(api.count(), 0);
    assert_eq!(tls.completed_handshakes(), 0, "no handshake may complete");
    assert!(tls.failed_handshakes() >= 1);
    let token = idp.registry();
    assert_eq!(
        token.issued_count(),
        1,
        "a token was fetched but never sent"
    );
}

/// Two routes to one TLS address, one trusting its CA and one trusting another: a connection
/// verified for the first is never handed to the second from the pool.
#[tokio::test]
async fn a_pooled_connection_verified_against_one_ca_never_serves_another() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-pool");
    let right = file(&scratch, "right.pem", tls.ca_pem());
    let wrong = file(&scratch, "wrong.pem", &unrelated_ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: good, url: \"{url}\", provider: main, match: {{ path_prefix: /good, strip_prefix: true }}, tls: {{ ca_file: \"{right}\", server_name: localhost }} }}\n  - {{ name: bad, url: \"{url}\", provider: main, match: {{ path_prefix: /bad, strip_prefix: true }}, tls: {{ ca_file: \"{wrong}\", server_name: localhost }} }}\n",
        provider(&idp, None),
        url = api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let r = client
            .get(sc.url(&format!("/good/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", sc.logs());
        let r = client
            .get(sc.url(&format!("/bad/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{}", sc.logs());
    }
    let paths: Vec<_> = api.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/0", "/1", "/2"],
        "only the good route's requests arrive"
    );
}

/// The IdP's certificate does not verify: requests get a JSON 503 `token_unavailable`, the log
/// names the IdP's host and rustls's reason, and the IdP never got an HTTP request.
#[tokio::test]
async fn wrong_ca_for_the_idp_is_a_logged_503() {
    let (idp, tls) = MockIdp::start_tls(IdpConfig::default(), ClientAuth::None).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-wrong-idp");
    let wrong = file(&scratch, "wrong.pem", &unrelated_ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        provider(&idp, Some(&format!("{{ ca_file: \"{wrong}\" }}"))),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let (status, body) = get(&sc, "/x").await;
    assert_eq!(status, 503, "{body}\n{}", sc.logs());
    assert_eq!(body["error"], "token_unavailable", "{body}");
    let host = format!("127.0.0.1:{}", idp.addr().port());
    sc.wait_log_line(&[&host, "UnknownIssuer"]).await;
    assert_eq!(
        idp.calls(),
        0,
        "no HTTP request may pass the failed handshake"
    );
    assert_eq!(tls.completed_handshakes(), 0);
    assert_eq!(api.count(), 0);
}

/// A CONNECT proxy that counts the tunnels it opened.
struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<AtomicUsize>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&tunnels);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tunnel(client, Arc::clone(&count)));
            }
        });
        ConnectProxy { addr, tunnels }
    }

    fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

/// Reads a `CONNECT host:port` head (at most 8 KiB), connects, answers 200 and relays.
async fn tunnel(mut client: TcpStream, count: Arc<AtomicUsize>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 8 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut words = text.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await;
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    count.fetch_add(1, Ordering::SeqCst);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Identity-provider calls go through `HTTPS_PROXY` like curl's, and `NO_PROXY` takes a host
/// out of it.
#[tokio::test]
async fn idp_calls_use_https_proxy_unless_no_proxy_covers_the_host() {
    let (idp, tls) = MockIdp::start_tls(IdpConfig::default(), ClientAuth::None).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("tls-proxy");
    let ca = file(&scratch, "ca.pem", tls.ca_pem());
    let yaml = format!(
        "{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        provider(&idp, Some(&format!("{{ ca_file: \"{ca}\" }}"))),
        api.url()
    );
    let _keep: &TlsMaterial = &tls;

    let proxy = ConnectProxy::start().await;
    let proxy_url = format!("http://{}", proxy.addr);
    let sc = Sidecar::start_with_env(&yaml, &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "")]).await;
    assert_eq!(get(&sc, "/x").await.0, 200, "{}", sc.logs());
    assert!(
        proxy.tunnels() >= 1,
        "the token request went around the proxy"
    );
    assert_eq!(idp.calls(), 1);
    drop(sc);

    let direct = ConnectProxy::start().await;
    let proxy_url = format!("http://{}", direct.addr);
    let sc = Sidecar::start_with_env(
        &yaml,
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "127.0.0.1")],
    )
    .await;
    assert_eq!(get(&sc, "/y").await.0, 200, "{}", sc.logs());
    assert_eq!(direct.tunnels(), 0, "NO_PROXY covers the IdP's host");
    assert_eq!(idp.calls(), 2);
}

/// `check` refuses an unreadable or non-PEM `ca_file`, a certificate without its key and a key
/// that belongs to another certificate, each at the key's `file:line:col`, without connecting
/// anywhere (the hosts do not exist).
#[test]
fn check_points_at_unusable_tls_files() {
    let scratch = Scratch::new("tls-check");
    let not_pem = file(&scratch, "not.pem", "hello\n");
    let a = sidecar_mocks::tls::mint_material().expect("certificates");
    let b = sidecar_mocks::tls::mint_material().expect("certificates");
    let cert = file(&scratch, "a.pem", a.client_cert_pem());
    let other_key = file(&scratch, "b.key", b.client_key_pem());
    let cases = [
        (
            format!("    tls: {{ ca_file: \"{not_pem}\" }}\n"),
            "tls.ca_file",
            "no PEM certificate",
        ),
        (
            "    tls: { ca_file: \"/nonexistent/ca.pem\" }\n".to_string(),
            "tls.ca_file",
            "No such file",
        ),
        (
            format!("    tls: {{ client_cert: \"{cert}\" }}\n"),
            "tls.client_cert",
            "needs tls.client_key",
        ),
        (
            format!("    tls: {{ client_cert: \"{cert}\", client_key: \"{other_key}\" }}\n"),
            "tls.client_key",
            "does not belong",
        ),
    ];
    for (tls, key, want) in cases {
        let path = scratch.path("s.yaml");
        let yaml = format!(
            "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: \"https://idp.invalid/t\"\n    client_id: c\n    client_secret: s\n{tls}upstreams:\n  - {{ name: api, url: \"https://api.invalid\", provider: main }}\n"
        );
        std::fs::write(&path, &yaml).unwrap();
        let (code, _, err) = support::run_cli(&["check", "-c", &path.display().to_string()], &[]);
        assert_eq!(code, 1, "{err}");
        let col = yaml.lines().nth(6).unwrap().find(&key[4..]).unwrap() + 1;
        let at = format!("{}:7:{col}: provider \"main\": {key}", path.display());
        assert!(err.starts_with(&at), "{err} should start with {at}");
        assert!(err.contains(want), "{err} lacks {want:?}");
    }
}
