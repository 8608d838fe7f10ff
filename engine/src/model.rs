//! The engine's vocabulary: actions, their steps, and their statuses.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub type ActionId = i64;
pub type Timestamp = DateTime<Utc>;

/// The current time at the precision both databases store (microseconds),
/// so a time held in memory equals the same time read back.
pub fn now() -> Timestamp {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

macro_rules! status_enum {
    ($(#[$m:meta])* $name:ident ($noun:literal) { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "{s:?} is not a {}; expected one of: {}",
                        $noun,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

status_enum! {
    /// Whether a remote node may take calls: `pending` waits for an admin's
    /// `troupe nodes accept`; a `removed` node's key is refused for good.
    NodeStatus ("node status") {
        Pending = "pending",
        Accepted = "accepted",
        Removed = "removed",
    }
}

status_enum! {
    /// Where an action is in its life. The last three are terminal.
    ActionStatus ("status") {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

status_enum! {
    /// Where one step of an action is. `waiting`: for a node that has what
    /// the step requires; the attempt has not started.
    StepStatus ("step status") {
        Pending = "pending",
        Waiting = "waiting",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
}

impl ActionStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ActionStatus::Succeeded | ActionStatus::Failed | ActionStatus::Cancelled
        )
    }
}

/// An action as stored, with its steps in order.
#[derive(Debug, Clone)]
pub struct Action {
    pub id: ActionId,
    pub kind: String,
    pub target: String,
    pub params: Map<String, Value>,
    pub status: ActionStatus,
    pub bundle: String,
    pub current_step: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// The name of the API token that submitted it.
    pub submitted_by: Option<String>,
    pub owner: Option<String>,
    /// Bumped by every claim and hand-over: the runner of this epoch is
    /// the only one whose writes land (see `store::Fence`).
    pub epoch: i64,
    pub revision: i64,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// When a cancel was first asked for; the action ends `cancelled` at
    /// its next chance, however the server got there.
    pub cancel_requested_at: Option<Timestamp>,
    /// What its current step waits for (a node meeting this), when it
    /// waits: set in lists, where `steps` is empty; otherwise read it from
    /// the waiting step.
    pub waiting_for: Option<String>,
    pub steps: Vec<StepRecord>,
}

/// One step of an action as stored.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub seq: u32,
    pub name: String,
    pub step: String,
    pub status: StepStatus,
    pub attempt: u32,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// While `waiting`: the requirement no connected node meets
    /// (`hypervisor=kvm`).
    pub waiting_for: Option<String>,
    /// The remote node its latest attempt ran on; `None`: the app server.
    pub node: Option<String>,
}

/// An attempt of a step that failed (and was tried again, or ended it): as
/// `action_step_attempts` keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedAttempt {
    pub seq: u32,
    pub attempt: u32,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    /// The remote node it ran on; `None`: the app server.
    pub node: Option<String>,
    /// Why it failed (secrets masked, as stored).
    pub error: String,
}

/// What one attempt of a step logged.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    pub seq: u32,
    /// The step's name in its kind (filled in from the action).
    pub step: String,
    pub attempt: u32,
    /// Lines, each ending in a newline.
    pub log: String,
    pub logged_at: Timestamp,
}

/// A request to run an action.
#[derive(Debug, Clone)]
pub struct NewAction {
    pub kind: String,
    pub target: String,
    pub params: Map<String, Value>,
    pub idempotency_key: Option<String>,
    /// Pin to this bundle hash instead of the kind's active bundle.
    pub bundle: Option<String>,
    /// The name of the API token submitting it.
    pub submitted_by: Option<String>,
}

/// Which versions a submit may pin ([`NewAction::bundle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MayPin {
    /// Only the active version of its bundle's name: any token that may submit.
    Active,
    /// Any version the server holds: a rollback, which only an admin may ask for.
    Any,
}

/// What `submit` did with a request.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub action: Action,
    /// False when an earlier request with the same idempotency key made it.
    pub created: bool,
}

/// Which actions to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ActionFilter {
    pub target: Option<String>,
    /// Any of these; empty for any status.
    pub statuses: Vec<ActionStatus>,
    pub kind: Option<String>,
    /// The name of the token that submitted them.
    pub submitted_by: Option<String>,
    /// Submitted at or after this.
    pub since: Option<Timestamp>,
    /// Submitted at or before this.
    pub until: Option<Timestamp>,
    /// Only actions with an id below this one (for paging).
    pub before: Option<ActionId>,
    pub limit: u32,
}
