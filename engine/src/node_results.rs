//! Results a node reported to a server that had no runner waiting for
//! them. With several servers a node reports to whichever it can reach:
//! the server that sent the call may have stopped, and the one that took
//! the action over may hear of the result through a third. Such a result
//! is stored in `node_results` before the node is told to forget it, and
//! the runner following the call (`nodes::Nodes::reattach`) looks for it
//! there.
//!
//! A step's output and log may hold secrets the runner masks only when it
//! records them, so a stored result is sealed under the secrets key (as
//! secrets are: every server sharing the database has the same key), bound
//! to its node and call. Rows are forgotten after [`KEEP_FOR`].

use std::time::Duration;

use crate::host::{Answer, CallResult};
use crate::nodes::CallKey;
use crate::secrets::SecretsKey;
use crate::store::{NodeResultRow, Store, Write};

/// How long a stored result is kept: longer than any node grace.
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);

/// Where stored results are written and read.
#[derive(Clone)]
pub(crate) struct NodeResults {
    pub(crate) store: Store,
    pub(crate) key: SecretsKey,
    /// This server's id, recorded with what it stores.
    pub(crate) server: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    body: String,
    log: String,
}

/// What a result is sealed for: a row copied to another call does not open.
fn bound_to(node: &str, key: CallKey) -> String {
    format!("node-result {node} {key}")
}

impl NodeResults {
    /// Stores what `node` reported for call `key` (a result it ran to
    /// the end; nothing else is a node's report).
    pub(crate) async fn keep(
        &self,
        node: &str,
        key: CallKey,
        answer: &Answer,
    ) -> crate::Result<()> {
        let CallResult::Done { status, body } = &answer.result else {
            return Ok(());
        };
        let sealed = Sealed {
            body: String::from_utf8_lossy(body).into_owned(),
            log: answer.log.clone(),
        };
        let plain = serde_json::to_string(&sealed).expect("JSON serializes");
        let (nonce, sealed) = self
            .key
            .seal(&bound_to(node, key), &plain)
            .map_err(crate::Error::io("sealing a node's result"))?;
        let now = crate::model::now();
        let row = NodeResultRow {
            node: node.to_owned(),
            action_id: key.action,
            seq: key.seq,
            attempt: key.attempt,
            status: *status,
            nonce,
            sealed,
            stored_at: now,
            stored_by: self.server.clone(),
        };
        let forget_before = now - chrono::TimeDelta::from_std(KEEP_FOR).expect("a day fits");
        self.store
            .write(vec![Write::PutNodeResult {
                row: Box::new(row),
                forget_before,
            }])
            .await?;
        Ok(())
    }

    /// What `node` reported for call `key`, if a server stored it.
    pub(crate) async fn find(&self, node: &str, key: CallKey) -> crate::Result<Option<Answer>> {
        let Some(row) = self
            .store
            .node_result(node, (key.action, key.seq, key.attempt))
            .await?
        else {
            return Ok(None);
        };
        let opened = self
            .key
            .unseal(&bound_to(node, key), &row.nonce, &row.sealed)
            .and_then(|plain| serde_json::from_str::<Sealed>(&plain).ok());
        let Some(Sealed { body, log }) = opened else {
            tracing::warn!(node, call = %key, "a stored node result does not open with this server's secrets key; every server sharing the database needs the same --secrets-key file");
            return Ok(None);
        };
        Ok(Some(Answer {
            result: CallResult::Done {
                status: row.status,
                body: body.into_bytes(),
            },
            log,
        }))
    }
}
