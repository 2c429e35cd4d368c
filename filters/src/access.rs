//! What the access log may show of a request target: the path, and of the query only the
//! parameter names. Values go (a browser client may carry a token in `?access_token=`), and so
//! does anything that does not look like a parameter name (a bare `?eyJ...`).

/// Longest path kept; a longer one is cut and marked with `...`.
const MAX_PATH: usize = 1024;
/// Query parameters named at most; more are summarised as `...`.
const MAX_KEYS: usize = 32;
/// Longest parameter name kept as is.
const MAX_KEY: usize = 64;

/// `path?name1=&name2=` for the access log: every value dropped, names kept when they look like
/// names (at most 64 bytes of letters, digits, `_ - . [ ]` or percent escapes, followed by `=`),
/// `_` otherwise.
pub fn loggable_target(path: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_PATH) + 16);
    match path.char_indices().nth(MAX_PATH) {
        Some((cut, _)) => {
            out.push_str(&path[..cut]);
            out.push_str("...");
        }
        None => out.push_str(path),
    }
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return out;
    };
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        if i == MAX_KEYS {
            out.push_str("...");
            break;
        }
        // A bare item (`?eyJ...`) is a value, not a name.
        match pair.split_once('=') {
            Some((name, _)) if is_name(name) => out.push_str(name),
            _ => out.push('_'),
        }
        out.push('=');
    }
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_KEY
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']' | b'%')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_go_names_stay() {
        assert_eq!(loggable_target("/a", None), "/a");
        assert_eq!(loggable_target("/a", Some("")), "/a");
        assert_eq!(
            loggable_target("/hub", Some("id=7&access_token=eyJsecret")),
            "/hub?id=&access_token="
        );
        assert_eq!(loggable_target("/a", Some("eyJhbGciOi.x.y")), "/a?_=");
        assert_eq!(loggable_target("/a", Some("a b=1&&x")), "/a?_=&_=&_=");
        let many = vec!["k=v"; 40].join("&");
        let logged = loggable_target("/a", Some(&many));
        assert!(logged.ends_with("&..."), "{logged}");
        assert_eq!(logged.matches("k=").count(), MAX_KEYS);
        let long = "/x".repeat(2000);
        assert!(loggable_target(&long, None).len() <= MAX_PATH + 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the query, no value reaches the log, and nothing panics.
        #[test]
        fn no_value_survives(path in "[ -~]{0,40}", name in "[a-z]{1,8}", value in "[A-Za-z0-9]{12,40}", junk in "[ -~]{0,60}") {
            let query = format!("{junk}&{name}={value}&{junk}");
            let logged = loggable_target(&path, Some(&query));
            let needle = format!("={value}");
            prop_assert!(!logged.contains(&needle));
            prop_assert!(!logged[path.len().min(logged.len())..].contains(&value), "{}", logged);
            let kept = format!("{}=", name);
            prop_assert!(logged.contains(&kept));
        }
    }
}
