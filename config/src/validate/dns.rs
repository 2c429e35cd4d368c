//! The `dns:` section: which servers resolve upstream names and how often. Checked offline:
//! nothing is resolved or contacted here.

use std::net::SocketAddr;
use std::time::Duration;

use crate::schema::RawDns;
use crate::Dns;

/// Shortest `min_ttl`: a lookup per name and second is already more than any record needs.
pub(crate) const MIN_DNS_TTL: Duration = Duration::from_secs(1);

/// On error: the key to point at, and the message.
pub(super) fn dns(d: &RawDns) -> Result<Dns, (&'static str, String)> {
    let mut nameservers = Vec::with_capacity(d.nameservers.len());
    for ns in &d.nameservers {
        let addr: SocketAddr = ns.trim().parse().map_err(|_| {
            (
                "nameservers",
                format!(
                    "dns.nameservers: {ns:?} is not an ip:port address; write it like 127.0.0.1:53 or [::1]:53"
                ),
            )
        })?;
        if addr.port() == 0 {
            return Err(("nameservers", format!("dns.nameservers: {ns:?} has port 0")));
        }
        nameservers.push(addr);
    }
    let (min_ttl, max_ttl) = (d.min_ttl.0, d.max_ttl.0);
    if min_ttl < MIN_DNS_TTL {
        return Err(("min_ttl", "dns.min_ttl must be at least 1s".into()));
    }
    if min_ttl > max_ttl {
        return Err((
            "min_ttl",
            format!(
                "dns.min_ttl ({}) is more than dns.max_ttl ({})",
                humantime::format_duration(min_ttl),
                humantime::format_duration(max_ttl)
            ),
        ));
    }
    Ok(Dns {
        nameservers,
        min_ttl,
        max_ttl,
    })
}
