//! Replicas sharing one account through Redis (`shared:`): one identity-provider call per
//! rotation across all of them. The connection lives in `backend`, the decision rule in
//! `decide` (pure, tested as a table), one provider's record, lock and commit in `tokens`, and
//! rate limits held across replicas in `rate`.

mod backend;
mod decide;
mod rate;
mod tokens;

pub use backend::SharedBackend;
pub use rate::{SharedAdmission, SharedRateLimits};
pub(crate) use tokens::{Commit, Outcome, SharedTokens};
