//! Shared record of the tokens the mock IdP handed out.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::util::lock;

/// The tokens a [`MockIdp`](crate::MockIdp) issued, with their expiry.
///
/// Give the same registry to the IdP and to a checking
/// [`MockUpstream`](crate::MockUpstream) so the upstream accepts exactly the
/// tokens the IdP issued. Tests use it to simulate revocation and expiry.
/// Cloning is cheap and clones share state.
#[derive(Clone, Default)]
pub struct TokenRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Live tokens and their expiry (`None`: never expires).
    tokens: HashMap<String, Option<Instant>>,
    issued: usize,
    reject_all: bool,
}

impl TokenRegistry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mints a random opaque token (`tok_` + 32 hex chars) valid for `ttl`.
    pub fn issue(&self, ttl: Duration) -> String {
        let token = format!("tok_{:032x}", rand::rng().random::<u128>());
        let now = Instant::now();
        let expiry = now.checked_add(ttl);
        let mut inner = lock(&self.inner);
        inner.tokens.retain(|_, exp| exp.is_none_or(|at| at > now));
        inner.tokens.insert(token.clone(), expiry);
        inner.issued += 1;
        token
    }

    /// True if `token` was issued, is not revoked, has not expired and
    /// [`set_reject_all`](Self::set_reject_all) is off.
    pub fn is_valid(&self, token: &str) -> bool {
        let inner = lock(&self.inner);
        if inner.reject_all {
            return false;
        }
        match inner.tokens.get(token) {
            Some(Some(expiry)) => Instant::now() < *expiry,
            Some(None) => true,
            None => false,
        }
    }

    /// How long `token` still lives: `None` when it is not valid (unknown, revoked, expired,
    /// or everything is rejected); `Duration::MAX` for a token that never expires.
    pub fn ttl_left(&self, token: &str) -> Option<Duration> {
        let inner = lock(&self.inner);
        if inner.reject_all {
            return None;
        }
        match inner.tokens.get(token)? {
            Some(expiry) => expiry
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero()),
            None => Some(Duration::MAX),
        }
    }

    /// Invalidates every token issued so far; tokens issued later are valid.
    ///
    /// Use it to simulate an IdP-side revocation or an early expiry.
    pub fn revoke_all(&self) {
        lock(&self.inner).tokens.clear();
    }

    /// While `true`, no token is valid, even newly issued ones
    /// ("credentials revoked for good").
    pub fn set_reject_all(&self, reject: bool) {
        lock(&self.inner).reject_all = reject;
    }

    /// How many tokens were issued since the registry was created.
    pub fn issued_count(&self) -> usize {
        lock(&self.inner).issued
    }
}

impl fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("TokenRegistry")
            .field("issued", &inner.issued)
            .field("live", &inner.tokens.len())
            .field("reject_all", &inner.reject_all)
            .finish()
    }
}
