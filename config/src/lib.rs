#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Configuration of token-sidecar: the YAML schema users write ([`schema`]), the value types that
//! parse while it is read ([`values`]), and the validated [`Config`] the rest of the sidecar uses.
//!
//! Every error names its place as `file:line:col: message`, like `nginx -t`.

pub mod read;
mod refs;
pub mod schema;
mod strict;
pub mod tls;
mod validate;
pub mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};

pub use read::{read_bounded, read_within, ReadError, MAX_FILE, READ_TIMEOUT};
pub use refs::{MAX_REFERENCED, REFERENCES_TIME};
pub use schema::{
    ClientAuth, ClientAuthorization, LogFormat, ProviderType, RawAdmin, RawConfig, RawLog,
    UpstreamProtocol,
};
pub use schema::{OnRedisDown, RateLimitMode};
pub use tls::{Identity, Tls};
pub use values::{
    parse_duration, parse_percent, parse_rate, parse_size, Rate, Secret, SecretJson, MAX_DURATION,
    MAX_SIZE,
};

/// A config that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, not a regular file, over 4 MiB, too slow).
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: ReadError,
    },
    /// A problem at a known place.
    #[error("{file}:{line}:{col}: {message}")]
    At {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem with no single place.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// Something a config says that is probably not what its author meant; `check` prints it and
/// exits 0, `run` logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The file.
    pub file: String,
    /// 1-based line and column of the key it is about, if it is in the file.
    pub place: Option<(usize, usize)>,
    /// What looks wrong.
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.place {
            Some((line, col)) => write!(f, "{}:{line}:{col}: warning: {}", self.file, self.message),
            None => write!(f, "{}: warning: {}", self.file, self.message),
        }
    }
}

/// A check of a validated provider that needs more than this crate has (the token crate parses
/// `private_key_jwt` keys with it), run while a config is loaded so that `check`, `run` and a
/// reload refuse the same things. `Err((key under the provider, message))`; the message must not
/// contain secrets.
pub type ProviderCheck = fn(&Provider) -> Result<(), (String, String)>;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// What the user wrote, with defaults filled in (printed by `check`, secrets redacted).
    pub raw: RawConfig,
    /// Where it was read from, if from a file.
    pub source: Option<PathBuf>,
    /// Data-plane address: TCP or a Unix socket.
    pub listen: Listen,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Probe-only address (`/healthz`, `/readyz`, `/metrics`), if any.
    pub probe_listen: Option<SocketAddr>,
    /// Bearer token the admin API's POST endpoints take from clients off loopback.
    pub admin_token: Option<Secret>,
    /// SIGTERM grace period.
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long new requests are still taken before draining.
    pub shutdown_delay: Duration,
    /// What looked suspicious when it was read (printed by `check`, logged by `run`).
    pub warnings: Vec<Warning>,
    /// Worker threads of the proxy service (`auto` resolved to the cores available).
    pub threads: usize,
    /// Providers by name.
    pub providers: BTreeMap<String, Provider>,
    /// Upstream routes in file order.
    pub upstreams: Vec<Upstream>,
    /// Replay and token-wait settings.
    pub replay: Replay,
    /// Client-side rate limits in file order.
    pub rate_limits: Vec<RateLimit>,
    /// Client connection limits.
    pub downstream: Downstream,
    /// How upstream host names are resolved.
    pub dns: Dns,
    /// Retry of transient upstream failures.
    /// Streams (WebSocket, Server-Sent Events) open at once.
    pub max_streams: usize,
    /// Retry of transient upstream failures.
    pub retry: Retry,
    /// Logging.
    pub log: Log,
    /// Replicas sharing one account through Redis; `None`: nothing is shared.
    pub shared: Option<Shared>,
}

/// `shared:` validated: how replicas reach the Redis they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The connection URL, password included: only for the Redis client.
    pub url: Secret,
    /// The same with any password replaced by `<redacted>`: for logs, status and errors.
    pub shown_url: String,
    /// Replicas with the same prefix share state.
    pub key_prefix: String,
    /// What a replica does while Redis cannot be reached.
    pub on_redis_down: OnRedisDown,
    /// Tokens may lie in Redis unencrypted (providers without a store key).
    pub plaintext_tokens: bool,
    /// Bound on every Redis call.
    pub timeout: Duration,
    /// Lease of the refresh lock.
    pub lease: Duration,
}

/// Retry of transient upstream failures, validated: every status is an error status
/// (400-599).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Statuses that count as transient, in file order.
    pub statuses: Vec<u16>,
    /// Delays before the 1st, 2nd, … retry; their number is the number of retries.
    pub backoff: Vec<Duration>,
    /// Honour an upstream's `Retry-After` (on 429 and 503).
    pub respect_retry_after: bool,
    /// Longest `Retry-After` the sidecar waits for (and holds an upstream for).
    pub max_retry_after: Duration,
}

/// Where the data plane listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket at this absolute path (`listen: "unix:/run/token-sidecar/sock"`): for
    /// applications on the same host that share a socket rather than a port.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How upstream host names are resolved, validated: `min_ttl` is at least 1 s and at most
/// `max_ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// DNS servers to ask; empty: the system's.
    pub nameservers: Vec<SocketAddr>,
    /// Shortest interval between two lookups of a name (and the retry after a failed one).
    pub min_ttl: Duration,
    /// Longest interval between two lookups of a name.
    pub max_ttl: Duration,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter directive.
    pub level: String,
    /// Text or one JSON object per line.
    pub format: LogFormat,
    /// One line per proxied request.
    pub access_log: bool,
}

/// Limits on client (downstream) connections, validated: both timeouts are positive,
/// the cap is at least one. Read per connection, so a reload applies to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downstream {
    /// A request head must be read whole within this.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// Client connections at once.
    pub max_connections: usize,
    /// Bytes of read buffer per client connection (0: none). Only read at start: the listener
    /// is built once.
    pub read_buffer: usize,
}

/// One token provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    /// Its name in the file.
    pub name: String,
    /// How it gets tokens.
    pub kind: ProviderKind,
    /// Lifetime assumed when neither `expires_in` nor a JWT `exp` says.
    pub default_ttl: Duration,
    /// When to refresh.
    pub refresh: RefreshPolicy,
    /// Encrypted persistence across restarts; `None`: tokens live in memory only.
    pub store: Option<Store>,
    /// Its tokens are shared with the other replicas through `shared.redis`.
    pub shared: bool,
    /// Trust and client certificate for the identity provider's endpoints.
    pub tls_config: Tls,
}

/// Where and with which key a provider's tokens are persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// The store file.
    pub path: PathBuf,
    /// A 32-byte base64 key, or else a passphrase for the KDF.
    pub key: Secret,
}

/// An OAuth2 client as the token endpoint knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthClient {
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// How the client authenticates.
    pub credential: ClientCredential,
}

/// How an OAuth2 client proves who it is at the token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientCredential {
    /// A public client: only `client_id` is sent, as a form field.
    None,
    /// `client_secret_basic`.
    SecretBasic(Secret),
    /// `client_secret_post`.
    SecretPost(Secret),
    /// `private_key_jwt` (RFC 7523): a JWT signed with this PEM key (RS256 or ES256).
    PrivateKeyJwt {
        /// The PEM private key.
        key: Secret,
        /// `kid` header of the assertion.
        key_id: Option<String>,
    },
}

/// What an `oauth2_refresh_token` provider does when its refresh token is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum LoginFallback {
    /// Resource-owner password grant.
    Password {
        /// Resource owner.
        username: String,
        /// Password.
        password: Secret,
    },
    /// Client-credentials grant with the provider's client.
    ClientCredentials,
}

/// One JSON call of `json_login` (the login or the renew).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonCall {
    /// Endpoint.
    pub url: String,
    /// HTTP method.
    pub method: Method,
    /// Extra headers (values may be secrets).
    pub headers: Vec<(HeaderName, Secret)>,
    /// JSON body template.
    pub body: Option<SecretJson>,
    /// JSON pointer to the token.
    pub token_pointer: String,
    /// JSON pointer to the lifetime in seconds.
    pub expires_in_pointer: Option<String>,
    /// JSON pointer to the expiry (Unix seconds or RFC 3339).
    pub expires_at_pointer: Option<String>,
    /// JSON pointer to a success flag.
    pub success_pointer: Option<String>,
    /// JSON pointer to the error message.
    pub error_pointer: Option<String>,
}

/// How a provider obtains tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderKind {
    /// OAuth2 client credentials grant.
    ClientCredentials {
        /// The client.
        client: OAuthClient,
        /// Scopes, joined by spaces when sent.
        scopes: Vec<String>,
        /// Extra form fields.
        params: BTreeMap<String, String>,
    },
    /// OAuth2 refresh-token grant from a configured initial refresh token.
    RefreshToken {
        /// The client.
        client: OAuthClient,
        /// The initial refresh token (rotated ones are held in memory and in the store).
        refresh_token: Secret,
        /// Scopes, joined by spaces when sent.
        scopes: Vec<String>,
        /// Extra form fields.
        params: BTreeMap<String, String>,
        /// Login used when the refresh token is refused.
        fallback: Option<LoginFallback>,
    },
    /// OAuth2 password grant, then refresh-token grants while they work.
    Password {
        /// The client.
        client: OAuthClient,
        /// Resource owner.
        username: String,
        /// Password.
        password: Secret,
        /// Scopes, joined by spaces when sent.
        scopes: Vec<String>,
        /// Extra form fields.
        params: BTreeMap<String, String>,
    },
    /// A JSON login endpoint with an optional renew call.
    JsonLogin {
        /// The login call.
        login: Box<JsonCall>,
        /// The renew call, sent with the current token as Bearer.
        renew: Option<Box<JsonCall>>,
    },
    /// A command whose output is the token.
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
        /// Kill the command after this long.
        timeout: Duration,
        /// Extra environment.
        env: BTreeMap<String, Secret>,
    },
    /// A token file, re-read when it changes.
    File {
        /// The file.
        path: PathBuf,
    },
    /// A fixed token.
    Static {
        /// The token.
        token: Secret,
    },
}

/// Proactive refresh and failure backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPolicy {
    /// Refresh once TTL drops below this (capped at half the lifetime).
    pub before_expiry: Duration,
    /// Fraction of `before_expiry` by which refreshes are spread.
    pub jitter: f64,
    /// Treat a token as expired this much early (capped at a quarter of the lifetime).
    pub skew: Duration,
    /// Minimum spacing of proactive refreshes.
    pub min_interval: Duration,
    /// Delays after consecutive failures; the last repeats.
    pub backoff: Vec<Duration>,
    /// After this many failures in a row, failures are logged at error level.
    pub escalate_after: u32,
}

/// One upstream route, parsed.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Name for logs and metrics.
    pub name: String,
    /// `https`?
    pub tls: bool,
    /// Host from the URL (no brackets for IPv6).
    pub host: String,
    /// Port from the URL or the scheme's default.
    pub port: u16,
    /// `Host` header value to send: host, plus the port when it is not the default.
    pub authority: String,
    /// Base path from the URL without a trailing slash (`""` for none).
    pub base_path: String,
    /// Provider name, if tokens are injected.
    pub provider: Option<String>,
    /// Path prefix that selects this route.
    pub path_prefix: String,
    /// Host that selects this route (lowercase, no port).
    pub match_host: Option<String>,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Where the token goes.
    pub inject: Inject,
    /// What to do with a client's own `Authorization`.
    pub client_authorization: ClientAuthorization,
    /// Replays allowed on this route.
    pub replay: bool,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Idle timeout of pooled connections.
    pub idle_timeout: Duration,
    /// Silence that closes a stream once it started (replaces `read_timeout` then).
    pub stream_idle_timeout: Duration,
    /// The least token lifetime a WebSocket upgrade or event-stream request starts with (its
    /// own `upgrade:` or the top-level one); zero: any usable token.
    pub upgrade_min_ttl: Duration,
    /// Trust (`tls.ca_file` or the system store) and client certificate, read and checked.
    pub tls_config: Tls,
    /// SNI / certificate name override.
    pub server_name: Option<String>,
    /// HTTP version spoken to it.
    pub protocol: UpstreamProtocol,
    /// Expired-token detection.
    pub expiry: Expiry,
    /// Consecutive network/5xx failures that open the circuit breaker (0: off).
    pub breaker_failures: u32,
    /// How long the breaker stays open.
    pub breaker_cooldown: Duration,
}

/// Where the token is put.
#[derive(Debug, Clone)]
pub struct Inject {
    /// Header, if any.
    pub header: Option<HeaderName>,
    /// Scheme before the token (`Bearer`); empty for the bare token.
    pub scheme: String,
    /// Query parameter, if any.
    pub query: Option<String>,
}

/// Expired-token detection.
#[derive(Debug, Clone)]
pub struct Expiry {
    /// Statuses that always mean expired.
    pub statuses: Vec<u16>,
    /// Lowercased patterns looked for in the body.
    pub body_patterns: Vec<String>,
    /// Statuses whose body is searched.
    pub body_statuses: Vec<u16>,
}

/// Replay and token-wait settings.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Attempts in all.
    pub max_attempts: u32,
    /// Largest buffered body.
    pub max_body: u64,
    /// Methods that may be replayed.
    pub idempotent_methods: Vec<Method>,
    /// Header that makes any method replayable.
    pub idempotency_header: HeaderName,
    /// Wait bound for a usable token.
    pub wait_for_token: Duration,
    /// Requests that may wait at once.
    pub max_waiting: usize,
    /// Add `X-Sidecar-Replayed`.
    pub debug_header: bool,
}

/// One client-side rate limit, validated. Equal values mean "unchanged" across a
/// reload, so the limiter keeps that rule's state.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Name for metrics, logs and 429 answers.
    pub name: String,
    /// Name of the upstream whose requests it limits.
    pub upstream: String,
    /// Methods it counts; empty: any.
    pub methods: Vec<Method>,
    /// Path glob (`*` one segment, `**` any); `None`: any path.
    pub path: Option<globset::Glob>,
    /// Requests per period.
    pub rate: Rate,
    /// Requests that may go at once after a quiet spell.
    pub burst: u32,
    /// Delay or reject what is over the limit.
    pub mode: RateLimitMode,
    /// Longest delay in `wait` mode.
    pub max_wait: std::time::Duration,
    /// Separate limits per client, if set.
    pub key: Option<RateKey>,
    /// Most keys remembered at once.
    pub max_keys: usize,
    /// Held across all replicas through `shared.redis`.
    pub shared: bool,
}

/// What separates the clients of a keyed rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The client's IP address.
    ClientIp,
    /// The value of this request header.
    Header(HeaderName),
}

impl Config {
    /// Reads and validates a file: a regular file of at most [`MAX_FILE`] bytes of UTF-8,
    /// read within [`read::READ_TIMEOUT`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, None)
    }

    /// [`Config::load`] with a further check of every provider.
    pub fn load_with(path: &Path, check: Option<ProviderCheck>) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let bytes = read_bounded(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = good.iter().filter(|b| **b == b'\n').count() + 1;
                let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let col = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
                return Err(ConfigError::At {
                    file,
                    line,
                    col,
                    message: "the file is not UTF-8 text".into(),
                });
            }
        };
        let mut config = Config::parse_with(&text, &file, check)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Validates YAML text; `file` names it in errors. Refused besides what the schema refuses:
    /// a text with no settings at all (an empty or truncated file must never replace a running
    /// config with "all defaults, no routes"), a key written twice in one mapping, custom tags.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, file, None)
    }

    /// [`Config::parse`] with a further check of every provider.
    pub fn parse_with(
        text: &str,
        file: &str,
        check: Option<ProviderCheck>,
    ) -> Result<Config, ConfigError> {
        let yaml_error = |e: serde_yaml::Error| match e.location() {
            Some(loc) => ConfigError::At {
                file: file.to_string(),
                line: loc.line(),
                col: loc.column(),
                message: strip_location(&e.to_string(), loc.line(), loc.column()),
            },
            None => ConfigError::Invalid {
                file: file.to_string(),
                message: e.to_string(),
            },
        };
        if strict::check(text).map_err(yaml_error)? == strict::Top::Nothing {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                message: "the file holds no settings (it is empty, or only comments); \
                          a config needs at least `upstreams:`"
                    .into(),
            });
        }
        refs::with_budget(|| {
            let raw: RawConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
            validate::validate(raw, text, file, check)
        })
    }

    /// The resolved config as YAML with every secret shown as `<redacted>`.
    pub fn redacted_yaml(&self) -> String {
        serde_yaml::to_string(&self.raw).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// serde_yaml writes " at line L column C" into its messages (a syntax error also names where
/// the enclosing construct started); the location goes in front instead, once.
fn strip_location(msg: &str, line: usize, col: usize) -> String {
    let own = format!(" at line {line} column {col}");
    let rest = msg.replace(&own, "");
    rest.replace(" at line ", " that starts at line ")
}

#[cfg(test)]
mod tests;
