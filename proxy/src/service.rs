//! The Pingora `ProxyHttp` adapter: each hook asks `sidecar-filters` or the token source for a
//! decision and acts on it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderName, Uri};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use sidecar_filters::{client_authorization, query_with_token, AuthzDecision, RequestView, Route};
use sidecar_token::Token;

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
    live: Option<Arc<Live>>,
    upstream: Option<usize>,
    /// Path to send upstream when the route rewrites it.
    path: Option<String>,
    /// The token injected into the current attempt; `None` passes the request through.
    token: Option<Arc<Token>>,
    attempts: u32,
    /// Error code of a local answer, for the access log.
    local: Option<&'static str>,
}

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

    /// A usable token, waiting for one within the configured bounds.
    async fn token_for(
        &self,
        live: &Live,
        upstream: usize,
        expected: Option<Duration>,
    ) -> std::result::Result<Arc<Token>, LocalAnswer> {
        let up = &live.upstreams[upstream];
        let Some(source) = &up.tokens else {
            return Err(LocalAnswer::token_unavailable(
                "no provider".into(),
                Duration::from_secs(1),
            ));
        };
        let replay = &live.config.replay;
        if expected.is_none() {
            if let Some(t) = source.usable() {
                return Ok(t);
            }
        }
        let waiting = self.app.waiting.fetch_add(1, Ordering::AcqRel);
        let result = if waiting >= replay.max_waiting {
            Err(LocalAnswer::token_unavailable(
                format!(
                    "too many requests are waiting for a token of provider {}",
                    source.name()
                ),
                Duration::from_secs(1),
            ))
        } else {
            let got = match expected {
                Some(d) => source.ensure(d.mul_f64(1.5), replay.wait_for_token).await,
                None => source.wait_usable(replay.wait_for_token).await,
            };
            got.map_err(|e| LocalAnswer::token_unavailable(e.to_string(), Duration::from_secs(1)))
        };
        self.app.waiting.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _inflight: self.app.enter(),
            started: Instant::now(),
            live: None,
            upstream: None,
            path: None,
            token: None,
            attempts: 0,
            local: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let live = self.app.live.load_full();
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
                req.uri.authority().map(|a| a.as_str())
            },
            host,
        };
        let (index, path) = match live.routes.route(&view) {
            Route::Upstream { index, path } => (index, path),
            Route::Forbidden(why) => {
                return self.answer(session, ctx, LocalAnswer::forbidden(why)).await
            }
            Route::NoRoute => {
                let answer = LocalAnswer::no_route(req.uri.path());
                return self.answer(session, ctx, answer).await;
            }
        };
        ctx.upstream = Some(index);
        ctx.path = path;
        let up = &live.upstreams[index];
        if up.tokens.is_some() {
            let has_own = session.req_header().headers.contains_key(AUTHORIZATION);
            match client_authorization(up.config.client_authorization, has_own) {
                AuthzDecision::Reject => {
                    return self
                        .answer(session, ctx, LocalAnswer::client_authorization())
                        .await
                }
                AuthzDecision::KeepClient => {}
                AuthzDecision::Inject => {
                    let expected = match session.req_header().headers.get(EXPECTED_DURATION) {
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
                    match self.token_for(&live, index, expected).await {
                        Ok(t) => ctx.token = Some(t),
                        Err(answer) => return self.answer(session, ctx, answer).await,
                    }
                }
            }
        }
        ctx.live = Some(live);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(live), Some(i)) = (&ctx.live, ctx.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        Ok(Box::new(live.upstreams[i].peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.attempts += 1;
        let (Some(live), Some(i)) = (&ctx.live, ctx.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let up = &live.upstreams[i];
        upstream_request.insert_header(HOST, up.host_header.clone())?;
        upstream_request.remove_header(&EXPECTED_DURATION);
        let query_param = ctx.token.as_ref().and(up.config.inject.query.as_deref());
        if ctx.path.is_some() || query_param.is_some() {
            let uri = &session.req_header().uri;
            let path = ctx.path.as_deref().unwrap_or(uri.path());
            let query = match (query_param, &ctx.token) {
                (Some(param), Some(token)) => {
                    Some(query_with_token(uri.query(), param, token.expose()))
                }
                _ => uri.query().map(str::to_string),
            };
            let pq = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            let uri: Uri = pq.parse().map_err(|_| {
                Error::explain(ErrorType::InvalidHTTPHeader, "cannot rewrite the path")
            })?;
            upstream_request.set_uri(uri);
        }
        if let Some(token) = &ctx.token {
            upstream_request.remove_header(&AUTHORIZATION);
            if let Some(name) = &up.config.inject.header {
                if up.config.inject.scheme.eq_ignore_ascii_case("bearer") && name == AUTHORIZATION {
                    upstream_request.insert_header(name.clone(), token.bearer_header().clone())?;
                } else {
                    let value = if up.config.inject.scheme.is_empty() {
                        token.expose().to_string()
                    } else {
                        format!("{} {}", up.config.inject.scheme, token.expose())
                    };
                    let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
                        Error::explain(ErrorType::InternalError, "token is not a header value")
                    })?;
                    value.set_sensitive(true);
                    upstream_request.insert_header(name.clone(), value)?;
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        _ctx: &mut Ctx,
        e: Box<Error>,
    ) -> Box<Error> {
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let upstream = ctx
            .live
            .as_ref()
            .zip(ctx.upstream)
            .map(|(l, i)| l.upstreams[i].config.name.clone())
            .unwrap_or_default();
        let answer = match e.etype() {
            ErrorType::HTTPStatus(code) => Some(LocalAnswer {
                status: *code,
                code: "error",
                message: "request failed".into(),
                retry_after: None,
            }),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Some(LocalAnswer::timeout(&upstream))
            }
            _ => match e.esource() {
                ErrorSource::Upstream => Some(LocalAnswer::unreachable(&upstream)),
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
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let upstream = ctx
            .live
            .as_ref()
            .zip(ctx.upstream)
            .map_or("", |(l, i)| l.upstreams[i].config.name.as_str());
        let method = session.req_header().method.as_str();
        metrics::counter!("sidecar_requests_total", "upstream" => upstream.to_string(), "method" => method_label(method), "status" => status.to_string()).increment(1);
        metrics::histogram!("sidecar_request_duration_seconds", "upstream" => upstream.to_string())
            .record(elapsed.as_secs_f64());
        let access_log = ctx.live.as_ref().is_none_or(|l| l.config.log.access_log);
        if access_log {
            tracing::info!(
                target: "access",
                method,
                path = session.req_header().uri.path(),
                upstream,
                status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                attempts = ctx.attempts,
                generation = ctx.token.as_ref().map_or(0, |t| t.generation),
                local = ctx.local.unwrap_or(""),
                error = e.map(|e| e.etype().as_str()).unwrap_or(""),
            );
        }
    }
}

/// Methods as metric labels: the standard ones, everything else `other`, so no label is
/// unbounded.
fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}
