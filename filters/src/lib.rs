#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Per-request decisions of token-sidecar as plain functions over a small request view: which
//! route, whether the target is allowed, what to do with a client's own credentials, where the
//! token goes. No sockets, no Pingora types: `proxy/` calls these and acts on the answers.

mod answer;
mod authz;
mod breaker;
mod fresh;
mod inject;
mod path;
mod ratelimit;
mod replay;
mod route;
mod stream;

pub use answer::{
    after_connect_failure, after_expired_token, after_response, jittered, retry_after_of, Answer,
    Attempt, ConnectFailure, ErrorClass, Generations, Policy, Step,
};
pub use authz::{client_authorization, AuthzDecision};
pub use breaker::{Breaker, BreakerVerdict};
pub use fresh::{fresh_enough, required_ttl};
pub use inject::{query_with_token, redact_query};
pub use path::{normalize, PathError};
pub use ratelimit::{
    parse_retry_after, retry_after_secs, Admission, RateLimiter, RateRequest, UpstreamHolds,
};
pub use replay::{body_matches, classify, replayable, ExpiryVerdict, SkipReason, BODY_PEEK};
pub use route::{absolute_form_authority, RequestView, Route, Routes};
pub use stream::{requested as requested_stream, started as started_stream, StreamKind};
