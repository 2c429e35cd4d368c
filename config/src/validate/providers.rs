//! Providers: the keys each type takes, OAuth2 clients, fallback logins, JSON calls.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method};

use super::urls::http_url;
use super::{bad, Bad};
use crate::schema::{ClientAuth, ProviderType, RawLogin, RawProvider};
use crate::{
    ClientCredential, JsonCall, LoginFallback, OAuthClient, Provider, ProviderKind, RefreshPolicy,
    Secret, SecretJson, Store,
};

pub(super) fn provider(name: &str, p: &RawProvider) -> Result<Provider, Bad> {
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
        ("tls", p.tls.is_some()),
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
        ProviderType::Oauth2ClientCredentials => &["tls"],
        ProviderType::Oauth2RefreshToken => &["refresh_token", "login", "tls"],
        ProviderType::Oauth2Password => &["username", "password", "tls"],
        ProviderType::JsonLogin => &["login", "renew", "tls"],
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
            return Err(bad(
                key,
                err(format!("`{key}` does not apply to type {type_name}")),
            ));
        }
    }
    let kind = match p.kind {
        ProviderType::Oauth2ClientCredentials => {
            let client = oauth_client(name, p)?;
            if client.credential == ClientCredential::None {
                return Err(err(
                    "type oauth2_client_credentials needs `client_secret` or `private_key`".into(),
                )
                .into());
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
                Some(l) => Some(fallback_login(l, &client).map_err(|m| bad("login", err(m)))?),
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
                    return Err(bad(&format!("login.{key}"), err(format!(
                        "`login.{key}` does not apply to type json_login; put credentials in login.body"
                    ))));
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
            .map_err(|b| bad(&b.at, err(b.message)))?;
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
                    .map_err(|b| bad(&b.at, err(b.message)))?,
                ),
            };
            ProviderKind::JsonLogin {
                login: Box::new(login),
                renew: renew.map(Box::new),
            }
        }
        ProviderType::Exec => {
            if p.command.is_empty() || p.command[0].trim().is_empty() {
                return Err(bad("command", err(
                    "type exec needs `command`, a list like [\"/usr/local/bin/get-token\", \"--json\"]"
                        .into(),
                )));
            }
            let timeout = p.timeout.map_or(Duration::from_secs(10), |d| d.0);
            if timeout.is_zero() {
                return Err(bad("timeout", err("`timeout` must be more than 0".into())));
            }
            for key in p.env.keys() {
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(bad(
                        "env",
                        err(format!("env name {key:?} is not a valid variable name")),
                    ));
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
                return Err(bad("path", err("`path` is empty".into())));
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
        return Err(bad(
            "refresh.backoff",
            err("refresh.backoff needs at least one delay".into()),
        ));
    }
    if p.refresh.escalate_after == 0 {
        return Err(bad(
            "refresh.escalate_after",
            err("refresh.escalate_after must be at least 1".into()),
        ));
    }
    if p.default_ttl.0.is_zero() {
        return Err(bad(
            "default_ttl",
            err("default_ttl must be more than 0".into()),
        ));
    }
    let store = match &p.store {
        None => None,
        Some(s) => {
            if s.path.trim().is_empty() {
                return Err(bad("store.path", err("store.path is empty".into())));
            }
            if s.key.expose().is_empty() {
                return Err(bad("store.key", err("store.key is empty".into())));
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
        // Decided with the whole config in view (`shared:` is a top-level section).
        shared: false,
        // Read by the caller, which can point at the failing key.
        tls_config: crate::Tls::default(),
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

fn oauth_client(name: &str, p: &RawProvider) -> Result<OAuthClient, Bad> {
    let token_url = required(name, "token_url", p.token_url.as_ref())?;
    http_url("token_url", token_url)
        .map_err(|m| bad("token_url", format!("provider {name:?}: {m}")))?;
    let client_id = required(name, "client_id", p.client_id.as_ref())?;
    let credential = match p.client_auth {
        ClientAuth::PrivateKeyJwt => {
            if p.client_secret.is_some() {
                return Err(bad("client_secret", format!(
                    "provider {name:?}: `client_secret` does not apply to client_auth private_key_jwt"
                )));
            }
            let key = required(name, "private_key", p.private_key.as_ref())?;
            let pem = key.expose();
            if !(pem.contains("-----BEGIN") && pem.contains("PRIVATE KEY-----")) {
                return Err(bad("private_key", format!(
                    "provider {name:?}: private_key is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
                )));
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
                    return Err(bad(
                        key,
                        format!("provider {name:?}: `{key}` needs client_auth: private_key_jwt"),
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
) -> Result<JsonCall, Bad> {
    http_url(&format!("{what}.url"), url).map_err(|m| bad(&format!("{what}.url"), m))?;
    let method = Method::from_bytes(method.unwrap_or("POST").to_ascii_uppercase().as_bytes())
        .map_err(|_| {
            bad(
                &format!("{what}.method"),
                format!("{what}.method is not an HTTP method"),
            )
        })?;
    let mut parsed = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let h = HeaderName::try_from(k.as_str()).map_err(|_| {
            bad(
                &format!("{what}.headers"),
                format!("{what}.headers: {k:?} is not a header name"),
            )
        })?;
        if http::HeaderValue::from_str(v.expose()).is_err() {
            // The value may be a secret: name the header only.
            return Err(bad(
                &format!("{what}.headers"),
                format!("{what}.headers: the value of {k} is not a valid header value"),
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
                return Err(bad(&format!("{what}.{key}"), format!(
                    "{what}.{key} {ptr:?} is not a JSON pointer; write it like /token or /data/token"
                )));
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
