//! Token in the query string, and redaction of it for logs.

/// The query with `param` set to `token`, replacing any value the client sent for it.
pub fn query_with_token(query: Option<&str>, param: &str, token: &str) -> String {
    let mut out = form_pair(param, token);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if decode(name) != param {
            out.push('&');
            out.push_str(pair);
        }
    }
    out
}

/// The query with the value of `param` replaced by `REDACTED`, for logs.
pub fn redact_query(query: &str, param: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            if decode(name) == param {
                format!("{name}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn form_pair(name: &str, value: &str) -> String {
    let enc = |s: &str| -> String { url_escape(s) };
    format!("{}={}", enc(name), enc(value))
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                // Bytes, not `&s[..]`: a multi-byte character after `%` is no char boundary.
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_before_a_multibyte_character_does_not_panic() {
        let out = redact_query("x%a\u{e9}=1&token=s", "token");
        assert!(out.starts_with("x%a\u{e9}=1&token="), "{out}");
        assert!(!out.ends_with("=s"), "{out}");
    }

    #[test]
    fn replaces_client_value() {
        assert_eq!(
            query_with_token(None, "access_token", "t/1"),
            "access_token=t%2F1"
        );
        assert_eq!(
            query_with_token(Some("a=1&access_token=client&b=2"), "access_token", "tok"),
            "access_token=tok&a=1&b=2"
        );
        assert_eq!(
            query_with_token(Some("access%5Ftoken=x&id=3"), "access_token", "tok"),
            "access_token=tok&id=3"
        );
    }

    #[test]
    fn redacts() {
        assert_eq!(
            redact_query("a=1&access_token=secret", "access_token"),
            "a=1&access_token=REDACTED"
        );
        assert_eq!(redact_query("a=1", "access_token"), "a=1");
    }
}
