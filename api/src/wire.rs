//! The JSON the API speaks. These types are the public contract; the
//! engine's own types never leave the server directly.

use chrono::SecondsFormat;
use engine::model::{Action, StepRecord, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub kind: String,
    pub target: String,
    #[serde(default)]
    pub params: Map<String, Value>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Pin the action to this bundle hash instead of the kind's active bundle.
    #[serde(default)]
    pub bundle: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ActionView {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub params: Map<String, Value>,
    pub status: &'static str,
    pub bundle: String,
    pub current_step: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// Bumped on every change; pass it as `since` to wait for the next one.
    pub revision: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepView>>,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub seq: u32,
    pub name: String,
    pub step: String,
    pub status: &'static str,
    pub attempt: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ActionList {
    pub actions: Vec<ActionView>,
    /// Pass as `before` to get the next page; absent on the last page.
    pub next_before: Option<i64>,
}

pub fn time(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl ActionView {
    pub fn new(a: Action, with_steps: bool) -> ActionView {
        ActionView {
            id: a.id,
            kind: a.kind,
            target: a.target,
            params: a.params,
            status: a.status.as_str(),
            bundle: a.bundle,
            current_step: a.current_step,
            error: a.error,
            idempotency_key: a.idempotency_key,
            revision: a.revision,
            created_at: time(&a.created_at),
            started_at: a.started_at.as_ref().map(time),
            finished_at: a.finished_at.as_ref().map(time),
            steps: with_steps.then(|| a.steps.into_iter().map(StepView::new).collect()),
        }
    }
}

impl StepView {
    fn new(s: StepRecord) -> StepView {
        StepView {
            seq: s.seq,
            name: s.name,
            step: s.step,
            status: s.status.as_str(),
            attempt: s.attempt,
            started_at: s.started_at.as_ref().map(time),
            finished_at: s.finished_at.as_ref().map(time),
            output: s.output,
            error: s.error,
        }
    }
}
