//! Providers: the ways a token is obtained. Each answers one [`Provider::fetch`]; scheduling,
//! coalescing, backoff and persistence live in [`crate::TokenSource`].

mod assertion;
mod exec;
mod file;
mod json_login;
mod oauth;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use futures::future::BoxFuture;
use sidecar_config::{ProviderKind, Secret, MAX_DURATION};

pub use assertion::AssertionSigner;

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

/// Builds the provider a config entry describes.
pub fn build_provider(kind: &ProviderKind) -> Box<dyn Provider> {
    match kind {
        ProviderKind::ClientCredentials {
            client,
            scopes,
            params,
        } => Box::new(oauth::OAuth::client_credentials(
            http_client(),
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
            http_client(),
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
            http_client(),
            client,
            username,
            password,
            scopes,
            params,
        )),
        ProviderKind::JsonLogin { login, renew } => Box::new(json_login::JsonLogin::new(
            http_client(),
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
    }
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

/// The HTTP client of the identity-provider calls. It never follows a redirect: every such call
/// carries credentials (a client secret, a password, an API key, a refresh token) meant for the
/// configured URL only, and a 307/308 would re-send them to wherever `Location` points. The
/// overall timeout is the time cap of every exchange, body included.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

struct StaticToken {
    token: Secret,
}

impl Provider for StaticToken {
    fn fetch<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move { Ok(Fetched::token(self.token.expose().to_string(), None)) })
    }

    fn local(&self) -> bool {
        true
    }
}

/// Every provider built from config, so that no token with an absurd lifetime gets out of this
/// crate whatever its type: a lifetime past [`MAX_DURATION`] is an unusable answer.
/// Largest identity-provider or `json_login` answer read (SPEC §11); a token answer is a few
/// hundred bytes.
pub(crate) const MAX_ANSWER: usize = 1 << 20;

/// Reads an answer body of at most [`MAX_ANSWER`] bytes. A larger one is refused as soon as it
/// shows (its `Content-Length`, or the running total), without reading the rest: dropping the
/// response closes the connection. The client's timeout bounds the time.
async fn read_answer(mut resp: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
    let too_large = || ProviderError::Malformed("answer is larger than 1 MiB".into());
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The answer's status and body, or the refusal of a redirect: where it points is told (its
/// origin only, scrubbed) but nothing is sent there.
async fn answer(
    resp: reqwest::Response,
    redactor: &Redactor,
) -> Result<(reqwest::StatusCode, Vec<u8>), ProviderError> {
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| resp.url().join(l).ok())
            .map(|u| format!(" to {}", u.origin().ascii_serialization()))
            .unwrap_or_default();
        return Err(ProviderError::Rejected {
            status: status.as_u16(),
            message: redactor.clean(&format!(
                "redirect{to} not followed: credentials go to the configured URL only"
            )),
        });
    }
    Ok((status, read_answer(resp).await?))
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

pub(crate) fn truncate(s: &str) -> String {
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

/// Takes every secret a provider sends out of the texts its identity provider writes back: some
/// echo the request they refused, so a secret may return raw, form- or percent-encoded,
/// JSON-escaped, base64-encoded, or inside the base64 of a `Basic` header (`id:secret`).
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    /// Every encoding of every secret, longest first.
    needles: Vec<String>,
}

impl Redactor {
    /// Shorter secrets are not looked for: replacing them would mangle every message.
    const MIN_LEN: usize = 4;

    /// Adds a secret in all its encodings.
    pub(crate) fn secret(&mut self, secret: &str) -> &mut Self {
        if secret.len() < Self::MIN_LEN {
            return self;
        }
        let form = form_encode(secret);
        let json = serde_json::to_string(secret).unwrap_or_default();
        let mut found = vec![
            secret.to_string(),
            form.replace('+', "%20"),
            lower_hex(&form),
            json.trim_matches('"').to_string(),
            STANDARD_NO_PAD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
        ];
        found.push(form);
        self.add(found);
        self
    }

    /// Adds a client id and secret as they travel in `Authorization: Basic` (RFC 6749 §2.3.1
    /// form-encodes both parts first; some clients do not), plus the secret alone.
    pub(crate) fn basic(&mut self, client_id: &str, secret: &str) -> &mut Self {
        self.secret(secret);
        let mut found = Vec::new();
        for pair in [
            format!("{client_id}:{secret}"),
            format!("{}:{}", form_encode(client_id), form_encode(secret)),
        ] {
            found.push(STANDARD_NO_PAD.encode(&pair));
            found.push(URL_SAFE_NO_PAD.encode(&pair));
        }
        self.add(found);
        self
    }

    fn add(&mut self, found: Vec<String>) {
        self.needles
            .extend(found.into_iter().filter(|n| n.len() >= Self::MIN_LEN));
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.needles.dedup();
    }

    /// Replaces every occurrence with `<redacted>`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "<redacted>");
            }
        }
        out
    }

    /// A text from the identity provider made fit for a log line and an admin answer: secrets
    /// scrubbed (before cutting, so no secret is cut in half and left), control characters
    /// turned into spaces, at most 200 bytes.
    pub(crate) fn clean(&self, text: &str) -> String {
        let scrubbed = self.scrub(text);
        let flat: String = scrubbed
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        truncate(&flat)
    }
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `%2F` → `%2f`: some servers echo percent-encoding in lower case.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let esc = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        out.push_str(&esc.to_ascii_lowercase());
        rest = &rest[at + esc.len()..];
    }
    out.push_str(rest);
    out
}

/// `error: error_description` from an OAuth2 error body (or the common alternatives), cleaned
/// by `redactor`. Nothing else of an answer ever reaches a message.
pub(crate) fn error_message(json: &serde_json::Value, redactor: &Redactor) -> Option<String> {
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let code = field("error");
    let text = field("error_description")
        .or_else(|| field("errorMessage"))
        .or_else(|| field("message"));
    let joined = match (code, text) {
        (Some(c), Some(t)) => format!("{c}: {t}"),
        (Some(c), None) => c,
        (None, Some(t)) => t,
        (None, None) => return None,
    };
    Some(redactor.clean(&joined))
}

/// A relative lifetime (`expires_in`) from a JSON number or numeric string. `Ok(None)` when it
/// says nothing usable (not a number, NaN, zero or negative): the lifetime then comes from the
/// JWT or `default_ttl`. More than [`MAX_DURATION`] (infinity included) is an unusable answer.
pub(crate) fn seconds(
    v: &serde_json::Value,
    what: &str,
) -> Result<Option<Duration>, ProviderError> {
    let Some(secs) = number(v) else {
        return Ok(None);
    };
    if secs.is_nan() || secs <= 0.0 {
        return Ok(None);
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(too_far(what));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Time left until an absolute expiry (`expires_at`) given as Unix seconds (milliseconds when
/// implausibly large) or an RFC 3339 string. `Ok(None)` when unreadable, zero or negative;
/// zero when already past; an unusable answer when more than [`MAX_DURATION`] away.
pub(crate) fn until(v: &serde_json::Value, what: &str) -> Result<Option<Duration>, ProviderError> {
    let now = SystemTime::now();
    let latest = now.checked_add(MAX_DURATION).unwrap_or(now);
    let at = match number(v) {
        Some(mut secs) => {
            if secs.is_nan() || secs <= 0.0 {
                return Ok(None);
            }
            if secs > 1e11 {
                secs /= 1000.0;
            }
            let latest_secs = latest
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            if secs > latest_secs {
                return Err(too_far(what));
            }
            UNIX_EPOCH + Duration::from_secs_f64(secs)
        }
        None => match v.as_str().map(|s| humantime::parse_rfc3339_weak(s.trim())) {
            Some(Ok(at)) => at,
            _ => return Ok(None),
        },
    };
    if at > latest {
        return Err(too_far(what));
    }
    Ok(Some(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// A JSON number, or a string holding one.
fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

fn too_far(what: &str) -> ProviderError {
    ProviderError::Malformed(format!("{what} is more than 100 years away"))
}

#[cfg(test)]
mod tests;
