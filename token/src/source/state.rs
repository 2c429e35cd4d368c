//! What a source reports about itself: its state, why a refresh started, and the
//! status `/v1/token/status` shows.

use serde::Serialize;

/// Why a refresh started; a label of `sidecar_token_refresh_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first token.
    Initial,
    /// Ahead of expiry, in the background.
    Proactive,
    /// A request found no usable token.
    Expired,
    /// The upstream rejected the current token.
    Unauthorized,
    /// An `ensure` call or a long operation needed more TTL.
    Ensure,
    /// `POST /v1/token/refresh`.
    Manual,
}

impl Trigger {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Initial => "initial",
            Trigger::Proactive => "proactive",
            Trigger::Expired => "expired",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Ensure => "ensure",
            Trigger::Manual => "manual",
        }
    }
}

/// Token state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No token yet and no refresh failed yet.
    Initial,
    /// A usable token.
    Valid,
    /// A refresh is in flight.
    Refreshing,
    /// The last refresh failed; the old token is still usable.
    Error,
    /// No usable token.
    Expired,
}

impl State {
    /// All states, for the `token_state` gauge.
    pub const ALL: [State; 5] = [
        State::Initial,
        State::Valid,
        State::Refreshing,
        State::Error,
        State::Expired,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initial => "initial",
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Error => "error",
            State::Expired => "expired",
        }
    }
}

/// What `/v1/token/status` shows of one provider. Never the token.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Provider name.
    pub provider: String,
    /// State.
    pub state: State,
    /// Generation of the current token (0: none yet).
    pub generation: u64,
    /// RFC 3339 expiry of the current token.
    pub expires_at: Option<String>,
    /// Seconds until it expires (negative: expired).
    pub ttl_seconds: Option<f64>,
    /// RFC 3339 time of the last successful refresh.
    pub last_refresh_at: Option<String>,
    /// The last refresh error, cleared by a success.
    pub last_error: Option<String>,
    /// Successful refreshes.
    pub refresh_ok: u64,
    /// Failed refreshes.
    pub refresh_failed: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// First 8 hex of the token's SHA-256.
    pub fingerprint: Option<String>,
    /// For a provider shared with other replicas: `connected` or `down` (the Redis they share).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<&'static str>,
}
