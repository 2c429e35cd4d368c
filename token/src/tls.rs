//! The TLS client side of the sidecar's own HTTP clients (identity-provider calls and the
//! sidecar's own replays): trust and client certificate for one host, built from the material
//! the config checked ([`sidecar_config::Tls`]).
//!
//! Trust is `tls.ca_file` when given, else the system store as OpenSSL-based tools find it
//! (`SSL_CERT_FILE`, `SSL_CERT_DIR`, then the distribution's bundle), loaded once per process by
//! `rustls-native-certs` — the same loader Pingora's rustls connector uses for upstreams without
//! a `ca_file`, so every path to a host trusts the same roots.

use std::sync::{Arc, OnceLock};

use rustls::client::ClientConfig;
use rustls::RootCertStore;
use sidecar_config::Tls;

/// The system trust store, loaded on first use and kept: the environment that locates it does
/// not change while the process runs. An error says which file or directory could not be read.
pub fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let certs = rustls_native_certs::load_native_certs()
                .map_err(|e| format!("cannot load the system trust store: {e}"))?;
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(certs);
            if ignored > 0 {
                tracing::debug!(
                    added,
                    ignored,
                    "system trust store: unusable certificates skipped"
                );
            }
            if added == 0 {
                tracing::warn!(
                    "the system trust store holds no CA certificate: HTTPS to hosts without \
                     tls.ca_file will fail (install the ca-certificates package, or set \
                     SSL_CERT_FILE or SSL_CERT_DIR)"
                );
            }
            Ok(Arc::new(store))
        })
        .clone()
}

/// The roots `tls` trusts: its `ca_file`, else the system store.
pub fn roots(tls: &Tls) -> Result<Arc<RootCertStore>, String> {
    match &tls.ca {
        Some(cas) => {
            let mut store = RootCertStore::empty();
            for ca in cas.iter() {
                // Checked when the config was read; an error here is still an error.
                store
                    .add(ca.clone())
                    .map_err(|e| format!("tls.ca_file: {e}"))?;
            }
            Ok(Arc::new(store))
        }
        None => system_roots(),
    }
}

/// A rustls client configuration with `tls`'s trust and client certificate, offering HTTP/2 and
/// HTTP/1.1 by ALPN. Uses the ring provider explicitly, whatever the process default is.
pub fn client_config(tls: &Tls) -> Result<ClientConfig, String> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots(tls)?);
    let mut config = match &tls.identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.to_vec(), id.key.clone_key())
            .map_err(|e| format!("tls.client_cert/tls.client_key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// `builder` with `tls`'s trust and client certificate in place of reqwest's built-in roots.
pub fn configure(
    builder: reqwest::ClientBuilder,
    tls: &Tls,
) -> Result<reqwest::ClientBuilder, String> {
    Ok(builder.use_preconfigured_tls(client_config(tls)?))
}

/// The innermost cause of a transport error (for TLS: rustls's reason, such as
/// `invalid peer certificate: UnknownIssuer`), for logs that must say why without a URL query.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    detail
}
