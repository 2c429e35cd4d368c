//! Client-side rate limits and upstream back-pressure, as decisions the proxy awaits:
//! [`RateLimiter::admit`] once per request, [`UpstreamHolds`] around upstream 429/503 answers.

mod bucket;
mod gate;
mod hold;
mod limiter;
mod rule;

pub use hold::{parse_retry_after, retry_after_secs, UpstreamHolds};
pub use limiter::{Admission, RateLimiter, RateRequest};

#[cfg(test)]
mod tests;
