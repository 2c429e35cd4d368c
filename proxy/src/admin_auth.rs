//! Who may use the admin API's mutating endpoints (`POST /v1/reload`, `/v1/token/refresh`,
//! `/v1/token/ensure`).
//!
//! The rule, decided per request by [`authorize`]:
//! - with `admin.token` configured, a mutating request needs `Authorization: Bearer <token>`,
//!   from wherever it comes (a configured token is never optional);
//! - without it, only clients on loopback may: the decision is made on the connection's peer
//!   address, not on the listener's, so an admin API bound to `0.0.0.0` (for probes) still
//!   refuses a `POST` from another pod or host.
//!
//! Read-only endpoints (`/healthz`, `/readyz`, `/metrics`, `/v1/token/status`) are open: none of
//! them shows a token.

use std::net::IpAddr;

use sha2::{Digest, Sha256};
use sidecar_config::Secret;

/// What to do with a mutating request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Serve it.
    Allowed,
    /// 403: a token is configured and the request did not carry it.
    BadToken,
    /// 403: no token is configured and the client is not on loopback.
    NotLoopback,
}

/// Decides a mutating request from its peer address (`None`: unknown, such as a Unix socket),
/// the configured `admin.token` and the request's `Authorization` value.
pub fn authorize(
    peer: Option<IpAddr>,
    token: Option<&Secret>,
    authorization: Option<&[u8]>,
) -> Access {
    match token {
        Some(token) => {
            let given = authorization.and_then(bearer);
            match given {
                Some(given) if same(given, token.expose().as_bytes()) => Access::Allowed,
                _ => Access::BadToken,
            }
        }
        None if peer.is_some_and(is_loopback) => Access::Allowed,
        None => Access::NotLoopback,
    }
}

/// `127.0.0.0/8`, `::1`, and IPv4 loopback written as IPv6 (`::ffff:127.0.0.1`, what a dual-stack
/// listener reports).
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The credentials of a `Bearer` authorization (scheme case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Compares in time that depends on neither the contents nor the lengths: both sides are hashed
/// first, and the digests are compared without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret-admin-token-0123";

    #[test]
    fn the_rule_as_a_table() {
        let token = Secret::new(TOKEN);
        let right = format!("Bearer {TOKEN}");
        let lower = format!("bearer   {TOKEN} ");
        let wrong = format!("Bearer {TOKEN}x");
        let basic = format!("Basic {TOKEN}");
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let cases: &[(Option<IpAddr>, bool, Option<&str>, Access)] = &[
            // No token configured: the peer decides.
            (ip("127.0.0.1"), false, None, Access::Allowed),
            (ip("127.0.0.2"), false, None, Access::Allowed),
            (ip("::1"), false, None, Access::Allowed),
            (ip("::ffff:127.0.0.1"), false, None, Access::Allowed),
            (ip("10.1.2.3"), false, None, Access::NotLoopback),
            (ip("192.0.2.2"), false, Some(&right), Access::NotLoopback),
            (ip("::ffff:10.1.2.3"), false, None, Access::NotLoopback),
            (ip("fd00::2"), false, None, Access::NotLoopback),
            (ip("0.0.0.0"), false, None, Access::NotLoopback),
            (None, false, None, Access::NotLoopback),
            // A token configured: it is needed from everyone, loopback included.
            (ip("10.1.2.3"), true, Some(&right), Access::Allowed),
            (ip("10.1.2.3"), true, Some(&lower), Access::Allowed),
            (ip("127.0.0.1"), true, Some(&right), Access::Allowed),
            (None, true, Some(&right), Access::Allowed),
            (ip("10.1.2.3"), true, None, Access::BadToken),
            (ip("127.0.0.1"), true, None, Access::BadToken),
            (ip("10.1.2.3"), true, Some(&wrong), Access::BadToken),
            (ip("10.1.2.3"), true, Some(&basic), Access::BadToken),
            (ip("10.1.2.3"), true, Some("Bearer"), Access::BadToken),
            (ip("10.1.2.3"), true, Some("Bearer "), Access::BadToken),
            (ip("10.1.2.3"), true, Some(TOKEN), Access::BadToken),
        ];
        for (peer, configured, auth, want) in cases {
            let got = authorize(*peer, configured.then_some(&token), auth.map(str::as_bytes));
            assert_eq!(got, *want, "{peer:?} token={configured} {auth:?}");
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            /// Any header value: no panic, and only the exact token opens.
            #[test]
            fn only_the_token_opens(value in proptest::collection::vec(any::<u8>(), 0..80)) {
                let token = Secret::new("s3cret-admin-token-0123");
                let got = authorize(Some("10.0.0.1".parse().unwrap()), Some(&token), Some(&value));
                let exact = value.trim_ascii().len() > 7
                    && value.trim_ascii()[..6].eq_ignore_ascii_case(b"bearer")
                    && value.trim_ascii()[6] == b' '
                    && value.trim_ascii()[7..].trim_ascii() == b"s3cret-admin-token-0123";
                prop_assert_eq!(got == Access::Allowed, exact);
            }
        }
    }
}
