//! The HTTP exchange with an identity provider: a client that never follows a redirect, answers
//! read up to a size cap, and transport errors described without secrets.

use std::time::Duration;

use sidecar_config::Tls;

use super::redact::{truncate, Redactor};
use super::ProviderError;

/// The HTTP client of the identity-provider calls. It never follows a redirect: every such call
/// carries credentials (a client secret, a password, an API key, a refresh token) meant for the
/// configured URL only, and a 307/308 would re-send them to wherever `Location` points. The
/// overall timeout is the time cap of every exchange, body included. Trust and client
/// certificate come from the provider's `tls` (else the system store); `HTTPS_PROXY`,
/// `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` are honoured as curl does (corporate egress).
///
/// A client that cannot be built is an error: a default client would silently drop the trust
/// and client certificate configured for this identity provider.
pub(super) fn http_client(tls: &Tls) -> Result<reqwest::Client, ProviderError> {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")));
    crate::tls::configure(builder, tls)
        .map_err(ProviderError::Setup)?
        .build()
        .map_err(|e| {
            ProviderError::Setup(format!(
                "cannot build the identity-provider HTTP client: {}",
                crate::tls::root_cause(&e)
            ))
        })
}

/// Largest identity-provider or `json_login` answer read; a token answer is a few
/// hundred bytes.
pub(crate) const MAX_ANSWER: usize = 1 << 20;

/// Reads an answer body of at most [`MAX_ANSWER`] bytes. A larger one is refused as soon as it
/// shows (its `Content-Length`, or the running total), without reading the rest: dropping the
/// response closes the connection. The client's timeout bounds the time.
async fn read_answer(mut resp: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
    let too_large = || ProviderError::Malformed("answer is larger than 1 MiB".into());
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The answer's status and body, or the refusal of a redirect: where it points is told (its
/// origin only, scrubbed) but nothing is sent there.
pub(super) async fn answer(
    resp: reqwest::Response,
    redactor: &Redactor,
) -> Result<(reqwest::StatusCode, Vec<u8>), ProviderError> {
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| resp.url().join(l).ok())
            .map(|u| format!(" to {}", u.origin().ascii_serialization()))
            .unwrap_or_default();
        return Err(ProviderError::Rejected {
            status: status.as_u16(),
            message: redactor.clean(&format!(
                "redirect{to} not followed: credentials go to the configured URL only"
            )),
        });
    }
    Ok((status, read_answer(resp).await?))
}

/// Describes a transport error with the host it concerns and its innermost cause (for TLS,
/// rustls's reason, such as `invalid peer certificate: UnknownIssuer`), without the URL's path
/// or query (which never hold secrets here, but errors should stay short and stable).
pub(super) fn network_error(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let host = e
        .url()
        .and_then(|u| {
            let host = u.host_str()?;
            Some(match u.port_or_known_default() {
                Some(port) => format!(" to {host}:{port}"),
                None => format!(" to {host}"),
            })
        })
        .unwrap_or_default();
    let detail = match std::error::Error::source(&e) {
        Some(source) => crate::tls::root_cause(source),
        None => String::new(),
    };
    if detail.is_empty() {
        ProviderError::Network(format!("{kind}{host}"))
    } else {
        ProviderError::Network(format!("{kind}{host}: {}", truncate(&detail)))
    }
}
