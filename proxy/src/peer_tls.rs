//! An upstream's trust and client certificate in the shape Pingora's rustls connector takes them.
//!
//! Both come from the material the config read and checked (`sidecar_config::Tls`), the same
//! the sidecar's own replay client gets through `sidecar_token::tls`: a `ca_file` becomes the
//! peer's CA list; without one the peer has none and Pingora's connector uses the system store,
//! which it loads with the same `rustls-native-certs` (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};
use sidecar_config::Tls;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Puts `tls`'s CA list and client certificate on `peer`. The certificates were parsed with the
/// same X.509 parser when the config was read; a failure here is still an error, not a panic.
pub(crate) fn apply(peer: &mut HttpPeer, tls: &Tls) -> Result<(), String> {
    if let Some(cas) = &tls.ca {
        let wrapped = cas
            .iter()
            .enumerate()
            .map(|(i, c)| {
                WrappedX509::try_new(c.as_ref().to_vec(), |raw| {
                    X509Certificate::from_der(raw).map(|(_, cert)| cert)
                })
                .map_err(|e| format!("tls.ca_file: certificate {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        peer.options.ca = Some(Arc::from(wrapped));
        // Pingora's connection pool keys on address, SNI and client certificate, not on the CA
        // list: without this, a connection verified against one upstream's CA would be reused
        // for another upstream at the same address that trusts a different CA.
        let mut h = DefaultHasher::new();
        for c in cas.iter() {
            c.as_ref().hash(&mut h);
        }
        peer.group_key = h.finish();
    }
    if let Some(id) = &tls.identity {
        let chain = id.chain.iter().map(|c| c.as_ref().to_vec()).collect();
        peer.client_cert_key = Some(Arc::new(CertKey::new(chain, id.key.secret_der().to_vec())));
    }
    Ok(())
}
