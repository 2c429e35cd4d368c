//! Tokens through the real sidecar: mock identity providers, provider YAML, the upstream's view
//! of what was injected, `/v1/token/status` and `/v1/token/refresh`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, Recorded, UpstreamConfig};

use super::{run_cli, Sidecar};

pub const HOUR: Duration = Duration::from_secs(3600);
/// Refresh settings that keep the tests quick and deterministic: no skew, no spacing between
/// refreshes (an `ensure` right after a refresh may refresh again), short backoff.
pub const REFRESH: &str = "refresh: { skew: 0s, min_interval: 0s, backoff: [200ms] }";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "pw-alice-5b0e71";

/// A throw-away key of the token crate's unit tests.
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../token/src/provider/testdata")
        .join(name)
}

/// The default mock IdP config plus the user `USER` with `PASSWORD`.
pub fn with_users() -> IdpConfig {
    IdpConfig {
        users: vec![(USER.to_owned(), PASSWORD.to_owned())],
        ..IdpConfig::default()
    }
}

/// A mock IdP (with `USER`) whose tokens live `ttl`.
pub async fn idp_ttl(ttl: Duration) -> MockIdp {
    MockIdp::start(IdpConfig {
        ttl,
        ..with_users()
    })
    .await
}

/// A client-credentials provider `name` (indented for a `providers:` map) on `idp`, with `extra`
/// as one more line of its settings (`REFRESH`, `scopes: [read]`, ...).
pub fn cc_provider(name: &str, idp: &MockIdp, extra: &str) -> String {
    format!(
        "  {name}:\n    type: oauth2_client_credentials\n    token_url: \"{}\"\n    client_id: demo-client\n    client_secret: demo-secret\n    {extra}\n",
        idp.token_url()
    )
}

/// GETs `path` through the sidecar, asserts 200 and returns what the upstream recorded for it,
/// whose token must be one the IdP issued and still valid.
pub async fn through(sc: &Sidecar, api: &MockUpstream, path: &str) -> Recorded {
    let r = reqwest::get(sc.url(path)).await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "GET {path}: {body}\n{}", sc.logs());
    let seen = api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the upstream never saw {path}"));
    assert_eq!(seen.status, 200);
    let token = seen.token.as_deref().expect("a token reached the upstream");
    let registry = api.registry().expect("a checking upstream");
    assert!(registry.is_valid(token), "{path}: token not valid");
    seen
}

pub fn token_of(r: &Recorded) -> String {
    r.token.clone().unwrap()
}

/// `POST /v1/token/refresh?provider=NAME`, which must succeed; returns the new status.
pub async fn force_refresh(sc: &Sidecar, provider: &str) -> serde_json::Value {
    let r = sc
        .admin_post(&format!("/v1/token/refresh?provider={provider}"))
        .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "refresh {provider}: {text}\n{}", sc.logs());
    serde_json::from_str(&text).unwrap()
}

/// The entry of one provider in a `/v1/token/status` answer.
pub fn provider_status<'a>(all: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    all["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["provider"] == name))
        .unwrap_or_else(|| panic!("no provider {name} in {all}"))
}

/// Waits until every named provider has a token (its first one, or one from the store).
pub async fn wait_tokens(sc: &Sidecar, names: &[&str]) -> serde_json::Value {
    sc.wait_status(Duration::from_secs(15), |v| {
        names
            .iter()
            .all(|n| provider_status(v, n)["state"] == "valid")
    })
    .await
}

/// A fresh store key from `token-sidecar keygen`.
pub fn keygen() -> String {
    let (code, out, err) = run_cli(&["keygen"], &[]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_owned()
}

/// The sidecar still answers `/healthz` and nothing in it panicked.
pub async fn healthy(sc: &Sidecar) {
    let r = reqwest::get(sc.admin_url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let logs = sc.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// A mock IdP with hour-long tokens, an upstream that accepts only its tokens, and a sidecar with
/// provider `main` in front of it as upstream `api`, plus `extra` YAML; the first token is held.
pub async fn token_stack(extra: &str) -> (MockIdp, MockUpstream, Sidecar) {
    let idp = MockIdp::start(IdpConfig {
        ttl: HOUR,
        ..IdpConfig::default()
    })
    .await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n{extra}",
        cc_provider("main", &idp, ""),
        api.url()
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;
    (idp, api, sc)
}
