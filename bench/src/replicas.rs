//! Scenario 6: three sidecars sharing one account through a real `redis-server` (`shared:`,
//! SPEC §14): identity-provider calls per token rotation (with and without `shared:`), the
//! combined rate the upstream sees under a shared rate rule, the Redis work per proxied request,
//! and the latency a shared rule adds over a local one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::load::{self, Conn, Histogram, Outcome, Percentiles};
use crate::procs::{self, Proc};
use crate::scenarios::{launch_sidecar, ok_mark, Env, Sidecar, World};
use crate::soak;
use crate::tools;

/// How many sidecars share the Redis.
const REPLICAS: usize = 3;

/// The rule of the latency part over the rate the fleet is offered: high enough that a local
/// rule never rejects.
const HIGH_FACTOR: u32 = 10;

/// Durations and sizes of this scenario per mode.
#[derive(Clone, Debug)]
pub struct ReplicasPlan {
    /// Lifetime of the IdP's tokens while rotations are counted.
    pub ttl: Duration,
    /// `refresh.before_expiry`: a rotation every `ttl - before_expiry`.
    pub before_expiry: Duration,
    /// Rotations counted, with `shared:` and without.
    pub rotations: u64,
    /// The shared rule of the combined-rate part, per second.
    pub rule: u32,
    /// How long each combined-rate run lasts.
    pub rate_run: Duration,
    /// Requests per second offered to each sidecar in the latency part.
    pub latency_rate: f64,
    /// How long each latency run lasts.
    pub latency_run: Duration,
    /// Latency rounds (shared, local; then local, shared; ...).
    pub rounds: usize,
}

impl ReplicasPlan {
    pub fn smoke() -> ReplicasPlan {
        ReplicasPlan {
            ttl: Duration::from_secs(1),
            before_expiry: Duration::from_millis(500),
            rotations: 2,
            rule: 100,
            rate_run: Duration::from_millis(600),
            latency_rate: 100.0,
            latency_run: Duration::from_millis(500),
            rounds: 1,
        }
    }

    pub fn quick() -> ReplicasPlan {
        ReplicasPlan {
            ttl: Duration::from_secs(3),
            before_expiry: Duration::from_millis(1500),
            rotations: 10,
            rule: 300,
            rate_run: Duration::from_secs(10),
            latency_rate: 500.0,
            latency_run: Duration::from_secs(5),
            rounds: 2,
        }
    }

    pub fn full() -> ReplicasPlan {
        ReplicasPlan {
            rotations: 20,
            rate_run: Duration::from_secs(30),
            latency_run: Duration::from_secs(10),
            rounds: 3,
            ..ReplicasPlan::quick()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A real redis-server, asked for PING and INFO through the `redis` crate.

/// A running `redis-server` (registered with [`procs`], stopped on drop).
struct RedisServer {
    _proc: Proc,
    addr: SocketAddr,
}

async fn start_redis(w: &World) -> Result<RedisServer, String> {
    let bin = tools::redis_server()?;
    let addr = procs::free_port()?;
    let mut cmd = Command::new(bin);
    cmd.args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .args(["--port", &addr.port().to_string()]);
    let log = w.scratch.path("redis-server.log");
    let proc = procs::spawn("redis-server", cmd, &log, false)?;
    procs::wait_port(addr, proc.pid, Duration::from_secs(10))
        .map_err(|e| format!("redis-server: {e}"))?;
    match command::<String>(addr, redis::cmd("PING")).await? {
        pong if pong == "PONG" => Ok(RedisServer { _proc: proc, addr }),
        other => Err(format!("redis-server answered PING with {other:?}")),
    }
}

/// Sends one command on a fresh connection and reads its reply, within 5 s.
async fn command<T: redis::FromRedisValue>(addr: SocketAddr, cmd: redis::Cmd) -> Result<T, String> {
    let exchange = async {
        let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        cmd.query_async(&mut con).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "redis: timed out".to_string())?
        .map_err(|e| format!("redis: {e}"))
}

/// What Redis counts: commands processed (those run inside scripts included) and calls per
/// command (`INFO commandstats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RedisCounters {
    commands: u64,
    calls: BTreeMap<String, u64>,
}

/// Reads `total_commands_processed` and the `cmdstat_NAME:calls=N,...` lines of `INFO` output;
/// anything else is ignored, unparsable values count as absent.
fn parse_info(text: &str) -> RedisCounters {
    let mut out = RedisCounters::default();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(v) = line.strip_prefix("total_commands_processed:") {
            out.commands = v.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(calls) = calls {
                out.calls.insert(name.to_string(), calls);
            }
        }
    }
    out
}

impl RedisCounters {
    /// What happened between `before` and `self`, without this runner's own `INFO` calls.
    fn since(&self, before: &RedisCounters) -> RedisCounters {
        let mut calls: BTreeMap<String, u64> = self
            .calls
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(before.calls.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        let info = calls.remove("info").unwrap_or(0);
        RedisCounters {
            commands: self
                .commands
                .saturating_sub(before.commands)
                .saturating_sub(info),
            calls,
        }
    }

    /// "evalsha 120, time 120, ..." by calls, most first.
    fn top(&self) -> String {
        let mut v: Vec<(&String, &u64)> = self.calls.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

async fn redis_counters(addr: SocketAddr) -> Result<RedisCounters, String> {
    let mut info = redis::cmd("INFO");
    info.arg("all");
    let text: String = command(addr, info).await?;
    Ok(parse_info(&text))
}

// ---------------------------------------------------------------------------------------------
// The sidecars

/// The generation of provider `bench` in an admin status answer.
fn generation_in(status: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    v["providers"]
        .as_array()?
        .iter()
        .find(|p| p["provider"] == "bench")?["generation"]
        .as_u64()
}

/// The generation of provider `bench` of one sidecar.
async fn generation(s: &Sidecar) -> Result<u64, String> {
    let text = soak::get_text(s.admin, "/v1/token/status").await?;
    generation_in(&text).ok_or_else(|| format!("no generation in the status: {text}"))
}

/// Waits (bounded by `deadline`) until sidecar `s` holds generation `want` or later.
async fn wait_generation(s: &Sidecar, want: u64, deadline: Instant) -> Result<u64, String> {
    loop {
        let g = generation(s).await?;
        if g >= want {
            return Ok(g);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "generation {g} after the deadline, waiting for {want}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum over the sidecars of `sidecar_shared_ops_total`, by `op`.
async fn shared_ops(fleet: &[Sidecar]) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for s in fleet {
        let page = soak::get_text(s.admin, "/metrics").await?;
        for (op, n) in soak::counters(&page, "sidecar_shared_ops_total", &["op"]) {
            *out.entry(op).or_default() += n;
        }
    }
    Ok(out)
}

fn ops_since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// The rate rules of the fleet: `combined` (the rule under test), and `shared`/`local` (the
/// same high rule held in Redis or by each replica alone), by path.
fn rules_yaml(rule: u32, high: u32) -> String {
    format!(
        r#"rate_limits:
  - {{ name: combined, upstream: api, match: {{ path: "/combined/**" }}, rate: {rule}/1s, burst: 10, mode: reject }}
  - {{ name: shared, upstream: api, match: {{ path: "/shared/**" }}, rate: {high}/1s, mode: reject }}
  - {{ name: local, upstream: api, match: {{ path: "/local/**" }}, rate: {high}/1s, mode: reject, shared: false }}
"#
    )
}

/// One sidecar of the fleet: provider `bench` (sealed in Redis with `key`), upstream `api`,
/// `shared:` on `redis` if given, and `rules`.
#[allow(clippy::too_many_arguments)]
fn replica_yaml(
    w: &World,
    listen: SocketAddr,
    admin: SocketAddr,
    store: &std::path::Path,
    key: &str,
    redis: Option<SocketAddr>,
    prefix: &str,
    before_expiry: Duration,
    rules: &str,
) -> String {
    let shared = match redis {
        Some(r) => format!(
            "shared:\n  redis: {{ url: \"redis://{r}/0\", key_prefix: {prefix} }}\n  on_redis_down: local\n"
        ),
        None => String::new(),
    };
    format!(
        r#"listen: "{listen}"
admin_listen: "{admin}"
shutdown_grace: 1s
{shared}providers:
  bench:
    type: oauth2_client_credentials
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret
    refresh: {{ skew: 0s, min_interval: 0s, jitter: 0%, backoff: [200ms], before_expiry: {before}ms }}
    store: {{ path: "{store}", key: "{key}" }}
upstreams:
  - {{ name: api, url: "http://{upstream}", provider: bench }}
log: {{ level: warn, format: text, access_log: false }}
{rules}"#,
        token_url = w.idp.token_url(),
        store = store.display(),
        before = before_expiry.as_millis(),
        upstream = w.upstream.addr,
    )
}

/// A store key from `token-sidecar keygen`.
fn keygen(env: &Env) -> Result<String, String> {
    let out = Command::new(&env.sidecar_bin)
        .arg("keygen")
        .output()
        .map_err(|e| format!("token-sidecar keygen: {e}"))?;
    if !out.status.success() {
        return Err(format!("token-sidecar keygen failed: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts [`REPLICAS`] sidecars one after the other (each proxying before the next starts).
async fn start_fleet(
    env: &Env,
    w: &World,
    tag: &str,
    redis: Option<SocketAddr>,
    before_expiry: Duration,
    rules: &str,
) -> Result<Vec<Sidecar>, String> {
    let key = keygen(env)?;
    let mut fleet = Vec::with_capacity(REPLICAS);
    for i in 0..REPLICAS {
        let (listen, admin) = (procs::free_port()?, procs::free_port()?);
        let store = w.scratch.path(&format!("replica-{tag}-{i}.tok"));
        let yaml = replica_yaml(
            w,
            listen,
            admin,
            &store,
            &key,
            redis,
            &format!("bench-{tag}"),
            before_expiry,
            rules,
        );
        let name = format!("{tag}-{i}");
        fleet.push(launch_sidecar(env, w, &name, listen, admin, &yaml).await?);
    }
    Ok(fleet)
}

/// One keep-alive connection per sidecar, a request every 20 ms each, until `stop`.
fn trickle(
    fleet: &[Sidecar],
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    fleet
        .iter()
        .map(|s| {
            let addr = s.listen;
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let req = load::get_request(addr, "/rotation", None);
                let mut out = Outcome::default();
                let mut conn: Option<Conn> = None;
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tick.tick() => {}
                    }
                    let limit = |_| Duration::from_secs(10);
                    load::send_one(&mut conn, addr, &req, limit, &mut out).await;
                }
                out
            })
        })
        .collect()
}

/// IdP calls per rotation of one fleet.
struct Rotations {
    rotations: u64,
    calls: u64,
    requests: u64,
    failed: u64,
}

/// Starts a fleet (shared through `redis`, or each on its own), drives a trickle through every
/// sidecar and counts the IdP's calls over `n` rotations of the first sidecar, from one rotation
/// boundary to another.
async fn count_rotations(
    env: &Env,
    w: &World,
    redis: Option<SocketAddr>,
    n: u64,
) -> Result<Rotations, String> {
    let p = &env.plan.replicas;
    w.idp.set_ttl(p.ttl);
    let tag = if redis.is_some() {
        "rot-shared"
    } else {
        "rot-alone"
    };
    let fleet = start_fleet(env, w, tag, redis, p.before_expiry, "").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let drivers = trickle(&fleet, &stop_rx);
    let period = p.ttl.saturating_sub(p.before_expiry);
    let deadline = Instant::now() + period * (n as u32 + 2) * 3 + Duration::from_secs(10);
    let counted = async {
        // From just after one rotation of the first sidecar to just after its n-th next one: an
        // IdP call happens before the generation it brings, and the next one a period later.
        let g = generation(&fleet[0]).await?;
        let g0 = wait_generation(&fleet[0], g + 1, deadline).await?;
        let c0 = w.idp.calls();
        let g1 = wait_generation(&fleet[0], g0 + n, deadline).await?;
        let c1 = w.idp.calls();
        Ok::<_, String>((g1 - g0, (c1 - c0) as u64))
    }
    .await;
    let _ = stop_tx.send(true);
    let mut traffic = Outcome::default();
    for d in drivers {
        if let Ok(o) = d.await {
            traffic.merge(&o);
        }
    }
    drop(fleet);
    let (rotations, calls) = counted?;
    Ok(Rotations {
        rotations,
        calls,
        requests: traffic.requests() + traffic.errors,
        failed: traffic.requests() + traffic.errors - traffic.ok,
    })
}

/// Offers `per_sidecar` requests/s of `path` to every sidecar (16 connections each, paced) for
/// `run`; returns the merged outcome and the rate of 200s the upstream saw over the middle of the
/// run (its edges left out).
async fn offer(
    w: &World,
    fleet: &[Sidecar],
    path: &str,
    per_sidecar: f64,
    run: Duration,
) -> Result<(Outcome, f64), String> {
    let loads: Vec<_> = fleet
        .iter()
        .map(|s| {
            let req = Arc::new(load::get_request(s.listen, path, None));
            tokio::spawn(load::paced(s.listen, req, 16, per_sidecar, run))
        })
        .collect();
    let skip = (run / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let ok = &w.upstream.counters.ok;
    let ok_now = || (ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(skip).await;
    let (c0, t0) = ok_now();
    tokio::time::sleep(run.saturating_sub(skip * 2)).await;
    let (c1, t1) = ok_now();
    let mut total = Outcome::default();
    for l in loads {
        total.merge(&l.await.map_err(|e| format!("load task: {e}"))?);
    }
    total.elapsed = run;
    let delivered = (c1 - c0) as f64 / (t1 - t0).as_secs_f64().max(1e-9);
    Ok((total, delivered))
}

/// Redis' work and the sidecars' Redis calls while `f` runs.
struct Work {
    redis: RedisCounters,
    ops: BTreeMap<String, f64>,
}

async fn measure_work<T, F>(redis: SocketAddr, fleet: &[Sidecar], f: F) -> Result<(T, Work), String>
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let (r0, o0) = (redis_counters(redis).await?, shared_ops(fleet).await?);
    let out = f.await?;
    let (r1, o1) = (redis_counters(redis).await?, shared_ops(fleet).await?);
    Ok((
        out,
        Work {
            redis: r1.since(&r0),
            ops: ops_since(&o0, &o1),
        },
    ))
}

fn per(n: f64, d: u64) -> f64 {
    n / d.max(1) as f64
}

fn ops_text(ops: &BTreeMap<String, f64>) -> String {
    if ops.is_empty() {
        return "none".into();
    }
    ops.iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(env: &Env, w: &World) -> Result<String, String> {
    let p = env.plan.replicas.clone();
    let redis = start_redis(w).await?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 6. Replicas sharing one Redis\n\n{REPLICAS} release sidecars with the same `shared:` \
         (one `redis-server` on loopback, no persistence; `on_redis_down: local`; the provider's \
         token sealed with a `store.key`), one mock IdP, one upstream; one request connection per \
         sidecar unless said otherwise.\n"
    );

    // 1. IdP calls per rotation, with and without `shared:`.
    eprintln!("bench:   IdP calls per rotation");
    let shared = count_rotations(env, w, Some(redis.addr), p.rotations).await?;
    let alone = count_rotations(env, w, None, p.rotations).await?;
    w.idp.set_ttl(Duration::from_secs(3600));
    let _ = writeln!(
        s,
        "**IdP calls per rotation.** Tokens live {} ms, `refresh.before_expiry: {}ms` (a rotation \
         every {} ms); a request every 20 ms through each sidecar; calls counted at the IdP over \
         {} rotations of the first sidecar, from one rotation to another.\n",
        p.ttl.as_millis(),
        p.before_expiry.as_millis(),
        p.ttl.saturating_sub(p.before_expiry).as_millis(),
        p.rotations
    );
    s.push_str(
        "| fleet | rotations | IdP calls | calls per rotation | requests | failed requests |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (name, r, good) in [
        ("`shared:` (= 1)", &shared, shared.calls == shared.rotations),
        ("each on its own (≈ 3)", &alone, true),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {:.2} {} | {} | {} |",
            r.rotations,
            r.calls,
            per(r.calls as f64, r.rotations),
            if good { "" } else { ok_mark(false) },
            r.requests,
            r.failed
        );
    }
    s.push('\n');
    if shared.calls != shared.rotations {
        let e = format!(
            "the shared fleet made {} IdP calls for {} rotations",
            shared.calls, shared.rotations
        );
        // The one functional check of --smoke: sharing the token works at all.
        if env.plan.mode == "smoke" {
            return Err(e);
        }
        eprintln!("bench:   {e}");
    }

    // The fleet for the rate and latency parts.
    let high = (p.latency_rate * REPLICAS as f64 * f64::from(HIGH_FACTOR)) as u32;
    let fleet = start_fleet(
        env,
        w,
        "rate",
        Some(redis.addr),
        Duration::from_secs(60),
        &rules_yaml(p.rule, high),
    )
    .await?;

    // 2. Combined rate versus the rule.
    eprintln!("bench:   combined rate");
    let rule = f64::from(p.rule);
    let _ = writeln!(
        s,
        "**Combined rate versus the rule.** Shared rule `rate: {}/1s, burst: 10, mode: reject`; \
         each sidecar offered 3× the rule, then each a quarter of it (¾ of the rule in all), then \
         that ¾ to one sidecar alone (16 connections per sidecar, paced), {} s each; the rate of \
         200s the upstream saw over the run minus its edges. Redis work: commands Redis processed \
         (`INFO`: `total_commands_processed`, those run inside scripts included) and the \
         sidecars' own count of Redis calls (`sidecar_shared_ops_total`, summed), per request \
         sent.\n",
        p.rule,
        p.rate_run.as_secs_f64()
    );
    s.push_str("| offered to | offered in all | delivered at upstream | vs rule | vs offered | answered 429 | other errors | Redis commands / request (200 or 429) | sidecar Redis calls / request |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut details = Vec::new();
    // Each sidecar 3× the rule; then each a quarter of it (¾ of the rule in all, which should
    // all pass); then that same ¾ to one sidecar alone, for contrast.
    for (factor, n) in [(3.0, REPLICAS), (0.25, REPLICAS), (0.75, 1)] {
        let offered = rule * factor;
        let ((o, delivered), work) = measure_work(
            redis.addr,
            &fleet,
            offer(w, &fleet[..n], "/combined/r", offered, p.rate_run),
        )
        .await?;
        if o.requests() == 0 {
            return Err(format!("no answer from the fleet: {:?}", o.first_error));
        }
        let sent = o.requests();
        let calls: f64 = work.ops.values().sum();
        let all = offered * n as f64;
        let to = if n == REPLICAS {
            format!("each of the {n}: {offered:.0}/s ({factor}× the rule)")
        } else {
            format!("one sidecar: {offered:.0}/s ({factor}× the rule)")
        };
        let _ = writeln!(
            s,
            "| {to} | {all:.0}/s | {delivered:.1}/s | {:+.2} % | {:.1} % | {} | {} | {:.3} | {:.3} |",
            (delivered / rule - 1.0) * 100.0,
            delivered / all.min(rule) * 100.0,
            o.other_status,
            o.errors + o.status_401,
            per(work.redis.commands as f64, sent),
            per(calls, sent),
        );
        details.push(format!(
            "{to}: Redis {}; sidecars {}",
            work.redis.top(),
            ops_text(&work.ops)
        ));
    }
    let _ = writeln!(s, "\n\"vs offered\" is against the smaller of the offer and the rule. Calls by command: {}.\n", details.join("; "));

    // 3 and 4. Redis work per request and the latency of a shared rule versus a local one.
    eprintln!("bench:   latency and Redis work, shared versus local rule");
    let mut hist: [Histogram; 2] = [Histogram::default(), Histogram::default()];
    let mut outcomes: [Outcome; 2] = [Outcome::default(), Outcome::default()];
    let mut works: [Vec<Work>; 2] = [Vec::new(), Vec::new()];
    let routes = ["/shared/r", "/local/r"];
    for round in 0..p.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let ((o, _), work) = measure_work(
                redis.addr,
                &fleet,
                offer(w, &fleet, routes[i], p.latency_rate, p.latency_run),
            )
            .await?;
            hist[i].merge(&o.ok_latency);
            outcomes[i].merge(&o);
            works[i].push(work);
        }
    }
    drop(fleet);
    let _ = writeln!(
        s,
        "**Redis work and added latency.** The same route limited by a shared rule or by a local \
         one (`shared: false`), both `rate: {high}/1s, mode: reject` (the default burst, \
         {high}), each sidecar offered {:.0} requests/s (16 connections, paced) for {} s, {} \
         round(s) alternating the order: the rule is {}× what the three offer together. Latency \
         in µs of the answers that went upstream (200; a 429 is answered at once), all three \
         sidecars together; Redis work per proxied (200) request, the health pings (every \
         500 ms per sidecar) included.\n",
        p.latency_rate,
        p.latency_run.as_secs_f64(),
        p.rounds,
        HIGH_FACTOR
    );
    s.push_str("| rule | requests | 200 | 429 | other errors | p50 | p90 | p99 | p99.9 | Redis commands / proxied request | sidecar Redis calls / proxied request | sidecar Redis calls by op |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut pct = [Percentiles::default(); 2];
    for i in 0..2 {
        pct[i] = Percentiles::of(&hist[i]);
        let o = &outcomes[i];
        let commands: u64 = works[i].iter().map(|w| w.redis.commands).sum();
        let mut ops: BTreeMap<String, f64> = BTreeMap::new();
        for w in &works[i] {
            for (k, v) in &w.ops {
                *ops.entry(k.clone()).or_default() += v;
            }
        }
        let calls: f64 = ops.values().sum();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {} |",
            ["shared", "local"][i],
            o.requests(),
            o.ok,
            o.other_status,
            o.errors + o.status_401,
            pct[i].p50,
            pct[i].p90,
            pct[i].p99,
            pct[i].p999,
            per(commands as f64, o.ok),
            per(calls, o.ok),
            ops_text(&ops),
        );
    }
    let _ = writeln!(
        s,
        "\nAdded by the shared rule: p50 {:+.0} µs, p99 {:+.0} µs.",
        pct[0].p50 - pct[1].p50,
        pct[0].p99 - pct[1].p99
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_counters_and_their_difference() {
        let before = parse_info(
            "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:10\r\n\
             # Commandstats\r\ncmdstat_evalsha:calls=4,usec=81,usec_per_call=20.25,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=2,usec=52,usec_per_call=26.00\r\ncmdstat_bad:calls=x\r\nnoise\r\n",
        );
        assert_eq!(before.commands, 10);
        assert_eq!(before.calls.get("evalsha"), Some(&4));
        assert_eq!(before.calls.get("bad"), None);
        let after = parse_info(
            "total_commands_processed:31\ncmdstat_evalsha:calls=9,usec=1\ncmdstat_time:calls=5\n\
             cmdstat_info:calls=3\ncmdstat_ping:calls=1\n",
        );
        let d = after.since(&before);
        // 21 processed, one of them this runner's own INFO.
        assert_eq!(d.commands, 20);
        assert_eq!(d.top(), "evalsha 5, time 5, ping 1");
        assert_eq!(parse_info(""), RedisCounters::default());
        assert_eq!(
            RedisCounters::default().since(&after),
            RedisCounters::default()
        );
    }

    #[test]
    fn generation_from_the_status() {
        let text = r#"{"providers":[{"provider":"bench","state":"valid","generation": 17,"ttl_seconds":2}]}"#;
        assert_eq!(generation_in(text), Some(17));
        let other = r#"{"providers":[{"provider":"other","generation":3}]}"#;
        assert_eq!(generation_in(other), None);
        assert_eq!(
            generation_in(r#"{"providers":[{"provider":"bench","generation":null}]}"#),
            None
        );
        assert_eq!(
            generation_in(r#"{"providers":[{"provider":"bench","generation":"#),
            None
        );
    }

    #[test]
    fn plans_shrink_with_the_mode() {
        let (s, q, f) = (
            ReplicasPlan::smoke(),
            ReplicasPlan::quick(),
            ReplicasPlan::full(),
        );
        assert!(s.rotations >= 2 && s.rotations < q.rotations && q.rotations < f.rotations);
        for p in [&s, &q, &f] {
            assert!(p.before_expiry < p.ttl);
        }
    }
}
