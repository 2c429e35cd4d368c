//! The mock upstream over TLS, speaking HTTP/2 or HTTP/1.1 as ALPN decides.
//!
//! Each start mints a private CA and a server certificate for `localhost` and `127.0.0.1`
//! signed by it, so a test can point the sidecar's `tls.ca_file` at the CA and prove that
//! trust, SNI and h2 negotiation work end to end. Nothing here is meant to be secure: the
//! keys live in memory for the life of the test.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::server;
use crate::upstream::{MockUpstream, UpstreamConfig};

#[cfg(test)]
mod tests;

/// The name the server certificate is issued for (besides `127.0.0.1`); give it to the
/// sidecar as `tls.server_name` when the upstream URL uses the IP address.
pub const SERVER_NAME: &str = "localhost";

/// The trust material of a TLS mock: what a client needs to accept its certificate.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    ca_pem: String,
    cert_pem: String,
}

impl TlsMaterial {
    /// The PEM of the CA that signed the server certificate: the `ca_file` content.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The PEM of the server certificate itself (leaf only), for tests that pin it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA PEM to `path`, for the sidecar's `tls: { ca_file: PATH }`.
    pub fn write_ca(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }
}

impl MockUpstream {
    /// Starts the upstream behind TLS on `127.0.0.1:0`; it answers and records exactly like
    /// [`MockUpstream::start`], over HTTP/2 when the client offers `h2` by ALPN and HTTP/1.1
    /// otherwise. [`MockUpstream::url`] is then `https://127.0.0.1:PORT`.
    ///
    /// # Panics
    /// If no loopback port can be bound; see [`MockUpstream::try_start_tls`].
    pub async fn start_tls(cfg: UpstreamConfig) -> (MockUpstream, TlsMaterial) {
        Self::try_start_tls(cfg)
            .await
            .expect("mock upstream: cannot start TLS on 127.0.0.1:0")
    }

    /// Like [`MockUpstream::start_tls`], but reports errors.
    pub async fn try_start_tls(cfg: UpstreamConfig) -> io::Result<(MockUpstream, TlsMaterial)> {
        let (acceptor, material) = mint().map_err(io::Error::other)?;
        let upstream = Self::launch(cfg, "https", move |listener, router, rx| {
            tokio::spawn(accept_loop(listener, acceptor, router, rx));
        })
        .await?;
        Ok((upstream, material))
    }
}

/// A fresh CA, a server certificate it signed, and an acceptor that offers h2 and http/1.1.
fn mint() -> Result<(TlsAcceptor, TlsMaterial), Box<dyn std::error::Error + Send + Sync>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sidecar-mocks test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    // An explicit provider: the process-wide default may be unset or be another backend.
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let material = TlsMaterial {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
    };
    Ok((TlsAcceptor::from(Arc::new(config)), material))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = server::stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        acceptor.clone(),
                        router.clone(),
                        shutdown.clone(),
                    ));
                }
                // Typically out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
        }
    }
}

/// Completes the handshake (a client that does not trust the CA aborts it here, before any
/// request exists) and serves HTTP/1.1 or HTTP/2, whichever the client speaks.
async fn serve_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let tls = tokio::select! {
        tls = acceptor.accept(stream) => match tls {
            Ok(tls) => tls,
            Err(_) => return,
        },
        _ = server::stopped(&mut shutdown) => return,
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(router));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = server::stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
