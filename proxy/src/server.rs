//! Serving: the Pingora server with the proxy and admin services over one [`App`], until a
//! signal stops it. Used by `run` and by `demo`.

use std::sync::Arc;

use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;
use sidecar_config::{Config, Listen};
use std::os::unix::fs::PermissionsExt;

use crate::admin::Admin;
use crate::app::App;
use crate::connection::Limited;
use crate::service::Sidecar;
use crate::shutdown::Signals;

/// Idle upstream connections kept for reuse (Pingora's default is 128). An application that
/// sends a burst of a thousand requests would otherwise open most of them afresh next time:
/// measured on a 1,000-request burst, the connects were most of the sidecar's cost
/// (bench/PROFILE.md §7).
pub const UPSTREAM_POOL: usize = 1024;

/// Pingora's listener hand-over (SIGQUIT to the old process, `--upgrade` on the new one).
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// Take the sockets over from the running process.
    pub upgrade: bool,
    /// The hand-over socket.
    pub upgrade_sock: String,
}

/// Serves `config` until a signal stops it; returns the exit code. `on_ready` runs once the
/// state is built (the demo uses it to start its scripted client).
pub fn serve(config: Config, on_ready: Option<Box<dyn FnOnce(Arc<App>) + Send>>) -> i32 {
    let upgrade = Upgrade {
        upgrade: false,
        upgrade_sock: format!("/tmp/token-sidecar-upgrade-{}.sock", std::process::id()),
    };
    serve_with(config, on_ready, upgrade)
}

/// [`serve`] with upgrade settings.
pub fn serve_with(
    config: Config,
    on_ready: Option<Box<dyn FnOnce(Arc<App>) + Send>>,
    upgrade: Upgrade,
) -> i32 {
    crate::logging::init(&config.log);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let metrics = crate::metrics::recorder();
    let token_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("token-refresh")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the token runtime: {e}");
            return 1;
        }
    };
    if let Some(handle) = metrics.clone() {
        // The recorder is rendered by the admin server, not installed: its upkeep (draining
        // histogram buffers) would otherwise only run when /metrics is scraped.
        token_rt.spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        });
    }
    let listen = config.listen.clone();
    let threads = config.threads;
    let read_buffer = config.downstream.read_buffer;
    let admin_listen = config.admin_listen.to_string();
    let probe_listen = config.probe_listen.map(|a| a.to_string());
    let source = config.source.clone();
    let app = match App::new(config, token_rt.handle().clone()) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };

    let conf = ServerConf {
        // Pingora's default for services that set none (the admin API): the proxy sets its own.
        threads: 1,
        // One current-thread runtime per thread: measured 24-36 % less CPU per request than
        // Pingora's work-stealing runtime here (bench/PROFILE.md).
        work_stealing: false,
        // Grace is handled by our own SIGTERM drain (Pingora would sleep its full grace period
        // even when idle).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: UPSTREAM_POOL,
        upgrade_sock: upgrade.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: upgrade.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    // CONNECT reaches request_filter, which refuses it with a JSON 403 `forbidden_target`
    // (Pingora's own refusal is a bare 405).
    let mut options = HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    // HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on `listen`: gRPC clients speak it.
    options.h2c = true;
    // HTTP/2 connections (h2c) idle out on Pingora's own timer, read once here; the HTTP/1
    // limits follow reloads (see `connection`).
    options.h2_idle_timeout = Some(app.live.load().config.downstream.idle_timeout);
    let mut proxy = http_proxy(&server.configuration, Sidecar::new(app.clone()));
    proxy.server_options = Some(options);
    // Client connection limits wrap the proxy: see `connection`.
    let mut proxy = Service::new(
        "token-sidecar proxy".to_string(),
        Limited::new(proxy, app.clone()),
    );
    match &listen {
        // Pingora's default is a 64 KiB read buffer per accepted connection: up to 64 KB more per
        // idle keep-alive client (bench/PROFILE.md §8.3). Its HTTP/1 reader reads heads and bodies
        // into buffers of its own, so on a plain-TCP listener the buffer saves no syscall.
        Listen::Tcp(addr) => proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .l4_buffer(L4BufferSettings::default().read(read_buffer)),
        ),
        Listen::Unix(path) => {
            if let Err(e) = crate::unix::prepare(path, upgrade.upgrade) {
                eprintln!("{e}");
                return 1;
            }
            proxy.add_uds(
                &path.to_string_lossy(),
                Some(std::fs::Permissions::from_mode(crate::unix::SOCKET_MODE)),
            );
        }
    }
    proxy.threads = Some(threads);
    let mut admin = Service::new(
        "token-sidecar admin".to_string(),
        HttpServer::new_app(Admin::new(app.clone(), metrics.clone())),
    );
    admin.add_tcp(&admin_listen);
    server.add_service(proxy);
    server.add_service(admin);
    if let Some(probe_listen) = &probe_listen {
        let mut probes = Service::new(
            "token-sidecar probes".to_string(),
            HttpServer::new_app(Admin::probes(app.clone(), metrics)),
        );
        probes.add_tcp(probe_listen);
        server.add_service(probes);
    }

    tracing::info!(
        listen = %listen,
        admin = %admin_listen,
        probes = probe_listen.as_deref().unwrap_or("off"),
        threads,
        "token-sidecar serving"
    );
    if let Some(f) = on_ready {
        f(app.clone());
    }
    let _watcher = source
        .clone()
        .and_then(|path| crate::watch::spawn(app.clone(), path));
    let reload_app = app.clone();
    let reload: Box<dyn Fn() + Send + Sync> = match source {
        Some(path) => Box::new(move || {
            reload_app.reload(&path);
        }),
        None => Box::new(|| tracing::info!("SIGHUP: no config file to reload")),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals::new(app.clone(), reload)),
    });
    if let Listen::Unix(path) = &listen {
        if !app.upgrading.load(std::sync::atomic::Ordering::Acquire) {
            crate::unix::remove(path);
        }
    }
    for source in app.live.load().providers.values() {
        source.stop();
    }
    token_rt.shutdown_background();
    0
}
