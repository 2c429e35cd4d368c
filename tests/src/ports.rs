//! Loopback ports for processes a test or the benchmark starts.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use rand::Rng;

/// A free loopback address for a child to bind (bound here, then released).
///
/// Between the release and the child's bind, the port must not go to anyone else. The kernel
/// hands out ports from its ephemeral range to every `bind(…:0)` (the mock servers') and every
/// outgoing connection, and may hand a just-released one out again at once: CI once saw a
/// sidecar's `listen` and `admin_listen` get the same port. So the port is drawn below that
/// range, where the kernel never picks on its own, and each goes out at most once per process.
pub fn free_port() -> std::io::Result<SocketAddr> {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let below = ephemeral_start();
    let range: RangeInclusive<u16> = 10_000.min(below / 2)..=below - 1;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(range.clone());
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if let Ok(addr) =
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).and_then(|l| l.local_addr())
        {
            given.insert(port);
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {range:?} after 1000 tries"),
    ))
}

/// The first port of the kernel's ephemeral range (Linux's default 32768 where it cannot be
/// read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|p| *p > 2048)
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<SocketAddr> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: BTreeSet<u16> = ports.iter().map(|a| a.port()).collect();
        assert_eq!(distinct.len(), ports.len());
        for addr in &ports {
            assert!(addr.ip().is_loopback());
            assert!(addr.port() < ephemeral_start(), "{addr}");
        }
        // Released: a child can bind it.
        TcpListener::bind(ports[0]).unwrap();
    }
}
