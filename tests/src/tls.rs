//! The mock upstream over TLS, speaking HTTP/2 or HTTP/1.1 as ALPN decides.
//!
//! Each start mints a private CA and a server certificate for `localhost` and `127.0.0.1`
//! signed by it, so a test can point the sidecar's `tls.ca_file` at the CA and prove that
//! trust, SNI and h2 negotiation work end to end. Nothing here is meant to be secure: the
//! keys live in memory for the life of the test.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::server;
use crate::upstream::{MockUpstream, UpstreamConfig};

#[cfg(test)]
mod tests;

/// The name the server certificate is issued for (besides `127.0.0.1`); give it to the
/// sidecar as `tls.server_name` when the upstream URL uses the IP address.
pub const SERVER_NAME: &str = "localhost";

/// Whether a TLS mock asks for a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate asked for (plain server-side TLS).
    None,
    /// A client certificate signed by the mock's CA is required: a client without one never
    /// gets an answer (the handshake fails, or the connection is closed before any request).
    Required,
}

/// What a TLS mock saw of handshakes, shared by every clone of its [`TlsMaterial`].
#[derive(Debug, Default)]
pub(crate) struct Handshakes {
    done: AtomicUsize,
    with_client_cert: AtomicUsize,
    failed: AtomicUsize,
}

/// The trust material of a TLS mock: what a client needs to accept its certificate, a client
/// certificate its CA signed (for mTLS), and what its handshakes looked like.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    ca_pem: String,
    cert_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    handshakes: Arc<Handshakes>,
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

    /// The PEM of a client certificate the same CA signed (`tls.client_cert`).
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }

    /// The PEM (PKCS#8) private key of [`TlsMaterial::client_cert_pem`] (`tls.client_key`).
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// Writes the CA PEM to `path`, for the sidecar's `tls: { ca_file: PATH }`.
    pub fn write_ca(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    pub(crate) fn handshakes(&self) -> Arc<Handshakes> {
        Arc::clone(&self.handshakes)
    }

    /// Handshakes that completed.
    pub fn completed_handshakes(&self) -> usize {
        self.handshakes.done.load(Ordering::SeqCst)
    }

    /// Completed handshakes in which the client presented a certificate the CA signed.
    pub fn client_cert_handshakes(&self) -> usize {
        self.handshakes.with_client_cert.load(Ordering::SeqCst)
    }

    /// Handshakes that failed (a client that did not trust the server, or that the server
    /// refused).
    pub fn failed_handshakes(&self) -> usize {
        self.handshakes.failed.load(Ordering::SeqCst)
    }
}

/// The PEM of a fresh CA that signed nothing a mock serves: trusting it instead of a mock's CA
/// is trusting the wrong CA.
pub fn unrelated_ca_pem() -> String {
    // Another name too: a client then finds no issuer at all (`UnknownIssuer`) rather than a
    // same-named issuer whose signature does not match.
    let (ca, _) = mint_ca("unrelated test CA").expect("rcgen: cannot mint a CA");
    ca.pem()
}

/// Fresh certificates (a CA, a server and a client certificate it signed) without a server:
/// for tests that only need files to point a config at.
pub fn mint_material() -> Result<TlsMaterial, Box<dyn std::error::Error + Send + Sync>> {
    mint(ClientAuth::None).map(|(_, material)| material)
}

impl MockUpstream {
    /// Starts the upstream behind TLS on `127.0.0.1:0`; it answers and records exactly like
    /// [`MockUpstream::start`], over HTTP/2 when the client offers `h2` by ALPN and HTTP/1.1
    /// otherwise. [`MockUpstream::url`] is then `https://127.0.0.1:PORT`.
    ///
    /// # Panics
    /// If no loopback port can be bound; see [`MockUpstream::try_start_tls`].
    pub async fn start_tls(cfg: UpstreamConfig) -> (MockUpstream, TlsMaterial) {
        Self::start_tls_with(cfg, ClientAuth::None).await
    }

    /// [`MockUpstream::start_tls`] with a choice of client authentication (mTLS).
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start_tls_with(
        cfg: UpstreamConfig,
        auth: ClientAuth,
    ) -> (MockUpstream, TlsMaterial) {
        Self::try_start_tls_with(cfg, auth)
            .await
            .expect("mock upstream: cannot start TLS on 127.0.0.1:0")
    }

    /// Like [`MockUpstream::start_tls`], but reports errors.
    pub async fn try_start_tls(cfg: UpstreamConfig) -> io::Result<(MockUpstream, TlsMaterial)> {
        Self::try_start_tls_with(cfg, ClientAuth::None).await
    }

    /// Like [`MockUpstream::start_tls_with`], but reports errors.
    pub async fn try_start_tls_with(
        cfg: UpstreamConfig,
        auth: ClientAuth,
    ) -> io::Result<(MockUpstream, TlsMaterial)> {
        let (acceptor, material) = mint(auth).map_err(io::Error::other)?;
        let handshakes = material.handshakes();
        let upstream = Self::launch(cfg, "https", move |listener, router, rx| {
            spawn(listener, acceptor, handshakes, router, rx);
        })
        .await?;
        Ok((upstream, material))
    }
}

type Minted = Result<(TlsAcceptor, TlsMaterial), Box<dyn std::error::Error + Send + Sync>>;

fn mint_ca(name: &str) -> Result<(Certificate, KeyPair), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    Ok((ca, ca_key))
}

/// A fresh CA, a server certificate and a client certificate it signed, and an acceptor that
/// offers h2 and http/1.1 (and requires the client certificate under [`ClientAuth::Required`]).
pub(crate) fn mint(auth: ClientAuth) -> Minted {
    let (ca, ca_key) = mint_ca("sidecar-mocks test CA")?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "token-sidecar test client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client_params.use_authority_key_identifier_extension = true;
    let client_cert = client_params.signed_by(&client_key, &ca, &ca_key)?;

    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    // An explicit provider: the process-wide default may be unset or be another backend.
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(ca.der().to_vec()))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let material = TlsMaterial {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        handshakes: Arc::default(),
    };
    Ok((TlsAcceptor::from(Arc::new(config)), material))
}

/// Serves `router` over TLS on `listener` from a spawned task until `shutdown`.
pub(crate) fn spawn(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: Arc<Handshakes>,
    router: Router,
    shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(accept_loop(
        listener, acceptor, handshakes, router, shutdown,
    ));
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: Arc<Handshakes>,
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
                        Arc::clone(&handshakes),
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
    handshakes: Arc<Handshakes>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let tls = tokio::select! {
        tls = acceptor.accept(stream) => match tls {
            Ok(tls) => tls,
            Err(_) => {
                handshakes.failed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        },
        _ = server::stopped(&mut shutdown) => return,
    };
    handshakes.done.fetch_add(1, Ordering::SeqCst);
    if tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty())
    {
        handshakes.with_client_cert.fetch_add(1, Ordering::SeqCst);
    }
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
