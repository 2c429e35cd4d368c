//! Upstream addresses that follow DNS: each upstream host name is looked up in the background
//! (hickory-resolver, on the token runtime) again and again per the record's TTL clamped to
//! `dns.min_ttl`/`dns.max_ttl`; every A/AAAA address of the answer is used. A failed lookup, or
//! an answer without addresses, keeps the last good addresses. The Pingora path and the
//! sidecar's own replay both take their addresses from the same [`Addresses`].
//!
//! The decisions (TTL clamping, keep or replace, when to warn) are in [`follow`].

mod follow;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use sidecar_config::Dns;
use tokio::task::AbortHandle;

pub(crate) use follow::{address_index, try_next_address};
use follow::{Follow, Lookup};

/// How long one lookup may take in all (the resolver's own per-server timeout is shorter).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Registers the help text of the DNS metrics (once per process).
fn describe() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        metrics::describe_counter!(
            "sidecar_dns_failures_total",
            "Lookups of an upstream's host name that failed or returned no address; the last good addresses stay in use"
        );
    });
}

/// The addresses an upstream is reached at now. For an IP-literal URL that is fixed; for a
/// host name a background task keeps it current and stops when this is dropped.
pub struct Addresses {
    current: ArcSwap<Vec<SocketAddr>>,
    /// Round robin over the addresses: new connections are spread across them.
    next: AtomicUsize,
    /// The first lookup has come back (with addresses or not).
    looked: AtomicBool,
    task: OnceLock<AbortHandle>,
}

impl Drop for Addresses {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.current.load().iter()).finish()
    }
}

impl Addresses {
    fn with(addrs: Vec<SocketAddr>) -> Addresses {
        Addresses {
            current: ArcSwap::from_pointee(addrs),
            next: AtomicUsize::new(0),
            looked: AtomicBool::new(false),
            task: OnceLock::new(),
        }
    }

    /// An upstream at a fixed address (an IP literal in its URL): no lookups.
    pub fn fixed(addr: SocketAddr) -> Arc<Addresses> {
        Arc::new(Addresses::with(vec![addr]))
    }

    /// The addresses now, and where this request starts among them (the next in the round).
    /// Empty while the name has never resolved.
    pub fn pick(&self) -> (Arc<Vec<SocketAddr>>, usize) {
        let addrs = self.current.load_full();
        // One address has no round to take a turn in: no write to a line every request reads.
        let start = match addrs.len() {
            0 | 1 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed),
        };
        (addrs, start)
    }

    /// The addresses now.
    pub fn now(&self) -> Arc<Vec<SocketAddr>> {
        self.current.load_full()
    }
}

/// What an upstream's addresses come from: its URL host and port, and how names resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Upstream name (the metric label).
    pub(crate) upstream: String,
    /// URL host: a name, or an IP literal.
    pub(crate) host: String,
    /// Port.
    pub(crate) port: u16,
    /// `dns:` settings.
    pub(crate) dns: Dns,
}

/// The resolver of one config's `dns:` settings, shared by its upstreams; made only when some
/// upstream has a host name.
pub(crate) struct Resolvers {
    dns: Dns,
    handle: tokio::runtime::Handle,
    resolver: OnceLock<Option<Arc<TokioResolver>>>,
}

impl Resolvers {
    /// Lookups of names under `dns` run on `handle`.
    pub(crate) fn new(dns: &Dns, handle: tokio::runtime::Handle) -> Resolvers {
        describe();
        Resolvers {
            dns: dns.clone(),
            handle,
            resolver: OnceLock::new(),
        }
    }

    fn resolver(&self) -> Option<Arc<TokioResolver>> {
        self.resolver
            .get_or_init(|| match build_resolver(&self.dns) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up DNS resolution; upstream host names will not resolve");
                    None
                }
            })
            .clone()
    }

    /// The addresses of `target`. A name starts with `seed` (the addresses a previous config
    /// found for it, so a reload leaves no gap) or none, and is followed in the background.
    pub(crate) fn follow(&self, target: &Target, seed: Option<Vec<SocketAddr>>) -> Arc<Addresses> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Addresses::fixed(SocketAddr::new(ip, target.port));
        }
        let addresses = Arc::new(Addresses::with(seed.unwrap_or_default()));
        let task = self.handle.spawn(lookups(
            Arc::downgrade(&addresses),
            self.resolver(),
            target.clone(),
        ));
        let _ = addresses.task.set(task.abort_handle());
        addresses
    }
}

/// The system's resolver configuration (`/etc/resolv.conf`), or the configured nameservers
/// (UDP, and TCP for truncated answers). Every A and AAAA address is asked for.
fn build_resolver(dns: &Dns) -> Result<TokioResolver, String> {
    let mut builder = if dns.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system resolver configuration: {e}"))?
    } else {
        let mut group = NameServerConfigGroup::with_capacity(dns.nameservers.len() * 2);
        for addr in &dns.nameservers {
            group.push(NameServerConfig::new(*addr, Protocol::Udp));
            group.push(NameServerConfig::new(*addr, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            TokioConnectionProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    // The cache must not hold an answer longer than the schedule would look again.
    opts.positive_max_ttl = Some(dns.max_ttl);
    opts.negative_max_ttl = Some(dns.min_ttl);
    Ok(builder.build())
}

/// Looks `target` up until `addresses` is dropped, per the decisions of [`Follow`].
async fn lookups(addresses: Weak<Addresses>, resolver: Option<Arc<TokioResolver>>, target: Target) {
    let failures =
        metrics::counter!("sidecar_dns_failures_total", "upstream" => target.upstream.clone());
    let mut follow = Follow::default();
    loop {
        let (lookup, error) = match &resolver {
            None => (Lookup::Failed, "no resolver".to_string()),
            Some(r) => lookup(r, &target).await,
        };
        let Some(addrs) = addresses.upgrade() else {
            return;
        };
        let step = follow.after(
            &addrs.current.load(),
            lookup,
            target.dns.min_ttl,
            target.dns.max_ttl,
        );
        if step.failure {
            failures.increment(1);
        }
        if step.warn {
            tracing::warn!(
                upstream = %target.upstream,
                host = %target.host,
                error = %error,
                addresses = ?addrs,
                retry_in = ?step.next,
                "DNS lookup of an upstream failed; keeping its last addresses (further failures are only counted)"
            );
        }
        if step.recovered {
            tracing::info!(upstream = %target.upstream, host = %target.host, "DNS lookups of the upstream work again");
        }
        if let Some(new) = step.replace {
            tracing::info!(upstream = %target.upstream, host = %target.host, addresses = ?new, "upstream addresses changed");
            addrs.current.store(Arc::new(new));
        }
        addrs.looked.store(true, Ordering::Release);
        drop(addrs);
        tokio::time::sleep(step.next).await;
    }
}

/// One lookup: the addresses with the port, and the record's remaining TTL; or why it failed.
async fn lookup(resolver: &TokioResolver, target: &Target) -> (Lookup, String) {
    match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(target.host.as_str())).await {
        Ok(Ok(answer)) => {
            let ttl = answer
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let addrs = answer
                .iter()
                .map(|ip| SocketAddr::new(ip, target.port))
                .collect();
            (
                Lookup::Answer(addrs, ttl),
                "no address in the answer".into(),
            )
        }
        Ok(Err(e)) => (Lookup::Failed, e.to_string()),
        Err(_) => (Lookup::Failed, "lookup timed out".into()),
    }
}

/// The replay client's resolver: the same addresses as the Pingora path, starting at the next
/// one in the round (the client tries the others when a connect fails).
#[derive(Clone)]
pub(crate) struct ReplayResolver(pub(crate) Arc<Addresses>);

impl reqwest::dns::Resolve for ReplayResolver {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (set, start) = self.0.pick();
        Box::pin(async move {
            if set.is_empty() {
                return Err("the upstream's host name has not resolved yet".into());
            }
            let n = set.len();
            let ordered: Vec<SocketAddr> = (0..n).map(|i| set[(start + i) % n]).collect();
            Ok(Box::new(ordered.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Waits (at most `limit`) until the first lookup of every name in `addresses` came back, so
/// that the first requests after start find addresses; a name that does not resolve is not an
/// error (its requests get 502 `upstream_unreachable` until it does). Polls: it runs once, at
/// start, outside any runtime.
pub(crate) fn wait_first(addresses: &[Arc<Addresses>], limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    let pending = |a: &Arc<Addresses>| a.task.get().is_some() && !a.looked.load(Ordering::Acquire);
    while addresses.iter().any(pending) {
        if std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
