//! Target records (`crate::targets`): set, read, list and delete, each
//! change audited in the commit that makes it.

use serde_json::json;

use super::Admin;
use crate::store::{AuditEntry, Outcome, Write};
use crate::targets::{self, Change, TargetRecord};
use crate::{Error, Result, model};

impl Admin {
    /// Applies `change` to `target`'s record, making it if there is none:
    /// the keys in `change.set` are added or replaced, those in
    /// `change.unset` removed, the others kept (none, if `change.replace`).
    /// Answers the record as
    /// stored after the change.
    pub async fn set_target(&self, target: &str, change: Change, by: &str) -> Result<TargetRecord> {
        targets::check_target(target)?;
        targets::check(&change)?;
        // The values are names and addresses, never secrets (checked
        // above): the audit log keeps them, so a record's history is there.
        let audit = AuditEntry::new(
            by,
            "target.set",
            target,
            json!({ "set": change.set, "unset": change.unset, "replace": change.replace }),
        );
        let outcome = self
            .store
            .write(vec![Write::PutTargetRecord {
                target: target.to_owned(),
                change,
                at: model::now(),
                by: by.to_owned(),
                audit: Box::new(audit),
            }])
            .await?;
        if outcome[0] == (Outcome::Done { rows: 0 }) {
            return Err(Error::TargetRecordFull(target.to_owned()));
        }
        tracing::info!(target_name = target, by, "target record set");
        self.target(target).await
    }

    /// `target`'s record.
    pub async fn target(&self, target: &str) -> Result<TargetRecord> {
        self.store
            .target_record(target)
            .await?
            .ok_or_else(|| Error::TargetNotFound(target.to_owned()))
    }

    /// Target records by name: at most `limit`, names after `after`.
    pub async fn targets(&self, after: Option<&str>, limit: u32) -> Result<Vec<TargetRecord>> {
        self.store.target_records(after, limit).await
    }

    pub async fn delete_target(&self, target: &str, by: &str) -> Result<()> {
        let audit = AuditEntry::new(by, "target.deleted", target, json!({}));
        let outcome = self
            .store
            .write(vec![Write::DeleteTargetRecord {
                target: target.to_owned(),
                audit: Box::new(audit),
            }])
            .await?;
        if outcome[0] == (Outcome::Done { rows: 0 }) {
            return Err(Error::TargetNotFound(target.to_owned()));
        }
        tracing::info!(target_name = target, by, "target record deleted");
        Ok(())
    }
}
