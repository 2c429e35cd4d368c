//! The headers the sidecar reads from a client's request and from an upstream's answer, each
//! gathered in one walk over the header map. A request or an answer carries a handful of
//! headers; one walk over them costs less than a hash lookup per header asked about, and the
//! sidecar asks about seven on every request (bench/PROFILE.md §8.6).
//!
//! Every field means what a lookup by name would give: the first value of a header for a
//! value, any value of it for a flag.

use http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::stream::{self, StreamKind};

/// Request header asking for a token that lasts the whole of a long operation. The sidecar's
/// own: never forwarded.
pub const EXPECTED_DURATION: HeaderName = HeaderName::from_static("x-sidecar-expected-duration");

/// A gRPC answer's status, which says more than its HTTP status.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What the sidecar reads from a client's request headers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientHeaders<'a> {
    /// `Host`.
    pub host: Option<&'a HeaderValue>,
    /// The client sent an `Authorization` of its own.
    pub authorization: bool,
    /// `Content-Length`.
    pub content_length: Option<&'a HeaderValue>,
    /// `X-Sidecar-Expected-Duration`.
    pub expected_duration: Option<&'a HeaderValue>,
    /// The client sent the configured idempotency key header (`replay.idempotency_header`).
    pub idempotency_key: bool,
    /// The request asks for a stream (see [`crate::stream`]).
    pub stream: Option<StreamKind>,
}

impl<'a> ClientHeaders<'a> {
    /// Reads `headers`; `idempotency_header` is the configured idempotency key's name.
    pub fn read(headers: &'a HeaderMap, idempotency_header: &HeaderName) -> ClientHeaders<'a> {
        let mut seen = ClientHeaders::default();
        let mut ask = stream::Ask::default();
        for (name, value) in headers {
            if name == idempotency_header {
                seen.idempotency_key = true;
            }
            if name == HOST {
                seen.host.get_or_insert(value);
            } else if name == AUTHORIZATION {
                seen.authorization = true;
            } else if name == CONTENT_LENGTH {
                seen.content_length.get_or_insert(value);
            } else if name == EXPECTED_DURATION {
                seen.expected_duration.get_or_insert(value);
            } else {
                ask.see(name, value);
            }
        }
        seen.stream = ask.kind();
        seen
    }
}

/// What the sidecar reads from an upstream answer's headers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHeaders<'a> {
    /// `grpc-status`.
    pub grpc_status: Option<&'a HeaderValue>,
    /// `Content-Type`.
    pub content_type: Option<&'a HeaderValue>,
    /// `Retry-After`.
    pub retry_after: Option<&'a HeaderValue>,
    /// `WWW-Authenticate`.
    pub www_authenticate: Option<&'a HeaderValue>,
}

impl<'a> AnswerHeaders<'a> {
    /// Reads `headers`.
    pub fn read(headers: &'a HeaderMap) -> AnswerHeaders<'a> {
        let mut seen = AnswerHeaders::default();
        for (name, value) in headers {
            let slot = if name == CONTENT_TYPE {
                &mut seen.content_type
            } else if name == GRPC_STATUS {
                &mut seen.grpc_status
            } else if name == RETRY_AFTER {
                &mut seen.retry_after
            } else if name == WWW_AUTHENTICATE {
                &mut seen.www_authenticate
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IDEMPOTENCY: HeaderName = HeaderName::from_static("idempotency-key");

    /// What the lookups by name give: the meaning both readers must keep.
    fn client_by_lookups<'a>(h: &'a HeaderMap, idem: &HeaderName) -> ClientHeaders<'a> {
        ClientHeaders {
            host: h.get(HOST),
            authorization: h.contains_key(AUTHORIZATION),
            content_length: h.get(CONTENT_LENGTH),
            expected_duration: h.get(EXPECTED_DURATION),
            idempotency_key: h.contains_key(idem),
            stream: stream::requested_by_lookups(h),
        }
    }

    fn answer_by_lookups(h: &HeaderMap) -> AnswerHeaders<'_> {
        AnswerHeaders {
            grpc_status: h.get(GRPC_STATUS),
            content_type: h.get(CONTENT_TYPE),
            retry_after: h.get(RETRY_AFTER),
            www_authenticate: h.get(WWW_AUTHENTICATE),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_request_is_read_as_lookups_would_read_it() {
        let v = HeaderValue::from_static;
        let cases: &[(&[(&str, &str)], ClientHeaders)] = &[
            (&[], ClientHeaders::default()),
            (
                &[("host", "api.example.com"), ("accept", "*/*")],
                ClientHeaders {
                    host: Some(&v("api.example.com")),
                    ..Default::default()
                },
            ),
            (
                &[
                    ("Host", "a"),
                    ("host", "b"),
                    ("authorization", "Bearer x"),
                    ("content-length", "12"),
                    ("idempotency-key", "k1"),
                    ("X-Sidecar-Expected-Duration", "90s"),
                ],
                ClientHeaders {
                    host: Some(&v("a")),
                    authorization: true,
                    content_length: Some(&v("12")),
                    expected_duration: Some(&v("90s")),
                    idempotency_key: true,
                    stream: None,
                },
            ),
            (
                &[
                    ("upgrade", "websocket"),
                    ("connection", "keep-alive"),
                    ("connection", "Upgrade"),
                ],
                ClientHeaders {
                    stream: Some(StreamKind::WebSocket),
                    ..Default::default()
                },
            ),
            (
                &[("accept", "text/event-stream")],
                ClientHeaders {
                    stream: Some(StreamKind::Sse),
                    ..Default::default()
                },
            ),
        ];
        for (pairs, want) in cases {
            let h = map(pairs);
            assert_eq!(ClientHeaders::read(&h, &IDEMPOTENCY), *want, "{pairs:?}");
            assert_eq!(client_by_lookups(&h, &IDEMPOTENCY), *want, "{pairs:?}");
        }
    }

    #[test]
    fn the_idempotency_header_may_be_any_name_even_a_standard_one() {
        let h = map(&[("host", "a"), ("if-match", "\"v1\"")]);
        assert!(ClientHeaders::read(&h, &http::header::IF_MATCH).idempotency_key);
        assert!(!ClientHeaders::read(&h, &IDEMPOTENCY).idempotency_key);
        // The configured name is one the reader also reads for itself.
        let seen = ClientHeaders::read(&h, &HOST);
        assert!(seen.idempotency_key);
        assert_eq!(seen.host, Some(&HeaderValue::from_static("a")));
    }

    #[test]
    fn an_answer_is_read_as_lookups_would_read_it() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[
                ("content-type", "application/json"),
                ("content-length", "2"),
            ],
            &[
                ("Content-Type", "application/grpc"),
                ("grpc-status", "16"),
                ("grpc-status", "0"),
                ("www-authenticate", "Bearer error=\"invalid_token\""),
                ("retry-after", "3"),
            ],
        ];
        for pairs in cases {
            let h = map(pairs);
            assert_eq!(AnswerHeaders::read(&h), answer_by_lookups(&h), "{pairs:?}");
        }
    }

    /// Header names the readers look at (in either case) and some they do not.
    fn name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "host",
            "Host",
            "authorization",
            "content-length",
            "x-sidecar-expected-duration",
            "idempotency-key",
            "upgrade",
            "connection",
            "accept",
            "content-type",
            "grpc-status",
            "retry-after",
            "www-authenticate",
            "x-other",
            "cookie",
        ])
    }

    fn value() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "websocket",
            "Upgrade",
            "keep-alive, upgrade",
            "text/event-stream",
            "application/json",
            "16",
            "",
            "x",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// For any set of headers, in any order and with repeats, one walk reads what the
        /// lookups by name read.
        #[test]
        fn one_walk_reads_what_lookups_read(
            pairs in proptest::collection::vec((name(), value()), 0..12)
        ) {
            let h = map(&pairs);
            prop_assert_eq!(ClientHeaders::read(&h, &IDEMPOTENCY), client_by_lookups(&h, &IDEMPOTENCY));
            prop_assert_eq!(AnswerHeaders::read(&h), answer_by_lookups(&h));
        }
    }
}
