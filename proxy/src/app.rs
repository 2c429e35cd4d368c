//! Shared state: the live config with its compiled routes, peers and token sources, swapped
//! atomically on reload; counters of in-flight and waiting requests.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};
use sidecar_config::{Config, Upstream};
use sidecar_filters::{Breaker, RateLimiter, Routes, SkipReason, UpstreamHolds};
use sidecar_token::TokenSource;
use tokio::sync::Notify;

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
}

/// An upstream ready for requests.
pub struct UpstreamRt {
    /// Its config.
    pub config: Upstream,
    /// Cloned for every request: address, TLS, timeouts resolved once.
    pub peer: HttpPeer,
    /// `Host` header to send.
    pub host_header: HeaderValue,
    /// Its provider, if tokens are injected.
    pub tokens: Option<TokenSource>,
    /// Client for the sidecar's own replays (bodies beyond Pingora's retry buffer, answers whose
    /// body decides expiry).
    pub replay_client: reqwest::Client,
    /// `scheme://host:port` the replay client sends to.
    pub replay_base: String,
    /// Fails fast while the upstream keeps failing.
    pub breaker: Breaker,
    /// Its request metrics, registered once.
    pub metrics: UpstreamMetrics,
}

/// Per-upstream request metrics, looked up once per (method, status) and then kept: counting a
/// request is an atomic add, not a registry lookup.
pub struct UpstreamMetrics {
    label: Arc<str>,
    requests: Box<[OnceLock<metrics::Counter>]>,
    /// `sidecar_request_duration_seconds{upstream}`.
    pub duration: metrics::Histogram,
    /// `sidecar_upstream_duration_seconds{upstream}`: per attempt that got an answer, from the
    /// moment the request head is handed to the upstream connection to the moment the answer's
    /// header has been read; Pingora's attempts (connect excluded) and the sidecar's own replays
    /// (whose client may connect first) alike.
    pub upstream_duration: metrics::Histogram,
}

/// Methods as metric labels: the standard ones, everything else `other` (no unbounded label).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
/// Status labels: `0` … `599` (0: no answer was written), then `other`.
const STATUSES: usize = 601;

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
            duration: metrics::histogram!("sidecar_request_duration_seconds", "upstream" => label.clone()),
            upstream_duration: metrics::histogram!("sidecar_upstream_duration_seconds", "upstream" => label.clone()),
            requests: (0..METHODS.len() * STATUSES)
                .map(|_| OnceLock::new())
                .collect(),
            label,
        }
    }

    /// `sidecar_requests_total{upstream,method,status}`.
    pub fn requests(&self, method: &str, status: u16) -> &metrics::Counter {
        let mi = method_index(method);
        let si = usize::from(status).min(STATUSES - 1);
        self.requests[mi * STATUSES + si].get_or_init(|| {
            metrics::counter!("sidecar_requests_total", "upstream" => self.label.clone(), "method" => METHODS[mi], "status" => status_label(si))
        })
    }
}

/// Why a config could not be put to work.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An upstream host that does not resolve, or a CA file that cannot be read.
    #[error("upstream {upstream}: {message}")]
    Upstream {
        /// Name.
        upstream: String,
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
        let mut providers = HashMap::new();
        let mut fresh = Vec::new();
        for (name, p) in &config.providers {
            let reused = previous.and_then(|prev| {
                let same = prev.config.providers.get(name) == Some(p);
                same.then(|| prev.providers.get(name).cloned()).flatten()
            });
            let source = reused.unwrap_or_else(|| {
                let s = TokenSource::new(p, handle.clone());
                fresh.push(s.clone());
                s
            });
            providers.insert(name.clone(), source);
        }
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamRt::build(u, &providers))
            .collect::<Result<Vec<_>, _>>()?;
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
    /// Counts an expired-token answer that was passed on without a replay
    /// (`sidecar_replay_skipped_total`).
    pub(crate) fn count_skipped(&self, reason: SkipReason) {
        metrics::counter!("sidecar_replay_skipped_total", "upstream" => self.config.name.clone(), "reason" => reason.as_str()).increment(1);
    }

    /// Counts a replay (`sidecar_replays_total`).
    pub(crate) fn count_replayed(&self, reason: &'static str, result: &'static str) {
        metrics::counter!("sidecar_replays_total", "upstream" => self.config.name.clone(), "reason" => reason, "result" => result).increment(1);
    }

    /// Resolves the upstream once and reads its CA file once; the Pingora peer and the replay
    /// client both use the result, so both reach the same address with the same trust.
    fn build(
        u: &Upstream,
        providers: &HashMap<String, TokenSource>,
    ) -> Result<UpstreamRt, BuildError> {
        let err = |message: String| BuildError::Upstream {
            upstream: u.name.clone(),
            message,
        };
        let addr = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(|e| err(format!("cannot resolve {}: {e}", u.host)))?
            .next()
            .ok_or_else(|| err(format!("{} resolves to no address", u.host)))?;
        let ca = match &u.ca_file {
            Some(path) => Some(load_ca(path).map_err(&err)?),
            None => None,
        };
        Ok(UpstreamRt {
            peer: peer_for(u, addr, ca.as_deref()),
            host_header: HeaderValue::from_str(&u.authority)
                .map_err(|e| err(format!("bad host: {e}")))?,
            tokens: u.provider.as_ref().and_then(|p| providers.get(p).cloned()),
            replay_client: replay_client(u, addr, ca.as_deref()).map_err(err)?,
            replay_base: replay_base(u),
            breaker: Breaker::new(u.breaker_failures, u.breaker_cooldown),
            metrics: UpstreamMetrics::new(&u.name),
            config: u.clone(),
        })
    }
}

fn peer_for(u: &Upstream, addr: SocketAddr, ca: Option<&[CertificateDer<'static>]>) -> HttpPeer {
    let sni = u.server_name.clone().unwrap_or_else(|| u.host.clone());
    let mut peer = HttpPeer::new(addr, u.tls, sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(u.connect_timeout);
    o.total_connection_timeout = Some(u.connect_timeout);
    o.read_timeout = Some(u.read_timeout);
    o.write_timeout = Some(u.read_timeout);
    o.idle_timeout = Some(u.idle_timeout);
    if u.tls {
        o.alpn = pingora::protocols::ALPN::H2H1;
        if let Some(certs) = ca {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|c| WrappedX509::new(c.as_ref().to_vec(), parse_x509))
                .collect();
            o.ca = Some(Arc::from(wrapped));
        }
    }
    peer
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

/// The replay client connects to the same address as the Pingora peer, with the same timeouts
/// and trust; it never follows redirects and never decompresses, so answers pass unchanged.
fn replay_client(
    u: &Upstream,
    addr: SocketAddr,
    ca: Option<&[CertificateDer<'static>]>,
) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(u.connect_timeout)
        .read_timeout(u.read_timeout)
        .pool_idle_timeout(u.idle_timeout)
        .resolve(replay_host(u), addr);
    if let Some(certs) = ca {
        b = b.tls_built_in_root_certs(false);
        for c in certs {
            let cert =
                reqwest::Certificate::from_der(c.as_ref()).map_err(|e| format!("ca_file: {e}"))?;
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| format!("replay client: {e}"))
}

/// The certificates of a PEM bundle, read like every file a config names: a regular file of at
/// most 4 MiB, read within a time cap.
fn load_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = sidecar_config::read_bounded(path)
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The process-wide state the proxy and admin services share.
pub struct App {
    /// The current config and everything built from it.
    pub live: ArcSwap<Live>,
    /// Where identity-provider calls and refreshers run.
    pub token_runtime: tokio::runtime::Handle,
    /// Requests being proxied now (for graceful shutdown).
    pub inflight: AtomicUsize,
    /// Wakes the shutdown wait when `inflight` drops to zero.
    pub idle: Notify,
    /// Requests waiting for a token now (bounded by `replay.max_waiting`).
    pub waiting: AtomicUsize,
    /// Upstreams that asked, with `Retry-After`, not to be sent anything until a moment.
    pub holds: UpstreamHolds,
    /// Request metrics of requests that matched no upstream (label `upstream=""`).
    pub unrouted: UpstreamMetrics,
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
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            waiting: AtomicUsize::new(0),
            holds,
            unrouted: UpstreamMetrics::new(""),
        }))
    }

    /// Re-reads the config file and swaps it in; the running config stays when the new one is
    /// invalid (logged and counted). Returns whether the new config is in force.
    pub fn reload(&self, path: &Path) -> bool {
        let result = Config::load(path)
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
        if config.listen != old.config.listen || config.admin_listen != old.config.admin_listen {
            tracing::warn!("listen addresses changed; that takes effect only after a restart");
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

    /// Counts a request as in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.clone())
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

/// Decrements the in-flight count when a request ends, however it ends.
pub struct InflightGuard(Arc<App>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
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
}
