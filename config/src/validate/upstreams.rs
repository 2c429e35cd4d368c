//! Upstream routes: URL, match, injection, expiry statuses.

use std::time::Duration;

use http::HeaderName;

use super::urls::{shown_url, NO_URL_CREDENTIALS};
use super::{bad, Bad};
use crate::schema::{RawUpstream, UpstreamProtocol};
use crate::{Expiry, Inject, Upstream};

/// Statuses an expired-token answer or a transient failure can have: only errors, so that the
/// proxy can pass every success and redirect on without looking further.
pub(super) const ERROR_STATUSES: std::ops::RangeInclusive<u16> = 400..=599;

/// `min_ttl`: the top-level `upgrade.min_ttl`, which the upstream's own `upgrade:` overrides.
pub(super) fn upstream(u: &RawUpstream, min_ttl: Duration) -> Result<Upstream, Bad> {
    let name = &u.name;
    let url = url::Url::parse(&u.url).map_err(|e| {
        bad(
            "url",
            format!("upstream {name:?}: url {:?}: {e}", shown_url(&u.url)),
        )
    })?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(bad(
                "url",
                format!("upstream {name:?}: scheme {other:?} is not http or https"),
            ))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "url",
            format!("upstream {name:?}: url {NO_URL_CREDENTIALS}"),
        ));
    }
    if url.query().is_some() {
        return Err(bad(
            "url",
            format!("upstream {name:?}: url must be scheme://host[:port][/base-path] only"),
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(bad("url", format!("upstream {name:?}: url has no host"))),
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
        return Err(bad(
            "match.path_prefix",
            format!("upstream {name:?}: match.path_prefix must start with /"),
        ));
    }
    let header = match &u.inject.header {
        Some(h) => Some(HeaderName::try_from(h.as_str()).map_err(|e| {
            bad(
                "inject.header",
                format!("upstream {name:?}: inject.header {h:?}: {e}"),
            )
        })?),
        None => None,
    };
    if header.is_none() && u.inject.query.is_none() {
        return Err(bad(
            "inject",
            format!("upstream {name:?}: inject needs a header, a query parameter, or both"),
        ));
    }
    if tls && u.protocol == UpstreamProtocol::H2c {
        return Err(bad(
            "protocol",
            format!(
                "upstream {name:?}: protocol h2c is HTTP/2 over plain TCP and needs an http:// url; over https, protocol auto negotiates HTTP/2 by ALPN"
            ),
        ));
    }
    for (key, list) in [
        ("statuses", &u.expiry.statuses),
        ("body_statuses", &u.expiry.body_statuses),
    ] {
        if let Some(i) = list.iter().position(|s| !ERROR_STATUSES.contains(s)) {
            return Err(bad(
                &format!("expiry.{key}[{i}]"),
                format!(
                    "upstream {name:?}: expiry status {} is not an error status (400-599)",
                    list[i]
                ),
            ));
        }
    }
    if u.timeouts.stream_idle.0.is_zero() {
        return Err(bad(
            "timeouts.stream_idle",
            format!("upstream {name:?}: timeouts.stream_idle must be more than 0"),
        ));
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
        stream_idle_timeout: u.timeouts.stream_idle.0,
        upgrade_min_ttl: u.upgrade.as_ref().map_or(min_ttl, |g| g.min_ttl.0),
        // Read by the caller, which can point at the failing key.
        tls_config: crate::Tls::default(),
        server_name: u.tls.server_name.clone(),
        protocol: u.protocol,
        breaker_failures: u.circuit_breaker.failures,
        breaker_cooldown: u.circuit_breaker.cooldown.0,
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
