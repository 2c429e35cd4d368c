//! `private_key_jwt` client authentication (RFC 7523 §2.2): a short-lived JWT signed with the
//! client's private key, RS256 or ES256, made with `ring`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};

/// Lifetime of one assertion: long enough for clock skew, short enough to be useless if seen.
const ASSERTION_TTL: Duration = Duration::from_secs(60);

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// Signs client assertions. Built once per provider from the configured PEM key; `Debug` shows
/// only the algorithm.
pub struct AssertionSigner {
    key: Key,
    key_id: Option<String>,
    rng: SystemRandom,
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("alg", &self.alg())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// Reads a PEM private key: PKCS#8 (`BEGIN PRIVATE KEY`, RSA or P-256) or PKCS#1
    /// (`BEGIN RSA PRIVATE KEY`). Errors describe the problem, never the key.
    pub fn from_pem(pem: &str, key_id: Option<String>) -> Result<AssertionSigner, String> {
        let (label, der) = pem_block(pem)?;
        let rng = SystemRandom::new();
        let key = match label.as_str() {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
                .map(Key::Rsa)
                .map_err(|e| format!("private_key: not a usable RSA key ({e})"))?,
            "PRIVATE KEY" => {
                match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng) {
                    Ok(k) => Key::Ec(k),
                    Err(_) => RsaKeyPair::from_pkcs8(&der).map(Key::Rsa).map_err(|e| {
                        format!(
                        "private_key: neither a P-256 (ES256) nor a usable RSA (RS256) key ({e})"
                    )
                    })?,
                }
            }
            "EC PRIVATE KEY" => {
                return Err("private_key: SEC1 EC keys are not read; convert with \
                            `openssl pkcs8 -topk8 -nocrypt` to a PKCS#8 key"
                    .into())
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(
                    "private_key: encrypted keys are not supported; store it unencrypted \
                            and protect the file instead"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "private_key: PEM block {other:?} is not a private key"
                ))
            }
        };
        Ok(AssertionSigner { key, key_id, rng })
    }

    /// `RS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_) => "ES256",
        }
    }

    /// A fresh assertion for `client_id` at the token endpoint `audience`.
    pub fn sign(&self, client_id: &str, audience: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut jti = [0u8; 16];
        self.rng
            .fill(&mut jti)
            .map_err(|_| "no randomness for the assertion id".to_string())?;
        let mut header = serde_json::json!({ "alg": self.alg(), "typ": "JWT" });
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_TTL.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(
                    &RSA_PKCS1_SHA256,
                    &self.rng,
                    signing_input.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| "RS256 signing failed".to_string())?;
                sig
            }
            Key::Ec(k) => k
                .sign(&self.rng, signing_input.as_bytes())
                .map_err(|_| "ES256 signing failed".to_string())?
                .as_ref()
                .to_vec(),
        };
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// The label and DER bytes of the first PEM block.
pub(super) fn pem_block(pem: &str) -> Result<(String, Vec<u8>), String> {
    let begin = pem
        .find("-----BEGIN ")
        .ok_or("private_key: no -----BEGIN line; expected a PEM private key")?;
    let rest = &pem[begin + "-----BEGIN ".len()..];
    let label_end = rest
        .find("-----")
        .ok_or("private_key: malformed -----BEGIN line")?;
    let label = rest[..label_end].trim().to_string();
    let body = &rest[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let end = body
        .find(&end_marker)
        .ok_or_else(|| format!("private_key: no {end_marker} line"))?;
    let b64: String = body[..end]
        .lines()
        .filter(|l| !l.contains(':'))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = STANDARD
        .decode(b64)
        .map_err(|_| "private_key: the PEM body is not valid base64".to_string())?;
    Ok((label, der))
}
