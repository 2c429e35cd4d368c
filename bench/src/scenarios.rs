//! The six benchmark scenarios and their Markdown tables.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidecar_mocks::{IdpConfig, MockIdp, TokenRegistry};

use crate::load::{self, Histogram, Percentiles};
use crate::paired::{self, median, Pair, Round};
use crate::procs::{self, Proc, Scratch};
use crate::replicas;
use crate::soak;
use crate::tools;
use crate::upstream::{self, Upstream};
use crate::Plan;

/// What the scenarios need.
pub struct Env {
    pub plan: Plan,
    pub sidecar_bin: PathBuf,
    pub bare_bin: PathBuf,
    /// Only looked up (and installed) when scenario 1 or `--profile` runs.
    pub nginx_bin: Option<PathBuf>,
    /// Likewise.
    pub haproxy_bin: Option<PathBuf>,
    pub wrk: Option<PathBuf>,
    pub fd_limit: u64,
}

/// A scenario of the runner: the five benchmark scenarios, and the soak, which runs only when asked for
/// by name (`--only soak`): it takes minutes and is never part of `--smoke`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Throughput,
    Storm,
    Replay,
    RateLimit,
    Memory,
    Replicas,
    Soak,
}

impl Scenario {
    /// Every scenario, in running order.
    pub const ALL: [Scenario; 7] = [
        Scenario::Throughput,
        Scenario::Storm,
        Scenario::Replay,
        Scenario::RateLimit,
        Scenario::Memory,
        Scenario::Replicas,
        Scenario::Soak,
    ];

    /// What runs without `--only`.
    pub const DEFAULT: [Scenario; 6] = [
        Scenario::Throughput,
        Scenario::Storm,
        Scenario::Replay,
        Scenario::RateLimit,
        Scenario::Memory,
        Scenario::Replicas,
    ];

    /// The number it has in bench/README.md and the tables (the soak has none).
    pub fn number(self) -> Option<u8> {
        match self {
            Scenario::Throughput => Some(1),
            Scenario::Storm => Some(2),
            Scenario::Replay => Some(3),
            Scenario::RateLimit => Some(4),
            Scenario::Memory => Some(5),
            Scenario::Replicas => Some(6),
            Scenario::Soak => None,
        }
    }

    /// The name `--only` accepts besides the number.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Storm => "storm",
            Scenario::Replay => "replay",
            Scenario::RateLimit => "rate",
            Scenario::Memory => "memory",
            Scenario::Replicas => "replicas",
            Scenario::Soak => "soak",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput and latency",
            Scenario::Storm => "refresh storm",
            Scenario::Replay => "replay cost",
            Scenario::RateLimit => "rate-limit accuracy",
            Scenario::Memory => "memory",
            Scenario::Replicas => "replicas sharing one Redis",
            Scenario::Soak => "soak",
        }
    }

    /// "scenario 2" or "the soak", for progress lines.
    fn label(self) -> String {
        match self.number() {
            Some(n) => format!("scenario {n}"),
            None => format!("the {}", self.name()),
        }
    }

    /// Parses one `--only` item: a number (1-6) or a name (`soak`, `storm`, ...).
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let text = text.trim();
        Scenario::ALL
            .into_iter()
            .find(|s| {
                s.name().eq_ignore_ascii_case(text)
                    || s.number().is_some_and(|n| n.to_string() == text)
            })
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown scenario {text:?}: use 1-6 or a name ({})",
                    names.join(", ")
                )
            })
    }
}

/// The mocks every scenario shares: the IdP on its own runtime thread, the fast upstream on
/// another.
pub(crate) struct World {
    pub(crate) idp: MockIdp,
    pub(crate) registry: TokenRegistry,
    pub(crate) upstream: Upstream,
    pub(crate) scratch: Scratch,
    idp_rt: Option<tokio::runtime::Runtime>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.idp.shutdown();
        // Dropped from async code: a blocking runtime drop would panic there.
        if let Some(rt) = self.idp_rt.take() {
            rt.shutdown_background();
        }
    }
}

impl World {
    pub(crate) fn start() -> Result<World, String> {
        let idp_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-idp")
            .enable_all()
            .build()
            .map_err(|e| format!("IdP runtime: {e}"))?;
        let registry = TokenRegistry::new();
        let cfg = IdpConfig {
            ttl: IDP_TTL,
            registry: registry.clone(),
            ..IdpConfig::default()
        };
        let idp = std::thread::scope(|s| {
            s.spawn(|| idp_rt.block_on(MockIdp::try_start(cfg)))
                .join()
                .map_err(|_| "IdP start panicked".to_string())
        })?
        .map_err(|e| format!("mock IdP: {e}"))?;
        let upstream = upstream::start(registry.clone())?;
        Ok(World {
            idp,
            registry,
            upstream,
            scratch: Scratch::new()?,
            idp_rt: Some(idp_rt),
        })
    }

    /// A bearer token the upstream accepts (until the next revocation).
    pub(crate) fn static_authorization(&self) -> String {
        format!("Bearer {}", self.registry.issue(Duration::from_secs(3600)))
    }

    /// Runs `fut` on the IdP's runtime thread (so that a mock started by it serves from there,
    /// not from the load generator's thread) and waits for it.
    pub(crate) async fn on_idp_thread<F>(&self, fut: F) -> Result<F::Output, String>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.idp_rt.as_ref().ok_or("the IdP runtime is gone")?;
        rt.spawn(fut)
            .await
            .map_err(|e| format!("task on the IdP thread: {e}"))
    }

    /// Undoes what a scenario may have changed at the IdP.
    fn reset(&self) {
        self.idp.set_latency(Duration::ZERO);
        self.idp.set_failure(None);
        self.idp.set_ttl(IDP_TTL);
        self.registry.set_reject_all(false);
    }
}

/// Lifetime of the mock IdP's tokens, except in the soak.
const IDP_TTL: Duration = Duration::from_secs(3600);

/// A running sidecar.
pub(crate) struct Sidecar {
    pub(crate) proc: Proc,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    /// Its stdout and stderr.
    pub(crate) log: PathBuf,
}

/// The sidecar's configuration: one `oauth2_client_credentials` provider (`bench`, with the
/// `refresh` settings given, or the defaults) on the mock IdP and one upstream `api` at
/// `upstream`; `replay` and `extra` are added as they are.
pub(crate) fn sidecar_yaml(
    w: &World,
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    refresh: &str,
    replay: &str,
    extra: &str,
) -> String {
    sidecar_yaml_url(
        w,
        listen,
        admin,
        &format!("\"http://{upstream}\""),
        refresh,
        replay,
        extra,
    )
}

/// [`sidecar_yaml`] with the upstream's `url:` value given as YAML text, which may go on with
/// more keys of the upstream (`tls:`).
fn sidecar_yaml_url(
    w: &World,
    listen: SocketAddr,
    admin: SocketAddr,
    url: &str,
    refresh: &str,
    replay: &str,
    extra: &str,
) -> String {
    let refresh = if refresh.is_empty() {
        String::new()
    } else {
        format!("\n    refresh: {refresh}")
    };
    format!(
        r#"listen: "{listen}"
admin_listen: "{admin}"
shutdown_grace: 1s
providers:
  bench:
    type: oauth2_client_credentials
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret{refresh}
upstreams:
  - name: api
    url: {url}
    provider: bench
replay: {replay}
log: {{ level: warn, format: text, access_log: false }}
{extra}"#,
        token_url = w.idp.token_url(),
    )
}

async fn start_sidecar(env: &Env, w: &World, tag: &str, extra: &str) -> Result<Sidecar, String> {
    let url = format!("\"http://{}\"", w.upstream.addr);
    start_sidecar_url(env, w, tag, &url, extra).await
}

/// [`start_sidecar`] in front of the upstream `url` (YAML text, see [`sidecar_yaml_url`]).
async fn start_sidecar_url(
    env: &Env,
    w: &World,
    tag: &str,
    url: &str,
    extra: &str,
) -> Result<Sidecar, String> {
    start_sidecar_as(&env.sidecar_bin, w, tag, url, extra, false).await
}

/// [`start_sidecar_url`] with the binary `bin`; when `graceful`, it is stopped with SIGTERM
/// rather than killed (`--train`: an instrumented build writes its profile on exit).
pub(crate) async fn start_sidecar_as(
    bin: &Path,
    w: &World,
    tag: &str,
    url: &str,
    extra: &str,
    graceful: bool,
) -> Result<Sidecar, String> {
    let (listen, admin) = (procs::free_port()?, procs::free_port()?);
    let yaml = sidecar_yaml_url(
        w,
        listen,
        admin,
        url,
        "",
        "{ debug_header: true, max_waiting: 20000 }",
        extra,
    );
    launch(bin, w, tag, (listen, admin), &yaml, graceful).await
}

/// Starts the sidecar with `yaml` (which names `listen` and `admin`) and waits until it proxies
/// `GET /bench` with 200.
pub(crate) async fn launch_sidecar(
    env: &Env,
    w: &World,
    tag: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    yaml: &str,
) -> Result<Sidecar, String> {
    launch(&env.sidecar_bin, w, tag, (listen, admin), yaml, false).await
}

async fn launch(
    bin: &Path,
    w: &World,
    tag: &str,
    (listen, admin): (SocketAddr, SocketAddr),
    yaml: &str,
    graceful: bool,
) -> Result<Sidecar, String> {
    let config = w.scratch.path(&format!("sidecar-{tag}.yaml"));
    std::fs::write(&config, yaml).map_err(|e| format!("sidecar config: {e}"))?;
    let log = w.scratch.path(&format!("sidecar-{tag}.log"));
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&config);
    let proc = procs::spawn(&format!("sidecar-{tag}"), cmd, &log, graceful)?;
    let tail = || std::fs::read_to_string(&log).unwrap_or_default();
    procs::wait_port(listen, proc.pid, Duration::from_secs(15))
        .map_err(|e| format!("sidecar: {e}\n{}", tail()))?;
    ready(listen, None)
        .await
        .map_err(|e| format!("sidecar: {e}\n{}", tail()))?;
    Ok(Sidecar {
        proc,
        listen,
        admin,
        log,
    })
}

/// Waits (bounded, 10 s) until `addr` answers `GET /bench` with 200.
async fn ready(addr: SocketAddr, authorization: Option<&str>) -> Result<(), String> {
    let req = load::bench_request(addr, authorization);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match load::Conn::connect(addr).await {
            Ok(mut c) => {
                match tokio::time::timeout(Duration::from_secs(5), c.request(&req)).await {
                    Ok(Ok(r)) if r.status == 200 => return Ok(()),
                    Ok(Ok(r)) => last = format!("answered {}", r.status),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "timed out".into(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} is not answering 200: {last}"))
}

/// What a run produced: the report of scenarios 1-6 (empty if none ran) and the soak's section
/// (if it ran), which goes to its own file.
#[derive(Default)]
pub struct Report {
    pub main: String,
    pub soak: Option<String>,
}

/// Runs every selected scenario; returns the report and the scenarios that could not run.
pub async fn run_all(env: &Env, selected: &[Scenario]) -> (Report, Vec<String>) {
    let mut report = Report::default();
    let mut failures = Vec::new();
    let world = match World::start() {
        Ok(w) => w,
        Err(e) => return (report, vec![format!("setup: {e}")]),
    };
    if selected.iter().any(|s| s.number().is_some()) {
        let _ = writeln!(
            report.main,
            "Upstream answer: {} bytes of JSON.\n",
            upstream::OK_BODY.len()
        );
    }
    type Fut<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + 'a>>;
    for scenario in Scenario::ALL {
        if !selected.contains(&scenario) {
            continue;
        }
        let fut: Fut<'_> = match scenario {
            Scenario::Throughput => Box::pin(throughput(env, &world)),
            Scenario::Storm => Box::pin(storm(env, &world)),
            Scenario::Replay => Box::pin(replay(env, &world)),
            Scenario::RateLimit => Box::pin(rate_limit(env, &world)),
            Scenario::Memory => Box::pin(memory(env, &world)),
            Scenario::Replicas => Box::pin(replicas::run(env, &world)),
            Scenario::Soak => Box::pin(soak::run(env, &world)),
        };
        let (label, title) = (scenario.label(), scenario.title());
        eprintln!("bench: {label}: {title}");
        let t = Instant::now();
        let section = match fut.await {
            Ok(section) => {
                eprintln!("bench: {label} done in {:.1} s", t.elapsed().as_secs_f64());
                section
            }
            Err(e) => {
                eprintln!("bench: {label} ({title}) failed: {e}");
                failures.push(format!("{label} ({title}): {e}"));
                match scenario.number() {
                    Some(n) => format!("## {n}. {title}\n\nDid not run: {e}\n"),
                    None => format!("## Soak\n\nDid not run: {e}\n"),
                }
            }
        };
        if scenario == Scenario::Soak {
            report.soak = Some(section);
        } else {
            report.main.push_str(&section);
            report.main.push('\n');
        }
        // Each scenario leaves the token revoked, the IdP slow or down; reset.
        world.reset();
        procs::stop_all();
    }
    (report, failures)
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput and latency

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Nginx,
    Haproxy,
    Bare,
    Sidecar,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Haproxy => "HAProxy",
            Target::Bare => "bare Pingora",
            Target::Sidecar => "sidecar",
        }
    }
}

/// One line-up of the throughput scenario: worker threads of every proxy (nginx workers,
/// HAProxy `nbthread`, Pingora `threads`) and whether the upstream speaks TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Variant {
    threads: usize,
    tls: bool,
}

impl Variant {
    const PLAIN: Variant = Variant {
        threads: 1,
        tls: false,
    };
    const TWO_THREADS: Variant = Variant {
        threads: 2,
        tls: false,
    };
    const TLS: Variant = Variant {
        threads: 1,
        tls: true,
    };

    fn tag(self) -> String {
        format!("{}t{}", self.threads, if self.tls { "-tls" } else { "" })
    }
}

/// One measurement of one target.
#[derive(Clone, Copy, Default)]
struct Sample {
    requests: u64,
    seconds: f64,
    errors: u64,
    latency: Percentiles,
    /// CPU time the proxy process used during the run (0 for direct).
    cpu_ns: u64,
}

struct Agg {
    rps: f64,
    errors: u64,
    lat: Percentiles,
    /// Proxy CPU time per request, µs (0 for direct).
    cpu_us: f64,
}

fn aggregate(samples: &[Sample]) -> Agg {
    let requests: u64 = samples.iter().map(|s| s.requests).sum();
    let seconds: f64 = samples.iter().map(|s| s.seconds).sum();
    let pick = |f: fn(&Percentiles) -> f64| median(samples.iter().map(|s| f(&s.latency)).collect());
    let cpu: u64 = samples.iter().map(|s| s.cpu_ns).sum();
    Agg {
        cpu_us: cpu as f64 / 1000.0 / (requests.max(1) as f64),
        rps: requests as f64 / seconds.max(1e-9),
        errors: samples.iter().map(|s| s.errors).sum(),
        lat: Percentiles {
            p50: pick(|p| p.p50),
            p90: pick(|p| p.p90),
            p99: pick(|p| p.p99),
            p999: pick(|p| p.p999),
        },
    }
}

async fn measure(
    env: &Env,
    w: &World,
    addr: SocketAddr,
    authorization: Option<&str>,
    conns: usize,
    duration: Duration,
) -> Result<Sample, String> {
    match &env.wrk {
        Some(wrk) => {
            let r = tools::run_wrk(wrk, &w.scratch, addr, authorization, conns, duration).await?;
            Ok(Sample {
                requests: r.requests,
                seconds: r.seconds,
                errors: r.non_2xx + r.socket_errors,
                latency: r.latency,
                cpu_ns: 0,
            })
        }
        None => {
            let req = Arc::new(load::bench_request(addr, authorization));
            let o = load::closed_loop(addr, req, conns, duration).await;
            Ok(Sample {
                requests: o.requests(),
                seconds: o.elapsed.as_secs_f64(),
                errors: o.errors + o.status_401 + o.other_status,
                latency: Percentiles::of(&o.latency),
                cpu_ns: 0,
            })
        }
    }
}

/// `kib` as "12.3 MiB".
pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub(crate) fn ok_mark(ok: bool) -> &'static str {
    if ok {
        "✅"
    } else {
        "❌"
    }
}

/// The proxies in front of the upstream, checked and warmed: nginx, HAProxy, bare Pingora (not
/// over TLS: it has no CA setting) and the sidecar, with `direct` first over plain HTTP.
struct Lineup {
    variant: Variant,
    procs: Vec<(Target, Proc)>,
    sidecar: Sidecar,
    targets: Vec<(Target, SocketAddr, Option<String>)>,
    /// The TLS upstream of a TLS line-up, stopped with it.
    _tls_upstream: Option<Upstream>,
}

impl Lineup {
    /// The process serving `t` (none for direct).
    fn pid(&self, t: Target) -> Option<u32> {
        if t == Target::Sidecar {
            return Some(self.sidecar.proc.pid);
        }
        self.procs
            .iter()
            .find(|(tt, _)| *tt == t)
            .map(|(_, p)| p.pid)
    }

    fn addr(&self, t: Target) -> Option<SocketAddr> {
        self.targets
            .iter()
            .find(|(tt, _, _)| *tt == t)
            .map(|(_, a, _)| *a)
    }

    /// The targets in the order of `round`: A B C D, then D C B A, so that drift cancels out.
    fn order(&self, round: usize) -> Vec<&(Target, SocketAddr, Option<String>)> {
        if round % 2 == 1 {
            self.targets.iter().rev().collect()
        } else {
            self.targets.iter().collect()
        }
    }
}

async fn lineup(env: &Env, w: &World, variant: Variant) -> Result<Lineup, String> {
    let auth = w.static_authorization();
    let tag = variant.tag();
    let (upstream, ca_file, tls_upstream) = if variant.tls {
        let (up, ca) = upstream::start_tls(w.registry.clone())?;
        let path = w.scratch.path("upstream-ca.pem");
        std::fs::write(&path, ca).map_err(|e| format!("upstream CA: {e}"))?;
        (up.addr, Some(path), Some(up))
    } else {
        (w.upstream.addr, None, None)
    };
    let peer = tools::PeerUpstream {
        tag: tag.clone(),
        addr: upstream,
        ca_file: ca_file.clone(),
        workers: variant.threads,
    };
    let mut procs_held = Vec::new();
    let mut targets = Vec::new();
    if !variant.tls && variant.threads == 1 {
        targets.push((Target::Direct, upstream, Some(auth.clone())));
    }
    let nginx_addr = procs::free_port()?;
    let nginx_bin = env.nginx_bin.as_ref().ok_or("nginx was not looked up")?;
    let nginx = tools::start_nginx(nginx_bin, &w.scratch, nginx_addr, &peer, &auth, 1024)?;
    procs_held.push((Target::Nginx, nginx));
    targets.push((Target::Nginx, nginx_addr, None));
    let haproxy_addr = procs::free_port()?;
    let haproxy_bin = env
        .haproxy_bin
        .as_ref()
        .ok_or("haproxy was not looked up")?;
    let haproxy = tools::start_haproxy(haproxy_bin, &w.scratch, haproxy_addr, &peer, &auth, 4096)?;
    procs_held.push((Target::Haproxy, haproxy));
    targets.push((Target::Haproxy, haproxy_addr, None));
    if !variant.tls {
        let bare_addr = procs::free_port()?;
        let mut cmd = Command::new(&env.bare_bin);
        cmd.arg(bare_addr.to_string())
            .arg(upstream.to_string())
            .arg(&auth)
            .env("BARE_PINGORA_THREADS", variant.threads.to_string());
        let bare = procs::spawn(
            "bare-pingora",
            cmd,
            &w.scratch.path(&format!("bare-{tag}.log")),
            false,
        )?;
        procs::wait_port(bare_addr, bare.pid, Duration::from_secs(10))?;
        procs_held.push((Target::Bare, bare));
        targets.push((Target::Bare, bare_addr, None));
    }
    let url = match &ca_file {
        Some(ca) => format!(
            "\"https://{upstream}\"\n    tls: {{ ca_file: \"{}\", server_name: {} }}",
            ca.display(),
            upstream::TLS_NAME
        ),
        None => format!("\"http://{upstream}\""),
    };
    let extra = format!("threads: {}\n", variant.threads);
    let sidecar = start_sidecar_url(env, w, &format!("throughput-{tag}"), &url, &extra).await?;
    targets.push((Target::Sidecar, sidecar.listen, None));
    for (t, addr, a) in &targets {
        ready(*addr, a.as_deref())
            .await
            .map_err(|e| format!("{}: {e}", t.name()))?;
    }
    // Warm-up: connection pools, page cache, CPU frequency.
    for (_, addr, a) in &targets {
        let req = Arc::new(load::bench_request(*addr, a.as_deref()));
        let _ = load::closed_loop(*addr, req, 16, env.plan.warm).await;
    }
    Ok(Lineup {
        variant,
        procs: procs_held,
        sidecar,
        targets,
        _tls_upstream: tls_upstream,
    })
}

/// The closed-loop runs of one line-up: every connection count, rounds alternating.
async fn closed_loops(
    env: &Env,
    w: &World,
    l: &Lineup,
    conn_counts: &[usize],
) -> Result<Vec<(usize, Target, Sample)>, String> {
    let mut samples = Vec::new();
    for &conns in conn_counts {
        for round in 0..env.plan.rounds {
            for (t, addr, a) in l.order(round) {
                let pid = l.pid(*t);
                let cpu0 = pid.map(procs::cpu_ns).unwrap_or(0);
                let mut s = measure(env, w, *addr, a.as_deref(), conns, env.plan.run).await?;
                s.cpu_ns = pid.map(procs::cpu_ns).unwrap_or(0).saturating_sub(cpu0);
                eprintln!(
                    "bench:   {} {conns:>3} conns  {:<13} {:>9.0} req/s  p50 {:>7.1} µs  p99 {:>8.1} µs  cpu {:>5.1} µs/req  errors {}",
                    l.variant.tag(),
                    t.name(),
                    s.requests as f64 / s.seconds.max(1e-9),
                    s.latency.p50,
                    s.latency.p99,
                    s.cpu_ns as f64 / 1000.0 / s.requests.max(1) as f64,
                    s.errors
                );
                if s.requests == 0 {
                    return Err(format!("{} served no request", t.name()));
                }
                samples.push((conns, *t, s));
            }
        }
    }
    Ok(samples)
}

/// The sidecar against bare Pingora by CPU per request in paired rounds (bench/src/paired.rs):
/// per connection count, `plan.pairs` pairs of `plan.pair_run` each, the two proxies back to
/// back in alternating order. This is the measurement the ≥ 0.95 target is judged on.
async fn paired_cpu(
    env: &Env,
    w: &World,
    l: &Lineup,
    conn_counts: &[usize],
) -> Result<String, String> {
    let plan = &env.plan;
    let (Some(sidecar), Some(bare)) = (l.addr(Target::Sidecar), l.addr(Target::Bare)) else {
        return Ok(String::new());
    };
    let auth = l
        .targets
        .iter()
        .find(|(t, _, _)| *t == Target::Bare)
        .and_then(|(_, _, a)| a.clone());
    let mut s = String::new();
    let interval = paired::median_interval_note(plan.pairs);
    let _ = writeln!(
        s,
        "\nSidecar against bare Pingora by CPU per request, in {} pairs of {} s rounds per \
         connection count (the two back to back, in alternating order; bench/src/paired.rs): \
         the ratio is bare Pingora's CPU/req over the sidecar's in each pair, the median of the \
         pairs and the middle half of them; pooled: all the pairs' CPU time over their \
         requests.{interval}\n",
        plan.pairs,
        plan.pair_run.as_secs()
    );
    s.push_str(
        "| conns | sidecar CPU µs/req (all pairs) | bare Pingora | sidecar/bare by CPU, median of pairs (≥ 0.95) | middle half of pairs | all pairs pooled |\n",
    );
    s.push_str("|---:|---:|---:|---:|---:|---:|\n");
    for &conns in conn_counts {
        let mut pairs = Vec::new();
        for round in 0..plan.pairs {
            let mut order = [
                (Target::Sidecar, sidecar, None),
                (Target::Bare, bare, auth.as_deref()),
            ];
            if round % 2 == 1 {
                order.reverse();
            }
            let mut pair = Pair::default();
            for (t, addr, a) in order {
                let pid = l.pid(t).ok_or("no process to measure")?;
                let cpu0 = procs::cpu_ns(pid);
                let m = measure(env, w, addr, a, conns, plan.pair_run).await?;
                let taken = Round {
                    cpu_ns: procs::cpu_ns(pid).saturating_sub(cpu0),
                    requests: m.requests,
                };
                match t {
                    Target::Sidecar => pair.sidecar = taken,
                    _ => pair.bare = taken,
                }
            }
            eprintln!(
                "bench:   {} {conns:>3} conns  pair {round:>2}: sidecar {:>5.1} µs/req  bare Pingora {:>5.1}  ratio {:.3}",
                l.variant.tag(),
                pair.sidecar.us_per_request(),
                pair.bare.us_per_request(),
                pair.ratio()
            );
            pairs.push(pair);
        }
        let p = paired::summarize(&pairs)
            .ok_or_else(|| format!("{conns} connections: a paired round served nothing"))?;
        let _ = writeln!(
            s,
            "| {conns} | {:.1} | {:.1} | {:.3} {} | {:.3}–{:.3} | {:.3} |",
            p.sidecar_us,
            p.bare_us,
            p.median,
            ok_mark(p.median >= 0.95),
            p.middle.0,
            p.middle.1,
            p.pooled
        );
    }
    Ok(s)
}

/// The two tables of one line-up: per target, then the sidecar's ratios.
fn throughput_tables(
    l: &Lineup,
    samples: &[(usize, Target, Sample)],
    conn_counts: &[usize],
) -> String {
    let mut s = String::new();
    s.push_str("| conns | target | req/s | p50 | p90 | p99 | p99.9 | CPU µs/req | errors |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut aggs = Vec::new();
    for &conns in conn_counts {
        for (t, _, _) in &l.targets {
            let mine: Vec<Sample> = samples
                .iter()
                .filter(|(c, tt, _)| *c == conns && tt == t)
                .map(|(_, _, s)| *s)
                .collect();
            let a = aggregate(&mine);
            let _ = writeln!(
                s,
                "| {conns} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                t.name(),
                a.rps,
                a.lat.p50,
                a.lat.p90,
                a.lat.p99,
                a.lat.p999,
                if a.cpu_us > 0.0 {
                    format!("{:.1}", a.cpu_us)
                } else {
                    "–".into()
                },
                a.errors
            );
            aggs.push((conns, *t, a));
        }
    }
    let get = |conns: usize, t: Target| {
        aggs.iter()
            .find(|(c, tt, _)| *c == conns && *tt == t)
            .map(|(_, _, a)| a)
    };
    s.push_str(
        "\n| conns | sidecar/nginx (≥ 0.9) | sidecar/HAProxy | sidecar/bare (≥ 0.95) | \
         bare/nginx | by CPU/req: sidecar/nginx | sidecar/HAProxy | sidecar/bare | \
         p50 over direct (saturated) | p99 over direct (saturated) |\n",
    );
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let show = |r: Option<f64>, target: Option<f64>| match (r, target) {
        (Some(r), Some(t)) => format!("{r:.2} {}", ok_mark(r >= t)),
        (Some(r), None) => format!("{r:.2}"),
        (None, _) => "–".into(),
    };
    for &conns in conn_counts {
        let Some(sc) = get(conns, Target::Sidecar) else {
            continue;
        };
        let rps = |t| get(conns, t).map(|a| a.rps);
        // CPU per request: the other's over the sidecar's (higher is better for the sidecar).
        let cpu = |t| get(conns, t).map(|a| a.cpu_us / sc.cpu_us.max(1e-9));
        let over_direct = |f: fn(&Percentiles) -> f64| {
            get(conns, Target::Direct).map_or_else(
                || "–".into(),
                |d| format!("{:.0} µs", f(&sc.lat) - f(&d.lat)),
            )
        };
        let _ = writeln!(
            s,
            "| {conns} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(ratio(Some(sc.rps), rps(Target::Nginx)), Some(0.9)),
            show(ratio(Some(sc.rps), rps(Target::Haproxy)), None),
            show(ratio(Some(sc.rps), rps(Target::Bare)), Some(0.95)),
            show(ratio(rps(Target::Bare), rps(Target::Nginx)), None),
            show(cpu(Target::Nginx), None),
            show(cpu(Target::Haproxy), None),
            show(cpu(Target::Bare), None),
            over_direct(|p| p.p50),
            over_direct(|p| p.p99),
        );
    }
    let rss = |pid: u32| {
        mib(procs::tree(pid)
            .iter()
            .filter_map(|p| procs::rss_kib(*p))
            .sum())
    };
    let rss_line: Vec<String> = l
        .targets
        .iter()
        .filter_map(|(t, _, _)| l.pid(*t).map(|p| format!("{} {}", t.name(), rss(p))))
        .collect();
    let _ = writeln!(
        s,
        "\nRSS after the run (all processes of each: nginx master + workers): {}.",
        rss_line.join(", ")
    );
    s
}

async fn throughput(env: &Env, w: &World) -> Result<String, String> {
    let plan = &env.plan;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 1. Throughput and latency\n\n{} round(s) of {} s per target and connection count, \
         targets alternating (A B C D E, E D C B A). Requests/s summed over rounds; latency \
         percentiles are the median over rounds, in µs. CPU/req: CPU time the proxy process \
         (all threads; nginx master + workers) used during the runs divided by the requests \
         served: unlike req/s it hardly moves when other work shares the machine. The CPU \
         ratios are the other proxy's CPU/req over the sidecar's. Peers: nginx (`proxy_pass` \
         to a keep-alive pool, static `Authorization`) and HAProxy (`http-request set-header \
         Authorization`, `http-reuse always`), each with as many workers (nginx \
         `worker_processes`, HAProxy `nbthread`) as the Pingora proxies have threads.\n",
        plan.rounds,
        plan.run.as_secs()
    );
    let conn_counts = [1usize, 16, 128];
    let l = lineup(env, w, Variant::PLAIN).await?;
    let samples = closed_loops(env, w, &l, &conn_counts).await?;
    s.push_str("### One worker/thread each, plain HTTP upstream\n\n");
    s.push_str(&throughput_tables(&l, &samples, &conn_counts));
    s.push_str(&paired_cpu(env, w, &l, &conn_counts).await?);
    s.push_str(&fixed_rate_latency(env, &l).await?);
    drop(l);

    // The extra line-ups run fewer connection counts: the smoke only checks that they run.
    let few: &[usize] = if plan.mode == "smoke" {
        &[16]
    } else {
        &[16, 128]
    };
    let l = lineup(env, w, Variant::TWO_THREADS).await?;
    let samples = closed_loops(env, w, &l, few).await?;
    s.push_str(
        "\n### Two workers/threads each (the sidecar's `threads: 2`)\n\nThe machine has as \
         many cores as it prints above; with 2 cores the load generator and the upstream \
         compete with the second thread.\n\n",
    );
    s.push_str(&throughput_tables(&l, &samples, few));
    s.push_str(&paired_cpu(env, w, &l, few).await?);
    drop(l);

    let l = lineup(env, w, Variant::TLS).await?;
    let samples = closed_loops(env, w, &l, few).await?;
    let _ = writeln!(
        s,
        "\n### HTTPS upstream\n\nThe same upstream behind TLS (rustls, HTTP/1.1, a certificate \
         for `{}` signed by a CA minted for the run); every proxy keeps connections alive and \
         verifies the certificate against that CA: nginx `proxy_ssl_verify on` with \
         `proxy_ssl_trusted_certificate` and session reuse, HAProxy `ssl verify required \
         ca-file`, the sidecar `tls: {{ ca_file, server_name }}`. Bare Pingora is left out here \
         (it takes no CA); one worker/thread each.\n",
        upstream::TLS_NAME
    );
    s.push_str(&throughput_tables(&l, &samples, few));
    Ok(s)
}

/// Requests per second and connections of the added-latency measurement: far below what any
/// target serves, so that latency is the cost of the path and not time spent queueing.
const LATENCY_RATE: f64 = 1000.0;
const LATENCY_CONNS: usize = 4;

/// Added latency where it means something: at a fixed rate well below saturation (open loop,
/// the in-repo generator). Under the closed loops above every target is CPU-bound and latency
/// is only connections ÷ throughput (Little's law).
async fn fixed_rate_latency(env: &Env, l: &Lineup) -> Result<String, String> {
    let plan = &env.plan;
    let mut samples: Vec<(Target, Histogram)> = Vec::new();
    for round in 0..plan.rounds {
        for (t, addr, a) in l.order(round) {
            let req = Arc::new(load::bench_request(*addr, a.as_deref()));
            let o = load::paced(*addr, req, LATENCY_CONNS, LATENCY_RATE, plan.run).await;
            let failed = o.errors + o.status_401 + o.other_status;
            if failed > 0 || o.ok == 0 {
                return Err(format!(
                    "{} at {LATENCY_RATE} req/s: {} ok, {failed} failed ({})",
                    t.name(),
                    o.ok,
                    o.first_error.as_deref().unwrap_or("non-2xx answers")
                ));
            }
            let p = Percentiles::of(&o.latency);
            eprintln!(
                "bench:   {LATENCY_RATE} req/s  {:<13} p50 {:>7.1} µs  p99 {:>8.1} µs",
                t.name(),
                p.p50,
                p.p99
            );
            samples.push((*t, o.latency));
        }
    }
    let merged = |t: Target| {
        let mut h = Histogram::default();
        for (_, s) in samples.iter().filter(|(tt, _)| *tt == t) {
            h.merge(s);
        }
        Percentiles::of(&h)
    };
    let direct = merged(Target::Direct);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Added latency at a fixed rate\n\n{LATENCY_RATE:.0} requests/s over \
         {LATENCY_CONNS} keep-alive connections (open loop, the in-repo generator), {} round(s) \
         of {} s per target, alternating; percentiles over all rounds, in µs. This is the \
         added-latency measurement of the performance targets: every target is far from saturation here.\n",
        plan.rounds,
        plan.run.as_secs()
    );
    s.push_str(
        "| target | p50 | p90 | p99 | p99.9 | added p50 vs direct (≤ 100 µs) | added p99 vs direct (≤ 1 ms) |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (t, _, _) in &l.targets {
        let p = merged(*t);
        let (add50, add99) = (p.p50 - direct.p50, p.p99 - direct.p99);
        let added = if *t == Target::Direct {
            "– | –".to_string()
        } else {
            format!(
                "{add50:.0} µs {} | {add99:.0} µs {}",
                ok_mark(add50 <= 100.0),
                ok_mark(add99 <= 1000.0)
            )
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {added} |",
            t.name(),
            p.p50,
            p.p90,
            p.p99,
            p.p999
        );
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 2. Refresh storm

const STORM_IDP_LATENCY: Duration = Duration::from_millis(50);

async fn storm(env: &Env, w: &World) -> Result<String, String> {
    let n = env.plan.storm;
    let sidecar = start_sidecar(env, w, "storm", "").await?;
    let direct = w.upstream.addr;
    let mut direct_req = load::bench_request(direct, Some(&w.static_authorization()));
    let mut direct_conns = load::open_warm(direct, &direct_req, n, 200).await?;
    let req = load::bench_request(sidecar.listen, None);
    let mut conns = load::open_warm(sidecar.listen, &req, n, 200).await?;
    if conns.len() != n {
        return Err(format!("only {} of {n} connections opened", conns.len()));
    }
    let limit = STORM_IDP_LATENCY.as_secs_f64() * 1e6 + 5000.0;
    let mut rows = String::new();
    let (mut added_all, mut added_own_all) = (Vec::new(), Vec::new());
    let mut all_good = true;
    // One burst is one sample of a noisy machine: several rounds, each with its own baselines.
    for round in 1..=env.plan.rounds {
        // Baseline: the same burst straight to the upstream (with a token issued after the
        // last round's revocation).
        if round > 1 {
            direct_req = load::bench_request(direct, Some(&w.static_authorization()));
        }
        let (base, back) = load::burst(direct_conns, &direct_req, Duration::from_secs(20)).await;
        direct_conns = back;
        if base.ok != base.requests() || direct_conns.len() != n {
            return Err(format!(
                "round {round}: the direct burst failed: {} of {} answered 200, {} connections \
                 left ({:?})",
                base.ok,
                base.requests(),
                direct_conns.len(),
                base.first_error
            ));
        }
        // Second baseline: the same burst through the sidecar while its token is valid, so
        // that what the expiry itself adds can be told from the cost of 1,000 requests at once.
        let (own, back) = load::burst(conns, &req, Duration::from_secs(20)).await;
        conns = back;
        if own.ok != own.requests() || conns.len() != n {
            return Err(format!(
                "round {round}: the sidecar burst with a valid token failed: {} of {} answered \
                 200 ({:?})",
                own.ok,
                own.requests(),
                own.first_error
            ));
        }
        w.idp.set_latency(STORM_IDP_LATENCY);
        let calls_before = w.idp.calls();
        // Every token the sidecar holds is now dead: each request gets a 401 upstream.
        w.registry.revoke_all();
        let (o, back) = load::burst(conns, &req, Duration::from_secs(30)).await;
        conns = back;
        let calls = w.idp.calls() - calls_before;
        w.idp.set_latency(Duration::ZERO);
        if o.requests() == 0 {
            return Err(format!("the storm got no answer: {:?}", o.first_error));
        }
        if conns.len() != n {
            return Err(format!("the storm lost {} connections", n - conns.len()));
        }
        let p = Percentiles::of(&o.latency);
        let b = Percentiles::of(&base.latency);
        let v = Percentiles::of(&own.latency);
        let added = p.p99 - b.p99;
        let added_own = p.p99 - v.p99;
        eprintln!(
            "bench:   round {round}: storm p99 {:.1} ms (direct {:.1} ms, valid token {:.1} ms), \
             {calls} IdP call(s), {} 401s, {} replayed",
            p.p99 / 1000.0,
            b.p99 / 1000.0,
            v.p99 / 1000.0,
            o.status_401,
            o.replayed.count()
        );
        added_all.push(added);
        added_own_all.push(added_own);
        all_good &= calls == 1 && o.status_401 == 0;
        let _ = writeln!(
            rows,
            "| {round} | {} | {calls} {} | {} {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms {} | {:.1} ms {} |",
            o.requests() + o.errors,
            ok_mark(calls == 1),
            o.status_401,
            ok_mark(o.status_401 == 0),
            o.other_status + o.errors,
            o.replayed.count(),
            p.p50 / 1000.0,
            p.p99 / 1000.0,
            o.latency.percentile_us(100.0) / 1000.0,
            b.p99 / 1000.0,
            v.p99 / 1000.0,
            added / 1000.0,
            ok_mark(added <= limit),
            added_own / 1000.0,
            ok_mark(added_own <= limit),
        );
    }
    drop(sidecar);
    let (added, added_own) = (median(added_all), median(added_own_all));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 2. Refresh storm\n\n{n} keep-alive connections each send one request at the same \
         moment right after every token was revoked at the IdP (the upstream answers 401 to the \
         sidecar's token); the IdP answers in {} ms. Baselines, measured just before in each \
         round: the same burst sent directly to the upstream with a valid token (\"direct\"), \
         and through the sidecar with a valid token (\"valid token\"): the second difference is \
         what the expiry itself costs, the first also holds the sidecar's cost of taking 1,000 \
         requests at once.\n",
        STORM_IDP_LATENCY.as_millis()
    );
    s.push_str("| round | requests | IdP calls (= 1) | client 401s (= 0) | other errors | replayed | p50 | p99 | max | direct p99 | valid-token p99 | added p99 vs direct (≤ IdP + 5 ms) | added p99 vs valid token |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    s.push_str(&rows);
    let _ = writeln!(
        s,
        "\nMedian over {} round(s): added p99 {:.1} ms vs direct {}, {:.1} ms vs valid token {}; \
         exactly one IdP call and no 401 in every round: {}.",
        env.plan.rounds,
        added / 1000.0,
        ok_mark(added <= limit),
        added_own / 1000.0,
        ok_mark(added_own <= limit),
        ok_mark(all_good)
    );
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 3. Replay cost

async fn replay(env: &Env, w: &World) -> Result<String, String> {
    let plan = &env.plan;
    let sidecar = start_sidecar(env, w, "replay", "").await?;
    let req = Arc::new(load::bench_request(sidecar.listen, None));
    let _ = load::closed_loop(sidecar.listen, req.clone(), 128, plan.warm).await;
    let calls_before = w.idp.calls();
    let registry = w.registry.clone();
    let every = plan.revoke_every;
    let run = plan.replay_run;
    let revoker = tokio::spawn(async move {
        let mut n = 0u32;
        let started = Instant::now();
        // Bounded by the run's length.
        loop {
            tokio::time::sleep(every).await;
            if started.elapsed() + every / 2 > run {
                break;
            }
            registry.revoke_all();
            n += 1;
        }
        n
    });
    let o = load::closed_loop(sidecar.listen, req, 128, run).await;
    let revocations = revoker.await.unwrap_or(0);
    let calls = w.idp.calls() - calls_before;
    drop(sidecar);
    if o.ok == 0 {
        return Err(format!("no request succeeded: {:?}", o.first_error));
    }
    let r = Percentiles::of(&o.replayed);
    let p = Percentiles::of(&o.plain);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 3. Replay cost\n\n128 connections, closed loop for {} s; every token revoked {} time(s) \
         (every {} ms), IdP answering at once. Replayed answers are recognised by the sidecar's \
         `X-Sidecar-Replayed` debug header. Latency in µs.\n",
        run.as_secs(),
        revocations,
        every.as_millis()
    );
    s.push_str("| requests | replayed | IdP calls | client 401s | errors | p50 plain | p99 plain | p50 replayed | p99 replayed | p99.9 replayed |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let _ = writeln!(
        s,
        "| {} | {} | {calls} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        o.requests(),
        o.replayed.count(),
        o.status_401,
        o.errors + o.other_status,
        p.p50,
        p.p99,
        r.p50,
        r.p99,
        r.p999
    );
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 4. Rate-limit accuracy

async fn rate_limit(env: &Env, w: &World) -> Result<String, String> {
    let plan = &env.plan;
    let rate = plan.rate_per_s;
    let extra = format!(
        "rate_limits:\n  - {{ name: bench, upstream: api, match: {{ path: \"/**\" }}, rate: {rate}/1s, burst: 10, mode: reject }}\n"
    );
    let sidecar = start_sidecar(env, w, "rate", &extra).await?;
    let req = Arc::new(load::bench_request(sidecar.listen, None));
    let offered = f64::from(rate) * 3.0;
    let run = plan.rate_run;
    // Measure at the upstream over the middle of the run (the initial burst excluded).
    let skip = (run / 10).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let ok = &w.upstream.counters.ok;
    let ok_now = || (ok.load(Ordering::Relaxed), Instant::now());
    let load = tokio::spawn(load::paced(sidecar.listen, req, 32, offered, run));
    tokio::time::sleep(skip).await;
    let (c0, t0) = ok_now();
    tokio::time::sleep(run - skip * 2).await;
    let (c1, t1) = ok_now();
    let o = load.await.map_err(|e| format!("load task: {e}"))?;
    drop(sidecar);
    let delivered = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
    let error = (delivered / f64::from(rate) - 1.0) * 100.0;
    if o.requests() == 0 {
        return Err(format!("no answer: {:?}", o.first_error));
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 4. Rate-limit accuracy\n\nRule `rate: {rate}/1s, burst: 10, mode: reject`; 32 \
         connections offer 3× that, paced, for {} s. Delivered rate counted at the upstream over \
         the middle {:.1} s (the first burst left out).\n",
        run.as_secs(),
        (t1 - t0).as_secs_f64()
    );
    s.push_str("| configured | offered | delivered at upstream | error (±1 %) | answered 429 | other errors |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|\n");
    let _ = writeln!(
        s,
        "| {rate}/s | {:.0}/s | {delivered:.1}/s | {error:+.2} % {} | {} | {} |",
        o.requests() as f64 / o.elapsed.as_secs_f64(),
        ok_mark(error.abs() <= 1.0),
        o.other_status,
        o.errors + o.status_401
    );
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 5. Memory

async fn memory(env: &Env, w: &World) -> Result<String, String> {
    let sidecar = start_sidecar(env, w, "memory", "").await?;
    let pid = sidecar.proc.pid;
    let req = load::bench_request(sidecar.listen, None);
    // Idle: started, token fetched, a few requests served.
    let warm = load::open_warm(sidecar.listen, &req, 4, 4).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = || procs::rss_kib(pid).ok_or("cannot read the sidecar's VmRSS");
    let idle = rss()?;
    let mut rows = vec![(
        "idle".to_string(),
        format!("{} {} (≤ 30 MiB)", mib(idle), ok_mark(idle <= 30 * 1024)),
    )];
    let mut held: Vec<load::Conn> = Vec::new();
    let mut notes = Vec::new();
    for &n in &env.plan.memory_conns {
        // This process holds n client sockets and the sidecar n + its upstream pool.
        if (n as u64) + 512 > env.fd_limit {
            notes.push(format!(
                "{n} connections skipped: the open-file limit is {} and could not be raised",
                env.fd_limit
            ));
            continue;
        }
        let more = n.saturating_sub(held.len());
        let opened = load::open_warm(sidecar.listen, &req, more, 200).await?;
        held.extend(opened);
        tokio::time::sleep(Duration::from_secs(1)).await;
        rows.push((format!("{n} open keep-alive connections"), mib(rss()?)));
    }
    drop(held);
    drop(sidecar);
    let mut s = String::new();
    s.push_str("## 5. Memory\n\nThe sidecar's VmRSS (/proc/PID/status), a fresh process; each connection served one request and stays open.\n\n");
    s.push_str("| state | RSS |\n|---|---:|\n");
    for (state, rss) in rows {
        let _ = writeln!(s, "| {state} | {rss} |");
    }
    for n in notes {
        let _ = writeln!(s, "\n{n}.");
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Profiling helper (not a scenario)

/// Drives `target` (sidecar, bare, nginx) with `conns` connections for `secs` while `perf record`
/// samples it; returns `perf report`'s flat profile.
pub async fn profile(env: &Env, target: &str, secs: u64, conns: usize) -> Result<String, String> {
    let w = World::start()?;
    let l = lineup(env, &w, Variant::PLAIN).await?;
    let t = match target {
        "sidecar" => Target::Sidecar,
        "bare" => Target::Bare,
        "nginx" => Target::Nginx,
        "haproxy" => Target::Haproxy,
        other => {
            return Err(format!(
                "unknown profile target {other} (sidecar, bare, nginx, haproxy)"
            ))
        }
    };
    let (Some(pid), Some(addr)) = (l.pid(t), l.addr(t)) else {
        return Err(format!("{target} is not in the line-up"));
    };
    // nginx: the worker, not the master.
    let pid = if t == Target::Nginx {
        *procs::tree(pid).last().ok_or("nginx has no worker")?
    } else {
        pid
    };
    let data = w.scratch.path("perf.data");
    let mut perf = tokio::process::Command::new("perf");
    perf.args(["record", "-F", "2999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let perf = perf
        .spawn()
        .map_err(|e| format!("perf (apt-get install linux-perf): {e}"))?;
    let cpu0 = procs::cpu_ns(pid);
    let sample = measure(env, &w, addr, None, conns, Duration::from_secs(secs)).await?;
    let cpu_us =
        procs::cpu_ns(pid).saturating_sub(cpu0) as f64 / 1000.0 / sample.requests.max(1) as f64;
    let _ = tokio::time::timeout(Duration::from_secs(30), perf.wait_with_output()).await;
    let report = tokio::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.4",
        ])
        .args(["--sort", "dso,symbol", "-g", "none", "-i"])
        .arg(&data)
        .output()
        .await
        .map_err(|e| format!("perf report: {e}"))?;
    // Kept for call-graph digging (`perf report -g caller -i FILE`).
    let kept = std::env::temp_dir().join(format!("sidecar-bench-perf-{target}.data"));
    let _ = std::fs::copy(&data, &kept);
    let flat: String = String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    Ok(format!(
        "{target}: {:.0} req/s, {cpu_us:.1} CPU µs/req at {conns} connections while profiled; perf data kept in {}\n{flat}",
        sample.requests as f64 / sample.seconds.max(1e-9),
        kept.display()
    ))
}
