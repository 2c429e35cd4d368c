//! The sidecar's own listening side: listen addresses and client-connection limits.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::schema::{RawDownstream, Threads, MAX_THREADS};
use crate::{Downstream, Listen};

/// Longest Unix socket path: `sun_path` holds 108 bytes on Linux, the last one a NUL.
pub(crate) const MAX_UNIX_PATH: usize = 107;

/// The largest `downstream.read_buffer`.
const MAX_READ_BUFFER: usize = 1 << 20;

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
    // Every client connection holds this much: a large value multiplies by the connections.
    let read_buffer = usize::try_from(d.read_buffer.0)
        .ok()
        .filter(|n| *n <= MAX_READ_BUFFER)
        .ok_or((
            "read_buffer",
            "downstream.read_buffer must be at most 1MiB (0 turns it off)".into(),
        ))?;
    Ok(Downstream {
        header_timeout: d.header_timeout.0,
        idle_timeout: d.idle_timeout.0,
        max_connections: d.max_connections,
        read_buffer,
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

/// `listen`: a TCP address, or `unix:` and an absolute socket path that fits in `sun_path`.
pub(super) fn parse_listen(s: &str) -> Result<Listen, String> {
    let Some(path) = s.trim().strip_prefix("unix:") else {
        return parse_addr(s).map(Listen::Tcp);
    };
    if !path.starts_with('/') {
        return Err(format!(
            "listen {s:?}: a Unix socket path must be absolute, like unix:/run/token-sidecar/sock"
        ));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(format!(
            "listen {s:?}: a Unix socket path is at most {MAX_UNIX_PATH} bytes; this one has {}",
            path.len()
        ));
    }
    if path.ends_with('/') || path.contains('\0') {
        return Err(format!("listen {s:?}: not a socket file path"));
    }
    Ok(Listen::Unix(PathBuf::from(path)))
}

/// `threads:` resolved: a count within 1..=[`MAX_THREADS`], `auto` the cores this process may
/// run on (1 if that cannot be told).
pub(super) fn threads(t: Threads) -> Result<usize, String> {
    match t {
        Threads::Auto => Ok(std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(MAX_THREADS as usize)),
        Threads::Count(n) if (1..=MAX_THREADS).contains(&n) => Ok(n as usize),
        Threads::Count(n) => Err(format!(
            "threads must be between 1 and {MAX_THREADS} (or auto), not {n}"
        )),
    }
}
