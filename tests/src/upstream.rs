//! A mock upstream API that checks bearer tokens against a [`TokenRegistry`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::registry::TokenRegistry;
use crate::server;
use crate::util::{digest_body, final_status, json_response, lock, parse_form};

/// Exact body of the 401 answer for a missing, unknown, revoked or expired token.
const UNAUTHORIZED_BODY: &str = r#"{"message":"token is expired"}"#;

/// Settings for [`MockUpstream::start`].
#[derive(Clone, Debug, Default)]
pub struct UpstreamConfig {
    /// Registry tokens are checked against; `None` accepts every request.
    pub registry: Option<TokenRegistry>,
}

impl UpstreamConfig {
    /// Only tokens valid in `registry` are accepted (share it with the IdP).
    pub fn checking(registry: TokenRegistry) -> Self {
        Self {
            registry: Some(registry),
        }
    }

    /// No auth check at all: every request gets 200.
    pub fn open() -> Self {
        Self { registry: None }
    }
}

/// A canned answer queued with [`MockUpstream::push_script`], for failure
/// injection (e.g. a one-off 503).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scripted {
    /// Status to answer (invalid or 1xx codes become 500).
    pub status: u16,
    /// Body to send verbatim.
    pub body: String,
    /// Extra response headers; invalid names or values are skipped.
    pub headers: Vec<(String, String)>,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Scripted {
    /// An answer with this status, an empty body, no headers and no delay.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: String::new(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the delay before answering.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request received by a [`MockUpstream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Protocol version the request arrived with: `HTTP/1.1`, or `HTTP/2.0` when a TLS mock
    /// negotiated h2 by ALPN.
    pub version: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// All request headers, names lowercase (repeated names keep their order).
    pub headers: Vec<(String, String)>,
    /// Length of the request body.
    pub body_len: usize,
    /// SHA-256 of the request body, lowercase hex.
    pub body_sha256: String,
    /// Token from `Authorization: Bearer` or the `access_token` query parameter.
    pub token: Option<String>,
    /// Status answered (101 for an accepted WebSocket upgrade).
    pub status: u16,
    /// When the request was received.
    pub at: Instant,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    registry: Option<TokenRegistry>,
    scripts: Mutex<VecDeque<Scripted>>,
    requests: Mutex<Vec<Recorded>>,
    shutdown: watch::Receiver<bool>,
}

/// A mock API on an ephemeral loopback port that accepts only tokens the
/// IdP issued (or everything, with [`UpstreamConfig::open`]).
///
/// Every path answers 200 with a JSON summary of the request; `GET /ws` is a
/// WebSocket echo and `/slow?ms=N` answers after N ms. Use it as the
/// sidecar's upstream to check what was forwarded; every request is recorded.
/// Dropping the handle stops the server.
pub struct MockUpstream {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl MockUpstream {
    /// Starts the upstream on `127.0.0.1:0` on the current tokio runtime.
    ///
    /// # Panics
    /// If no loopback port can be bound; see [`MockUpstream::try_start`].
    pub async fn start(cfg: UpstreamConfig) -> MockUpstream {
        Self::try_start(cfg)
            .await
            .expect("mock upstream: cannot bind 127.0.0.1:0")
    }

    /// Like [`MockUpstream::start`], but reports bind errors.
    pub async fn try_start(cfg: UpstreamConfig) -> io::Result<MockUpstream> {
        Self::launch(cfg, "http", |listener, router, rx| {
            server::spawn(listener, router, rx, None)
        })
        .await
    }

    /// Starts the upstream on `addr`, a loopback address of the test's choice: several mocks on
    /// one port at different addresses (127.0.0.2:P, 127.0.0.3:P) stand for the addresses of
    /// one DNS name.
    pub async fn start_at(cfg: UpstreamConfig, addr: SocketAddr) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve_on(listener, cfg, "http", |listener, router, rx| {
            server::spawn(listener, router, rx, None)
        })
    }

    /// Binds a port and hands the mock's router to `serve`: plain and TLS mocks differ only in
    /// how connections are served, never in what is answered or recorded.
    pub(crate) async fn launch(
        cfg: UpstreamConfig,
        scheme: &'static str,
        serve: impl FnOnce(TcpListener, Router, watch::Receiver<bool>),
    ) -> io::Result<MockUpstream> {
        let (listener, _) = server::bind_loopback().await?;
        Self::serve_on(listener, cfg, scheme, serve)
    }

    fn serve_on(
        listener: TcpListener,
        cfg: UpstreamConfig,
        scheme: &'static str,
        serve: impl FnOnce(TcpListener, Router, watch::Receiver<bool>),
    ) -> io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            registry: cfg.registry,
            scripts: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            shutdown: rx.clone(),
        });
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        serve(listener, router, rx);
        Ok(MockUpstream {
            addr,
            scheme,
            shared,
            shutdown,
        })
    }

    /// Base URL, `http://127.0.0.1:PORT` (`https://` for a TLS mock).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Queues a canned answer; each request consumes one (FIFO) before the
    /// token check.
    pub fn push_script(&self, scripted: Scripted) {
        lock(&self.shared.scripts).push_back(scripted);
    }

    /// The registry tokens are checked against, if any.
    pub fn registry(&self) -> Option<TokenRegistry> {
        self.shared.registry.clone()
    }

    /// Stops accepting connections and closes WebSockets; in-flight requests
    /// still complete.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .field("checking", &self.shared.registry.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Summary<'a> {
    ok: bool,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    body_len: usize,
    body_sha256: &'a str,
}

pub(crate) fn bearer_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    from_header.or_else(|| {
        parse_form(query?)
            .into_iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v)
    })
}

fn scripted_response(scripted: &Scripted) -> Response {
    let mut resp = Response::new(Body::from(scripted.body.clone()));
    *resp.status_mut() = final_status(scripted.status);
    for (name, value) in &scripted.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
    resp
}

fn unauthorized() -> Response {
    let mut resp = json_response(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY.to_owned());
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
}

fn slow_delay(query: Option<&str>) -> Option<Duration> {
    parse_form(query.unwrap_or(""))
        .into_iter()
        .find(|(k, _)| k == "ms")
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let at = Instant::now();
    let script = lock(&shared.scripts).pop_front();
    let (mut parts, body) = req.into_parts();
    let method = parts.method.as_str().to_owned();
    let version = format!("{:?}", parts.version);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let token = bearer_token(&parts.headers, query.as_deref());
    let digest = digest_body(body).await;
    let (body_len, body_sha256) = match &digest {
        Ok((len, sha)) => (*len, sha.clone()),
        Err(_) => (0, String::new()),
    };
    let record = Recorded {
        method,
        version,
        path,
        query,
        headers,
        body_len,
        body_sha256,
        token,
        status: 0,
        at,
    };
    let save = |record: &Recorded, status: StatusCode| {
        let mut record = record.clone();
        record.status = status.as_u16();
        lock(&shared.requests).push(record);
    };

    if let Some(scripted) = script {
        let resp = scripted_response(&scripted);
        save(&record, resp.status());
        if !scripted.delay.is_zero() {
            tokio::time::sleep(scripted.delay).await;
        }
        return resp;
    }

    if digest.is_err() {
        save(&record, StatusCode::BAD_REQUEST);
        return json_response(
            StatusCode::BAD_REQUEST,
            r#"{"message":"unreadable request body"}"#.to_owned(),
        );
    }

    let authorized = match &shared.registry {
        None => true,
        Some(registry) => record
            .token
            .as_deref()
            .is_some_and(|t| registry.is_valid(t)),
    };
    if !authorized {
        save(&record, StatusCode::UNAUTHORIZED);
        return unauthorized();
    }

    if parts.method == Method::GET && record.path == "/ws" {
        match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => {
                let resp = ws
                    .on_upgrade({
                        let shutdown = shared.shutdown.clone();
                        move |socket| echo(socket, shutdown)
                    })
                    .into_response();
                save(&record, resp.status());
                return resp;
            }
            // A botched handshake is an error; a plain GET /ws is answered as usual.
            Err(rejection) if parts.headers.contains_key(header::UPGRADE) => {
                let resp = rejection.into_response();
                save(&record, resp.status());
                return resp;
            }
            Err(_) => {}
        }
    }

    if record.path == "/slow" {
        let Some(delay) = slow_delay(record.query.as_deref()) else {
            save(&record, StatusCode::BAD_REQUEST);
            return json_response(
                StatusCode::BAD_REQUEST,
                r#"{"message":"/slow needs ?ms=<milliseconds>"}"#.to_owned(),
            );
        };
        save(&record, StatusCode::OK);
        tokio::time::sleep(delay).await;
    } else {
        save(&record, StatusCode::OK);
    }

    let summary = Summary {
        ok: true,
        method: &record.method,
        path: &record.path,
        query: record.query.as_deref(),
        body_len: record.body_len,
        body_sha256: &record.body_sha256,
    };
    match serde_json::to_string(&summary) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Echoes text and binary messages until the peer closes or the mock stops.
async fn echo(mut socket: WebSocket, mut shutdown: watch::Receiver<bool>) {
    loop {
        let msg = tokio::select! {
            msg = socket.recv() => msg,
            _ = server::stopped(&mut shutdown) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        let reply = match msg {
            Some(Ok(Message::Text(text))) => Message::Text(text),
            Some(Ok(Message::Binary(data))) => Message::Binary(data),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}
