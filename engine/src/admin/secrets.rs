//! Secrets for steps: stored encrypted, listed by name only.

use serde_json::json;

use super::Admin;
use crate::store::{self, AuditEntry, Outcome, Write};
use crate::{Error, Result, model, secrets};

/// A secret as listed: never its value.
#[derive(Debug, Clone)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: model::Timestamp,
    pub updated_by: String,
}

impl From<&store::SecretRow> for SecretInfo {
    fn from(row: &store::SecretRow) -> SecretInfo {
        SecretInfo {
            name: row.name.clone(),
            updated_at: row.updated_at,
            updated_by: row.updated_by.clone(),
        }
    }
}

impl Admin {
    /// Stores a secret for steps (encrypted); replaces one of the same name.
    pub async fn set_secret(&self, name: &str, value: &str, by: &str) -> Result<SecretInfo> {
        if !secrets::is_valid_name(name) {
            return Err(Error::InvalidRequest(
                "a secret name is 1 to 128 letters, digits, '_' or '-'".into(),
            ));
        }
        if value.is_empty() || value.len() > secrets::MAX_SECRET {
            return Err(Error::InvalidRequest(format!(
                "a secret's value is 1 to {} bytes",
                secrets::MAX_SECRET
            )));
        }
        let (nonce, ciphertext) = self
            .shared
            .secrets_key
            .seal(name, value)
            .map_err(Error::io("encrypting a secret"))?;
        let row = store::SecretRow {
            name: name.to_owned(),
            nonce,
            ciphertext,
            updated_at: model::now(),
            updated_by: by.to_owned(),
        };
        let audit = AuditEntry::new(by, "secret.set", name, json!({}));
        self.store
            .record(vec![Write::SetSecret(Box::new(row.clone()))], audit)
            .await?;
        tracing::info!(secret = name, by, "secret set");
        Ok(SecretInfo::from(&row))
    }

    pub async fn delete_secret(&self, name: &str, by: &str) -> Result<()> {
        let audit = AuditEntry::new(by, "secret.deleted", name, json!({}));
        let outcome = self
            .store
            .write(vec![Write::DeleteSecret {
                name: name.to_owned(),
                audit: Box::new(audit),
            }])
            .await?;
        if outcome[0] == (Outcome::Done { rows: 0 }) {
            return Err(Error::SecretNotFound(name.to_owned()));
        }
        Ok(())
    }

    /// The secrets that are set: names and who set them, never values.
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>> {
        Ok(self
            .store
            .all_secrets()
            .await?
            .iter()
            .map(SecretInfo::from)
            .collect())
    }
}
