//! The token value type.

use std::fmt;
use std::time::SystemTime;

use base64::Engine;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// One access token with its lifetime. Shared as `Arc<Token>`; reading it on the request path is
/// one atomic load. `Debug` never shows the value.
pub struct Token {
    value: String,
    /// `Bearer <value>`, built once so injection copies no string per request.
    bearer: HeaderValue,
    /// Monotonic number of this token within its provider, starting at 1.
    pub generation: u64,
    /// When it was obtained.
    pub issued_at: Instant,
    /// When it stops working (monotonic clock).
    pub expires_at: Instant,
    /// The same, on the wall clock, for status answers.
    pub expires_at_wall: SystemTime,
    /// After this, requests stop using it (expiry minus the capped skew).
    pub usable_until: Instant,
    /// First 8 hex digits of SHA-256 of the value: lets operators tell tokens apart.
    pub fingerprint: String,
}

impl Token {
    /// A token obtained now that lives `ttl`.
    pub fn new(value: String, generation: u64, ttl: std::time::Duration) -> Token {
        // Bounded so that no expiry arithmetic can overflow, whatever the answer said.
        let ttl = ttl.min(sidecar_config::MAX_DURATION);
        let now = Instant::now();
        let mut bearer = HeaderValue::from_str(&format!("Bearer {value}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        bearer.set_sensitive(true);
        Token {
            fingerprint: fingerprint(&value),
            bearer,
            value,
            generation,
            issued_at: now,
            expires_at: now + ttl,
            usable_until: now + ttl,
            expires_at_wall: SystemTime::now() + ttl,
        }
    }

    /// A token read back from the store: issued `age` ago, `ttl_left` still to live.
    pub fn restored(
        value: String,
        generation: u64,
        age: std::time::Duration,
        ttl_left: std::time::Duration,
    ) -> Token {
        let mut token = Token::new(value, generation, ttl_left);
        token.issued_at = token.issued_at.checked_sub(age).unwrap_or(token.issued_at);
        token
    }

    /// The token itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// `Bearer <token>` as a header value, marked sensitive.
    pub fn bearer_header(&self) -> &HeaderValue {
        &self.bearer
    }

    /// Whether the token can go out as a header value (no control characters).
    pub fn is_header_safe(&self) -> bool {
        !self.bearer.is_empty()
    }

    /// Its whole lifetime.
    pub fn lifetime(&self) -> std::time::Duration {
        self.expires_at.saturating_duration_since(self.issued_at)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// First 8 hex digits of the SHA-256 of a token.
pub fn fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The `exp` claim of a JWT, if the token is one. The signature is not checked: the sidecar only
/// needs to know when the issuer says it ends.
pub fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_eight_hex() {
        let f = fingerprint("abc");
        assert_eq!(f, "ba7816bf");
    }

    #[test]
    fn debug_hides_value() {
        let t = Token::new("very-secret".into(), 1, std::time::Duration::from_secs(5));
        assert!(!format!("{t:?}").contains("very-secret"));
        assert!(t.bearer_header().is_sensitive());
        assert_eq!(t.bearer_header(), "Bearer very-secret");
    }

    #[test]
    fn jwt_exp_is_read() {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b(r#"{"alg":"none"}"#),
            b(r#"{"exp":1900000000}"#)
        );
        assert_eq!(jwt_exp(&jwt), Some(1_900_000_000));
        assert_eq!(jwt_exp("opaque-token"), None);
        assert_eq!(jwt_exp("a.b.c"), None);
        assert_eq!(
            jwt_exp(&format!("{}.{}.s", b("{}"), b(r#"{"sub":"x"}"#))),
            None
        );
    }
}
