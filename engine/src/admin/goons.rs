//! Goons (test deployments only): faults armed and disarmed over the API.

use serde_json::json;

use super::Admin;
use crate::store::AuditEntry;
use crate::{Error, Result, goons};

impl Admin {
    /// The goons this server holds, if it was started with them on.
    pub fn goons(&self) -> Result<Vec<goons::Armed>> {
        Ok(self.goons_on()?.list())
    }

    fn goons_on(&self) -> Result<&goons::Goons> {
        self.shared.goons.as_deref().ok_or(Error::GoonsOff)
    }

    /// Arms a goon: from now on it acts on the attempts it matches.
    pub async fn add_goon(&self, goon: goons::Goon, by: &str) -> Result<goons::Armed> {
        let goons = self.goons_on()?;
        goon.check().map_err(Error::InvalidRequest)?;
        let armed = goons.add(goon, by);
        let audit = AuditEntry::new(by, "goon.added", &armed.id.to_string(), json!(armed.goon));
        if let Err(e) = self.store.record(vec![], audit).await {
            goons.remove(armed.id);
            return Err(e);
        }
        tracing::warn!(goon = armed.id, by, step = %armed.goon.step, "goon added");
        Ok(armed)
    }

    /// Disarms goon `id`, or every goon with `None`; returns how many.
    pub async fn remove_goons(&self, id: Option<u64>, by: &str) -> Result<usize> {
        let goons = self.goons_on()?;
        let removed = match id {
            Some(id) if goons.remove(id) => 1,
            Some(id) => return Err(Error::GoonNotFound(id)),
            None => goons.clear(),
        };
        if removed == 0 {
            return Ok(0);
        }
        let what = id.map_or_else(|| "all".to_owned(), |id| id.to_string());
        let audit = AuditEntry::new(by, "goon.removed", &what, json!({ "removed": removed }));
        self.store.record(vec![], audit).await?;
        Ok(removed)
    }
}
