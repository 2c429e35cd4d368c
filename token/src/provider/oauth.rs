//! OAuth2 token-endpoint grants (RFC 6749): client credentials (§4.4), resource-owner password
//! (§4.3) and refresh token (§6), with client authentication by `client_secret_basic`,
//! `client_secret_post` or `private_key_jwt` (RFC 7523).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use sidecar_config::{ClientCredential, LoginFallback, OAuthClient, Secret};

use super::http::{answer, network_error};
use super::lifetime::seconds;
use super::redact::{error_message, form_encode, Redactor};
use super::{AssertionSigner, Fetched, Held, Provider, ProviderError};

/// How a client authenticates, ready to use.
enum Auth {
    None,
    Basic(Secret),
    Post(Secret),
    /// The signer, or why the configured key cannot sign.
    Jwt(Box<Result<AssertionSigner, String>>),
}

/// The grant a provider logs in with when it holds no usable refresh token.
enum Login {
    ClientCredentials,
    Password {
        username: String,
        password: Secret,
    },
    /// `oauth2_refresh_token` without a fallback: the configured refresh token is all there is.
    None,
}

/// One OAuth2 provider. The refresh token it uses comes from [`Held`]; the configured initial
/// one (type `oauth2_refresh_token`) is used while nothing newer is held and it has not been
/// refused.
pub(super) struct OAuth {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    auth: Auth,
    scope: Option<String>,
    params: BTreeMap<String, String>,
    login: Login,
    /// Whether refresh-token grants are used at all (not for client credentials).
    refreshes: bool,
    initial_refresh_token: Option<Secret>,
    /// The configured refresh token was refused; never send it again (reuse of a rotated
    /// refresh token makes some IdPs revoke the whole family).
    initial_refused: AtomicBool,
    /// The configured secrets, in every encoding, for messages the IdP writes.
    redactor: Redactor,
}

impl OAuth {
    fn base(
        http: reqwest::Client,
        client: &OAuthClient,
        scopes: &[String],
        params: &BTreeMap<String, String>,
        login: Login,
    ) -> OAuth {
        let auth = match &client.credential {
            ClientCredential::None => Auth::None,
            ClientCredential::SecretBasic(s) => Auth::Basic(s.clone()),
            ClientCredential::SecretPost(s) => Auth::Post(s.clone()),
            ClientCredential::PrivateKeyJwt { key, key_id } => Auth::Jwt(Box::new(
                AssertionSigner::from_pem(key.expose(), key_id.clone()),
            )),
        };
        OAuth {
            http,
            token_url: client.token_url.clone(),
            client_id: client.client_id.clone(),
            auth,
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            params: params.clone(),
            login,
            refreshes: false,
            initial_refresh_token: None,
            initial_refused: AtomicBool::new(false),
            redactor: Redactor::default(),
        }
        .with_redactor()
    }

    /// Collects every configured secret into the redactor.
    fn with_redactor(mut self) -> OAuth {
        let mut r = Redactor::default();
        match &self.auth {
            Auth::Basic(s) | Auth::Post(s) => {
                r.basic(&self.client_id, s.expose());
            }
            Auth::None | Auth::Jwt(_) => {}
        }
        if let Login::Password { password, .. } = &self.login {
            r.secret(password.expose());
        }
        if let Some(rt) = &self.initial_refresh_token {
            r.secret(rt.expose());
        }
        self.redactor = r;
        self
    }

    pub(super) fn client_credentials(
        http: reqwest::Client,
        client: &OAuthClient,
        scopes: &[String],
        params: &BTreeMap<String, String>,
    ) -> OAuth {
        OAuth::base(http, client, scopes, params, Login::ClientCredentials)
    }

    pub(super) fn password(
        http: reqwest::Client,
        client: &OAuthClient,
        username: &str,
        password: &Secret,
        scopes: &[String],
        params: &BTreeMap<String, String>,
    ) -> OAuth {
        let login = Login::Password {
            username: username.to_string(),
            password: password.clone(),
        };
        OAuth {
            refreshes: true,
            ..OAuth::base(http, client, scopes, params, login)
        }
    }

    pub(super) fn refresh_token(
        http: reqwest::Client,
        client: &OAuthClient,
        refresh_token: &Secret,
        scopes: &[String],
        params: &BTreeMap<String, String>,
        fallback: Option<LoginFallback>,
    ) -> OAuth {
        let login = match fallback {
            None => Login::None,
            Some(LoginFallback::ClientCredentials) => Login::ClientCredentials,
            Some(LoginFallback::Password { username, password }) => {
                Login::Password { username, password }
            }
        };
        OAuth {
            refreshes: true,
            initial_refresh_token: Some(refresh_token.clone()),
            ..OAuth::base(http, client, scopes, params, login)
        }
        .with_redactor()
    }

    /// The refresh token to try: the held one, else the configured one unless it was refused.
    fn refresh_token_to_use(&self, held: &Held) -> Option<(String, bool)> {
        if !self.refreshes {
            return None;
        }
        if let Some(rt) = &held.refresh_token {
            return Some((rt.clone(), false));
        }
        if self.initial_refused.load(Ordering::SeqCst) {
            return None;
        }
        self.initial_refresh_token
            .as_ref()
            .map(|s| (s.expose().to_string(), true))
    }

    async fn grant(
        &self,
        mut form: Vec<(&str, String)>,
        in_flight_secrets: &[&str],
    ) -> Result<Fetched, ProviderError> {
        if let Some(scope) = &self.scope {
            form.push(("scope", scope.clone()));
        }
        for (k, v) in &self.params {
            form.push((k, v.clone()));
        }
        let mut req = self.http.post(&self.token_url);
        // What this request carries that the configuration does not: scrubbed too.
        let mut redactor = self.redactor.clone();
        for s in in_flight_secrets {
            redactor.secret(s);
        }
        match &self.auth {
            Auth::None => form.push(("client_id", self.client_id.clone())),
            Auth::Basic(secret) => {
                // RFC 6749 §2.3.1: both parts are form-encoded before Basic encoding.
                let id = form_encode(&self.client_id);
                let secret = form_encode(secret.expose());
                req = req.basic_auth(id, Some(secret));
            }
            Auth::Post(secret) => {
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_secret", secret.expose().to_string()));
            }
            Auth::Jwt(signer) => {
                let signer = (**signer)
                    .as_ref()
                    .map_err(|e| ProviderError::Setup(e.clone()))?;
                let assertion = signer
                    .sign(&self.client_id, &self.token_url)
                    .map_err(ProviderError::Setup)?;
                form.push(("client_id", self.client_id.clone()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                redactor.secret(&assertion);
                form.push(("client_assertion", assertion));
            }
        }
        let body = serde_urlencoded::to_string(&form)
            .map_err(|_| ProviderError::Malformed("cannot encode the token request".into()))?;
        let resp = req
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(network_error)?;
        token_response(resp, &redactor).await
    }

    async fn login(&self) -> Result<Fetched, ProviderError> {
        match &self.login {
            Login::ClientCredentials => {
                self.grant(vec![("grant_type", "client_credentials".into())], &[])
                    .await
            }
            Login::Password { username, password } => {
                self.grant(
                    vec![
                        ("grant_type", "password".into()),
                        ("username", username.clone()),
                        ("password", password.expose().to_string()),
                    ],
                    &[],
                )
                .await
            }
            Login::None => Err(ProviderError::Setup(
                "the refresh token was refused and no `login` fallback is configured; \
                 configure a new refresh_token (and delete the store file if one is used)"
                    .into(),
            )),
        }
    }
}

impl Provider for OAuth {
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let Some((rt, initial)) = self.refresh_token_to_use(held) else {
                return self.login().await;
            };
            let refreshed = self
                .grant(
                    vec![
                        ("grant_type", "refresh_token".into()),
                        ("refresh_token", rt.clone()),
                    ],
                    &[&rt],
                )
                .await;
            match refreshed {
                Ok(mut fetched) => {
                    // RFC 6749 §6: without a new refresh token the old one stays valid.
                    fetched.refresh_token.get_or_insert(rt);
                    Ok(fetched)
                }
                Err(e) if e.is_invalid_grant() => {
                    if initial {
                        self.initial_refused.store(true, Ordering::SeqCst);
                    }
                    match self.login {
                        Login::None => Err(e),
                        _ => {
                            tracing::warn!(error = %e, "refresh token refused; logging in again");
                            self.login().await
                        }
                    }
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// Reads an OAuth2 token answer: `access_token`, `expires_in` and `refresh_token` on success,
/// `error` and `error_description` otherwise. Nothing else of the answer reaches a message, and
/// `redactor` cleans what does. A redirect is refused, a body over 1 MiB is not read.
async fn token_response(
    resp: reqwest::Response,
    redactor: &Redactor,
) -> Result<Fetched, ProviderError> {
    let (status, bytes) = answer(resp, redactor).await?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if !status.is_success() {
        return Err(ProviderError::Rejected {
            status: status.as_u16(),
            message: json
                .as_ref()
                .and_then(|j| error_message(j, redactor))
                .unwrap_or_else(|| "no OAuth2 error in the answer".into()),
        });
    }
    let json = json.ok_or_else(|| ProviderError::Malformed("answer is not JSON".into()))?;
    let access_token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ProviderError::Malformed("answer has no access_token".into()))?
        .to_string();
    let expires_in = match json.get("expires_in") {
        Some(v) => seconds(v, "expires_in")?,
        None => None,
    };
    let refresh_token = json
        .get("refresh_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    Ok(Fetched {
        access_token,
        expires_in,
        refresh_token,
    })
}
