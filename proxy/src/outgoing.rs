//! Every request the sidecar sends upstream is shaped here, for Pingora's path
//! ([`to_pingora`]) and for the sidecar's own replay ([`to_replay`]) alike: the upstream's own
//! `Host`, no sidecar header (`X-Sidecar-Expected-Duration`), the route's path, the token in its
//! header or query parameter. A token that cannot be put in its header is never replaced by
//! nothing: the request is refused with 503 `token_unavailable` ([`Refusal`]).
//!
//! Hop-by-hop headers: on Pingora's path Pingora owns the upstream connection and needs them
//! (a WebSocket upgrade goes through); the own replay drops them (its client owns the
//! connection, and a replay never upgrades).

use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use pingora::http::RequestHeader;
use sidecar_config::Inject;
use sidecar_filters::{query_with_token, EXPECTED_DURATION};
use sidecar_token::Token;

use crate::app::UpstreamRt;
use crate::ctx::Ctx;
use crate::errors::LocalAnswer;

/// Answer header with the number of replays, when `replay.debug_header` is on.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("x-sidecar-replayed");

/// Why a request cannot go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The token is not a valid header value with the configured scheme.
    Token,
    /// The request could not be built (a rewritten path that is not a URI).
    Internal,
}

impl Refusal {
    /// The answer the client gets instead.
    pub(crate) fn answer(self, up: &UpstreamRt) -> LocalAnswer {
        match self {
            Refusal::Token => LocalAnswer::token_unavailable(
                format!(
                    "the token for upstream {} cannot be sent as a header value",
                    up.config.name
                ),
                std::time::Duration::from_secs(1),
            ),
            Refusal::Internal => LocalAnswer::internal(),
        }
    }
}

/// Header edits on either kind of request.
trait Headers {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Refusal>;
    fn unset(&mut self, name: &HeaderName);
}

impl Headers for RequestHeader {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Refusal> {
        self.insert_header(name, value)
            .map_err(|_| Refusal::Internal)
    }
    fn unset(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
}

impl Headers for HeaderMap {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Refusal> {
        self.insert(name, value);
        Ok(())
    }
    fn unset(&mut self, name: &HeaderName) {
        self.remove(name);
    }
}

/// The edits both paths make: `Host`, the sidecar's header gone, the token in its header.
fn edit(
    h: &mut impl Headers,
    host: &HeaderValue,
    inject: &Inject,
    token: Option<&Token>,
    strip_expected: bool,
) -> Result<(), Refusal> {
    h.set(HOST, host.clone())?;
    if strip_expected {
        h.unset(&EXPECTED_DURATION);
    }
    if let Some(token) = token {
        let header = token_header(inject, token)?;
        // Setting replaces: only a token carried elsewhere needs an explicit removal.
        if header
            .as_ref()
            .is_none_or(|(name, _)| name != AUTHORIZATION)
        {
            h.unset(&AUTHORIZATION);
        }
        if let Some((name, value)) = header {
            h.set(name, value)?;
        }
    }
    Ok(())
}

/// Shapes Pingora's copy of the client's request (`client`) for this attempt.
pub(crate) fn to_pingora(
    upstream: &mut RequestHeader,
    client: &RequestHeader,
    ctx: &Ctx,
) -> Result<(), Refusal> {
    let Some(up) = ctx.up() else {
        return Err(Refusal::Internal);
    };
    let token = ctx.token.as_deref();
    edit(
        upstream,
        &up.host_header,
        &up.config.inject,
        token,
        ctx.expected_header,
    )?;
    if let Some(pq) = target(ctx.path.as_deref(), &up.config.inject, token, &client.uri) {
        let uri: Uri = pq.parse().map_err(|_| Refusal::Internal)?;
        upstream.set_uri(uri);
    }
    Ok(())
}

/// The URL and headers of the sidecar's own replay of `client`.
pub(crate) fn to_replay(client: &RequestHeader, ctx: &Ctx) -> Result<(String, HeaderMap), Refusal> {
    let Some(up) = ctx.up() else {
        return Err(Refusal::Internal);
    };
    let token = ctx.token.as_deref();
    let target =
        target(ctx.path.as_deref(), &up.config.inject, token, &client.uri).unwrap_or_else(|| {
            client
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string()
        });
    let headers = replay_headers(&client.headers, &up.host_header, &up.config.inject, token)?;
    Ok((format!("{}{target}", up.replay_base), headers))
}

/// The client's headers for a replay: no hop-by-hop header, no `Host` or `Content-Length` of
/// the client's (the replay client sets its own), then [`edit`].
fn replay_headers(
    client: &HeaderMap,
    host: &HeaderValue,
    inject: &Inject,
    token: Option<&Token>,
) -> Result<HeaderMap, Refusal> {
    let mut headers = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        if hop_by_hop(name) || name == HOST || name == CONTENT_LENGTH || name == EXPECTED_DURATION {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    edit(&mut headers, host, inject, token, false)?;
    Ok(headers)
}

/// `X-Sidecar-Replayed: N` for the answer to a replayed request, when `replay.debug_header`.
pub(crate) fn replayed_header(ctx: &Ctx) -> Option<HeaderValue> {
    let on = ctx
        .route
        .as_ref()
        .is_some_and(|r| r.live().config.replay.debug_header);
    (on && ctx.replays > 0).then(|| HeaderValue::from(ctx.replays))
}

/// Headers that belong to one connection.
pub(crate) fn hop_by_hop(name: &HeaderName) -> bool {
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

/// The header that carries the token on this upstream, if any; [`Refusal::Token`] when the
/// token cannot be a header value.
fn token_header(
    inject: &Inject,
    token: &Token,
) -> Result<Option<(HeaderName, HeaderValue)>, Refusal> {
    let Some(name) = &inject.header else {
        return Ok(None);
    };
    let scheme = &inject.scheme;
    if scheme.eq_ignore_ascii_case("bearer") {
        if !token.is_header_safe() {
            return Err(Refusal::Token);
        }
        return Ok(Some((name.clone(), token.bearer_header().clone())));
    }
    let value = if scheme.is_empty() {
        token.expose().to_string()
    } else {
        format!("{scheme} {}", token.expose())
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| Refusal::Token)?;
    value.set_sensitive(true);
    Ok(Some((name.clone(), value)))
}

/// The path and query to send upstream when they differ from the client's: the route's path,
/// the token as a query parameter.
fn target(path: Option<&str>, inject: &Inject, token: Option<&Token>, uri: &Uri) -> Option<String> {
    let query_param = token.and(inject.query.as_deref());
    if path.is_none() && query_param.is_none() {
        return None;
    }
    let path = path.unwrap_or(uri.path());
    let query = match (query_param, token) {
        (Some(param), Some(token)) => Some(query_with_token(uri.query(), param, token.expose())),
        _ => uri.query().map(str::to_string),
    };
    Some(match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn inject(header: Option<&'static str>, scheme: &str, query: Option<&str>) -> Inject {
        Inject {
            header: header.map(HeaderName::from_static),
            scheme: scheme.to_string(),
            query: query.map(str::to_string),
        }
    }

    fn token(value: &str) -> Token {
        Token::new(value.to_string(), 1, Duration::from_secs(60))
    }

    #[test]
    fn a_token_that_is_no_header_value_is_refused_not_dropped() {
        let bad = token("abc\ndef");
        for scheme in ["Bearer", "", "Token"] {
            let inj = inject(Some("authorization"), scheme, None);
            assert_eq!(token_header(&inj, &bad), Err(Refusal::Token), "{scheme:?}");
            let client = HeaderMap::new();
            let host = HeaderValue::from_static("api.example");
            assert_eq!(
                replay_headers(&client, &host, &inj, Some(&bad)).err(),
                Some(Refusal::Token),
                "{scheme:?}"
            );
        }
        // In the query it is encoded: it goes.
        let inj = inject(None, "Bearer", Some("access_token"));
        let uri: Uri = "/hub?x=1".parse().unwrap();
        assert_eq!(
            target(None, &inj, Some(&bad), &uri).as_deref(),
            Some("/hub?access_token=abc%0Adef&x=1")
        );
    }

    #[test]
    fn token_header_forms() {
        let t = token("tok");
        let bearer = token_header(&inject(Some("authorization"), "bearer", None), &t)
            .unwrap()
            .unwrap();
        assert_eq!(bearer.1, "Bearer tok");
        assert!(bearer.1.is_sensitive());
        let custom = token_header(&inject(Some("x-api-key"), "", None), &t)
            .unwrap()
            .unwrap();
        assert_eq!(
            (custom.0.as_str(), custom.1.to_str().unwrap()),
            ("x-api-key", "tok")
        );
        assert!(custom.1.is_sensitive());
        let scheme = token_header(&inject(Some("authorization"), "Token", None), &t)
            .unwrap()
            .unwrap();
        assert_eq!(scheme.1, "Token tok");
        assert_eq!(token_header(&inject(None, "Bearer", None), &t), Ok(None));
    }

    #[test]
    fn a_replay_carries_the_client_headers_minus_the_connection_and_sidecar_ones() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("host", "sidecar.local"),
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("x-sidecar-expected-duration", "1h"),
            ("authorization", "Bearer client-own"),
            ("accept", "application/json"),
        ] {
            client.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let host = HeaderValue::from_static("api.example");
        let t = token("tok");
        let h = replay_headers(
            &client,
            &host,
            &inject(Some("x-api-key"), "", None),
            Some(&t),
        )
        .unwrap();
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept", "host", "x-api-key"]);
        assert_eq!(h[HOST], "api.example");
        // Without a token the client's own Authorization goes through.
        let h = replay_headers(
            &client,
            &host,
            &inject(Some("authorization"), "Bearer", None),
            None,
        )
        .unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer client-own");
    }

    #[test]
    fn targets() {
        let uri: Uri = "/api/items?page=2".parse().unwrap();
        let t = token("tok");
        let header = inject(Some("authorization"), "Bearer", None);
        assert_eq!(target(None, &header, Some(&t), &uri), None);
        assert_eq!(
            target(Some("/v2/items"), &header, Some(&t), &uri).as_deref(),
            Some("/v2/items?page=2")
        );
        let query = inject(None, "Bearer", Some("access_token"));
        assert_eq!(
            target(None, &query, Some(&t), &uri).as_deref(),
            Some("/api/items?access_token=tok&page=2")
        );
        assert_eq!(target(None, &query, None, &uri), None);
    }
}
