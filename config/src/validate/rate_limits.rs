//! Client-side rate limits: matchers, burst, keys.

use std::time::Duration;

use http::{HeaderName, Method};

use super::{bad, Bad};
use crate::schema::RawRateLimit;

pub(super) fn rate_limit(l: &RawRateLimit, rate: crate::Rate) -> Result<crate::RateLimit, Bad> {
    let name = &l.name;
    if name.is_empty() {
        return Err(bad("name", "a rate limit needs a non-empty name".into()));
    }
    let methods = l
        .matcher
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|e| {
                bad(
                    "match.methods",
                    format!("rate limit {name:?}: method {m:?}: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = match &l.matcher.path {
        Some(p) if !p.starts_with('/') => {
            return Err(bad(
                "match.path",
                format!("rate limit {name:?}: match.path {p:?} must start with /"),
            ))
        }
        Some(p) => Some(
            globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    bad(
                        "match.path",
                        format!("rate limit {name:?}: match.path {p:?}: {e}"),
                    )
                })?,
        ),
        None => None,
    };
    let burst = l.burst.unwrap_or(rate.count);
    if burst == 0 {
        return Err(bad(
            "burst",
            format!("rate limit {name:?}: burst must be at least 1"),
        ));
    }
    // The burst window ((burst - 1) emission intervals) must fit governor's nanosecond clock.
    let window = rate.per.as_nanos() / u128::from(rate.count) * u128::from(burst);
    if window > Duration::from_secs(10 * 365 * 24 * 3600).as_nanos() {
        return Err(bad(
            "rate",
            format!(
                "rate limit {name:?}: rate {:?} with burst {burst} spans more than 10 years",
                l.rate
            ),
        ));
    }
    if rate.per.as_nanos() < u128::from(rate.count) {
        return Err(bad(
            "rate",
            format!(
                "rate limit {name:?}: rate {:?} is finer than one request per nanosecond",
                l.rate
            ),
        ));
    }
    let key = match &l.key {
        None => None,
        Some(k) => match (k.client_ip, &k.header) {
            (true, None) => Some(crate::RateKey::ClientIp),
            (false, Some(h)) => Some(crate::RateKey::Header(
                HeaderName::try_from(h.as_str()).map_err(|e| {
                    bad(
                        "key.header",
                        format!("rate limit {name:?}: key.header {h:?}: {e}"),
                    )
                })?,
            )),
            _ => {
                return Err(bad(
                    "key",
                    format!(
                    "rate limit {name:?}: key needs exactly one of client_ip: true or header: NAME"
                ),
                ))
            }
        },
    };
    if l.max_keys == 0 {
        return Err(bad(
            "max_keys",
            format!("rate limit {name:?}: max_keys must be at least 1"),
        ));
    }
    Ok(crate::RateLimit {
        name: name.clone(),
        upstream: l.upstream.clone(),
        methods,
        path,
        rate,
        burst,
        mode: l.mode,
        max_wait: l.max_wait.0,
        key,
        max_keys: l.max_keys,
        // Decided with the whole config in view (`shared:` is a top-level section).
        shared: false,
    })
}
