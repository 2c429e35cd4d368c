//! Client connections: idle keep-alive connections and half-sent request heads are
//! closed after their timeouts, connections over `max_connections` get a clear refusal, and
//! pipelined requests are never dropped in silence — through the real sidecar binary, with raw
//! sockets so that every byte and every close is seen.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use support::{open_stack, wait_until};

/// How long any single wait of these tests may take: generous against the configured timeouts
/// of 1 s, well below Pingora's own 60 s.
const BOUND: Duration = Duration::from_secs(15);

/// One answer read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {:?}", self.body_text()))
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the next read on a connection brought.
#[derive(Debug)]
enum Next {
    Answer(Answer),
    /// The sidecar closed the connection (EOF or reset) with no partial answer pending.
    Closed,
}

/// Reads answers off one connection; bytes of a following answer stay in `buf`.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Conn {
        let stream = timeout(BOUND, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        timeout(BOUND, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    /// More bytes; `false` on EOF or a reset. Panics when nothing comes within [`BOUND`].
    async fn fill(&mut self, what: &str) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match timeout(BOUND, self.stream.read(&mut chunk)).await {
            Err(_) => {
                panic!("{what}: nothing within {BOUND:?} (connection neither answered nor closed)")
            }
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next complete answer, or `Closed`. A connection closed in the middle of an answer
    /// fails the test.
    async fn next(&mut self) -> Next {
        loop {
            if let Some(answer) = parse(&mut self.buf) {
                return Next::Answer(answer);
            }
            if !self.fill("waiting for an answer").await {
                assert!(
                    self.buf.is_empty(),
                    "connection closed in the middle of an answer: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return Next::Closed;
            }
        }
    }

    async fn answer(&mut self) -> Answer {
        match self.next().await {
            Next::Answer(a) => a,
            Next::Closed => panic!("connection closed instead of answering"),
        }
    }

    /// Waits (at most [`BOUND`]) for the sidecar to close the connection; what it sends before
    /// closing is returned.
    async fn until_closed(&mut self) -> Vec<u8> {
        while self.fill("waiting for the sidecar to close").await {}
        std::mem::take(&mut self.buf)
    }
}

/// Takes one complete answer (Content-Length or chunked framing) off the front of `buf`.
fn parse(buf: &mut Vec<u8>) -> Option<Answer> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let (body, used) = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = head_end;
        loop {
            let line_end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let data = line_end + 2;
            if buf.len() < data + size + 2 {
                return None;
            }
            body.extend_from_slice(&buf[data..data + size]);
            at = data + size + 2;
            if size == 0 {
                break;
            }
        }
        (body, at)
    } else {
        let len: usize = find("content-length").map_or(0, |v| v.parse().unwrap());
        if buf.len() < head_end + len {
            return None;
        }
        (buf[head_end..head_end + len].to_vec(), head_end + len)
    };
    buf.drain(..used);
    Some(Answer {
        status,
        headers,
        body,
    })
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: sidecar.test\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed_after_idle_timeout() {
    let (_api, sc) = open_stack("downstream: { idle_timeout: 1s, header_timeout: 30s }\n").await;
    let mut conn = Conn::open(sc.listen).await;
    // Keep-alive works: two requests on the one connection.
    for path in ["/one", "/two"] {
        conn.send(&get(path)).await;
        let a = conn.answer().await;
        assert_eq!(a.status, 200, "{}", a.body_text());
        assert_eq!(a.body_json()["path"], path);
    }
    // Then silence: the sidecar ends the connection without a word.
    let rest = conn.until_closed().await;
    assert!(rest.is_empty(), "sent before closing: {rest:?}");
}

#[tokio::test]
async fn half_sent_request_heads_get_408_and_are_closed() {
    let (_api, sc) = open_stack("downstream: { header_timeout: 1s, idle_timeout: 60s }\n").await;

    // The first head of a connection, dribbled a byte at a time: every read brings something,
    // so only a deadline for the whole head ends it.
    let mut conn = Conn::open(sc.listen).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: sidecar.test\r\n")
        .await;
    let (mut read, mut write) = conn.stream.into_split();
    let dribble = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < BOUND {
            if write.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let closed = timeout(BOUND, read.read_to_end(&mut got)).await;
    dribble.abort();
    assert!(
        closed.is_ok(),
        "a dribbled head kept the connection open for {BOUND:?}"
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 408 "), "{text:?}");
    assert!(text.contains("\"request_timeout\""), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text:?}"
    );

    // A later head on a keep-alive connection gets its own deadline.
    let mut conn = Conn::open(sc.listen).await;
    conn.send(&get("/first")).await;
    assert_eq!(conn.answer().await.status, 200);
    conn.send(b"GET /second HTTP/1.1\r\nHost: side").await;
    let rest = String::from_utf8_lossy(&conn.until_closed().await).into_owned();
    assert!(rest.starts_with("HTTP/1.1 408 "), "{rest:?}");
}

/// Until its first byte the connection waits outside Pingora (the sidecar peeks that byte):
/// a silent client is still closed at `header_timeout`, and a head whose first byte comes
/// alone is read whole.
#[tokio::test]
async fn a_silent_connection_closes_at_header_timeout_and_a_lone_first_byte_is_kept() {
    let (_api, sc) = open_stack("downstream: { header_timeout: 1s, idle_timeout: 60s }\n").await;
    let mut silent = Conn::open(sc.listen).await;
    let rest = silent.until_closed().await;
    assert!(rest.is_empty(), "sent to a silent client: {rest:?}");

    let mut conn = Conn::open(sc.listen).await;
    let head = get("/lone");
    conn.send(&head[..1]).await;
    conn.send(&head[1..]).await;
    let a = conn.answer().await;
    assert_eq!(a.status, 200, "{}", a.body_text());
    assert_eq!(a.body_json()["path"], "/lone");
    // And the connection goes on serving.
    conn.send(&get("/next")).await;
    assert_eq!(conn.answer().await.body_json()["path"], "/next");
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_a_freed_place_is_reused() {
    let (_api, sc) = open_stack("downstream: { max_connections: 5 }\n").await;
    let mut held = Vec::new();
    for i in 0..5 {
        let mut conn = Conn::open(sc.listen).await;
        // An answer proves the sidecar took the connection (and counts it).
        conn.send(&get(&format!("/held/{i}"))).await;
        assert_eq!(conn.answer().await.status, 200);
        held.push(conn);
    }

    let mut sixth = Conn::open(sc.listen).await;
    sixth.send(&get("/sixth")).await;
    let refusal = sixth.answer().await;
    assert_eq!(refusal.status, 503, "{}", refusal.body_text());
    assert_eq!(refusal.body_json()["error"], "too_many_connections");
    assert_eq!(refusal.header("connection"), Some("close"));
    assert!(refusal.header("retry-after").is_some());
    assert!(matches!(sixth.next().await, Next::Closed));
    // The held connections still work.
    held[0].send(&get("/held/again")).await;
    assert_eq!(held[0].answer().await.status, 200);

    // One place frees up once the sidecar sees a held connection close.
    drop(held.pop());
    let addr = sc.listen;
    wait_until(
        BOUND,
        || async move {
            let mut conn = Conn::open(addr).await;
            conn.send(&get("/seventh")).await;
            conn.answer().await.status == 200
        },
        || "no place came free after a connection closed".to_string(),
    )
    .await;

    let refused = support::metrics::scrape(&sc)
        .await
        .sum("sidecar_client_connections_refused_total", &[]);
    assert!(refused > 0.0, "{refused}");
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order_or_cut_off_explicitly() {
    let (api, sc) = open_stack("").await;
    let mut conn = Conn::open(sc.listen).await;
    // 100 requests in one write, some with bodies, before reading anything.
    let mut wire = Vec::new();
    for i in 0..100 {
        if i % 10 == 5 {
            let body = "b".repeat(i);
            wire.extend_from_slice(
                format!(
                    "POST /p/{i} HTTP/1.1\r\nHost: sidecar.test\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        } else {
            wire.extend_from_slice(&get(&format!("/p/{i}")));
        }
    }
    conn.send(&wire).await;

    let mut answered = 0;
    let mut last_close = false;
    while let Next::Answer(a) = conn.next().await {
        assert_eq!(a.status, 200, "answer {answered}: {}", a.body_text());
        let json = a.body_json();
        assert_eq!(
            json["path"],
            format!("/p/{answered}"),
            "answers out of order"
        );
        if answered % 10 == 5 {
            assert_eq!(json["body_len"], answered);
        }
        last_close = a
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        answered += 1;
        if answered == 100 || last_close {
            break;
        }
    }
    // Pipelining is on: every request is answered, in order (a close after some answers would
    // be allowed by HTTP/1.1, but is not what the sidecar does).
    assert_eq!(
        answered, 100,
        "{answered} of 100 pipelined requests answered (Connection: close seen: {last_close})"
    );
    assert_eq!(
        api.count(),
        answered,
        "the upstream saw unanswered requests"
    );
}

/// Between keep-alive requests the sidecar waits for the next request's first bytes itself and
/// leaves reading to Pingora when Pingora may hold them already: requests sent one at a time,
/// two in one write, a request line Pingora has to escape with another behind it, and one more
/// after that are all answered, in order, on one connection.
#[tokio::test]
async fn keep_alive_requests_alone_pipelined_and_escaped_are_all_answered_in_order() {
    let (api, sc) = open_stack("").await;
    let mut conn = Conn::open(sc.listen).await;
    let mut paths = Vec::new();
    let mut expect = |conn_paths: &[&str]| {
        paths.extend(conn_paths.iter().map(|p| p.to_string()));
    };
    // One at a time.
    for path in ["/k/1", "/k/2"] {
        conn.send(&get(path)).await;
        let a = conn.answer().await;
        assert_eq!(a.status, 200, "{}", a.body_text());
        assert_eq!(a.body_json()["path"], path);
        expect(&[path]);
    }
    // Two in one write: the second is in Pingora's hands when the first is answered.
    let mut two = get("/k/3");
    two.extend_from_slice(&get("/k/4"));
    conn.send(&two).await;
    for path in ["/k/3", "/k/4"] {
        let a = conn.answer().await;
        assert_eq!(a.body_json()["path"], path);
        expect(&[path]);
    }
    // A request line with spaces in its target, which Pingora percent-escapes before parsing
    // (its copy of the head is then two bytes longer per space than what was sent), with a
    // whole request behind it in the same write — as long as the escaping added: counting the
    // copy's length as the bytes served would take that request for the next request's absence.
    let next = get("/k/66");
    assert_eq!(next.len() % 2, 0);
    let spaces = " ".repeat(next.len() / 2);
    let mut escaped =
        format!("GET /k/5{spaces}5 HTTP/1.1\r\nHost: sidecar.test\r\n\r\n").into_bytes();
    escaped.extend_from_slice(&next);
    conn.send(&escaped).await;
    let a = conn.answer().await;
    assert_eq!(a.status, 200, "{}", a.body_text());
    let target = format!("/k/5{}5", "%20".repeat(spaces.len()));
    assert_eq!(a.body_json()["path"], target.as_str());
    let a = conn.answer().await;
    assert_eq!(a.body_json()["path"], "/k/66");
    expect(&[&target, "/k/66"]);
    // And one more, alone.
    conn.send(&get("/k/7")).await;
    let a = conn.answer().await;
    assert_eq!(a.body_json()["path"], "/k/7");
    expect(&["/k/7"]);
    let seen: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, paths);
}
