//! The sidecar's own answers: JSON bodies `{"error": CODE, "message": TEXT}`.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// An answer the sidecar gives itself instead of forwarding.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable text; never holds a secret.
    pub message: String,
    /// `Retry-After`, for 429 and 503.
    pub retry_after: Option<Duration>,
}

impl LocalAnswer {
    /// 404 `no_route`.
    pub fn no_route(path: &str) -> LocalAnswer {
        LocalAnswer::new(404, "no_route", format!("no upstream route matches {path}"))
    }

    /// 403 `forbidden_target`.
    pub fn forbidden(why: &str) -> LocalAnswer {
        LocalAnswer::new(403, "forbidden_target", why.to_string())
    }

    /// 401 `client_authorization`.
    pub fn client_authorization() -> LocalAnswer {
        LocalAnswer::new(
            401,
            "client_authorization",
            "this route refuses requests that carry their own Authorization header".into(),
        )
    }

    /// 503 `token_unavailable`.
    pub fn token_unavailable(message: String, retry_after: Duration) -> LocalAnswer {
        LocalAnswer {
            retry_after: Some(retry_after),
            ..LocalAnswer::new(503, "token_unavailable", message)
        }
    }

    /// 503 `too_many_streams`: `max_streams` streams are open.
    pub fn too_many_streams(max: usize) -> LocalAnswer {
        LocalAnswer {
            retry_after: Some(Duration::from_secs(1)),
            ..LocalAnswer::new(
                503,
                "too_many_streams",
                format!("the sidecar holds its maximum of {max} open streams; retry shortly"),
            )
        }
    }

    /// 429 `rate_limited`.
    pub fn rate_limited(rule: &str, retry_after: Duration) -> LocalAnswer {
        LocalAnswer {
            retry_after: Some(retry_after),
            ..LocalAnswer::new(429, "rate_limited", format!("rate limit {rule} exceeded"))
        }
    }

    /// 502 `upstream_unreachable` while the circuit breaker is open.
    pub fn circuit_open(upstream: &str, retry_after: Duration) -> LocalAnswer {
        LocalAnswer {
            retry_after: Some(retry_after),
            ..LocalAnswer::new(
                502,
                "upstream_unreachable",
                format!("upstream {upstream} keeps failing; failing fast until it recovers"),
            )
        }
    }

    /// 502 `upstream_unreachable`.
    pub fn unreachable(upstream: &str) -> LocalAnswer {
        LocalAnswer::new(
            502,
            "upstream_unreachable",
            format!("upstream {upstream} could not be reached"),
        )
    }

    /// 504 `upstream_timeout`.
    pub fn timeout(upstream: &str) -> LocalAnswer {
        LocalAnswer::new(
            504,
            "upstream_timeout",
            format!("upstream {upstream} did not answer in time"),
        )
    }

    /// 500 `internal`.
    pub fn internal() -> LocalAnswer {
        LocalAnswer::new(500, "internal", "internal error".into())
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: String) -> LocalAnswer {
        LocalAnswer::new(400, "bad_request", message)
    }

    fn new(status: u16, code: &'static str, message: String) -> LocalAnswer {
        LocalAnswer {
            status,
            code,
            message,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        Bytes::from(serde_json::json!({ "error": self.code, "message": self.message }).to_string())
    }

    /// Writes the answer downstream. Errors writing it are the client's problem (it went away).
    pub async fn write(&self, session: &mut Session) {
        let body = self.body();
        let Ok(mut header) = ResponseHeader::build(self.status, Some(4)) else {
            return;
        };
        let _ = header.insert_header("content-type", "application/json");
        let _ = header.insert_header("content-length", body.len().to_string());
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            let _ = header.insert_header("retry-after", secs.max(1).to_string());
        }
        if session
            .write_response_header(Box::new(header), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}
