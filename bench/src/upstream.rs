//! The fast upstream: a lean hyper HTTP/1.1 server on its own thread (one current-thread tokio
//! runtime, like one nginx worker) that answers `200 {"ok":true}` to a bearer token the mock IdP
//! issued and still lists as valid, and `401` with `WWW-Authenticate: Bearer
//! error="invalid_token"` otherwise. [`start_tls`] serves the same behind TLS (HTTP/1.1 by ALPN)
//! with a certificate for [`TLS_NAME`] signed by a test CA minted at start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use sidecar_mocks::TokenRegistry;
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// The answer to an accepted request.
pub const OK_BODY: &[u8] = br#"{"ok":true,"items":[1,2,3]}"#;
const DENIED_BODY: &[u8] = br#"{"error":"invalid_token"}"#;

/// Counters the upstream keeps.
#[derive(Default)]
pub struct Counters {
    /// Requests answered 200.
    pub ok: AtomicU64,
}

/// A running upstream; dropping it stops the server thread.
pub struct Upstream {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(registry: &TokenRegistry, req: &http::Request<Incoming>) -> Response<Full<Bytes>> {
    let valid = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| registry.is_valid(t));
    let (status, body) = if valid {
        (StatusCode::OK, OK_BODY)
    } else {
        (StatusCode::UNAUTHORIZED, DENIED_BODY)
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !valid {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
    }
    resp
}

/// The name the TLS upstream's certificate is issued for (besides 127.0.0.1).
pub const TLS_NAME: &str = "localhost";

/// A fresh test CA (its PEM is returned) and an acceptor with a server certificate it signed
/// for [`TLS_NAME`] and 127.0.0.1, offering only HTTP/1.1, like the plain upstream.
fn mint() -> Result<(TlsAcceptor, String), String> {
    let e = |e: rcgen::Error| format!("test CA: {e}");
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sidecar-bench test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let mut params =
        CertificateParams::new(vec![TLS_NAME.to_owned(), "127.0.0.1".to_owned()]).map_err(e)?;
    params.distinguished_name.push(DnType::CommonName, TLS_NAME);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(e)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS upstream: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("TLS upstream: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), ca.pem()))
}

/// Starts the upstream behind TLS on `127.0.0.1:0`; returns it and its CA's PEM.
pub fn start_tls(registry: TokenRegistry) -> Result<(Upstream, String), String> {
    let (acceptor, ca) = mint()?;
    Ok((launch(registry, Some(acceptor))?, ca))
}

/// Starts the upstream on `127.0.0.1:0`.
pub fn start(registry: TokenRegistry) -> Result<Upstream, String> {
    launch(registry, None)
}

fn launch(registry: TokenRegistry, tls: Option<TlsAcceptor>) -> Result<Upstream, String> {
    let std_listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("upstream bind: {e}"))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("upstream: {e}"))?;
    let addr = std_listener
        .local_addr()
        .map_err(|e| format!("upstream: {e}"))?;
    let counters = Arc::new(Counters::default());
    let (stop, mut stop_rx) = watch::channel(false);
    let c = counters.clone();
    let thread = std::thread::Builder::new()
        .name("bench-upstream".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("bench upstream: no runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    eprintln!("bench upstream: cannot register the listener");
                    return;
                };
                loop {
                    tokio::select! {
                        _ = stop_rx.wait_for(|s| *s) => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let registry = registry.clone();
                            let c = c.clone();
                            let service = service_fn(move |req: http::Request<Incoming>| {
                                let resp = answer(&registry, &req);
                                if resp.status() == StatusCode::OK {
                                    c.ok.fetch_add(1, Ordering::Relaxed);
                                }
                                async move { Ok::<_, Infallible>(resp) }
                            });
                            let tls = tls.clone();
                            tokio::spawn(async move {
                                let mut http = hyper::server::conn::http1::Builder::new();
                                match tls {
                                    None => {
                                        let _ = http
                                            .keep_alive(true)
                                            .serve_connection(TokioIo::new(stream), service)
                                            .await;
                                    }
                                    Some(acceptor) => {
                                        // Bounded: a peer that never finishes its handshake.
                                        let handshake = tokio::time::timeout(
                                            std::time::Duration::from_secs(10),
                                            acceptor.accept(stream),
                                        );
                                        if let Ok(Ok(stream)) = handshake.await {
                                            let _ = http
                                                .keep_alive(true)
                                                .serve_connection(TokioIo::new(stream), service)
                                                .await;
                                        }
                                    }
                                }
                            });
                        }
                    }
                }
            });
            // Dropping the runtime cancels the connection tasks.
        })
        .map_err(|e| format!("upstream thread: {e}"))?;
    Ok(Upstream {
        addr,
        counters,
        stop,
        thread: Some(thread),
    })
}
