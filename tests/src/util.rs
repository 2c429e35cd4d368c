//! Small helpers shared by the mocks.

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::body::{Body, HttpBody};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// Locks `m`, ignoring poisoning: mock state stays usable after a panic
/// elsewhere.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lowercase hex encoding.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Decodes one `application/x-www-form-urlencoded` component
/// (`+` is a space, `%XX` an escaped byte; bad escapes are kept verbatim).
pub(crate) fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16));
                let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    // Two hex digits always fit in a byte.
                    out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a form-urlencoded string (request body or query) into pairs.
pub(crate) fn parse_form(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// Maps a numeric status to a final HTTP status; anything invalid or
/// informational becomes 500.
pub(crate) fn final_status(code: u16) -> StatusCode {
    match StatusCode::from_u16(code) {
        Ok(s) if !s.is_informational() => s,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A response with a JSON body given as text.
pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Streams `body` to its end, returning its length and SHA-256 (hex).
pub(crate) async fn digest_body(mut body: Body) -> Result<(usize, String), axum::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame?.into_data() {
            len += data.len();
            hasher.update(&data);
        }
    }
    Ok((len, hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%20c%2"), "a b c%2");
        assert_eq!(form_decode("%zz%41"), "%zzA");
        assert_eq!(
            parse_form("a=1&&b=x%3Dy&c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x=y".into()),
                ("c".into(), String::new())
            ]
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(final_status(503), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(final_status(101), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(final_status(0), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
