//! The YAML schema: what users write. Unknown keys are rejected so typos surface at load time.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::{Dur, Percent, Secret, SecretJson, Size};

fn secs(n: u64) -> Dur {
    Dur(Duration::from_secs(n))
}
fn millis(n: u64) -> Dur {
    Dur(Duration::from_millis(n))
}
fn yes() -> bool {
    true
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Data-plane listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin API listen address.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Serves only `/healthz`, `/readyz` and `/metrics` (for kubelet probes and Prometheus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_listen: Option<String>,
    /// Admin API settings.
    #[serde(default, skip_serializing_if = "RawAdmin::is_empty")]
    pub admin: RawAdmin,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(default = "default_grace")]
    pub shutdown_grace: Dur,
    /// After SIGTERM, how long new requests are still taken (readiness already says 503).
    #[serde(default = "default_delay")]
    pub shutdown_delay: Dur,
    /// Worker threads of the proxy service: a count, or `auto` for one per core.
    #[serde(default)]
    pub threads: Threads,
    /// Token providers by name.
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    /// Upstream routes, matched in order of specificity.
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// Replay of requests that met an expired token.
    #[serde(default)]
    pub replay: RawReplay,
    /// Retry of transient upstream failures.
    #[serde(default)]
    pub retry: RawRetry,
    /// Client-side rate limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RawRateLimit>,
    /// Client connections: head and idle timeouts, connection cap.
    #[serde(default)]
    pub downstream: RawDownstream,
    /// How upstream host names are resolved.
    #[serde(default)]
    pub dns: RawDns,
    /// WebSocket upgrades and event streams: the least token lifetime they start with.
    #[serde(default)]
    pub upgrade: RawUpgrade,
    /// Streams (WebSocket, Server-Sent Events) open at once; more are refused with 503.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Logging.
    #[serde(default)]
    pub log: RawLog,
    /// Replicas sharing one account through Redis; absent: nothing is shared and nothing
    /// connects to Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<RawShared>,
}

/// `shared:`: several sidecars acting as one client of the identity provider and the API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    /// The Redis (or Valkey) server the replicas share.
    pub redis: RawRedis,
    /// What a replica does while Redis cannot be reached.
    #[serde(default)]
    pub on_redis_down: OnRedisDown,
}

/// Where the shared state lives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://[:password@]host[:port][/db]` or `rediss://` for TLS; the password by
    /// `${env:NAME}`. Never printed as written.
    pub url: Secret,
    /// Replicas with the same prefix share state.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Store tokens in Redis unencrypted (for providers without a `store.key`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext_tokens: bool,
    /// Bound on every Redis call.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// Lease of the refresh lock; its holder renews it while the identity-provider call runs.
    #[serde(default = "default_lease")]
    pub lease: Dur,
}

fn default_key_prefix() -> String {
    "token-sidecar".into()
}
fn default_redis_timeout() -> Dur {
    millis(500)
}
fn default_lease() -> Dur {
    secs(10)
}

/// What a replica does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisDown {
    /// Each replica goes on alone: its own refreshes and rate limits.
    #[default]
    Local,
    /// Keep the current token until it expires, then answer 503 `token_unavailable`: for APIs
    /// that allow one session per key.
    FailClosed,
}

fn default_delay() -> Dur {
    secs(0)
}

/// The admin API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Bearer token that POST endpoints accept from clients that are not on loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

impl RawAdmin {
    fn is_empty(&self) -> bool {
        self.token.is_none()
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}
fn default_grace() -> Dur {
    secs(5)
}
fn default_max_streams() -> usize {
    10_000
}

/// Requests that open a long-lived connection (a WebSocket upgrade, `Accept: text/event-stream`)
/// go out only with a token that lives at least `min_ttl`, so the connection is not closed by
/// its upstream a moment after it opened.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpgrade {
    /// The least time left on the token (capped at half the token's lifetime); `0s` turns it off.
    #[serde(default = "default_min_ttl")]
    pub min_ttl: Dur,
}

fn default_min_ttl() -> Dur {
    secs(5 * 60)
}

impl Default for RawUpgrade {
    fn default() -> Self {
        RawUpgrade {
            min_ttl: default_min_ttl(),
        }
    }
}

/// `threads:` as written: a count (validated to 1..=[`MAX_THREADS`]) or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// This many threads.
    Count(u64),
    /// One per core the process may run on.
    Auto,
}

/// The most worker threads `threads:` accepts.
pub const MAX_THREADS: u64 = 256;

impl Default for Threads {
    fn default() -> Self {
        Threads::Count(1)
    }
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Threads;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of threads (1, 2, ...) or auto")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Threads, E> {
                Ok(Threads::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Threads, E> {
                u64::try_from(v)
                    .map(Threads::Count)
                    .map_err(|_| E::custom(format!("threads must be at least 1, not {v}")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Threads, E> {
                if v.trim().eq_ignore_ascii_case("auto") {
                    return Ok(Threads::Auto);
                }
                v.trim().parse::<u64>().map(Threads::Count).map_err(|_| {
                    E::custom(format!(
                        "threads must be a number of threads or auto, not {v:?}"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Threads {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Threads::Count(n) => s.serialize_u64(*n),
            Threads::Auto => s.serialize_str("auto"),
        }
    }
}

/// Provider types that this build supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    /// RFC 6749 §4.4.
    Oauth2ClientCredentials,
    /// RFC 6749 §6, from a configured initial refresh token.
    Oauth2RefreshToken,
    /// RFC 6749 §4.3, then refresh-token grants while they work.
    Oauth2Password,
    /// A non-standard JSON login endpoint, with an optional renew call.
    JsonLogin,
    /// A command that prints a token.
    Exec,
    /// A token file, re-read when it changes.
    File,
    /// A fixed token.
    Static,
}

/// How an OAuth2 client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret.
    #[default]
    ClientSecretBasic,
    /// Id and secret as form fields.
    ClientSecretPost,
    /// A signed JWT assertion (RFC 7523) made with `private_key`.
    PrivateKeyJwt,
}

/// One provider. Fields are flat so unknown keys are still caught; validation checks which
/// fields a type needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// Provider type.
    #[serde(rename = "type")]
    pub kind: ProviderType,
    /// Token endpoint (OAuth2 types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// OAuth2 client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// OAuth2 client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// OAuth2 client authentication method.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Requested scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Extra form fields sent to the token endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// The token of a `static` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// PEM private key (RS256 or ES256) for `client_auth: private_key_jwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<Secret>,
    /// `kid` header of `private_key_jwt` assertions, when the IdP needs it to pick the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Initial refresh token of an `oauth2_refresh_token` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Resource owner (`oauth2_password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Resource owner's password (`oauth2_password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// The login call of `json_login`, or the fallback login of `oauth2_refresh_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<RawLogin>,
    /// The optional renew call of `json_login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew: Option<RawRenew>,
    /// Command and arguments of an `exec` provider (no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// How long an `exec` command may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Extra environment of an `exec` command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Secret>,
    /// Token file of a `file` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Encrypted persistence across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<RawStore>,
    /// Lifetime assumed when the answer carries none.
    #[serde(default = "default_ttl")]
    pub default_ttl: Dur,
    /// Refresh policy.
    #[serde(default)]
    pub refresh: RawRefresh,
    /// Share this provider's tokens through `shared.redis`; default: true when `shared` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    /// Trust and client certificate for the identity provider (types that call one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawProviderTls>,
}

/// TLS to an identity provider.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviderTls {
    /// PEM bundle of CAs to trust instead of the system store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM client certificate (chain, leaf first) for RFC 8705 `tls_client_auth`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
}

fn default_ttl() -> Dur {
    secs(3600)
}

/// A login call. `json_login` uses the JSON fields; the fallback `login` of
/// `oauth2_refresh_token` uses `type` (and `username`/`password` for `oauth2_password`). One
/// flat struct so unknown keys are still caught; validation checks which fields apply.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogin {
    /// Fallback grant: `oauth2_password` or `oauth2_client_credentials`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProviderType>,
    /// Resource owner, for a password fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Resource owner's password, for a password fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Login endpoint (`json_login`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP method of the login call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Extra request headers; values may hold secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Secret>,
    /// JSON body template, sent as JSON; `${env:}`/`${file:}` references are resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<SecretJson>,
    /// JSON pointer to the token in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_pointer: Option<String>,
    /// JSON pointer to the lifetime in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_pointer: Option<String>,
    /// JSON pointer to the expiry (Unix seconds or RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_pointer: Option<String>,
    /// JSON pointer to a success flag; `false` means the login failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_pointer: Option<String>,
    /// JSON pointer to the error message of a failed login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pointer: Option<String>,
}

/// The renew call of `json_login`: trades the current token (sent as Bearer) for a new one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRenew {
    /// Renew endpoint.
    pub url: String,
    /// HTTP method (default POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Extra request headers; values may hold secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Secret>,
    /// Optional JSON body template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<SecretJson>,
    /// JSON pointer to the new token.
    pub token_pointer: String,
    /// JSON pointer to the lifetime in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_pointer: Option<String>,
    /// JSON pointer to the expiry (Unix seconds or RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_pointer: Option<String>,
    /// JSON pointer to a success flag; `false` means the renew failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_pointer: Option<String>,
    /// JSON pointer to the error message of a failed renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pointer: Option<String>,
}

/// Encrypted token store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// The store file; its directory must exist.
    pub path: String,
    /// A 32-byte base64 key (`token-sidecar keygen`) or a passphrase.
    pub key: Secret,
}

/// When to refresh.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRefresh {
    /// Refresh once the remaining lifetime drops below this (capped at half the lifetime).
    #[serde(default = "default_before")]
    pub before_expiry: Dur,
    /// Spread of proactive refreshes, as a fraction of `before_expiry`.
    #[serde(default = "default_jitter")]
    pub jitter: Percent,
    /// Treat a token as expired this much early (capped at a quarter of the lifetime).
    #[serde(default = "default_skew")]
    pub skew: Dur,
    /// Never two proactive refreshes closer than this.
    #[serde(default = "default_min_interval")]
    pub min_interval: Dur,
    /// Delays after consecutive failed refreshes; the last repeats.
    #[serde(default = "default_backoff")]
    pub backoff: Vec<Dur>,
    /// After this many failures in a row, failures are logged at error level.
    #[serde(default = "default_escalate_after")]
    pub escalate_after: u32,
}

fn default_escalate_after() -> u32 {
    3
}

fn default_before() -> Dur {
    secs(30 * 60)
}
fn default_jitter() -> Percent {
    Percent(0.10)
}
fn default_skew() -> Dur {
    secs(30)
}
fn default_min_interval() -> Dur {
    secs(5)
}
fn default_backoff() -> Vec<Dur> {
    vec![secs(30), secs(60), secs(120), secs(300)]
}

impl Default for RawRefresh {
    fn default() -> Self {
        RawRefresh {
            before_expiry: default_before(),
            jitter: default_jitter(),
            skew: default_skew(),
            min_interval: default_min_interval(),
            backoff: default_backoff(),
            escalate_after: default_escalate_after(),
        }
    }
}

/// What to do with an `Authorization` header the client sent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthorization {
    /// Replace it with the provider's token.
    #[default]
    Overwrite,
    /// Forward the client's own and inject nothing.
    Keep,
    /// Refuse the request with 401 `client_authorization`.
    Reject,
}

/// One upstream route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Name used in metrics and logs.
    pub name: String,
    /// `scheme://host[:port][/base-path]`.
    pub url: String,
    /// Provider whose token is injected; none means plain pass-through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Which requests this route takes.
    #[serde(default, rename = "match")]
    pub matcher: RawMatch,
    /// Where the token goes.
    #[serde(default)]
    pub inject: RawInject,
    /// Policy for a client's own `Authorization` header.
    #[serde(default)]
    pub client_authorization: ClientAuthorization,
    /// `false`: never replay on this route.
    #[serde(default = "yes")]
    pub replay: bool,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Overrides the top-level `upgrade:` for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<RawUpgrade>,
    /// Upstream TLS settings.
    #[serde(default)]
    pub tls: RawTls,
    /// HTTP version spoken to the upstream.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// How an expired-token answer looks.
    #[serde(default)]
    pub expiry: RawExpiry,
    /// Fail fast after repeated network or 5xx failures.
    #[serde(default)]
    pub circuit_breaker: RawBreaker,
}

/// Circuit breaker of one upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Consecutive network/5xx failures that open it; 0 turns it off.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// How long it stays open before one probe goes through.
    #[serde(default = "default_breaker_cooldown")]
    pub cooldown: Dur,
}

fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> Dur {
    secs(10)
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            failures: default_breaker_failures(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

/// Route match. Both set: both must match.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// Path prefix on segment boundaries (`/api` takes `/api` and `/api/x`, not `/apix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// `Host` header (port ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Remove `path_prefix` before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// Where to put the token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    /// Header name; `null` for none (query only).
    #[serde(default = "default_inject_header")]
    pub header: Option<String>,
    /// Scheme written before the token in the header.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Query parameter that also (or only) carries the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

fn default_inject_header() -> Option<String> {
    Some("Authorization".into())
}
fn default_scheme() -> String {
    "Bearer".into()
}

impl Default for RawInject {
    fn default() -> Self {
        RawInject {
            header: default_inject_header(),
            scheme: default_scheme(),
            query: None,
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (and TLS) connect.
    #[serde(default = "default_connect")]
    pub connect: Dur,
    /// Waiting for any read from the upstream.
    #[serde(default = "default_read")]
    pub read: Dur,
    /// Idle pooled connections are closed after this.
    #[serde(default = "default_idle")]
    pub idle: Dur,
    /// Once a stream started (101, a `text/event-stream` answer), this much silence from the
    /// upstream closes it; `read` no longer applies.
    #[serde(default = "default_stream_idle")]
    pub stream_idle: Dur,
}

fn default_connect() -> Dur {
    secs(5)
}
fn default_read() -> Dur {
    secs(60)
}
fn default_idle() -> Dur {
    secs(90)
}
fn default_stream_idle() -> Dur {
    secs(10 * 60)
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect: default_connect(),
            read: default_read(),
            idle: default_idle(),
            stream_idle: default_stream_idle(),
        }
    }
}

/// Upstream TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM bundle of CAs to trust instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// SNI and certificate name, when it differs from the URL host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM client certificate (chain, leaf first) for mTLS to the upstream.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
}

/// How an expired-token answer looks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpiry {
    /// Statuses that always mean "token expired".
    #[serde(default = "default_expiry_statuses")]
    pub statuses: Vec<u16>,
    /// Case-insensitive texts looked for in the first 4 KiB of the body.
    #[serde(default = "default_body_patterns")]
    pub body_patterns: Vec<String>,
    /// Statuses whose body is searched for `body_patterns`.
    #[serde(default = "default_body_statuses")]
    pub body_statuses: Vec<u16>,
}

fn default_expiry_statuses() -> Vec<u16> {
    vec![401]
}
fn default_body_patterns() -> Vec<String> {
    vec!["token is expired".into()]
}
fn default_body_statuses() -> Vec<u16> {
    vec![401, 403]
}

impl Default for RawExpiry {
    fn default() -> Self {
        RawExpiry {
            statuses: default_expiry_statuses(),
            body_patterns: default_body_patterns(),
            body_statuses: default_body_statuses(),
        }
    }
}

/// Replay settings and the wait for a token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplay {
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Largest request body the sidecar buffers for a replay.
    #[serde(default = "default_max_body")]
    pub max_body: Size,
    /// Methods that may be sent twice.
    #[serde(default = "default_methods")]
    pub idempotent_methods: Vec<String>,
    /// A request carrying this header may be replayed whatever its method.
    #[serde(default = "default_idem_header")]
    pub idempotency_header: String,
    /// How long a request waits for a usable token before 503.
    #[serde(default = "default_wait")]
    pub wait_for_token: Dur,
    /// How many requests may wait for a token at once.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Add `X-Sidecar-Replayed: N` to replayed answers (debugging).
    #[serde(default)]
    pub debug_header: bool,
}

fn default_attempts() -> u32 {
    3
}
fn default_max_body() -> Size {
    Size(1 << 20)
}
fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_idem_header() -> String {
    "Idempotency-Key".into()
}
fn default_wait() -> Dur {
    secs(10)
}
fn default_max_waiting() -> usize {
    100
}

impl Default for RawReplay {
    fn default() -> Self {
        RawReplay {
            max_attempts: default_attempts(),
            max_body: default_max_body(),
            idempotent_methods: default_methods(),
            idempotency_header: default_idem_header(),
            wait_for_token: default_wait(),
            max_waiting: default_max_waiting(),
            debug_header: false,
        }
    }
}

/// Retry of transient failures.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Statuses that count as transient.
    #[serde(default = "default_retry_statuses")]
    pub statuses: Vec<u16>,
    /// Delays between attempts.
    #[serde(default = "default_retry_backoff")]
    pub backoff: Vec<Dur>,
    /// Honour the upstream's `Retry-After`.
    #[serde(default = "yes")]
    pub respect_retry_after: bool,
    /// Upper bound on a `Retry-After` the sidecar waits for.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: Dur,
}

fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_retry_backoff() -> Vec<Dur> {
    vec![millis(100), millis(500), secs(2)]
}
fn default_max_retry_after() -> Dur {
    secs(30)
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            statuses: default_retry_statuses(),
            backoff: default_retry_backoff(),
            respect_retry_after: true,
            max_retry_after: default_max_retry_after(),
        }
    }
}

/// What a rate limit does with a request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// Delay it until it conforms, up to `max_wait`.
    #[default]
    Wait,
    /// Answer 429 at once.
    Reject,
}

/// One client-side rate limit.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Name used in metrics, logs and 429 answers.
    pub name: String,
    /// The upstream whose requests it limits.
    pub upstream: String,
    /// Which requests of that upstream count; empty: all of them.
    #[serde(default, rename = "match")]
    pub matcher: RawRateMatch,
    /// `count/period`, like `50/30s` (checked by validation, which can point at the line).
    pub rate: String,
    /// Requests that may go at once after a quiet spell; default: the rate's count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `wait` or `reject`.
    #[serde(default)]
    pub mode: RateLimitMode,
    /// Longest delay in `wait` mode; a request that would wait longer gets 429.
    #[serde(default = "default_max_wait")]
    pub max_wait: Dur,
    /// Limit each client (IP or header value) separately instead of all together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RawRateKey>,
    /// Most keys remembered at once; the least recently used is forgotten.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Hold this limit across all replicas through `shared.redis`; default: true when `shared`
    /// is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

fn default_max_wait() -> Dur {
    secs(30)
}
fn default_max_keys() -> usize {
    10_000
}

/// Which requests a rate limit counts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateMatch {
    /// Methods; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path glob: `*` is one segment, `**` any number; none: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// What separates the clients of a keyed rate limit; exactly one must be set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateKey {
    /// One limit per client IP address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_ip: bool,
    /// One limit per value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Client (downstream) connections. Slow or idle clients must not hold file descriptors for
/// ever, and a flood of connections gets a clear refusal instead of a stalled accept queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDownstream {
    /// A request head must arrive whole within this, counted from its first byte (from the
    /// accept for a connection's first request).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    /// A keep-alive connection with no request in flight is closed after this.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// Client connections held at once; more are answered 503 `too_many_connections` and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Read buffer each client connection gets in front of its socket; 0: none (reads go
    /// straight to the socket). Read once at start.
    #[serde(default = "no_read_buffer")]
    pub read_buffer: Size,
}

fn default_header_timeout() -> Dur {
    secs(10)
}
fn default_idle_timeout() -> Dur {
    secs(60)
}
fn no_read_buffer() -> Size {
    Size(0)
}
fn default_max_connections() -> usize {
    10_000
}

impl Default for RawDownstream {
    fn default() -> Self {
        RawDownstream {
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            read_buffer: no_read_buffer(),
        }
    }
}

/// The HTTP version the sidecar speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over plain TCP; over TLS, HTTP/2 or HTTP/1.1 as ALPN agrees.
    #[default]
    Auto,
    /// HTTP/1.1 only, also over TLS.
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (gRPC servers without TLS); `http://` only.
    H2c,
}

/// How upstream host names are resolved. Names are re-resolved in the background per the
/// record's TTL, clamped to [`min_ttl`, `max_ttl`], so rotating load-balancer addresses are
/// followed without a reload.
///
/// [`min_ttl`]: RawDns::min_ttl
/// [`max_ttl`]: RawDns::max_ttl
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// `ip:port` of the DNS servers to ask; empty: the system's (`/etc/resolv.conf`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Re-resolve no sooner than this, even if the record says less (also the retry interval
    /// after a failed lookup).
    #[serde(default = "default_dns_min_ttl")]
    pub min_ttl: Dur,
    /// Re-resolve no later than this, even if the record says more.
    #[serde(default = "default_dns_max_ttl")]
    pub max_ttl: Dur,
}

fn default_dns_min_ttl() -> Dur {
    secs(5)
}
fn default_dns_max_ttl() -> Dur {
    secs(300)
}

impl Default for RawDns {
    fn default() -> Self {
        RawDns {
            nameservers: Vec::new(),
            min_ttl: default_dns_min_ttl(),
            max_ttl: default_dns_max_ttl(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter directive.
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// One line per proxied request.
    #[serde(default = "yes")]
    pub access_log: bool,
}

fn default_level() -> String {
    "info".into()
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}
