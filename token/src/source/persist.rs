//! Persistence: the encrypted store read once before the first identity-provider call, and
//! written before every new token is published.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::inner::{lock, Inner};
use crate::store::Record;
use crate::token::Token;

/// Reads the store once, before the first identity-provider call: a stored refresh token seeds
/// the next grant, and a still-usable stored access token is published as is (its generation
/// continues). Returns that token. A bad file is logged (never its contents) and ignored.
pub(super) async fn restore(inner: &Arc<Inner>) -> Option<Arc<Token>> {
    let store = inner.store.clone()?;
    {
        let mut book = lock(&inner.book);
        if book.store_read {
            return None;
        }
        book.store_read = true;
    }
    let loaded = tokio::task::spawn_blocking(move || store.load()).await;
    let record = match loaded {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            count_store_error(inner, "load");
            tracing::warn!(provider = %inner.name, error = %e, "token store ignored; logging in afresh");
            return None;
        }
        Err(_) => {
            count_store_error(inner, "load");
            return None;
        }
    };
    let now = SystemTime::now();
    let mut book = lock(&inner.book);
    book.refresh_token = record.refresh_token.clone();
    book.generation = book.generation.max(record.generation);
    if inner.current.load().is_some() {
        return None;
    }
    let token = Arc::new(usable_token(inner, &record, now)?);
    inner.current.store(Some(token.clone()));
    book.last_refresh_at = Some(now);
    tracing::info!(
        provider = %inner.name,
        generation = token.generation,
        fingerprint = %token.fingerprint,
        ttl_s = record.ttl_left(now).as_secs(),
        "token restored from the store"
    );
    Some(token)
}

/// The token of a record (the store's, or one another replica shared), if it can still be sent:
/// a header-safe value with time left before it stops being usable.
pub(super) fn usable_token(inner: &Inner, record: &Record, now: SystemTime) -> Option<Token> {
    let mut token = Token::restored(
        record.access_token.clone(),
        record.generation,
        record.age(now),
        record.ttl_left(now),
    );
    token.usable_until = inner
        .schedule
        .usable_until(token.issued_at, token.expires_at);
    (token.is_header_safe() && Instant::now() < token.usable_until).then_some(token)
}

/// Persists a new token and refresh token; `Ok` means durable. Runs before the token is
/// published, so a crash never leaves only a consumed refresh token on disk.
pub(super) async fn persist(inner: &Arc<Inner>, token: &Token, refresh_token: Option<String>) {
    let Some(store) = inner.store.clone() else {
        return;
    };
    let record = record_of(token, refresh_token);
    match tokio::task::spawn_blocking(move || store.save(&record)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            count_store_error(inner, "save");
            tracing::error!(provider = %inner.name, error = %e, "cannot write the token store; the new token is kept in memory only")
        }
        Err(_) => {
            count_store_error(inner, "save");
            tracing::error!(provider = %inner.name, "token store write was cancelled")
        }
    }
}

/// What is persisted (and shared with other replicas) for a token.
pub(super) fn record_of(token: &Token, refresh_token: Option<String>) -> Record {
    let age = Instant::now().saturating_duration_since(token.issued_at);
    Record {
        access_token: token.expose().to_string(),
        refresh_token,
        generation: token.generation,
        issued_at_ms: Record::unix_ms(
            SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::now()),
        ),
        expires_at_ms: Record::unix_ms(token.expires_at_wall),
    }
}

/// `sidecar_store_errors_total{provider,op}`: a store that cannot be read (`load`) or written
/// (`save`).
fn count_store_error(inner: &Inner, op: &'static str) {
    metrics::counter!("sidecar_store_errors_total", "provider" => inner.name.clone(), "op" => op)
        .increment(1);
}
