#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! Mock servers for exercising token-sidecar without real infrastructure.
//!
//! * [`MockIdp`] is an OAuth2 token endpoint (`client_credentials` grant).
//! * [`MockUpstream`] is an API that only accepts tokens the IdP issued; with
//!   [`MockUpstream::start_tls`] it serves HTTP/2 (and HTTP/1.1) over TLS.
//! * [`StreamUpstream`] serves Server-Sent Events with chosen pauses and a WebSocket echo
//!   that records the time left on the token it was opened with.
//! * [`SignalRHub`] is a SignalR hub (negotiate, JSON hub protocol over WebSockets, SSE and
//!   long polling) that closes connections when their token expires.
//! * [`TokenRegistry`] is the shared memory of issued tokens that links the two,
//!   so tests can expire or revoke credentials from the outside.
//!
//! Every server binds an ephemeral port on `127.0.0.1`, runs on a task spawned
//! onto the tokio runtime that started it and stops when its handle is dropped
//! or `shutdown()` is called. These mocks are used by the integration tests and
//! by `token-sidecar demo`.

pub mod idp;
mod ports;
mod registry;
mod server;
pub mod signalr;
pub mod streams;
pub mod tls;
pub mod upstream;
mod util;

#[cfg(test)]
mod tests;

pub use idp::{Catcher, Failure, Hostile, IdpConfig, IdpRequest, MockIdp};
pub use ports::free_port;
pub use registry::TokenRegistry;
pub use signalr::{HubStats, SignalRHub};
pub use streams::StreamUpstream;
pub use tls::{unrelated_ca_pem, ClientAuth, TlsMaterial};
pub use upstream::{MockUpstream, Recorded, Scripted, UpstreamConfig};
