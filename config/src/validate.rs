//! Raw schema → validated [`Config`]: cross-field checks, URL parsing, header names. One file
//! per section; this one assembles the [`Config`] and points errors at their place in the file.

mod downstream;
mod locate;
mod providers;
mod rate_limits;
mod upstreams;
pub(crate) mod urls;

use std::collections::{BTreeMap, HashSet};

use http::{HeaderName, Method};

use self::downstream::{downstream, parse_addr, threads};
use self::locate::Locator;
use self::providers::provider;
use self::rate_limits::rate_limit;
use self::upstreams::{upstream, ERROR_STATUSES};
use crate::schema::RawConfig;
use crate::{Config, ConfigError, Log, Provider, Replay, Retry};

pub(crate) fn validate(raw: RawConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let at = Locator { text, file };
    let listen = parse_addr(&raw.listen).map_err(|m| at.error(&["listen:"], m))?;
    let admin_listen =
        parse_addr(&raw.admin_listen).map_err(|m| at.error(&["admin_listen:"], m))?;
    let threads = threads(raw.threads).map_err(|m| at.error(&["threads:"], m))?;

    let mut providers = BTreeMap::new();
    for (name, p) in &raw.providers {
        let provider =
            provider(name, p).map_err(|m| at.error(&["providers:", &format!("{name}:")], m))?;
        if let Some(store) = &provider.store {
            let shared = providers
                .values()
                .find(|o: &&Provider| o.store.as_ref().is_some_and(|s| s.path == store.path));
            if let Some(other) = shared {
                return Err(at.error(
                    &["providers:", &format!("{name}:"), "store:"],
                    format!(
                        "provider {name:?}: store.path is also the store of provider {:?}; each provider needs its own file",
                        other.name
                    ),
                ));
            }
        }
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

    if let Some(s) = raw
        .retry
        .statuses
        .iter()
        .find(|s| !ERROR_STATUSES.contains(s))
    {
        return Err(at.error(
            &["retry:", "statuses:"],
            format!("retry.statuses: {s} is not an error status (400-599)"),
        ));
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

    let mut rule_names = HashSet::new();
    let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
    for l in &raw.rate_limits {
        let here = |m: String| at.error(&["rate_limits:", &format!("name: {}", l.name)], m);
        if !rule_names.insert(l.name.as_str()) {
            return Err(here(format!("rate limit name {:?} is used twice", l.name)));
        }
        if !names.contains(&l.upstream) {
            return Err(here(format!(
                "rate limit {:?} names upstream {:?}, which is not defined under upstreams",
                l.name, l.upstream
            )));
        }
        let rate = crate::parse_rate(&l.rate).map_err(|m| {
            at.error(
                &["rate_limits:", &format!("name: {}", l.name), "rate:"],
                format!("rate limit {:?}: {m}", l.name),
            )
        })?;
        rate_limits.push(rate_limit(l, rate).map_err(here)?);
    }

    let downstream =
        downstream(&raw.downstream).map_err(|(key, m)| at.error(&["downstream:", key], m))?;

    Ok(Config {
        listen,
        admin_listen,
        shutdown_grace: raw.shutdown_grace.0,
        threads,
        providers,
        upstreams,
        replay,
        rate_limits,
        downstream,
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
        source: None,
        raw,
    })
}

#[cfg(test)]
mod tests;
