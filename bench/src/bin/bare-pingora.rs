#![forbid(unsafe_code)]
//! A bare Pingora reverse proxy for the benchmark: it forwards every request to one upstream and
//! adds a static `Authorization` header, nothing else. It runs with the same `ServerConf`, the
//! same peer options, the same (no) downstream modules and the same global allocator as
//! token-sidecar (proxy/src/cli.rs `serve_with()`, proxy/src/app.rs `peer_for()`,
//! proxy/src/service.rs `init_downstream_modules`, proxy/src/main.rs), so the difference between
//! the two is the cost of the sidecar's own logic.
//!
//! Usage: `bare-pingora LISTEN UPSTREAM AUTHORIZATION`, e.g.
//! `bare-pingora 127.0.0.1:7001 127.0.0.1:7000 "Bearer tok_..."`.
//!
//! `BARE_PINGORA_THREADS=N` sets the proxy service's threads (the sidecar's `threads:`; the
//! 2-thread row of the throughput scenario uses it). For experiments,
//! `BARE_PINGORA_WORK_STEALING=true|false`, `BARE_PINGORA_POOL=N` and
//! `BARE_PINGORA_READ_BUFFER=BYTES` override `ServerConf::work_stealing`,
//! `upstream_keepalive_pool_size` and the listener's read buffer (0, the sidecar's default
//! `downstream.read_buffer`); built with `--no-default-features` it allocates with glibc malloc
//! instead of mimalloc.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use http::header::AUTHORIZATION;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, ProxyServiceBuilder, Session};
use pingora::server::configuration::ServerConf;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    peer: HttpPeer,
    authorization: HeaderValue,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    /// Like the sidecar: no downstream modules (Pingora's default, a compression module at
    /// level 0, compresses nothing and costs every request).
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header(AUTHORIZATION, self.authorization.clone())
    }
}

fn knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(parsed) => {
            eprintln!("bare-pingora: {name}={v}");
            Some(parsed)
        }
        Err(_) => {
            eprintln!("bare-pingora: ignoring {name}={v}: not a valid value");
            None
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, authorization] = args.as_slice() else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM AUTHORIZATION");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("bare-pingora: UPSTREAM must be an IP:port");
        std::process::exit(2);
    };
    let Ok(authorization) = HeaderValue::from_str(authorization) else {
        eprintln!("bare-pingora: AUTHORIZATION is not a valid header value");
        std::process::exit(2);
    };
    // The sidecar's defaults for an upstream: connect 5 s, read 60 s, idle 90 s.
    let mut peer = HttpPeer::new(upstream, false, String::new());
    let o = &mut peer.options;
    o.connection_timeout = Some(Duration::from_secs(5));
    o.total_connection_timeout = Some(Duration::from_secs(5));
    o.read_timeout = Some(Duration::from_secs(60));
    o.write_timeout = Some(Duration::from_secs(60));
    o.idle_timeout = Some(Duration::from_secs(90));

    // The same ServerConf as token-sidecar's serve_with().
    let mut conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: token_sidecar::cli::UPSTREAM_POOL,
        ..ServerConf::default()
    };
    if let Some(v) = knob("BARE_PINGORA_WORK_STEALING") {
        conf.work_stealing = v;
    }
    if let Some(v) = knob("BARE_PINGORA_POOL") {
        conf.upstream_keepalive_pool_size = v;
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = ProxyServiceBuilder::new(
        &server.configuration,
        Bare {
            peer,
            authorization,
        },
    )
    .name("bare-pingora")
    .build();
    let read_buffer = knob("BARE_PINGORA_READ_BUFFER").unwrap_or(0);
    proxy.add_listener(
        ListenerConfig::tcp(listen).l4_buffer(L4BufferSettings::default().read(read_buffer)),
    );
    proxy.threads = Some(knob("BARE_PINGORA_THREADS").unwrap_or(1));
    server.add_service(proxy);
    server.run_forever();
}
