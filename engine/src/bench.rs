//! Handles on internal parts for the criterion benchmarks in `benches/`.
//! Not a stable interface.

use std::path::Path;
use std::time::Duration;

use crate::agency::AgencyHandle;
use crate::host::{Answer, CallResult, HostCommand, StepHost};

/// A real Agency actor, to time one `tell` and one `ask` through its mailbox.
pub struct AgencyProbe(AgencyHandle);

impl AgencyProbe {
    pub fn spawn(host_command: HostCommand) -> AgencyProbe {
        AgencyProbe(AgencyHandle::spawn(host_command, Duration::from_secs(1)))
    }

    /// A fire-and-forget message (an unpin of an unknown bundle).
    pub fn tell(&self) {
        self.0.unpin("not-a-hash");
    }

    /// A request and its reply (a lookup of an unknown bundle).
    pub async fn ask(&self) -> bool {
        matches!(self.0.bundle("not-a-hash".into()).await, Ok(None))
    }
}

/// A real step host with a plugin loaded.
pub struct HostProbe(StepHost);

impl HostProbe {
    pub async fn spawn(host_command: &HostCommand, library: &Path) -> crate::Result<HostProbe> {
        Ok(HostProbe(
            StepHost::spawn(host_command, library, "bench").await?,
        ))
    }

    /// One call over the pipes; true if the step succeeded.
    pub async fn call(&self, function: &str, input: &[u8]) -> bool {
        let (_, rx) = self.0.call(function, input);
        matches!(
            rx.await,
            Ok(Answer {
                result: CallResult::Done { status: 0, .. },
                ..
            })
        )
    }
}

/// A whole engine in this process: real Control, Agency, step host and
/// store (SQLite on a RAM-backed directory where there is one, so no disk
/// flush), with a bundle signed by a throwaway key.
pub struct EngineProbe {
    engine: crate::Engine,
    dir: std::path::PathBuf,
}

impl EngineProbe {
    /// `manifest` and `library` make the bundle (the testkit's, in the benchmarks).
    pub async fn start(
        host_command: HostCommand,
        manifest: &str,
        library: &Path,
    ) -> crate::Result<EngineProbe> {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("troupe-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(crate::Error::io("creating the probe's directory"))?;
        let lib = std::fs::read(library).map_err(crate::Error::io("reading the plugin"))?;
        let bytes = crate::bundle::build(manifest, &[(crate::bundle::TARGET, &lib)])?;
        let key = signing::SecretKey::from_seed([7; 32]);
        let signature = crate::bundle::sign(&bytes, &key, 0)?;
        let engine = crate::Engine::start(crate::Config {
            database_url: format!("sqlite://{}", dir.join("probe.db").display()),
            data_dir: dir.clone(),
            node_id: "probe".into(),
            max_running: 64,
            lease: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(1),
            node_timeout: Duration::from_secs(4),
            node_grace: Duration::from_secs(60),
            host_command,
            trusted_keys: vec![key.public()],
            vars: Default::default(),
            secrets_key: crate::secrets::SecretsKey::generate().expect("randomness"),
            goons: false,
        })
        .await?;
        engine
            .admit_bundle(bytes, signature.to_text(), "bench")
            .await?;
        Ok(EngineProbe { engine, dir })
    }

    /// Submits an action of `kind` and waits for it; true if it succeeded.
    pub async fn run(&self, kind: &str) -> bool {
        let new = crate::model::NewAction {
            kind: kind.into(),
            target: "probe".into(),
            params: Default::default(),
            idempotency_key: None,
            bundle: None,
            submitted_by: None,
        };
        let Ok(submitted) = self.engine.submit(new).await else {
            return false;
        };
        let id = submitted.action.id;
        matches!(
            self.engine.wait(id, None, Duration::from_secs(30)).await,
            Ok(a) if a.status == crate::model::ActionStatus::Succeeded
        )
    }

    /// Time the store has spent committing so far.
    pub fn commit_time(&self) -> Duration {
        let micros = self
            .engine
            .store()
            .stats()
            .commit_micros
            .load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_micros(micros)
    }
}

impl Drop for EngineProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
