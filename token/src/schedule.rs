//! When to refresh and how long to back off: pure arithmetic over the refresh policy, so it is
//! tested without a clock.

use std::time::Duration;

use sidecar_config::RefreshPolicy;
use tokio::time::Instant;

/// A provider's refresh policy, with the caps that keep short-lived tokens workable: the lead
/// time is at most half the lifetime, skew and minimum spacing at most a quarter.
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: RefreshPolicy,
}

impl Schedule {
    /// Wraps a policy.
    pub fn new(policy: RefreshPolicy) -> Schedule {
        Schedule { policy }
    }

    /// How long before expiry a proactive refresh starts.
    pub fn lead(&self, lifetime: Duration) -> Duration {
        self.policy.before_expiry.min(lifetime / 2)
    }

    /// How early a token counts as expired.
    pub fn skew(&self, lifetime: Duration) -> Duration {
        self.policy.skew.min(lifetime / 4)
    }

    /// The least spacing of two proactive refreshes.
    pub fn min_interval(&self, lifetime: Duration) -> Duration {
        self.policy.min_interval.min(lifetime / 4)
    }

    /// The moment after which requests stop using a token.
    pub fn usable_until(&self, issued_at: Instant, expires_at: Instant) -> Instant {
        let lifetime = expires_at.saturating_duration_since(issued_at);
        expires_at - self.skew(lifetime)
    }

    /// When the proactive refresh of a token is due. `spread` in `[-1, 1]` picks a point inside
    /// the jitter window so that many sidecars do not refresh in step.
    pub fn refresh_at(&self, issued_at: Instant, expires_at: Instant, spread: f64) -> Instant {
        let lifetime = expires_at.saturating_duration_since(issued_at);
        let lead = self.lead(lifetime);
        let factor = (1.0 + self.policy.jitter * spread.clamp(-1.0, 1.0)).max(0.0);
        let lead = lead.mul_f64(factor).min(lifetime.mul_f64(0.75));
        let at = expires_at - lead;
        at.max(issued_at + self.min_interval(lifetime))
    }

    /// The wait after `failures` consecutive failed refreshes (1 for the first). `spread` in
    /// `[-1, 1]` applies the jitter.
    pub fn backoff(&self, failures: u32, spread: f64) -> Duration {
        let steps = &self.policy.backoff;
        let i = (failures.max(1) as usize - 1).min(steps.len().saturating_sub(1));
        let base = steps.get(i).copied().unwrap_or(Duration::from_secs(30));
        base.mul_f64((1.0 + self.policy.jitter * spread.clamp(-1.0, 1.0)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RefreshPolicy {
        RefreshPolicy {
            before_expiry: Duration::from_secs(30 * 60),
            jitter: 0.10,
            skew: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            backoff: vec![30, 60, 120, 300]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            escalate_after: 3,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_hour_token_refreshes_thirty_minutes_early() {
        let s = Schedule::new(policy());
        let now = Instant::now();
        let exp = now + Duration::from_secs(3600);
        assert_eq!(s.refresh_at(now, exp, 0.0), now + Duration::from_secs(1800));
        // Jitter moves it within ±10 % of the lead.
        assert_eq!(s.refresh_at(now, exp, 1.0), now + Duration::from_secs(1620));
        assert_eq!(
            s.refresh_at(now, exp, -1.0),
            now + Duration::from_secs(1980)
        );
        assert_eq!(s.usable_until(now, exp), exp - Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn short_token_caps_lead_skew_and_interval() {
        let s = Schedule::new(policy());
        let now = Instant::now();
        let exp = now + Duration::from_secs(3);
        assert_eq!(s.lead(Duration::from_secs(3)), Duration::from_millis(1500));
        assert_eq!(s.usable_until(now, exp), now + Duration::from_millis(2250));
        let at = s.refresh_at(now, exp, 0.0);
        assert_eq!(at, now + Duration::from_millis(1500));
        assert!(at < s.usable_until(now, exp));
    }

    #[test]
    fn backoff_follows_the_steps_and_repeats_the_last() {
        let s = Schedule::new(policy());
        let secs: Vec<u64> = (1..=6).map(|n| s.backoff(n, 0.0).as_secs()).collect();
        assert_eq!(secs, vec![30, 60, 120, 300, 300, 300]);
        assert_eq!(s.backoff(2, 1.0), Duration::from_secs(66));
        assert_eq!(s.backoff(2, -1.0), Duration::from_secs(54));
        assert_eq!(s.backoff(0, 0.0), Duration::from_secs(30));
    }
}
