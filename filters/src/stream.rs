//! Streams: which requests open a long-lived connection and which answers start one. A stream
//! is bounded by its silence (`timeouts.stream_idle`), not by the read timeout of ordinary
//! answers, counts against `max_streams`, and its token must outlive `upgrade.min_ttl`.

use http::header::{ACCEPT, CONNECTION, UPGRADE};
#[cfg(test)]
use http::HeaderMap;
use http::{HeaderName, HeaderValue};

/// The kind of a long-lived connection (the `kind` label of the stream metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// An HTTP/1.1 `Upgrade: websocket` answered 101.
    WebSocket,
    /// A `text/event-stream` answer (Server-Sent Events).
    Sse,
}

impl StreamKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::WebSocket => "websocket",
            StreamKind::Sse => "sse",
        }
    }
}

/// What a request's headers say about a stream, gathered header by header (in the one walk of
/// [`crate::ClientHeaders::read`]): a WebSocket upgrade (`Upgrade: websocket` with
/// `Connection: upgrade`), or an event stream (`Accept` naming `text/event-stream`). Such a
/// request is held to `max_streams` and `upgrade.min_ttl` before it is sent, and its upstream
/// connection is bounded by `stream_idle` instead of `read`.
#[derive(Debug, Default)]
pub(crate) struct Ask {
    websocket: bool,
    upgrade: bool,
    sse: bool,
}

impl Ask {
    /// Notes one header (any header; the ones that say nothing are passed over).
    pub(crate) fn see(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == UPGRADE {
            self.websocket |= has_token(value.as_bytes(), b"websocket");
        } else if name == CONNECTION {
            self.upgrade |= has_token(value.as_bytes(), b"upgrade");
        } else if name == ACCEPT {
            self.sse |= has_media_type(value.as_bytes(), b"text/event-stream");
        }
    }

    /// The stream asked for, once every header was seen.
    pub(crate) fn kind(&self) -> Option<StreamKind> {
        if self.websocket && self.upgrade {
            return Some(StreamKind::WebSocket);
        }
        self.sse.then_some(StreamKind::Sse)
    }
}

/// The same question asked with lookups by name: the meaning [`Ask`] keeps.
#[cfg(test)]
pub(crate) fn requested_by_lookups(headers: &HeaderMap) -> Option<StreamKind> {
    let upgrade = headers
        .get_all(UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"websocket"));
    let connection = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"upgrade"));
    if upgrade && connection {
        return Some(StreamKind::WebSocket);
    }
    let sse = headers
        .get_all(ACCEPT)
        .iter()
        .any(|v| has_media_type(v.as_bytes(), b"text/event-stream"));
    sse.then_some(StreamKind::Sse)
}

/// Whether an answer starts a stream: 101 Switching Protocols, or a 2xx `text/event-stream`
/// (`content_type`: the answer's first `Content-Type`).
pub fn started(status: u16, content_type: Option<&HeaderValue>) -> Option<StreamKind> {
    if status == 101 {
        return Some(StreamKind::WebSocket);
    }
    let sse = (200..300).contains(&status)
        && content_type.is_some_and(|v| has_media_type(v.as_bytes(), b"text/event-stream"));
    sse.then_some(StreamKind::Sse)
}

/// A comma-separated header list holds `token` (case-insensitive, surrounding spaces ignored).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// A comma-separated list of media types (parameters after `;` ignored) holds `media`.
fn has_media_type(value: &[u8], media: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|item| {
        let ty = item.split(|b| *b == b';').next().unwrap_or_default();
        ty.trim_ascii().eq_ignore_ascii_case(media)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn requests_that_ask_for_a_stream() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<StreamKind>);
        let cases: &[Case] = &[
            (&[], None),
            (&[("accept", "application/json")], None),
            (&[("accept", "text/event-stream")], Some(StreamKind::Sse)),
            (
                &[("accept", "application/json, Text/Event-Stream;q=0.9")],
                Some(StreamKind::Sse),
            ),
            (&[("accept", "text/event-streams")], None),
            (
                &[("upgrade", "websocket"), ("connection", "Upgrade")],
                Some(StreamKind::WebSocket),
            ),
            (
                &[
                    ("upgrade", "WebSocket"),
                    ("connection", "keep-alive, upgrade"),
                ],
                Some(StreamKind::WebSocket),
            ),
            // Without Connection: upgrade the Upgrade header means nothing (RFC 9110 §7.8).
            (&[("upgrade", "websocket")], None),
            (&[("upgrade", "h2c"), ("connection", "upgrade")], None),
            (
                &[
                    ("upgrade", "websocket"),
                    ("connection", "upgrade"),
                    ("accept", "text/event-stream"),
                ],
                Some(StreamKind::WebSocket),
            ),
        ];
        for (pairs, want) in cases {
            let h = headers(pairs);
            let mut ask = Ask::default();
            for (name, value) in &h {
                ask.see(name, value);
            }
            assert_eq!(ask.kind(), *want, "{pairs:?}");
            assert_eq!(requested_by_lookups(&h), *want, "{pairs:?}");
        }
    }

    #[test]
    fn answers_that_start_a_stream() {
        let sse = HeaderValue::from_static("text/event-stream; charset=utf-8");
        let json = HeaderValue::from_static("application/json");
        let cases = [
            (101, Some(&json), Some(StreamKind::WebSocket)),
            (200, Some(&sse), Some(StreamKind::Sse)),
            (200, Some(&json), None),
            (200, None, None),
            // An error page in the stream's media type is not a stream.
            (500, Some(&sse), None),
            (304, Some(&sse), None),
        ];
        for (status, h, want) in cases {
            assert_eq!(started(status, h), want, "{status} {h:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Header values are outside input: any bytes classify without a panic, and a value
        /// without the media type never makes a stream.
        #[test]
        fn any_header_bytes_classify(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(value) = HeaderValue::from_bytes(&v) {
                let mut h = HeaderMap::new();
                h.insert(ACCEPT, value.clone());
                h.insert(UPGRADE, value.clone());
                h.insert(CONNECTION, value.clone());
                let has = |needle: &[u8]| v.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle));
                let mut ask = Ask::default();
                for (name, value) in &h {
                    ask.see(name, value);
                }
                if ask.kind().is_some() {
                    prop_assert!(has(b"text/event-stream") || has(b"websocket"));
                }
                if started(200, Some(&value)).is_some() {
                    prop_assert!(has(b"text/event-stream"));
                }
            }
        }
    }
}
