//! A SignalR hub speaking enough of the protocol for the real `@microsoft/signalr` client:
//! negotiate v1, the JSON hub protocol (handshake, invocation → completion, ping, close) over
//! WebSockets, Server-Sent Events and long polling. Like a hub behind
//! `CloseOnAuthenticationExpiration`, it checks the bearer token of every request (header or
//! `access_token` query) against the mock IdP's registry and closes each connection when the
//! token it was opened with expires. Hub method: `Echo(x)` answers `x`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::registry::TokenRegistry;
use crate::server;
use crate::streams::Events;
use crate::upstream::bearer_token;
use crate::util::{json_response, lock, parse_form};

/// SignalR's record separator.
const RS: char = '\u{1e}';
/// A long poll is answered empty after this if nothing is to be sent.
const POLL_HOLD: Duration = Duration::from_secs(5);
/// Pings to the client, so its server timeout never fires.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Bounds on what a client may send: one request body, one unfinished record.
const MAX_BODY: usize = 64 * 1024;
/// Frames queued for a client that does not read.
const QUEUE: usize = 1024;

/// What the hub saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Negotiations answered.
    pub negotiations: usize,
    /// Connections opened, per transport: `WebSockets`, `ServerSentEvents`, `LongPolling`.
    pub connections: HashMap<&'static str, usize>,
    /// Invocations answered.
    pub invocations: usize,
    /// Requests whose token was checked.
    pub tokens_checked: usize,
    /// Requests with a missing, unknown or expired token (answered 401).
    pub tokens_refused: usize,
    /// Connections closed because their token expired.
    pub expiry_closes: usize,
}

enum Out {
    Frame(String),
    End,
}

struct Conn {
    out_tx: mpsc::Sender<Out>,
    out_rx: tokio::sync::Mutex<mpsc::Receiver<Out>>,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// The transport that opened it.
    transport: Option<&'static str>,
    handshaken: bool,
    /// Bytes of an unfinished record.
    pending: String,
    /// The client was sent its last frame: long polls get 204.
    ended: bool,
}

struct Hub {
    registry: TokenRegistry,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    stats: Mutex<HubStats>,
    shutdown: watch::Receiver<bool>,
}

/// The hub on `127.0.0.1:PORT/hub`. Dropping the handle stops it.
pub struct SignalRHub {
    addr: SocketAddr,
    hub: Arc<Hub>,
    shutdown: watch::Sender<bool>,
}

impl SignalRHub {
    /// Starts it, accepting the tokens of `registry`.
    pub async fn start(registry: TokenRegistry) -> io::Result<SignalRHub> {
        let (listener, addr) = server::bind_loopback().await?;
        let (shutdown, rx) = watch::channel(false);
        let hub = Arc::new(Hub {
            registry,
            conns: Mutex::new(HashMap::new()),
            stats: Mutex::new(HubStats::default()),
            shutdown: rx.clone(),
        });
        let router = Router::new().fallback(handle).with_state(hub.clone());
        server::spawn(listener, router, rx, None);
        Ok(SignalRHub {
            addr,
            hub,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT`; the hub is at `/hub`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it saw so far.
    pub fn stats(&self) -> HubStats {
        lock(&self.hub.stats).clone()
    }
}

impl Drop for SignalRHub {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl fmt::Debug for SignalRHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalRHub")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

async fn handle(State(hub): State<Arc<Hub>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    let ttl = match hub.check(&parts.headers, query.as_deref()) {
        Some(ttl) => ttl,
        None => return StatusCode::UNAUTHORIZED.into_response(),
    };
    let id = query
        .as_deref()
        .map(parse_form)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v);
    match (parts.method.clone(), parts.uri.path(), id) {
        (Method::POST, "/hub/negotiate", _) => hub.negotiate(),
        (method, "/hub", Some(id)) => {
            let Some(conn) = lock(&hub.conns).get(&id).cloned() else {
                return StatusCode::NOT_FOUND.into_response();
            };
            match method {
                Method::GET if parts.headers.contains_key(header::UPGRADE) => {
                    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
                        Ok(ws) => {
                            hub.opened(&conn, &id, "WebSockets", ttl);
                            let hub = hub.clone();
                            ws.on_upgrade(move |socket| websocket(hub, id, conn, socket))
                        }
                        Err(rejection) => rejection.into_response(),
                    }
                }
                Method::GET if accepts_events(&parts.headers) => {
                    hub.opened(&conn, &id, "ServerSentEvents", ttl);
                    event_stream(hub, id, conn)
                }
                Method::GET => hub.poll(&id, &conn, ttl).await,
                Method::POST => match to_bytes(body, MAX_BODY).await {
                    Ok(bytes) => {
                        hub.receive(&conn, &String::from_utf8_lossy(&bytes));
                        StatusCode::OK.into_response()
                    }
                    Err(_) => StatusCode::PAYLOAD_TOO_LARGE.into_response(),
                },
                Method::DELETE => {
                    lock(&hub.conns).remove(&id);
                    StatusCode::ACCEPTED.into_response()
                }
                _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn accepts_events(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

impl Hub {
    /// The time left on the request's token; `None` (counted) when it is missing or not valid.
    fn check(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Duration> {
        let ttl = bearer_token(headers, query).and_then(|t| self.registry.ttl_left(&t));
        let mut stats = lock(&self.stats);
        stats.tokens_checked += 1;
        if ttl.is_none() {
            stats.tokens_refused += 1;
        }
        ttl
    }

    fn negotiate(&self) -> Response {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        let token = format!("{:032x}", rand::rng().random::<u128>());
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let conn = Arc::new(Conn {
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
            state: Mutex::new(ConnState::default()),
        });
        lock(&self.conns).insert(token.clone(), conn);
        lock(&self.stats).negotiations += 1;
        let body = json!({
            "negotiateVersion": 1,
            "connectionId": id,
            "connectionToken": token,
            "availableTransports": [
                { "transport": "WebSockets", "transferFormats": ["Text", "Binary"] },
                { "transport": "ServerSentEvents", "transferFormats": ["Text"] },
                { "transport": "LongPolling", "transferFormats": ["Text", "Binary"] },
            ],
        });
        json_response(StatusCode::OK, body.to_string())
    }

    /// A transport opened connection `conn` with a token that lives `ttl` more: pings it and
    /// closes it when the token expires.
    fn opened(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        id: &str,
        transport: &'static str,
        ttl: Duration,
    ) {
        {
            let mut st = lock(&conn.state);
            if st.transport.is_some() {
                return;
            }
            st.transport = Some(transport);
        }
        *lock(&self.stats).connections.entry(transport).or_default() += 1;
        tokio::spawn(keeper(
            self.clone(),
            id.to_owned(),
            Arc::downgrade(conn),
            ttl,
            self.shutdown.clone(),
        ));
    }

    /// Records from the client: the handshake, then invocations, pings and a close.
    fn receive(&self, conn: &Conn, text: &str) {
        let mut st = lock(&conn.state);
        if st.pending.len() + text.len() > MAX_BODY {
            st.pending.clear();
            st.ended = true;
            let _ = conn.out_tx.try_send(Out::End);
            return;
        }
        st.pending.push_str(text);
        while let Some(i) = st.pending.find(RS) {
            let record: String = st.pending.drain(..=i).collect();
            let record = &record[..record.len() - RS.len_utf8()];
            let Ok(msg) = serde_json::from_str::<Value>(record) else {
                continue;
            };
            if !st.handshaken {
                let ok = msg["protocol"] == "json" && msg["version"] == 1;
                let answer = if ok {
                    json!({})
                } else {
                    json!({ "error": "only the json protocol, version 1" })
                };
                st.handshaken = ok;
                send(conn, answer);
                continue;
            }
            match msg["type"].as_u64() {
                Some(1) => {
                    lock(&self.stats).invocations += 1;
                    if let Some(id) = msg["invocationId"].as_str() {
                        let result = msg["arguments"].get(0).cloned().unwrap_or(Value::Null);
                        send(
                            conn,
                            json!({ "type": 3, "invocationId": id, "result": result }),
                        );
                    }
                }
                Some(7) => {
                    st.ended = true;
                    let _ = conn.out_tx.try_send(Out::End);
                }
                _ => {}
            }
        }
    }

    /// A long poll: the first one answers at once (the client only learns the connection
    /// works), later ones take what is queued, waiting up to [`POLL_HOLD`] for it; 204 once
    /// the connection ended.
    async fn poll(self: &Arc<Self>, id: &str, conn: &Arc<Conn>, ttl: Duration) -> Response {
        if lock(&conn.state).transport.is_none() {
            self.opened(conn, id, "LongPolling", ttl);
            return StatusCode::OK.into_response();
        }
        if lock(&conn.state).ended {
            lock(&self.conns).remove(id);
            return StatusCode::NO_CONTENT.into_response();
        }
        let mut rx = conn.out_rx.lock().await;
        let mut text = String::new();
        let first = tokio::time::timeout(POLL_HOLD, rx.recv()).await;
        let mut next = match first {
            Err(_) => return StatusCode::OK.into_response(),
            Ok(item) => item,
        };
        loop {
            match next {
                Some(Out::Frame(f)) => text.push_str(&f),
                Some(Out::End) | None => {
                    lock(&conn.state).ended = true;
                    break;
                }
            }
            next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(_) => break,
            };
        }
        if text.is_empty() {
            lock(&self.conns).remove(id);
            return StatusCode::NO_CONTENT.into_response();
        }
        let mut resp = Response::new(Body::from(text));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }
}

fn send(conn: &Conn, msg: Value) {
    let _ = conn.out_tx.try_send(Out::Frame(format!("{msg}{RS}")));
}

/// Pings the connection while it lives, and closes it when its token expires.
async fn keeper(
    hub: Arc<Hub>,
    id: String,
    conn: Weak<Conn>,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let expiry = tokio::time::Instant::now() + ttl.min(Duration::from_secs(24 * 3600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PING_EVERY) => {
                let Some(conn) = conn.upgrade() else { return };
                if lock(&conn.state).ended {
                    return;
                }
                if lock(&conn.state).handshaken {
                    send(&conn, json!({ "type": 6 }));
                }
            }
            _ = tokio::time::sleep_until(expiry) => {
                let Some(conn) = conn.upgrade() else { return };
                if lock(&conn.state).ended {
                    return;
                }
                lock(&hub.stats).expiry_closes += 1;
                send(&conn, json!({
                    "type": 7,
                    "error": "Connection closed: the access token expired.",
                    "allowReconnect": true,
                }));
                let _ = conn.out_tx.try_send(Out::End);
                // Long polling: its last poll hands the close over, the next one gets 204.
                if lock(&conn.state).transport != Some("LongPolling") {
                    lock(&hub.conns).remove(&id);
                }
                return;
            }
            _ = server::stopped(&mut stop) => return,
        }
    }
}

async fn websocket(hub: Arc<Hub>, id: String, conn: Arc<Conn>, mut socket: WebSocket) {
    let mut rx = conn.out_rx.lock().await;
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => hub.receive(&conn, t.as_str()),
                Some(Ok(Message::Binary(b))) => hub.receive(&conn, &String::from_utf8_lossy(&b)),
                Some(Ok(_)) => {}
                _ => break,
            },
            out = rx.recv() => match out {
                Some(Out::Frame(f)) => {
                    if socket.send(Message::Text(f.into())).await.is_err() {
                        break;
                    }
                }
                Some(Out::End) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
        }
    }
    lock(&conn.state).ended = true;
    lock(&hub.conns).remove(&id);
}

fn event_stream(hub: Arc<Hub>, id: String, conn: Arc<Conn>) -> Response {
    let (tx, body_rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut rx = conn.out_rx.lock().await;
        // An SSE stream opens with a comment line, as ASP.NET Core's does.
        if tx.send(Bytes::from_static(b":\r\n\r\n")).await.is_ok() {
            while let Some(Out::Frame(f)) = rx.recv().await {
                if tx
                    .send(Bytes::from(format!("data: {f}\r\n\r\n")))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        drop(rx);
        lock(&conn.state).ended = true;
        lock(&hub.conns).remove(&id);
    });
    let mut resp = Response::new(Body::new(Events::new(body_rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
