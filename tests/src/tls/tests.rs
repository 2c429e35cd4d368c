//! Self-tests of the TLS mock upstream: trust, ALPN and recording.

use std::net::SocketAddr;

use crate::{MockUpstream, TlsMaterial, UpstreamConfig};

use super::SERVER_NAME;

/// A client that trusts only the mock's CA and reaches `localhost` at `addr`.
fn trusting(tls: &TlsMaterial, addr: SocketAddr) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(tls.ca_pem().as_bytes()).expect("CA PEM");
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .resolve(SERVER_NAME, addr)
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://{SERVER_NAME}:{}{path}", addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiates_h2_by_alpn_and_records_the_version() {
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    assert_eq!(api.url(), format!("https://{}", api.addr()));
    let http = trusting(&tls, api.addr()).build().unwrap();
    let resp = http
        .put(https(api.addr(), "/v1/blob"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "HTTP/2.0");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("PUT", "/v1/blob")
    );
    assert_eq!(seen[0].body_len, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_speaks_http1_to_clients_without_h2() {
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    let http = trusting(&tls, api.addr()).http1_only().build().unwrap();
    let resp = http.get(https(api.addr(), "/one")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    assert_eq!(api.requests()[0].version, "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_covers_the_ip_address_too() {
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    let http = trusting(&tls, api.addr()).build().unwrap();
    let resp = http.get(format!("{}/ip", api.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(api.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_ca_never_gets_a_request_through() {
    let (api, tls) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .resolve(SERVER_NAME, api.addr())
        .build()
        .unwrap();
    let err = untrusting
        .get(https(api.addr(), "/nope"))
        .send()
        .await
        .expect_err("the mock's CA is private");
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(api.count(), 0);
    // The CA written for a sidecar is the one that signed the served certificate.
    let dir = std::env::temp_dir().join(format!("sidecar-mocks-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ca.pem");
    tls.write_ca(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), tls.ca_pem());
    let _ = std::fs::remove_dir_all(&dir);
    let resp = trusting(&tls, api.addr())
        .build()
        .unwrap()
        .get(https(api.addr(), "/yes"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_ne!(tls.cert_pem(), tls.ca_pem());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_start_mints_its_own_ca() {
    let (_a, first) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    let (b, second) = MockUpstream::start_tls(UpstreamConfig::open()).await;
    assert_ne!(first.ca_pem(), second.ca_pem());
    let wrong = trusting(&first, b.addr()).build().unwrap();
    assert!(wrong.get(https(b.addr(), "/x")).send().await.is_err());
    assert_eq!(b.count(), 0);
}
