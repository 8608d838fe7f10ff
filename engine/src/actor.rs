//! The one place actors are spawned, so what a crash means is decided once.

use std::future::Future;

/// Spawns a long-lived actor task. The engine cannot work without its actors:
/// if one panics, the process exits so a supervisor (systemd) restarts it, and
/// start-up recovery resumes every unfinished action from the database.
pub(crate) fn spawn<F>(name: &'static str, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            tracing::error!(
                actor = name,
                "actor panicked; exiting so the server restarts cleanly"
            );
            std::process::exit(70);
        }
    });
}
