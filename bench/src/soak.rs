//! The soak (`--only soak`; minutes, never in CI): the sidecar in front of a checking upstream for
//! `--soak-secs` (default 3 minutes) while its 2 s tokens keep expiring, the IdP revokes every
//! token at random moments and goes down for 5 s every 30 s, under mixed GET / PUT / keyed POST /
//! plain POST traffic. It checks what must never happen (client 401s on replayable requests,
//! lost requests, a non-idempotent request executed twice, panics) and reports what it costs
//! (IdP calls per minute, the sidecar's memory over time).
//!
//! Every request carries a unique `x-request-id`; the upstream (`sidecar-mocks`' `MockUpstream`,
//! checking tokens against the IdP's registry) records each one it received, so duplicates are
//! counted from what the upstream saw, not from what the sidecar says.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sidecar_mocks::{Failure, MockUpstream, Recorded, UpstreamConfig};

use crate::load::{self, Conn, Histogram, Percentiles};
use crate::procs;
use crate::scenarios::{self, mib, ok_mark as mark, Env, World};

/// Lifetime of every token the IdP issues during the soak.
const TOKEN_TTL: Duration = Duration::from_secs(2);
/// The first IdP outage starts this long into the run, the next ones every `OUTAGE_EVERY`.
const FIRST_OUTAGE: Duration = Duration::from_secs(20);
const OUTAGE_EVERY: Duration = Duration::from_secs(30);
const OUTAGE_FOR: Duration = Duration::from_secs(5);
/// Revocations come at uniformly random gaps in this range (about 3 per 10 s).
const REVOKE_GAP_MS: (u64, u64) = (1000, 5000);
/// Client connections, and the pause between two requests on one of them (~320 requests/s).
const CONNS: usize = 8;
const PACE: Duration = Duration::from_millis(25);
/// How long the client waits for one answer before counting the request lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the sidecar's RSS is sampled.
const RSS_EVERY: Duration = Duration::from_secs(10);

/// The sidecar's settings, scaled to 2 s tokens: refresh 1 s before expiry (±10 %), stop using a
/// token 250 ms early, back off 250 ms → 2 s after failed refreshes; a request whose token died
/// waits up to 3 s for a new one (shorter than an outage, so 503s do happen).
const REFRESH: &str =
    "{ before_expiry: 1s, jitter: 10%, skew: 250ms, min_interval: 250ms, backoff: [250ms, 500ms, 1s, 2s] }";
const WAIT_FOR_TOKEN: Duration = Duration::from_secs(3);
/// The largest refresh backoff above.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const REPLAY: &str = "{ debug_header: true, max_attempts: 3, wait_for_token: 3s }";

/// The kinds of request the soak sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `GET /soak/items/N`: idempotent.
    Get,
    /// `PUT /soak/items/N` with a JSON body: idempotent.
    Put,
    /// `POST /soak/orders` with `Idempotency-Key`: replayable.
    KeyedPost,
    /// `POST /soak/orders` without a key: must never reach the upstream twice.
    Post,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Get, Kind::Put, Kind::KeyedPost, Kind::Post];

    fn name(self) -> &'static str {
        match self {
            Kind::Get => "GET",
            Kind::Put => "PUT",
            Kind::KeyedPost => "POST + Idempotency-Key",
            Kind::Post => "POST (non-idempotent)",
        }
    }

    /// 40 % GET, 20 % each of the others.
    fn pick(roll: u64) -> Kind {
        match roll % 10 {
            0..=3 => Kind::Get,
            4 | 5 => Kind::Put,
            6 | 7 => Kind::KeyedPost,
            _ => Kind::Post,
        }
    }

    fn replayable(self) -> bool {
        self != Kind::Post
    }
}

/// The `Idempotency-Key` a keyed POST carries.
fn key_of(id: u64) -> String {
    format!("soak-key-{id}")
}

/// The raw HTTP/1.1 request of `kind` with request id `id`.
fn request(addr: SocketAddr, kind: Kind, id: u64) -> Vec<u8> {
    let item = id % 100;
    let (line, key, body) = match kind {
        Kind::Get => (format!("GET /soak/items/{item}"), None, None),
        Kind::Put => (
            format!("PUT /soak/items/{item}"),
            None,
            Some(format!(r#"{{"item":{item},"request":{id}}}"#)),
        ),
        Kind::KeyedPost => (
            "POST /soak/orders".to_string(),
            Some(key_of(id)),
            Some(format!(r#"{{"order":{id},"keyed":true}}"#)),
        ),
        Kind::Post => (
            "POST /soak/orders".to_string(),
            None,
            Some(format!(r#"{{"order":{id},"keyed":false}}"#)),
        ),
    };
    let mut text = format!(
        "{line} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sidecar-bench-soak\r\nx-request-id: {id}\r\n"
    );
    if let Some(key) = key {
        let _ = write!(text, "Idempotency-Key: {key}\r\n");
    }
    match body {
        Some(body) => {
            let _ = write!(
                text,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
        None => text.push_str("\r\n"),
    }
    text.into_bytes()
}

/// splitmix64: enough randomness for picking request kinds and revocation gaps, without a crate.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(now ^ u64::from(std::process::id()).rotate_left(32) ^ salt)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What became of one request, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Ok,
    Unauthorized,
    /// 503 `token_unavailable`; whether it carried `Retry-After`.
    TokenUnavailable {
        retry_after: bool,
    },
    Other(u16),
    /// Sent, but no (complete) answer: an error or the timeout.
    Lost,
    /// Not sent: the connection could not be opened.
    NoConnection,
}

/// One request the client sent (or tried to).
#[derive(Clone, Copy, Debug)]
struct Sent {
    id: u64,
    kind: Kind,
    class: Class,
    /// Marked `X-Sidecar-Replayed`.
    replayed: bool,
    /// When it was sent, from the start of the run.
    at: Duration,
    took: Duration,
}

/// One client connection: a request every `pace` until `deadline`, each with a fresh id.
async fn drive(
    addr: SocketAddr,
    conn_index: u64,
    started: Instant,
    deadline: Instant,
    pace: Duration,
) -> Vec<Sent> {
    let mut rng = Rng::seeded(conn_index);
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    // Bounded: every round either ends at the deadline or takes a tick.
    for seq in 1u64.. {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        let id = (conn_index << 40) | seq;
        let kind = Kind::pick(rng.next());
        let at = started.elapsed();
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => c,
                Err(_) => {
                    sent.push(Sent {
                        id,
                        kind,
                        class: Class::NoConnection,
                        replayed: false,
                        at,
                        took: Duration::ZERO,
                    });
                    continue;
                }
            },
        };
        let t = Instant::now();
        let answer = load::request_within(&mut c, &request(addr, kind, id), REQUEST_TIMEOUT).await;
        let took = t.elapsed();
        let (class, replayed) = match &answer {
            Ok(r) => (
                match r.status {
                    200..=299 => Class::Ok,
                    401 => Class::Unauthorized,
                    503 if r.token_unavailable => Class::TokenUnavailable {
                        retry_after: r.retry_after,
                    },
                    status => Class::Other(status),
                },
                r.replayed,
            ),
            Err(_) => (Class::Lost, false),
        };
        sent.push(Sent {
            id,
            kind,
            class,
            replayed,
            at,
            took,
        });
        if answer.is_ok_and(|r| !r.close) {
            conn = Some(c);
        }
    }
    sent
}

/// What the upstream saw of one request id.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Times it reached the upstream.
    forwarded: u32,
    /// Times the upstream executed it (accepted the token and answered 200).
    executed: u32,
}

/// The checks: the client's log against the upstream's.
#[derive(Debug, Default, PartialEq, Eq)]
struct Findings {
    /// Non-idempotent POSTs the upstream executed more than once.
    post_executed_twice: u64,
    /// Non-idempotent POSTs that reached the upstream more than once (even if refused).
    post_forwarded_twice: u64,
    /// Keyed POSTs that reached the upstream more than once (replays: allowed).
    keyed_forwarded_twice: u64,
    /// Keyed POSTs executed more than once (allowed: the key lets the upstream deduplicate).
    keyed_executed_twice: u64,
    /// GETs and PUTs executed more than once.
    idempotent_executed_twice: u64,
    /// Upstream requests whose `Idempotency-Key` is not the one the client sent (or is there
    /// though the client sent none).
    key_changed: u64,
    /// 2xx answers to requests the upstream never executed: an invented success.
    invented: u64,
    /// Lost requests the upstream executed anyway.
    lost_but_executed: u64,
    /// Upstream requests without a known `x-request-id`.
    unidentified: u64,
}

fn analyse(sent: &[Sent], records: &[Recorded]) -> Findings {
    let kinds: HashMap<u64, Kind> = sent.iter().map(|s| (s.id, s.kind)).collect();
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let mut f = Findings::default();
    for r in records {
        let id = r
            .header("x-request-id")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let Some((id, kind)) = id.and_then(|id| Some((id, *kinds.get(&id)?))) else {
            f.unidentified += 1;
            continue;
        };
        let s = seen.entry(id).or_default();
        s.forwarded += 1;
        s.executed += u32::from(r.status == 200);
        let expected = (kind == Kind::KeyedPost).then(|| key_of(id));
        if r.header("idempotency-key") != expected.as_deref() {
            f.key_changed += 1;
        }
    }
    for s in sent {
        let v = seen.get(&s.id).copied().unwrap_or_default();
        match s.kind {
            Kind::Post => {
                f.post_executed_twice += u64::from(v.executed > 1);
                f.post_forwarded_twice += u64::from(v.forwarded > 1);
            }
            Kind::KeyedPost => {
                f.keyed_executed_twice += u64::from(v.executed > 1);
                f.keyed_forwarded_twice += u64::from(v.forwarded > 1);
            }
            Kind::Get | Kind::Put => f.idempotent_executed_twice += u64::from(v.executed > 1),
        }
        f.invented += u64::from(s.class == Class::Ok && v.executed == 0);
        f.lost_but_executed += u64::from(s.class == Class::Lost && v.executed > 0);
    }
    f
}

/// `503 token_unavailable` answers that arrived outside every outage window (`outages`, from
/// the start of the run) widened by `grace`: a token can only be unavailable while the IdP is
/// down, or shortly after (a request waits up to `wait_for_token`, a refresh may still be backing
/// off). Returns their arrival times.
fn unavailable_outside(
    sent: &[Sent],
    outages: &[(Duration, Duration)],
    grace: Duration,
) -> Vec<Duration> {
    sent.iter()
        .filter(|s| matches!(s.class, Class::TokenUnavailable { .. }))
        .map(|s| s.at + s.took)
        .filter(|t| {
            !outages
                .iter()
                .any(|(from, to)| *t >= *from && *t <= *to + grace)
        })
        .collect()
}

/// Counts per kind of request.
#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    replayed_ok: u64,
    unauthorized: u64,
    unavailable: u64,
    unavailable_no_retry_after: u64,
    other: BTreeMap<u16, u64>,
    lost: u64,
    no_connection: u64,
    latency: Histogram,
}

fn tally(sent: &[Sent]) -> BTreeMap<Kind, Tally> {
    let mut out: BTreeMap<Kind, Tally> = Kind::ALL.iter().map(|k| (*k, Tally::default())).collect();
    for s in sent {
        let t = out.entry(s.kind).or_default();
        t.sent += 1;
        match s.class {
            Class::Ok => {
                t.ok += 1;
                t.replayed_ok += u64::from(s.replayed);
            }
            Class::Unauthorized => t.unauthorized += 1,
            Class::TokenUnavailable { retry_after } => {
                t.unavailable += 1;
                t.unavailable_no_retry_after += u64::from(!retry_after);
            }
            Class::Other(status) => *t.other.entry(status).or_default() += 1,
            Class::Lost => t.lost += 1,
            Class::NoConnection => t.no_connection += 1,
        }
        if !matches!(s.class, Class::Lost | Class::NoConnection) {
            t.latency.record(s.took);
        }
    }
    out
}

/// `GET path` on `addr`: the body of a 200 answer (bounded in size by [`Conn`] and in time).
pub(crate) async fn get_text(addr: SocketAddr, path: &str) -> Result<String, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        let mut c = Conn::connect(addr).await?;
        c.request_body(req.as_bytes()).await
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok((r, body))) if r.status == 200 => Ok(String::from_utf8_lossy(&body).into_owned()),
        Ok(Ok((r, _))) => Err(format!("GET {path} answered {}", r.status)),
        Ok(Err(e)) => Err(format!("GET {path}: {e}")),
        Err(_) => Err(format!("GET {path} timed out")),
    }
}

/// The value of label `name` in a Prometheus label set `{a="x",b="y"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// The series of counter `metric` in a Prometheus text page, keyed by the values of `labels`
/// joined with a space.
pub(crate) fn counters(page: &str, metric: &str, labels: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((set, value)) => (set, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let key: Vec<&str> = labels
            .iter()
            .map(|l| label(set, l).unwrap_or("-"))
            .collect();
        *out.entry(key.join(" ")).or_default() += value;
    }
    out
}

/// `after - before` per series, the ones that did not move left out, as "a b 12, c d 3".
fn moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .map(|(k, d)| format!("{k} {d:.0}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// What the sidecar's log holds: panics, error and warning lines (the most frequent messages),
/// anything shaped like one of the mock IdP's tokens.
struct LogScan {
    bytes: u64,
    panics: u64,
    errors: u64,
    warnings: u64,
    token_like: u64,
    top: Vec<(String, u64)>,
    panic_lines: Vec<String>,
}

fn scan_log(text: &str) -> LogScan {
    let mut messages: HashMap<String, u64> = HashMap::new();
    let mut scan = LogScan {
        bytes: text.len() as u64,
        panics: 0,
        errors: 0,
        warnings: 0,
        token_like: text.matches("tok_").count() as u64,
        top: Vec::new(),
        panic_lines: Vec::new(),
    };
    for line in text.lines() {
        if line.contains("panicked") {
            scan.panics += 1;
            if scan.panic_lines.len() < 5 {
                scan.panic_lines.push(line.chars().take(300).collect());
            }
        }
        let level = [" ERROR ", " WARN "]
            .into_iter()
            .find_map(|l| line.find(l).map(|at| (l, at)));
        if let Some((l, at)) = level {
            if l == " ERROR " {
                scan.errors += 1;
            } else {
                scan.warnings += 1;
            }
            // The message without the timestamp; every number (durations, counts) masked as one
            // `#` so that repeats of one message count together.
            let mut message = String::new();
            for c in line[at..].trim().chars() {
                if !c.is_ascii_digit() {
                    message.push(c);
                } else if !message.ends_with('#') {
                    message.push('#');
                }
                if message.len() >= 160 {
                    break;
                }
            }
            *messages.entry(message).or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = messages.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(8);
    scan.top = top;
    scan
}

/// Reads at most `limit` bytes of `path` (the sidecar's log, which the soak must not let blow
/// up this process either).
fn read_bounded(path: &std::path::Path, limit: u64) -> String {
    let mut text = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(limit).read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Runs the soak; returns its Markdown section.
pub async fn run(env: &Env, w: &World) -> Result<String, String> {
    let duration = env.plan.soak;
    w.idp.set_ttl(TOKEN_TTL);
    let upstream = w
        .on_idp_thread(MockUpstream::try_start(UpstreamConfig::checking(
            w.registry.clone(),
        )))
        .await?
        .map_err(|e| format!("checking upstream: {e}"))?;
    let (listen, admin) = (procs::free_port()?, procs::free_port()?);
    let yaml = scenarios::sidecar_yaml(w, listen, admin, upstream.addr(), REFRESH, REPLAY, "");
    let sidecar = scenarios::launch_sidecar(env, w, "soak", listen, admin, &yaml).await?;
    let pid = sidecar.proc.pid;
    upstream.clear();

    let metrics_before = get_text(sidecar.admin, "/metrics").await?;
    let idp_before = w.idp.calls();
    let rss_start = procs::rss_kib(pid).ok_or("cannot read the sidecar's VmRSS")?;
    let cpu_before = procs::cpu_ns(pid);
    let started = Instant::now();
    let deadline = started + duration;

    // The IdP's misbehaviour: revocations at random gaps, a 5 s outage every 30 s (only those
    // that end 5 s before the run does, so that recovery is seen). Both stop by themselves.
    let mut outages: Vec<(Duration, Duration)> = Vec::new();
    let revoker = {
        let registry = w.registry.clone();
        tokio::spawn(async move {
            let mut rng = Rng::seeded(u64::MAX);
            let mut n = 0u64;
            loop {
                let gap = Duration::from_millis(rng.between(REVOKE_GAP_MS.0, REVOKE_GAP_MS.1));
                if Instant::now() + gap >= deadline {
                    break n;
                }
                tokio::time::sleep(gap).await;
                registry.revoke_all();
                n += 1;
            }
        })
    };
    let outage_plan: Vec<Duration> = (0u32..)
        .map(|k| FIRST_OUTAGE + OUTAGE_EVERY * k)
        .take_while(|at| *at + OUTAGE_FOR + Duration::from_secs(5) <= duration)
        .collect();
    let traffic: Vec<_> = (0..CONNS as u64)
        .map(|i| tokio::spawn(drive(listen, i, started, deadline, PACE)))
        .collect();

    // Outages and RSS samples, on this task, until the deadline.
    let mut rss_samples = vec![(Duration::ZERO, rss_start)];
    let mut next_rss = started + RSS_EVERY;
    let mut pending = outage_plan.iter().copied().peekable();
    let mut down_since: Option<Duration> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let next_outage_event = match (down_since, pending.peek()) {
            (Some(since), _) => Some(started + since + OUTAGE_FOR),
            (None, Some(at)) => Some(started + *at),
            (None, None) => None,
        };
        let wake = [Some(next_rss), next_outage_event, Some(deadline)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(deadline);
        tokio::time::sleep_until(wake.into()).await;
        let now = Instant::now();
        if now >= next_rss {
            if let Some(kib) = procs::rss_kib(pid) {
                rss_samples.push((started.elapsed(), kib));
            }
            next_rss += RSS_EVERY;
        }
        match down_since {
            Some(since) if now >= started + since + OUTAGE_FOR => {
                w.idp.set_failure(None);
                outages.push((since, started.elapsed()));
                down_since = None;
            }
            None if pending.peek().is_some_and(|at| now >= started + *at) => {
                pending.next();
                w.idp.set_failure(Some(Failure::Down));
                down_since = Some(started.elapsed());
            }
            _ => {}
        }
    }
    if let Some(since) = down_since.take() {
        w.idp.set_failure(None);
        outages.push((since, started.elapsed()));
    }

    let mut sent = Vec::new();
    for t in traffic {
        sent.extend(t.await.map_err(|e| format!("traffic task: {e}"))?);
    }
    let revocations = revoker.await.unwrap_or(0);
    let elapsed = started.elapsed();
    let rss_end = procs::rss_kib(pid).ok_or("cannot read the sidecar's VmRSS at the end")?;
    let cpu = procs::cpu_ns(pid).saturating_sub(cpu_before);
    let idp_calls = w.idp.calls().saturating_sub(idp_before);
    let metrics_after = get_text(sidecar.admin, "/metrics").await?;
    let alive = procs::alive(pid);
    let records = upstream.requests();
    let log_path = sidecar.log.clone();
    drop(upstream);
    drop(sidecar);
    let log_text = read_bounded(&log_path, 64 << 20);
    let kept_log = std::env::temp_dir().join("sidecar-bench-soak.log");
    let _ = std::fs::write(&kept_log, &log_text);

    let findings = analyse(&sent, &records);
    let tallies = tally(&sent);
    let late_503 = unavailable_outside(
        &sent,
        &outages,
        WAIT_FOR_TOKEN + MAX_BACKOFF + Duration::from_secs(1),
    );
    let log = scan_log(&log_text);
    let minutes = elapsed.as_secs_f64() / 60.0;
    let sum = |f: fn(&Tally) -> u64, kinds: &[Kind]| -> u64 {
        kinds.iter().map(|k| tallies.get(k).map_or(0, f)).sum()
    };
    let replayable: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.replayable()).collect();
    let replayable_401 = sum(|t| t.unauthorized, &replayable);
    let non_replayable: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !k.replayable()).collect();
    let post_401 = sum(|t| t.unauthorized, &non_replayable);
    let lost = sum(|t| t.lost, &Kind::ALL);
    let no_conn = sum(|t| t.no_connection, &Kind::ALL);
    let no_retry_after = sum(|t| t.unavailable_no_retry_after, &Kind::ALL);
    let total = sent.len() as u64;
    eprintln!(
        "bench:   soak: {total} requests, {replayable_401} 401s on replayable requests, {lost} lost, \
         {} non-idempotent POSTs executed twice, {idp_calls} IdP calls, RSS {} → {}, {} panics",
        findings.post_executed_twice,
        mib(rss_start),
        mib(rss_end),
        log.panics
    );

    let refresh =
        |page: &str| counters(page, "sidecar_token_refresh_total", &["trigger", "result"]);
    let replays = |page: &str| counters(page, "sidecar_replays_total", &["reason", "result"]);
    let skipped = |page: &str| counters(page, "sidecar_replay_skipped_total", &["reason"]);
    let refresh_moved = moved(&refresh(&metrics_before), &refresh(&metrics_after));
    let refresh_attempts: f64 = refresh(&metrics_after).values().sum::<f64>()
        - refresh(&metrics_before).values().sum::<f64>();
    let rss_max = rss_samples
        .iter()
        .map(|(_, k)| *k)
        .chain([rss_end])
        .max()
        .unwrap_or(rss_end);

    let build = match env.sidecar_bin.parent() {
        Some(dir) if dir.ends_with("release") => "release build".to_string(),
        _ => format!(
            "{}: not a release build, the numbers say little",
            env.sidecar_bin.display()
        ),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Soak\n\n{:.0} s of traffic through the sidecar ({build}) to a checking upstream \
         (`sidecar-mocks`' `MockUpstream`, tokens checked against the mock IdP's registry; every \
         request it receives is recorded with its `x-request-id`). The IdP issues {} s tokens, \
         revokes every token at random gaps of {}–{} s ({revocations} revocations) and is down \
         (connections closed unanswered) for {} s every {} s from {} s on ({} outages). \
         {CONNS} keep-alive connections each send a request every {} ms: 40 % `GET`, 20 % `PUT` \
         with a body, 20 % `POST` with `Idempotency-Key`, 20 % `POST` without (non-idempotent), \
         each with a unique `x-request-id`; a request without an answer within {} s counts as \
         lost.\n\nSidecar settings: `refresh: {REFRESH}`, `replay: {REPLAY}`, retry and \
         everything else at their defaults.\n",
        elapsed.as_secs_f64(),
        TOKEN_TTL.as_secs(),
        REVOKE_GAP_MS.0 / 1000,
        REVOKE_GAP_MS.1 / 1000,
        OUTAGE_FOR.as_secs(),
        OUTAGE_EVERY.as_secs(),
        FIRST_OUTAGE.as_secs(),
        outages.len(),
        PACE.as_millis(),
        REQUEST_TIMEOUT.as_secs(),
    );
    s.push_str("| check | measured | |\n|---|---:|---|\n");
    let mut row = |what: &str, value: String, ok: Option<bool>| {
        let _ = writeln!(s, "| {what} | {value} | {} |", ok.map_or("", mark));
    };
    row("requests sent", total.to_string(), None);
    row(
        "client 401s on replayable requests (GET, PUT, keyed POST) (= 0)",
        replayable_401.to_string(),
        Some(replayable_401 == 0),
    );
    row(
        "client 401s on non-idempotent POSTs (passed through, never replayed)",
        post_401.to_string(),
        None,
    );
    row(
        "lost requests: sent, no answer (= 0)",
        lost.to_string(),
        Some(lost == 0),
    );
    row(
        "requests not sent: connection refused or failed (= 0)",
        no_conn.to_string(),
        Some(no_conn == 0),
    );
    row(
        "non-idempotent POSTs executed twice (= 0)",
        findings.post_executed_twice.to_string(),
        Some(findings.post_executed_twice == 0),
    );
    row(
        "non-idempotent POSTs that reached the upstream twice (= 0)",
        findings.post_forwarded_twice.to_string(),
        Some(findings.post_forwarded_twice == 0),
    );
    row(
        "keyed POSTs replayed (reached the upstream more than once, same key) / executed twice",
        format!(
            "{} / {}",
            findings.keyed_forwarded_twice, findings.keyed_executed_twice
        ),
        None,
    );
    row(
        "upstream requests whose Idempotency-Key differs from the client's (= 0)",
        findings.key_changed.to_string(),
        Some(findings.key_changed == 0),
    );
    row(
        "2xx answers the upstream never executed (= 0)",
        findings.invented.to_string(),
        Some(findings.invented == 0),
    );
    row(
        "GETs/PUTs executed twice; lost requests executed anyway; unidentified upstream requests",
        format!(
            "{}; {}; {}",
            findings.idempotent_executed_twice, findings.lost_but_executed, findings.unidentified
        ),
        None,
    );
    row(
        "503 token_unavailable without Retry-After (= 0)",
        no_retry_after.to_string(),
        Some(no_retry_after == 0),
    );
    row(
        &format!(
            "503 token_unavailable answered outside an outage (+{} s) (= 0)",
            (WAIT_FOR_TOKEN + MAX_BACKOFF + Duration::from_secs(1)).as_secs()
        ),
        late_503.len().to_string(),
        Some(late_503.is_empty()),
    );
    row(
        "IdP token calls answered, per minute",
        format!("{idp_calls} ({:.1}/min)", idp_calls as f64 / minutes),
        None,
    );
    row(
        "refresh attempts per the sidecar's metrics (outages included), per minute",
        format!(
            "{refresh_attempts:.0} ({:.1}/min)",
            refresh_attempts / minutes
        ),
        None,
    );
    row(
        "sidecar RSS at start → end (max sampled)",
        format!("{} → {} ({})", mib(rss_start), mib(rss_end), mib(rss_max)),
        None,
    );
    row(
        "sidecar CPU time",
        format!(
            "{:.1} s ({:.1} % of one core)",
            cpu as f64 / 1e9,
            cpu as f64 / 1e9 / elapsed.as_secs_f64() * 100.0
        ),
        None,
    );
    row(
        "panics in the sidecar's log (= 0)",
        log.panics.to_string(),
        Some(log.panics == 0),
    );
    row(
        "token-shaped strings (`tok_`) in the sidecar's log (= 0)",
        log.token_like.to_string(),
        Some(log.token_like == 0),
    );
    row(
        "sidecar still running at the end",
        alive.to_string(),
        Some(alive),
    );

    s.push_str(
        "\nBy kind of request (latency of answered requests, ms; \"replayed\": 2xx answers marked \
         `X-Sidecar-Replayed`):\n\n| request | sent | 2xx | replayed | 401 | 503 token_unavailable | \
         other | lost | not sent | p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for (kind, t) in &tallies {
        let p = Percentiles::of(&t.latency);
        let other = if t.other.is_empty() {
            "0".to_string()
        } else {
            t.other
                .iter()
                .map(|(status, n)| format!("{n}× {status}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {other} | {} | {} | {:.1} | {:.1} | {:.1} |",
            kind.name(),
            t.sent,
            t.ok,
            t.replayed_ok,
            t.unauthorized,
            t.unavailable,
            t.lost,
            t.no_connection,
            p.p50 / 1000.0,
            p.p99 / 1000.0,
            t.latency.percentile_us(100.0) / 1000.0,
        );
    }
    let windows: Vec<String> = outages
        .iter()
        .map(|(a, b)| format!("{:.1}–{:.1}", a.as_secs_f64(), b.as_secs_f64()))
        .collect();
    let _ = writeln!(
        s,
        "\nIdP outages (s from the start): {}.",
        if windows.is_empty() {
            "none".into()
        } else {
            windows.join(", ")
        }
    );
    if !late_503.is_empty() {
        let at: Vec<String> = late_503
            .iter()
            .take(20)
            .map(|t| format!("{:.1}", t.as_secs_f64()))
            .collect();
        let _ = writeln!(
            s,
            "\n503s outside the outages answered at (s): {}.",
            at.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\nSidecar metrics over the run: token refreshes by trigger and result: {refresh_moved}; \
         replays by reason and result: {}; replays skipped by reason: {}.",
        moved(&replays(&metrics_before), &replays(&metrics_after)),
        moved(&skipped(&metrics_before), &skipped(&metrics_after)),
    );
    let series: Vec<String> = rss_samples
        .iter()
        .map(|(t, k)| format!("{:.0} s {:.1}", t.as_secs_f64(), *k as f64 / 1024.0))
        .collect();
    let _ = writeln!(
        s,
        "\nRSS samples (MiB): {}, end {:.1}.",
        series.join(", "),
        rss_end as f64 / 1024.0
    );
    let _ = writeln!(
        s,
        "\nSidecar log ({} bytes, level warn; kept in {}): {} panic line(s), {} ERROR and {} WARN \
         lines.",
        log.bytes,
        kept_log.display(),
        log.panics,
        log.errors,
        log.warnings
    );
    for line in &log.panic_lines {
        let _ = writeln!(s, "- panic: `{line}`");
    }
    if !log.top.is_empty() {
        s.push_str("\nMost frequent ERROR/WARN messages (numbers masked as `#`):\n\n");
        for (message, n) in &log.top {
            let _ = writeln!(s, "- {n}× `{}`", message.replace('`', "'"));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, key: Option<&str>, status: u16) -> Recorded {
        let mut headers = vec![("x-request-id".to_string(), id.to_string())];
        if let Some(key) = key {
            headers.push(("idempotency-key".to_string(), key.to_string()));
        }
        Recorded {
            method: "POST".into(),
            version: "HTTP/1.1".into(),
            path: "/soak/orders".into(),
            query: None,
            headers,
            body_len: 0,
            body_sha256: String::new(),
            token: None,
            status,
            at: Instant::now(),
        }
    }

    fn sent(id: u64, kind: Kind, class: Class) -> Sent {
        Sent {
            id,
            kind,
            class,
            replayed: false,
            at: Duration::from_secs(id),
            took: Duration::from_millis(1),
        }
    }

    #[test]
    fn analysis_counts_duplicates_changed_keys_and_invented_answers() {
        let client = [
            sent(1, Kind::Post, Class::Ok),
            sent(2, Kind::Post, Class::Unauthorized),
            sent(3, Kind::KeyedPost, Class::Ok),
            sent(4, Kind::KeyedPost, Class::Ok),
            sent(5, Kind::Get, Class::Ok),
            sent(6, Kind::Put, Class::Lost),
        ];
        let upstream = [
            // 1: executed twice.
            record(1, None, 200),
            record(1, None, 200),
            // 2: refused, then sent again and refused: forwarded twice, never executed.
            record(2, None, 401),
            record(2, None, 401),
            // 3: replayed with its key.
            record(3, Some(&key_of(3)), 401),
            record(3, Some(&key_of(3)), 200),
            // 4: the key changed on the replay.
            record(4, Some(&key_of(4)), 401),
            record(4, Some("other"), 200),
            // 5: never reached the upstream though the client got 2xx.
            // 6: lost, but executed.
            record(6, None, 200),
            // Not ours.
            record(99, None, 200),
        ];
        let mut missing_id = record(0, None, 200);
        missing_id.headers.clear();
        let upstream: Vec<Recorded> = upstream.into_iter().chain([missing_id]).collect();
        let f = analyse(&client, &upstream);
        assert_eq!(
            f,
            Findings {
                post_executed_twice: 1,
                post_forwarded_twice: 2,
                keyed_forwarded_twice: 2,
                keyed_executed_twice: 0,
                idempotent_executed_twice: 0,
                key_changed: 1,
                invented: 1,
                lost_but_executed: 1,
                unidentified: 2,
            }
        );
        // A clean run finds nothing.
        let clean = analyse(&client[..1], &upstream[..1]);
        assert_eq!(clean, Findings::default());
    }

    #[test]
    fn unavailable_answers_are_placed_against_the_outages() {
        let mut a = sent(10, Kind::Get, Class::TokenUnavailable { retry_after: true });
        a.took = Duration::from_secs(3); // answered at 13 s: inside 10..15
        let b = sent(18, Kind::Get, Class::TokenUnavailable { retry_after: true }); // within grace
        let c = sent(
            40,
            Kind::Post,
            Class::TokenUnavailable { retry_after: false },
        ); // outside
        let d = sent(41, Kind::Get, Class::Ok);
        let outages = [(Duration::from_secs(10), Duration::from_secs(15))];
        let late = unavailable_outside(&[a, b, c, d], &outages, Duration::from_secs(5));
        assert_eq!(
            late,
            vec![Duration::from_secs(40) + Duration::from_millis(1)]
        );
        let t = tally(&[a, b, c, d]);
        assert_eq!(t[&Kind::Get].unavailable, 2);
        assert_eq!(t[&Kind::Post].unavailable_no_retry_after, 1);
        assert_eq!(t[&Kind::Get].ok, 1);
    }

    #[test]
    fn metrics_and_log_scans() {
        let page = "# TYPE sidecar_token_refresh_total counter\n\
            sidecar_token_refresh_total{provider=\"bench\",trigger=\"proactive\",result=\"ok\"} 7\n\
            sidecar_token_refresh_total{provider=\"bench\",trigger=\"unauthorized\",result=\"error\"} 2\n\
            sidecar_token_refresh_total_other{trigger=\"x\"} 100\n";
        let c = counters(page, "sidecar_token_refresh_total", &["trigger", "result"]);
        assert_eq!(c.len(), 2);
        assert_eq!(c["proactive ok"], 7.0);
        assert_eq!(
            moved(&BTreeMap::new(), &c),
            "proactive ok 7, unauthorized error 2"
        );
        assert_eq!(moved(&c, &c), "none");
        let log = "2025-01-01T00:00:00Z  WARN token: refresh failed after 12 ms\n\
                   2025-01-01T00:00:01Z  WARN token: refresh failed after 3 ms\n\
                   thread 'x' panicked at src/a.rs:1:2\n\
                   2025-01-01T00:00:02Z ERROR proxy: bad tok_0123\n";
        let scan = scan_log(log);
        assert_eq!(
            (scan.panics, scan.errors, scan.warnings, scan.token_like),
            (1, 1, 2, 1)
        );
        assert_eq!(
            scan.top[0],
            ("WARN token: refresh failed after # ms".to_string(), 2)
        );
    }

    #[test]
    fn requests_are_well_formed_and_keyed_only_when_meant_to() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for kind in Kind::ALL {
            let raw = request(addr, kind, 42);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            let httparse::Status::Complete(len) = req.parse(&raw).unwrap() else {
                panic!("{kind:?}: incomplete request");
            };
            let has = |n: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n));
            assert_eq!(has("x-request-id").unwrap().value, b"42");
            assert_eq!(has("idempotency-key").is_some(), kind == Kind::KeyedPost);
            let body = raw.len() - len;
            let declared = has("content-length")
                .map(|h| {
                    std::str::from_utf8(h.value)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap()
                })
                .unwrap_or(0);
            assert_eq!(body, declared, "{kind:?}");
        }
        let picked: Vec<Kind> = (0..10).map(Kind::pick).collect();
        assert_eq!(picked.iter().filter(|k| **k == Kind::Get).count(), 4);
        assert!(Kind::ALL.iter().all(|k| picked.contains(k)));
    }

    /// The traffic driver and the analysis against a real (open) mock upstream: every request is
    /// answered, executed exactly once and carries the key it was sent with.
    #[tokio::test]
    async fn short_traffic_against_the_mock_upstream() {
        let up = MockUpstream::try_start(UpstreamConfig::open())
            .await
            .unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let tasks: Vec<_> = (0..2u64)
            .map(|i| {
                tokio::spawn(drive(
                    up.addr(),
                    i,
                    started,
                    deadline,
                    Duration::from_millis(5),
                ))
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        assert!(!all.is_empty());
        assert!(all.iter().all(|s| s.class == Class::Ok), "{all:?}");
        let records = up.requests();
        assert_eq!(records.len(), all.len());
        assert_eq!(analyse(&all, &records), Findings::default());
        // Sending one non-idempotent POST again is seen as a duplicate execution.
        let post = all
            .iter()
            .find(|s| s.kind == Kind::Post)
            .copied()
            .unwrap_or_else(|| {
                // Unlikely with ~100 requests, but the check must not depend on luck.
                Sent {
                    kind: Kind::Post,
                    ..all[0]
                }
            });
        let mut c = Conn::connect(up.addr()).await.unwrap();
        for _ in 0..2 {
            let r = c
                .request(&request(up.addr(), Kind::Post, post.id))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        let mut client = all.clone();
        client.retain(|s| s.id != post.id);
        client.push(Sent {
            kind: Kind::Post,
            ..post
        });
        let f = analyse(&client, &up.requests());
        assert_eq!(f.post_executed_twice, 1, "{f:?}");
    }
}
