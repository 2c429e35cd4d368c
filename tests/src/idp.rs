//! A mock identity provider: an OAuth2 token endpoint (client credentials, password and
//! refresh-token grants, with rotating refresh tokens) and a JSON login API shaped like the
//! trading APIs of the seeds (`POST /api/Auth/loginKey`, `POST /api/Auth/validate`).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::registry::TokenRegistry;
use crate::server::{self, DownGate};
use crate::tls::{ClientAuth, TlsMaterial};
use crate::util::{final_status, form_decode, json_response, lock, parse_form};

/// Largest token request body the mock reads.
const MAX_BODY: usize = 1 << 20;

/// Settings for [`MockIdp::start`].
///
/// The default accepts `demo-client` / `demo-secret`, issues tokens for an
/// hour, answers immediately and uses a fresh [`TokenRegistry`].
#[derive(Clone, Debug)]
pub struct IdpConfig {
    /// The only client id accepted.
    pub client_id: String,
    /// The secret that goes with `client_id`.
    pub client_secret: String,
    /// Lifetime of issued tokens (changeable later with [`MockIdp::set_ttl`]).
    pub ttl: Duration,
    /// Delay before every answer (changeable with [`MockIdp::set_latency`]).
    pub latency: Duration,
    /// Where issued tokens are recorded; share it with a [`MockUpstream`](crate::MockUpstream).
    pub registry: TokenRegistry,
    /// `(username, password)` pairs the password grant accepts; empty (the default) turns the
    /// password grant off (`unsupported_grant_type`).
    pub users: Vec<(String, String)>,
    /// `(userName, apiKey)` pairs `POST /api/Auth/loginKey` accepts.
    pub api_keys: Vec<(String, String)>,
    /// Each refresh-token grant consumes the refresh token and issues a new one (default). When
    /// off, refresh answers carry no refresh token and the old one stays valid.
    pub rotate_refresh_tokens: bool,
}

impl Default for IdpConfig {
    fn default() -> Self {
        Self {
            client_id: "demo-client".to_owned(),
            client_secret: "demo-secret".to_owned(),
            ttl: Duration::from_secs(3600),
            latency: Duration::ZERO,
            registry: TokenRegistry::new(),
            users: Vec::new(),
            api_keys: vec![("demo-user".to_owned(), "demo-api-key".to_owned())],
            rotate_refresh_tokens: true,
        }
    }
}

/// A failure the IdP can be told to simulate with [`MockIdp::set_failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer this status with `{"error":"server_error","error_description":"injected failure"}`
    /// (invalid or 1xx codes become 500).
    Status(u16),
    /// Answer 200 with the non-JSON body `<html>oops`.
    Garbage,
    /// Close every connection without answering, so clients see a
    /// connection error; the same URL works again after `set_failure(None)`.
    /// Requests dropped this way are not recorded.
    Down,
}

/// A hostile or broken identity provider, set with [`MockIdp::set_hostile`]. It applies to
/// every endpoint (token, JSON login, renew) after the request is recorded, before anything
/// else is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// `307 Temporary Redirect` to this URL: a client that follows it re-sends the request,
    /// body and credentials included, there.
    Redirect(String),
    /// `200` with a body of `bytes` bytes of JSON whitespace (never a token), streamed lazily
    /// so the mock itself stays small; [`MockIdp::streamed_bytes`] counts what went out. With
    /// `declare_length` the answer carries its `Content-Length`, else it is chunked.
    HugeBody {
        /// Body size.
        bytes: u64,
        /// Send `Content-Length`.
        declare_length: bool,
    },
    /// A refusal whose text echoes the request: `401 invalid_client` with
    /// `error_description` = `"rejected Authorization: <header> body: <raw body>"` on the token
    /// endpoint, `200 {"success":false,"errorMessage":..}` with the same text on the JSON ones.
    EchoCredentials,
}

/// One request received by the token endpoint, as recorded by [`MockIdp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdpRequest {
    /// The `grant_type` form field (empty if missing).
    pub grant_type: String,
    /// The `scope` form field, if sent.
    pub scope: Option<String>,
    /// How the client authenticated: `"basic"` (Authorization header),
    /// `"post"` (form fields) or `"none"`.
    pub auth_method: String,
    /// The client id presented, by whichever method.
    pub client_id: Option<String>,
    /// Every other form field (e.g. `audience`), without `grant_type`,
    /// `scope`, `client_id` and `client_secret`.
    pub params: HashMap<String, String>,
}

struct Settings {
    ttl: Duration,
    latency: Duration,
    failure: Option<Failure>,
    hostile: Option<Hostile>,
    rotate: bool,
}

/// What [`Hostile::HugeBody`] answers sent so far.
#[derive(Default)]
struct Streams {
    /// Bytes handed to the connection (sent or in its socket buffers).
    produced: AtomicU64,
    /// Huge bodies still being sent: dropped once finished or once the client went away.
    open: AtomicUsize,
}

struct Shared {
    client_id: String,
    client_secret: String,
    users: Vec<(String, String)>,
    api_keys: Vec<(String, String)>,
    registry: TokenRegistry,
    settings: Mutex<Settings>,
    requests: Mutex<Vec<IdpRequest>>,
    /// Refresh tokens that are still accepted.
    refresh_tokens: Mutex<std::collections::HashSet<String>>,
    /// Refresh tokens the grant accepted (each consumed by it when rotating), in order.
    redeemed: Mutex<Vec<String>>,
    /// Refresh-token grants refused with `invalid_grant` (unknown, revoked or reused token).
    refused: AtomicUsize,
    streams: Arc<Streams>,
}

/// A mock OAuth2 token endpoint (`POST /oauth2/token`, `client_credentials`
/// grant, client auth by HTTP Basic or form fields) on an ephemeral loopback
/// port.
///
/// Use it wherever the sidecar needs an IdP; its knobs inject latency,
/// errors, garbage and outages, and it records every token request.
/// Dropping the handle stops the server.
pub struct MockIdp {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl MockIdp {
    /// Starts the IdP on `127.0.0.1:0` on the current tokio runtime.
    ///
    /// # Panics
    /// If no loopback port can be bound; see [`MockIdp::try_start`].
    pub async fn start(cfg: IdpConfig) -> MockIdp {
        Self::try_start(cfg)
            .await
            .expect("mock IdP: cannot bind 127.0.0.1:0")
    }

    /// Like [`MockIdp::start`], but reports bind errors.
    pub async fn try_start(cfg: IdpConfig) -> io::Result<MockIdp> {
        Self::launch(cfg, "http", |listener, router, rx, down| {
            server::spawn(listener, router, rx, Some(down))
        })
        .await
    }

    /// Starts the IdP behind TLS on `127.0.0.1:0` (HTTP/2 or HTTP/1.1 by ALPN), with a private
    /// CA of its own; under [`ClientAuth::Required`] only clients presenting a certificate that CA
    /// signed get through (RFC 8705 `tls_client_auth`). [`MockIdp::url`] is then
    /// `https://127.0.0.1:PORT`. [`Failure::Down`] does not apply to it.
    ///
    /// # Panics
    /// If no loopback port can be bound or the certificates cannot be made.
    pub async fn start_tls(cfg: IdpConfig, auth: ClientAuth) -> (MockIdp, TlsMaterial) {
        let (acceptor, material) = crate::tls::mint(auth).expect("mock IdP: cannot mint TLS");
        let handshakes = material.handshakes();
        let idp = Self::launch(cfg, "https", move |listener, router, rx, _down| {
            crate::tls::spawn(listener, acceptor, handshakes, router, rx)
        })
        .await
        .expect("mock IdP: cannot bind 127.0.0.1:0");
        (idp, material)
    }

    async fn launch(
        cfg: IdpConfig,
        scheme: &'static str,
        serve: impl FnOnce(TcpListener, Router, watch::Receiver<bool>, DownGate),
    ) -> io::Result<MockIdp> {
        let (listener, addr) = server::bind_loopback().await?;
        let shared = Arc::new(Shared {
            client_id: cfg.client_id,
            client_secret: cfg.client_secret,
            users: cfg.users,
            api_keys: cfg.api_keys,
            registry: cfg.registry,
            settings: Mutex::new(Settings {
                ttl: cfg.ttl,
                latency: cfg.latency,
                failure: None,
                hostile: None,
                rotate: cfg.rotate_refresh_tokens,
            }),
            requests: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(std::collections::HashSet::new()),
            redeemed: Mutex::new(Vec::new()),
            refused: AtomicUsize::new(0),
            streams: Arc::default(),
        });
        let router = Router::new()
            .route("/oauth2/token", post(token_endpoint))
            .route("/api/Auth/loginKey", post(login_key_endpoint))
            .route("/api/Auth/validate", post(validate_endpoint))
            .with_state(Arc::clone(&shared));
        let gate_state = Arc::clone(&shared);
        let down: DownGate =
            Arc::new(move || lock(&gate_state.settings).failure == Some(Failure::Down));
        let (shutdown, rx) = watch::channel(false);
        serve(listener, router, rx, down);
        Ok(MockIdp {
            addr,
            scheme,
            shared,
            shutdown,
        })
    }

    /// Base URL, `http://127.0.0.1:PORT` (`https://` for a TLS IdP).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The token endpoint, `{url}/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.url())
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of token requests received (failed ones included).
    pub fn calls(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Every token request received so far, oldest first.
    pub fn requests(&self) -> Vec<IdpRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        lock(&self.shared.settings).ttl = ttl;
    }

    /// Changes the delay applied before every answer.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.settings).latency = latency;
    }

    /// Injects a failure into every following request, or heals with `None`.
    pub fn set_failure(&self, failure: Option<Failure>) {
        lock(&self.shared.settings).failure = failure;
    }

    /// Makes every following request meet a hostile answer, or heals with `None`.
    pub fn set_hostile(&self, hostile: Option<Hostile>) {
        lock(&self.shared.settings).hostile = hostile;
    }

    /// Bytes of [`Hostile::HugeBody`] answers handed to connections so far: what a client that
    /// stops reading early made the mock send (socket buffers included).
    pub fn streamed_bytes(&self) -> u64 {
        self.shared.streams.produced.load(Ordering::SeqCst)
    }

    /// [`Hostile::HugeBody`] answers still being sent; zero once each finished or its
    /// connection closed.
    pub fn streams_open(&self) -> usize {
        self.shared.streams.open.load(Ordering::SeqCst)
    }

    /// The JSON login endpoint, `{url}/api/Auth/loginKey`.
    pub fn login_url(&self) -> String {
        format!("{}/api/Auth/loginKey", self.url())
    }

    /// The JSON renew endpoint, `{url}/api/Auth/validate`.
    pub fn validate_url(&self) -> String {
        format!("{}/api/Auth/validate", self.url())
    }

    /// Issues a refresh token the refresh-token grant accepts (a provisioned "initial" one).
    pub fn issue_refresh_token(&self) -> String {
        issue_refresh_token(&self.shared)
    }

    /// Whether the refresh-token grant would accept `refresh_token` now.
    pub fn refresh_token_valid(&self, refresh_token: &str) -> bool {
        lock(&self.shared.refresh_tokens).contains(refresh_token)
    }

    /// Refresh tokens the refresh-token grant accepted, in order: with rotation each one may
    /// appear once at most (a reuse is refused, see [`MockIdp::refused_refresh_tokens`]).
    pub fn redeemed_refresh_tokens(&self) -> Vec<String> {
        lock(&self.shared.redeemed).clone()
    }

    /// Refresh-token grants answered `invalid_grant` (a reused, revoked or unknown token).
    pub fn refused_refresh_tokens(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Makes every refresh token issued so far answer `invalid_grant`.
    pub fn revoke_refresh_tokens(&self) {
        lock(&self.shared.refresh_tokens).clear();
    }

    /// Turns refresh-token rotation on or off for the following grants.
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        lock(&self.shared.settings).rotate = rotate;
    }

    /// The registry issued tokens are recorded in.
    pub fn registry(&self) -> TokenRegistry {
        self.shared.registry.clone()
    }

    /// Stops accepting connections; in-flight requests still complete.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

impl Drop for MockIdp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for MockIdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockIdp")
            .field("addr", &self.addr)
            .field("client_id", &self.shared.client_id)
            .finish_non_exhaustive()
    }
}

fn oauth_error(status: StatusCode, error: &str, description: Option<&str>) -> Response {
    let mut body = serde_json::json!({ "error": error });
    if let Some(description) = description {
        body["error_description"] = description.into();
    }
    json_response(status, body.to_string())
}

/// Decodes `Basic base64(id:secret)`; `None` if malformed.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let encoded = encoded.trim();
    let decoded = STANDARD
        .decode(encoded)
        .or_else(|_| STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn is_basic(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let mut fields: HashMap<String, String> = match &body {
        Ok(bytes) => parse_form(&String::from_utf8_lossy(bytes))
            .into_iter()
            .collect(),
        Err(_) => HashMap::new(),
    };
    let grant_type = fields.remove("grant_type").unwrap_or_default();
    let scope = fields.remove("scope");
    let form_id = fields.remove("client_id");
    let form_secret = fields.remove("client_secret");
    let assertion = (fields.get("client_assertion_type").map(String::as_str) == Some(JWT_BEARER))
        .then(|| fields.get("client_assertion").cloned())
        .flatten();

    // Basic wins if both methods are present (RFC 6749 forbids mixing them).
    let authorization = headers.get(header::AUTHORIZATION).filter(|v| is_basic(v));
    let mut assertion_ok = false;
    let (auth_method, presented_id, credentials) = if let Some(value) = authorization {
        let credentials = basic_credentials(value);
        let id = credentials.as_ref().map(|(id, _)| id.clone());
        ("basic", id, credentials)
    } else if let Some(jwt) = &assertion {
        assertion_ok = assertion_names_client(jwt, &shared.client_id, form_id.as_deref());
        ("private_key_jwt", form_id.clone(), None)
    } else if form_id.is_some() || form_secret.is_some() {
        ("post", form_id.clone(), form_id.zip(form_secret))
    } else {
        ("none", None, None)
    };

    lock(&shared.requests).push(IdpRequest {
        grant_type: grant_type.clone(),
        scope: scope.clone(),
        auth_method: auth_method.to_owned(),
        client_id: presented_id,
        params: fields,
    });
    if let Some(resp) = hostile_answer(&shared, &headers, &body, true) {
        return resp;
    }

    let latency = lock(&shared.settings).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (ttl, failure) = {
        let settings = lock(&shared.settings);
        (settings.ttl, settings.failure)
    };

    match failure {
        Some(Failure::Status(code)) => {
            return oauth_error(final_status(code), "server_error", Some("injected failure"))
        }
        Some(Failure::Garbage) => {
            let mut resp = Response::new(Body::from("<html>oops"));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            return resp;
        }
        // Normally caught before routing; answer like a broken server anyway.
        Some(Failure::Down) => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                None,
            )
        }
        None => {}
    }

    if body.is_err() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("unreadable request body"),
        );
    }

    let authenticated = assertion_ok
        || credentials.is_some_and(|(id, secret)| {
            (id == shared.client_id && secret == shared.client_secret)
                || (form_decode(&id) == shared.client_id
                    && form_decode(&secret) == shared.client_secret)
        });
    if !authenticated {
        let mut resp = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            Some("client authentication failed"),
        );
        if auth_method == "basic" {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"mock-idp\""),
            );
        }
        return resp;
    }

    if grant_type.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("missing grant_type"),
        );
    }
    let refresh_token = match grant_type.as_str() {
        "client_credentials" => None,
        "password" if !shared.users.is_empty() => {
            let username = body_field(&body, "username");
            let password = body_field(&body, "password");
            let known = shared
                .users
                .iter()
                .any(|(u, p)| Some(u) == username.as_ref() && Some(p) == password.as_ref());
            if !known {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    Some("wrong username or password"),
                );
            }
            Some(issue_refresh_token(&shared))
        }
        "refresh_token" => {
            let presented = body_field(&body, "refresh_token").unwrap_or_default();
            let rotate = lock(&shared.settings).rotate;
            let mut live = lock(&shared.refresh_tokens);
            if !live.contains(&presented) {
                shared.refused.fetch_add(1, Ordering::SeqCst);
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    Some("refresh token is invalid, expired or already used"),
                );
            }
            lock(&shared.redeemed).push(presented.clone());
            if rotate {
                live.remove(&presented);
                drop(live);
                Some(issue_refresh_token(&shared))
            } else {
                None
            }
        }
        _ => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", None),
    };

    let token = shared.registry.issue(ttl);
    let mut answer = serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs().max(1),
    });
    if let Some(rt) = refresh_token {
        answer["refresh_token"] = rt.into();
    }
    if let Some(scope) = scope {
        answer["scope"] = scope.into();
    }
    let mut resp = json_response(StatusCode::OK, answer.to_string());
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The answer [`Hostile`] asks for, if any. `oauth`: shaped for the token endpoint, else for
/// the JSON endpoints.
fn hostile_answer(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Result<bytes::Bytes, axum::Error>,
    oauth: bool,
) -> Option<Response> {
    let hostile = lock(&shared.settings).hostile.clone()?;
    Some(match hostile {
        Hostile::Redirect(to) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Hostile::HugeBody {
            bytes,
            declare_length,
        } => {
            shared.streams.open.fetch_add(1, Ordering::SeqCst);
            let body = Spaces {
                left: bytes,
                exact: declare_length,
                streams: Arc::clone(&shared.streams),
            };
            let mut resp = Response::new(Body::new(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if declare_length {
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
            }
            resp
        }
        Hostile::EchoCredentials => {
            let authorization = headers
                .get(header::AUTHORIZATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let raw = body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let text = format!("rejected Authorization: {authorization} body: {raw}");
            if oauth {
                oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", Some(&text))
            } else {
                json_response(
                    StatusCode::OK,
                    serde_json::json!({"success": false, "errorMessage": text}).to_string(),
                )
            }
        }
    })
}

/// The body of [`Hostile::HugeBody`]: spaces, 64 KiB at a time, produced only as fast as the
/// connection takes them.
struct Spaces {
    left: u64,
    exact: bool,
    streams: Arc<Streams>,
}

static SPACES: [u8; 64 * 1024] = [b' '; 64 * 1024];

impl HttpBody for Spaces {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(SPACES.len() as u64);
        self.left -= n;
        self.streams.produced.fetch_add(n, Ordering::SeqCst);
        // n is at most SPACES.len().
        let chunk = &SPACES[..usize::try_from(n).unwrap_or(SPACES.len())];
        Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for Spaces {
    fn drop(&mut self) {
        self.streams.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A loopback server standing for a foreign host (the target of a hostile redirect). It counts
/// every connection and keeps every byte it receives, and answers each request with a token
/// answer any provider type would accept, so a client that followed a redirect to it would
/// visibly get a token from it. Dropping the handle stops it.
pub struct Catcher {
    addr: SocketAddr,
    seen: Arc<Mutex<(usize, Vec<u8>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Catcher {
    /// Starts it on `127.0.0.1:0` on the current tokio runtime.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start() -> Catcher {
        let (listener, addr) = server::bind_loopback()
            .await
            .expect("catcher: cannot bind 127.0.0.1:0");
        let seen: Arc<Mutex<(usize, Vec<u8>)>> = Arc::default();
        let state = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                lock(&state).0 += 1;
                tokio::spawn(catch(stream, Arc::clone(&state)));
            }
        });
        Catcher { addr, seen, task }
    }

    /// `http://127.0.0.1:PORT/stolen`: where a hostile IdP redirects to.
    pub fn url(&self) -> String {
        format!("http://{}/stolen", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.seen).0
    }

    /// Every byte received so far, all connections together.
    pub fn received(&self) -> Vec<u8> {
        lock(&self.seen).1.clone()
    }
}

impl Drop for Catcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Catcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catcher").field("addr", &self.addr).finish()
    }
}

/// Keeps what one connection sends until it pauses (the whole request), then answers.
async fn catch(mut stream: tokio::net::TcpStream, seen: Arc<Mutex<(usize, Vec<u8>)>>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
    {
        if n == 0 || total > MAX_BODY {
            break;
        }
        total += n;
        lock(&seen).1.extend_from_slice(&buf[..n]);
    }
    let body = r#"{"access_token":"caught-token","token":"caught-token","newToken":"caught-token","success":true,"token_type":"Bearer","expires_in":3600,"expiresIn":3600}"#;
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A form field of the raw body (the recorded `params` leave out none of these).
fn body_field(body: &Result<bytes::Bytes, axum::Error>, name: &str) -> Option<String> {
    let bytes = body.as_ref().ok()?;
    parse_form(&String::from_utf8_lossy(bytes))
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn issue_refresh_token(shared: &Shared) -> String {
    let rt = format!("rt_{:032x}", rand::random::<u128>());
    lock(&shared.refresh_tokens).insert(rt.clone());
    rt
}

/// Checks a `private_key_jwt` assertion's claims: `iss` and `sub` are the client, `aud` is a
/// token endpoint, `exp` is in the future. The signature is NOT verified (the mock has no key
/// registry); tests that care verify it from [`IdpRequest::params`]`["client_assertion"]`.
fn assertion_names_client(jwt: &str, client_id: &str, form_id: Option<&str>) -> bool {
    let mut parts = jwt.split('.');
    let (Some(_), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    !sig.is_empty()
        && claims["iss"] == client_id
        && claims["sub"] == client_id
        && form_id.is_none_or(|f| f == client_id)
        && claims["aud"]
            .as_str()
            .is_some_and(|a| a.ends_with("/oauth2/token"))
        && claims["exp"].as_u64().is_some_and(|e| e > now)
}

/// Applies latency and injected failures to the JSON endpoints, like the token endpoint does.
async fn json_prelude(shared: &Shared) -> Option<Response> {
    let latency = lock(&shared.settings).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let failure = lock(&shared.settings).failure;
    match failure {
        Some(Failure::Status(code)) => Some(json_response(
            final_status(code),
            serde_json::json!({"success": false, "errorMessage": "injected failure"}).to_string(),
        )),
        Some(Failure::Garbage) => {
            let mut resp = Response::new(Body::from("<html>oops"));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            Some(resp)
        }
        Some(Failure::Down) => Some(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"success":false}"#.to_owned(),
        )),
        None => None,
    }
}

/// `POST /api/Auth/loginKey` with `{"userName": .., "apiKey": ..}`: `{"success":true,
/// "token":..,"expiresIn":..}`, or `200 {"success":false,"errorMessage":..}` like the real API.
async fn login_key_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = axum::body::to_bytes(body, MAX_BODY).await;
    let body = raw.as_ref().ok().cloned();
    let json: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let (user, key) = (field("userName"), field("apiKey"));
    lock(&shared.requests).push(IdpRequest {
        grant_type: "json_login".to_owned(),
        scope: None,
        auth_method: "none".to_owned(),
        client_id: user.clone(),
        params: HashMap::new(),
    });
    if let Some(resp) = hostile_answer(&shared, &headers, &raw, false) {
        return resp;
    }
    if let Some(resp) = json_prelude(&shared).await {
        return resp;
    }
    let known = shared
        .api_keys
        .iter()
        .any(|(u, k)| Some(u) == user.as_ref() && Some(k) == key.as_ref());
    if !known {
        return json_response(
            StatusCode::OK,
            serde_json::json!({"success": false, "errorCode": 3, "errorMessage": "Invalid user name or API key"})
                .to_string(),
        );
    }
    let ttl = lock(&shared.settings).ttl;
    let token = shared.registry.issue(ttl);
    json_response(
        StatusCode::OK,
        serde_json::json!({"success": true, "errorCode": 0, "token": token, "expiresIn": ttl.as_secs().max(1)})
            .to_string(),
    )
}

/// `POST /api/Auth/validate` with the current token as Bearer: `{"success":true,"newToken":..}`
/// while that token is valid, else `401 {"success":false,"errorMessage":..}`.
async fn validate_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = axum::body::to_bytes(body, MAX_BODY).await;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    lock(&shared.requests).push(IdpRequest {
        grant_type: "json_renew".to_owned(),
        scope: None,
        auth_method: if bearer.is_some() { "bearer" } else { "none" }.to_owned(),
        client_id: None,
        params: HashMap::new(),
    });
    if let Some(resp) = hostile_answer(&shared, &headers, &raw, false) {
        return resp;
    }
    if let Some(resp) = json_prelude(&shared).await {
        return resp;
    }
    if !bearer.is_some_and(|t| shared.registry.is_valid(&t)) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"success": false, "errorMessage": "Session expired"}).to_string(),
        );
    }
    let ttl = lock(&shared.settings).ttl;
    let token = shared.registry.issue(ttl);
    json_response(
        StatusCode::OK,
        serde_json::json!({"success": true, "newToken": token}).to_string(),
    )
}
