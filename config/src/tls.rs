//! TLS material a provider's or an upstream's `tls:` names: the CA bundle that replaces the system
//! trust store, and the client certificate and key that authenticate the sidecar (mTLS, RFC 8705
//! `tls_client_auth`). The files are read and checked here, where the config is read, so that
//! `check` and a reload refuse an unreadable, non-PEM or mismatched file with its place in the
//! config, and every connection later uses exactly what was checked.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::read::read_bounded;

/// Trust and identity for the connections to one host. The default trusts the system store
/// (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) and presents no client certificate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tls {
    /// CAs trusted instead of the system store (`tls.ca_file`); `None`: the system store.
    pub ca: Option<Arc<[CertificateDer<'static>]>>,
    /// Client certificate chain and key (`tls.client_cert`, `tls.client_key`).
    pub identity: Option<Identity>,
}

/// A client certificate chain (leaf first) and its private key. `Debug` never shows the key.
#[derive(Clone, PartialEq)]
pub struct Identity {
    /// Leaf first, then any intermediates.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The `tls:` keys as written; paths as given.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TlsPaths<'a> {
    pub(crate) ca_file: Option<&'a str>,
    pub(crate) client_cert: Option<&'a str>,
    pub(crate) client_key: Option<&'a str>,
}

/// Why the material could not be used: the `tls` key it concerns (so the error points at it) and
/// what is wrong. The message names the file, never its content.
pub(crate) type TlsError = (&'static str, String);

/// Reads and checks the files `paths` names.
pub(crate) fn load(paths: TlsPaths<'_>) -> Result<Tls, TlsError> {
    let ca = match paths.ca_file {
        Some(path) => {
            let pem = read(path).map_err(|m| ("ca_file", format!("tls.ca_file {path}: {m}")))?;
            let certs =
                certificates(&pem).map_err(|m| ("ca_file", format!("tls.ca_file {path}: {m}")))?;
            trust_anchors(&certs).map_err(|m| ("ca_file", format!("tls.ca_file {path}: {m}")))?;
            Some(Arc::from(certs))
        }
        None => None,
    };
    let identity = match (paths.client_cert, paths.client_key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "client_cert",
                "tls.client_cert needs tls.client_key (the certificate's private key)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "client_key",
                "tls.client_key needs tls.client_cert (the certificate it belongs to)".into(),
            ))
        }
        (Some(cert_path), Some(key_path)) => {
            let at_cert = |m: String| ("client_cert", format!("tls.client_cert {cert_path}: {m}"));
            let at_key = |m: String| ("client_key", format!("tls.client_key {key_path}: {m}"));
            let chain = certificates(&read(cert_path).map_err(at_cert)?).map_err(at_cert)?;
            let key = private_key(&read(key_path).map_err(at_key)?).map_err(at_key)?;
            matching(&chain, &key).map_err(at_key)?;
            Some(Identity {
                chain: Arc::from(chain),
                key: Arc::new(key),
            })
        }
    };
    Ok(Tls { ca, identity })
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    read_bounded(Path::new(path)).map_err(|e| e.to_string())
}

/// Every `CERTIFICATE` block of a PEM text, each a well-formed X.509 certificate.
pub(crate) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    for (i, c) in certs.iter().enumerate() {
        match X509Certificate::from_der(c.as_ref()) {
            Ok(([], _)) => {}
            Ok(_) => {
                return Err(format!(
                    "certificate {} has bytes after its end; it is not one X.509 certificate",
                    i + 1
                ))
            }
            Err(e) => {
                return Err(format!(
                    "certificate {} is not a valid X.509 certificate: {e}",
                    i + 1
                ))
            }
        }
    }
    Ok(certs)
}

/// Each CA certificate as rustls will use it: a trust anchor.
fn trust_anchors(certs: &[CertificateDer<'static>]) -> Result<(), String> {
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store
            .add(c.clone())
            .map_err(|e| format!("certificate {} cannot be a trust anchor: {e}", i + 1))?;
    }
    Ok(())
}

/// The one private key of a PEM text. Errors never quote the file: it holds a secret.
pub(crate) fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::Error;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        Error::NoItemsFound => "no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY \
                                or EC PRIVATE KEY) in it"
            .to_string(),
        _ => "not a well-formed PEM private key".to_string(),
    })
}

/// The key is one rustls can sign with, and it belongs to the leaf certificate. Pingora also
/// re-reads the key by its DER shape: a key it would not recognise is refused here.
fn matching(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'static>) -> Result<(), String> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key).map_err(|_| {
        "unsupported or malformed private key (RSA, ECDSA P-256/P-384 or Ed25519 expected)"
            .to_string()
    })?;
    if PrivateKeyDer::try_from(key.secret_der()).is_err() {
        return Err("the private key's DER encoding is not recognised".into());
    }
    rustls::sign::CertifiedKey::new(chain.to_vec(), signer)
        .keys_match()
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "does not belong to the certificate in tls.client_cert".to_string()
            }
            other => format!("cannot be checked against tls.client_cert: {other}"),
        })
}

#[cfg(test)]
mod tests;
