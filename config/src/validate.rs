//! Raw schema → validated [`Config`]: cross-field checks, URL parsing, header names.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::schema::{
    ClientAuth, ProviderType, RawConfig, RawDownstream, RawLogin, RawProvider, RawRateLimit,
    RawUpstream,
};
use crate::{
    ClientCredential, Config, ConfigError, Downstream, Expiry, Inject, JsonCall, Log,
    LoginFallback, OAuthClient, Provider, ProviderKind, RefreshPolicy, Replay, Retry, Secret,
    SecretJson, Store, Upstream,
};

/// Builds errors that point at the first line mentioning a key or value; cross-field problems
/// have no serde location, so the text is searched instead.
struct Locator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Locator<'_> {
    fn error(&self, needles: &[&str], message: String) -> ConfigError {
        let mut from = 0;
        let mut found = None;
        for needle in needles {
            match self.text[from..].find(needle) {
                Some(i) => {
                    found = Some(from + i);
                    from += i;
                }
                None => break,
            }
        }
        match found {
            Some(offset) => {
                let before = &self.text[..offset];
                let line = before.matches('\n').count() + 1;
                let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                ConfigError::At {
                    file: self.file.to_string(),
                    line,
                    col,
                    message,
                }
            }
            None => ConfigError::Invalid {
                file: self.file.to_string(),
                message,
            },
        }
    }
}

/// Statuses an expired-token answer or a transient failure can have: only errors, so that the
/// proxy can pass every success and redirect on without looking further.
const ERROR_STATUSES: std::ops::RangeInclusive<u16> = 400..=599;

pub(crate) fn validate(raw: RawConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let at = Locator { text, file };
    let listen = parse_addr(&raw.listen).map_err(|m| at.error(&["listen:"], m))?;
    let admin_listen =
        parse_addr(&raw.admin_listen).map_err(|m| at.error(&["admin_listen:"], m))?;

    let mut providers = BTreeMap::new();
    for (name, p) in &raw.providers {
        let provider =
            provider(name, p).map_err(|m| at.error(&["providers:", &format!("{name}:")], m))?;
        if let Some(store) = &provider.store {
            let shared = providers
                .values()
                .find(|o: &&Provider| o.store.as_ref().is_some_and(|s| s.path == store.path));
            if let Some(other) = shared {
                return Err(at.error(
                    &["providers:", &format!("{name}:"), "store:"],
                    format!(
                        "provider {name:?}: store.path is also the store of provider {:?}; each provider needs its own file",
                        other.name
                    ),
                ));
            }
        }
        providers.insert(name.clone(), provider);
    }

    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for u in &raw.upstreams {
        let here = |m: String| at.error(&["upstreams:", &format!("name: {}", u.name)], m);
        if !names.insert(u.name.clone()) {
            return Err(here(format!("upstream name {:?} is used twice", u.name)));
        }
        if let Some(p) = &u.provider {
            if !providers.contains_key(p) {
                return Err(here(format!(
                    "upstream {:?} names provider {p:?}, which is not defined under providers",
                    u.name
                )));
            }
        }
        upstreams.push(upstream(u).map_err(here)?);
    }

    if let Some(s) = raw
        .retry
        .statuses
        .iter()
        .find(|s| !ERROR_STATUSES.contains(s))
    {
        return Err(at.error(
            &["retry:", "statuses:"],
            format!("retry.statuses: {s} is not an error status (400-599)"),
        ));
    }

    let r = &raw.replay;
    let replay_at = |m: String| at.error(&["replay:"], m);
    if r.max_attempts == 0 {
        return Err(replay_at("replay.max_attempts must be at least 1".into()));
    }
    let idempotent_methods = r
        .idempotent_methods
        .iter()
        .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| replay_at(format!("replay.idempotent_methods: {e}")))?;
    let idempotency_header = HeaderName::try_from(r.idempotency_header.as_str())
        .map_err(|e| replay_at(format!("replay.idempotency_header: {e}")))?;
    let replay = Replay {
        max_attempts: r.max_attempts,
        max_body: r.max_body.0,
        idempotent_methods,
        idempotency_header,
        wait_for_token: r.wait_for_token.0,
        max_waiting: r.max_waiting,
        debug_header: r.debug_header,
    };

    let mut rule_names = HashSet::new();
    let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
    for l in &raw.rate_limits {
        let here = |m: String| at.error(&["rate_limits:", &format!("name: {}", l.name)], m);
        if !rule_names.insert(l.name.as_str()) {
            return Err(here(format!("rate limit name {:?} is used twice", l.name)));
        }
        if !names.contains(&l.upstream) {
            return Err(here(format!(
                "rate limit {:?} names upstream {:?}, which is not defined under upstreams",
                l.name, l.upstream
            )));
        }
        let rate = crate::parse_rate(&l.rate).map_err(|m| {
            at.error(
                &["rate_limits:", &format!("name: {}", l.name), "rate:"],
                format!("rate limit {:?}: {m}", l.name),
            )
        })?;
        rate_limits.push(rate_limit(l, rate).map_err(here)?);
    }

    let downstream =
        downstream(&raw.downstream).map_err(|(key, m)| at.error(&["downstream:", key], m))?;

    Ok(Config {
        listen,
        admin_listen,
        shutdown_grace: raw.shutdown_grace.0,
        providers,
        upstreams,
        replay,
        rate_limits,
        downstream,
        retry: Retry {
            statuses: raw.retry.statuses.clone(),
            backoff: raw.retry.backoff.iter().map(|d| d.0).collect(),
            respect_retry_after: raw.retry.respect_retry_after,
            max_retry_after: raw.retry.max_retry_after.0,
        },
        log: Log {
            level: raw.log.level.clone(),
            format: raw.log.format,
            access_log: raw.log.access_log,
        },
        source: None,
        raw,
    })
}

/// A zero timeout would close every connection at once, a zero cap would refuse every client:
/// both are mistakes, not settings. On error: the key to point at, and the message.
fn downstream(d: &RawDownstream) -> Result<Downstream, (&'static str, String)> {
    if d.header_timeout.0.is_zero() {
        return Err((
            "header_timeout:",
            "downstream.header_timeout must be more than 0".into(),
        ));
    }
    if d.idle_timeout.0.is_zero() {
        return Err((
            "idle_timeout:",
            "downstream.idle_timeout must be more than 0".into(),
        ));
    }
    if d.max_connections == 0 {
        return Err((
            "max_connections:",
            "downstream.max_connections must be at least 1".into(),
        ));
    }
    Ok(Downstream {
        header_timeout: d.header_timeout.0,
        idle_timeout: d.idle_timeout.0,
        max_connections: d.max_connections,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("localhost:")
        .map_or_else(|| t.to_string(), |p| format!("127.0.0.1:{p}"));
    t.parse().map_err(|_| {
        format!("invalid listen address {s:?}; write it like 127.0.0.1:8080 or [::1]:8080")
    })
}

fn provider(name: &str, p: &RawProvider) -> Result<Provider, String> {
    let err = |m: String| format!("provider {name:?}: {m}");
    let type_name = type_name(p.kind);
    let given = [
        ("token_url", p.token_url.is_some()),
        ("client_id", p.client_id.is_some()),
        ("client_secret", p.client_secret.is_some()),
        ("client_auth", p.client_auth != ClientAuth::default()),
        ("private_key", p.private_key.is_some()),
        ("key_id", p.key_id.is_some()),
        ("scopes", !p.scopes.is_empty()),
        ("params", !p.params.is_empty()),
        ("token", p.token.is_some()),
        ("refresh_token", p.refresh_token.is_some()),
        ("username", p.username.is_some()),
        ("password", p.password.is_some()),
        ("login", p.login.is_some()),
        ("renew", p.renew.is_some()),
        ("command", !p.command.is_empty()),
        ("timeout", p.timeout.is_some()),
        ("env", !p.env.is_empty()),
        ("path", p.path.is_some()),
    ];
    const OAUTH: [&str; 8] = [
        "token_url",
        "client_id",
        "client_secret",
        "client_auth",
        "private_key",
        "key_id",
        "scopes",
        "params",
    ];
    let extra: &[&str] = match p.kind {
        ProviderType::Oauth2ClientCredentials => &[],
        ProviderType::Oauth2RefreshToken => &["refresh_token", "login"],
        ProviderType::Oauth2Password => &["username", "password"],
        ProviderType::JsonLogin => &["login", "renew"],
        ProviderType::Exec => &["command", "timeout", "env"],
        ProviderType::File => &["path"],
        ProviderType::Static => &["token"],
    };
    let oauth = matches!(
        p.kind,
        ProviderType::Oauth2ClientCredentials
            | ProviderType::Oauth2RefreshToken
            | ProviderType::Oauth2Password
    );
    for (key, set) in given {
        if set && !extra.contains(&key) && !(oauth && OAUTH.contains(&key)) {
            return Err(err(format!("`{key}` does not apply to type {type_name}")));
        }
    }
    let kind = match p.kind {
        ProviderType::Oauth2ClientCredentials => {
            let client = oauth_client(name, p)?;
            if client.credential == ClientCredential::None {
                return Err(err(
                    "type oauth2_client_credentials needs `client_secret` or `private_key`".into(),
                ));
            }
            ProviderKind::ClientCredentials {
                client,
                scopes: p.scopes.clone(),
                params: p.params.clone(),
            }
        }
        ProviderType::Oauth2RefreshToken => {
            let client = oauth_client(name, p)?;
            let fallback = match &p.login {
                None => None,
                Some(l) => Some(fallback_login(l, &client).map_err(&err)?),
            };
            ProviderKind::RefreshToken {
                client,
                refresh_token: required(name, "refresh_token", p.refresh_token.as_ref())?.clone(),
                scopes: p.scopes.clone(),
                params: p.params.clone(),
                fallback,
            }
        }
        ProviderType::Oauth2Password => ProviderKind::Password {
            client: oauth_client(name, p)?,
            username: required(name, "username", p.username.as_ref())?.clone(),
            password: required(name, "password", p.password.as_ref())?.clone(),
            scopes: p.scopes.clone(),
            params: p.params.clone(),
        },
        ProviderType::JsonLogin => {
            let l = required(name, "login", p.login.as_ref())?;
            for (key, set) in [
                ("type", l.kind.is_some()),
                ("username", l.username.is_some()),
                ("password", l.password.is_some()),
            ] {
                if set {
                    return Err(err(format!(
                        "`login.{key}` does not apply to type json_login; put credentials in login.body"
                    )));
                }
            }
            let login = json_call(
                "login",
                required(name, "login.url", l.url.as_ref())?,
                l.method.as_deref(),
                &l.headers,
                l.body.as_ref(),
                required(name, "login.token_pointer", l.token_pointer.as_ref())?,
                [
                    &l.expires_in_pointer,
                    &l.expires_at_pointer,
                    &l.success_pointer,
                    &l.error_pointer,
                ],
            )
            .map_err(&err)?;
            let renew = match &p.renew {
                None => None,
                Some(r) => Some(
                    json_call(
                        "renew",
                        &r.url,
                        r.method.as_deref(),
                        &r.headers,
                        r.body.as_ref(),
                        &r.token_pointer,
                        [
                            &r.expires_in_pointer,
                            &r.expires_at_pointer,
                            &r.success_pointer,
                            &r.error_pointer,
                        ],
                    )
                    .map_err(&err)?,
                ),
            };
            ProviderKind::JsonLogin {
                login: Box::new(login),
                renew: renew.map(Box::new),
            }
        }
        ProviderType::Exec => {
            if p.command.is_empty() || p.command[0].trim().is_empty() {
                return Err(err(
                    "type exec needs `command`, a list like [\"/usr/local/bin/get-token\", \"--json\"]"
                        .into(),
                ));
            }
            let timeout = p.timeout.map_or(Duration::from_secs(10), |d| d.0);
            if timeout.is_zero() {
                return Err(err("`timeout` must be more than 0".into()));
            }
            for key in p.env.keys() {
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(err(format!(
                        "env name {key:?} is not a valid variable name"
                    )));
                }
            }
            ProviderKind::Exec {
                command: p.command.clone(),
                timeout,
                env: p.env.clone(),
            }
        }
        ProviderType::File => {
            let path = required(name, "path", p.path.as_ref())?;
            if path.trim().is_empty() {
                return Err(err("`path` is empty".into()));
            }
            ProviderKind::File {
                path: PathBuf::from(path),
            }
        }
        ProviderType::Static => ProviderKind::Static {
            token: required(name, "token", p.token.as_ref())?.clone(),
        },
    };
    if p.refresh.backoff.is_empty() {
        return Err(format!(
            "provider {name:?}: refresh.backoff needs at least one delay"
        ));
    }
    if p.refresh.escalate_after == 0 {
        return Err(err("refresh.escalate_after must be at least 1".into()));
    }
    if p.default_ttl.0.is_zero() {
        return Err(format!(
            "provider {name:?}: default_ttl must be more than 0"
        ));
    }
    let store = match &p.store {
        None => None,
        Some(s) => {
            if s.path.trim().is_empty() {
                return Err(err("store.path is empty".into()));
            }
            if s.key.expose().is_empty() {
                return Err(err("store.key is empty".into()));
            }
            Some(Store {
                path: PathBuf::from(&s.path),
                key: s.key.clone(),
            })
        }
    };
    Ok(Provider {
        name: name.to_string(),
        kind,
        default_ttl: p.default_ttl.0,
        refresh: RefreshPolicy {
            before_expiry: p.refresh.before_expiry.0,
            jitter: p.refresh.jitter.0,
            skew: p.refresh.skew.0,
            min_interval: p.refresh.min_interval.0,
            backoff: p.refresh.backoff.iter().map(|d| d.0).collect(),
            escalate_after: p.refresh.escalate_after,
        },
        store,
    })
}

fn type_name(t: ProviderType) -> &'static str {
    match t {
        ProviderType::Oauth2ClientCredentials => "oauth2_client_credentials",
        ProviderType::Oauth2RefreshToken => "oauth2_refresh_token",
        ProviderType::Oauth2Password => "oauth2_password",
        ProviderType::JsonLogin => "json_login",
        ProviderType::Exec => "exec",
        ProviderType::File => "file",
        ProviderType::Static => "static",
    }
}

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
const NO_URL_CREDENTIALS: &str = "must not carry credentials (user:password@host): `check` and \
    the logs would show them; give the secret through client_secret (or a header or body of \
    json_login) as \"${env:NAME}\" or \"${file:/path}\"";

fn http_url(what: &str, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{what} {:?}: {e}", shown_url(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{what} must be http:// or https://"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("{what} {NO_URL_CREDENTIALS}"));
    }
    Ok(())
}

fn oauth_client(name: &str, p: &RawProvider) -> Result<OAuthClient, String> {
    let token_url = required(name, "token_url", p.token_url.as_ref())?;
    http_url("token_url", token_url).map_err(|m| format!("provider {name:?}: {m}"))?;
    let client_id = required(name, "client_id", p.client_id.as_ref())?;
    let credential = match p.client_auth {
        ClientAuth::PrivateKeyJwt => {
            if p.client_secret.is_some() {
                return Err(format!(
                    "provider {name:?}: `client_secret` does not apply to client_auth private_key_jwt"
                ));
            }
            let key = required(name, "private_key", p.private_key.as_ref())?;
            let pem = key.expose();
            if !(pem.contains("-----BEGIN") && pem.contains("PRIVATE KEY-----")) {
                return Err(format!(
                    "provider {name:?}: private_key is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
                ));
            }
            ClientCredential::PrivateKeyJwt {
                key: key.clone(),
                key_id: p.key_id.clone(),
            }
        }
        auth => {
            for (key, set) in [
                ("private_key", p.private_key.is_some()),
                ("key_id", p.key_id.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "provider {name:?}: `{key}` needs client_auth: private_key_jwt"
                    ));
                }
            }
            match (&p.client_secret, auth) {
                (None, _) => ClientCredential::None,
                (Some(s), ClientAuth::ClientSecretPost) => ClientCredential::SecretPost(s.clone()),
                (Some(s), _) => ClientCredential::SecretBasic(s.clone()),
            }
        }
    };
    Ok(OAuthClient {
        token_url: token_url.clone(),
        client_id: client_id.clone(),
        credential,
    })
}

fn fallback_login(l: &RawLogin, client: &OAuthClient) -> Result<LoginFallback, String> {
    for (key, set) in [
        ("url", l.url.is_some()),
        ("method", l.method.is_some()),
        ("headers", !l.headers.is_empty()),
        ("body", l.body.is_some()),
        ("token_pointer", l.token_pointer.is_some()),
        ("expires_in_pointer", l.expires_in_pointer.is_some()),
        ("expires_at_pointer", l.expires_at_pointer.is_some()),
        ("success_pointer", l.success_pointer.is_some()),
        ("error_pointer", l.error_pointer.is_some()),
    ] {
        if set {
            return Err(format!(
                "`login.{key}` does not apply to type oauth2_refresh_token (its login is an OAuth2 grant)"
            ));
        }
    }
    match l.kind {
        Some(ProviderType::Oauth2Password) => Ok(LoginFallback::Password {
            username: l
                .username
                .clone()
                .ok_or("login of type oauth2_password needs `username`")?,
            password: l
                .password
                .clone()
                .ok_or("login of type oauth2_password needs `password`")?,
        }),
        Some(ProviderType::Oauth2ClientCredentials) => {
            if l.username.is_some() || l.password.is_some() {
                return Err(
                    "login of type oauth2_client_credentials takes no username or password".into(),
                );
            }
            if client.credential == ClientCredential::None {
                return Err("login of type oauth2_client_credentials needs `client_secret` or `private_key`".into());
            }
            Ok(LoginFallback::ClientCredentials)
        }
        Some(other) => Err(format!(
            "login type {} is not a fallback; use oauth2_password or oauth2_client_credentials",
            type_name(other)
        )),
        None => {
            Err("login needs `type: oauth2_password` or `type: oauth2_client_credentials`".into())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn json_call(
    what: &str,
    url: &str,
    method: Option<&str>,
    headers: &BTreeMap<String, Secret>,
    body: Option<&SecretJson>,
    token_pointer: &str,
    pointers: [&Option<String>; 4],
) -> Result<JsonCall, String> {
    http_url(&format!("{what}.url"), url)?;
    let method = Method::from_bytes(method.unwrap_or("POST").to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{what}.method is not an HTTP method"))?;
    let mut parsed = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let h = HeaderName::try_from(k.as_str())
            .map_err(|_| format!("{what}.headers: {k:?} is not a header name"))?;
        if http::HeaderValue::from_str(v.expose()).is_err() {
            // The value may be a secret: name the header only.
            return Err(format!(
                "{what}.headers: the value of {k} is not a valid header value"
            ));
        }
        parsed.push((h, v.clone()));
    }
    let [expires_in, expires_at, success, error] = pointers;
    for (key, ptr) in [
        ("token_pointer", Some(token_pointer)),
        ("expires_in_pointer", expires_in.as_deref()),
        ("expires_at_pointer", expires_at.as_deref()),
        ("success_pointer", success.as_deref()),
        ("error_pointer", error.as_deref()),
    ] {
        if let Some(ptr) = ptr {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                return Err(format!(
                    "{what}.{key} {ptr:?} is not a JSON pointer; write it like /token or /data/token"
                ));
            }
        }
    }
    Ok(JsonCall {
        url: url.to_string(),
        method,
        headers: parsed,
        body: body.cloned(),
        token_pointer: token_pointer.to_string(),
        expires_in_pointer: expires_in.clone(),
        expires_at_pointer: expires_at.clone(),
        success_pointer: success.clone(),
        error_pointer: error.clone(),
    })
}

fn required<'a, T>(provider: &str, key: &str, v: Option<&'a T>) -> Result<&'a T, String> {
    v.ok_or_else(|| format!("provider {provider:?} needs `{key}`"))
}

fn upstream(u: &RawUpstream) -> Result<Upstream, String> {
    let name = &u.name;
    let url = url::Url::parse(&u.url)
        .map_err(|e| format!("upstream {name:?}: url {:?}: {e}", shown_url(&u.url)))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!(
                "upstream {name:?}: scheme {other:?} is not http or https"
            ))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("upstream {name:?}: url {NO_URL_CREDENTIALS}"));
    }
    if url.query().is_some() {
        return Err(format!(
            "upstream {name:?}: url must be scheme://host[:port][/base-path] only"
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(format!("upstream {name:?}: url has no host")),
    };
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or(&host)),
        None => url.host_str().unwrap_or(&host).to_string(),
    };
    let base_path = url.path().trim_end_matches('/').to_string();

    let path_prefix = u.matcher.path_prefix.clone().unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') {
        return Err(format!(
            "upstream {name:?}: match.path_prefix must start with /"
        ));
    }
    let header = match &u.inject.header {
        Some(h) => Some(
            HeaderName::try_from(h.as_str())
                .map_err(|e| format!("upstream {name:?}: inject.header {h:?}: {e}"))?,
        ),
        None => None,
    };
    if header.is_none() && u.inject.query.is_none() {
        return Err(format!(
            "upstream {name:?}: inject needs a header, a query parameter, or both"
        ));
    }
    for s in u.expiry.statuses.iter().chain(&u.expiry.body_statuses) {
        if !ERROR_STATUSES.contains(s) {
            return Err(format!(
                "upstream {name:?}: expiry status {s} is not an error status (400-599)"
            ));
        }
    }
    Ok(Upstream {
        name: name.clone(),
        tls,
        host,
        port,
        authority,
        base_path,
        provider: u.provider.clone(),
        path_prefix: path_prefix.trim_end_matches('/').to_string(),
        match_host: u.matcher.host.as_ref().map(|h| h.to_ascii_lowercase()),
        strip_prefix: u.matcher.strip_prefix,
        inject: Inject {
            header,
            scheme: u.inject.scheme.clone(),
            query: u.inject.query.clone(),
        },
        client_authorization: u.client_authorization,
        replay: u.replay,
        connect_timeout: u.timeouts.connect.0,
        read_timeout: u.timeouts.read.0,
        idle_timeout: u.timeouts.idle.0,
        ca_file: u.tls.ca_file.as_ref().map(PathBuf::from),
        server_name: u.tls.server_name.clone(),
        breaker_failures: u.circuit_breaker.failures,
        breaker_cooldown: u.circuit_breaker.cooldown.0,
        expiry: Expiry {
            statuses: u.expiry.statuses.clone(),
            body_patterns: u
                .expiry
                .body_patterns
                .iter()
                .map(|p| p.to_lowercase())
                .collect(),
            body_statuses: u.expiry.body_statuses.clone(),
        },
    })
}

fn rate_limit(l: &RawRateLimit, rate: crate::Rate) -> Result<crate::RateLimit, String> {
    let name = &l.name;
    if name.is_empty() {
        return Err("a rate limit needs a non-empty name".into());
    }
    let methods = l
        .matcher
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|e| format!("rate limit {name:?}: method {m:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = match &l.matcher.path {
        Some(p) if !p.starts_with('/') => {
            return Err(format!(
                "rate limit {name:?}: match.path {p:?} must start with /"
            ))
        }
        Some(p) => Some(
            globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("rate limit {name:?}: match.path {p:?}: {e}"))?,
        ),
        None => None,
    };
    let burst = l.burst.unwrap_or(rate.count);
    if burst == 0 {
        return Err(format!("rate limit {name:?}: burst must be at least 1"));
    }
    // The burst window ((burst - 1) emission intervals) must fit governor's nanosecond clock.
    let window = rate.per.as_nanos() / u128::from(rate.count) * u128::from(burst);
    if window > Duration::from_secs(10 * 365 * 24 * 3600).as_nanos() {
        return Err(format!(
            "rate limit {name:?}: rate {:?} with burst {burst} spans more than 10 years",
            l.rate
        ));
    }
    if rate.per.as_nanos() < u128::from(rate.count) {
        return Err(format!(
            "rate limit {name:?}: rate {:?} is finer than one request per nanosecond",
            l.rate
        ));
    }
    let key = match &l.key {
        None => None,
        Some(k) => match (k.client_ip, &k.header) {
            (true, None) => Some(crate::RateKey::ClientIp),
            (false, Some(h)) => Some(crate::RateKey::Header(
                HeaderName::try_from(h.as_str())
                    .map_err(|e| format!("rate limit {name:?}: key.header {h:?}: {e}"))?,
            )),
            _ => {
                return Err(format!(
                    "rate limit {name:?}: key needs exactly one of client_ip: true or header: NAME"
                ))
            }
        },
    };
    if l.max_keys == 0 {
        return Err(format!("rate limit {name:?}: max_keys must be at least 1"));
    }
    Ok(crate::RateLimit {
        name: name.clone(),
        upstream: l.upstream.clone(),
        methods,
        path,
        rate,
        burst,
        mode: l.mode,
        max_wait: l.max_wait.0,
        key,
        max_keys: l.max_keys,
    })
}

#[cfg(test)]
mod tests;
