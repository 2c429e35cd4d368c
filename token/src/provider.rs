//! Providers: the ways a token is obtained. Each answers one [`Provider::fetch`]; scheduling,
//! coalescing, backoff and persistence live in [`crate::TokenSource`].

mod assertion;
mod exec;
mod file;
mod http;
mod json_login;
mod lifetime;
mod oauth;
mod redact;
mod static_token;

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use sidecar_config::{ProviderKind, Tls};

pub use assertion::AssertionSigner;
use http::http_client;
use static_token::StaticToken;

/// What a provider obtained. `Debug` never shows a token.
pub struct Fetched {
    /// The access token.
    pub access_token: String,
    /// Lifetime the issuer stated, if any.
    pub expires_in: Option<Duration>,
    /// The refresh token to use from now on (rotated or carried over), if the provider has one.
    /// The source persists it before the access token is published.
    pub refresh_token: Option<String>,
}

impl Fetched {
    /// A token without a refresh token.
    pub fn token(access_token: String, expires_in: Option<Duration>) -> Fetched {
        Fetched {
            access_token,
            expires_in,
            refresh_token: None,
        }
    }
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("expires_in", &self.expires_in)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// What the source holds when it asks for a new token: providers that trade the current
/// credentials (refresh-token grants, `json_login` renew) read them from here. `Debug` never
/// shows them.
#[derive(Default, Clone)]
pub struct Held {
    /// The current access token, while it has not expired.
    pub access_token: Option<String>,
    /// The refresh token from the last answer or the store.
    pub refresh_token: Option<String>,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("has_access_token", &self.access_token.is_some())
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish()
    }
}

/// Why a fetch failed. Messages carry the identity provider's error text, never a secret or a
/// token field of its answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// No answer: connect error, timeout, broken connection.
    #[error("identity provider unreachable: {0}")]
    Network(String),
    /// An answer that says no.
    #[error("identity provider answered {status}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Its error code and description.
        message: String,
    },
    /// An answer that is not a usable token response.
    #[error("identity provider answer unusable: {0}")]
    Malformed(String),
    /// The provider cannot work as configured (an unreadable private key, a command that does
    /// not start, a missing token file).
    #[error("{0}")]
    Setup(String),
    /// The replicas' shared state (Redis) decided against an identity-provider call: it is down
    /// and `on_redis_down: fail_closed`, or another replica's refresh did not land in time.
    #[error("shared token state: {0}")]
    Shared(String),
    /// A fault of the sidecar itself (a refresh that panicked or was cancelled).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProviderError {
    /// OAuth2 `invalid_grant`: the refresh token (or password) is no longer accepted, so
    /// retrying it is pointless and a fallback login applies.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, ProviderError::Rejected { status: 400 | 401, message }
            if message == "invalid_grant" || message.starts_with("invalid_grant:"))
    }
}

/// A way of obtaining tokens.
pub trait Provider: Send + Sync + 'static {
    /// Obtains a new token. Called by one task at a time per provider; `held` is what the
    /// source holds now.
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>>;

    /// Resolves when the token's source changed outside the sidecar (a replaced token file), so
    /// the background refresher picks it up at once. `None`: it never does.
    fn changed(&self) -> Option<BoxFuture<'_, ()>> {
        None
    }

    /// The token comes from this process or its files, not from a server: asking again costs
    /// nothing, so no `min_interval` or backoff applies to it.
    fn local(&self) -> bool {
        false
    }
}

/// Builds the provider a config entry describes; identity-provider calls use `tls`'s trust and
/// client certificate. Fails when the HTTP client cannot be built with them.
pub fn build_provider(kind: &ProviderKind, tls: &Tls) -> Result<Box<dyn Provider>, ProviderError> {
    let http = || http_client(tls);
    Ok(match kind {
        ProviderKind::ClientCredentials {
            client,
            scopes,
            params,
        } => Box::new(oauth::OAuth::client_credentials(
            http()?,
            client,
            scopes,
            params,
        )),
        ProviderKind::RefreshToken {
            client,
            refresh_token,
            scopes,
            params,
            fallback,
        } => Box::new(oauth::OAuth::refresh_token(
            http()?,
            client,
            refresh_token,
            scopes,
            params,
            fallback.clone(),
        )),
        ProviderKind::Password {
            client,
            username,
            password,
            scopes,
            params,
        } => Box::new(oauth::OAuth::password(
            http()?,
            client,
            username,
            password,
            scopes,
            params,
        )),
        ProviderKind::JsonLogin { login, renew } => Box::new(json_login::JsonLogin::new(
            http()?,
            (**login).clone(),
            renew.as_deref().cloned(),
        )),
        ProviderKind::Exec {
            command,
            timeout,
            env,
        } => Box::new(exec::Exec::new(command.clone(), *timeout, env.clone())),
        ProviderKind::File { path } => Box::new(file::TokenFile::new(path.clone())),
        ProviderKind::Static { token } => Box::new(StaticToken {
            token: token.clone(),
        }),
    })
}

/// Checks what config validation cannot without this crate (today: that a `private_key_jwt`
/// key parses and is RS256/ES256-capable), so `token-sidecar check` and a reload can refuse it
/// up front instead of failing at every refresh. Errors never contain key material.
pub fn check_provider(kind: &ProviderKind) -> Result<(), String> {
    use sidecar_config::ClientCredential;
    let client = match kind {
        ProviderKind::ClientCredentials { client, .. }
        | ProviderKind::RefreshToken { client, .. }
        | ProviderKind::Password { client, .. } => client,
        _ => return Ok(()),
    };
    if let ClientCredential::PrivateKeyJwt { key, key_id } = &client.credential {
        AssertionSigner::from_pem(key.expose(), key_id.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
