//! What of an identity provider's text may reach a log line or an admin answer: every secret
//! the provider sent, in every encoding, scrubbed; control characters flattened; length capped.

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;

pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Takes every secret a provider sends out of the texts its identity provider writes back: some
/// echo the request they refused, so a secret may return raw, form- or percent-encoded,
/// JSON-escaped, base64-encoded, or inside the base64 of a `Basic` header (`id:secret`).
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    /// Every encoding of every secret, longest first.
    needles: Vec<String>,
}

impl Redactor {
    /// Shorter secrets are not looked for: replacing them would mangle every message.
    const MIN_LEN: usize = 4;

    /// Adds a secret in all its encodings.
    pub(crate) fn secret(&mut self, secret: &str) -> &mut Self {
        if secret.len() < Self::MIN_LEN {
            return self;
        }
        let form = form_encode(secret);
        let json = serde_json::to_string(secret).unwrap_or_default();
        let mut found = vec![
            secret.to_string(),
            form.replace('+', "%20"),
            lower_hex(&form),
            json.trim_matches('"').to_string(),
            STANDARD_NO_PAD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
        ];
        found.push(form);
        self.add(found);
        self
    }

    /// Adds a client id and secret as they travel in `Authorization: Basic` (RFC 6749 §2.3.1
    /// form-encodes both parts first; some clients do not), plus the secret alone.
    pub(crate) fn basic(&mut self, client_id: &str, secret: &str) -> &mut Self {
        self.secret(secret);
        let mut found = Vec::new();
        for pair in [
            format!("{client_id}:{secret}"),
            format!("{}:{}", form_encode(client_id), form_encode(secret)),
        ] {
            found.push(STANDARD_NO_PAD.encode(&pair));
            found.push(URL_SAFE_NO_PAD.encode(&pair));
        }
        self.add(found);
        self
    }

    fn add(&mut self, found: Vec<String>) {
        self.needles
            .extend(found.into_iter().filter(|n| n.len() >= Self::MIN_LEN));
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.needles.dedup();
    }

    /// Replaces every occurrence with `<redacted>`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "<redacted>");
            }
        }
        out
    }

    /// A text from the identity provider made fit for a log line and an admin answer: secrets
    /// scrubbed (before cutting, so no secret is cut in half and left), control characters
    /// turned into spaces, at most 200 bytes.
    pub(crate) fn clean(&self, text: &str) -> String {
        let scrubbed = self.scrub(text);
        let flat: String = scrubbed
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        truncate(&flat)
    }
}

pub(super) fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `%2F` → `%2f`: some servers echo percent-encoding in lower case.
pub(super) fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let esc = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        out.push_str(&esc.to_ascii_lowercase());
        rest = &rest[at + esc.len()..];
    }
    out.push_str(rest);
    out
}

/// `error: error_description` from an OAuth2 error body (or the common alternatives), cleaned
/// by `redactor`. Nothing else of an answer ever reaches a message.
pub(crate) fn error_message(json: &serde_json::Value, redactor: &Redactor) -> Option<String> {
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let code = field("error");
    let text = field("error_description")
        .or_else(|| field("errorMessage"))
        .or_else(|| field("message"));
    let joined = match (code, text) {
        (Some(c), Some(t)) => format!("{c}: {t}"),
        (Some(c), None) => c,
        (None, Some(t)) => t,
        (None, None) => return None,
    };
    Some(redactor.clean(&joined))
}
