//! Client connections: a cap on how many are held at once, a time limit on reading a
//! request head, an idle limit between keep-alive requests, and as little memory as possible
//! held by a connection that waits.
//!
//! Pingora 0.9 has none of these as settings: its keep-alive timer is hard-coded to 60 s for a
//! connection's first request and becomes unlimited once a request has been read (an HTTP/1.1
//! request without `Connection: close` sets it to "infinite"); its header read timeout restarts
//! with every read, so a client that sends a byte now and then holds the connection for ever;
//! and its accept loop spawns every connection without a limit. So the proxy's
//! [`ServerApp`] is wrapped: [`Limited`] counts connections and refuses the ones over the cap
//! with a 503, and every accepted stream is wrapped in a [`Guarded`] stream whose reads carry
//! a deadline while a request head or the next request is awaited. The proxy service tells the
//! stream where the connection stands ([`head_received`], [`request_done`]).
//!
//! Pingora also builds its whole request path's future (tens of KB) when it gets a stream and
//! keeps it while a keep-alive connection waits for its next request. [`Limited`] runs the
//! HTTP/1 keep-alive loop itself, so that a connection waiting for its first or next request
//! holds only its stream (bench/PROFILE.md §8.3).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use sidecar_config::Downstream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::app::App;

/// How long a refused connection may take to get its answer and close (lingering close).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// What a refused connection may send before it is closed without waiting for its end.
const REFUSAL_DRAIN: usize = 64 * 1024;

/// Wraps the proxy application: at most `downstream.max_connections` client connections at
/// once, each stream [`Guarded`]. Limits are read from the live config at each accept, so a
/// reload applies to new connections.
pub struct Limited<A> {
    app: Arc<A>,
    sidecar: Arc<App>,
    open: AtomicUsize,
    gauge: metrics::Gauge,
    refused: metrics::Counter,
}

impl<A> Limited<A> {
    /// Wraps `app`.
    pub fn new(app: A, sidecar: Arc<App>) -> Limited<A> {
        Limited {
            app: Arc::new(app),
            sidecar,
            open: AtomicUsize::new(0),
            gauge: metrics::gauge!("sidecar_client_connections"),
            refused: metrics::counter!("sidecar_client_connections_refused_total"),
        }
    }

    /// A place among the open connections, if fewer than `max` are open.
    fn slot(self: &Arc<Self>, max: usize) -> Option<Slot<A>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.gauge.increment(1.0);
        Some(Slot(Arc::clone(self)))
    }
}

/// One open connection of a [`Limited`] app; given back on drop.
struct Slot<A>(Arc<Limited<A>>);

impl<A> Drop for Slot<A> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Limited<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.sidecar.is_closing() {
            // Shutting down after `shutdown_delay`: no new connections (Pingora's listener stays
            // open until the in-flight requests are done, so they are closed here).
            return None;
        }
        let limits = self.sidecar.live.load().config.downstream;
        let Some(slot) = self.slot(limits.max_connections) else {
            self.refused.increment(1);
            // Boxed: its 4 KiB drain buffer would otherwise be part of every connection's
            // future, refused or not.
            Box::pin(refuse(stream, limits.max_connections)).await;
            return None;
        };
        // Served on a task of its own: Pingora's task for the connection holds its TLS
        // handshake's state inline (~10 KB, even on a plain-TCP listener) for as long as it runs,
        // so it ends here and the connection's life costs only what serving it needs
        // (bench/PROFILE.md §8.4). It runs on this thread's runtime, where Pingora put it.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let limited = Arc::clone(&slot.0);
            limited.serve(stream, limits, &shutdown).await;
            drop(slot);
        });
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Limited<A> {
    /// Serves one client connection to its end.
    async fn serve(self: &Arc<Self>, stream: Stream, limits: Downstream, shutdown: &ShutdownWatch) {
        let mut guarded = Box::new(Guarded::new(stream, limits));
        // Pingora builds the whole request path's future (tens of KB, bench/PROFILE.md §8.3) as
        // soon as it gets the stream: a client that connects and sends nothing would hold that
        // for up to `header_timeout`. Wait for its first bytes here, holding only the stream
        // (peeked, not consumed; the head deadline applies from the accept, as before), and see
        // whether they are HTTP/2's preface.
        let h2c = self.app.server_options().is_some_and(|o| o.h2c);
        let mut first = [0u8; H2_PREFACE.len()];
        if Peek::try_peek(
            guarded.as_mut(),
            &mut first[..if h2c { H2_PREFACE.len() } else { 1 }],
        )
        .await
        .is_err()
        {
            return;
        }
        let http1 = !(h2c && first == *H2_PREFACE)
            && guarded.get_ssl_digest().is_none()
            && guarded.selected_alpn_proto().is_none();
        if !http1 {
            // HTTP/2 (and anything but plain HTTP/1): Pingora's own connection handling.
            let mut next = Some(guarded as Stream);
            while let Some(stream) = next {
                next = A::process_new(&self.app, stream, shutdown).await;
            }
            return;
        }
        // HTTP/1: Pingora's keep-alive loop (`ServerApp for HttpServerApp`), except that between
        // two requests only the stream waits for the next one's first bytes; Pingora's request
        // future exists while a request is read and served. (Each session is built in the
        // call's arguments: kept in a variable it would be part of this future, 680 bytes.)
        let mut stop = Stopping::new(shutdown);
        let mut reused = self
            .app
            .process_new_http(self.first_session(guarded, shutdown), shutdown)
            .await;
        while let Some((stream, carried)) = reused.map(ReusedHttpStream::consume) {
            let Ok(mut guarded) = stream.into_any().downcast::<Guarded>() else {
                return;
            };
            if !guarded.next_request(&mut stop).await {
                return;
            }
            reused = self
                .app
                .process_new_http(next_session(guarded, carried), shutdown)
                .await;
        }
    }
}

impl<A: HttpServerApp> Limited<A> {
    /// The session of a connection's first request, set up as Pingora sets it up.
    fn first_session(&self, stream: Box<Guarded>, shutdown: &ShutdownWatch) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        session
    }
}

/// The start of the shutdown, as a connection's keep-alive waits look for it: one waiter for
/// the connection's life, registered at its first wait and left in place, and a receiver to
/// look at. (A wait per request registered a waiter and removed it again every time, and polling
/// a kept one costs about as much: ~500 instructions per request.) The receivers are clones of
/// Pingora's, so a shutdown that started before the connection's first wait is seen at once.
struct Stopping {
    shutdown: ShutdownWatch,
    /// Wakes the connection's task when the shutdown starts; made at the first wait.
    waiter: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Stopping {
    fn new(shutdown: &ShutdownWatch) -> Stopping {
        Stopping {
            shutdown: shutdown.clone(),
            waiter: None,
        }
    }

    /// Whether the shutdown has started (or its sender is gone); the first call also has this
    /// task woken when it starts. (A connection is served by one task.)
    fn poll_started(&mut self, cx: &mut Context<'_>) -> bool {
        if self.shutdown.has_changed().unwrap_or(true) {
            return true;
        }
        if self.waiter.is_none() {
            let mut shutdown = self.shutdown.clone();
            let mut waiter = Box::pin(async move {
                let _ = shutdown.changed().await;
            });
            let started = waiter.as_mut().poll(cx).is_ready();
            self.waiter = Some(waiter);
            return started;
        }
        false
    }
}

/// The session of a keep-alive connection's next request, with what Pingora carries over from
/// the last one (keep-alive limits, pipelined bytes).
fn next_session(stream: Box<Guarded>, carried: Option<HttpPersistentSettings>) -> ServerSession {
    let mut session = ServerSession::new_http1(stream);
    if let Some(carried) = carried {
        carried.apply_to_session(&mut session);
    }
    session
}

/// Answers a connection over the cap: 503 `too_many_connections` with `Connection: close`,
/// then a lingering close — the client's request is read and dropped until it closes (bounded
/// in time and bytes), so that closing with unread data does not reset the connection and
/// destroy the answer before the client has read it.
async fn refuse(mut stream: Stream, max: usize) {
    tracing::debug!(max, "client connection refused: too many connections");
    let body = serde_json::json!({
        "error": "too_many_connections",
        "message": format!("the sidecar holds its maximum of {max} client connections; retry shortly"),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(&mut stream).await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// Where a connection stands, as far as the read deadline is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// A request head is being read: the whole head within `header_timeout`.
    Head = 0,
    /// A request is being served: body and response timeouts are Pingora's.
    Request = 1,
    /// Between keep-alive requests: the next request must start within `idle_timeout`.
    Idle = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Head,
            1 => Phase::Request,
            _ => Phase::Idle,
        }
    }
}

/// A client stream whose reads time out while a request head (`header_timeout`, counted from
/// the head's first byte, or from the accept for the first request) or the next keep-alive
/// request (`idle_timeout`) is awaited. A head cut short gets a best-effort 408 before the read
/// fails; an idle connection just closes. Everything else is passed to the inner stream.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    /// Set by the proxy service through [`head_received`] and [`request_done`].
    phase: AtomicU8,
    limits: Downstream,
    /// The phase the deadline below belongs to; `None` before the first read.
    seen: Option<Phase>,
    deadline: Option<Instant>,
    /// Armed only when a read has to wait: most reads find their bytes ready.
    timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer wakes (it was polled from there).
    timer_task: Option<Waker>,
    /// Bytes of the current head have arrived (a timeout then deserves a 408).
    head_started: bool,
    timed_out: bool,
    /// Bytes read ahead (the HTTP/2 preface check, the next keep-alive request's first bytes),
    /// served again by the next reads.
    rewound: Vec<u8>,
    /// Bytes handed to Pingora so far.
    delivered: u64,
    /// Bytes of the requests Pingora has served, as far as [`request_done`] could count them;
    /// [`UNCOUNTED`] once a request's size on the wire is not known.
    served: AtomicU64,
}

/// [`Guarded::served`] once it cannot be known: Pingora is then left to read every next request.
const UNCOUNTED: u64 = u64::MAX;
/// How much of the next keep-alive request is read ahead at once (Pingora reads a head into
/// 4 KiB first too).
const READ_AHEAD: usize = 4096;
/// The read-ahead buffer a connection keeps between requests, so that a keep-alive request
/// of common size costs no allocation (one per request was ~100 instructions); a larger one
/// is freed once served, so 10,000 idle connections hold at most ~10 MiB of them.
const KEEP_READ_AHEAD: usize = 1024;

impl Guarded {
    fn new(inner: Stream, limits: Downstream) -> Guarded {
        Guarded {
            inner,
            phase: AtomicU8::new(Phase::Head as u8),
            limits,
            seen: None,
            deadline: None,
            timer: None,
            timer_task: None,
            head_started: false,
            timed_out: false,
            rewound: Vec::new(),
            delivered: 0,
            served: AtomicU64::new(0),
        }
    }

    /// Waits for the next keep-alive request's first bytes, at most `idle_timeout`, holding only
    /// this stream; the bytes are kept for Pingora's next read. False when the connection should
    /// close instead: the client closed it or stayed silent, the read failed, or the sidecar is
    /// shutting down.
    ///
    /// Pipelining: if Pingora was handed more bytes than the requests it served, it may hold the
    /// start of the next request already (and the client may send nothing more until it is
    /// answered), so there is nothing to wait for here: Pingora reads on by itself.
    async fn next_request(&mut self, stop: &mut Stopping) -> bool {
        if !self.rewound.is_empty() || self.delivered != self.served.load(Ordering::Acquire) {
            return true;
        }
        std::future::poll_fn(|cx| {
            if stop.poll_started(cx) {
                return Poll::Ready(false);
            }
            self.poll_next_request(cx)
        })
        .await
    }

    /// The next request's first bytes, or false at the idle deadline, at the end of the
    /// connection or on a read error. The deadline's timer is the stream's own, not one more
    /// per waiting connection.
    fn poll_next_request(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(deadline) = self.deadline(Phase::Idle) else {
            return Poll::Ready(true);
        };
        match self.poll_read_ahead(cx) {
            Poll::Ready(read) => Poll::Ready(matches!(read, Ok(n) if n > 0)),
            Poll::Pending if self.expired(deadline, cx) => {
                tracing::debug!("client connection idle too long; closing it");
                Poll::Ready(false)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// One read of the next request's first bytes into `rewound`. The bytes are read into this
    /// call's stack and copied out only when they came: a wait that finds nothing costs no
    /// allocation, and an idle connection holds at most [`KEEP_READ_AHEAD`] bytes.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut ahead = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut buf = ReadBuf::uninit(&mut ahead);
        match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n > 0 {
                    self.rewound.clear();
                    self.rewound.extend_from_slice(buf.filled());
                    // The next request has started: its head gets its own deadline.
                    self.set_phase(Phase::Head);
                    self.deadline(Phase::Head);
                    self.head_started = true;
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    /// Counts a served request's bytes on the wire (`None`: not known).
    fn count_served(&self, bytes: Option<u64>) {
        let before = self.served.load(Ordering::Acquire);
        let after = match bytes {
            Some(n) if before != UNCOUNTED => before + n,
            _ => UNCOUNTED,
        };
        self.served.store(after, Ordering::Release);
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The deadline of the current phase, starting it if the phase is new.
    fn deadline(&mut self, phase: Phase) -> Option<Instant> {
        if self.seen != Some(phase) {
            self.seen = Some(phase);
            let limit = match phase {
                Phase::Head => Some(self.limits.header_timeout),
                Phase::Idle => Some(self.limits.idle_timeout),
                Phase::Request => None,
            };
            self.deadline = limit.map(|d| Instant::now() + d);
            if phase != Phase::Head {
                self.head_started = false;
            }
        }
        self.deadline
    }

    /// Whether `deadline` has passed; otherwise makes sure this task is woken by then.
    ///
    /// Every request moves the deadline later, and moving a timer costs more than the rest of
    /// the wait, so the timer is left where it is while it would fire no later than the
    /// deadline: when it fires early, the deadline is checked and the timer set again (once per
    /// `header_timeout` on a busy connection, not once per request). Nor is it polled again
    /// while it is set for this task already.
    fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let set_for_this_task = self
            .timer_task
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        } else if timer.is_elapsed() {
            if timer.deadline() == deadline {
                return true;
            }
            timer.as_mut().reset(deadline);
        } else if set_for_this_task {
            return false;
        }
        if !set_for_this_task {
            self.timer_task = Some(cx.waker().clone());
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Best effort: one write attempt of a 408 for a client whose head stopped half way.
    fn answer_timeout(&mut self, cx: &mut Context<'_>) {
        let body = format!(
            "{{\"error\":\"request_timeout\",\"message\":\"the request head did not arrive within {}\"}}",
            humantime_ms(self.limits.header_timeout)
        );
        let answer = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let inner = Pin::new(&mut self.inner);
        if let Poll::Ready(Ok(_)) = inner.poll_write(cx, answer.as_bytes()) {
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
    }
}

/// `10s`, `1500ms`: how a duration is written in the config.
fn humantime_ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = this.read_guarded(cx, buf);
        this.delivered += (buf.filled().len() - before) as u64;
        read
    }
}

impl Guarded {
    fn read_guarded(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.rewound.is_empty() {
            let n = self.rewound.len().min(buf.remaining());
            buf.put_slice(&self.rewound[..n]);
            self.rewound.drain(..n);
            if self.rewound.is_empty() && self.rewound.capacity() > KEEP_READ_AHEAD {
                // A large read-ahead buffer is not kept for the whole connection.
                self.rewound = Vec::new();
            }
            self.head_started = true;
            return Poll::Ready(Ok(()));
        }
        if self.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let phase = self.phase();
        let Some(deadline) = self.deadline(phase) else {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if phase == Phase::Idle {
                        // The next request has started: its head gets its own deadline.
                        self.set_phase(Phase::Head);
                        self.deadline(Phase::Head);
                    }
                    self.head_started = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !self.expired(deadline, cx) {
                    return Poll::Pending;
                }
                self.timed_out = true;
                if phase == Phase::Head && self.head_started {
                    tracing::debug!("request head not complete in time; answering 408");
                    self.answer_timeout(cx);
                } else {
                    tracing::debug!(?phase, "client connection idle too long; closing it");
                }
                Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[async_trait]
impl Peek for Guarded {
    /// Pingora peeks for the HTTP/2 preface before the first read (h2c is on): that wait is
    /// part of the first head's time. Unlike a plain peek of 24 bytes, this stops at the first
    /// byte that differs from the preface, so a short HTTP/1.0 request (`GET / HTTP/1.0` and
    /// an empty line are 18 bytes) is answered instead of waiting for bytes that never come.
    /// Once the whole preface is there the connection is HTTP/2: its streams are timed by
    /// Pingora (`h2_idle_timeout`), not by the HTTP/1 head and idle deadlines.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let deadline = self.deadline(Phase::Head);
        match deadline {
            Some(at) => tokio::time::timeout_at(at, self.peek_preface(buf))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            None => self.peek_preface(buf).await,
        }
    }
}

impl Guarded {
    async fn peek_preface(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let want = buf.len().min(H2_PREFACE.len());
        while self.rewound.len() < want && H2_PREFACE.starts_with(&self.rewound) {
            let mut chunk = [0u8; 24];
            let n = self
                .inner
                .read(&mut chunk[..want - self.rewound.len()])
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.rewound.extend_from_slice(&chunk[..n]);
        }
        buf.fill(0);
        let n = self.rewound.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rewound[..n]);
        if self.rewound == H2_PREFACE {
            self.set_phase(Phase::Request);
        }
        Ok(true)
    }
}

fn guarded(session: &Session) -> Option<&Guarded> {
    session
        .as_downstream()
        .stream()?
        .as_any()
        .downcast_ref::<Guarded>()
}

/// A request head has been read: the head deadline is over. Also asks Pingora to answer
/// pipelined requests in order (RFC 9112 §9.3.2) instead of dropping them with the connection.
pub fn head_received(session: &mut Session) {
    session.as_downstream_mut().set_pipelining_enabled(true);
    if let Some(g) = guarded(session) {
        g.set_phase(Phase::Request);
    }
}

/// The request is answered: the connection waits for the next one, at most `idle_timeout`.
pub fn request_done(session: &Session) {
    if let Some(g) = guarded(session) {
        g.set_phase(Phase::Idle);
        g.count_served(wire_size(session));
    }
}

/// The request's size on the wire as far as Pingora has read it (head and body), never more:
/// `None` when Pingora's copy of the head may be longer than what the client sent (it
/// percent-escapes a request line it could not parse otherwise). A chunked body counts its
/// data only, and a body Pingora drains after this point not at all: both count less, which
/// only means the connection is left to Pingora's own keep-alive wait.
fn wire_size(session: &Session) -> Option<u64> {
    let down = session.as_downstream();
    if may_be_escaped(down.req_header().raw_path()) {
        return None;
    }
    Some((down.to_h1_raw().len() + down.body_bytes_read()) as u64)
}

/// Whether Pingora may have percent-escaped `target`. It escapes the controls, space, `"`, `<`,
/// `>`, DEL and non-ASCII bytes of a request line it could not parse otherwise, as `%XX` with
/// upper-case digits; a target with no such code is exactly what the client sent. (A client's
/// own `%20` looks the same and is counted as unknown too.)
fn may_be_escaped(target: &[u8]) -> bool {
    fn upper_hex(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'A'..=b'F' => Some(d - b'A' + 10),
            _ => None,
        }
    }
    target.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (upper_hex(w[1]), upper_hex(w[2])),
                (Some(hi), Some(lo)) if matches!(hi << 4 | lo, 0..=0x20 | 0x22 | 0x3C | 0x3E | 0x7F..)
            )
    })
}

#[cfg(test)]
mod tests;
