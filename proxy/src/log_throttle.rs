//! A down upstream must not flood the log: one WARN line a second per upstream and cause, which
//! says how many more failures of the same kind it stands for.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// At most one line per key in this time.
const EVERY: Duration = Duration::from_secs(1);
/// Keys kept at most (upstream names come from the config; a reload may add new ones).
const MAX_KEYS: usize = 1024;

#[derive(Debug)]
struct Entry {
    last: Instant,
    suppressed: u64,
}

/// Per (upstream, cause): when a line was last written and what was held back since.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    entries: Mutex<HashMap<(String, &'static str), Entry>>,
}

impl Throttle {
    /// `Some(n)` when a line may be written at `now` (`n` failures of the same kind were not
    /// logged since the previous line); `None` when this one is only counted.
    pub(crate) fn admit(&self, upstream: &str, cause: &'static str, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&(upstream.to_string(), cause)) {
            if now.saturating_duration_since(e.last) < EVERY {
                e.suppressed = e.suppressed.saturating_add(1);
                return None;
            }
            let held = std::mem::take(&mut e.suppressed);
            e.last = now;
            return Some(held);
        }
        if entries.len() >= MAX_KEYS {
            entries.clear();
        }
        entries.insert(
            (upstream.to_string(), cause),
            Entry {
                last: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// The process's throttle for upstream failures.
pub(crate) static UPSTREAM_DOWN: LazyLock<Throttle> = LazyLock::new(Throttle::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_per_upstream_and_cause_with_the_count() {
        let t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("api", "network", t0), Some(0));
        for i in 1..200u64 {
            let at = t0 + Duration::from_millis(i * 4);
            assert_eq!(t.admit("api", "network", at), None);
        }
        // Another cause and another upstream have lines of their own.
        assert_eq!(t.admit("api", "timeout", t0), Some(0));
        assert_eq!(t.admit("other", "network", t0), Some(0));
        assert_eq!(t.admit("api", "network", t0 + EVERY), Some(199));
        assert_eq!(t.admit("api", "network", t0 + EVERY), None);
        assert_eq!(t.admit("api", "network", t0 + 2 * EVERY), Some(1));
    }
}
