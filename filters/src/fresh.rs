//! Is this token fresh enough for this request? A long-lived connection keeps the token it
//! started with: an upstream that closes connections when their token expires would close one
//! opened on a nearly expired token a moment later. Such requests (WebSocket upgrades, event
//! streams) need a token with `upgrade.min_ttl` left, capped at half the token's lifetime so
//! that short-lived tokens stay usable at all.

use std::time::Duration;

use tokio::time::Instant;

/// The time a stream's token must have left: `min_ttl`, capped at half of `lifetime` (the
/// lifetime of the token at hand: a provider that issues 4 s tokens can give 2 s, not 5 min).
pub fn required_ttl(min_ttl: Duration, lifetime: Duration) -> Duration {
    min_ttl.min(lifetime / 2)
}

/// Whether a token issued at `issued_at` that expires at `expires_at` may open a stream `now`
/// under `min_ttl` (zero: any token will do).
pub fn fresh_enough(
    issued_at: Instant,
    expires_at: Instant,
    now: Instant,
    min_ttl: Duration,
) -> bool {
    let lifetime = expires_at.saturating_duration_since(issued_at);
    expires_at.saturating_duration_since(now) >= required_ttl(min_ttl, lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_cap_is_half_the_lifetime() {
        let cases = [
            (S(300), S(3600), S(300)),
            (S(300), S(4), S(2)),
            (S(300), S(600), S(300)),
            (S(0), S(3600), S(0)),
            (S(300), S(0), S(0)),
        ];
        for (min_ttl, lifetime, want) in cases {
            assert_eq!(
                required_ttl(min_ttl, lifetime),
                want,
                "{min_ttl:?} {lifetime:?}"
            );
        }
    }

    /// A token issued at t=0 that lives `lifetime`, asked about as the paused clock moves on.
    #[tokio::test(start_paused = true)]
    async fn fresh_while_min_ttl_is_left() {
        // (lifetime, min_ttl, seconds elapsed, fresh?)
        let cases = [
            // One hour, 5 min wanted: fresh until 55 min have gone.
            (S(3600), S(300), 0, true),
            (S(3600), S(300), 3299, true),
            (S(3600), S(300), 3300, true),
            (S(3600), S(300), 3301, false),
            // 4 s tokens: the cap makes 2 s enough.
            (S(4), S(300), 1, true),
            (S(4), S(300), 2, true),
            (S(4), S(300), 3, false),
            // Expired: not fresh.
            (S(4), S(300), 5, false),
            // min_ttl 0: any token the caller holds as usable.
            (S(3600), S(0), 3599, true),
        ];
        let issued = Instant::now();
        let expires = |lifetime| issued + lifetime;
        for (lifetime, min_ttl, elapsed, want) in cases {
            let now = issued + S(elapsed);
            assert_eq!(
                fresh_enough(issued, expires(lifetime), now, min_ttl),
                want,
                "lifetime {lifetime:?} min_ttl {min_ttl:?} after {elapsed}s"
            );
        }
        // The clock itself: advancing it turns a fresh token stale.
        let issued = Instant::now();
        let expires_at = issued + S(600);
        assert!(fresh_enough(issued, expires_at, Instant::now(), S(300)));
        tokio::time::advance(S(301)).await;
        assert!(!fresh_enough(issued, expires_at, Instant::now(), S(300)));
    }
}
