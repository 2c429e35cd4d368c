//! Raw schema → validated [`Config`]: cross-field checks, URL parsing, header names. One file
//! per section; this one assembles the [`Config`] and points errors at their place in the file.

mod dns;
mod downstream;
mod locate;
mod providers;
mod rate_limits;
mod shared;
mod upstreams;
pub(crate) mod urls;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use http::{HeaderName, Method};

use self::dns::dns;
use self::downstream::{downstream, parse_addr, parse_listen, threads};
use self::locate::{KeyPath, Locator};
use self::providers::provider;
use self::rate_limits::rate_limit;
use self::upstreams::{upstream, ERROR_STATUSES};
use crate::schema::RawConfig;
use crate::tls::{self, TlsPaths};
use crate::{
    Config, ConfigError, Listen, Log, Provider, ProviderCheck, ProviderKind, Replay, Retry, Warning,
};

/// A problem found in one section: the key it is about, as a path under the section (`url`,
/// `timeouts.read`, `expiry.statuses[1]`; empty: the section itself), and the message.
pub(super) struct Bad {
    pub(super) at: String,
    pub(super) message: String,
}

impl From<String> for Bad {
    fn from(message: String) -> Bad {
        Bad {
            at: String::new(),
            message,
        }
    }
}

impl From<&str> for Bad {
    fn from(message: &str) -> Bad {
        Bad::from(message.to_string())
    }
}

pub(super) fn bad(at: &str, message: String) -> Bad {
    Bad {
        at: at.to_string(),
        message,
    }
}

/// The shortest admin token taken: a guessable token would open the POST endpoints to anyone
/// who can reach the admin listener.
pub(crate) const MIN_ADMIN_TOKEN: usize = 16;

pub(crate) fn validate(
    raw: RawConfig,
    text: &str,
    file: &str,
    check: Option<ProviderCheck>,
) -> Result<Config, ConfigError> {
    let at = Locator { text, file };
    let top = KeyPath::top;
    let listen = parse_listen(&raw.listen).map_err(|m| at.error(&top("listen"), m))?;
    let admin_listen =
        parse_addr(&raw.admin_listen).map_err(|m| at.error(&top("admin_listen"), m))?;
    let probe_listen = match &raw.probe_listen {
        None => None,
        Some(p) => {
            let addr = parse_addr(p).map_err(|m| at.error(&top("probe_listen"), m))?;
            if addr == admin_listen || listen == Listen::Tcp(addr) {
                return Err(at.error(
                    &top("probe_listen"),
                    format!("probe_listen {addr} is also listen or admin_listen; give it an address of its own"),
                ));
            }
            Some(addr)
        }
    };
    if listen == Listen::Tcp(admin_listen) {
        return Err(at.error(
            &top("admin_listen"),
            format!("admin_listen {admin_listen} is also listen; give it an address of its own"),
        ));
    }
    let admin_token = raw.admin.token.clone();
    if let Some(t) = &admin_token {
        if t.expose().len() < MIN_ADMIN_TOKEN || t.expose().trim() != t.expose() {
            return Err(at.error(
                &top("admin").key("token"),
                format!(
                    "admin.token must be at least {MIN_ADMIN_TOKEN} characters without surrounding \
                     spaces (make one with `token-sidecar keygen`)"
                ),
            ));
        }
    }
    log_level(&raw.log.level).map_err(|m| at.error(&top("log").key("level"), m))?;

    let shared = match &raw.shared {
        None => None,
        Some(s) => Some(
            shared::shared(s)
                .map_err(|(key, m)| at.error(&top("shared").key("redis").key(key), m))?,
        ),
    };
    let threads = threads(raw.threads).map_err(|m| at.error(&top("threads"), m))?;

    let mut providers = BTreeMap::new();
    for (name, p) in &raw.providers {
        let here = top("providers").key(name);
        let mut provider = provider(name, p).map_err(|b| at.error(&here.then(&b.at), b.message))?;
        if let Some(t) = &p.tls {
            let paths = TlsPaths {
                ca_file: t.ca_file.as_deref(),
                client_cert: t.client_cert.as_deref(),
                client_key: t.client_key.as_deref(),
            };
            provider.tls_config = tls::load(paths).map_err(|(key, m)| {
                at.error(&here.key("tls").key(key), format!("provider {name:?}: {m}"))
            })?;
        }
        provider.shared = shared::provider_shared(&raw, shared.as_ref(), &provider)
            .map_err(|m| at.error(&here.key("shared"), m))?;
        if let Some(store) = &provider.store {
            let shared = providers
                .values()
                .find(|o: &&Provider| o.store.as_ref().is_some_and(|s| s.path == store.path));
            if let Some(other) = shared {
                return Err(at.error(
                    &here.then("store.path"),
                    format!(
                        "provider {name:?}: store.path is also the store of provider {:?}; each provider needs its own file",
                        other.name
                    ),
                ));
            }
            store_directory(&store.path).map_err(|m| {
                at.error(&here.then("store.path"), format!("provider {name:?}: {m}"))
            })?;
        }
        if let Some(check) = check {
            check(&provider).map_err(|(key, m)| at.error(&here.then(&key), m))?;
        }
        providers.insert(name.clone(), provider);
    }

    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for (i, u) in raw.upstreams.iter().enumerate() {
        let here = top("upstreams").index(i);
        if !names.insert(u.name.clone()) {
            return Err(at.error(
                &here.key("name"),
                format!("upstream name {:?} is used twice", u.name),
            ));
        }
        if let Some(p) = &u.provider {
            if !providers.contains_key(p) {
                return Err(at.error(
                    &here.key("provider"),
                    format!(
                        "upstream {:?} names provider {p:?}, which is not defined under providers",
                        u.name
                    ),
                ));
            }
        }
        let mut parsed = upstream(u, raw.upgrade.min_ttl.0)
            .map_err(|b| at.error(&here.then(&b.at), b.message))?;
        let paths = TlsPaths {
            ca_file: u.tls.ca_file.as_deref(),
            client_cert: u.tls.client_cert.as_deref(),
            client_key: u.tls.client_key.as_deref(),
        };
        parsed.tls_config = tls::load(paths).map_err(|(key, m)| {
            at.error(
                &here.key("tls").key(key),
                format!("upstream {:?}: {m}", u.name),
            )
        })?;
        upstreams.push(parsed);
    }

    if let Some(i) = raw
        .retry
        .statuses
        .iter()
        .position(|s| !ERROR_STATUSES.contains(s))
    {
        return Err(at.error(
            &top("retry").key("statuses").index(i),
            format!(
                "retry.statuses: {} is not an error status (400-599)",
                raw.retry.statuses[i]
            ),
        ));
    }

    let r = &raw.replay;
    let replay_at = |key: &str, m: String| at.error(&top("replay").key(key), m);
    if r.max_attempts == 0 {
        return Err(replay_at(
            "max_attempts",
            "replay.max_attempts must be at least 1".into(),
        ));
    }
    let idempotent_methods = r
        .idempotent_methods
        .iter()
        .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            replay_at(
                "idempotent_methods",
                format!("replay.idempotent_methods: {e}"),
            )
        })?;
    let idempotency_header = HeaderName::try_from(r.idempotency_header.as_str()).map_err(|e| {
        replay_at(
            "idempotency_header",
            format!("replay.idempotency_header: {e}"),
        )
    })?;
    let replay = Replay {
        max_attempts: r.max_attempts,
        max_body: r.max_body.0,
        idempotent_methods,
        idempotency_header,
        wait_for_token: r.wait_for_token.0,
        max_waiting: r.max_waiting,
        debug_header: r.debug_header,
    };

    let mut rule_names = HashSet::new();
    let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
    for (i, l) in raw.rate_limits.iter().enumerate() {
        let here = top("rate_limits").index(i);
        if !rule_names.insert(l.name.as_str()) {
            return Err(at.error(
                &here.key("name"),
                format!("rate limit name {:?} is used twice", l.name),
            ));
        }
        if !names.contains(&l.upstream) {
            return Err(at.error(
                &here.key("upstream"),
                format!(
                    "rate limit {:?} names upstream {:?}, which is not defined under upstreams",
                    l.name, l.upstream
                ),
            ));
        }
        let rate = crate::parse_rate(&l.rate)
            .map_err(|m| at.error(&here.key("rate"), format!("rate limit {:?}: {m}", l.name)))?;
        let mut rule = rate_limit(l, rate).map_err(|b| at.error(&here.then(&b.at), b.message))?;
        rule.shared = shared::rate_limit_shared(l.shared, shared.as_ref(), &rule)
            .map_err(|m| at.error(&here.key("shared"), m))?;
        rate_limits.push(rule);
    }

    let downstream =
        downstream(&raw.downstream).map_err(|(key, m)| at.error(&top("downstream").key(key), m))?;
    let dns = dns(&raw.dns).map_err(|(key, m)| at.error(&top("dns").key(key), m))?;
    if raw.max_streams == 0 {
        return Err(at.error(&top("max_streams"), "max_streams must be at least 1".into()));
    }

    let warnings = warnings(&at, &raw, &providers, &upstreams, admin_listen);

    Ok(Config {
        listen,
        admin_listen,
        probe_listen,
        admin_token,
        shutdown_grace: raw.shutdown_grace.0,
        shutdown_delay: raw.shutdown_delay.0,
        warnings,
        threads,
        providers,
        upstreams,
        replay,
        rate_limits,
        downstream,
        dns,
        max_streams: raw.max_streams,
        retry: Retry {
            statuses: raw.retry.statuses.clone(),
            backoff: raw.retry.backoff.iter().map(|d| d.0).collect(),
            respect_retry_after: raw.retry.respect_retry_after,
            max_retry_after: raw.retry.max_retry_after.0,
        },
        log: Log {
            level: raw.log.level.clone(),
            format: raw.log.format,
            access_log: raw.log.access_log,
        },
        shared,
        source: None,
        raw,
    })
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log level the logger understands: a level, or comma-separated `target=level` directives
/// (with at most one bare level). A bare word that is no level (`verbose`) would be read as a
/// target name and switch every other log line off, errors included.
pub(crate) fn log_level(level: &str) -> Result<(), String> {
    let hint = "use error, warn, info, debug or trace (or off), optionally with target=level \
                directives such as \"info,token_sidecar=debug\"";
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!("log.level is empty; {hint}"));
    }
    for d in directives {
        let ok = match d.rsplit_once('=') {
            Some((target, lvl)) => {
                !target.trim().is_empty()
                    && LEVELS.contains(&lvl.trim().to_ascii_lowercase().as_str())
            }
            None => LEVELS.contains(&d.to_ascii_lowercase().as_str()),
        };
        if !ok {
            let shown: String = d.chars().take(64).collect();
            return Err(format!("log.level: {shown:?} is not a log level; {hint}"));
        }
    }
    Ok(())
}

/// The token store's directory must exist: the sidecar creates the file, never directories, and
/// without it every new token would fail to be stored.
fn store_directory(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("store.path: {} is not a directory", dir.display())),
        Err(e) => Err(format!(
            "store.path: directory {} cannot be used ({e}); create it, or put the store elsewhere",
            dir.display()
        )),
    }
}

fn loopback_host(url: &str) -> bool {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// What is allowed but probably a mistake.
fn warnings(
    at: &Locator<'_>,
    raw: &RawConfig,
    providers: &BTreeMap<String, Provider>,
    upstreams: &[crate::Upstream],
    admin_listen: SocketAddr,
) -> Vec<Warning> {
    let mut out = Vec::new();
    let top = KeyPath::top;
    for (name, p) in providers {
        let here = top("providers").key(name);
        let urls: Vec<(&str, &str)> = match &p.kind {
            ProviderKind::ClientCredentials { client, .. }
            | ProviderKind::RefreshToken { client, .. }
            | ProviderKind::Password { client, .. } => vec![("token_url", &client.token_url)],
            ProviderKind::JsonLogin { login, renew } => {
                let mut v = vec![("login.url", login.url.as_str())];
                if let Some(r) = renew {
                    v.push(("renew.url", r.url.as_str()));
                }
                v
            }
            _ => Vec::new(),
        };
        for (key, url) in urls {
            if url
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
                && !loopback_host(url)
            {
                out.push(at.warning(
                    &here.then(key),
                    format!(
                        "provider {name:?}: {key} is plain http to another host: credentials and \
                         tokens cross the network unencrypted; use https"
                    ),
                ));
            }
        }
        if !upstreams
            .iter()
            .any(|u| u.provider.as_deref() == Some(name.as_str()))
        {
            out.push(at.warning(
                &here,
                format!(
                    "provider {name:?} is used by no upstream: it logs in and refreshes for nothing"
                ),
            ));
        }
    }
    let mut catch_all: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for (i, u) in upstreams.iter().enumerate() {
        if !u.path_prefix.is_empty() {
            continue;
        }
        if let Some(first) = catch_all.insert(u.match_host.as_deref(), i) {
            out.push(at.warning(
                &top("upstreams").index(i).key("name"),
                format!(
                    "upstreams {:?} and {:?} both take every path{}: {:?} never gets a request",
                    upstreams[first].name,
                    u.name,
                    u.match_host
                        .as_deref()
                        .map(|h| format!(" of host {h}"))
                        .unwrap_or_default(),
                    u.name
                ),
            ));
            catch_all.insert(u.match_host.as_deref(), first);
        }
    }
    if !admin_listen.ip().is_loopback() && raw.admin.token.is_none() {
        out.push(at.warning(
            &top("admin_listen"),
            format!(
                "admin_listen {admin_listen} is not loopback and admin.token is not set: the POST \
                 endpoints (reload, token refresh) answer 403 to every client off loopback; for \
                 probes and Prometheus use probe_listen"
            ),
        ));
    }
    out
}

#[cfg(test)]
mod network_tests;
#[cfg(test)]
mod streams_tests;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod located_tests;
