//! Per-request state: what the hooks learn about one request and pass on to the next hook.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use sidecar_filters::{Attempt, ErrorClass, Generations, SkipReason, StreamKind};
use sidecar_token::Token;

use crate::app::{Live, UpstreamRt};
use crate::errors::LocalAnswer;
use crate::inflight::InflightGuard;
use crate::streams::{OpenStream, StreamSlot};

/// How many upstream statuses the access line lists at most.
const MAX_STATUSES: usize = 32;

/// The route a request took: the config it runs under and its upstream there.
#[derive(Clone)]
pub struct Routed {
    live: Arc<Live>,
    upstream: usize,
}

impl Routed {
    /// Upstream number `upstream` of `live` (an index `Routes::route` gave for that config).
    pub(crate) fn new(live: Arc<Live>, upstream: usize) -> Routed {
        Routed { live, upstream }
    }

    /// The config (and everything built from it) the request runs under.
    pub(crate) fn live(&self) -> &Live {
        &self.live
    }

    /// The upstream.
    pub(crate) fn up(&self) -> &UpstreamRt {
        &self.live.upstreams[self.upstream]
    }
}

/// The copy of a replayable request's body that the sidecar's own replay sends, bounded by
/// `replay.max_body`.
pub(crate) struct ReplayBody {
    bytes: BytesMut,
    max: u64,
}

impl ReplayBody {
    /// An empty copy that holds at most `max` bytes. Allocates nothing until a chunk comes.
    pub(crate) fn new(max: u64) -> ReplayBody {
        ReplayBody {
            bytes: BytesMut::new(),
            max,
        }
    }

    /// Adds a chunk; past the bound, forgets everything and says the body is too large.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), SkipReason> {
        if (self.bytes.len() as u64).saturating_add(chunk.len() as u64) > self.max {
            self.bytes = BytesMut::new();
            return Err(SkipReason::BodyTooLarge);
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// The body kept, handed over once (without a copy).
    pub(crate) fn take(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes).freeze()
    }
}

/// Per-request state.
pub struct Ctx {
    _inflight: InflightGuard,
    /// When the request came.
    pub(crate) started: Instant,
    /// Set once a route matched.
    pub(crate) route: Option<Routed>,
    /// Path to send upstream when the route rewrites it.
    pub(crate) path: Option<String>,
    /// The token injected into the current attempt; `None` passes the request through.
    pub(crate) token: Option<Arc<Token>>,
    /// Requests sent upstream so far (first attempt and replays).
    pub(crate) attempts: u32,
    /// Replays done.
    pub(crate) replays: u32,
    /// Whether this request may be replayed, or why not.
    pub(crate) replay: Result<(), SkipReason>,
    /// This request already forced one refresh: a rejection of its next token passes through.
    pub(crate) forced: bool,
    /// Copy of the request body, for the sidecar's own replay.
    pub(crate) body: ReplayBody,
    /// The next `request_body_filter` call carries Pingora's retry buffer, already copied.
    pub(crate) retry_buffer_next: bool,
    /// The expired-token answer held back for an own replay, in case no replay can be made.
    pub(crate) rejected: Option<Box<ResponseHeader>>,
    /// Error code of a local answer, for the access log.
    pub(crate) local: Option<&'static str>,
    /// Retries of transient failures done.
    pub(crate) transient: u32,
    /// Wait before the next attempt (backoff or Retry-After). Decided where the failure is seen
    /// (`fail_to_connect` cannot wait, and a response hook would hold the upstream connection
    /// while it waits); slept in `upstream_peer`, the first async hook of the next attempt.
    pub(crate) next_attempt_after: Option<Duration>,
    /// When the current attempt's request went to the upstream, until its answer's header came
    /// (`sidecar_upstream_duration_seconds`).
    pub(crate) sent_at: Option<Instant>,
    /// This request is the circuit breaker's probe.
    pub(crate) probe: bool,
    /// The client sent `X-Sidecar-Expected-Duration` (to strip before forwarding).
    pub(crate) expected_header: bool,
    /// Error class of the last attempt, for metrics and the log.
    pub(crate) class: Option<ErrorClass>,
    /// The sidecar's own answer, decided in a hook that can only fail, for `fail_to_proxy` to
    /// write (a rejected token with no replacement; a token that cannot be sent).
    pub(crate) pending_answer: Option<LocalAnswer>,
    /// The upstream's addresses when the request first connected, and where in them it
    /// started (round robin); kept for its retries so that a connect failure moves on to the
    /// next address of the same set.
    pub(crate) addrs: Option<(Arc<Vec<SocketAddr>>, usize)>,
    /// Connect failures so far (which address the next connect goes to).
    pub(crate) connect_failures: usize,
    /// The client's `X-Request-Id` or `traceparent`, or the `X-Request-Id` the sidecar made up
    /// and sent upstream; for the access log.
    pub(crate) request_id: Option<String>,
    /// The status of each upstream answer, in order (replays and retries included). Held in
    /// the context itself: most requests get one answer, and a list on the heap cost each of
    /// them an allocation.
    pub(crate) upstream_statuses: ArrayVec<u16, MAX_STATUSES>,
    /// Time spent waiting for upstream answers' headers, all attempts together.
    pub(crate) upstream_time: Duration,
    /// The request asks for a stream (WebSocket upgrade, `Accept: text/event-stream`): its
    /// upstream connection is bounded by `stream_idle`, its token by `upgrade.min_ttl`.
    pub(crate) stream_request: Option<StreamKind>,
    /// Its place under `max_streams`, held until the request ends.
    pub(crate) stream_slot: Option<StreamSlot>,
    /// The answer started a stream: open in the metrics until the request ends.
    pub(crate) stream: Option<OpenStream>,
}

impl Ctx {
    /// The address the request's latest Pingora attempt went to (the own replay's client picks
    /// from the same set).
    pub(crate) fn upstream_addr(&self) -> Option<SocketAddr> {
        let (addrs, start) = self.addrs.as_ref()?;
        let i = crate::dns::address_index(*start, self.connect_failures, addrs.len())?;
        addrs.get(i).copied()
    }

    /// A request that just came in.
    pub(crate) fn new(inflight: InflightGuard) -> Ctx {
        Ctx {
            _inflight: inflight,
            started: Instant::now(),
            route: None,
            path: None,
            token: None,
            attempts: 0,
            replays: 0,
            replay: Err(SkipReason::NoToken),
            forced: false,
            body: ReplayBody::new(0),
            retry_buffer_next: false,
            rejected: None,
            local: None,
            transient: 0,
            next_attempt_after: None,
            sent_at: None,
            probe: false,
            expected_header: false,
            class: None,
            pending_answer: None,
            addrs: None,
            connect_failures: 0,
            request_id: None,
            upstream_statuses: ArrayVec::new(),
            upstream_time: Duration::ZERO,
            stream_request: None,
            stream_slot: None,
            stream: None,
        }
    }

    /// Notes an upstream answer's status and how long its header took, for the access log.
    pub(crate) fn answered(&mut self, status: u16, took: Duration) {
        // Bounded by replay.max_attempts and retry.max_attempts; a cap keeps the line short
        // whatever they are set to.
        let _ = self.upstream_statuses.try_push(status);
        self.upstream_time = self.upstream_time.saturating_add(took);
    }

    /// The upstream of the route, if one matched.
    pub(crate) fn up(&self) -> Option<&UpstreamRt> {
        self.route.as_ref().map(Routed::up)
    }

    /// Keeps a body chunk for a possible own replay; a body past `max_body` makes the request
    /// not replayable.
    pub(crate) fn keep_body(&mut self, chunk: &[u8]) {
        if let Err(reason) = self.body.push(chunk) {
            self.replay = Err(reason);
        }
    }

    /// The state [`sidecar_filters::after_response`] decides on; `body_whole` says whether
    /// Pingora's retry buffer holds the whole body.
    pub(crate) fn attempt(&self, body_whole: bool) -> Attempt {
        Attempt {
            attempts: self.attempts,
            transient: self.transient,
            replay: self.replay,
            forced: self.forced,
            body_whole,
            token: self.generations(),
        }
    }

    /// The generation this attempt carried and the provider's newest; `None` without a token.
    fn generations(&self) -> Option<Generations> {
        let sent = self.token.as_ref()?.generation;
        let current = self
            .up()
            .and_then(|up| up.tokens.as_ref())
            .and_then(|s| s.current())
            .map_or(0, |t| t.generation);
        Some(Generations { sent, current })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_body_keeps_up_to_its_bound_then_nothing() {
        let mut body = ReplayBody::new(5);
        assert_eq!(body.push(b"abc"), Ok(()));
        assert_eq!(body.push(b"de"), Ok(()));
        assert_eq!(body.take(), Bytes::from_static(b"abcde"));
        let mut body = ReplayBody::new(5);
        assert_eq!(body.push(b"abc"), Ok(()));
        assert_eq!(body.push(b"def"), Err(SkipReason::BodyTooLarge));
        assert!(body.take().is_empty());
    }
}
