//! Token lifetimes read from an answer's JSON: a relative `expires_in` or an absolute
//! `expires_at`, bounded by [`MAX_DURATION`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sidecar_config::MAX_DURATION;

use super::ProviderError;

/// A relative lifetime (`expires_in`) from a JSON number or numeric string. `Ok(None)` when it
/// says nothing usable (not a number, NaN, zero or negative): the lifetime then comes from the
/// JWT or `default_ttl`. More than [`MAX_DURATION`] (infinity included) is an unusable answer.
pub(crate) fn seconds(
    v: &serde_json::Value,
    what: &str,
) -> Result<Option<Duration>, ProviderError> {
    let Some(secs) = number(v) else {
        return Ok(None);
    };
    if secs.is_nan() || secs <= 0.0 {
        return Ok(None);
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(too_far(what));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Time left until an absolute expiry (`expires_at`) given as Unix seconds (milliseconds when
/// implausibly large) or an RFC 3339 string. `Ok(None)` when unreadable, zero or negative;
/// zero when already past; an unusable answer when more than [`MAX_DURATION`] away.
pub(crate) fn until(v: &serde_json::Value, what: &str) -> Result<Option<Duration>, ProviderError> {
    let now = SystemTime::now();
    let latest = now.checked_add(MAX_DURATION).unwrap_or(now);
    let at = match number(v) {
        Some(mut secs) => {
            if secs.is_nan() || secs <= 0.0 {
                return Ok(None);
            }
            if secs > 1e11 {
                secs /= 1000.0;
            }
            let latest_secs = latest
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            if secs > latest_secs {
                return Err(too_far(what));
            }
            UNIX_EPOCH + Duration::from_secs_f64(secs)
        }
        None => match v.as_str().map(|s| humantime::parse_rfc3339_weak(s.trim())) {
            Some(Ok(at)) => at,
            _ => return Ok(None),
        },
    };
    if at > latest {
        return Err(too_far(what));
    }
    Ok(Some(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// A JSON number, or a string holding one.
fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

fn too_far(what: &str) -> ProviderError {
    ProviderError::Malformed(format!("{what} is more than 100 years away"))
}
