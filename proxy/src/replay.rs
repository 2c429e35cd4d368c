//! The sidecar's own replay path, run from `fail_to_proxy` when Pingora's retry loop cannot
//! carry the request: bodies beyond its 64 KiB retry buffer, and answers whose body decides
//! whether the token expired (the header is already on its way downstream by the time a body
//! filter runs, so such a request is re-sent here and its answer inspected before any byte of
//! it reaches the client).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use sidecar_filters::{
    after_expired_token, body_matches, classify, grpc_unauthenticated, ErrorClass, ExpiryVerdict,
    Step, BODY_PEEK,
};

use crate::app::App;
use crate::ctx::Ctx;
use crate::errors::LocalAnswer;
use crate::outgoing::{self, REPLAYED};
use crate::waiting::next_token;

/// Replays the request (re-sends it and, for an answer whose body decides, inspects that body);
/// writes the final answer downstream and returns its status (0 when the client went away).
pub(crate) async fn own_replay(app: &Arc<App>, session: &mut Session, ctx: &mut Ctx) -> u16 {
    let Some(route) = ctx.route.clone() else {
        return 0;
    };
    let up = route.up();
    let cfg = &route.live().config.replay;
    // Pingora closes the client connection after fail_to_proxy; say so, so that no client
    // sends its next request on it.
    session.set_keepalive(None);
    // The upstream may have answered before the client finished sending: read the rest.
    while ctx.replay.is_ok() {
        match session.read_request_body().await {
            Ok(Some(chunk)) => ctx.keep_body(&chunk),
            Ok(None) => break,
            Err(_) => return 0,
        }
    }
    if let Err(reason) = ctx.replay {
        up.count_skipped(reason);
        return write_rejected(session, ctx).await;
    }
    let body = ctx.body.take();
    loop {
        ctx.attempts += 1;
        let mut resp = match send(session, &mut *ctx, body.clone()).await {
            Ok(r) => r,
            Err(answer) => return write_local(session, ctx, answer).await,
        };
        let status = resp.status().as_u16();
        let www = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .map(|v| v.as_bytes().to_vec());
        let grpc = resp.headers().get("grpc-status").map(|v| v.as_bytes());
        let verdict = if grpc_unauthenticated(grpc) {
            ExpiryVerdict::Expired
        } else {
            classify(status, www.as_deref(), &up.config.expiry)
        };
        let mut peek = BytesMut::new();
        let mut ended = false;
        if verdict == ExpiryVerdict::CheckBody {
            while peek.len() < BODY_PEEK {
                match resp.chunk().await {
                    Ok(Some(c)) => peek.extend_from_slice(&c),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let expired = match verdict {
            ExpiryVerdict::Expired => true,
            ExpiryVerdict::CheckBody => body_matches(&peek, &up.config.expiry.body_patterns),
            ExpiryVerdict::NotExpired => false,
        };
        if expired {
            match after_expired_token(&ctx.attempt(false), cfg.max_attempts) {
                Step::Replay { refresh } | Step::OwnReplay { refresh } => {
                    match next_token(app, ctx, refresh).await {
                        Ok(()) => continue,
                        Err(answer) => return write_local(session, ctx, answer).await,
                    }
                }
                Step::Skip(reason) => up.count_skipped(reason),
                Step::Pass | Step::Retry { .. } | Step::CheckBody => {}
            }
        }
        // The answer the client gets decides the error class: an own replay that ended 200 is
        // no auth error.
        ctx.class = ErrorClass::of_status(status);
        return write_answer(session, ctx, resp, peek.freeze(), ended).await;
    }
}

/// Sends the request as [`outgoing::to_replay`] shapes it; a request that cannot be shaped or
/// sent gets the sidecar's own answer instead.
async fn send(
    session: &Session,
    ctx: &mut Ctx,
    body: Bytes,
) -> Result<reqwest::Response, LocalAnswer> {
    let Some(up) = ctx.up() else {
        return Err(LocalAnswer::internal());
    };
    let req = session.req_header();
    let (url, headers) = outgoing::to_replay(req, ctx).map_err(|r| r.answer(up))?;
    // Includes a connect, if the replay client has no idle connection to the upstream.
    let sent = std::time::Instant::now();
    let answer = up
        .replay_client()
        .request(req.method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let failed = |e: reqwest::Error| {
        // The client gets only a 502/504: the log says which host and why (for TLS, rustls's
        // reason, such as UnknownIssuer). Never the URL: its query may carry the token.
        let e = e.without_url();
        tracing::warn!(
            upstream = %up.config.name,
            host = %format_args!("{}:{}", up.config.host, up.config.port),
            reason = %sidecar_token::tls::root_cause(&e),
            "the sidecar's own replay could not reach the upstream"
        );
        if e.is_timeout() {
            LocalAnswer::timeout(&up.config.name)
        } else {
            LocalAnswer::unreachable(&up.config.name)
        }
    };
    let answer = answer.map_err(failed)?;
    let took = sent.elapsed();
    up.metrics.upstream_duration.record(took);
    ctx.answered(answer.status().as_u16(), took);
    Ok(answer)
}

async fn write_local(session: &mut Session, ctx: &mut Ctx, answer: LocalAnswer) -> u16 {
    ctx.local = Some(answer.code);
    answer.write(session).await;
    answer.status
}

async fn write_answer(
    session: &mut Session,
    ctx: &Ctx,
    mut resp: reqwest::Response,
    peek: Bytes,
    ended: bool,
) -> u16 {
    let status = resp.status().as_u16();
    let Ok(mut header) = ResponseHeader::build(status, Some(resp.headers().len() + 1)) else {
        return 0;
    };
    for (name, value) in resp.headers() {
        if !outgoing::hop_by_hop(name) {
            let _ = header.append_header(name.clone(), value.clone());
        }
    }
    if let Some(v) = outgoing::replayed_header(ctx) {
        let _ = header.insert_header(REPLAYED, v);
    }
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        return 0;
    }
    if !peek.is_empty()
        && session
            .write_response_body(Some(peek), false)
            .await
            .is_err()
    {
        return status;
    }
    if !ended {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if session
                        .write_response_body(Some(chunk), false)
                        .await
                        .is_err()
                    {
                        return status;
                    }
                }
                Ok(None) => break,
                // The upstream broke off mid-answer: end here; the connection closes.
                Err(_) => return status,
            }
        }
    }
    let _ = session.write_response_body(None, true).await;
    status
}

/// No replay was possible after the expired-token answer was held back: give the client its
/// status and headers (the body was not kept).
async fn write_rejected(session: &mut Session, ctx: &mut Ctx) -> u16 {
    let Some(mut header) = ctx.rejected.take() else {
        return 0;
    };
    let status = header.status.as_u16();
    let _ = header.remove_header(&http::header::TRANSFER_ENCODING);
    let _ = header.insert_header(http::header::CONTENT_LENGTH, "0");
    if session.write_response_header(header, false).await.is_ok() {
        let _ = session.write_response_body(None, true).await;
    }
    status
}
