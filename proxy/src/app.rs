//! Shared state: the live config with its compiled routes, peers and token sources, swapped
//! atomically on reload; counters of in-flight and waiting requests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::upstreams::peer::HttpPeer;
use sidecar_config::{Config, Upstream, UpstreamProtocol};
use sidecar_filters::{Breaker, RateLimiter, Routes, SkipReason, UpstreamHolds};
use sidecar_token::{SharedBackend, SharedRateLimits, TokenSource};

use crate::dns::{Addresses, ReplayResolver, Resolvers, Target};
use crate::histogram::{self, Durations};
use crate::inflight::Inflight;

/// How long the start waits for the first lookups of upstream host names (a name still
/// unresolved then is not fatal: its requests get 502 until it resolves).
const FIRST_LOOKUPS: std::time::Duration = std::time::Duration::from_secs(5);
use crate::streams::{StreamCount, UpstreamStreams};

/// Everything a request needs, built once per config.
pub struct Live {
    /// The validated config.
    pub config: Arc<Config>,
    /// Compiled routes.
    pub routes: Routes,
    /// Per upstream, in config order.
    pub upstreams: Vec<UpstreamRt>,
    /// Token sources by provider name.
    pub providers: HashMap<String, TokenSource>,
    /// Client-side rate limits; unchanged rules keep their state across reloads.
    pub limiter: RateLimiter,
    /// The Redis replicas share (`shared:`); `None`: nothing is shared, nothing connects.
    pub shared: Option<SharedBackend>,
    /// Rate-limit rules held across replicas (empty without `shared:`).
    pub shared_limits: SharedRateLimits,
}

/// An upstream ready for requests.
pub struct UpstreamRt {
    /// Its config.
    pub config: Upstream,
    /// Cloned for every request, with one of `addresses` put in: TLS, timeouts, protocol.
    pub peer: HttpPeer,
    /// Where the upstream is now: followed in the background when its URL has a host name.
    pub addresses: Arc<Addresses>,
    /// What `addresses` are looked up from; a reload that keeps it keeps the addresses.
    target: Target,
    /// `Host` header to send.
    pub host_header: HeaderValue,
    /// Its provider, if tokens are injected.
    pub tokens: Option<TokenSource>,
    /// Clients for the sidecar's own replays (bodies beyond Pingora's retry buffer, answers
    /// whose body decides expiry); see [`UpstreamRt::replay_client`].
    replay_clients: ReplayClients,
    /// `scheme://host:port` the replay client sends to.
    pub replay_base: String,
    /// Fails fast while the upstream keeps failing.
    pub breaker: Breaker,
    /// Its request metrics, registered once.
    pub metrics: UpstreamMetrics,
    /// Its stream metrics, registered once.
    pub streams: UpstreamStreams,
}

/// Per-upstream request metrics, looked up once per (method, status) and then kept: counting a
/// request is an atomic add, not a registry lookup.
pub struct UpstreamMetrics {
    label: Arc<str>,
    requests: Box<[OnceLock<metrics::Counter>]>,
    /// `sidecar_request_duration_seconds{upstream}`.
    pub duration: Arc<Durations>,
    /// `sidecar_upstream_duration_seconds{upstream}`: per attempt that got an answer, from the
    /// moment the request head is handed to the upstream connection to the moment the answer's
    /// header has been read; Pingora's attempts (connect excluded) and the sidecar's own replays
    /// (whose client may connect first) alike.
    pub upstream_duration: Arc<Durations>,
}

/// Methods as metric labels: the standard ones, everything else `other` (no unbounded label).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
/// Status labels: `0` … `599` (0: no answer was written), then `other`.
const STATUSES: usize = 601;
/// Who wrote the answer: the `origin` label.
const ORIGINS: [&str; 2] = ["upstream", "sidecar"];

fn method_index(m: &str) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|x| *x == m)
        .unwrap_or(METHODS.len() - 1)
}

/// The label of status index `i` (see [`STATUSES`]), built once.
fn status_label(i: usize) -> &'static str {
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..STATUSES - 1).map(|s| s.to_string()).collect());
    labels.get(i).map_or("other", String::as_str)
}

impl UpstreamMetrics {
    /// The metrics of upstream `name`; `""` for requests that matched no upstream.
    pub(crate) fn new(name: &str) -> UpstreamMetrics {
        let label: Arc<str> = Arc::from(name);
        UpstreamMetrics {
            duration: histogram::durations(histogram::REQUEST, name),
            upstream_duration: histogram::durations(histogram::UPSTREAM, name),
            requests: (0..ORIGINS.len() * METHODS.len() * STATUSES)
                .map(|_| OnceLock::new())
                .collect(),
            label,
        }
    }

    /// `sidecar_requests_total{upstream,method,status,origin}`; `own`: the sidecar wrote the
    /// answer itself (a 429 of its rate limits, a 502 for an unreachable upstream, ...).
    pub fn requests(&self, method: &str, status: u16, own: bool) -> &metrics::Counter {
        let oi = usize::from(own);
        let mi = method_index(method);
        let si = usize::from(status).min(STATUSES - 1);
        self.requests[(oi * METHODS.len() + mi) * STATUSES + si].get_or_init(|| {
            metrics::counter!("sidecar_requests_total", "upstream" => self.label.clone(), "method" => METHODS[mi], "status" => status_label(si), "origin" => ORIGINS[oi])
        })
    }
}

/// Why a config could not be put to work.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The shared Redis cannot be used as configured (never for being unreachable).
    #[error("shared: {message}")]
    Shared {
        /// Why.
        message: String,
    },
    /// An upstream host that cannot be sent, or TLS material that cannot be used.
    #[error("upstream {upstream}: {message}")]
    Upstream {
        /// Name.
        upstream: String,
        /// Why.
        message: String,
    },
    /// A provider whose identity-provider client cannot be built (its TLS settings).
    #[error("provider {provider}: {message}")]
    Provider {
        /// Name.
        provider: String,
        /// Why.
        message: String,
    },
}

impl Live {
    /// Builds routes and peers; token sources are taken from `providers` (kept across reloads
    /// when their settings did not change) or created and started on `handle`.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Live>,
        handle: &tokio::runtime::Handle,
    ) -> Result<Live, BuildError> {
        // The Redis connection survives a reload that leaves `shared:` as it was.
        let shared = match (&config.shared, previous) {
            (None, _) => None,
            (Some(s), Some(prev))
                if prev.config.shared.as_ref() == Some(s) && prev.shared.is_some() =>
            {
                prev.shared.clone()
            }
            (Some(s), _) => Some(
                SharedBackend::start(s, handle)
                    .map_err(|message| BuildError::Shared { message })?,
            ),
        };
        let mut providers = HashMap::new();
        let mut fresh = Vec::new();
        for (name, p) in &config.providers {
            let reused = previous.and_then(|prev| {
                let same = prev.config.providers.get(name) == Some(p)
                    && prev.config.shared == config.shared
                    && prev.config.replay.wait_for_token == config.replay.wait_for_token;
                same.then(|| prev.providers.get(name).cloned()).flatten()
            });
            let source = match reused {
                Some(s) => s,
                None => {
                    let s =
                        TokenSource::new(p, handle.clone()).map_err(|e| BuildError::Provider {
                            provider: name.clone(),
                            message: e.to_string(),
                        })?;
                    if let (Some(backend), true) = (&shared, p.shared) {
                        s.share_through(backend, p, config.replay.wait_for_token);
                    }
                    fresh.push(s.clone());
                    s
                }
            };
            providers.insert(name.clone(), source);
        }
        let resolvers = Resolvers::new(&config.dns, handle.clone());
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let target = Target {
                    upstream: u.name.clone(),
                    host: u.host.clone(),
                    port: u.port,
                    dns: config.dns.clone(),
                };
                let before = previous
                    .and_then(|p| p.upstreams.iter().find(|x| x.config.name == u.name))
                    .filter(|p| p.target.host == target.host && p.target.port == target.port);
                let addresses = match before {
                    // Unchanged: the same addresses, still followed by the same lookups.
                    Some(p) if p.target == target => p.addresses.clone(),
                    // Other `dns:` settings: new lookups, starting from the addresses known.
                    Some(p) => resolvers.follow(&target, Some(p.addresses.now().to_vec())),
                    None => resolvers.follow(&target, None),
                };
                UpstreamRt::build(u, target, addresses, &providers)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if previous.is_none() {
            let all: Vec<_> = upstreams.iter().map(|u| u.addresses.clone()).collect();
            crate::dns::wait_first(&all, FIRST_LOOKUPS);
        }
        // Only now: a config that fails to build must not leave refreshers running.
        for s in fresh {
            s.start();
        }
        let limiter = match previous {
            Some(prev) => prev.limiter.rebuild(&config.rate_limits),
            None => RateLimiter::new(&config.rate_limits),
        };
        Ok(Live {
            limiter,
            routes: Routes::new(&config.upstreams),
            upstreams,
            providers,
            shared_limits: shared
                .as_ref()
                .map(|b| SharedRateLimits::new(&config.rate_limits, b))
                .unwrap_or_default(),
            shared,
            config,
        })
    }

    /// Stops the refreshers of providers that `next` no longer uses.
    pub fn retire(&self, next: &Live) {
        for (name, source) in &self.providers {
            let kept = next.providers.get(name).is_some_and(|n| n.same_as(source));
            if !kept {
                source.stop();
            }
        }
    }
}

impl UpstreamRt {
    /// The client for the sidecar's own replays: it connects to the same addresses as the
    /// Pingora path. A new client once the addresses changed, so that its pooled connections
    /// to an address that left the record are not reused (its pool is keyed by host name, not
    /// by address as Pingora's is).
    pub(crate) fn replay_client(&self) -> reqwest::Client {
        self.replay_clients.get(self.addresses.now())
    }

    /// The peer for the `attempt`-th connect of a request that started at `start` among
    /// `addrs`; `None` while the upstream's name has not resolved.
    pub(crate) fn peer_at(
        &self,
        addrs: &[SocketAddr],
        start: usize,
        attempt: usize,
    ) -> Option<Box<HttpPeer>> {
        let i = crate::dns::address_index(start, attempt, addrs.len())?;
        // Boxed at once, as Pingora takes it: the peer is a large value, and each move of it
        // on the way there was a copy.
        let mut peer = Box::new(self.peer.clone());
        peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(addrs[i]);
        Some(peer)
    }

    /// Counts an expired-token answer that was passed on without a replay
    /// (`sidecar_replay_skipped_total`).
    pub(crate) fn count_skipped(&self, reason: SkipReason) {
        metrics::counter!("sidecar_replay_skipped_total", "upstream" => self.config.name.clone(), "reason" => reason.as_str()).increment(1);
    }

    /// Counts a replay (`sidecar_replays_total`).
    pub(crate) fn count_replayed(&self, reason: &'static str, result: &'static str) {
        metrics::counter!("sidecar_replays_total", "upstream" => self.config.name.clone(), "reason" => reason, "result" => result).increment(1);
    }

    /// The Pingora peer and the replay client both take their addresses from `addresses` and
    /// the TLS material the config read, so both reach the same addresses with the same trust
    /// and client certificate.
    fn build(
        u: &Upstream,
        target: Target,
        addresses: Arc<Addresses>,
        providers: &HashMap<String, TokenSource>,
    ) -> Result<UpstreamRt, BuildError> {
        let err = |message: String| BuildError::Upstream {
            upstream: u.name.clone(),
            message,
        };
        // Each request puts one of the current addresses in (`peer_at`).
        let placeholder = SocketAddr::from((Ipv4Addr::UNSPECIFIED, u.port));
        Ok(UpstreamRt {
            peer: peer_for(u, placeholder).map_err(&err)?,
            replay_clients: ReplayClients::new(u, &addresses).map_err(err)?,
            addresses,
            target,
            host_header: HeaderValue::from_str(&u.authority)
                .map_err(|e| err(format!("bad host: {e}")))?,
            tokens: u.provider.as_ref().and_then(|p| providers.get(p).cloned()),
            replay_base: replay_base(u),
            breaker: Breaker::new(u.breaker_failures, u.breaker_cooldown),
            metrics: UpstreamMetrics::new(&u.name),
            streams: UpstreamStreams::new(&u.name),
            config: u.clone(),
        })
    }
}

fn peer_for(u: &Upstream, addr: SocketAddr) -> Result<HttpPeer, String> {
    let sni = u.server_name.clone().unwrap_or_else(|| u.host.clone());
    let mut peer = HttpPeer::new(addr, u.tls, sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(u.connect_timeout);
    o.total_connection_timeout = Some(u.connect_timeout);
    o.read_timeout = Some(u.read_timeout);
    o.write_timeout = Some(u.read_timeout);
    o.idle_timeout = Some(u.idle_timeout);
    if u.protocol == UpstreamProtocol::H2c {
        // Plain TCP with HTTP/2 as the lowest version: Pingora speaks h2c (prior knowledge).
        o.alpn = pingora::protocols::ALPN::H2;
    }
    if u.tls {
        o.alpn = match u.protocol {
            UpstreamProtocol::Http1 => pingora::protocols::ALPN::H1,
            UpstreamProtocol::Auto | UpstreamProtocol::H2c => pingora::protocols::ALPN::H2H1,
        };
        crate::peer_tls::apply(&mut peer, &u.tls_config)?;
    }
    Ok(peer)
}

/// Replay clients, one per address set: the current one, made again when the set changes.
struct ReplayClients {
    current: ArcSwap<(Arc<Vec<SocketAddr>>, reqwest::Client)>,
    make: Box<dyn Fn() -> Result<reqwest::Client, String> + Send + Sync>,
}

impl ReplayClients {
    fn new(u: &Upstream, addresses: &Arc<Addresses>) -> Result<ReplayClients, String> {
        let (u, addresses) = (u.clone(), addresses.clone());
        let make = move || replay_client(&u, &addresses);
        let first = make()?;
        Ok(ReplayClients {
            current: ArcSwap::from_pointee((Arc::new(Vec::new()), first)),
            make: Box::new(make),
        })
    }

    fn get(&self, now: Arc<Vec<SocketAddr>>) -> reqwest::Client {
        let current = self.current.load();
        if Arc::ptr_eq(&current.0, &now) {
            return current.1.clone();
        }
        match (self.make)() {
            Ok(client) => {
                self.current.store(Arc::new((now, client.clone())));
                client
            }
            // Built once already with the same settings: not expected; keep the one there is.
            Err(_) => current.1.clone(),
        }
    }
}

/// The host name the replay client puts in its URLs (and its SNI).
fn replay_host(u: &Upstream) -> &str {
    u.server_name.as_deref().unwrap_or(&u.host)
}

fn replay_base(u: &Upstream) -> String {
    let scheme = if u.tls { "https" } else { "http" };
    let host = replay_host(u);
    if host.contains(':') {
        format!("{scheme}://[{host}]:{}", u.port)
    } else {
        format!("{scheme}://{host}:{}", u.port)
    }
}

/// The replay client connects to the same addresses as the Pingora peer, with the same
/// timeouts, trust, client certificate and HTTP version; it never follows redirects and never
/// decompresses, so answers pass unchanged.
fn replay_client(u: &Upstream, addresses: &Arc<Addresses>) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(u.connect_timeout)
        .read_timeout(u.read_timeout)
        .pool_idle_timeout(u.idle_timeout)
        .dns_resolver(Arc::new(ReplayResolver(addresses.clone())));
    b = match u.protocol {
        UpstreamProtocol::H2c => b.http2_prior_knowledge(),
        UpstreamProtocol::Http1 => b.http1_only(),
        UpstreamProtocol::Auto => b,
    };
    if u.tls {
        b = sidecar_token::tls::configure(b, &u.tls_config)?;
    }
    b.build()
        .map_err(|e| format!("replay client: {}", sidecar_token::tls::root_cause(&e)))
}

/// What config validation cannot check without the token crate (a `private_key_jwt` key that
/// does not parse): `check`, `run` and a reload refuse it, at the key, instead of failing at
/// every refresh.
pub fn provider_check(p: &sidecar_config::Provider) -> Result<(), (String, String)> {
    sidecar_token::check_provider(&p.kind).map_err(|m| {
        (
            "private_key".to_string(),
            format!("provider {:?}: private_key: {m}", p.name),
        )
    })
}

/// The process-wide state the proxy and admin services share.
pub struct App {
    /// The current config and everything built from it.
    pub live: ArcSwap<Live>,
    /// Where identity-provider calls and refreshers run.
    pub token_runtime: tokio::runtime::Handle,
    /// Requests being proxied now (for graceful shutdown).
    pub inflight: Arc<Inflight>,
    /// SIGTERM came: `/readyz` answers 503 from now on.
    pub draining: AtomicBool,
    /// `shutdown_delay` is over: new client connections are closed at once and kept-alive ones
    /// are closed after their current request.
    pub closing: AtomicBool,
    /// Requests waiting for a token now (bounded by `replay.max_waiting`).
    pub waiting: AtomicUsize,
    /// Upstreams that asked, with `Retry-After`, not to be sent anything until a moment.
    pub holds: UpstreamHolds,
    /// Request metrics of requests that matched no upstream (label `upstream=""`).
    pub unrouted: UpstreamMetrics,
    /// SIGQUIT handed the listeners to a new process: a Unix socket file is left in place.
    pub upgrading: AtomicBool,
    /// Stream requests in flight, bounded by `max_streams`.
    pub streams: StreamCount,
}

impl App {
    /// Builds the first live state.
    pub fn new(
        config: Config,
        token_runtime: tokio::runtime::Handle,
    ) -> Result<Arc<App>, BuildError> {
        let holds = UpstreamHolds::new(config.retry.max_retry_after);
        let live = Live::build(Arc::new(config), None, &token_runtime)?;
        Ok(Arc::new(App {
            live: ArcSwap::from_pointee(live),
            token_runtime,
            inflight: Arc::default(),
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            holds,
            unrouted: UpstreamMetrics::new(""),
            upgrading: AtomicBool::new(false),
            streams: StreamCount::default(),
        }))
    }

    /// Re-reads the config file and swaps it in; the running config stays when the new one is
    /// invalid (logged and counted). Returns whether the new config is in force.
    pub fn reload(&self, path: &Path) -> bool {
        let result = Config::load_with(path, Some(provider_check))
            .map_err(|e| e.to_string())
            .and_then(|config| self.install(config));
        match result {
            Ok(()) => {
                metrics::counter!("sidecar_config_reloads_total", "result" => "success")
                    .increment(1);
                tracing::info!(file = %path.display(), "configuration reloaded");
                true
            }
            Err(e) => {
                metrics::counter!("sidecar_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration reload failed; keeping the running one");
                false
            }
        }
    }

    /// Puts a validated config to work: builds its live state (reusing unchanged providers and
    /// rate-limit state), swaps it in, stops what the old one no longer uses, and moves the
    /// process-wide bounds (`retry.max_retry_after` of the upstream holds) to the new values.
    fn install(&self, config: Config) -> Result<(), String> {
        let old = self.live.load_full();
        if config.listen != old.config.listen
            || config.admin_listen != old.config.admin_listen
            || config.probe_listen != old.config.probe_listen
        {
            tracing::warn!("listen addresses changed; that takes effect only after a restart");
        }
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        if config.threads != old.config.threads
            || config.downstream.read_buffer != old.config.downstream.read_buffer
        {
            tracing::warn!(
                "threads or downstream.read_buffer changed; that takes effect only after a restart"
            );
        }
        let next = Live::build(Arc::new(config), Some(&old), &self.token_runtime)
            .map_err(|e| e.to_string())?;
        self.holds.set_max(next.config.retry.max_retry_after);
        old.retire(&next);
        self.live.store(Arc::new(next));
        Ok(())
    }

    /// A place among the requests waiting for a token, if fewer than `max` wait already. The
    /// `sidecar_waiting_requests` gauge follows; the place is given back when the guard drops
    /// (also when the waiting request is cancelled).
    pub fn wait_slot(self: &Arc<Self>, max: usize) -> Option<WaitSlot> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let slot = WaitSlot(self.clone());
        metrics::gauge!("sidecar_waiting_requests").set((before + 1) as f64);
        (before < max).then_some(slot)
    }

    /// Whether SIGTERM came (readiness is then 503 for good).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the sidecar no longer takes new requests.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

/// One request waiting for a token; see [`App::wait_slot`].
pub struct WaitSlot(Arc<App>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let left = self.0.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("sidecar_waiting_requests").set(left as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    fn config_file(dir: &Path, max_retry_after: &str) -> std::path::PathBuf {
        let path = dir.join("sidecar.yaml");
        let text = format!(
            "upstreams: [{{ name: api, url: \"http://127.0.0.1:1\" }}]\n\
             retry: {{ max_retry_after: {max_retry_after} }}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `retry.max_retry_after` bounds the process-wide upstream holds; a reload that raises it
    /// lets the next `Retry-After` hold the upstream longer (before: the bound of the first
    /// config stayed until a restart).
    #[tokio::test(start_paused = true)]
    async fn a_reload_moves_the_bound_of_upstream_holds() {
        let dir = std::env::temp_dir().join(format!("sidecar-app-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = config_file(&dir, "1s");
        let app = App::new(
            Config::load(&path).unwrap(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let now = Instant::now();
        assert_eq!(
            app.holds.hold_for("api", Duration::from_secs(3)),
            now + Duration::from_secs(1)
        );
        config_file(&dir, "3s");
        assert!(app.reload(&path));
        assert_eq!(
            app.live.load().config.retry.max_retry_after,
            Duration::from_secs(3)
        );
        assert_eq!(
            app.holds.hold_for("api", Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
        // An invalid file changes nothing, the bound included.
        std::fs::write(&path, "upstreams: [{ name: api }]\n").unwrap();
        assert!(!app.reload(&path));
        assert_eq!(
            app.live.load().config.retry.max_retry_after,
            Duration::from_secs(3)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn addresses_of(app: &App) -> Arc<Addresses> {
        app.live.load().upstreams[0].addresses.clone()
    }

    /// A reload that leaves an upstream's URL and `dns:` alone keeps its addresses (the same
    /// lookups go on); other `dns:` settings start new lookups from the addresses known, so no
    /// request finds none; another port starts afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_keeps_the_addresses_of_an_unchanged_upstream() {
        let dir = std::env::temp_dir().join(format!("sidecar-app-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sidecar.yaml");
        let write = |extra: &str, port: u16| {
            let text =
                format!("upstreams: [{{ name: api, url: \"http://localhost:{port}\" }}]\n{extra}");
            std::fs::write(&path, text).unwrap();
        };
        write("", 1);
        let app = App::new(
            Config::load(&path).unwrap(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        // `localhost` comes from the hosts file: the first lookup answered before the start.
        let first = addresses_of(&app);
        assert!(!first.now().is_empty());
        assert!(first
            .now()
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 1));

        write("retry: { max_retry_after: 3s }\n", 1);
        assert!(app.reload(&path));
        assert!(Arc::ptr_eq(&first, &addresses_of(&app)));

        write("dns: { min_ttl: 2s }\n", 1);
        assert!(app.reload(&path));
        let other_dns = addresses_of(&app);
        assert!(!Arc::ptr_eq(&first, &other_dns));
        assert_eq!(other_dns.now(), first.now());

        write("dns: { min_ttl: 2s }\n", 2);
        assert!(app.reload(&path));
        assert!(!Arc::ptr_eq(&other_dns, &addresses_of(&app)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The replay client is made again when the addresses change (its pool is keyed by host
    /// name: an old client would reuse connections to an address that left the record), and
    /// only then.
    #[test]
    fn a_new_address_set_gets_a_new_replay_client() {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let make = move || {
            counter.fetch_add(1, Ordering::AcqRel);
            reqwest::Client::builder()
                .build()
                .map_err(|e| e.to_string())
        };
        let clients = ReplayClients {
            current: ArcSwap::from_pointee((Arc::new(Vec::new()), make().unwrap())),
            make: Box::new(make),
        };
        let first = Arc::new(vec![SocketAddr::from(([127, 0, 0, 2], 80))]);
        clients.get(first.clone());
        clients.get(first.clone());
        assert_eq!(made.load(Ordering::Acquire), 2);
        clients.get(Arc::new(vec![SocketAddr::from(([127, 0, 0, 3], 80))]));
        assert_eq!(made.load(Ordering::Acquire), 3);
    }
}
