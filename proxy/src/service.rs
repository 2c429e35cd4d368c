//! The Pingora `ProxyHttp` adapter. Each hook asks `sidecar-filters` (or the token waiting of
//! [`crate::waiting`]) for a decision and carries it out; the outgoing request is shaped by
//! [`crate::outgoing`], the per-request state lives in [`crate::ctx`], and what Pingora's retry
//! loop cannot carry goes to [`crate::replay`].
//!
//! Pingora boxes each hook's future on every request, and a future is as large as its largest
//! wait: the waits only some requests take (a local answer written, a rate limit, a token
//! refresh, Redis) are boxed where they happen, so that the common path's futures stay small.
//! A box over 1 KiB takes the allocator's slow path and is copied on the way (bench/PROFILE.md
//! §8.6).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::HOST;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::{ErrorSource, ErrorType};
use sidecar_filters::{
    absolute_form_authority, after_connect_failure, after_response, client_authorization,
    replayable, retry_after_of, started_stream, Admission, Answer, AnswerHeaders, AuthzDecision,
    BreakerVerdict, ClientHeaders, ConnectFailure, ErrorClass, Policy, RateRequest, RequestView,
    Route, Step, EXPECTED_DURATION,
};
use sidecar_token::SharedAdmission;

use crate::app::App;
use crate::ctx::{Ctx, ReplayBody, Routed};
use crate::errors::LocalAnswer;
use crate::outgoing::{self, REPLAYED};
use crate::waiting::{next_token, swap_refused_token, token_for, token_for_stream};

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

// A response or request hook can only stop Pingora by failing; these errors carry the step
// decided there to `error_while_proxy` (retry or not) and `fail_to_proxy` (what to write).

/// Pingora retries this error through its own loop (body in its retry buffer).
const RETRY: ErrorType = ErrorType::Custom("sidecar_replay");
/// The sidecar replays itself from `fail_to_proxy` (a body too large for Pingora's buffer).
const OWN_REPLAY: ErrorType = ErrorType::Custom("sidecar_own_replay");
/// The answer's body decides whether the token expired: the sidecar re-sends and looks.
const CHECK_BODY: ErrorType = ErrorType::Custom("sidecar_check_body");
/// `fail_to_proxy` writes `ctx.pending_answer`: a rejected replayable request got no new token
/// within `wait_for_token` (503, not the 401, which would tell the client its own credentials
/// are wrong), or the token cannot be sent.
const LOCAL_ANSWER: ErrorType = ErrorType::Custom("sidecar_local_answer");
/// The upstream's host name has not resolved yet (or never did): 502 `upstream_unreachable`.
const UNRESOLVED: ErrorType = ErrorType::Custom("sidecar_unresolved");

fn retry_error(why: &'static str) -> Box<Error> {
    let mut e = Error::explain(RETRY, why);
    e.set_retry(true);
    e
}

impl Sidecar {
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        answer: LocalAnswer,
    ) -> Result<bool> {
        ctx.local = Some(answer.code);
        Box::pin(answer.write(session)).await;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Sidecar {
    /// Boxed: Pingora keeps the context inside its request future, which it moves several
    /// times per request; a pointer is copied instead of the whole context.
    type CTX = Box<Ctx>;

    /// Pingora's error lines summarise the request with its raw target; the query may carry a
    /// token (browser SignalR clients), so only method, path and host are shown.
    fn request_summary(&self, session: &Session, _ctx: &Box<Ctx>) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    /// No downstream modules: Pingora's default is a response-compression module set to level
    /// 0, which compresses nothing and still costs every request ~570 instructions (its
    /// context built, four filter calls, dropped; bench/PROFILE.md §8.6). The sidecar passes
    /// answers on as the upstream encoded them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx::new(self.app.inflight.enter()))
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Box<Ctx>) -> Result<()> {
        crate::connection::head_received(session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        // Borrowed, not counted: the request's one reference to its config is its route's.
        let live = self.app.live.load();
        if crate::access_log::enabled(&live.config.log) {
            ctx.request_id = Some(request_id(session));
        }
        if self.app.is_closing() {
            // Shutting down: this request (already read on a kept-alive connection) is served,
            // and its connection closed after it.
            session.set_keepalive(None);
        }
        let req = session.req_header();
        let h2 = session.as_downstream().is_http2();
        let cfg = &live.config.replay;
        let seen = ClientHeaders::read(&req.headers, &cfg.idempotency_header);
        let host = seen
            .host
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
        // The route, the rate limits and the upstream all see the normalised path.
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
        // Set first: the sidecar's own answers are logged and counted under this route too.
        ctx.route = Some(Routed::new(Arc::clone(&live), index));
        ctx.path = path;
        let up = &live.upstreams[index];
        // The provider whose token goes on this request, if any.
        let inject = match &up.tokens {
            None => None,
            Some(source) => {
                match client_authorization(up.config.client_authorization, seen.authorization) {
                    AuthzDecision::Reject => {
                        let answer = LocalAnswer::client_authorization();
                        return self.answer(session, ctx, answer).await;
                    }
                    AuthzDecision::KeepClient => None,
                    AuthzDecision::Inject => Some(source),
                }
            }
        };
        match up.breaker.check(Instant::now) {
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
            match Box::pin(live.limiter.admit(&request)).await {
                Admission::Reject { rule, retry_after } => {
                    let answer = LocalAnswer::rate_limited(&rule, retry_after);
                    return self.answer(session, ctx, answer).await;
                }
                // Rules held across replicas take their cell from the shared budget too; with
                // Redis down only this replica's own limit applied.
                Admission::Go { rules, .. } => {
                    for rule in rules.iter().filter(|r| live.shared_limits.covers(r)) {
                        if let SharedAdmission::Reject { retry_after } =
                            Box::pin(live.shared_limits.admit(rule)).await
                        {
                            let answer = LocalAnswer::rate_limited(rule, retry_after);
                            return self.answer(session, ctx, answer).await;
                        }
                    }
                }
            }
        }
        // A stream holds its connections for long: bounded in number, counted while it lives.
        ctx.stream_request = seen.stream;
        if ctx.stream_request.is_some() {
            match self.app.streams.slot(live.config.max_streams) {
                Some(slot) => ctx.stream_slot = Some(slot),
                None => {
                    metrics::counter!("sidecar_streams_refused_total").increment(1);
                    let answer = LocalAnswer::too_many_streams(live.config.max_streams);
                    return self.answer(session, ctx, answer).await;
                }
            }
        }
        let declared = seen
            .content_length
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The key only matters for methods that are not idempotent by themselves.
        let has_key = !cfg.idempotent_methods.contains(&req.method) && seen.idempotency_key;
        ctx.replay = replayable(&req.method, has_key, declared, up.config.replay, cfg);
        ctx.body = ReplayBody::new(cfg.max_body);
        // Never forwarded, whatever the route.
        ctx.expected_header = seen.expected_duration.is_some();
        if let Some(source) = inject {
            let expected = match seen.expected_duration {
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
            let got = match (expected, ctx.stream_request) {
                (None, Some(_)) => {
                    Box::pin(token_for_stream(
                        &self.app,
                        source,
                        cfg,
                        up.config.upgrade_min_ttl,
                    ))
                    .await
                }
                _ => token_for(&self.app, source, cfg, expected).await,
            };
            match got {
                Ok(t) => ctx.token = Some(t),
                Err(answer) => return self.answer(session, ctx, answer).await,
            }
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        // Backoff or Retry-After of the previous attempt, if it failed transiently.
        if let Some(delay) = ctx.next_attempt_after.take() {
            tokio::time::sleep(delay).await;
        }
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let up = route.up();
        // An upstream that answered 429/503 with Retry-After is left alone until then.
        if let Some(until) = self.app.holds.held_until(&up.config.name) {
            tokio::time::sleep_until(until).await;
        }
        // ... or that asked another replica sharing the account (bounded like our own holds).
        let shared = route.live().shared.as_ref();
        if let Some(until) = shared.and_then(|s| s.held_until(&up.config.name)) {
            let cap =
                tokio::time::Instant::now() + self.app.live.load().config.retry.max_retry_after;
            tokio::time::sleep_until(until.min(cap)).await;
        }
        // One set of addresses for all attempts of this request.
        let (addrs, start) = ctx.addrs.get_or_insert_with(|| up.addresses.pick());
        let Some(mut peer) = up.peer_at(addrs, *start, ctx.connect_failures) else {
            ctx.class = Some(ErrorClass::Network);
            let mut e = Error::explain(
                UNRESOLVED,
                format!(
                    "upstream {}: host {} has not resolved to any address",
                    up.config.name, up.config.host
                ),
            );
            e.set_retry(false);
            return Err(e);
        };
        if ctx.stream_request.is_some() {
            // Pingora reads the read timeout from the peer once, before the request goes out,
            // and no hook can change it after the answer's head: a request that asks for a
            // stream waits for its head, and then for each read, up to `stream_idle`.
            peer.options.read_timeout = Some(up.config.stream_idle_timeout);
        }
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        ctx.attempts += 1;
        ctx.retry_buffer_next = ctx.attempts > 1;
        swap_refused_token(ctx).await;
        match outgoing::to_pingora(upstream_request, session.req_header(), ctx) {
            Ok(()) => {
                ctx.sent_at = Some(Instant::now());
                Ok(())
            }
            Err(refusal) => {
                ctx.pending_answer = ctx.up().map(|up| refusal.answer(up));
                Error::e_explain(LOCAL_ANSWER, "the request cannot be sent")
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Box<Ctx>,
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
        if let Some(chunk) = body.as_ref() {
            ctx.keep_body(chunk);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let seen = AnswerHeaders::read(&upstream_response.headers);
        self.inspect_response(session, upstream_response, &seen, ctx)
            .await?;
        let status = upstream_response.status.as_u16();
        if let Some(kind) = started_stream(status, seen.content_type) {
            ctx.stream = ctx.up().map(|up| up.streams.start(kind));
        }
        // The answer goes to the client. (Done here rather than in `response_filter`: one hook
        // less per request.)
        if let Some(v) = outgoing::replayed_header(ctx) {
            upstream_response.insert_header(REPLAYED, v)?;
        }
        Ok(())
    }

    /// A replay or retry the sidecar decided is its normal work, not a failure: it is counted
    /// (`sidecar_replays_total`, `sidecar_upstream_errors_total`) and shown in the access log,
    /// so Pingora's WARN line goes.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Box<Ctx>,
        error: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        // A connect failure the sidecar decided to retry after its backoff is counted too.
        *error.etype() == RETRY || (error.retry() && ctx.next_attempt_after.is_some())
    }

    /// The sidecar's own replay ends in an answer of its own (often a 200): Pingora's ERROR
    /// line about the error that handed the request over would be false. An unresolved upstream
    /// name is logged once by the lookups (not per request). An upstream that
    /// cannot be reached or does not answer in time is logged here instead, at WARN, once a
    /// second per upstream and cause with the count of the failures not logged (a down
    /// upstream under load would otherwise write a line per request). A client that hangs up
    /// before its answer is nothing an operator can act on: its access line (status 0) and
    /// `sidecar_requests_total{status="0"}` record it.
    fn suppress_error_log(&self, _session: &Session, ctx: &Box<Ctx>, error: &Error) -> bool {
        if *error.etype() == OWN_REPLAY
            || *error.etype() == CHECK_BODY
            || *error.etype() == UNRESOLVED
            || client_went_away(error)
        {
            return true;
        }
        let cause = match ctx.class {
            Some(c @ (ErrorClass::Network | ErrorClass::Timeout)) => c.as_str(),
            _ => return false,
        };
        let upstream = ctx.up().map_or("", |u| u.config.name.as_str());
        if let Some(suppressed) =
            crate::log_throttle::UPSTREAM_DOWN.admit(upstream, cause, Instant::now())
        {
            tracing::warn!(
                upstream,
                cause,
                suppressed,
                error = %error,
                "upstream failed; requests answered with the sidecar's error (suppressed: the same failures not logged in the last second)"
            );
        }
        true
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        _ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        if *e.etype() == RETRY {
            return e;
        }
        if *e.etype() == OWN_REPLAY || *e.etype() == CHECK_BODY || *e.etype() == LOCAL_ANSWER {
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
        peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match e.etype() {
            ErrorType::ConnectTimedout => ConnectFailure::Timeout,
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert => {
                // Says which host and why (rustls's reason, e.g. UnknownIssuer): the client only
                // gets 502 upstream_unreachable.
                tracing::warn!(
                    upstream = ctx.up().map_or("", |u| u.config.name.as_str()),
                    host = %peer.sni,
                    address = %peer._address,
                    reason = e.context.as_ref().map_or("", |c| c.as_str()),
                    "TLS handshake with the upstream failed"
                );
                ConnectFailure::Permanent
            }
            _ => ConnectFailure::Other,
        };
        let Some(route) = &ctx.route else {
            e.set_retry(false);
            return e;
        };
        ctx.connect_failures += 1;
        let addresses = ctx.addrs.as_ref().map_or(0, |(a, _)| a.len());
        if crate::dns::try_next_address(ctx.connect_failures, addresses) {
            // Another address of the upstream is still untried: at once, no backoff. Nothing
            // was sent, so any request may go there.
            ctx.class = Some(ErrorClass::Network);
            ctx.next_attempt_after = None;
            e.set_retry(true);
            return e;
        }
        let retry = &route.live().config.retry;
        let (class, delay) = after_connect_failure(failure, ctx.transient, retry, rand::random());
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

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        if (*e.etype() == OWN_REPLAY || *e.etype() == CHECK_BODY)
            && session.response_written().is_none()
        {
            let code = crate::replay::own_replay(&self.app, session, ctx).await;
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // A borrow of `ctx.route` alone: `ctx.class` is set below.
        let upstream = ctx
            .route
            .as_ref()
            .map_or("", |r| r.up().config.name.as_str());
        let answer = match e.etype() {
            t if *t == LOCAL_ANSWER => ctx.pending_answer.take(),
            t if *t == UNRESOLVED => Some(LocalAnswer::unreachable(upstream)),
            ErrorType::HTTPStatus(code) => Some(LocalAnswer {
                status: *code,
                code: "error",
                message: "request failed".into(),
                retry_after: None,
            }),
            // A stream the upstream kept silent for `stream_idle`: its normal end, not a failure
            // of the upstream (no error class, no circuit-breaker failure). An event stream that
            // answered a request that did not ask for one ran under `read`: a timeout like any.
            ErrorType::ReadTimedout if ctx.stream.is_some() && ctx.stream_request.is_some() => {
                if let Some(stream) = &ctx.stream {
                    stream.closed_idle();
                }
                None
            }
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                ctx.class = Some(ErrorClass::Timeout);
                Some(LocalAnswer::timeout(upstream))
            }
            _ => match e.esource() {
                ErrorSource::Upstream => {
                    ctx.class = Some(ErrorClass::Network);
                    Some(LocalAnswer::unreachable(upstream))
                }
                ErrorSource::Downstream if client_went_away(e) => None,
                ErrorSource::Downstream => {
                    Some(LocalAnswer::bad_request("malformed request".into()))
                }
                ErrorSource::Internal | ErrorSource::Unset => Some(LocalAnswer::internal()),
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

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        crate::connection::request_done(session);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let route = ctx.up();
        let method = session.req_header().method.as_str();
        let m = route.map_or(&self.app.unrouted, |up| &up.metrics);
        m.requests(method, status, ctx.local.is_some()).increment(1);
        m.duration.record(elapsed);
        if let Some(up) = route {
            if ctx.attempts > 0 || ctx.class.is_some() {
                let failed = ctx.class.is_some_and(ErrorClass::is_upstream_failure);
                up.breaker.record(!failed, Instant::now);
            } else if ctx.probe {
                up.breaker.abandon_probe();
            }
            if let Some(class) = ctx.class {
                metrics::counter!("sidecar_upstream_errors_total", "upstream" => up.config.name.clone(), "class" => class.as_str()).increment(1);
            }
        }
        let log = match &ctx.route {
            Some(r) => &r.live().config.log,
            None => &self.app.live.load().config.log,
        };
        if crate::access_log::enabled(log) {
            let json = log.format == sidecar_config::LogFormat::Json;
            crate::access_log::write(session, ctx, e, status, json);
        }
    }
}

impl Sidecar {
    /// What happens to an upstream answer: [`after_response`] decides, this carries the step
    /// out. `Err` hands the request to Pingora's retry loop (`RETRY`) or to `fail_to_proxy`
    /// (`CHECK_BODY`, `OWN_REPLAY`, `LOCAL_ANSWER`): the only way out of a response hook.
    async fn inspect_response(
        &self,
        session: &mut Session,
        upstream_response: &ResponseHeader,
        seen: &AnswerHeaders<'_>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.class = ErrorClass::of_status(status);
        if let Some(sent) = ctx.sent_at.take() {
            let took = sent.elapsed();
            if let Some(up) = ctx.up() {
                up.metrics.upstream_duration.record(took);
            }
            ctx.answered(status, took);
        }
        if status < 400 && seen.grpc_status.is_none() {
            return Ok(());
        }
        let Some(route) = &ctx.route else {
            return Ok(());
        };
        let (live, up) = (route.live(), route.up());
        let retry_after = retry_after_of(
            status,
            seen.retry_after.map(|v| v.as_bytes()),
            SystemTime::now(),
        );
        if let Some(d) = retry_after {
            // Further requests to this upstream wait until then (bounded by max_retry_after),
            // whatever becomes of this one.
            self.app.holds.hold_for(&up.config.name, d);
            // ... on every replica sharing the account.
            if let Some(shared) = &live.shared {
                shared.publish_hold(&up.config.name, d);
            }
        }
        let answer = Answer {
            status,
            www_authenticate: seen.www_authenticate.map(|v| v.as_bytes()),
            retry_after,
            grpc_status: seen.grpc_status.map(|v| v.as_bytes()),
        };
        let state = ctx.attempt(body_whole(session));
        let policy = Policy {
            retry: &live.config.retry,
            expiry: &up.config.expiry,
            max_attempts: live.config.replay.max_attempts,
        };
        let step = after_response(&answer, &state, &policy, rand::random());
        match step {
            Step::Pass => Ok(()),
            Step::Skip(reason) => {
                up.count_skipped(reason);
                Ok(())
            }
            Step::Retry { delay } => {
                ctx.transient += 1;
                ctx.next_attempt_after = Some(delay);
                Err(retry_error("transient upstream answer; retrying"))
            }
            Step::CheckBody => {
                ctx.rejected = Some(Box::new(upstream_response.clone()));
                Err(Error::explain(
                    CHECK_BODY,
                    "the answer's body decides whether the token expired",
                ))
            }
            Step::Replay { refresh } | Step::OwnReplay { refresh } => {
                if let Err(answer) = Box::pin(next_token(&self.app, ctx, refresh)).await {
                    ctx.pending_answer = Some(answer);
                    return Err(Error::explain(
                        LOCAL_ANSWER,
                        "no replacement for a rejected token within wait_for_token",
                    ));
                }
                if let Step::Replay { .. } = step {
                    Err(retry_error(
                        "token expired upstream; replaying with a fresh token",
                    ))
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

/// The client closed or reset its connection before its answer was written: nobody is left
/// to answer.
fn client_went_away(e: &Error) -> bool {
    *e.esource() == ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        )
}

/// Correlates the request's access line with the upstream's logs: the client's `X-Request-Id`
/// or `traceparent` (both passed on as they are), or a new random `X-Request-Id`, set on the
/// request so that every attempt and replay carries it. Only asked for when access lines are
/// written: an id that is logged nowhere would cost every request a header for nothing.
fn request_id(session: &mut Session) -> String {
    let headers = &session.req_header().headers;
    for name in [&X_REQUEST_ID, &TRACEPARENT] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            if !v.is_empty() {
                return v.to_string();
            }
        }
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let _ = session
        .req_header_mut()
        .insert_header(X_REQUEST_ID.clone(), id.as_str());
    id
}

/// The request id header the sidecar adds when the client sent none.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// W3C trace context: a request id the client already has.
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Pingora can resend the request body from its own retry buffer: all of it was read and it
/// fit (or there was none).
fn body_whole(session: &mut Session) -> bool {
    let downstream = session.as_mut();
    downstream.is_body_done()
        && !downstream.retry_buffer_truncated()
        && (downstream.is_body_empty() || downstream.get_retry_buffer().is_some())
}
