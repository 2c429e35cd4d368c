//! Long-lived connections through the real sidecar: WebSocket upgrades and Server-Sent Events
//! open with a token that outlives `upgrade.min_ttl`, streams are bounded by `stream_idle`
//! instead of `read`, `max_streams` refuses with a JSON 503, and the stream metrics follow.

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sidecar_mocks::{MockIdp, SignalRHub, StreamUpstream};
use support::metrics::scrape;
use support::providers::{cc_provider, idp_ttl, REFRESH};
use support::{wait_until, Sidecar};
use tokio_tungstenite::tungstenite::Message;

/// A sidecar in front of a stream upstream, tokens from `idp`; `upstream` is more YAML of the
/// upstream item (indented 4), `extra` more top-level YAML.
async fn stack(
    idp: &MockIdp,
    refresh: &str,
    upstream: &str,
    extra: &str,
) -> (StreamUpstream, Sidecar) {
    let api = StreamUpstream::start(idp.registry()).await.unwrap();
    let yaml = format!(
        "log: {{ access_log: false }}\nproviders:\n{}upstreams:\n  - name: live\n    url: \"{}\"\n    provider: main\n{upstream}{extra}",
        cc_provider("main", idp, refresh),
        api.url()
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;
    (api, sc)
}

/// Reads an SSE body until it ends (`Ok`) or breaks off (`Err`), with the events received. Each
/// read is bounded so a hang fails the test instead of stalling it.
async fn read_events(mut resp: reqwest::Response) -> (Vec<String>, Result<(), String>) {
    let mut text = String::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Err(_) => break Err("no byte for 20 s".to_string()),
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => break Err(e.to_string()),
        }
    };
    let events = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect();
    (events, end)
}

async fn sse(sc: &Sidecar, gaps: &str, accept: bool) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(sc.url(&format!("/sse?gaps={gaps}")));
    if accept {
        req = req.header("accept", "text/event-stream");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", sc.logs());
    resp
}

/// The provider's current token has less than `left` to live (its proactive refresh is due
/// later, at 500 ms).
async fn wait_token_ttl_below(sc: &Sidecar, left: f64) -> u64 {
    let v = sc
        .wait_status(Duration::from_secs(15), |v| {
            v["providers"][0]["ttl_seconds"]
                .as_f64()
                .is_some_and(|t| t < left)
        })
        .await;
    v["providers"][0]["generation"].as_u64().unwrap()
}

/// 4 s tokens refreshed 500 ms before expiry; `upgrade.min_ttl: 5m` is capped at half the
/// lifetime, 2 s. With 1.8 s left, a plain request goes with the current token, while a
/// WebSocket upgrade and an event-stream request each wait for one coalesced refresh and reach
/// the upstream with a token that has at least 2 s left (before: the current one, < 1.8 s).
#[tokio::test]
async fn a_stream_opens_only_with_a_token_that_outlives_min_ttl() {
    let idp = idp_ttl(Duration::from_secs(4)).await;
    let refresh = "refresh: { before_expiry: 500ms, jitter: 0%, skew: 0s, min_interval: 0s, backoff: [200ms] }";
    let (api, sc) = stack(&idp, refresh, "", "upgrade: { min_ttl: 5m }\n").await;
    let required = Duration::from_secs(2);

    let generation = wait_token_ttl_below(&sc, 1.8).await;
    let calls = idp.calls();
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", sc.listen))
        .await
        .expect("websocket through the sidecar");
    assert_eq!(resp.status(), 101);
    let (kind, ttl) = api.opened()[0];
    assert_eq!(kind, "ws");
    assert!(
        ttl >= required,
        "the upgrade carried a token with {ttl:?} left\n{}",
        sc.logs()
    );
    assert_eq!(idp.calls(), calls + 1, "one refresh before the upgrade");
    ws.send(Message::text("hello")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert_eq!(
        echoed
            .unwrap()
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "hello"
    );

    let after_ws = wait_token_ttl_below(&sc, 1.8).await;
    assert!(after_ws > generation);
    let calls = idp.calls();
    let (events, end) = read_events(sse(&sc, "10", true).await).await;
    assert_eq!((events.len(), end), (2, Ok(())));
    let (kind, ttl) = api.opened()[1];
    assert_eq!(kind, "sse");
    assert!(
        ttl >= required,
        "the event stream carried a token with {ttl:?} left"
    );
    assert_eq!(
        idp.calls(),
        calls + 1,
        "one refresh before the event stream"
    );

    let m = scrape(&sc).await;
    assert_eq!(
        m.sum(
            "sidecar_token_refresh_total",
            &[("trigger", "ensure"), ("result", "success")]
        ),
        2.0
    );
}

/// `read: 1s`, `stream_idle: 2500ms`. An event stream with 1.5 s pauses gets every event (before:
/// cut after the first pause, as a request without `Accept: text/event-stream` still is); one
/// with a 6 s pause is closed after `stream_idle` and counted.
#[tokio::test]
async fn a_stream_is_bounded_by_stream_idle_not_read() {
    let idp = idp_ttl(Duration::from_secs(3600)).await;
    let (_api, sc) = stack(
        &idp,
        REFRESH,
        "    timeouts: { read: 1s, stream_idle: 2500ms }\n",
        "",
    )
    .await;

    let (events, end) = read_events(sse(&sc, "1500,1500", true).await).await;
    assert_eq!(events, ["0", "1", "2"], "{end:?}\n{}", sc.logs());
    assert_eq!(end, Ok(()));

    // Not a stream request: `read` applies to its body as to any answer.
    let (events, end) = read_events(sse(&sc, "1500,1500", false).await).await;
    assert_eq!(events, ["0"]);
    assert!(end.is_err(), "the plain request was not cut at `read`");

    let started = Instant::now();
    let (events, end) = read_events(sse(&sc, "100,6000", true).await).await;
    assert_eq!(events, ["0", "1"]);
    assert!(end.is_err(), "a silent stream ends without its last chunk");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "closed by stream_idle, not by the upstream"
    );
    let m = scrape(&sc).await;
    let closed = |kind| {
        m.sum(
            "sidecar_stream_idle_closed_total",
            &[("upstream", "live"), ("kind", kind)],
        )
    };
    assert_eq!(closed("sse"), 1.0);
    assert_eq!(closed("websocket"), 0.0);
    // Only the plain request cut at `read` is an upstream timeout; a stream ended by silence is
    // not an upstream failure.
    assert_eq!(
        m.sum("sidecar_upstream_errors_total", &[("class", "timeout")]),
        1.0
    );
}

async fn open_streams(sc: &Sidecar) -> f64 {
    scrape(sc).await.sum(
        "sidecar_open_streams",
        &[("upstream", "live"), ("kind", "websocket")],
    )
}

/// `max_streams: 2`: the third WebSocket gets a JSON 503 `too_many_streams` (and the upstream
/// never sees it) while ordinary requests go on; closing one makes room. The gauge follows the
/// open streams up and down, and every closed stream's lifetime is in the histogram.
#[tokio::test]
async fn max_streams_refuses_beyond_the_cap_and_the_gauge_follows() {
    let idp = idp_ttl(Duration::from_secs(3600)).await;
    let (api, sc) = stack(&idp, REFRESH, "", "max_streams: 2\n").await;
    let url = format!("ws://{}/ws", sc.listen);
    let (mut a, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let (b, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(open_streams(&sc).await, 2.0);

    let refused = tokio_tungstenite::connect_async(url.as_str()).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = refused else {
        panic!("the third stream was not refused: {refused:?}");
    };
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"], "too_many_streams");
    assert!(body["message"].as_str().unwrap().contains('2'));
    assert_eq!(api.opened().len(), 2);
    assert_eq!(
        scrape(&sc).await.sum("sidecar_streams_refused_total", &[]),
        1.0
    );
    // An ordinary request is not a stream and not refused.
    let (events, end) = read_events(sse(&sc, "", false).await).await;
    assert_eq!((events.len(), end), (1, Ok(())));

    a.close(None).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        || async { open_streams(&sc).await == 1.0 },
        || "the gauge never went down to 1".into(),
    )
    .await;
    let (c, resp) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(open_streams(&sc).await, 2.0);
    drop((b, c));
    wait_until(
        Duration::from_secs(10),
        || async { open_streams(&sc).await == 0.0 },
        || "the gauge never went down to 0".into(),
    )
    .await;
    let m = scrape(&sc).await;
    assert_eq!(
        m.sum(
            "sidecar_stream_duration_seconds_count",
            &[("upstream", "live"), ("kind", "websocket")]
        ),
        3.0
    );
}

/// The hub's connections over 15 s of 4 s tokens, through the sidecar with the token in the
/// `Authorization` header (`/h`) and in the `access_token` query (`/q`): the real
/// `@microsoft/signalr` client on each transport (six clients at once) invokes `Echo` in a loop
/// and reconnects whenever the hub closes a connection at its token's expiry.
#[tokio::test]
async fn signalr_clients_ride_through_token_expiry_on_every_transport() {
    let node = support::tools::require("node", "nodejs");
    let node_dir = support::tools::node_modules()
        .parent()
        .unwrap()
        .to_path_buf();
    let idp = idp_ttl(Duration::from_secs(4)).await;
    let hub = SignalRHub::start(idp.registry()).await.unwrap();
    // Skew: a token goes out only while it has 1 s left, so no request reaches the hub with a
    // token that expired on the way.
    let refresh =
        "refresh: { before_expiry: 2s, jitter: 0%, skew: 1s, min_interval: 0s, backoff: [200ms] }";
    let yaml = format!(
        "providers:\n{}upstreams:\n\
         \x20 - {{ name: header, url: \"{hub}\", provider: main, match: {{ path_prefix: /h, strip_prefix: true }} }}\n\
         \x20 - {{ name: query, url: \"{hub}\", provider: main, match: {{ path_prefix: /q, strip_prefix: true }},\n\
         \x20     inject: {{ header: null, query: access_token }} }}\n",
        cc_provider("main", &idp, refresh),
        hub = hub.url()
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;

    let run = tokio::process::Command::new(node)
        .current_dir(&node_dir)
        .arg("signalr-client.mjs")
        .arg("15000")
        .arg(format!("header={}", sc.url("/h/hub")))
        .arg(format!("query={}", sc.url("/q/hub")))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the SignalR clients did not finish within 60 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sc.logs()
    );
    let clients: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(clients.len(), 6, "{stdout}");
    let stats = hub.stats();
    eprintln!("{stdout}{stats:?}");
    let mut closes = 0;
    for c in &clients {
        let n = |k: &str| c[k].as_u64().unwrap();
        let (ok, failed, lost) = (n("ok"), n("failed"), n("lostAtClose"));
        // The loop ran (measured: 110 to 450 per client over 15 s, by the machine's load).
        assert!(ok >= 50, "{c}");
        // Every invocation on an open connection succeeds (at least 99 %); the ones lost are
        // those in flight when the hub closed a connection at its token's expiry, at most one
        // per close (the client waits for each answer before the next).
        assert!(ok as f64 >= 0.99 * (ok + failed) as f64, "{c}\n{stats:?}");
        assert!(lost <= n("closes") + 1, "{c}");
        // The hub closed its connections at token expiry, and the client got back in every
        // time.
        assert!(n("closes") >= 2, "{c}");
        assert!(n("connects") >= 3, "{c}");
        assert_eq!(n("connectFailures"), 0, "{c}");
        closes += n("closes");
    }
    // Every close a client saw was the hub's at a token's expiry, none the sidecar's doing.
    assert!(
        closes <= stats.expiry_closes as u64,
        "{closes} closes\n{stats:?}"
    );
    assert_eq!(
        stats.tokens_refused, 0,
        "the hub saw an expired token: {stats:?}"
    );
    for transport in ["WebSockets", "ServerSentEvents", "LongPolling"] {
        assert!(
            stats.connections.get(transport).copied().unwrap_or(0) >= 6,
            "{stats:?}"
        );
    }
    assert!(stats.expiry_closes >= 12, "{stats:?}");
    // With the access log on, no token (the mock's start with `tok_`) reached a log line, the
    // `access_token` query included.
    let logs = sc.logs();
    assert!(logs.contains("/hub"), "no access log lines");
    assert!(!logs.contains("tok_"), "a token reached the log");
}
