//! The sidecar's own listening side: listen addresses and client-connection limits (SPEC §11).

use std::net::SocketAddr;

use crate::schema::RawDownstream;
use crate::Downstream;

/// A zero timeout would close every connection at once, a zero cap would refuse every client:
/// both are mistakes, not settings. On error: the key to point at, and the message.
pub(super) fn downstream(d: &RawDownstream) -> Result<Downstream, (&'static str, String)> {
    if d.header_timeout.0.is_zero() {
        return Err((
            "header_timeout",
            "downstream.header_timeout must be more than 0".into(),
        ));
    }
    if d.idle_timeout.0.is_zero() {
        return Err((
            "idle_timeout",
            "downstream.idle_timeout must be more than 0".into(),
        ));
    }
    if d.max_connections == 0 {
        return Err((
            "max_connections",
            "downstream.max_connections must be at least 1".into(),
        ));
    }
    Ok(Downstream {
        header_timeout: d.header_timeout.0,
        idle_timeout: d.idle_timeout.0,
        max_connections: d.max_connections,
    })
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("localhost:")
        .map_or_else(|| t.to_string(), |p| format!("127.0.0.1:{p}"));
    t.parse().map_err(|_| {
        format!("invalid listen address {s:?}; write it like 127.0.0.1:8080 or [::1]:8080")
    })
}
