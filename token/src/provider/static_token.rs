//! `static`: a token from the config itself.

use futures::future::BoxFuture;
use sidecar_config::Secret;

use super::{Fetched, Held, Provider, ProviderError};

pub(super) struct StaticToken {
    pub(super) token: Secret,
}

impl Provider for StaticToken {
    fn fetch<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move { Ok(Fetched::token(self.token.expose().to_string(), None)) })
    }

    fn local(&self) -> bool {
        true
    }
}
