//! Providers: the ways a token is obtained. Each answers one [`Provider::fetch`]; scheduling,
//! coalescing and backoff live in [`crate::TokenSource`].

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use sidecar_config::{ClientAuth, ProviderKind, Secret};

/// What a provider obtained.
pub struct Fetched {
    /// The access token.
    pub access_token: String,
    /// Lifetime the issuer stated, if any.
    pub expires_in: Option<Duration>,
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
}

/// A way of obtaining tokens.
pub trait Provider: Send + Sync + 'static {
    /// Obtains a new token. Called by one task at a time per provider.
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, ProviderError>>;
}

/// Builds the provider a config entry describes.
pub fn build_provider(kind: &ProviderKind) -> Box<dyn Provider> {
    match kind {
        ProviderKind::ClientCredentials {
            token_url,
            client_id,
            client_secret,
            client_auth,
            scopes,
            params,
        } => Box::new(ClientCredentials {
            http: http_client(),
            token_url: token_url.clone(),
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            client_auth: *client_auth,
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            params: params.clone(),
        }),
        ProviderKind::Static { token } => Box::new(StaticToken {
            token: token.clone(),
        }),
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

struct StaticToken {
    token: Secret,
}

impl Provider for StaticToken {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            Ok(Fetched {
                access_token: self.token.expose().to_string(),
                expires_in: None,
            })
        })
    }
}

/// RFC 6749 §4.4.
struct ClientCredentials {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    client_auth: ClientAuth,
    scope: Option<String>,
    params: BTreeMap<String, String>,
}

impl Provider for ClientCredentials {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
            if let Some(scope) = &self.scope {
                form.push(("scope", scope));
            }
            for (k, v) in &self.params {
                form.push((k, v));
            }
            let mut req = self.http.post(&self.token_url);
            match self.client_auth {
                ClientAuth::ClientSecretBasic => {
                    // RFC 6749 §2.3.1: both parts are form-encoded before Basic encoding.
                    let id = form_encode(&self.client_id);
                    let secret = form_encode(self.client_secret.expose());
                    req = req.basic_auth(id, Some(secret));
                }
                ClientAuth::ClientSecretPost => {
                    form.push(("client_id", &self.client_id));
                    form.push(("client_secret", self.client_secret.expose()));
                }
            }
            let body = serde_urlencoded::to_string(&form)
                .map_err(|e| ProviderError::Malformed(format!("cannot encode form: {e}")))?;
            let resp = req
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", "application/json")
                .body(body)
                .send()
                .await
                .map_err(network_error)?;
            token_response(resp).await
        })
    }
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Describes a transport error without the URL's query (which never holds secrets here, but
/// errors should stay short and stable).
fn network_error(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        ProviderError::Network(kind.to_string())
    } else {
        ProviderError::Network(format!("{kind}: {}", truncate(&detail)))
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reads an OAuth2 token answer: `access_token` and `expires_in` on success, `error` and
/// `error_description` otherwise. Nothing else of the answer reaches a message.
async fn token_response(resp: reqwest::Response) -> Result<Fetched, ProviderError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(network_error)?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if !status.is_success() {
        return Err(ProviderError::Rejected {
            status: status.as_u16(),
            message: json
                .as_ref()
                .and_then(error_message)
                .unwrap_or_else(|| "no OAuth2 error in the answer".into()),
        });
    }
    let json = json.ok_or_else(|| ProviderError::Malformed("answer is not JSON".into()))?;
    let access_token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ProviderError::Malformed("answer has no access_token".into()))?
        .to_string();
    let expires_in = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s > 0.0)
    .map(Duration::from_secs_f64);
    Ok(Fetched {
        access_token,
        expires_in,
    })
}

/// `error: error_description` from an OAuth2 error body (or the common alternatives).
pub(crate) fn error_message(json: &serde_json::Value) -> Option<String> {
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let code = field("error");
    let text = field("error_description")
        .or_else(|| field("errorMessage"))
        .or_else(|| field("message"));
    match (code, text) {
        (Some(c), Some(t)) => Some(truncate(&format!("{c}: {t}"))),
        (Some(c), None) => Some(truncate(&c)),
        (None, Some(t)) => Some(truncate(&t)),
        (None, None) => None,
    }
}
