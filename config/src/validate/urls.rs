//! URLs in errors and the checks every configured URL gets: http(s) only, no credentials.

/// `url` as it may be shown in an error: any `user:password@` replaced by `<redacted>@`.
pub(crate) fn shown_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..scheme_end], &rest[at..]),
        None => url.to_string(),
    }
}

/// Credentials in a URL would be printed by `check` and logged wherever the URL is; they are
/// refused, and the error says where they go instead.
pub(super) const NO_URL_CREDENTIALS: &str =
    "must not carry credentials (user:password@host): `check` and \
    the logs would show them; give the secret through client_secret (or a header or body of \
    json_login) as \"${env:NAME}\" or \"${file:/path}\"";

pub(super) fn http_url(what: &str, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{what} {:?}: {e}", shown_url(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{what} must be http:// or https://"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("{what} {NO_URL_CREDENTIALS}"));
    }
    Ok(())
}
