//! What the log says, through the real binary: requests that succeeded after a replay or a
//! retry log nothing above INFO; a down upstream under load logs a few WARN lines a second that
//! count the rest; the access line carries every field in the text (logfmt) and JSON formats,
//! with the query's values gone and the request id passed on upstream; a client that hangs up
//! early is no WARN or ERROR.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sidecar_mocks::{MockIdp, MockUpstream, Scripted};
use support::logs::{access_lines, json_lines};
use support::providers::token_stack;
use support::{free_port, wait_until, Sidecar};

/// The level of every JSON line, with the line, for those above INFO.
fn above_info(lines: &[Map<String, Value>]) -> Vec<&Map<String, Value>> {
    lines
        .iter()
        .filter(|l| {
            matches!(
                l.get("level").and_then(Value::as_str),
                Some("WARN" | "ERROR")
            )
        })
        .collect()
}

/// A revocation storm (concurrent requests hitting a 401), a replay decided by a 403's body, a
/// replay of a body over Pingora's 64 KiB retry buffer and a transient 503 retried: every
/// request ends 200, and nothing is logged above INFO. Pingora's records carry no source path
/// of the machine that built the binary.
#[tokio::test]
async fn successful_replays_and_retries_log_nothing_above_info() {
    let (idp, api, sc) = token_stack("log: { format: json }\n").await;
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(sc.url("/warm")).send().await.unwrap().status(),
        200
    );

    // Revocation storm.
    idp.registry().revoke_all();
    let all = futures::future::join_all((0..100).map(|i| {
        let c = client.clone();
        let url = sc.url(&format!("/storm/{i}"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    assert!(all.iter().all(|s| matches!(s, Ok(200))), "{all:?}");

    // A 403 whose body says the token expired: the sidecar's own replay.
    let expired = r#"{"error":"key not authorized: token is expired"}"#;
    idp.registry().revoke_all();
    api.push_script(Scripted::status(403).with_body(expired));
    api.push_script(Scripted::status(403).with_body(expired));
    let r = client.get(sc.url("/pattern")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());

    // A 300 KiB body: the sidecar's own replay.
    idp.registry().revoke_all();
    let r = client
        .put(sc.url("/blob"))
        .body(vec![7u8; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());

    // A transient 503, retried.
    api.push_script(Scripted::status(503));
    let r = client.get(sc.url("/flaky")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());

    let total = 1 + 100 + 1 + 1 + 1;
    wait_until(
        Duration::from_secs(10),
        || async { access_lines(&json_lines(&sc.logs())).len() >= total },
        || format!("fewer than {total} access lines\n{}", sc.logs()),
    )
    .await;
    let logs = sc.logs();
    let lines = json_lines(&logs);
    let loud = above_info(&lines);
    assert!(
        loud.is_empty(),
        "WARN/ERROR for requests that succeeded: {loud:#?}"
    );
    // The replays really happened (the test would pass vacuously otherwise).
    let access = access_lines(&lines);
    // At least one of the storm (those that came after the first 401 waited for the new token
    // instead of hitting it), the body-pattern one and the large-body one.
    let replayed = access.iter().filter(|l| l["replayed"] != 0).count();
    assert!(replayed >= 3, "{replayed} replayed requests\n{logs}");
    assert!(
        access.iter().any(|l| l["upstream_status"] == "503,200"),
        "{access:#?}"
    );
    // Pingora's records came through the log bridge; none names a source file.
    assert!(
        lines.iter().any(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("pingora"))),
        "no record of Pingora's to check: {logs}"
    );
    for l in &lines {
        for key in l.keys() {
            assert!(
                !key.starts_with("log.") && key != "file" && key != "line",
                "{key} in {l:?}"
            );
        }
    }
    assert!(!logs.contains(".rs\""), "a source path in the log: {logs}");
}

/// An upstream that refuses connections, under about 200 requests a second for a few seconds:
/// every request gets the sidecar's 502, and the log has at most one WARN line per second that
/// counts the failures it stands for (lines + counts = failed requests), and no ERROR line.
#[tokio::test]
async fn a_down_upstream_under_load_logs_a_few_warn_lines_a_second_with_a_count() {
    let down = format!("http://127.0.0.1:{}", free_port());
    let yaml = format!(
        "upstreams:\n  - {{ name: gone, url: \"{down}\", circuit_breaker: {{ failures: 0 }} }}\n\
         log: {{ format: json, access_log: false }}\n"
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut sent = Vec::new();
    for i in 0..600 {
        tick.tick().await;
        let c = client.clone();
        let url = sc.url(&format!("/x/{i}"));
        sent.push(tokio::spawn(async move {
            c.get(url).send().await.map(|r| r.status().as_u16())
        }));
    }
    let mut failed = 0u64;
    for s in sent {
        let status = s.await.unwrap().unwrap();
        assert_eq!(status, 502, "{}", sc.logs());
        failed += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let lines = json_lines(&sc.logs());
    let loud = above_info(&lines);
    assert!(
        loud.iter().all(|l| l["level"] == "WARN"),
        "an ERROR line: {loud:#?}"
    );
    let warns: Vec<_> = loud
        .iter()
        .filter(|l| l["upstream"] == "gone" && l["cause"] == "network")
        .collect();
    assert_eq!(warns.len(), loud.len(), "other WARN lines: {loud:#?}");
    assert!(
        (warns.len() as f64) <= seconds.ceil() + 1.0,
        "{} WARN lines in {seconds:.1} s: {warns:#?}",
        warns.len()
    );
    // Each line counts the failures held back since the previous one; the ones after the last
    // line are counted by the next line, which may not have come yet: at most a second's worth.
    let counted: u64 = warns
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().expect("suppressed count"))
        .sum();
    assert!(counted <= failed, "{counted} counted, {failed} failed");
    assert!(
        failed - counted <= 400,
        "{counted} of {failed} failures counted: {warns:#?}"
    );
    assert!(
        warns.len() >= 2 && counted > warns.len() as u64,
        "{warns:#?}"
    );
    eprintln!(
        "{failed} failed requests in {seconds:.2} s: {} WARN lines counting {counted}",
        warns.len()
    );
}

/// A client that hangs up while its request waits for the upstream's answer is its own
/// business: the access line says status 0, and nothing is logged above INFO (Pingora logged
/// an ERROR for each such request).
#[tokio::test]
async fn a_client_that_hangs_up_before_its_answer_logs_nothing_above_info() {
    use tokio::io::AsyncWriteExt;
    let (_idp, api, sc) = token_stack("log: { format: json }\n").await;
    api.push_script(Scripted::status(200).with_delay(Duration::from_secs(30)));
    let mut client = tokio::net::TcpStream::connect(sc.listen).await.unwrap();
    client
        .write_all(b"GET /hangs-up HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        .await
        .unwrap();
    // The request is at the upstream, which holds its answer: the client goes.
    wait_until(
        Duration::from_secs(10),
        || async { api.count() == 1 },
        || format!("the request did not reach the upstream\n{}", sc.logs()),
    )
    .await;
    drop(client);
    let line = sc.wait_log_line(&["\"access\"", "/hangs-up"]).await;
    let access: Map<String, Value> = serde_json::from_str(&line).unwrap();
    assert_eq!(access["status"], 0, "{line}");
    let lines = json_lines(&sc.logs());
    let loud = above_info(&lines);
    assert!(loud.is_empty(), "a client that went away: {loud:#?}");
}

/// `key=value` pairs of a text access line (after `access: `); quoted values unescaped.
fn logfmt(line: &str) -> BTreeMap<String, String> {
    let rest = &line[line.find("access: ").expect("an access line") + "access: ".len()..];
    let mut out = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => break,
                    },
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ' ' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        assert!(
            out.insert(key.clone(), value).is_none(),
            "{key} twice: {line}"
        );
    }
}

const FIELDS: [&str; 16] = [
    "client",
    "method",
    "path",
    "proto",
    "status",
    "bytes_in",
    "bytes_out",
    "upstream",
    "upstream_addr",
    "upstream_status",
    "upstream_ms",
    "duration_ms",
    "replayed",
    "generation",
    "request_id",
    "user_agent",
];

/// The requests both format tests send: a replayed POST with a query holding a secret, a
/// request id and a user agent with a space; a GET with a `traceparent`; a GET with no id.
/// Returns the ids the upstream received, in that order.
async fn send_three(sc: &Sidecar, idp: &MockIdp, api: &MockUpstream) -> Vec<String> {
    let client = reqwest::Client::new();
    idp.registry().revoke_all();
    let r = client
        .put(sc.url("/orders/7?id=7&access_token=SECRET-IN-QUERY"))
        .header("x-request-id", "req-one")
        .header("user-agent", "orders-app/1.2 (linux)")
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client
        .get(sc.url("/traced"))
        .header("traceparent", trace)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(sc.url("/anonymous")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = api.requests();
    let id_of = |path: &str| {
        let r = seen
            .iter()
            .rev()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{path} not seen"));
        r.header("x-request-id")
            .or(r.header("traceparent"))
            .unwrap_or_else(|| panic!("{path} reached the upstream without an id"))
            .to_string()
    };
    let ids = vec![id_of("/orders/7"), id_of("/traced"), id_of("/anonymous")];
    assert_eq!(ids[0], "req-one");
    assert_eq!(ids[1], trace);
    assert!(
        ids[2].len() >= 16 && ids[2].chars().all(|c| c.is_ascii_hexdigit()),
        "{ids:?}"
    );
    ids
}

/// Checks the three access lines, whatever format they were read from (values as text).
fn check_three(lines: &[BTreeMap<String, String>], ids: &[String], api: &MockUpstream) {
    for l in lines {
        for f in FIELDS {
            assert!(l.contains_key(f), "no {f} in {l:?}");
        }
        assert!(l["client"].starts_with("127.0.0.1:"), "{l:?}");
        assert_eq!(l["upstream"], "api");
        assert_eq!(l["upstream_addr"], api.addr().to_string());
        assert_eq!(l["proto"], "HTTP/1.1");
        assert_eq!(l["status"], "200");
        assert!(l["upstream_ms"].parse::<f64>().unwrap() > 0.0, "{l:?}");
        assert!(l["duration_ms"].parse::<f64>().unwrap() > 0.0, "{l:?}");
        assert!(!l.values().any(|v| v.contains("SECRET")), "{l:?}");
    }
    let put = &lines[0];
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["path"], "/orders/7?id=&access_token=");
    assert_eq!(put["upstream_status"], "401,200");
    assert_eq!(put["replayed"], "1");
    assert_eq!(put["generation"], "2");
    assert_eq!(put["bytes_in"], "10");
    assert_eq!(put["user_agent"], "orders-app/1.2 (linux)");
    assert_eq!(put["request_id"], ids[0]);
    assert_eq!(lines[1]["request_id"], ids[1]);
    assert_eq!(lines[1]["upstream_status"], "200");
    assert_eq!(lines[1]["replayed"], "0");
    assert_eq!(
        lines[2]["request_id"], ids[2],
        "the generated id went upstream"
    );
    assert_ne!(lines[2]["bytes_out"], "0");
}

#[tokio::test]
async fn access_lines_in_text_are_logfmt_with_every_field() {
    let (idp, api, sc) = token_stack("").await;
    let ids = send_three(&sc, &idp, &api).await;
    let access = || {
        sc.logs()
            .lines()
            .filter(|l| l.contains(" access: "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    wait_until(
        Duration::from_secs(10),
        || async { access().len() >= 3 },
        || format!("fewer than 3 access lines\n{}", sc.logs()),
    )
    .await;
    let raw = access();
    assert_eq!(raw.len(), 3, "{raw:#?}");
    assert!(raw.iter().all(|l| l.contains(" INFO ")), "{raw:#?}");
    // A value with a space is quoted; one without is not.
    assert!(
        raw[0].contains(" user_agent=\"orders-app/1.2 (linux)\"")
            && raw[0].contains(" method=PUT "),
        "{}",
        raw[0]
    );
    let lines: Vec<_> = raw.iter().map(|l| logfmt(l)).collect();
    check_three(&lines, &ids, &api);
}

#[tokio::test]
async fn access_lines_in_json_have_every_field() {
    let (idp, api, sc) = token_stack("log: { format: json }\n").await;
    let ids = send_three(&sc, &idp, &api).await;
    wait_until(
        Duration::from_secs(10),
        || async { access_lines(&json_lines(&sc.logs())).len() >= 3 },
        || format!("fewer than 3 access lines\n{}", sc.logs()),
    )
    .await;
    let all = json_lines(&sc.logs());
    let access = access_lines(&all);
    assert_eq!(access.len(), 3);
    for l in &access {
        assert!(l.contains_key("timestamp"), "{l:?}");
        assert!(l["status"].is_u64() && l["duration_ms"].is_f64(), "{l:?}");
    }
    let as_text: Vec<BTreeMap<String, String>> = access
        .iter()
        .map(|l| {
            l.iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .collect();
    check_three(&as_text, &ids, &api);
}
