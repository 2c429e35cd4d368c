#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Tokens for token-sidecar: providers that obtain them, the per-provider [`TokenSource`] that
//! holds the current one, refreshes it ahead of expiry and coalesces every concurrent refresh
//! into one identity-provider call, and the encrypted [`Store`] that keeps tokens across
//! restarts.

mod provider;
mod schedule;
mod source;
mod store;
pub mod tls;
mod token;

pub use provider::{
    build_provider, check_provider, AssertionSigner, Fetched, Held, Provider, ProviderError,
};
pub use schedule::Schedule;
pub use source::{RefreshError, State, Status, TokenSource, Trigger, Unavailable};
pub use store::{Record, Store, StoreError};
pub use token::{fingerprint, jwt_exp, Token};
