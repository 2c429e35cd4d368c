//! A mock upstream of long-lived connections: a Server-Sent Events endpoint whose pauses the
//! test chooses, and a WebSocket echo that records how long the token it was opened with still
//! had to live.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{mpsc, watch};

use crate::registry::TokenRegistry;
use crate::server;
use crate::upstream::bearer_token;
use crate::util::{lock, parse_form};

/// Longest pause `/sse` accepts, and most events: the mock never holds a connection for ever.
const MAX_GAP: Duration = Duration::from_secs(60);
const MAX_EVENTS: usize = 100;

struct Shared {
    registry: TokenRegistry,
    /// Time left on the token of each stream opened (`/ws` upgrade or `/sse`), in order.
    opened: Mutex<Vec<(&'static str, Duration)>>,
    shutdown: watch::Receiver<bool>,
}

/// The stream upstream. `GET /sse?gaps=100,3000` answers `text/event-stream`: an event `0` at
/// once, then one more event after each pause (milliseconds), then the end. `GET /ws` is a
/// WebSocket echo. Both need a token valid in the registry (else 401). Dropping the handle
/// stops the server.
pub struct StreamUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl StreamUpstream {
    /// Starts it on `127.0.0.1:0`, accepting the tokens of `registry`.
    pub async fn start(registry: TokenRegistry) -> io::Result<StreamUpstream> {
        let (listener, addr) = server::bind_loopback().await?;
        let (shutdown, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            registry,
            opened: Mutex::new(Vec::new()),
            shutdown: rx.clone(),
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        server::spawn(listener, router, rx, None);
        Ok(StreamUpstream {
            addr,
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Each stream opened (`"ws"` or `"sse"`) with the time its token had left when it came.
    pub fn opened(&self) -> Vec<(&'static str, Duration)> {
        lock(&self.shared.opened).clone()
    }
}

impl Drop for StreamUpstream {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl fmt::Debug for StreamUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    let token = bearer_token(&parts.headers, query.as_deref());
    let Some(ttl) = token.and_then(|t| shared.registry.ttl_left(&t)) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    match parts.uri.path() {
        "/sse" => {
            let gaps = query
                .as_deref()
                .map(parse_form)
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == "gaps")
                .map(|(_, v)| {
                    v.split(',')
                        .filter_map(|ms| ms.trim().parse::<u64>().ok())
                        .map(|ms| Duration::from_millis(ms).min(MAX_GAP))
                        .take(MAX_EVENTS)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            lock(&shared.opened).push(("sse", ttl));
            sse(gaps, shared.shutdown.clone())
        }
        "/ws" => match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => {
                lock(&shared.opened).push(("ws", ttl));
                let stop = shared.shutdown.clone();
                ws.on_upgrade(move |socket| echo(socket, stop))
            }
            Err(rejection) => rejection.into_response(),
        },
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn sse(gaps: Vec<Duration>, mut stop: watch::Receiver<bool>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut n = 0usize;
        let event = |n: usize| Bytes::from(format!("data: {n}\n\n"));
        if tx.send(event(n)).await.is_err() {
            return;
        }
        for gap in gaps {
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = server::stopped(&mut stop) => return,
            }
            n += 1;
            if tx.send(event(n)).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(Body::new(Events(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A streamed body: whatever its task sends, until the task ends (`/sse`, the SignalR hub's
/// event streams).
pub(crate) struct Events(mpsc::Receiver<Bytes>);

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>) -> Events {
        Events(rx)
    }
}

impl HttpBody for Events {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

async fn echo(mut socket: WebSocket, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if socket.send(Message::Text(t)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if socket.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            _ = server::stopped(&mut stop) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}
