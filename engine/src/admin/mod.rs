//! What an operator changes besides actions: nodes, bundles and keys, API
//! tokens, secrets, target records, goons; and the audit log that records each change in
//! the commit that makes it ([`crate::store::Store::record`]).

mod bundles;
mod goons;
mod nodes;
mod secrets;
mod targets;
mod tokens;

use std::sync::Arc;

pub use bundles::{BundleInfo, BundleStatus};
pub(crate) use nodes::drained_nodes;
pub use secrets::SecretInfo;

use crate::Result;
use crate::access::Tokens;
use crate::agency::AgencyHandle;
use crate::authority::AuthorityHandle;
use crate::runner::Shared;
use crate::store::{AuditEntry, Store};

pub struct Admin {
    store: Store,
    agency: AgencyHandle,
    authority: AuthorityHandle,
    tokens: Tokens,
    shared: Arc<Shared>,
}

impl Admin {
    pub(crate) fn new(shared: Arc<Shared>, authority: AuthorityHandle, tokens: Tokens) -> Admin {
        Admin {
            store: shared.store.clone(),
            agency: shared.agency.clone(),
            authority,
            tokens,
            shared,
        }
    }

    /// The audit log, newest first.
    pub async fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        self.store.audit(limit, before).await
    }
}
