//! The sidecar's own replay path, run from `fail_to_proxy` when Pingora's retry loop cannot
//! carry the request: bodies beyond its 64 KiB retry buffer, and answers whose body decides
//! whether the token expired (the header is already on its way downstream by the time a body
//! filter runs, so such a request is re-sent here and its answer inspected before any byte of
//! it reaches the client).

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use sidecar_filters::{
    after_expired_token, body_matches, classify, Attempt, ExpiryVerdict, SkipReason, Step,
    BODY_PEEK,
};

use crate::app::UpstreamRt;
use crate::errors::LocalAnswer;
use crate::service::{
    generations, skipped, token_header, token_unavailable, upstream_target, Ctx, Sidecar,
    EXPECTED_DURATION,
};

/// Headers that belong to one connection, never forwarded by the sidecar's own replays.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Replays (or, with `check_body`, re-sends and inspects) the request; writes the final answer
/// downstream and returns its status (0 when the client went away).
pub(crate) async fn own_replay(sidecar: &Sidecar, session: &mut Session, ctx: &mut Ctx) -> u16 {
    let (Some(live), Some(index)) = (ctx.live.clone(), ctx.upstream) else {
        return 0;
    };
    let up = &live.upstreams[index];
    let cfg = &live.config.replay;
    // Pingora closes the client connection after fail_to_proxy; say so, so that no client
    // sends its next request on it.
    session.set_keepalive(None);
    // The upstream may have answered before the client finished sending: read the rest.
    while ctx.replay.is_ok() {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (ctx.body.len() + chunk.len()) as u64 > cfg.max_body {
                    ctx.replay = Err(SkipReason::BodyTooLarge);
                    ctx.body = BytesMut::new();
                } else {
                    ctx.body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break,
            Err(_) => return 0,
        }
    }
    if let Err(reason) = ctx.replay {
        skipped(up, reason);
        return write_rejected(session, ctx).await;
    }
    let body = ctx.body.clone().freeze();
    loop {
        ctx.attempts += 1;
        let resp = match send(session, ctx, up, body.clone()).await {
            Ok(r) => r,
            Err(e) => {
                let answer = if e.is_timeout() {
                    LocalAnswer::timeout(&up.config.name)
                } else {
                    LocalAnswer::unreachable(&up.config.name)
                };
                ctx.local = Some(answer.code);
                answer.write(session).await;
                return answer.status;
            }
        };
        let status = resp.status().as_u16();
        let www = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .map(|v| v.as_bytes().to_vec());
        let verdict = classify(status, www.as_deref(), &up.config.expiry);
        let mut resp = resp;
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
            let state = Attempt {
                attempts: ctx.attempts,
                transient: ctx.transient,
                replay: ctx.replay,
                forced: ctx.forced,
                body_whole: false,
                token: generations(ctx, up),
            };
            match after_expired_token(&state, cfg.max_attempts) {
                Step::Replay { refresh } | Step::OwnReplay { refresh } => {
                    let failed = ctx.token.as_ref().map_or(0, |t| t.generation);
                    if sidecar.next_token(&live, up, ctx, refresh, failed).await {
                        continue;
                    }
                    skipped(up, SkipReason::NoToken);
                    let answer = token_unavailable(up, cfg.wait_for_token);
                    ctx.local = Some(answer.code);
                    answer.write(session).await;
                    return answer.status;
                }
                Step::Skip(reason) => skipped(up, reason),
                Step::Pass | Step::Retry { .. } | Step::CheckBody => {}
            }
        }
        return write_answer(session, ctx, resp, peek.freeze(), ended, cfg.debug_header).await;
    }
}

async fn send(
    session: &Session,
    ctx: &Ctx,
    up: &UpstreamRt,
    body: Bytes,
) -> Result<reqwest::Response, reqwest::Error> {
    let req = session.req_header();
    let target = upstream_target(ctx, up, &req.uri).unwrap_or_else(|| {
        req.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string()
    });
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for (name, value) in req.headers.iter() {
        if hop_by_hop(name)
            || name == HOST
            || name == http::header::CONTENT_LENGTH
            || name == EXPECTED_DURATION
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    headers.insert(HOST, up.host_header.clone());
    if let Some(token) = &ctx.token {
        headers.remove(AUTHORIZATION);
        if let Ok(Some((name, value))) = token_header(up, token) {
            headers.insert(name, value);
        }
    }
    up.replay_client
        .request(req.method.clone(), format!("{}{target}", up.replay_base))
        .headers(headers)
        .body(body)
        .send()
        .await
}

async fn write_answer(
    session: &mut Session,
    ctx: &Ctx,
    mut resp: reqwest::Response,
    peek: Bytes,
    ended: bool,
    debug_header: bool,
) -> u16 {
    let status = resp.status().as_u16();
    let Ok(mut header) = ResponseHeader::build(status, Some(resp.headers().len() + 1)) else {
        return 0;
    };
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            let _ = header.append_header(name.clone(), value.clone());
        }
    }
    if debug_header && ctx.replays > 0 {
        let _ = header.insert_header("x-sidecar-replayed", ctx.replays.to_string());
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
