#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Per-request decisions of token-sidecar as plain functions over a small request view: which
//! route, whether the target is allowed, what to do with a client's own credentials, where the
//! token goes. No sockets, no Pingora types: `proxy/` calls these and acts on the answers.

mod authz;
mod inject;
mod route;

pub use authz::{client_authorization, AuthzDecision};
pub use inject::{query_with_token, redact_query};
pub use route::{RequestView, Route, Routes};
