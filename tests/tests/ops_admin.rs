//! The admin API as production runs it: the mutating endpoints need `admin.token` when one is
//! configured, the probe listener serves only `/healthz`, `/readyz` and `/metrics`, and SIGTERM
//! turns readiness off at once, keeps taking requests for `shutdown_delay`, then finishes the
//! in-flight ones and exits 0.
//!
//! The "POST from off loopback needs the token" half of the rule is decided on the connection's
//! peer address by a pure function with its own table test (`admin_auth`); these tests only ever
//! use loopback addresses.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::{free_port, get_status, wait_until, Scratch, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const ADMIN_TOKEN: &str = "adm-7f3c9a1e5b2d4c6e8a0f";

fn api_routes(api: &str) -> String {
    format!(
        "providers:\n  main: {{ type: static, token: upstream-token }}\nupstreams:\n  - {{ name: api, url: \"{api}\", provider: main }}\n"
    )
}

async fn post(client: &reqwest::Client, url: String, auth: Option<&str>) -> (u16, String) {
    let mut req = client.post(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn with_admin_token_posts_need_it_and_it_is_never_shown() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "admin: {{ token: \"${{env:SIDECAR_TEST_ADMIN_TOKEN}}\" }}\n{}",
        api_routes(&api.url())
    );
    let sc = Sidecar::start_with_env(&yaml, &[("SIDECAR_TEST_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let client = reqwest::Client::new();
    let right = format!("Bearer {ADMIN_TOKEN}");
    let wrong = format!("Bearer {ADMIN_TOKEN}0");
    let mut answers = String::new();
    for path in ["/v1/token/refresh?provider=main", "/v1/reload"] {
        for auth in [None, Some(wrong.as_str()), Some("Basic YWRtaW46YWRtaW4=")] {
            let (status, body) = post(&client, sc.admin_url(path), auth).await;
            assert_eq!(status, 403, "{path} {auth:?}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"], "forbidden", "{body}");
            answers.push_str(&body);
        }
        let (status, body) = post(&client, sc.admin_url(path), Some(&right)).await;
        assert_eq!(status, 200, "{path}: {body}");
        answers.push_str(&body);
    }
    // Reading stays open.
    let r = client
        .get(sc.admin_url("/v1/token/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    answers.push_str(&r.text().await.unwrap());
    answers.push_str(&sc.admin_text("/metrics").await);
    // The token is in no answer and no log line (and `check` prints it redacted).
    assert!(!answers.contains(ADMIN_TOKEN), "{answers}");
    let logs = sc.logs();
    assert!(!logs.contains(ADMIN_TOKEN), "{logs}");
    let (code, out, err) = support::run_cli(
        &["check", "-c", &sc.config_path().display().to_string()],
        &[("SIDECAR_TEST_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(ADMIN_TOKEN) && !err.contains(ADMIN_TOKEN),
        "{out}{err}"
    );
    assert!(out.contains("token: <redacted>"), "{out}");
}

#[tokio::test]
async fn without_admin_token_a_loopback_client_may_post() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&api_routes(&api.url())).await;
    let (status, body) = post(
        &reqwest::Client::new(),
        sc.admin_url("/v1/token/refresh?provider=main"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_probe_listener_serves_only_health_readiness_and_metrics() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let probe: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sc = Sidecar::start(&format!(
        "probe_listen: \"{probe}\"\n{}",
        api_routes(&api.url())
    ))
    .await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{probe}{p}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert!(client
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("sidecar_"));
    for path in [
        "/v1/token/status",
        "/v1/token/refresh?provider=main",
        "/v1/reload",
        "/",
    ] {
        let r = client.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "GET {path}");
        let (status, _) = post(&client, url(path), None).await;
        assert_eq!(status, 404, "POST {path}");
    }
    let (status, _) = post(&client, url("/healthz"), None).await;
    assert_eq!(status, 404, "POST /healthz");
    // The admin listener still has everything.
    let r = client
        .get(sc.admin_url("/v1/token/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// An upstream that holds the answer to `/slow` until released, and answers anything else at
/// once. Every answer closes its connection.
struct HeldUpstream {
    addr: SocketAddr,
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldUpstream {
    async fn start() -> HeldUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let arrived_tx = arrived_tx.clone();
                let mut released = released.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if head.starts_with(b"GET /slow ") {
                        let _ = arrived_tx.send(());
                        let _ = released.wait_for(|r| *r).await;
                    }
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        HeldUpstream {
            addr,
            arrived,
            release,
            task,
        }
    }
}

impl Drop for HeldUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that opens a fresh connection for every request, so that "new connections are
/// refused" is seen as soon as it happens.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test]
async fn sigterm_turns_readiness_off_keeps_serving_for_the_delay_then_drains_and_exits_0() {
    let mut upstream = HeldUpstream::start().await;
    let _scratch = Scratch::new("sigterm");
    let mut sc = Sidecar::start(&format!(
        "shutdown_delay: 3s\nshutdown_grace: 20s\n{}",
        api_routes(&format!("http://{}", upstream.addr))
    ))
    .await;
    let client = fresh_client();
    assert_eq!(get_status(&client, sc.admin_url("/readyz")).await, 200);

    // A slow request, in flight when SIGTERM comes.
    let slow = {
        let client = client.clone();
        let url = sc.url("/slow");
        tokio::spawn(async move {
            let r = client.get(url).send().await?;
            let status = r.status().as_u16();
            r.text().await.map(|body| (status, body))
        })
    };
    tokio::time::timeout(Duration::from_secs(10), upstream.arrived.recv())
        .await
        .expect("the slow request reaches the upstream")
        .unwrap();

    sc.signal("TERM");
    // Readiness is 503 as soon as the signal is handled, long before the delay is over.
    let ready = Arc::new(client.clone());
    let admin = sc.admin_url("/readyz");
    wait_until(
        Duration::from_secs(2),
        || {
            let (ready, admin) = (ready.clone(), admin.clone());
            async move {
                ready
                    .get(admin)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 503)
            }
        },
        || "readyz did not turn 503 after SIGTERM".into(),
    )
    .await;
    // Still within shutdown_delay: a new request on a new connection is served.
    let r = client.get(sc.url("/during-delay")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());

    // After the delay new connections are refused, while the slow request is still in flight.
    let probe = Arc::new(client.clone());
    let url = sc.url("/after-delay");
    wait_until(
        Duration::from_secs(10),
        || {
            let (probe, url) = (probe.clone(), url.clone());
            async move { probe.get(url).send().await.is_err() }
        },
        || "new requests were still taken after shutdown_delay".into(),
    )
    .await;
    assert!(!slow.is_finished(), "the slow request ended early");
    // The admin listener keeps serving during the drain.
    assert_eq!(get_status(&client, sc.admin_url("/readyz")).await, 503);

    // Released: the in-flight request completes, and the process exits 0 at once.
    upstream.release.send(true).unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow request finishes")
        .unwrap()
        .expect("the slow request got an answer");
    assert_eq!((status, body.as_str()), (200, "ok"));
    let exit = sc
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits within shutdown_grace");
    assert_eq!(exit.code(), Some(0), "{}", sc.logs());
}
