#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Tokens for token-sidecar: providers that obtain them, the per-provider [`TokenSource`] that
//! holds the current one, refreshes it ahead of expiry and coalesces every concurrent refresh
//! into one identity-provider call.

mod provider;
mod schedule;
mod source;
mod token;

pub use provider::{build_provider, Fetched, Provider, ProviderError};
pub use schedule::Schedule;
pub use source::{RefreshError, State, Status, TokenSource, Trigger, Unavailable};
pub use token::{fingerprint, jwt_exp, Token};
