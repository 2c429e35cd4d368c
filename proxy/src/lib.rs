#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
//! token-sidecar's process: the Pingora proxy service that injects tokens, the admin API, the
//! command line, logging, shutdown, and the `demo` command.
//!
//! Decisions live in `sidecar-filters`; this crate only wires them to Pingora's hooks.

mod access_log;
pub mod admin;
pub mod admin_auth;
pub mod app;
pub mod cli;
pub mod connection;
pub mod ctx;
pub mod demo;
pub mod dns;
pub mod errors;
pub mod histogram;
pub mod inflight;
mod log_json;
mod log_throttle;
pub mod logging;
pub mod metrics;
mod outgoing;
mod peer_tls;
mod replay;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod streams;
mod unix;
mod waiting;
pub mod watch;
