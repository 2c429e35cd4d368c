//! `json_login`: a non-standard JSON login endpoint (`POST /api/Auth/loginKey` →
//! `{"success":true,"token":"..."}`), and an optional renew call that trades the current token
//! for a new one (`POST /api/Auth/validate` → `{"newToken":"..."}`).

use futures::future::BoxFuture;
use sidecar_config::JsonCall;

use super::http::{answer, network_error};
use super::lifetime::{seconds, until};
use super::redact::Redactor;
use super::{Fetched, Held, Provider, ProviderError};

/// Where an error text is looked for when no `error_pointer` is configured.
const ERROR_POINTERS: [&str; 4] = ["/errorMessage", "/error_description", "/error", "/message"];

pub(super) struct JsonLogin {
    http: reqwest::Client,
    login: JsonCall,
    renew: Option<JsonCall>,
    /// Body and header values in every encoding, scrubbed from messages.
    redactor: Redactor,
}

impl JsonLogin {
    pub(super) fn new(
        http: reqwest::Client,
        login: JsonCall,
        renew: Option<JsonCall>,
    ) -> JsonLogin {
        let mut secrets = Vec::new();
        for call in std::iter::once(&login).chain(renew.as_ref()) {
            secrets.extend(call.headers.iter().map(|(_, v)| v.expose().to_string()));
            if let Some(body) = &call.body {
                collect_strings(body.expose(), &mut secrets);
            }
        }
        let mut redactor = Redactor::default();
        for s in &secrets {
            redactor.secret(s);
        }
        JsonLogin {
            http,
            login,
            renew,
            redactor,
        }
    }

    async fn call(&self, call: &JsonCall, bearer: Option<&str>) -> Result<Fetched, ProviderError> {
        let mut req = self
            .http
            .request(call.method.clone(), &call.url)
            .header("accept", "application/json");
        for (name, value) in &call.headers {
            req = req.header(name, value.expose());
        }
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        if let Some(body) = &call.body {
            let json = serde_json::to_value(body.expose()).map_err(|_| {
                ProviderError::Setup("the login body is not representable as JSON".into())
            })?;
            req = req.json(&json);
        }
        let mut redactor = self.redactor.clone();
        if let Some(token) = bearer {
            redactor.secret(token);
        }
        let resp = req.send().await.map_err(network_error)?;
        let (status, bytes) = answer(resp, &redactor).await?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        let message = |json: &serde_json::Value| {
            let found = match &call.error_pointer {
                Some(p) => json.pointer(p).and_then(text),
                None => ERROR_POINTERS
                    .iter()
                    .find_map(|p| json.pointer(p).and_then(text)),
            };
            found.map(|m| redactor.clean(&m))
        };
        if !status.is_success() {
            return Err(ProviderError::Rejected {
                status: status.as_u16(),
                message: json
                    .as_ref()
                    .and_then(message)
                    .unwrap_or_else(|| "no error message in the answer".into()),
            });
        }
        let json = json.ok_or_else(|| ProviderError::Malformed("answer is not JSON".into()))?;
        if let Some(p) = &call.success_pointer {
            let ok = match json.pointer(p) {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
                Some(serde_json::Value::Number(n)) => n.as_f64() != Some(0.0),
                _ => false,
            };
            if !ok {
                return Err(ProviderError::Rejected {
                    status: status.as_u16(),
                    message: message(&json).unwrap_or_else(|| format!("{p} is not true")),
                });
            }
        }
        let token = json
            .pointer(&call.token_pointer)
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(match message(&json) {
                Some(m) => ProviderError::Rejected {
                    status: status.as_u16(),
                    message: m,
                },
                None => ProviderError::Malformed(format!(
                    "answer has no token at {}",
                    call.token_pointer
                )),
            });
        };
        let mut expires_in = None;
        if let Some((p, v)) = pointed(&json, call.expires_in_pointer.as_deref()) {
            expires_in = seconds(v, &format!("the expiry at {p}"))?;
        }
        if expires_in.is_none() {
            if let Some((p, v)) = pointed(&json, call.expires_at_pointer.as_deref()) {
                expires_in = until(v, &format!("the expiry at {p}"))?;
            }
        }
        Ok(Fetched::token(token.to_string(), expires_in))
    }
}

impl Provider for JsonLogin {
    fn fetch<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            if let (Some(renew), Some(current)) = (&self.renew, &held.access_token) {
                match self.call(renew, Some(current)).await {
                    Ok(fetched) => return Ok(fetched),
                    Err(e) => tracing::warn!(error = %e, "token renew failed; logging in again"),
                }
            }
            self.call(&self.login, None).await
        })
    }
}

/// The value a configured pointer points at, with the pointer.
fn pointed<'a, 'p>(
    json: &'a serde_json::Value,
    pointer: Option<&'p str>,
) -> Option<(&'p str, &'a serde_json::Value)> {
    let p = pointer?;
    json.pointer(p).map(|v| (p, v))
}

fn text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::String(_) => None,
        other => Some(other.to_string()),
    }
}

fn collect_strings(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::String(s) => out.push(s.clone()),
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| collect_strings(i, out)),
        serde_yaml::Value::Mapping(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}
