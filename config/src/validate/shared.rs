//! `shared:` (replicas sharing one account through Redis): the URL's shape, checked offline, and
//! which providers and rate limits take part.

use crate::schema::{ProviderType, RawConfig, RawShared};
use crate::{Provider, RateLimit, Shared};

/// The longest key prefix: keys are built from it on every shared call.
const MAX_PREFIX: usize = 256;

/// Validates `shared:` without connecting to anything: the URL must be `redis://` or
/// `rediss://` with a host (and a numeric database, if any).
pub(super) fn shared(raw: &RawShared) -> Result<Shared, (&'static str, String)> {
    let url = raw.redis.url.expose();
    // A URL that does not parse is never echoed: where its password ends is anyone's guess.
    let parsed =
        url::Url::parse(url).map_err(|e| ("url", format!("shared.redis.url is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err((
            "url",
            "shared.redis.url must be redis://host[:port][/db] or rediss://...".into(),
        ));
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err(("url", "shared.redis.url has no host".into()));
    };
    let credentials = !parsed.username().is_empty() || parsed.password().is_some();
    let shown = format!(
        "{}://{}{host}{}{}",
        parsed.scheme(),
        if credentials { "<redacted>@" } else { "" },
        parsed.port().map(|p| format!(":{p}")).unwrap_or_default(),
        parsed.path()
    );
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err((
            "url",
            format!("shared.redis.url {shown:?}: the path must be a database number, like /0"),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err((
            "url",
            format!("shared.redis.url {shown:?} takes no query or fragment"),
        ));
    }
    let prefix = &raw.redis.key_prefix;
    if prefix.is_empty() || prefix.len() > MAX_PREFIX || prefix.chars().any(char::is_control) {
        return Err((
            "key_prefix",
            format!("shared.redis.key_prefix must be 1 to {MAX_PREFIX} printable characters"),
        ));
    }
    if raw.redis.timeout.0.is_zero() {
        return Err(("timeout", "shared.redis.timeout must be more than 0".into()));
    }
    if raw.redis.lease.0 < std::time::Duration::from_millis(100) {
        return Err(("lease", "shared.redis.lease must be at least 100ms".into()));
    }
    Ok(Shared {
        url: raw.redis.url.clone(),
        shown_url: shown,
        key_prefix: prefix.clone(),
        on_redis_down: raw.on_redis_down,
        plaintext_tokens: raw.redis.plaintext_tokens,
        timeout: raw.redis.timeout.0,
        lease: raw.redis.lease.0,
    })
}

/// Whether a provider takes part: `shared:` set and the provider did not opt out. `static` and
/// `file` providers call no identity provider, so there is nothing to coordinate. A shared
/// provider needs a store key to encrypt its tokens in Redis, unless plain text is allowed.
pub(super) fn provider_shared(
    raw: &RawConfig,
    shared: Option<&Shared>,
    p: &Provider,
) -> Result<bool, String> {
    let name = &p.name;
    let asked = raw.providers.get(name).and_then(|r| r.shared);
    let local = raw
        .providers
        .get(name)
        .is_some_and(|r| matches!(r.kind, ProviderType::Static | ProviderType::File));
    let Some(shared) = shared else {
        if asked == Some(true) {
            return Err(format!(
                "provider {name:?}: shared: true needs a top-level shared: section (shared.redis.url)"
            ));
        }
        return Ok(false);
    };
    if local {
        if asked == Some(true) {
            return Err(format!(
                "provider {name:?}: a static or file provider calls no identity provider; there is nothing to share"
            ));
        }
        return Ok(false);
    }
    let on = asked.unwrap_or(true);
    if on && p.store.is_none() && !shared.plaintext_tokens {
        return Err(format!(
            "provider {name:?} is shared through Redis but has no store.key to encrypt its tokens there; \
             set store: {{ path, key }}, or shared: false on the provider, or shared.redis.plaintext_tokens: true"
        ));
    }
    Ok(on)
}

/// Whether a rate limit is held across replicas. Keyed limits (per client) stay local.
pub(super) fn rate_limit_shared(
    asked: Option<bool>,
    shared: Option<&Shared>,
    l: &RateLimit,
) -> Result<bool, String> {
    let name = &l.name;
    match (shared, asked) {
        (None, Some(true)) => Err(format!(
            "rate limit {name:?}: shared: true needs a top-level shared: section (shared.redis.url)"
        )),
        (None, _) => Ok(false),
        (Some(_), Some(true)) if l.key.is_some() => Err(format!(
            "rate limit {name:?}: a keyed (per-client) limit cannot be shared; set shared: false"
        )),
        (Some(_), asked) => Ok(asked.unwrap_or(l.key.is_none())),
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, OnRedisDown};
    use proptest::prelude::*;

    const CC: &str = r#"
  main:
    type: oauth2_client_credentials
    token_url: "http://127.0.0.1:1/token"
    client_id: c
    client_secret: s
"#;

    fn parse(shared: &str, providers: &str, extra: &str) -> Result<Config, String> {
        let text = format!(
            "{shared}providers:{providers}upstreams:\n  - {{ name: api, url: \"http://127.0.0.1:1\", provider: main }}\n{extra}"
        );
        Config::parse(&text, "s.yaml").map_err(|e| e.to_string())
    }

    const SHARED: &str = "shared:\n  redis:\n    url: \"redis://:${env:SIDECAR_TEST_REDIS_PW}@127.0.0.1:6379/0\"\n    plaintext_tokens: true\n";

    #[test]
    fn without_shared_nothing_is_shared() {
        let c = parse(
            "",
            CC,
            "rate_limits:\n  - { name: r, upstream: api, rate: 5/1s }\n",
        )
        .unwrap();
        assert!(c.shared.is_none());
        assert!(!c.providers["main"].shared);
        assert!(!c.rate_limits[0].shared);
    }

    #[test]
    fn shared_defaults_on_and_hides_the_password() {
        std::env::set_var("SIDECAR_TEST_REDIS_PW", "hunter2-redis");
        let c = parse(
            SHARED,
            CC,
            "rate_limits:\n  - { name: r, upstream: api, rate: 5/1s }\n  - { name: k, upstream: api, rate: 5/1s, key: { client_ip: true } }\n",
        )
        .unwrap();
        let s = c.shared.as_ref().unwrap();
        assert_eq!(s.key_prefix, "token-sidecar");
        assert_eq!(s.on_redis_down, OnRedisDown::Local);
        assert_eq!(s.url.expose(), "redis://:hunter2-redis@127.0.0.1:6379/0");
        assert!(!s.shown_url.contains("hunter2"), "{}", s.shown_url);
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!c.redacted_yaml().contains("hunter2"));
        assert!(c.providers["main"].shared);
        assert!(c.rate_limits[0].shared);
        assert!(!c.rate_limits[1].shared, "keyed limits stay local");
    }

    #[test]
    fn opting_out_and_fail_closed() {
        let c = parse(
            "shared:\n  redis: { url: \"redis://127.0.0.1:1\", key_prefix: app1 }\n  on_redis_down: fail_closed\n",
            &format!("{CC}    shared: false\n"),
            "",
        )
        .unwrap();
        assert!(!c.providers["main"].shared);
        let s = c.shared.unwrap();
        assert_eq!(s.on_redis_down, OnRedisDown::FailClosed);
        assert_eq!(s.key_prefix, "app1");
    }

    #[test]
    fn a_shared_provider_needs_a_store_key_or_explicit_plaintext() {
        let e = parse(
            "shared:\n  redis: { url: \"redis://127.0.0.1:1\" }\n",
            CC,
            "",
        )
        .unwrap_err();
        assert!(e.starts_with("s.yaml:"), "{e}");
        assert!(
            e.contains("store.key") && e.contains("plaintext_tokens"),
            "{e}"
        );
        let with_store = format!("{CC}    store: {{ path: /tmp/x.tok, key: k }}\n");
        let c = parse(
            "shared:\n  redis: { url: \"redis://127.0.0.1:1\" }\n",
            &with_store,
            "",
        )
        .unwrap();
        assert!(c.providers["main"].shared);
    }

    #[test]
    fn shared_true_without_a_shared_section_is_an_error() {
        let e = parse("", &format!("{CC}    shared: true\n"), "").unwrap_err();
        assert!(e.contains("top-level shared"), "{e}");
        let e = parse(
            "",
            CC,
            "rate_limits:\n  - { name: r, upstream: api, rate: 5/1s, shared: true }\n",
        )
        .unwrap_err();
        assert!(e.contains("top-level shared"), "{e}");
    }

    #[test]
    fn bad_urls_are_located_and_redacted() {
        std::env::set_var("SIDECAR_TEST_REDIS_PW2", "sekrit-pw");
        for (url, why) in [
            ("http://127.0.0.1:6379", "redis://host"),
            (
                "redis://:${env:SIDECAR_TEST_REDIS_PW2}@127.0.0.1:6379/db",
                "database number",
            ),
            ("redis://", "no host"),
            ("not a url ${env:SIDECAR_TEST_REDIS_PW2}", "not a URL"),
            ("redis://127.0.0.1:6379/0?x=1", "no query"),
        ] {
            let e = parse(
                &format!("shared:\n  redis:\n    url: \"{url}\"\n    plaintext_tokens: true\n"),
                CC,
                "",
            )
            .unwrap_err();
            assert!(e.starts_with("s.yaml:3:5:"), "{url}: {e}");
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("sekrit-pw"), "{e}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever the URL, validation answers (no panic) and never repeats a password.
        #[test]
        fn any_url_never_panics_nor_leaks_its_password(url in "(redis|rediss|http)?(://)?(:[a-z]{0,5}PWSECRET@)?[a-z0-9.:/?#@\\[\\]%-]{0,30}") {
            let raw = crate::schema::RawShared {
                redis: crate::schema::RawRedis {
                    url: crate::Secret::new(url.clone()),
                    key_prefix: "p".into(),
                    plaintext_tokens: false,
                    timeout: crate::values::Dur(std::time::Duration::from_millis(1)),
                    lease: crate::values::Dur(std::time::Duration::from_secs(1)),
                },
                on_redis_down: OnRedisDown::Local,
            };
            match super::shared(&raw) {
                Ok(s) => prop_assert!(!s.shown_url.contains("PWSECRET"), "{}", s.shown_url),
                Err((_, m)) => prop_assert!(!m.contains("PWSECRET"), "{}", m),
            }
        }
    }
}
