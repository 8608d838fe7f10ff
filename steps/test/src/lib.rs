//! Run a troupe bundle's kinds in `cargo test`.
//!
//! The harness loads the step library your crate built and its
//! `bundle.toml`, then runs one action of a kind: its steps one after
//! another, in the test's own thread of control, under the manifest's
//! rules — templates resolved against params and earlier outputs, each
//! attempt under `timeout_ms`, retries as `retry` allows (a timeout or a lost
//! node only for an `idempotent` step), cancel honoured between and during
//! steps. It needs no server and no database.
//!
//! Time is virtual: backoffs and [goons](Goon)' delays move the run's clock
//! without sleeping, so a step with a one-minute backoff is tested in
//! milliseconds, and the [`Report`] says when each attempt started on that
//! clock. The steps themselves run for real, in this process.
//!
//! ```no_run
//! use troupe_test::{Bundle, Goon, Status};
//!
//! let bundle = Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).unwrap();
//! let report = bundle
//!     .kind("reboot")
//!     .target("vps-123")
//!     .param("hypervisor", "hv-17")
//!     // The first attempt of `wait_network` fails as a slow network would.
//!     .goon(Goon::fail("wait_network").message("no route to host"))
//!     .run()
//!     .unwrap();
//! assert_eq!(report.status, Status::Succeeded);
//! assert_eq!(report.step("wait_network").attempts.len(), 2);
//! ```
//!
//! A step that aborts the process (rather than returning an error) takes the
//! test with it: on a server it would crash only its step host. Use
//! [`Goon::crash`] to see what troupe does when a host crashes.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use troupe_bundle::Manifest;
use troupe_bundle::manifest::KindDef;
use troupe_bundle::params::ParamError;
use troupe_bundle::plugin::Plugin;
use troupe_bundle::rules::{self, Ending};
use troupe_bundle::template;

mod report;

pub use report::{AttemptReport, Outcome, Report, Status, StepReport, StepStatus};
use troupe_bundle::goon::Act;
pub use troupe_bundle::goon::Goon;

/// Why a bundle could not be loaded or an action not run: what a server
/// would have refused before running anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<troupe_bundle::Invalid> for Error {
    fn from(e: troupe_bundle::Invalid) -> Error {
        Error(e.to_string())
    }
}

/// A bundle's manifest and its loaded step library.
pub struct Bundle {
    manifest: Manifest,
    plugin: Arc<Plugin>,
}

impl Bundle {
    /// The bundle of the crate at `dir` (pass `env!("CARGO_MANIFEST_DIR")`):
    /// its `bundle.toml`, and the library cargo built for it, found next to
    /// the running test (`target/<profile>/deps` or `target/<profile>`).
    /// The crate must build a `cdylib` (`crate-type = ["cdylib", "rlib"]`,
    /// so that `cargo test` builds it).
    pub fn of_crate(dir: impl AsRef<Path>) -> Result<Bundle, Error> {
        let path = dir.as_ref().join("bundle.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
        let manifest = Manifest::parse(&text)?;
        let file = manifest.library_file();
        let exe = std::env::current_exe()
            .map_err(|e| Error(format!("cannot find the running test binary: {e}")))?;
        let places: Vec<PathBuf> = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join(&file))
            .collect();
        let Some(library) = places.iter().find(|p| p.is_file()) else {
            return Err(Error(format!(
                "{file} was not built: looked in {}. Check that Cargo.toml has \
                 crate-type = [\"cdylib\", \"rlib\"] under [lib] and that bundle.toml's \
                 `library` is the crate's library name",
                places
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        };
        Bundle::load(manifest, library)
    }

    /// The bundle described by the manifest at `manifest`, with the step
    /// library at `library`.
    pub fn open(manifest: impl AsRef<Path>, library: impl AsRef<Path>) -> Result<Bundle, Error> {
        let path = manifest.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
        Bundle::load(Manifest::parse(&text)?, library.as_ref())
    }

    /// Loads the library and checks it exports every function the manifest
    /// names, for the ABI it says: the checks `troupe bundle build` makes.
    fn load(manifest: Manifest, library: &Path) -> Result<Bundle, Error> {
        let plugin = Plugin::load(library)
            .map_err(|e| Error(format!("cannot load {}: {e}", library.display())))?;
        manifest.check_new()?;
        if plugin.abi() != manifest.abi {
            return Err(Error(format!(
                "bundle.toml says abi = {}, but the library was built for ABI {}; set abi = {}",
                manifest.abi,
                plugin.abi(),
                plugin.abi()
            )));
        }
        let missing: Vec<&str> = manifest
            .functions()
            .into_iter()
            .filter(|f| !plugin.steps().iter().any(|s| s == f))
            .collect();
        if !missing.is_empty() {
            return Err(Error(format!(
                "bundle.toml names functions the library does not export: {} (it exports: {}); \
                 fix the manifest's `function =` or export them with troupe_sdk::export_steps!",
                missing.join(", "),
                plugin.steps().join(", ")
            )));
        }
        Ok(Bundle {
            manifest,
            plugin: Arc::new(plugin),
        })
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// An action of `kind`, to set up and [run](Run::run).
    pub fn kind(&self, kind: &str) -> Run<'_> {
        Run {
            bundle: self,
            kind: kind.to_owned(),
            id: 1,
            target: "test".to_owned(),
            params: Map::new(),
            vars: Map::new(),
            secrets: BTreeMap::new(),
            goons: Vec::new(),
            grace: Duration::from_secs(2),
        }
    }
}

/// One action of a kind, being set up. [`Run::run`] runs it.
#[must_use = "an action runs only when `run` is called"]
pub struct Run<'b> {
    bundle: &'b Bundle,
    kind: String,
    id: i64,
    target: String,
    params: Map<String, Value>,
    vars: Map<String, Value>,
    secrets: BTreeMap<String, String>,
    goons: Vec<Goon>,
    grace: Duration,
}

impl Run<'_> {
    /// The action's target (default `test`).
    pub fn target(mut self, target: &str) -> Self {
        self.target = target.to_owned();
        self
    }

    /// The action's id, as steps see it (default 1).
    pub fn id(mut self, id: i64) -> Self {
        self.id = id;
        self
    }

    /// A param, as `--param`/`--param-json` would give it; checked against
    /// the kind's declarations, defaults filled in, when the action runs.
    pub fn param(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.params.insert(name.to_owned(), value.into());
        self
    }

    /// A deployment variable (`{{vars.NAME}}`), as `troupe serve --var` sets.
    pub fn var(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.vars.insert(name.to_owned(), value.into());
        self
    }

    /// A secret (`{{secrets.NAME}}`), as `troupe secrets set` stores.
    pub fn secret(mut self, name: &str, value: &str) -> Self {
        self.secrets.insert(name.to_owned(), value.to_owned());
        self
    }

    /// A fault to inject; goons act in the order added, the first that
    /// matches an attempt wins.
    pub fn goon(mut self, goon: Goon) -> Self {
        self.goons.push(goon);
        self
    }

    /// How long a step that overran its timeout, or was cancelled, has to
    /// return before it is given up on (default 2 s, as `troupe serve --cancel-grace`).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Runs the action to its end. An `Err` is what a server would refuse
    /// at submit: an unknown kind, bad or missing params, an unset var.
    pub fn run(mut self) -> Result<Report, Error> {
        let manifest = &self.bundle.manifest;
        let Some(kind) = manifest.kinds.get(&self.kind) else {
            let known: Vec<&str> = manifest.kinds.keys().map(String::as_str).collect();
            return Err(Error(format!(
                "unknown action kind {:?}; known kinds: {}",
                self.kind,
                known.join(", ")
            )));
        };
        kind.params.apply(&mut self.params).map_err(|e| match e {
            ParamError::Missing(names) => Error(format!(
                "action kind {:?} needs the params {}",
                self.kind,
                names.join(", ")
            )),
            ParamError::Invalid(message) => Error(message),
        })?;
        if let Some(var) = troupe_bundle::manifest::vars_used(kind)
            .into_iter()
            .find(|v| !self.vars.contains_key(v))
        {
            return Err(Error(format!(
                "action kind {:?} needs the deployment variable {var:?}; set it with .var({var:?}, …)",
                self.kind
            )));
        }
        kind.params
            .check_allowed(&self.params, &self.vars)
            .map_err(Error)?;
        Ok(Runner {
            run: &self,
            kind,
            clock: Duration::ZERO,
            acted: vec![0; self.goons.len()],
        }
        .steps())
    }
}

/// A run under way: the action's state and its virtual clock.
struct Runner<'r> {
    run: &'r Run<'r>,
    kind: &'r KindDef,
    clock: Duration,
    /// How many times each goon acted.
    acted: Vec<u32>,
}

impl<'r> Runner<'r> {
    fn steps(mut self) -> Report {
        let run = self.run;
        let manifest = &run.bundle.manifest;
        let mut steps: Vec<StepReport> = self
            .kind
            .steps
            .iter()
            .map(|u| StepReport {
                name: u.name().to_owned(),
                status: StepStatus::NotRun,
                output: None,
                attempts: Vec::new(),
            })
            .collect();
        let mut outputs = Map::new();
        let cancel = AtomicU32::new(0);
        for (seq, step_use) in self.kind.steps.iter().enumerate() {
            let name = step_use.name();
            let def = &manifest.steps[&step_use.step];
            let report = &mut steps[seq];
            let mut failures = rules::Failures::default();
            for attempt in 1.. {
                if cancel.load(Ordering::Relaxed) != 0 {
                    return self.end(steps, Status::Cancelled, Some(CANCELLED.to_owned()));
                }
                let goon = self.goon(name, attempt);
                if matches!(goon.map(|g| &g.act), Some(Act::Cancel)) {
                    cancel.store(1, Ordering::Relaxed);
                }
                let started_at = self.clock;
                let mut scope = self.scope(&outputs);
                scope["secrets"] = json!(run.secrets);
                let (outcome, log, took) = match template::resolve(&step_use.settings, &scope) {
                    Err(e) => (
                        Outcome::Fatal(format!("invalid settings: {e}")),
                        Vec::new(),
                        Duration::ZERO,
                    ),
                    Ok(settings) => {
                        let bundle = [manifest.name.as_str(), &manifest.version, ""];
                        let input = template::input(&scope, settings, &outputs, attempt, bundle);
                        let call = Call {
                            plugin: &run.bundle.plugin,
                            name,
                            function: def.function(&step_use.step),
                            timeout: def.timeout(),
                            grace: run.grace,
                        };
                        call.run(goon.map(|g| &g.act), input, &cancel)
                    }
                };
                self.clock += took;
                let cancelled = cancel.load(Ordering::Relaxed) != 0;
                report.attempts.push(AttemptReport {
                    number: attempt,
                    started_at,
                    took,
                    outcome: outcome.clone(),
                    log,
                    goon: goon.is_some(),
                });
                let (error, ending) = match outcome {
                    Outcome::Succeeded(output) => {
                        report.status = StepStatus::Succeeded;
                        report.output = Some(output.clone());
                        outputs.insert(name.to_owned(), output);
                        break;
                    }
                    _ if cancelled => {
                        report.status = StepStatus::Cancelled;
                        return self.end(steps, Status::Cancelled, Some(CANCELLED.to_owned()));
                    }
                    Outcome::Cancelled => unreachable!("only a cancel sets it"),
                    Outcome::Retryable(m) => (m, Ending::Retryable),
                    Outcome::Fatal(m) => (m, Ending::Fatal),
                    Outcome::TimedOut(m) => (m, Ending::TimedOut),
                    Outcome::Lost(m) => (m, Ending::Lost),
                };
                if failures.after(ending, &def.retry, def.idempotent) {
                    self.clock += failures.backoff(&def.retry);
                    continue;
                }
                report.status = StepStatus::Failed;
                let attempts = if attempt > 1 {
                    format!(" (after {attempt} attempts)")
                } else {
                    String::new()
                };
                let error = format!("step {name:?} failed{attempts}: {error}");
                return self.end(steps, Status::Failed, Some(error));
            }
        }
        if cancel.load(Ordering::Relaxed) != 0 {
            return self.end(steps, Status::Cancelled, Some(CANCELLED.to_owned()));
        }
        self.end(steps, Status::Succeeded, None)
    }

    /// The first goon that acts on this attempt, counted.
    fn goon(&mut self, step: &str, attempt: u32) -> Option<&'r Goon> {
        let run = self.run;
        let (i, goon) = run.goons.iter().enumerate().find(|(i, g)| {
            g.acts_on(&run.kind, step, attempt) && g.times.is_none_or(|n| self.acted[*i] < n)
        })?;
        self.acted[i] += 1;
        Some(goon)
    }

    fn end(self, steps: Vec<StepReport>, status: Status, error: Option<String>) -> Report {
        Report {
            status,
            error,
            steps,
            elapsed: self.clock,
        }
    }

    /// What templates see, as on a server.
    fn scope(&self, outputs: &Map<String, Value>) -> Value {
        let run = self.run;
        let action = template::Action {
            id: run.id,
            kind: &run.kind,
            target: &run.target,
            params: &run.params,
        };
        template::scope(action, outputs, &run.vars)
    }
}

/// The error of an action cancelled on request, as a server words it.
const CANCELLED: &str = "cancelled on request";

/// One attempt of one step.
struct Call<'a> {
    plugin: &'a Arc<Plugin>,
    name: &'a str,
    function: &'a str,
    timeout: Duration,
    grace: Duration,
}

impl Call<'_> {
    /// The attempt's outcome, its log and how long it took (virtual time
    /// for what a goon stood in for).
    fn run(
        &self,
        goon: Option<&Act>,
        input: Value,
        cancel: &AtomicU32,
    ) -> (Outcome, Vec<String>, Duration) {
        let instant = |outcome| (outcome, Vec::new(), Duration::ZERO);
        if let Some((d, overruns)) = goon.and_then(|g| g.delay(self.timeout)) {
            if overruns {
                return (Outcome::TimedOut(self.timed_out()), Vec::new(), d);
            }
            let (outcome, log, took) = self.call(input, cancel);
            return (outcome, log, took + d);
        }
        match goon {
            Some(Act::Fail {
                retryable: true,
                message,
            }) => instant(Outcome::Retryable(message.clone())),
            Some(Act::Fail {
                retryable: false,
                message,
            }) => instant(Outcome::Fatal(message.clone())),
            Some(Act::Crash) => instant(Outcome::Fatal(troupe_bundle::goon::CRASHED.to_owned())),
            Some(Act::LoseNode { node }) => instant(Outcome::Lost(troupe_bundle::goon::lost(
                node.as_deref().unwrap_or("node-1"),
            ))),
            Some(Act::Output { output }) => instant(Outcome::Succeeded(output.clone())),
            Some(Act::Delay { .. }) => unreachable!("handled above"),
            Some(Act::Cancel) | None => self.call(input, cancel),
        }
    }

    fn timed_out(&self) -> String {
        format!(
            "step {:?} timed out after {} ms",
            self.name,
            self.timeout.as_millis()
        )
    }

    /// Calls the step on a thread of its own, under its timeout (real time:
    /// the step runs for real), then the grace.
    fn call(&self, input: Value, cancel: &AtomicU32) -> (Outcome, Vec<String>, Duration) {
        let flag = Arc::new(AtomicU32::new(cancel.load(Ordering::Relaxed)));
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let input = serde_json::to_vec(&input).expect("JSON serializes");
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        std::thread::Builder::new()
            .name(format!("step {}", self.name))
            .spawn({
                let (plugin, function) = (self.plugin.clone(), self.function.to_owned());
                let (flag, log) = (flag.clone(), log.clone());
                move || {
                    let keep = |line: &[u8]| {
                        let line = String::from_utf8_lossy(line).into_owned();
                        log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    };
                    let _ = tx.send(plugin.call(&function, &input, &flag, &keep));
                }
            })
            .expect("a thread for the step");
        let outcome = match rx.recv_timeout(self.timeout) {
            Ok((status, body)) => Outcome::from(troupe_bundle::plugin::answer(status, &body)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                flag.store(1, Ordering::Relaxed);
                let why = self.timed_out();
                match rx.recv_timeout(self.grace) {
                    Ok(_) => Outcome::TimedOut(why),
                    Err(_) => Outcome::TimedOut(format!(
                        "{why} and did not stop within {} ms",
                        self.grace.as_millis()
                    )),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Outcome::Fatal("the step's thread ended without an answer".to_owned())
            }
        };
        let took = started.elapsed();
        let log = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
        (outcome, log, took)
    }
}
