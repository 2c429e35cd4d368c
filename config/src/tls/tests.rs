use std::path::PathBuf;

use base64::Engine as _;
use proptest::prelude::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use super::*;
use crate::{Config, ConfigError};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let n: u64 = std::process::id().into();
        let dir = std::env::temp_dir().join(format!("sidecar-tls-{tag}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
    fn write(&self, name: &str, content: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA PEM, and a client certificate it signed with that certificate's key PEM.
fn minted() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn paths<'a>(ca: Option<&'a str>, cert: Option<&'a str>, key: Option<&'a str>) -> TlsPaths<'a> {
    TlsPaths {
        ca_file: ca,
        client_cert: cert,
        client_key: key,
    }
}

#[test]
fn a_ca_bundle_and_a_matching_client_certificate_load() {
    let dir = Dir::new("load");
    let (ca, cert, key) = minted();
    let ca = dir.write("ca.pem", &format!("# a comment line\n{ca}"));
    let cert = dir.write("c.pem", &cert);
    let key = dir.write("c.key", &key);
    let tls = load(paths(Some(&ca), Some(&cert), Some(&key))).unwrap();
    assert_eq!(tls.ca.as_ref().map(|c| c.len()), Some(1));
    let id = tls.identity.unwrap();
    assert_eq!(id.chain.len(), 1);
    // The key never shows in Debug output.
    let shown = format!("{id:?}");
    assert!(
        !shown.contains("key:") && shown.contains("certificates: 1"),
        "{shown}"
    );
    assert_eq!(load(paths(None, None, None)).unwrap(), Tls::default());
}

#[test]
fn unusable_files_name_the_key_and_the_file() {
    let dir = Dir::new("bad");
    let (ca, cert, key) = minted();
    let (_, other_cert, _) = minted();
    dir.write("ca.pem", &ca);
    let cert = dir.write("c.pem", &cert);
    let other_cert = dir.write("other.pem", &other_cert);
    let key_text = key.clone();
    let key = dir.write("c.key", &key);
    let text = dir.write("text.pem", "just some text\n");
    let armour = dir.write(
        "armour.pem",
        "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    );
    let cases: Vec<(TlsPaths<'_>, &str, &str)> = vec![
        (
            paths(Some("/nonexistent/ca.pem"), None, None),
            "ca_file",
            "No such file",
        ),
        (
            paths(Some(&text), None, None),
            "ca_file",
            "no PEM certificate",
        ),
        (
            paths(Some(&armour), None, None),
            "ca_file",
            "not a valid X.509",
        ),
        (
            paths(Some(&key), None, None),
            "ca_file",
            "no PEM certificate",
        ),
        (
            paths(None, Some(&cert), None),
            "client_cert",
            "needs tls.client_key",
        ),
        (
            paths(None, None, Some(&key)),
            "client_key",
            "needs tls.client_cert",
        ),
        (
            paths(None, Some(&cert), Some(&text)),
            "client_key",
            "no PEM private key",
        ),
        (
            paths(None, Some(&cert), Some(&cert)),
            "client_key",
            "no PEM private key",
        ),
        (
            paths(None, Some(&text), Some(&key)),
            "client_cert",
            "no PEM certificate",
        ),
        (
            paths(None, Some(&other_cert), Some(&key)),
            "client_key",
            "does not belong",
        ),
    ];
    for (p, want_key, want) in cases {
        let (key_name, message) = load(p).unwrap_err();
        assert_eq!(key_name, want_key, "{message}");
        assert!(message.contains(want), "{message} lacks {want:?}");
        assert!(message.contains(&format!("tls.{want_key}")), "{message}");
        // A key file's content never shows in an error.
        assert!(!message.contains(&key_text[40..80]), "{message}");
    }
}

/// `check` points at the very key whose file is unusable.
#[test]
fn config_errors_point_at_the_tls_key() {
    let dir = Dir::new("locate");
    let text = dir.write("text.pem", "not pem\n");
    let yaml = format!(
        "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: \"https://idp.example/t\"\n    client_id: c\n    client_secret: s\n    tls:\n      ca_file: \"{text}\"\nupstreams:\n  - {{ name: api, url: \"https://api.example\", provider: main }}\n"
    );
    match Config::parse(&yaml, "s.yaml").unwrap_err() {
        ConfigError::At {
            line, col, message, ..
        } => {
            assert_eq!((line, col), (8, 7), "{message}");
            assert!(
                message.contains("provider \"main\": tls.ca_file"),
                "{message}"
            );
        }
        other => panic!("{other}"),
    }
    let yaml = format!(
        "upstreams:\n  - name: api\n    url: \"https://api.example\"\n    tls: {{ server_name: x, client_key: \"{text}\" }}\n"
    );
    match Config::parse(&yaml, "s.yaml").unwrap_err() {
        ConfigError::At {
            line, col, message, ..
        } => {
            assert_eq!((line, col), (4, 28), "{message}");
            assert!(message.contains("needs tls.client_cert"), "{message}");
        }
        other => panic!("{other}"),
    }
    // A provider that calls no identity provider takes no `tls`.
    let yaml = "providers:\n  st:\n    type: static\n    token: t\n    tls: {}\nupstreams:\n  - { name: api, url: \"https://api.example\" }\n";
    let e = Config::parse(yaml, "s.yaml").unwrap_err().to_string();
    assert!(e.contains("`tls` does not apply to type static"), "{e}");
}

#[test]
fn valid_files_reach_the_config() {
    let dir = Dir::new("config");
    let (ca, cert, key) = minted();
    let ca = dir.write("ca.pem", &ca);
    let cert = dir.write("c.pem", &cert);
    let key = dir.write("c.key", &key);
    let yaml = format!(
        "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: \"https://idp.example/t\"\n    client_id: c\n    client_secret: s\n    tls: {{ client_cert: \"{cert}\", client_key: \"{key}\" }}\nupstreams:\n  - {{ name: api, url: \"https://api.example\", provider: main, tls: {{ ca_file: \"{ca}\" }} }}\n"
    );
    let c = Config::parse(&yaml, "s.yaml").unwrap();
    assert!(c.providers["main"].tls_config.identity.is_some());
    assert!(c.providers["main"].tls_config.ca.is_none());
    assert!(c.upstreams[0].tls_config.ca.is_some());
    assert!(c.upstreams[0].tls_config.identity.is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever a file holds, reading it as certificates or as a key gives a value or the
    /// documented error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = certificates(&bytes) {
            prop_assert!(e.contains("PEM") || e.contains("X.509"), "{}", e);
        }
        if let Err(e) = private_key(&bytes) {
            prop_assert!(e.contains("PEM private key"), "{}", e);
        }
    }

    /// Arbitrary DER inside well-formed PEM armour is refused as a certificate (Pingora's X.509
    /// parser would panic on it) and as a key.
    #[test]
    fn arbitrary_der_in_pem_armour_is_refused(der in proptest::collection::vec(any::<u8>(), 0..512)) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let cert = format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n");
        match certificates(cert.as_bytes()) {
            Ok(_) => prop_assert!(false, "random DER accepted as a certificate"),
            Err(e) => prop_assert!(e.contains("X.509") || e.contains("PEM"), "{}", e),
        }
        let key = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
        if let Ok(k) = private_key(key.as_bytes()) {
            prop_assert!(rustls::crypto::ring::sign::any_supported_type(&k).is_err());
        }
    }
}
