#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Per-request decisions of token-sidecar as plain functions over a small request view: which
//! route, whether the target is allowed, what to do with a client's own credentials, where the
//! token goes. No sockets, no Pingora types: `proxy/` calls these and acts on the answers.

mod access;
mod answer;
mod authz;
mod breaker;
mod fresh;
mod headers;
mod inject;
mod path;
mod ratelimit;
mod replay;
mod route;
mod stream;

pub use access::loggable_target;
pub use answer::{
    after_connect_failure, after_expired_token, after_response, grpc_unauthenticated, jittered,
    retry_after_of, Answer, Attempt, ConnectFailure, ErrorClass, Generations, Policy, Step,
};
pub use authz::{client_authorization, AuthzDecision};
pub use breaker::{Breaker, BreakerVerdict};
pub use fresh::{fresh_enough, required_ttl};
pub use headers::{AnswerHeaders, ClientHeaders, EXPECTED_DURATION, GRPC_STATUS};
pub use inject::{query_with_token, redact_query};
pub use path::{normalize, PathError};
pub use ratelimit::{
    parse_retry_after, retry_after_secs, Admission, RateLimiter, RateRequest, UpstreamHolds,
};
pub use replay::{body_matches, classify, replayable, ExpiryVerdict, SkipReason, BODY_PEEK};
pub use route::{absolute_form_authority, RequestView, Route, Routes};

/// Registers the `# HELP` text of the metrics this crate records. Call once, after the
/// process's metrics recorder is installed.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "sidecar_ratelimit_delayed_total",
        "Requests a client-side rate-limit rule held back before sending, by rule"
    );
    describe_counter!(
        "sidecar_ratelimit_rejected_total",
        "Requests a client-side rate-limit rule refused with the sidecar's own 429, by rule"
    );
    describe_histogram!(
        "sidecar_ratelimit_wait_seconds",
        Unit::Seconds,
        "How long delayed requests waited for their rate-limit rule, by rule"
    );
}
pub use stream::{started as started_stream, StreamKind};
