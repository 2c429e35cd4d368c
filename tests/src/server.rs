//! The HTTP/1.1 accept loop shared by the mocks.
//!
//! A hand-rolled loop (rather than `axum::serve`) lets the IdP simulate an
//! outage: while the `down` gate returns true, every request makes the
//! connection close without an answer, and the port keeps working afterwards.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::service::{service_fn, Service as _};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Returns true while the server should drop requests unanswered.
pub(crate) type DownGate = Arc<dyn Fn() -> bool + Send + Sync>;

/// Resolves once `shutdown` turns true or its sender is gone.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Binds an ephemeral loopback port.
pub(crate) async fn bind_loopback() -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves `router` on `listener` from a spawned task until `shutdown` turns
/// true (or its sender is dropped); in-flight requests are then finished.
pub(crate) fn spawn(
    listener: TcpListener,
    router: Router,
    shutdown: watch::Receiver<bool>,
    down: Option<DownGate>,
) {
    tokio::spawn(accept_loop(listener, router, shutdown, down));
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    down: Option<DownGate>,
) {
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        router.clone(),
                        shutdown.clone(),
                        down.clone(),
                    ));
                }
                // Typically out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    down: Option<DownGate>,
) {
    let _ = stream.set_nodelay(true);
    let app = TowerToHyperService::new(router);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let is_down = down.as_ref().is_some_and(|gate| gate());
        let app = app.clone();
        async move {
            if is_down {
                // A service error makes hyper drop the connection unanswered.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "injected outage",
                ));
            }
            match app.call(req).await {
                Ok(resp) => Ok(resp),
                Err(never) => match never {},
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
