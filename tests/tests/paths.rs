//! Hostile paths: dot segments, encoded or not, are normalised once before routing,
//! rate limiting and forwarding; a path that climbs above its route is refused with 400.
//! Requests go out as raw bytes: HTTP clients would normalise the paths themselves.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::Sidecar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest answer read back: the sidecar's own answers and the mock's JSON are far smaller.
const MAX_ANSWER: usize = 64 * 1024;

/// Sends `GET target` as written and returns the status and the body of the answer.
async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|n| got.len() >= end + 4 + n) {
                    break;
                }
            }
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            assert!(
                got.len() <= MAX_ANSWER,
                "answer larger than {MAX_ANSWER} bytes"
            );
        }
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("no answer within 10 s");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One mock upstream behind two routes: `based` (everything, under the base path `/api`) and
/// `hist` (`/api/...` as sent, rate-limited on `/api/History/**`).
async fn stack() -> (MockUpstream, Sidecar) {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "upstreams:\n  - {{ name: based, url: \"{url}/api\" }}\n  - {{ name: hist, url: \"{url}\", match: {{ path_prefix: /api }} }}\nrate_limits:\n  - {{ name: history, upstream: hist, match: {{ path: \"/api/History/**\" }}, rate: 2/60s, mode: reject }}\n",
        url = api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    (api, sc)
}

#[tokio::test]
async fn dot_segments_never_leave_the_base_path() {
    let (api, sc) = stack().await;
    // Climbs above the route's root: refused, nothing sent.
    for target in [
        "/%2e%2e/__log",
        "/./../x",
        "/a/%2E%2E/%2e%2e/x",
        "/../__log",
        "/.%2e/__log",
        "/a/..%2f..%2f__log",
        "/a/..%5c..%5c__log",
        "/..;/__log",
    ] {
        let (status, body) = raw_get(sc.listen, target).await;
        assert_eq!(status, 400, "{target}: {body}\n{}", sc.logs());
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"], "bad_request", "{target}");
    }
    assert_eq!(api.count(), 0, "{:?}", api.requests());
    // Stays under the root: sent normalised, under the base path.
    for (target, sent) in [
        ("/b/../__log", "/api/__log"),
        ("/b/%2e%2E/__log", "/api/__log"),
        ("/b/./c/", "/api/b/c/"),
    ] {
        let (status, body) = raw_get(sc.listen, target).await;
        assert_eq!(status, 200, "{target}: {body}\n{}", sc.logs());
        let seen = api.requests();
        assert_eq!(seen.last().map(|r| r.path.as_str()), Some(sent), "{target}");
    }
    assert_eq!(api.count(), 3);
}

#[tokio::test]
async fn dot_segments_count_against_the_rate_rule_they_reach() {
    let (api, sc) = stack().await;
    // rate 2/60s: two requests to /api/History/** pass, whatever their spelling.
    for target in ["/api/./History/a", "/api/x/../History/a"] {
        let (status, body) = raw_get(sc.listen, target).await;
        assert_eq!(status, 200, "{target}: {body}\n{}", sc.logs());
    }
    let seen: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, ["/api/History/a", "/api/History/a"]);
    for target in [
        "/api/History/a",
        "/api/./History/a",
        "/api/x/../History/a",
        "/api//History/a",
        "/api/%48istory/a",
    ] {
        let (status, body) = raw_get(sc.listen, target).await;
        assert_eq!(status, 429, "{target}: {body}");
    }
    assert_eq!(api.count(), 2);
    // Another path on the same route is not counted by the rule.
    let (status, _) = raw_get(sc.listen, "/api/Other/a").await;
    assert_eq!(status, 200);
}
