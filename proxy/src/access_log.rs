//! One access line per request (target `access`), as `key=value` pairs in the text format and
//! as fields of the JSON object in the JSON format. The query's values and the client's
//! credentials never appear; the request id is what the client sent (`X-Request-Id` or
//! `traceparent`) or what the sidecar made up and sent upstream.

use std::fmt;

use pingora::proxy::Session;
use pingora::Error;
use sidecar_filters::{loggable_target, ErrorClass};

use crate::ctx::Ctx;

/// Longest header value (request id, user agent) written as is; longer ones are cut.
const MAX_HEADER: usize = 256;

/// A text value as logfmt writes it: bare when it holds no space, quote, `=` or control
/// character (and is not empty), otherwise quoted with `"` and `\` escaped.
pub(crate) struct Logfmt<'a>(pub(crate) &'a str);

impl fmt::Display for Logfmt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let bare = !s.is_empty()
            && !s
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'));
        if bare {
            return f.write_str(s);
        }
        f.write_str("\"")?;
        for c in s.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(MAX_HEADER) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn plain(s: &str) -> &str {
    s
}

fn logfmt(s: &str) -> tracing::field::DisplayValue<Logfmt<'_>> {
    tracing::field::display(Logfmt(s))
}

/// Whether access lines are written: on in the config and not filtered out by the log level.
/// Nothing of an access line is worked out otherwise.
pub(crate) fn enabled(log: &sidecar_config::Log) -> bool {
    log.access_log && tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// Writes the access line of a finished request that got `status` (0: no answer written).
pub(crate) fn write(session: &Session, ctx: &Ctx, e: Option<&Error>, status: u16, json: bool) {
    let req = session.req_header();
    let client = session
        .client_addr()
        .map_or_else(String::new, |a| a.to_string());
    let path = loggable_target(req.uri.path(), req.uri.query());
    let proto = match req.version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    let up = ctx.up();
    let upstream = up.map_or("", |u| u.config.name.as_str());
    let upstream_addr = match ctx.upstream_addr() {
        Some(a) if ctx.attempts > 0 => a.to_string(),
        _ => String::new(),
    };
    let upstream_status = ctx
        .upstream_statuses
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let user_agent = req
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map_or("", cut);
    let request_id = ctx.request_id.as_deref().map_or("", cut);
    let bytes_in = session.body_bytes_read() as u64;
    let bytes_out = session.body_bytes_sent() as u64;
    let duration_ms = ctx.started.elapsed().as_micros() as f64 / 1000.0;
    let upstream_ms = ctx.upstream_time.as_micros() as f64 / 1000.0;
    let generation = ctx.token.as_ref().map_or(0, |t| t.generation);
    let local = ctx.local.unwrap_or("");
    let class = ctx.class.map_or("", ErrorClass::as_str);
    let error = e.map(|e| e.etype().as_str()).unwrap_or("");
    let method = req.method.as_str();
    // One field list for both formats; `$s` turns a text value into what the format writes.
    macro_rules! line {
        ($s:ident) => {
            tracing::info!(
                target: "access",
                client = $s(&client),
                method = $s(method),
                path = $s(&path),
                proto = $s(proto),
                status,
                bytes_in,
                bytes_out,
                upstream = $s(upstream),
                upstream_addr = $s(&upstream_addr),
                upstream_status = $s(&upstream_status),
                upstream_ms,
                duration_ms,
                attempts = ctx.attempts,
                replayed = ctx.replays,
                generation,
                request_id = $s(request_id),
                user_agent = $s(user_agent),
                local = $s(local),
                class = $s(class),
                error = $s(error),
            )
        };
    }
    if json {
        line!(plain);
    } else {
        line!(logfmt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(Logfmt("GET").to_string(), "GET");
        assert_eq!(Logfmt("/a?b=").to_string(), "\"/a?b=\"");
        assert_eq!(Logfmt("").to_string(), "\"\"");
        assert_eq!(Logfmt("curl/8 (x)").to_string(), "\"curl/8 (x)\"");
        assert_eq!(Logfmt("a\"b\\c\n").to_string(), "\"a\\\"b\\\\c\\n\"");
    }

    /// Reads one logfmt value back (the tests' parser does the same).
    fn unquote(s: &str) -> Option<String> {
        let Some(inner) = s.strip_prefix('"') else {
            return Some(s.to_string());
        };
        let inner = inner.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next()? {
                'n' => out.push('\n'),
                'u' => {
                    let hex: String = chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                c => out.push(c),
            }
        }
        Some(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any value is one token (no bare space) and reads back as it was.
        #[test]
        fn any_value_round_trips(s in "[ -~\\n\\t\\r\u{e9}\u{7f}\u{2028}]{0,40}") {
            let written = Logfmt(&s).to_string();
            let quoted = written.starts_with('"');
            prop_assert!(quoted || !written.contains(char::is_whitespace));
            prop_assert_eq!(unquote(&written), Some(s));
        }
    }
}
