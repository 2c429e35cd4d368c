//! The token value type.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use sidecar_config::MAX_DURATION;
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

/// The `exp` claim of a JWT, if the token is one and the claim is a usable time. The signature
/// is not checked: the sidecar only needs to know when the issuer says it ends.
///
/// Contract: `Some(exp)` only for a number of seconds since the Unix epoch (a fraction is cut
/// off) that is at most [`sidecar_config::MAX_DURATION`] from now, so
/// `UNIX_EPOCH + Duration::from_secs(exp)` never overflows and the lifetime it gives is at most
/// `MAX_DURATION`. An `exp` in the past is returned as is (the token is already expired). `None`
/// for no JWT, no `exp`, or one that is not a usable time (a string, negative, farther away than
/// `MAX_DURATION`); the token source refuses a token whose `exp` is that far away
/// ([`jwt_exp_claim`]), so `None` never stands for an absurd `exp` by the time a token is used.
pub fn jwt_exp(token: &str) -> Option<u64> {
    match jwt_exp_claim(token) {
        JwtExp::At(exp) => Some(exp),
        JwtExp::Absent | JwtExp::TooFar => None,
    }
}

/// What the `exp` claim of a token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwtExp {
    /// Not a JWT, no `exp`, or an `exp` that is no number of seconds.
    Absent,
    /// Unix seconds, at most `MAX_DURATION` from now.
    At(u64),
    /// A number farther away than `MAX_DURATION`: an unusable answer.
    TooFar,
}

/// Reads the `exp` claim of a JWT (see [`jwt_exp`]).
pub(crate) fn jwt_exp_claim(token: &str) -> JwtExp {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return JwtExp::Absent;
    };
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return JwtExp::Absent;
    };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return JwtExp::Absent;
    };
    let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_f64) else {
        return JwtExp::Absent;
    };
    if exp.is_nan() || exp < 0.0 {
        return JwtExp::Absent;
    }
    let latest = SystemTime::now()
        .checked_add(MAX_DURATION)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    // Compared as floats first: `exp` may be far beyond u64.
    if exp > latest as f64 || exp.trunc() as u64 > latest {
        return JwtExp::TooFar;
    }
    JwtExp::At(exp.trunc() as u64)
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

    fn latest() -> u64 {
        (SystemTime::now() + MAX_DURATION)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn absurd_exp_values_are_never_returned() {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = |exp: &str| format!("{}.{}.s", b("{}"), b(&format!(r#"{{"exp":{exp}}}"#)));
        for far in [
            "9223372036854775807",
            "18446744073709551615",
            "1e300",
            "99999999999",
        ] {
            assert_eq!(jwt_exp(&jwt(far)), None, "{far}");
            assert_eq!(jwt_exp_claim(&jwt(far)), JwtExp::TooFar, "{far}");
        }
        for unusable in ["-1", "-9223372036854775808", "\"1900000000\"", "null", "{}"] {
            assert_eq!(jwt_exp_claim(&jwt(unusable)), JwtExp::Absent, "{unusable}");
        }
        assert_eq!(jwt_exp(&jwt("1900000000.75")), Some(1_900_000_000));
        assert_eq!(jwt_exp(&jwt("5")), Some(5), "past: expired, still in range");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn exp_value() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                any::<u64>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                (0u64..10_000_000_000).prop_map(serde_json::Value::from),
                any::<u64>().prop_map(|n| serde_json::Value::from(n.to_string())),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Whatever `exp` says, `jwt_exp` gives a value `ttl_of` can add to the epoch, at
            /// most MAX_DURATION from now, and tells an absurd one apart.
            #[test]
            fn jwt_exp_is_always_in_range(exp in exp_value()) {
                let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
                let token = format!("{}.{}.s", b("{}"), b(&serde_json::json!({"exp": exp}).to_string()));
                match jwt_exp(&token) {
                    Some(e) => {
                        prop_assert!(e <= latest());
                        let at = UNIX_EPOCH + std::time::Duration::from_secs(e);
                        prop_assert!(at <= SystemTime::now() + MAX_DURATION);
                    }
                    None => {
                        let far = exp.as_f64().is_some_and(|f| f > latest() as f64);
                        prop_assert_eq!(jwt_exp_claim(&token) == JwtExp::TooFar, far);
                    }
                }
            }

            /// Arbitrary text as a token: never a panic.
            #[test]
            fn jwt_exp_never_panics(token in proptest::collection::vec(prop::sample::select(&b"AZaz09_=.-"[..]), 0..64).prop_map(|v| String::from_utf8(v).unwrap_or_default()), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = jwt_exp(&token);
                let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
                let _ = jwt_exp(&format!("h.{b}.s"));
            }
        }
    }
}
