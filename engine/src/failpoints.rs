//! Failure points for tests, from the `fail` crate: named places where a
//! test can make the engine fail on purpose (a commit that reports an error
//! after it went through, a runner that panics) instead of hoping a timing
//! window opens. They exist only in builds with the `failpoints` feature,
//! which the workspace's test build turns on; elsewhere they compile to
//! nothing.
//!
//! A test arms them for a server it starts through the `FAILPOINTS`
//! environment variable, e.g. `FAILPOINTS='runner.before_step=1*panic'`
//! (see the `fail` crate for the grammar). The points:
//!
//! | name | where | what `return` does |
//! | --- | --- | --- |
//! | `store.after_insert_commit` | a commit that inserted actions | reports an error although the commit went through (the outcome is unknown) |
//! | `store.after_turn_commit` | a commit that claims a queued action's turn (with its first step started) | the same |
//! | `store.insert_uncommitted` | MySQL/MariaDB: a commit that inserts actions, its statements run, before `COMMIT` | (use `sleep(MS)`: holds the transaction open) |
//! | `store.before_insert_commit` | a commit that inserts actions, before it is sent | fails it as a lost connection would: nothing was written |
//! | `runner.before_step` | a runner, before each step | (use `panic`) |
//! | `store.refuse_step_success` | a commit holding a step's success | the database refuses it (a permanent error) |
//! | `store.revoke_token` | a token's revoke, after it read (and on MySQL locked) the active admin tokens | (use `sleep(MS)`: holds the transaction open) |
//! | `store.refuse_step_start` | a commit recording a step started (not one an insert started) | the database refuses it (a permanent error) |
//! | `store.cancel_queued` | `Scheduler::cancel`, ending a queued action | the write fails |
//! | `store.audit` | writing an audit entry, after the change it records was written in the same transaction | the write fails |
//! | `engine.bundle_content` | reading a bundle's bytes (for a node's download, or `GET /v1/bundles/{hash}/content`) | `return(MS)`: waits MS milliseconds |
//! | `nodes.reattach` | a restarted server's runner following a step that ran on a node | `return(MS)`: it asks for the node's report MS milliseconds later |
//! | `runner.before_remote_call` | a runner, after a step placed on a node is recorded running, before the call is sent | `return(MS)`: waits MS milliseconds |
//! | `authority.before_record` | a push or activation, checked, before its commit | `return(NAME:MS)`: holds a change to bundle NAME MS milliseconds (another server may change the bundles meanwhile) |
//! | `config_watch.reload` | the configuration watch, once it saw a generation move, before it reloads | `return(MS)`: waits MS milliseconds |

/// Arms the points named in `FAILPOINTS`, if this build has them.
pub fn arm() {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        tracing::warn!(%spec, "failure points armed (a test build)");
        std::mem::forget(fail::FailScenario::setup());
    }
}
