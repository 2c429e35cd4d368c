//! Loopback ports for processes a test or the benchmark starts.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// A free loopback address (bound, then released: the child binds it right after).
///
/// The kernel may hand a released port out again at once, so two calls could name the same port
/// (and a sidecar whose `listen` and `admin_listen` are one address refuses its config): each
/// port goes out at most once per process.
pub fn free_port() -> std::io::Result<SocketAddr> {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if GIVEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr.port())
        {
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "every free loopback port offered was handed out already",
    ))
}
