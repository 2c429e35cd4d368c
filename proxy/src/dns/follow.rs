//! Decisions of the background lookups, as plain functions: when to look again, whether an
//! answer replaces the addresses in use, when a failure is worth a WARN. No I/O, no clock:
//! [`super`] carries them out.

use std::net::SocketAddr;
use std::time::Duration;

/// The record's TTL within `[min, max]`. Saturates rather than panics if `min > max` (the
/// config refuses that; a panic here would stop a name being followed).
pub(crate) fn clamp_ttl(ttl: Duration, min: Duration, max: Duration) -> Duration {
    ttl.max(min).min(max.max(min))
}

/// What one lookup came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Addresses (any order, duplicates allowed) and how long the record may be kept.
    Answer(Vec<SocketAddr>, Duration),
    /// No answer: the server failed, timed out or said the name does not exist.
    Failed,
}

/// What to do after a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// New addresses to put in use (sorted, no duplicates); `None` keeps the ones in use.
    pub(crate) replace: Option<Vec<SocketAddr>>,
    /// Look again after this.
    pub(crate) next: Duration,
    /// Log a WARN: the first failure of a streak (later ones are only counted).
    pub(crate) warn: bool,
    /// Log that lookups work again after a streak of failures.
    pub(crate) recovered: bool,
    /// Count a failure (`sidecar_dns_failures_total`).
    pub(crate) failure: bool,
}

/// The state of following one name: whether the last lookup failed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Follow {
    failing: bool,
}

impl Follow {
    /// Decides what a lookup's outcome does to `current` (the addresses in use). An answer with
    /// no address counts as a failure: the last good addresses stay, as for a failed lookup;
    /// failures are retried after `min`.
    pub(crate) fn after(
        &mut self,
        current: &[SocketAddr],
        lookup: Lookup,
        min: Duration,
        max: Duration,
    ) -> Step {
        let answer = match lookup {
            Lookup::Answer(mut addrs, ttl) if !addrs.is_empty() => {
                addrs.sort_unstable();
                addrs.dedup();
                Some((addrs, ttl))
            }
            Lookup::Answer(..) | Lookup::Failed => None,
        };
        match answer {
            Some((addrs, ttl)) => {
                let recovered = std::mem::take(&mut self.failing);
                Step {
                    replace: (addrs != current).then_some(addrs),
                    next: clamp_ttl(ttl, min, max),
                    warn: false,
                    recovered,
                    failure: false,
                }
            }
            None => {
                let warn = !self.failing;
                self.failing = true;
                Step {
                    replace: None,
                    next: min,
                    warn,
                    recovered: false,
                    failure: true,
                }
            }
        }
    }
}

/// Where the `attempt`-th connect of a request goes among `len` addresses, starting at
/// `start` (round robin across requests): each connect failure moves to the next address.
pub(crate) fn address_index(start: usize, attempt: usize, len: usize) -> Option<usize> {
    (len > 0).then(|| start.wrapping_add(attempt) % len)
}

/// After `failed` connect failures of one request over `len` addresses: whether the next
/// address is still untried in this round (then it is tried at once, without backoff; once
/// every address failed, the usual retry policy decides).
pub(crate) fn try_next_address(failed: usize, len: usize) -> bool {
    len > 1 && !failed.is_multiple_of(len)
}

#[cfg(test)]
mod tests;
