//! Provider validation: the keys of each provider type, and the errors for what does not fit.

use crate::*;

fn parse(provider: &str) -> Result<Config, ConfigError> {
    Config::parse(&format!("providers:\n  p: {provider}\n"), "t.yaml")
}

fn kind(provider: &str) -> ProviderKind {
    match parse(provider) {
        Ok(c) => c.providers["p"].kind.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn error(provider: &str) -> String {
    match parse(provider) {
        Ok(c) => panic!("accepted: {:?}", c.providers["p"]),
        Err(e) => e.to_string(),
    }
}

const OAUTH: &str = "token_url: 'https://idp/t', client_id: c";

#[test]
fn every_type_of_spec_section_5_parses() {
    std::env::set_var("SIDECAR_CFG_TEST_RT", "rt-value");
    std::env::set_var("SIDECAR_CFG_TEST_KEY", "api-key-value");
    let rt = kind(&format!(
        "{{ type: oauth2_refresh_token, {OAUTH}, client_secret: s, \
         refresh_token: '${{env:SIDECAR_CFG_TEST_RT}}', \
         login: {{ type: oauth2_password, username: u, password: p }} }}"
    ));
    match rt {
        ProviderKind::RefreshToken {
            refresh_token,
            fallback: Some(LoginFallback::Password { username, .. }),
            ..
        } => {
            assert_eq!(refresh_token.expose(), "rt-value");
            assert_eq!(username, "u");
        }
        other => panic!("{other:?}"),
    }
    // Public client: no secret.
    match kind(&format!(
        "{{ type: oauth2_password, {OAUTH}, username: u, password: p, scopes: [a] }}"
    )) {
        ProviderKind::Password { client, .. } => {
            assert_eq!(client.credential, ClientCredential::None)
        }
        other => panic!("{other:?}"),
    }
    match kind(
        "{ type: json_login, login: { url: 'https://api/api/Auth/loginKey', method: post, \
         headers: { X-App: me }, body: { userName: me, apiKey: '${env:SIDECAR_CFG_TEST_KEY}' }, \
         token_pointer: /token, expires_in_pointer: /expiresIn, success_pointer: /success, \
         error_pointer: /errorMessage }, \
         renew: { url: 'https://api/api/Auth/validate', token_pointer: /newToken } }",
    ) {
        ProviderKind::JsonLogin { login, renew } => {
            assert_eq!(login.method, http::Method::POST);
            assert_eq!(
                login.body.unwrap().expose()["apiKey"].as_str(),
                Some("api-key-value")
            );
            assert_eq!(renew.unwrap().token_pointer, "/newToken");
        }
        other => panic!("{other:?}"),
    }
    match kind("{ type: exec, command: [/bin/get-token, --json], env: { A: b } }") {
        ProviderKind::Exec {
            command, timeout, ..
        } => {
            assert_eq!(command.len(), 2);
            assert_eq!(timeout, Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        kind("{ type: file, path: /var/run/secrets/tokens/api-token }"),
        ProviderKind::File { .. }
    ));
    match kind(&format!(
        "{{ type: oauth2_client_credentials, {OAUTH}, client_auth: private_key_jwt, \
         private_key: \"-----BEGIN PRIVATE KEY-----\\nMIIB\\n-----END PRIVATE KEY-----\" }}"
    )) {
        ProviderKind::ClientCredentials { client, .. } => assert!(matches!(
            client.credential,
            ClientCredential::PrivateKeyJwt { .. }
        )),
        other => panic!("{other:?}"),
    }
}

#[test]
fn store_and_escalate_after_parse() {
    std::env::set_var("SIDECAR_CFG_TEST_STORE_KEY", "a passphrase");
    let c = parse(
        "{ type: static, token: t, refresh: { escalate_after: 5 }, \
         store: { path: /tmp/p.tok, key: '${env:SIDECAR_CFG_TEST_STORE_KEY}' } }",
    )
    .unwrap();
    let p = &c.providers["p"];
    assert_eq!(p.refresh.escalate_after, 5);
    let store = p.store.as_ref().unwrap();
    assert_eq!(store.key.expose(), "a passphrase");
    assert!(!c.redacted_yaml().contains("a passphrase"));
    let default = parse("{ type: static, token: t }").unwrap();
    assert_eq!(default.providers["p"].refresh.escalate_after, 3);
    assert!(default.providers["p"].store.is_none());
}

#[test]
fn keys_of_other_types_are_refused() {
    for (provider, needle) in [
        ("{ type: static, token: t, command: [x] }", "`command` does not apply to type static"),
        ("{ type: exec, command: [x], path: /a }", "`path` does not apply to type exec"),
        (
            "{ type: file, path: /a, token_url: 'https://x' }",
            "`token_url` does not apply to type file",
        ),
        (
            "{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c, client_secret: s, username: u }",
            "`username` does not apply to type oauth2_client_credentials",
        ),
        (
            "{ type: json_login, login: { url: 'https://x', token_pointer: /t, username: u } }",
            "login.username",
        ),
        (
            "{ type: oauth2_refresh_token, token_url: 'https://x', client_id: c, refresh_token: r, login: { type: oauth2_password, username: u, password: p, url: 'https://y' } }",
            "login.url",
        ),
    ] {
        let e = error(provider);
        assert!(e.contains(needle), "{provider}: {e}");
    }
}

#[test]
fn missing_and_malformed_settings_are_explained() {
    for (provider, needle) in [
        ("{ type: oauth2_refresh_token, token_url: 'https://x', client_id: c }", "needs `refresh_token`"),
        ("{ type: oauth2_password, token_url: 'https://x', client_id: c, username: u }", "needs `password`"),
        ("{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c }", "needs `client_secret` or `private_key`"),
        ("{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c, client_auth: private_key_jwt }", "needs `private_key`"),
        ("{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c, client_auth: private_key_jwt, private_key: nope }", "not a PEM private key"),
        ("{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c, client_secret: s, private_key: k }", "needs client_auth: private_key_jwt"),
        ("{ type: oauth2_refresh_token, token_url: 'https://x', client_id: c, refresh_token: r, login: { username: u } }", "login needs `type"),
        ("{ type: oauth2_refresh_token, token_url: 'https://x', client_id: c, refresh_token: r, login: { type: oauth2_client_credentials } }", "needs `client_secret` or `private_key`"),
        ("{ type: json_login, login: { url: 'https://x' } }", "needs `login.token_pointer`"),
        ("{ type: json_login, login: { url: 'ftp://x', token_pointer: /t } }", "http:// or https://"),
        ("{ type: json_login, login: { url: 'https://x', token_pointer: token } }", "not a JSON pointer"),
        ("{ type: json_login, login: { url: 'https://x', token_pointer: /t, method: 'BAD METHOD' } }", "not an HTTP method"),
        ("{ type: exec, command: [] }", "needs `command`"),
        ("{ type: exec, command: [x], timeout: 0s }", "more than 0"),
        ("{ type: file }", "needs `path`"),
        ("{ type: static, token: t, refresh: { escalate_after: 0 } }", "at least 1"),
        ("{ type: static, token: t, store: { path: /x } }", "missing field `key`"),
        ("{ type: static, token: t, store: { path: /x, key: '' } }", "store.key is empty"),
        ("{ type: static, token: t, store: { path: /x, key: k, cipher: aes } }", "unknown field `cipher`"),
        ("{ type: json_login, login: { url: 'https://x', token_pointer: /t, tokn_pointer: /t } }", "unknown field `tokn_pointer`"),
        ("{ type: static, token: t, bogus: 1 }", "unknown field `bogus`"),
    ] {
        let e = error(provider);
        assert!(e.contains(needle), "{provider}: {e}");
    }
}

#[test]
fn errors_never_show_secret_values() {
    for provider in [
        "{ type: json_login, login: { url: 'https://x', token_pointer: /t, headers: { X-Key: \"bad\\nSECRET\" } } }",
        "{ type: oauth2_client_credentials, token_url: 'https://x', client_id: c, client_auth: private_key_jwt, private_key: SECRET-not-pem }",
    ] {
        let e = error(provider);
        assert!(!e.contains("SECRET"), "{e}");
    }
}

#[test]
fn two_providers_cannot_share_a_store_file() {
    let e = Config::parse(
        "providers:\n  a: { type: static, token: t, store: { path: /x.tok, key: k } }\n  b: { type: static, token: t, store: { path: /x.tok, key: k } }\n",
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("each provider needs its own file"), "{e}");
}
