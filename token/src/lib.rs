#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Tokens for token-sidecar: providers that obtain them, the per-provider [`TokenSource`] that
//! holds the current one, refreshes it ahead of expiry and coalesces every concurrent refresh
//! into one identity-provider call, and the encrypted [`Store`] that keeps tokens across
//! restarts.

mod provider;
mod schedule;
mod shared;
mod source;
mod store;
pub mod tls;
mod token;

pub use provider::{
    build_provider, check_provider, AssertionSigner, Fetched, Held, Provider, ProviderError,
};
pub use schedule::Schedule;
pub use shared::{SharedAdmission, SharedBackend, SharedRateLimits};
pub use source::{RefreshError, State, Status, TokenSource, Trigger, Unavailable};
pub use store::{Record, Store, StoreError};
pub use token::{fingerprint, jwt_exp, Token};

/// Registers the `# HELP` text of the metrics this crate records. Call once, after the
/// process's metrics recorder is installed.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "sidecar_token_refresh_total",
        "Token refresh attempts by provider, trigger (initial, proactive, expired, unauthorized, ensure, manual) and result (success, failure)"
    );
    describe_histogram!(
        "sidecar_token_refresh_duration_seconds",
        Unit::Seconds,
        "Time one refresh attempt took, identity-provider call included"
    );
    describe_gauge!(
        "sidecar_token_ttl_seconds",
        Unit::Seconds,
        "Remaining lifetime of the provider's current token at scrape time (negative once expired)"
    );
    describe_gauge!(
        "sidecar_token_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the provider's current token expires, as a Unix time"
    );
    describe_gauge!(
        "sidecar_token_state",
        "1 for the provider's current state (initial, valid, refreshing, expired, error), 0 for the others"
    );
    describe_counter!(
        "sidecar_store_errors_total",
        "Token store failures by provider and operation (load: unreadable file ignored; save: new token kept in memory only)"
    );
    describe_counter!(
        "sidecar_refresher_restarts_total",
        "Background refresher tasks that ended unexpectedly and were restarted"
    );
}
