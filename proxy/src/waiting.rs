//! Waiting for a token: the first one a request needs, the replacement of one an upstream
//! refused, and the next one a replay carries. Every wait is bounded by `replay.wait_for_token`,
//! and those that may start an identity-provider call take one of `replay.max_waiting` places.

use std::sync::Arc;
use std::time::Duration;

use sidecar_filters::{fresh_enough, required_ttl, SkipReason};
use sidecar_token::{Token, TokenSource, Trigger};
use tokio::time::Instant;

use crate::app::{App, UpstreamRt};
use crate::ctx::Ctx;
use crate::errors::LocalAnswer;

/// A usable token, waiting for one within the configured bounds; with `expected`, one that
/// lasts 1.5× that long.
pub(crate) async fn token_for(
    app: &Arc<App>,
    source: &TokenSource,
    cfg: &sidecar_config::Replay,
    expected: Option<Duration>,
) -> Result<Arc<Token>, LocalAnswer> {
    // The waits below are boxed: every request's hook future would otherwise be as large as
    // they are (see `crate::service`).
    if expected.is_none() {
        if let Some(t) = source.usable() {
            return Ok(if source.is_rejected(&t) {
                Box::pin(replacement(source, t, cfg)).await
            } else {
                t
            });
        }
    }
    let unavailable =
        |message: String| LocalAnswer::token_unavailable(message, Duration::from_secs(1));
    let Some(_slot) = app.wait_slot(cfg.max_waiting) else {
        return Err(unavailable(format!(
            "too many requests are waiting for a token of provider {}",
            source.name()
        )));
    };
    let got = match expected {
        Some(d) => Box::pin(source.ensure(d.mul_f64(1.5), cfg.wait_for_token)).await,
        None => Box::pin(source.wait_usable(cfg.wait_for_token)).await,
    };
    got.map_err(|e| unavailable(e.to_string()))
}

/// The token for a request that opens a stream: a usable token that lives at least
/// `min_ttl` (capped at half its lifetime, see [`required_ttl`]), after one coalesced refresh
/// (the single flight every refresh joins) if the current one is too close to its end. If no
/// fresher token comes within `wait_for_token` (the identity provider is down, or its tokens
/// are that short) the stream opens with the current token while it is usable: the upstream
/// may close the connection at expiry and the client reconnect, which beats refusing it.
pub(crate) async fn token_for_stream(
    app: &Arc<App>,
    source: &TokenSource,
    cfg: &sidecar_config::Replay,
    min_ttl: Duration,
) -> Result<Arc<Token>, LocalAnswer> {
    let token = token_for(app, source, cfg, None).await?;
    if fresh_enough(token.issued_at, token.expires_at, Instant::now(), min_ttl) {
        return Ok(token);
    }
    let need = required_ttl(min_ttl, token.lifetime());
    let Some(_slot) = app.wait_slot(cfg.max_waiting) else {
        return Ok(token);
    };
    match source.ensure(need, cfg.wait_for_token).await {
        Ok(fresh) => Ok(fresh),
        Err(e) => {
            // Debug, not warn: during an outage this is every stream request, and the failed
            // refresh behind it is logged (and counted) once by the token source.
            tracing::debug!(provider = source.name(), error = %e, "no token fresh enough for a stream; opening it with the current one");
            source
                .usable()
                .ok_or_else(|| LocalAnswer::token_unavailable(e.to_string(), source.retry_in()))
        }
    }
}

/// The token that replaces `refused` (refused by an upstream, its replacement in flight):
/// joins that refresh rather than send a request bound to be refused and replayed — on a
/// refresh storm a wait for the one identity-provider call instead of a wasted upstream round
/// trip per request. Takes no `max_waiting` place: it joins a call already under way (bounded
/// by `wait_for_token`) and holds no buffered body. If the refresh fails, the refused token
/// goes out as it would have.
async fn replacement(
    source: &TokenSource,
    refused: Arc<Token>,
    cfg: &sidecar_config::Replay,
) -> Arc<Token> {
    join_refresh(source, refused.generation, cfg)
        .await
        .unwrap_or(refused)
}

/// `upstream_request_filter`'s side of [`replacement`]: the token was refused after this
/// request took it. Costs one atomic load when it was not.
pub(crate) async fn swap_refused_token(ctx: &mut Ctx) {
    let Some(route) = &ctx.route else {
        return;
    };
    let (Some(source), Some(token)) = (&route.up().tokens, &ctx.token) else {
        return;
    };
    if !source.is_rejected(token) {
        return;
    }
    let token = Box::pin(replacement(
        source,
        token.clone(),
        &route.live().config.replay,
    ))
    .await;
    ctx.token = Some(token);
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

/// Makes `ctx.token` the token to replay with, as `Step::Replay` says: the newer token already
/// held, or (`refresh`) the result of the one refresh for the rejected generation, joined or
/// started. Waiting for the refresh counts against `max_waiting` and `wait_for_token`. When no
/// token came: the skipped replay is counted and the 503 `token_unavailable` to give returned.
pub(crate) async fn next_token(
    app: &Arc<App>,
    ctx: &mut Ctx,
    refresh: bool,
) -> Result<(), LocalAnswer> {
    let failed = ctx.token.as_ref().map_or(0, |t| t.generation);
    // A clone (one atomic add) on the replay path only: `ctx` changes below.
    let Some(route) = ctx.route.clone() else {
        return Err(LocalAnswer::internal());
    };
    let up = route.up();
    let cfg = &route.live().config.replay;
    let next = match &up.tokens {
        None => None,
        Some(source) if refresh => {
            ctx.forced = true;
            let t = wait_refresh(app, source, failed, cfg).await;
            let result = if t.is_some() { "ok" } else { "no_token" };
            up.count_replayed("refreshed", result);
            t
        }
        Some(source) => {
            let t = source.usable().or_else(|| source.current());
            if t.is_some() {
                up.count_replayed("newer_token", "ok");
            }
            t
        }
    };
    let Some(token) = next else {
        up.count_skipped(SkipReason::NoToken);
        return Err(token_unavailable(up, cfg.wait_for_token));
    };
    ctx.token = Some(token);
    ctx.replays += 1;
    Ok(())
}

/// The replacement of a rejected token, trying again after failed refreshes (each try waits
/// out the provider's backoff) until `wait_for_token` runs out.
async fn wait_refresh(
    app: &Arc<App>,
    source: &TokenSource,
    failed_generation: u64,
    cfg: &sidecar_config::Replay,
) -> Option<Arc<Token>> {
    let _slot = app.wait_slot(cfg.max_waiting)?;
    let deadline = tokio::time::Instant::now() + cfg.wait_for_token;
    loop {
        let refresh = source.refresh(Trigger::Unauthorized, Some(failed_generation));
        match tokio::time::timeout_at(deadline, refresh).await {
            Ok(Ok(token)) => return Some(token),
            // The next try waits for the backoff inside `refresh`; the floor only matters for a
            // configured backoff of zero.
            Ok(Err(_)) => {
                let floor = tokio::time::Instant::now() + Duration::from_millis(50);
                tokio::time::sleep_until(floor.min(deadline)).await;
            }
            Err(_) => return None,
        }
    }
}

/// 503 `token_unavailable` for a request whose rejected token could not be replaced, with the
/// provider's last error and when it will be asked again.
fn token_unavailable(up: &UpstreamRt, waited: Duration) -> LocalAnswer {
    match &up.tokens {
        Some(source) => LocalAnswer::token_unavailable(
            source.unavailable(waited).to_string(),
            source.retry_in(),
        ),
        None => LocalAnswer::token_unavailable("no token".into(), Duration::from_secs(1)),
    }
}
