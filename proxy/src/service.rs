//! The Pingora `ProxyHttp` adapter: each hook asks `sidecar-filters` or the token source for a
//! decision and acts on it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderName, Uri};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use sidecar_filters::{
    absolute_form_authority, after_connect_failure, after_response, client_authorization,
    query_with_token, replayable, retry_after_of, Admission, Answer, Attempt, AuthzDecision,
    BreakerVerdict, ConnectFailure, ErrorClass, Generations, Policy, RateRequest, RequestView,
    Route, SkipReason, Step,
};
use sidecar_token::{Token, TokenSource, Trigger};

use crate::app::{App, InflightGuard, Live};
use crate::errors::LocalAnswer;

/// Request header asking for a token that lasts the whole of a long operation (SPEC §5).
pub const EXPECTED_DURATION: HeaderName = HeaderName::from_static("x-sidecar-expected-duration");

/// The proxy service.
pub struct Sidecar {
    app: Arc<App>,
}

impl Sidecar {
    /// A service over shared state.
    pub fn new(app: Arc<App>) -> Sidecar {
        Sidecar { app }
    }
}

/// Per-request state.
pub struct Ctx {
    _inflight: InflightGuard,
    started: Instant,
    pub(crate) live: Option<Arc<Live>>,
    pub(crate) upstream: Option<usize>,
    /// Path to send upstream when the route rewrites it.
    pub(crate) path: Option<String>,
    /// The token injected into the current attempt; `None` passes the request through.
    pub(crate) token: Option<Arc<Token>>,
    /// Requests sent upstream so far (first attempt and replays).
    pub(crate) attempts: u32,
    /// Replays done.
    pub(crate) replays: u32,
    /// Whether this request may be replayed, or why not.
    pub(crate) replay: std::result::Result<(), SkipReason>,
    /// This request already forced one refresh: a rejection of its next token passes through.
    pub(crate) forced: bool,
    /// Copy of the request body (replayable requests, up to `replay.max_body`).
    pub(crate) body: BytesMut,
    /// The next `request_body_filter` call carries Pingora's retry buffer, already copied.
    retry_buffer_next: bool,
    /// The expired-token answer that started an own replay, in case no replay can be made.
    pub(crate) rejected: Option<Box<ResponseHeader>>,
    /// Error code of a local answer, for the access log.
    pub(crate) local: Option<&'static str>,
    /// Retries of transient failures done (SPEC §8).
    pub(crate) transient: u32,
    /// Wait before the next attempt (backoff or Retry-After). Decided where the failure is seen
    /// (`fail_to_connect` cannot wait, a response hook would hold the upstream connection while
    /// it waits); slept in `upstream_peer`, the first async hook of the next attempt.
    next_attempt_after: Option<Duration>,
    /// This request is the circuit breaker's probe.
    probe: bool,
    /// The client sent `X-Sidecar-Expected-Duration` (to strip before forwarding).
    expected_header: bool,
    /// Error class of the last attempt, for metrics and the log.
    pub(crate) class: Option<ErrorClass>,
    /// The 503 to give when a rejected request's replacement token could not be had.
    unavailable: Option<LocalAnswer>,
}

/// Pingora retries this error through its own loop (body in its retry buffer).
const RETRY: ErrorType = ErrorType::Custom("sidecar_replay");
/// The sidecar replays itself from `fail_to_proxy` (a body too large for Pingora's buffer).
const OWN_REPLAY: ErrorType = ErrorType::Custom("sidecar_own_replay");
/// The answer's body decides whether the token expired: the sidecar re-sends and looks.
const CHECK_BODY: ErrorType = ErrorType::Custom("sidecar_check_body");
/// A rejected replayable request got no new token within `wait_for_token`: 503, not the 401
/// (which would tell the client its own credentials are wrong).
const TOKEN_UNAVAILABLE: ErrorType = ErrorType::Custom("sidecar_token_unavailable");

impl Sidecar {
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        answer: LocalAnswer,
    ) -> Result<bool> {
        ctx.local = Some(answer.code);
        answer.write(session).await;
        Ok(true)
    }

    /// A usable token, waiting for one within the configured bounds; with `expected`, one that
    /// lasts 1.5× that long.
    async fn token_for(
        &self,
        source: &TokenSource,
        cfg: &sidecar_config::Replay,
        expected: Option<Duration>,
    ) -> std::result::Result<Arc<Token>, LocalAnswer> {
        if expected.is_none() {
            if let Some(t) = source.usable() {
                return Ok(if source.is_rejected(&t) {
                    self.replacement(source, t, cfg).await
                } else {
                    t
                });
            }
        }
        let unavailable =
            |message: String| LocalAnswer::token_unavailable(message, Duration::from_secs(1));
        let Some(_slot) = self.app.wait_slot(cfg.max_waiting) else {
            return Err(unavailable(format!(
                "too many requests are waiting for a token of provider {}",
                source.name()
            )));
        };
        match expected {
            Some(d) => source.ensure(d.mul_f64(1.5), cfg.wait_for_token).await,
            None => source.wait_usable(cfg.wait_for_token).await,
        }
        .map_err(|e| unavailable(e.to_string()))
    }
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = Ctx;

    /// Pingora's error lines summarise the request with its raw target; the query may carry a
    /// token (browser SignalR clients), so only method, path and host are shown.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _inflight: self.app.enter(),
            started: Instant::now(),
            live: None,
            upstream: None,
            path: None,
            token: None,
            attempts: 0,
            replays: 0,
            replay: Err(SkipReason::NoToken),
            forced: false,
            body: BytesMut::new(),
            retry_buffer_next: false,
            rejected: None,
            local: None,
            transient: 0,
            next_attempt_after: None,
            probe: false,
            expected_header: false,
            class: None,
            unavailable: None,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        crate::connection::head_received(session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let live = self.app.live.load_full();
        // Set first: the sidecar's own answers are logged and counted under this config too.
        ctx.live = Some(live.clone());
        let req = session.req_header();
        let h2 = session.as_downstream().is_http2();
        let host = req
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        let view = RequestView {
            method: &req.method,
            path: req.uri.path(),
            absolute_authority: if h2 {
                None
            } else {
                absolute_form_authority(req.raw_path()).or(req.uri.authority().map(|a| a.as_str()))
            },
            host,
        };
        // The route, the rate limits and the upstream all see the normalised path (SPEC §11).
        let (index, path, normalized) = match live.routes.route(&view) {
            Route::Upstream {
                index,
                path,
                normalized,
            } => (index, path, normalized),
            Route::Forbidden(why) => {
                return self.answer(session, ctx, LocalAnswer::forbidden(why)).await
            }
            Route::BadPath(why) => {
                let answer = LocalAnswer::bad_request(why.to_string());
                return self.answer(session, ctx, answer).await;
            }
            Route::NoRoute => {
                let answer = LocalAnswer::no_route(req.uri.path());
                return self.answer(session, ctx, answer).await;
            }
        };
        ctx.upstream = Some(index);
        ctx.path = path;
        let up = &live.upstreams[index];
        // The provider whose token goes on this request, if any.
        let inject = match &up.tokens {
            None => None,
            Some(source) => {
                let has_own = req.headers.contains_key(AUTHORIZATION);
                match client_authorization(up.config.client_authorization, has_own) {
                    AuthzDecision::Reject => {
                        let answer = LocalAnswer::client_authorization();
                        return self.answer(session, ctx, answer).await;
                    }
                    AuthzDecision::KeepClient => None,
                    AuthzDecision::Inject => Some(source),
                }
            }
        };
        match up.breaker.check(Instant::now()) {
            BreakerVerdict::Allow => {}
            BreakerVerdict::Probe => ctx.probe = true,
            BreakerVerdict::Reject(wait) => {
                let answer = LocalAnswer::circuit_open(&up.config.name, wait);
                return self.answer(session, ctx, answer).await;
            }
        }
        if !live.limiter.is_empty() {
            let req = session.req_header();
            let client_ip = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let request = RateRequest {
                upstream: &up.config.name,
                method: &req.method,
                path: &normalized,
                client_ip,
                headers: Some(&req.headers),
            };
            if let Admission::Reject { rule, retry_after } = live.limiter.admit(&request).await {
                let answer = LocalAnswer::rate_limited(&rule, retry_after);
                return self.answer(session, ctx, answer).await;
            }
        }
        let req = session.req_header();
        let cfg = &live.config.replay;
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The key only matters for methods that are not idempotent by themselves.
        let has_key = !cfg.idempotent_methods.contains(&req.method)
            && req.headers.contains_key(&cfg.idempotency_header);
        ctx.replay = replayable(&req.method, has_key, declared, up.config.replay, cfg);
        let expected_header = req.headers.get(EXPECTED_DURATION);
        // Never forwarded, whatever the route (SPEC §5).
        ctx.expected_header = expected_header.is_some();
        if let Some(source) = inject {
            let expected = match expected_header {
                None => None,
                Some(v) => match v.to_str().ok().map(sidecar_config::parse_duration) {
                    Some(Ok(d)) => Some(d),
                    _ => {
                        let answer = LocalAnswer::bad_request(format!(
                            "{EXPECTED_DURATION} must be a duration like 90s or 3h"
                        ));
                        return self.answer(session, ctx, answer).await;
                    }
                },
            };
            match self.token_for(source, cfg, expected).await {
                Ok(t) => ctx.token = Some(t),
                Err(answer) => return self.answer(session, ctx, answer).await,
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(live), Some(i)) = (&ctx.live, ctx.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let up = &live.upstreams[i];
        if let Some(delay) = ctx.next_attempt_after.take() {
            tokio::time::sleep(delay).await;
        }
        // An upstream that answered 429/503 with Retry-After is left alone until then.
        if let Some(until) = self.app.holds.held_until(&up.config.name) {
            tokio::time::sleep_until(until).await;
        }
        Ok(Box::new(up.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.attempts += 1;
        ctx.retry_buffer_next = ctx.attempts > 1;
        self.swap_refused_token(ctx).await;
        let (Some(live), Some(i)) = (&ctx.live, ctx.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let up = &live.upstreams[i];
        upstream_request.insert_header(HOST, up.host_header.clone())?;
        if ctx.expected_header {
            upstream_request.remove_header(&EXPECTED_DURATION);
        }
        if let Some(pq) = upstream_target(ctx, up, &session.req_header().uri) {
            let uri: Uri = pq.parse().map_err(|_| {
                Error::explain(ErrorType::InvalidHTTPHeader, "cannot rewrite the path")
            })?;
            upstream_request.set_uri(uri);
        }
        if let Some(token) = &ctx.token {
            let header = token_header(up, token)?;
            // insert_header replaces: only a token carried elsewhere needs an explicit removal.
            if header
                .as_ref()
                .is_none_or(|(name, _)| name != AUTHORIZATION)
            {
                upstream_request.remove_header(&AUTHORIZATION);
            }
            if let Some((name, value)) = header {
                upstream_request.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if std::mem::take(&mut ctx.retry_buffer_next) {
            // Pingora's retry buffer: bytes already copied on the first attempt.
            return Ok(());
        }
        // Only token-carrying requests can need the sidecar's own replay path; other retries
        // use Pingora's buffer.
        if ctx.replay.is_err() || ctx.token.is_none() {
            return Ok(());
        }
        if let (Some(chunk), Some(live)) = (body.as_ref(), &ctx.live) {
            if (ctx.body.len() + chunk.len()) as u64 > live.config.replay.max_body {
                ctx.body = BytesMut::new();
                ctx.replay = Err(SkipReason::BodyTooLarge);
            } else {
                ctx.body.extend_from_slice(chunk);
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.inspect_response(session, upstream_response, ctx)
            .await?;
        // The answer goes to the client. (Done here rather than in `response_filter`: one hook
        // less per request.)
        if ctx.replays > 0
            && ctx
                .live
                .as_ref()
                .is_some_and(|l| l.config.replay.debug_header)
        {
            upstream_response.insert_header("x-sidecar-replayed", ctx.replays.to_string())?;
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        _ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if *e.etype() == RETRY {
            return e;
        }
        if *e.etype() == OWN_REPLAY || *e.etype() == CHECK_BODY || *e.etype() == TOKEN_UNAVAILABLE {
            // fail_to_proxy takes it from here; Pingora must not resend on its own.
            let mut e = e;
            e.set_retry(false);
            return e;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match e.etype() {
            ErrorType::ConnectTimedout => ConnectFailure::Timeout,
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert => ConnectFailure::Permanent,
            _ => ConnectFailure::Other,
        };
        let Some(live) = &ctx.live else {
            e.set_retry(false);
            return e;
        };
        let (class, delay) =
            after_connect_failure(failure, ctx.transient, &live.config.retry, rand::random());
        ctx.class = Some(class);
        match delay {
            // Nothing was sent: any request may go again.
            Some(d) => {
                ctx.next_attempt_after = Some(d);
                ctx.transient += 1;
                e.set_retry(true);
            }
            None => e.set_retry(false),
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if (*e.etype() == OWN_REPLAY || *e.etype() == CHECK_BODY)
            && session.response_written().is_none()
        {
            let code = crate::replay::own_replay(self, session, ctx).await;
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        let upstream = ctx
            .live
            .as_ref()
            .zip(ctx.upstream)
            .map(|(l, i)| l.upstreams[i].config.name.clone())
            .unwrap_or_default();
        let answer = match e.etype() {
            t if *t == TOKEN_UNAVAILABLE => ctx.unavailable.take(),
            ErrorType::HTTPStatus(code) => Some(LocalAnswer {
                status: *code,
                code: "error",
                message: "request failed".into(),
                retry_after: None,
            }),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                ctx.class = Some(ErrorClass::Timeout);
                Some(LocalAnswer::timeout(&upstream))
            }
            _ => match e.esource() {
                ErrorSource::Upstream => {
                    ctx.class = Some(ErrorClass::Network);
                    Some(LocalAnswer::unreachable(&upstream))
                }
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(LocalAnswer::bad_request("malformed request".into())),
                },
                ErrorSource::Internal | ErrorSource::Unset => Some(LocalAnswer {
                    status: 500,
                    code: "internal",
                    message: "internal error".into(),
                    retry_after: None,
                }),
            },
        };
        let code = match answer {
            Some(a) if session.response_written().is_none() => {
                session.set_keepalive(None);
                ctx.local = Some(a.code);
                a.write(session).await;
                a.status
            }
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        crate::connection::request_done(session);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let route = ctx
            .live
            .as_deref()
            .zip(ctx.upstream)
            .map(|(l, i)| &l.upstreams[i]);
        let upstream = route.map_or("", |up| up.config.name.as_str());
        let method = session.req_header().method.as_str();
        let m = route.map_or(&self.app.unrouted, |up| &up.metrics);
        m.requests(method, status).increment(1);
        m.duration.record(elapsed.as_secs_f64());
        if let Some(up) = route {
            if ctx.attempts > 0 || ctx.class.is_some() {
                let failed = ctx.class.is_some_and(ErrorClass::is_upstream_failure);
                up.breaker.record(!failed, Instant::now());
            } else if ctx.probe {
                up.breaker.abandon_probe();
            }
            if let Some(class) = ctx.class {
                metrics::counter!("sidecar_upstream_errors_total", "upstream" => up.config.name.clone(), "class" => class.as_str()).increment(1);
            }
        }
        let access_log = ctx.live.as_ref().is_none_or(|l| l.config.log.access_log);
        if access_log {
            tracing::info!(
                target: "access",
                method,
                path = session.req_header().uri.path(),
                upstream,
                status,
                duration_ms = elapsed.as_micros() as f64 / 1000.0,
                attempts = ctx.attempts,
                replayed = ctx.replays,
                generation = ctx.token.as_ref().map_or(0, |t| t.generation),
                local = ctx.local.unwrap_or(""),
                class = ctx.class.map_or("", ErrorClass::as_str),
                error = e.map(|e| e.etype().as_str()).unwrap_or(""),
            );
        }
    }
}

impl Sidecar {
    /// What happens to an upstream answer: [`after_response`] decides, this carries the step
    /// out. `Err` hands the request to Pingora's retry loop (`RETRY`) or to `fail_to_proxy`
    /// (`CHECK_BODY`, `OWN_REPLAY`, `TOKEN_UNAVAILABLE`): the only way out of a response hook.
    async fn inspect_response(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.class = ErrorClass::of_status(status);
        if status < 400 {
            return Ok(());
        }
        let Some(live) = ctx.live.clone() else {
            return Ok(());
        };
        let Some(up) = ctx.upstream.map(|i| &live.upstreams[i]) else {
            return Ok(());
        };
        let headers = &upstream_response.headers;
        let retry_after = retry_after_of(
            status,
            headers.get(http::header::RETRY_AFTER).map(|v| v.as_bytes()),
            SystemTime::now(),
        );
        if let Some(d) = retry_after {
            // Further requests to this upstream wait until then (bounded by max_retry_after),
            // whatever becomes of this one.
            self.app.holds.hold_for(&up.config.name, d);
        }
        let answer = Answer {
            status,
            www_authenticate: headers
                .get(http::header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            retry_after,
        };
        let state = Attempt {
            attempts: ctx.attempts,
            transient: ctx.transient,
            replay: ctx.replay,
            forced: ctx.forced,
            body_whole: body_whole(session),
            token: generations(ctx, up),
        };
        let policy = Policy {
            retry: &live.config.retry,
            expiry: &up.config.expiry,
            max_attempts: live.config.replay.max_attempts,
        };
        let step = after_response(&answer, &state, &policy, rand::random());
        match step {
            Step::Pass => Ok(()),
            Step::Skip(reason) => {
                skipped(up, reason);
                Ok(())
            }
            Step::Retry { delay } => {
                ctx.transient += 1;
                ctx.next_attempt_after = Some(delay);
                let mut e = Error::explain(RETRY, "transient upstream answer; retrying");
                e.set_retry(true);
                Err(e)
            }
            Step::CheckBody => {
                ctx.rejected = Some(Box::new(upstream_response.clone()));
                Err(Error::explain(
                    CHECK_BODY,
                    "the answer's body decides whether the token expired",
                ))
            }
            Step::Replay { refresh } | Step::OwnReplay { refresh } => {
                let failed = ctx.token.as_ref().map_or(0, |t| t.generation);
                if !self.next_token(&live, up, ctx, refresh, failed).await {
                    skipped(up, SkipReason::NoToken);
                    ctx.unavailable =
                        Some(token_unavailable(up, live.config.replay.wait_for_token));
                    return Err(Error::explain(
                        TOKEN_UNAVAILABLE,
                        "no replacement for a rejected token within wait_for_token",
                    ));
                }
                if let Step::Replay { .. } = step {
                    let mut e = Error::explain(
                        RETRY,
                        "token expired upstream; replaying with a fresh token",
                    );
                    e.set_retry(true);
                    Err(e)
                } else {
                    ctx.rejected = Some(Box::new(upstream_response.clone()));
                    Err(Error::explain(
                        OWN_REPLAY,
                        "token expired upstream; replaying a large body",
                    ))
                }
            }
        }
    }
}

impl Sidecar {
    /// The token that replaces `refused` (refused by an upstream, its replacement in flight):
    /// joins that refresh rather than send a request bound to be refused and replayed — on a
    /// refresh storm a wait for the one identity-provider call instead of a wasted upstream
    /// round trip per request. Takes no `max_waiting` slot: it joins a call already under way
    /// (bounded by `wait_for_token`) and holds no buffered body. If the refresh fails, the
    /// refused token goes out as it would have.
    async fn replacement(
        &self,
        source: &TokenSource,
        refused: Arc<Token>,
        cfg: &sidecar_config::Replay,
    ) -> Arc<Token> {
        join_refresh(source, refused.generation, cfg)
            .await
            .unwrap_or(refused)
    }

    /// `upstream_request_filter`'s side of [`Sidecar::replacement`]: the token was refused
    /// after this request took it. Costs one atomic load when it was not.
    async fn swap_refused_token(&self, ctx: &mut Ctx) {
        let (live, i, token) = match (&ctx.live, ctx.upstream, &ctx.token) {
            (Some(l), Some(i), Some(t))
                if l.upstreams[i]
                    .tokens
                    .as_ref()
                    .is_some_and(|s| s.is_rejected(t)) =>
            {
                (l.clone(), i, t.clone())
            }
            _ => return,
        };
        if let Some(source) = &live.upstreams[i].tokens {
            ctx.token = Some(self.replacement(source, token, &live.config.replay).await);
        }
    }

    /// Makes `ctx.token` the token to replay with, as [`Step::Replay`] says: the newer token
    /// already held, or (`refresh`) the one refresh for `failed_generation`, joined or started.
    /// Waiting for the refresh counts against `max_waiting` and `wait_for_token`; `false` when
    /// no token came.
    pub(crate) async fn next_token(
        &self,
        live: &Live,
        up: &crate::app::UpstreamRt,
        ctx: &mut Ctx,
        refresh: bool,
        failed_generation: u64,
    ) -> bool {
        let Some(source) = &up.tokens else {
            return false;
        };
        if !refresh {
            ctx.token = source.usable().or_else(|| source.current());
            ctx.replays += 1;
            replayed(up, "newer_token", "ok");
            return true;
        }
        ctx.forced = true;
        match self
            .wait_refresh(source, failed_generation, &live.config.replay)
            .await
        {
            Some(t) => {
                ctx.token = Some(t);
                ctx.replays += 1;
                replayed(up, "refreshed", "ok");
                true
            }
            None => {
                replayed(up, "refreshed", "no_token");
                false
            }
        }
    }

    /// The replacement of a rejected token, trying again after failed refreshes (each try
    /// waits out the provider's backoff) until `wait_for_token` runs out.
    async fn wait_refresh(
        &self,
        source: &TokenSource,
        failed_generation: u64,
        cfg: &sidecar_config::Replay,
    ) -> Option<Arc<Token>> {
        let _slot = self.app.wait_slot(cfg.max_waiting)?;
        let deadline = tokio::time::Instant::now() + cfg.wait_for_token;
        loop {
            let refresh = source.refresh(Trigger::Unauthorized, Some(failed_generation));
            match tokio::time::timeout_at(deadline, refresh).await {
                Ok(Ok(token)) => return Some(token),
                // The next try waits for the backoff inside `refresh`; the floor only matters
                // for a configured backoff of zero.
                Ok(Err(_)) => {
                    let floor = tokio::time::Instant::now() + Duration::from_millis(50);
                    tokio::time::sleep_until(floor.min(deadline)).await;
                }
                Err(_) => return None,
            }
        }
    }
}

/// The token that follows generation `refused`: joins (or starts) the one refresh for it, or
/// takes the newer token already held; `None` if none came within `wait_for_token`.
async fn join_refresh(
    source: &TokenSource,
    refused: u64,
    cfg: &sidecar_config::Replay,
) -> Option<Arc<Token>> {
    let refresh = source.refresh(Trigger::Unauthorized, Some(refused));
    tokio::time::timeout(cfg.wait_for_token, refresh)
        .await
        .ok()
        .and_then(|r| r.ok())
}

/// The header that carries the token on this upstream, if any.
pub(crate) fn token_header(
    up: &crate::app::UpstreamRt,
    token: &Token,
) -> Result<Option<(HeaderName, http::HeaderValue)>> {
    let Some(name) = &up.config.inject.header else {
        return Ok(None);
    };
    let scheme = &up.config.inject.scheme;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some((name.clone(), token.bearer_header().clone())));
    }
    let value = if scheme.is_empty() {
        token.expose().to_string()
    } else {
        format!("{scheme} {}", token.expose())
    };
    let mut value = http::HeaderValue::from_str(&value)
        .map_err(|_| Error::explain(ErrorType::InternalError, "token is not a header value"))?;
    value.set_sensitive(true);
    Ok(Some((name.clone(), value)))
}

/// The path and query to send upstream when they differ from the client's.
pub(crate) fn upstream_target(ctx: &Ctx, up: &crate::app::UpstreamRt, uri: &Uri) -> Option<String> {
    let query_param = ctx.token.as_ref().and(up.config.inject.query.as_deref());
    if ctx.path.is_none() && query_param.is_none() {
        return None;
    }
    let path = ctx.path.as_deref().unwrap_or(uri.path());
    let query = match (query_param, &ctx.token) {
        (Some(param), Some(token)) => Some(query_with_token(uri.query(), param, token.expose())),
        _ => uri.query().map(str::to_string),
    };
    Some(match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    })
}

/// 503 `token_unavailable` for a request whose rejected token could not be replaced, with the
/// provider's last error and when it will be asked again.
pub(crate) fn token_unavailable(up: &crate::app::UpstreamRt, waited: Duration) -> LocalAnswer {
    match &up.tokens {
        Some(source) => LocalAnswer::token_unavailable(
            source.unavailable(waited).to_string(),
            source.retry_in(),
        ),
        None => LocalAnswer::token_unavailable("no token".into(), Duration::from_secs(1)),
    }
}

pub(crate) fn skipped(up: &crate::app::UpstreamRt, reason: SkipReason) {
    metrics::counter!("sidecar_replay_skipped_total", "upstream" => up.config.name.clone(), "reason" => reason.as_str()).increment(1);
}

pub(crate) fn replayed(up: &crate::app::UpstreamRt, reason: &'static str, result: &'static str) {
    metrics::counter!("sidecar_replays_total", "upstream" => up.config.name.clone(), "reason" => reason, "result" => result).increment(1);
}

/// The generations the generation rule compares: the one this request carried and the
/// provider's newest; `None` when no token was injected.
pub(crate) fn generations(ctx: &Ctx, up: &crate::app::UpstreamRt) -> Option<Generations> {
    let sent = ctx.token.as_ref()?.generation;
    let current = up
        .tokens
        .as_ref()
        .and_then(|s| s.current())
        .map_or(0, |t| t.generation);
    Some(Generations { sent, current })
}

/// Pingora can resend the request body from its own retry buffer: all of it was read and it
/// fit (or there was none).
fn body_whole(session: &mut Session) -> bool {
    let downstream = session.as_mut();
    downstream.is_body_done()
        && !downstream.retry_buffer_truncated()
        && (downstream.is_body_empty() || downstream.get_retry_buffer().is_some())
}
