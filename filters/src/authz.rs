//! The client `Authorization` policy (`client_authorization`).

use sidecar_config::ClientAuthorization;

/// What to do with the request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzDecision {
    /// Remove the client's header (if any) and inject the provider's token.
    Inject,
    /// Forward the client's own header; inject nothing.
    KeepClient,
    /// Refuse with 401 `client_authorization`.
    Reject,
}

/// Decides for a route with a provider. Routes without a provider never reach here: they pass
/// the client's headers through untouched.
pub fn client_authorization(policy: ClientAuthorization, client_sent_one: bool) -> AuthzDecision {
    match (policy, client_sent_one) {
        (_, false) | (ClientAuthorization::Overwrite, true) => AuthzDecision::Inject,
        (ClientAuthorization::Keep, true) => AuthzDecision::KeepClient,
        (ClientAuthorization::Reject, true) => AuthzDecision::Reject,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        use ClientAuthorization::*;
        assert_eq!(client_authorization(Overwrite, true), AuthzDecision::Inject);
        assert_eq!(client_authorization(Keep, true), AuthzDecision::KeepClient);
        assert_eq!(client_authorization(Keep, false), AuthzDecision::Inject);
        assert_eq!(client_authorization(Reject, true), AuthzDecision::Reject);
        assert_eq!(client_authorization(Reject, false), AuthzDecision::Inject);
    }
}
