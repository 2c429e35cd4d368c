//! Expired-token detection and the replay policy, as decisions over plain values.

use http::Method;
use sidecar_config::{Expiry, Replay};

/// How much of an answer's body is searched for `body_patterns`.
pub const BODY_PEEK: usize = 4096;

/// What an upstream answer's status and headers say about the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryVerdict {
    /// The token was rejected: status in `statuses` or `WWW-Authenticate: Bearer error="invalid_token"`.
    Expired,
    /// Only the body can tell: status in `body_statuses` and patterns configured.
    CheckBody,
    /// An ordinary answer.
    NotExpired,
}

/// Why a request that met an expired token was not replayed; a label of
/// `sidecar_replay_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not an idempotent method and no idempotency key.
    NonIdempotent,
    /// Body larger than `replay.max_body` (or of unknown size beyond it).
    BodyTooLarge,
    /// `max_attempts` reached, or a freshly issued token was rejected too.
    AttemptsExhausted,
    /// The route says `replay: false`.
    Disabled,
    /// No token could be had for the replay.
    NoToken,
}

impl SkipReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NonIdempotent => "non_idempotent",
            SkipReason::BodyTooLarge => "body_too_large",
            SkipReason::AttemptsExhausted => "attempts_exhausted",
            SkipReason::Disabled => "disabled",
            SkipReason::NoToken => "no_token",
        }
    }
}

/// Classifies an answer at header time.
pub fn classify(status: u16, www_authenticate: Option<&[u8]>, expiry: &Expiry) -> ExpiryVerdict {
    if expiry.statuses.contains(&status) {
        return ExpiryVerdict::Expired;
    }
    if www_authenticate.is_some_and(says_invalid_token) {
        return ExpiryVerdict::Expired;
    }
    if !expiry.body_patterns.is_empty() && expiry.body_statuses.contains(&status) {
        return ExpiryVerdict::CheckBody;
    }
    ExpiryVerdict::NotExpired
}

/// `Bearer ... error="invalid_token"` (RFC 6750 §3), case-insensitive, quotes optional.
fn says_invalid_token(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value).to_ascii_lowercase();
    v.trim_start().starts_with("bearer")
        && v.split([',', ' '])
            .filter_map(|p| p.trim().strip_prefix("error="))
            .any(|e| e.trim_matches('"') == "invalid_token")
}

/// Whether the first [`BODY_PEEK`] bytes of a body contain one of the (lowercased) patterns.
pub fn body_matches(body: &[u8], patterns: &[String]) -> bool {
    let head = &body[..body.len().min(BODY_PEEK)];
    let text = String::from_utf8_lossy(head).to_lowercase();
    patterns
        .iter()
        .any(|p| !p.is_empty() && text.contains(p.as_str()))
}

/// Whether a request may be sent again. `body_len` is the declared length (`None`: unknown,
/// chunked) and `body_seen` what the sidecar has buffered so far.
pub fn replayable(
    method: &Method,
    has_idempotency_key: bool,
    body_len: Option<u64>,
    route_allows: bool,
    cfg: &Replay,
) -> Result<(), SkipReason> {
    if !route_allows {
        return Err(SkipReason::Disabled);
    }
    if !has_idempotency_key && !cfg.idempotent_methods.contains(method) {
        return Err(SkipReason::NonIdempotent);
    }
    if body_len.is_some_and(|n| n > cfg.max_body) {
        return Err(SkipReason::BodyTooLarge);
    }
    Ok(())
}

/// What to do after an expired-token answer to a replayable request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextStep {
    /// Replay; first refresh the token when `refresh` (the failed generation is still current).
    Replay {
        /// A refresh is needed (else a newer token already exists).
        refresh: bool,
    },
    /// Give the client the upstream's answer.
    PassThrough(SkipReason),
}

/// The generation rule. `attempts` were sent so far; the last used the token of
/// `failed_generation`; `current_generation` is the provider's newest; `forced` says this request
/// already forced one refresh (a freshly issued token rejected too is passed through — no loops).
pub(crate) fn after_expired(
    attempts: u32,
    max_attempts: u32,
    failed_generation: u64,
    current_generation: u64,
    forced: bool,
) -> NextStep {
    if attempts >= max_attempts {
        return NextStep::PassThrough(SkipReason::AttemptsExhausted);
    }
    if forced {
        return NextStep::PassThrough(SkipReason::AttemptsExhausted);
    }
    if current_generation > failed_generation {
        return NextStep::Replay { refresh: false };
    }
    NextStep::Replay { refresh: true }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecar_config::Config;

    fn cfg() -> Config {
        Config::parse(
            "upstreams: [{ name: a, url: \"http://127.0.0.1:1\" }]\n",
            "t.yaml",
        )
        .unwrap()
    }

    #[test]
    fn classification() {
        let c = cfg();
        let e = &c.upstreams[0].expiry;
        assert_eq!(classify(401, None, e), ExpiryVerdict::Expired);
        assert_eq!(classify(403, None, e), ExpiryVerdict::CheckBody);
        assert_eq!(classify(200, None, e), ExpiryVerdict::NotExpired);
        assert_eq!(classify(500, None, e), ExpiryVerdict::NotExpired);
        let hdr = br#"Bearer realm="api", error="invalid_token", error_description="expired""#;
        assert_eq!(classify(400, Some(hdr), e), ExpiryVerdict::Expired);
        assert_eq!(
            classify(400, Some(b"Bearer error=invalid_request"), e),
            ExpiryVerdict::NotExpired
        );
        assert_eq!(
            classify(400, Some(b"Basic realm=x"), e),
            ExpiryVerdict::NotExpired
        );
    }

    #[test]
    fn body_patterns_are_case_insensitive_and_limited_to_4k() {
        let pats = vec!["token is expired".to_string()];
        assert!(body_matches(
            br#"{"error":"key not authorized: Token Is Expired"}"#,
            &pats
        ));
        assert!(!body_matches(br#"{"error":"forbidden"}"#, &pats));
        let mut late = vec![b' '; BODY_PEEK];
        late.extend_from_slice(b"token is expired");
        assert!(!body_matches(&late, &pats));
    }

    #[test]
    fn replayability() {
        let c = cfg();
        let r = &c.replay;
        assert_eq!(replayable(&Method::GET, false, None, true, r), Ok(()));
        assert_eq!(
            replayable(&Method::PUT, false, Some(900 * 1024), true, r),
            Ok(())
        );
        assert_eq!(
            replayable(&Method::POST, false, Some(10), true, r),
            Err(SkipReason::NonIdempotent)
        );
        assert_eq!(replayable(&Method::POST, true, Some(10), true, r), Ok(()));
        assert_eq!(
            replayable(&Method::PUT, false, Some(2 << 20), true, r),
            Err(SkipReason::BodyTooLarge)
        );
        assert_eq!(
            replayable(&Method::GET, false, None, false, r),
            Err(SkipReason::Disabled)
        );
    }

    #[test]
    fn generation_rule() {
        // First failure with the current token: refresh, replay.
        assert_eq!(
            after_expired(1, 3, 5, 5, false),
            NextStep::Replay { refresh: true }
        );
        // Someone already refreshed: replay with the newer token, no refresh.
        assert_eq!(
            after_expired(1, 3, 5, 6, false),
            NextStep::Replay { refresh: false }
        );
        // The token we forced was rejected too: pass through, even if an even newer one exists.
        assert_eq!(
            after_expired(2, 3, 6, 6, true),
            NextStep::PassThrough(SkipReason::AttemptsExhausted)
        );
        assert_eq!(
            after_expired(2, 3, 6, 7, true),
            NextStep::PassThrough(SkipReason::AttemptsExhausted)
        );
        // Out of attempts, whatever the generation.
        assert_eq!(
            after_expired(3, 3, 5, 9, false),
            NextStep::PassThrough(SkipReason::AttemptsExhausted)
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Any `WWW-Authenticate` bytes and any body: a verdict, never a panic; the
            /// header alone decides only when it names `invalid_token`.
            #[test]
            fn classify_takes_any_header_and_body(
                status in 100u16..1000,
                www in proptest::collection::vec(any::<u8>(), 0..200),
                body in proptest::collection::vec(any::<u8>(), 0..6000),
            ) {
                let expiry = Config::parse(
                    "upstreams:\n  - { name: api, url: \"http://127.0.0.1:1\" }\n",
                    "t.yaml",
                )
                .unwrap()
                .upstreams[0]
                .expiry
                .clone();
                let verdict = classify(status, Some(&www), &expiry);
                if verdict == ExpiryVerdict::Expired && !expiry.statuses.contains(&status) {
                    let text = String::from_utf8_lossy(&www).to_ascii_lowercase();
                    prop_assert!(text.contains("invalid_token"));
                }
                let _ = body_matches(&body, &expiry.body_patterns);
            }

            /// The header form RFC 6750 gives, whatever the spacing, case and quoting.
            #[test]
            fn rfc_6750_invalid_token_is_recognised(
                realm in "[a-z]{0,10}",
                upper in any::<bool>(),
                quoted in any::<bool>(),
                space in " {0,3}",
            ) {
                let error = if quoted { "\"invalid_token\"" } else { "invalid_token" };
                let v = format!("Bearer realm=\"{realm}\",{space}error={error}");
                let v = if upper { v.to_uppercase() } else { v };
                prop_assert!(says_invalid_token(v.as_bytes()));
            }
        }
    }
}
