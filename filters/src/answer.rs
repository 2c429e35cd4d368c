//! What happens to an upstream answer, and to a failed connect: one pure decision
//! each, over plain values. The proxy reads the answer's header, the attempt's state and the
//! config, asks here, and carries the [`Step`] out.

use std::time::{Duration, SystemTime};

use sidecar_config::{Expiry, Retry};

use crate::ratelimit::parse_retry_after;
use crate::replay::{after_expired, classify, ExpiryVerdict, NextStep, SkipReason};

/// Error class of an attempt, for `sidecar_upstream_errors_total{class}` and the access log
///.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 401, 403.
    Auth,
    /// Other 4xx.
    Client,
    /// 5xx.
    Server,
    /// The upstream could not be reached, or broke off.
    Network,
    /// Connect, read or write timeout.
    Timeout,
    /// 429.
    RateLimit,
}

impl ErrorClass {
    /// The class of an upstream status; `None` below 400.
    pub fn of_status(status: u16) -> Option<ErrorClass> {
        match status {
            401 | 403 => Some(ErrorClass::Auth),
            429 => Some(ErrorClass::RateLimit),
            400..=499 => Some(ErrorClass::Client),
            500..=599 => Some(ErrorClass::Server),
            _ => None,
        }
    }

    /// The metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Auth => "auth",
            ErrorClass::Client => "client",
            ErrorClass::Server => "server",
            ErrorClass::Network => "network",
            ErrorClass::Timeout => "timeout",
            ErrorClass::RateLimit => "rate_limit",
        }
    }

    /// Whether it counts as a failure of the upstream for the circuit breaker.
    pub fn is_upstream_failure(self) -> bool {
        matches!(
            self,
            ErrorClass::Network | ErrorClass::Timeout | ErrorClass::Server
        )
    }
}

/// An upstream answer's header, as far as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// Status code.
    pub status: u16,
    /// `WWW-Authenticate`, if any.
    pub www_authenticate: Option<&'a [u8]>,
    /// `Retry-After` of a 429 or 503, parsed ([`retry_after_of`]).
    pub retry_after: Option<Duration>,
    /// `grpc-status` in the header: a gRPC trailers-only answer carries its status there.
    pub grpc_status: Option<&'a [u8]>,
}

/// gRPC's UNAUTHENTICATED: a gRPC server refuses a token with HTTP 200 and this status.
const GRPC_UNAUTHENTICATED: &[u8] = b"16";

/// A gRPC answer that refused the token: `grpc-status: 16` (UNAUTHENTICATED) in the header,
/// which gRPC servers send as a trailers-only answer. Counts as an expired-token answer.
pub fn grpc_unauthenticated(grpc_status: Option<&[u8]>) -> bool {
    grpc_status.is_some_and(|v| v.trim_ascii() == GRPC_UNAUTHENTICATED)
}

/// The request's state when the answer came.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Requests sent upstream so far, this one included.
    pub attempts: u32,
    /// Transient retries done so far.
    pub transient: u32,
    /// Whether the request may be sent again, or why not.
    pub replay: Result<(), SkipReason>,
    /// This request already forced a refresh (a fresh token rejected too passes through).
    pub forced: bool,
    /// Pingora's retry buffer holds the whole body (or there is none): Pingora can resend it.
    pub body_whole: bool,
    /// The token of this attempt, if one was injected.
    pub token: Option<Generations>,
}

/// Token generations, for the generation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    /// The generation this attempt carried.
    pub sent: u64,
    /// The provider's newest.
    pub current: u64,
}

/// The config the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Transient retries.
    pub retry: &'a Retry,
    /// Expired-token detection of the route.
    pub expiry: &'a Expiry,
    /// `replay.max_attempts`.
    pub max_attempts: u32,
}

/// What to do with an upstream answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Give the answer to the client.
    Pass,
    /// Give the answer to the client: the token expired but the request is not replayed, for
    /// this reason (`sidecar_replay_skipped_total`).
    Skip(SkipReason),
    /// A transient failure: send the request again after `delay`; Pingora's retry buffer
    /// carries the body.
    Retry {
        /// Backoff with jitter, or the upstream's `Retry-After` (bounded).
        delay: Duration,
    },
    /// Only the body can tell whether the token expired: hold this answer back, and let the
    /// sidecar re-send the request itself and look at the body of that answer.
    CheckBody,
    /// The token expired: get the next token (refreshing first when `refresh`, else taking the
    /// newer one already held) and resend through Pingora's retry loop.
    Replay {
        /// The rejected generation is still the newest: one refresh is needed.
        refresh: bool,
    },
    /// As [`Step::Replay`], but the body is beyond Pingora's retry buffer: the sidecar replays
    /// the request itself with the body it kept.
    OwnReplay {
        /// As in [`Step::Replay`].
        refresh: bool,
    },
}

/// A backoff step with ±20 % jitter, so that retries of many requests spread out; `jitter` is
/// a draw from `[0, 1)`.
pub fn jittered(d: Duration, jitter: f64) -> Duration {
    d.mul_f64(0.8 + jitter.clamp(0.0, 1.0) * 0.4)
}

/// The delay before transient retry number `done + 1`, `None` once `retry.backoff` is used up.
fn backoff(retry: &Retry, done: u32, jitter: f64) -> Option<Duration> {
    let step = retry.backoff.get(usize::try_from(done).ok()?)?;
    Some(jittered(*step, jitter))
}

/// The `Retry-After` of an answer that may carry one (429 and 503), read relative to
/// `now`; `None` for other statuses and for values that are neither seconds nor an HTTP date.
pub fn retry_after_of(status: u16, value: Option<&[u8]>, now: SystemTime) -> Option<Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let v = std::str::from_utf8(value?).ok()?;
    parse_retry_after(v, now)
}

/// What to do with an upstream answer, in this order: statuses below 400 pass;
/// a transient status (`retry.statuses`, or a 429 that says `Retry-After`) of a replayable
/// request whose body Pingora holds is retried while `retry.backoff` lasts, after the backoff
/// or the upstream's `Retry-After` (when `respect_retry_after`, at most `max_retry_after`);
/// then the expired-token rules, only for a request that carried a token (a gRPC
/// `grpc-status: 16` in the header counts as expired, whatever the HTTP status). `jitter` is a draw
/// from `[0, 1)`.
pub fn after_response(
    answer: &Answer<'_>,
    state: &Attempt,
    policy: &Policy<'_>,
    jitter: f64,
) -> Step {
    let status = answer.status;
    let grpc_refused = grpc_unauthenticated(answer.grpc_status);
    if status < 400 && !grpc_refused {
        // Expiry and retry statuses are error statuses (config validation): nothing to decide.
        return Step::Pass;
    }
    let retry = policy.retry;
    let transient =
        retry.statuses.contains(&status) || (status == 429 && answer.retry_after.is_some());
    if transient && state.replay.is_ok() && state.body_whole {
        if let Some(backoff) = backoff(retry, state.transient, jitter) {
            let delay = match answer.retry_after {
                Some(d) if retry.respect_retry_after => d.min(retry.max_retry_after),
                _ => backoff,
            };
            return Step::Retry { delay };
        }
    }
    if state.token.is_none() {
        return Step::Pass;
    }
    if grpc_refused {
        // gRPC answers end in trailers, which the sidecar's own replay path does not carry:
        // only Pingora's retry loop (the call's body in its buffer) replays a gRPC call.
        return match after_expired_token(state, policy.max_attempts) {
            Step::OwnReplay { .. } => Step::Skip(SkipReason::BodyTooLarge),
            step => step,
        };
    }
    match classify(status, answer.www_authenticate, policy.expiry) {
        ExpiryVerdict::NotExpired => Step::Pass,
        ExpiryVerdict::CheckBody => {
            if state.replay.is_err() || state.attempts >= policy.max_attempts {
                Step::Pass
            } else {
                Step::CheckBody
            }
        }
        ExpiryVerdict::Expired => after_expired_token(state, policy.max_attempts),
    }
}

/// What to do once an answer says the token expired (by its header, or by its body after
/// [`Step::CheckBody`]): the replayability and the generation rule. Never
/// [`Step::Retry`] or [`Step::CheckBody`].
pub fn after_expired_token(state: &Attempt, max_attempts: u32) -> Step {
    if let Err(reason) = state.replay {
        return Step::Skip(reason);
    }
    let Some(g) = state.token else {
        return Step::Skip(SkipReason::NoToken);
    };
    match after_expired(
        state.attempts,
        max_attempts,
        g.sent,
        g.current,
        state.forced,
    ) {
        NextStep::PassThrough(reason) => Step::Skip(reason),
        NextStep::Replay { refresh } if state.body_whole => Step::Replay { refresh },
        NextStep::Replay { refresh } => Step::OwnReplay { refresh },
    }
}

/// How a connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The connect timed out.
    Timeout,
    /// A certificate that does not verify, a failed TLS handshake: the next try fails alike.
    Permanent,
    /// Refused, reset, unreachable.
    Other,
}

/// After a failed connect (nothing was sent, so any request may go again): the class, and the
/// delay before the next try while `retry.backoff` lasts (`None`: give up). `jitter` is a draw
/// from `[0, 1)`.
pub fn after_connect_failure(
    failure: ConnectFailure,
    transient_done: u32,
    retry: &Retry,
    jitter: f64,
) -> (ErrorClass, Option<Duration>) {
    let class = match failure {
        ConnectFailure::Timeout => ErrorClass::Timeout,
        ConnectFailure::Permanent | ConnectFailure::Other => ErrorClass::Network,
    };
    let delay = match failure {
        ConnectFailure::Permanent => None,
        ConnectFailure::Timeout | ConnectFailure::Other => backoff(retry, transient_done, jitter),
    };
    (class, delay)
}

#[cfg(test)]
mod tests;
