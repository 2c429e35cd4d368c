//! The two ways asking a source for a token fails.

use std::time::Duration;

use crate::provider::ProviderError;

/// A refresh that failed, as every caller who joined it sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("provider {provider}: {error}")]
pub struct RefreshError {
    /// The provider's name.
    pub provider: String,
    /// What went wrong.
    pub error: ProviderError,
}

/// No usable token could be had in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no usable token from provider {provider} within {waited:?}{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct Unavailable {
    /// The provider.
    pub provider: String,
    /// How long the caller waited.
    pub waited: Duration,
    /// The last refresh error, if any.
    pub last_error: Option<String>,
}
