//! Replicas sharing one account through Redis (`shared:`): one identity-provider call per
//! rotation across all of them. The connection lives in `backend`, the decision rule in
//! `decide` (pure, tested as a table), and one provider's record, lock and commit in `tokens`.

mod backend;
mod decide;
mod tokens;

pub use backend::SharedBackend;
pub(crate) use tokens::{Commit, Outcome, SharedTokens};
