//! The in-repo load generator: raw HTTP/1.1 keep-alive connections on one tokio thread, with a
//! log-linear latency histogram (HDR-like, ≤ 1.6 % relative error) per connection, merged at the
//! end. Used where wrk cannot see what we need (per-request replay marks, bursts, paced load),
//! and as a fallback for the throughput scenario when wrk is missing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest response body [`Conn`] reads (the bench's own upstream and the sidecar's admin answer
/// far less; anything bigger is an error, not an allocation).
const MAX_BODY: usize = 16 << 20;

/// Sub-buckets per power of two above 64 ns.
const SUB: u64 = 32;
const BUCKETS: usize = 64 + 40 * SUB as usize;

/// Latencies in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < 64 {
        return v as usize;
    }
    let log2 = 63 - u64::from(v.leading_zeros());
    let shift = log2 - 5; // v >> shift is in [32, 64)
    let top = v >> shift;
    let i = 64 + (shift - 1) * SUB + (top - 32);
    (i as usize).min(BUCKETS - 1)
}

fn value(i: usize) -> u64 {
    if i < 64 {
        return i as u64;
    }
    let i = i as u64 - 64;
    let shift = i / SUB + 1;
    let top = i % SUB + 32;
    // Middle of the bucket.
    (top << shift) + (1 << (shift - 1))
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-th percentile (0–100) in microseconds; 0 when empty.
    pub fn percentile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }
}

/// Percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram) -> Percentiles {
        Percentiles {
            p50: h.percentile_us(50.0),
            p90: h.percentile_us(90.0),
            p99: h.percentile_us(99.0),
            p999: h.percentile_us(99.9),
        }
    }
}

/// One answer, as much as the benchmark needs of it.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub status: u16,
    /// The sidecar marked it `X-Sidecar-Replayed` (debug header).
    pub replayed: bool,
    /// The server closes the connection after this answer.
    pub close: bool,
    /// It carries `Retry-After`.
    pub retry_after: bool,
    /// A 503 whose body names `token_unavailable` (the sidecar's own answer).
    pub token_unavailable: bool,
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` (a complete request, body included) and reads the whole answer.
    pub async fn request(&mut self, request: &[u8]) -> io::Result<Reply> {
        self.stream.write_all(request).await?;
        self.read_reply(false).await.map(|(reply, _)| reply)
    }

    /// Like [`Conn::request`], and also returns the answer's body (a chunked one with its chunk
    /// framing).
    pub async fn request_body(&mut self, request: &[u8]) -> io::Result<(Reply, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.read_reply(true).await
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(())
    }

    /// Reads one answer; its body is returned only if `keep_body`.
    async fn read_reply(&mut self, keep_body: bool) -> io::Result<(Reply, Vec<u8>)> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidData, "response body too large");
        let mut head = loop {
            match parse_head(&self.buf)? {
                Some(head) => break head,
                None => self.fill().await?,
            }
        };
        let end = if head.chunked {
            // Small bodies only: read until the last chunk's terminator.
            loop {
                if let Some(pos) = find(&self.buf[head.len..], b"0\r\n\r\n") {
                    break head.len + pos + 5;
                }
                if self.buf.len() - head.len > MAX_BODY {
                    return Err(too_big());
                }
                self.fill().await?;
            }
        } else {
            let length = head.content_length.unwrap_or(0);
            if length > MAX_BODY {
                return Err(too_big());
            }
            let end = head.len + length;
            while self.buf.len() < end {
                self.fill().await?;
            }
            end
        };
        let body = &self.buf[head.len..end];
        head.reply.token_unavailable =
            head.reply.status == 503 && find(body, b"token_unavailable").is_some();
        let body = if keep_body { body.to_vec() } else { Vec::new() };
        self.buf.drain(..end);
        Ok((head.reply, body))
    }
}

/// A response head, as much as [`Conn::read_reply`] needs of it.
struct Head {
    /// Its length in bytes.
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
    reply: Reply,
}

/// Parses the response head at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed response",
            ))
        }
    };
    let mut head = Head {
        len,
        content_length: None,
        chunked: false,
        reply: Reply {
            status: resp.code.unwrap_or(0),
            replayed: false,
            close: false,
            retry_after: false,
            token_unavailable: false,
        },
    };
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("x-sidecar-replayed") {
            head.reply.replayed = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.reply.close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            head.reply.retry_after = true;
        }
    }
    Ok(Some(head))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `GET /bench` with an optional `Authorization` header.
pub fn bench_request(addr: SocketAddr, authorization: Option<&str>) -> Vec<u8> {
    get_request(addr, "/bench", authorization)
}

/// `GET path` with an optional `Authorization` header.
pub fn get_request(addr: SocketAddr, path: &str, authorization: Option<&str>) -> Vec<u8> {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sidecar-bench\r\n{auth}\r\n")
        .into_bytes()
}

/// What a run saw.
#[derive(Default, Clone)]
pub struct Outcome {
    pub ok: u64,
    pub status_401: u64,
    pub other_status: u64,
    pub errors: u64,
    pub latency: Histogram,
    /// Latencies of answers marked as replayed.
    pub replayed: Histogram,
    /// Latencies of answers not marked as replayed.
    pub plain: Histogram,
    /// Latencies of 2xx answers.
    pub ok_latency: Histogram,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl Outcome {
    pub(crate) fn add(&mut self, r: &io::Result<Reply>, took: Duration) {
        match r {
            Ok(reply) => {
                match reply.status {
                    200..=299 => {
                        self.ok += 1;
                        self.ok_latency.record(took);
                    }
                    401 => self.status_401 += 1,
                    _ => self.other_status += 1,
                }
                self.latency.record(took);
                if reply.replayed {
                    self.replayed.record(took);
                } else {
                    self.plain.record(took);
                }
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e.to_string());
                }
            }
        }
    }

    pub(crate) fn merge(&mut self, o: &Outcome) {
        self.ok += o.ok;
        self.status_401 += o.status_401;
        self.other_status += o.other_status;
        self.errors += o.errors;
        self.latency.merge(&o.latency);
        self.replayed.merge(&o.replayed);
        self.plain.merge(&o.plain);
        self.ok_latency.merge(&o.ok_latency);
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.status_401 + self.other_status
    }
}

/// `c.request(request)`, failing with `TimedOut` after `limit`.
pub async fn request_within(c: &mut Conn, request: &[u8], limit: Duration) -> io::Result<Reply> {
    tokio::time::timeout(limit, c.request(request))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")))
}

/// One request of a load loop, recorded in `out`: on `conn`, connecting first if there is none,
/// bounded by `limit(start of the request)`. The connection is kept unless the request failed or
/// the server closes it. Returns false if it could not connect.
pub async fn send_one(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    request: &[u8],
    limit: impl FnOnce(Instant) -> Duration,
    out: &mut Outcome,
) -> bool {
    let mut c = match conn.take() {
        Some(c) => c,
        None => match Conn::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                out.add(&Err(e), Duration::ZERO);
                return false;
            }
        },
    };
    let t = Instant::now();
    let r = request_within(&mut c, request, limit(t)).await;
    out.add(&r, t.elapsed());
    if r.is_ok_and(|r| !r.close) {
        *conn = Some(c);
    }
    true
}

/// Waits for the per-connection tasks of a run that began at `started` and merges what they saw.
async fn merge_tasks(tasks: Vec<JoinHandle<Outcome>>, started: Instant) -> Outcome {
    let mut total = Outcome::default();
    for t in tasks {
        if let Ok(o) = t.await {
            total.merge(&o);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// Closed loop: `conns` connections each send the next request as soon as the previous answer
/// arrived, for `duration`.
pub async fn closed_loop(
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    conns: usize,
    duration: Duration,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + duration;
    let limit = move |t: Instant| deadline.saturating_duration_since(t) + Duration::from_secs(5);
    let tasks = (0..conns)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut conn = None;
                // Bounded: every iteration either ends at the deadline or completes one request.
                while Instant::now() < deadline {
                    if !send_one(&mut conn, addr, &request, limit, &mut out).await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                out
            })
        })
        .collect();
    merge_tasks(tasks, started).await
}

/// Opens `n` connections (at most `parallel` connecting at once) and sends one request on each
/// so that every connection is fully set up on the server side too.
pub async fn open_warm(
    addr: SocketAddr,
    request: &[u8],
    n: usize,
    parallel: usize,
) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(n);
    let request = Arc::new(request.to_vec());
    let mut left = n;
    while left > 0 {
        let batch = left.min(parallel);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::connect(addr).await.map_err(|e| e.to_string())?;
                let r = tokio::time::timeout(Duration::from_secs(10), c.request(&request))
                    .await
                    .map_err(|_| "warm-up request timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                if r.status != 200 || r.close {
                    return Err(format!("warm-up answer {} (close: {})", r.status, r.close));
                }
                Ok::<Conn, String>(c)
            }));
        }
        for t in tasks {
            conns.push(t.await.map_err(|e| e.to_string())??);
        }
        left -= batch;
    }
    Ok(conns)
}

/// Sends one request on every connection at (nearly) the same moment and waits for all answers
/// (each bounded by `limit`). Gives the connections back.
pub async fn burst(conns: Vec<Conn>, request: &[u8], limit: Duration) -> (Outcome, Vec<Conn>) {
    let request = Arc::new(request.to_vec());
    let (go_tx, go_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for mut c in conns {
        let request = request.clone();
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let mut out = Outcome::default();
            let t = Instant::now();
            let r = request_within(&mut c, &request, limit).await;
            out.add(&r, t.elapsed());
            (out, r.is_ok_and(|r| !r.close).then_some(c))
        }));
    }
    tokio::task::yield_now().await;
    let _ = go_tx.send(true);
    let mut total = Outcome::default();
    let mut back = Vec::new();
    for t in tasks {
        if let Ok((o, c)) = t.await {
            total.merge(&o);
            back.extend(c);
        }
    }
    total.elapsed = started.elapsed();
    (total, back)
}

/// Open loop: `rate` requests per second in all, spread over `conns` connections, each paced by
/// its own schedule (a late connection catches up), for `duration`.
pub async fn paced(
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    conns: usize,
    rate: f64,
    duration: Duration,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + duration;
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let tasks = (0..conns)
        .map(|i| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let offset = period.mul_f64(i as f64 / conns as f64);
                let mut tick = tokio::time::interval_at((started + offset).into(), period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut conn = None;
                loop {
                    tick.tick().await;
                    if Instant::now() >= deadline {
                        break;
                    }
                    // A failed connect waits for the next tick.
                    send_one(
                        &mut conn,
                        addr,
                        &request,
                        |_| Duration::from_secs(10),
                        &mut out,
                    )
                    .await;
                }
                out
            })
        })
        .collect();
    merge_tasks(tasks, started).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..2_000_000u64).step_by(997) {
            let i = index(v);
            assert!(i >= last);
            last = i;
            let back = value(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(v < 64 || err < 0.032, "{v} -> {back}");
        }
    }

    #[test]
    fn response_heads() {
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n";
        assert!(parse_head(partial).unwrap().is_none());
        let text = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nX-Sidecar-Replayed: 1\r\n\
                     Connection: close\r\n\r\nab";
        let h = parse_head(text).unwrap().unwrap();
        assert_eq!(
            (h.len, h.content_length, h.chunked),
            (text.len() - 2, Some(2), false)
        );
        assert_eq!(
            (h.reply.status, h.reply.replayed, h.reply.close),
            (401, true, true)
        );
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.chunked && !h.reply.replayed && !h.reply.close);
        assert!(parse_head(b"nonsense\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn closed_and_paced_loops_against_the_upstream() {
        let registry = sidecar_mocks::TokenRegistry::new();
        let up = crate::upstream::start(registry.clone()).unwrap();
        let auth = format!("Bearer {}", registry.issue(Duration::from_secs(60)));
        let req = Arc::new(bench_request(up.addr, Some(&auth)));
        let o = closed_loop(up.addr, req.clone(), 2, Duration::from_millis(200)).await;
        assert!(
            o.ok > 0 && o.ok == o.requests() && o.errors == 0,
            "{:?}",
            o.first_error
        );
        let o = paced(up.addr, req, 2, 100.0, Duration::from_millis(300)).await;
        assert!(
            o.ok > 0 && o.ok == o.requests() && o.errors == 0,
            "{:?}",
            o.first_error
        );
        let denied = Arc::new(bench_request(up.addr, None));
        let o = closed_loop(up.addr, denied, 1, Duration::from_millis(100)).await;
        assert!(o.status_401 > 0 && o.ok == 0, "{:?}", o.first_error);
    }

    /// The sidecar's own 503 is told apart from an upstream's, and `request_body` hands the body
    /// over while `request` leaves the connection ready for the next answer.
    #[tokio::test]
    async fn token_unavailable_answers_and_bodies() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let own = r#"{"error":"token_unavailable","message":"IdP down"}"#;
            let theirs = r#"{"error":"busy"}"#;
            let answers = format!(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: {}\r\n\r\n{own}\
                 HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{theirs}",
                own.len(),
                theirs.len()
            );
            let mut buf = [0u8; 1024];
            let mut seen = 0;
            // Both requests, then both answers.
            while seen < 2 {
                let n = s.read(&mut buf).await.unwrap();
                seen += buf[..n].windows(4).filter(|w| w == b"\r\n\r\n").count();
            }
            s.write_all(answers.as_bytes()).await.unwrap();
            s
        });
        let mut c = Conn::connect(addr).await.unwrap();
        let req = bench_request(addr, None);
        c.stream.write_all(&req).await.unwrap();
        let (own, body) = c.request_body(&req).await.unwrap();
        assert_eq!(
            (own.status, own.retry_after, own.token_unavailable),
            (503, true, true)
        );
        assert!(body.starts_with(br#"{"error":"token_unavailable""#));
        let (theirs, _) = c.read_reply(false).await.unwrap();
        assert_eq!(
            (theirs.status, theirs.retry_after, theirs.token_unavailable),
            (503, false, false)
        );
        drop(server.await.unwrap());
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() < 10.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 20.0, "{p:?}");
    }
}
