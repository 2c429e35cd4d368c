//! Raw schema → validated [`Config`]: cross-field checks, URL parsing, header names.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use http::{HeaderName, Method};

use crate::schema::{ProviderType, RawConfig, RawProvider, RawUpstream};
use crate::{
    Config, ConfigError, Expiry, Inject, Provider, ProviderKind, RefreshPolicy, Replay, Upstream,
};

/// Builds errors that point at the first line mentioning a key or value; cross-field problems
/// have no serde location, so the text is searched instead.
struct Locator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Locator<'_> {
    fn error(&self, needles: &[&str], message: String) -> ConfigError {
        let mut from = 0;
        let mut found = None;
        for needle in needles {
            match self.text[from..].find(needle) {
                Some(i) => {
                    found = Some(from + i);
                    from += i;
                }
                None => break,
            }
        }
        match found {
            Some(offset) => {
                let before = &self.text[..offset];
                let line = before.matches('\n').count() + 1;
                let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                ConfigError::At {
                    file: self.file.to_string(),
                    line,
                    col,
                    message,
                }
            }
            None => ConfigError::Invalid {
                file: self.file.to_string(),
                message,
            },
        }
    }
}

pub(crate) fn validate(raw: RawConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let at = Locator { text, file };
    let listen = parse_addr(&raw.listen).map_err(|m| at.error(&["listen:"], m))?;
    let admin_listen =
        parse_addr(&raw.admin_listen).map_err(|m| at.error(&["admin_listen:"], m))?;

    let mut providers = BTreeMap::new();
    for (name, p) in &raw.providers {
        let provider =
            provider(name, p).map_err(|m| at.error(&["providers:", &format!("{name}:")], m))?;
        providers.insert(name.clone(), provider);
    }

    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for u in &raw.upstreams {
        let here = |m: String| at.error(&["upstreams:", &format!("name: {}", u.name)], m);
        if !names.insert(u.name.clone()) {
            return Err(here(format!("upstream name {:?} is used twice", u.name)));
        }
        if let Some(p) = &u.provider {
            if !providers.contains_key(p) {
                return Err(here(format!(
                    "upstream {:?} names provider {p:?}, which is not defined under providers",
                    u.name
                )));
            }
        }
        upstreams.push(upstream(u).map_err(here)?);
    }

    let r = &raw.replay;
    let replay_at = |m: String| at.error(&["replay:"], m);
    if r.max_attempts == 0 {
        return Err(replay_at("replay.max_attempts must be at least 1".into()));
    }
    let idempotent_methods = r
        .idempotent_methods
        .iter()
        .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| replay_at(format!("replay.idempotent_methods: {e}")))?;
    let idempotency_header = HeaderName::try_from(r.idempotency_header.as_str())
        .map_err(|e| replay_at(format!("replay.idempotency_header: {e}")))?;
    let replay = Replay {
        max_attempts: r.max_attempts,
        max_body: r.max_body.0,
        idempotent_methods,
        idempotency_header,
        wait_for_token: r.wait_for_token.0,
        max_waiting: r.max_waiting,
        debug_header: r.debug_header,
    };

    Ok(Config {
        listen,
        admin_listen,
        shutdown_grace: raw.shutdown_grace.0,
        providers,
        upstreams,
        replay,
        log: raw.log.clone(),
        source: None,
        raw,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("localhost:")
        .map_or_else(|| t.to_string(), |p| format!("127.0.0.1:{p}"));
    t.parse().map_err(|_| {
        format!("invalid listen address {s:?}; write it like 127.0.0.1:8080 or [::1]:8080")
    })
}

fn provider(name: &str, p: &RawProvider) -> Result<Provider, String> {
    let kind = match p.kind {
        ProviderType::Oauth2ClientCredentials => {
            let token_url = required(name, "token_url", p.token_url.as_ref())?;
            let parsed = url::Url::parse(token_url)
                .map_err(|e| format!("provider {name:?}: token_url {token_url:?}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!(
                    "provider {name:?}: token_url must be http:// or https://"
                ));
            }
            if p.token.is_some() {
                return Err(format!("provider {name:?}: `token` belongs to type static"));
            }
            ProviderKind::ClientCredentials {
                token_url: token_url.clone(),
                client_id: required(name, "client_id", p.client_id.as_ref())?.clone(),
                client_secret: required(name, "client_secret", p.client_secret.as_ref())?.clone(),
                client_auth: p.client_auth,
                scopes: p.scopes.clone(),
                params: p.params.clone(),
            }
        }
        ProviderType::Static => {
            for (key, set) in [
                ("token_url", p.token_url.is_some()),
                ("client_id", p.client_id.is_some()),
                ("client_secret", p.client_secret.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "provider {name:?}: `{key}` does not apply to type static"
                    ));
                }
            }
            ProviderKind::Static {
                token: required(name, "token", p.token.as_ref())?.clone(),
            }
        }
    };
    if p.refresh.backoff.is_empty() {
        return Err(format!(
            "provider {name:?}: refresh.backoff needs at least one delay"
        ));
    }
    if p.default_ttl.0.is_zero() {
        return Err(format!(
            "provider {name:?}: default_ttl must be more than 0"
        ));
    }
    Ok(Provider {
        name: name.to_string(),
        kind,
        default_ttl: p.default_ttl.0,
        refresh: RefreshPolicy {
            before_expiry: p.refresh.before_expiry.0,
            jitter: p.refresh.jitter.0,
            skew: p.refresh.skew.0,
            min_interval: p.refresh.min_interval.0,
            backoff: p.refresh.backoff.iter().map(|d| d.0).collect(),
        },
    })
}

fn required<'a, T>(provider: &str, key: &str, v: Option<&'a T>) -> Result<&'a T, String> {
    v.ok_or_else(|| format!("provider {provider:?} needs `{key}`"))
}

fn upstream(u: &RawUpstream) -> Result<Upstream, String> {
    let name = &u.name;
    let url =
        url::Url::parse(&u.url).map_err(|e| format!("upstream {name:?}: url {:?}: {e}", u.url))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!(
                "upstream {name:?}: scheme {other:?} is not http or https"
            ))
        }
    };
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err(format!(
            "upstream {name:?}: url must be scheme://host[:port][/base-path] only"
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(format!("upstream {name:?}: url has no host")),
    };
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or(&host)),
        None => url.host_str().unwrap_or(&host).to_string(),
    };
    let base_path = url.path().trim_end_matches('/').to_string();

    let path_prefix = u.matcher.path_prefix.clone().unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') {
        return Err(format!(
            "upstream {name:?}: match.path_prefix must start with /"
        ));
    }
    let header = match &u.inject.header {
        Some(h) => Some(
            HeaderName::try_from(h.as_str())
                .map_err(|e| format!("upstream {name:?}: inject.header {h:?}: {e}"))?,
        ),
        None => None,
    };
    if header.is_none() && u.inject.query.is_none() {
        return Err(format!(
            "upstream {name:?}: inject needs a header, a query parameter, or both"
        ));
    }
    for s in u.expiry.statuses.iter().chain(&u.expiry.body_statuses) {
        if !(100..=599).contains(s) {
            return Err(format!("upstream {name:?}: {s} is not an HTTP status"));
        }
    }
    Ok(Upstream {
        name: name.clone(),
        tls,
        host,
        port,
        authority,
        base_path,
        provider: u.provider.clone(),
        path_prefix: path_prefix.trim_end_matches('/').to_string(),
        match_host: u.matcher.host.as_ref().map(|h| h.to_ascii_lowercase()),
        strip_prefix: u.matcher.strip_prefix,
        inject: Inject {
            header,
            scheme: u.inject.scheme.clone(),
            query: u.inject.query.clone(),
        },
        client_authorization: u.client_authorization,
        replay: u.replay,
        connect_timeout: u.timeouts.connect.0,
        read_timeout: u.timeouts.read.0,
        idle_timeout: u.timeouts.idle.0,
        ca_file: u.tls.ca_file.as_ref().map(PathBuf::from),
        server_name: u.tls.server_name.clone(),
        expiry: Expiry {
            statuses: u.expiry.statuses.clone(),
            body_patterns: u
                .expiry
                .body_patterns
                .iter()
                .map(|p| p.to_lowercase())
                .collect(),
            body_statuses: u.expiry.body_statuses.clone(),
        },
    })
}
