//! The admin API on `admin_listen`: health, readiness, token status and control, Prometheus
//! metrics; and the probe listener on `probe_listen`, which serves only `/healthz`, `/readyz` and
//! `/metrics`. Answers never contain a token. Who may use the mutating endpoints: see
//! [`crate::admin_auth`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use sidecar_token::{Status, Trigger};

use crate::admin_auth::{authorize, Access};
use crate::app::App;

/// The admin application.
pub struct Admin {
    app: Arc<App>,
    metrics: Option<PrometheusHandle>,
    probe_only: bool,
}

/// What the probe listener serves: for kubelet probes and Prometheus, nothing that changes state
/// or tells more than health.
const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl Admin {
    /// Serves `app`; `/metrics` renders `metrics` when given.
    pub fn new(app: Arc<App>, metrics: Option<PrometheusHandle>) -> Admin {
        Admin {
            app,
            metrics,
            probe_only: false,
        }
    }

    /// Serves only `GET /healthz`, `/readyz` and `/metrics` of `app`; everything else is 404.
    pub fn probes(app: Arc<App>, metrics: Option<PrometheusHandle>) -> Admin {
        Admin {
            app,
            metrics,
            probe_only: true,
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let body = value.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Vec<u8>> {
    json(
        status,
        serde_json::json!({ "error": code, "message": message }),
    )
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Admin {
    fn statuses(&self) -> Vec<Status> {
        let live = self.app.live.load();
        let mut all: Vec<Status> = live.providers.values().map(|s| s.status()).collect();
        all.sort_by(|a, b| a.provider.cmp(&b.provider));
        all
    }

    async fn token_action(
        &self,
        params: &HashMap<String, String>,
        ensure: bool,
    ) -> Response<Vec<u8>> {
        let live = self.app.live.load_full();
        let Some(name) = params.get("provider") else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "provider=NAME is required".into(),
            );
        };
        let Some(source) = live.providers.get(name) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("no provider named {name}"),
            );
        };
        let wait = live.config.replay.wait_for_token;
        if ensure {
            let min_ttl = match params
                .get("min_ttl")
                .map(|v| sidecar_config::parse_duration(v))
            {
                Some(Ok(d)) => d,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "min_ttl=DURATION is required".into(),
                    )
                }
            };
            return match source.ensure(min_ttl, wait).await {
                Ok(_) => json(
                    StatusCode::OK,
                    serde_json::to_value(source.status()).unwrap_or_default(),
                ),
                Err(e) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_unavailable",
                    e.to_string(),
                ),
            };
        }
        let stale = source.current().map(|t| t.generation);
        match tokio::time::timeout(
            wait.max(Duration::from_secs(1)),
            source.refresh(Trigger::Manual, stale),
        )
        .await
        {
            Ok(Ok(_)) => json(
                StatusCode::OK,
                serde_json::to_value(source.status()).unwrap_or_default(),
            ),
            Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, "refresh_failed", e.to_string()),
            Err(_) => error(
                StatusCode::GATEWAY_TIMEOUT,
                "refresh_timeout",
                "refresh did not finish in time".into(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let params = query(req.uri.query());
        if self.probe_only && !(method == Method::GET && PROBE_PATHS.contains(&path.as_str())) {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "the probe listener serves only GET {}",
                    PROBE_PATHS.join(", ")
                ),
            );
        }
        if method != Method::GET && method != Method::HEAD {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let token = self.app.live.load().config.admin_token.clone();
            let authorization = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            match authorize(peer, token.as_ref(), authorization) {
                Access::Allowed => {}
                Access::BadToken => {
                    return error(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "this endpoint needs Authorization: Bearer with the configured admin.token"
                            .into(),
                    )
                }
                Access::NotLoopback => {
                    return error(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "this endpoint answers only clients on loopback; configure admin.token \
                         to use it from elsewhere"
                            .into(),
                    )
                }
            }
        }
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (Method::GET, "/readyz") if self.app.is_draining() => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "shutting_down"}),
            ),
            (Method::GET, "/readyz") => {
                let not_ready: Vec<serde_json::Value> = self
                    .app
                    .live
                    .load()
                    .providers
                    .values()
                    .filter(|s| s.usable().is_none())
                    .map(|s| {
                        let st = s.status();
                        serde_json::json!({"provider": st.provider, "state": st.state, "last_error": st.last_error})
                    })
                    .collect();
                if not_ready.is_empty() {
                    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"status": "not_ready", "providers": not_ready}),
                    )
                }
            }
            (Method::GET, "/v1/token/status") => {
                let shared = self
                    .app
                    .live
                    .load()
                    .shared
                    .as_ref()
                    .map(|b| (b.state(), b.replicas_seen()));
                let mut body = serde_json::json!({ "providers": self.statuses() });
                if let Some((state, replicas)) = shared {
                    body["shared"] = state.into();
                    // The replicas at the last ping (kept while Redis is down): a shared rate
                    // limit is divided by it while Redis is down.
                    body["shared_replicas_seen"] = replicas.into();
                }
                json(StatusCode::OK, body)
            }
            (Method::POST, "/v1/token/refresh") => self.token_action(&params, false).await,
            (Method::POST, "/v1/token/ensure") => self.token_action(&params, true).await,
            (Method::POST, "/v1/reload") => {
                let app = self.app.clone();
                let Some(path) = app.live.load().config.source.clone() else {
                    return error(
                        StatusCode::CONFLICT,
                        "no_config_file",
                        "this sidecar was not started from a file".into(),
                    );
                };
                let done = tokio::task::spawn_blocking(move || app.reload(&path))
                    .await
                    .unwrap_or(false);
                if done {
                    json(StatusCode::OK, serde_json::json!({"status": "reloaded"}))
                } else {
                    error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_config",
                        "the file is invalid; the running configuration stays (see the log)".into(),
                    )
                }
            }
            (Method::GET, "/metrics") => {
                let body = self
                    .metrics
                    .as_ref()
                    .map(|m| crate::metrics::render(&self.app, m))
                    .unwrap_or_default()
                    .into_bytes();
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/plain; version=0.0.4")
                    .header("content-length", body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin endpoint {path}"),
            ),
        }
    }
}
