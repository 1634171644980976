//! The agent daemon assembled from its parts: configuration → TLS → task manager over an executor
//! → link; plus the executor over the Docker sandbox and the shutdown sequence.
//!
//! Owns the order of start and stop: the link runs until shutdown is asked; then no new task is
//! accepted, running tasks get `agent.drain_timeout` to finish (their output keeps flowing), the
//! rest are cancelled, and the WebSocket is closed with a close frame. Stopping is staged
//! ([`Stop`]): `Drain` as above; `Now` (a second SIGTERM) cancels running tasks at once, cleanly
//! (the sandbox interrupts tofu so it releases locks and writes state), and closes after their
//! results are acknowledged or `cancel_wait` ran out.
//!
//! Must never: stop the link because Docker is unavailable (tasks are rejected with the Docker
//! error instead, and Docker is retried in the background), or exit with tasks' unacknowledged
//! output while the drain time has not run out.

use crate::config::Config;
use crate::link::machine::Backoff;
use crate::link::{Link, LinkSettings, LinkStatus};
use crate::renew::Renewer;
use crate::sandbox::{Sandbox, SandboxError, SandboxSettings};
use crate::spool::journal::TaskJournal;
use crate::spool::{keys, LoadedTask, Spool, SpoolError, SpoolSettings};
use crate::task_io::{TaskInputs, TaskOutputTx, TaskResult};
use crate::tasks::{Executor, TaskManager, TaskSettings};
use crate::tls::{self, TlsError, TlsHandle};
use delegate_protocol::{Outcome, Summary};
use futures_util::future::BoxFuture;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Why the agent could not start. Not retryable without an operator.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The certificate files: a configuration problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot create data_dir {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// The at-rest key (key files in `data_dir/keys`, or `DELEGATE_SPOOL_KEY`).
    #[error("spool key: {0}")]
    Key(#[from] delegate_crypto::CryptoError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl AgentError {
    /// Whether the operator must fix the configuration (exit code 2) rather than the environment.
    pub fn is_config(&self) -> bool {
        matches!(self, AgentError::Tls(_) | AgentError::Key(_))
    }
}

/// The agent's encrypted spool and the tasks it held when the agent stopped.
pub struct Spooled {
    pub spool: Spool,
    pub loaded: Vec<LoadedTask>,
}

impl Spooled {
    /// Tasks whose Docker objects must survive the start-up cleanup: those that will be resumed
    /// (a journal, no `done` yet, spool intact). The objects of every other task are orphans: a
    /// task whose spool is damaged ends `lost` and cannot be followed (its state backend
    /// credentials are unreadable), so its containers go too.
    pub fn live_tasks(&self) -> Vec<uuid::Uuid> {
        self.loaded
            .iter()
            .filter(|t| t.done_seq.is_none() && t.broken.is_none() && t.journal.is_some())
            .map(|t| t.task)
            .collect()
    }
}

/// Open `data_dir/spool` under the agent's keys: `data_dir/keys/` (a first key is generated,
/// 0600, when there is none) plus `env_key`, the value of `DELEGATE_SPOOL_KEY` if set.
pub fn open_spool(config: &Config, env_key: Option<&str>) -> Result<Spooled, AgentError> {
    create_data_dir(&config.data_dir)?;
    let ring = keys::load(&config.data_dir, env_key)?;
    let settings =
        SpoolSettings::with_max(keys::spool_dir(&config.data_dir), config.spool.max_bytes);
    let (spool, loaded) = Spool::open(settings, ring)?;
    if !loaded.is_empty() {
        info!(
            tasks = loaded.len(),
            spool_bytes = spool.usage(),
            "the spool holds tasks from before the restart"
        );
    }
    Ok(Spooled { spool, loaded })
}

/// How long to wait for running tasks after they were cancelled at the end of the drain.
pub const DEFAULT_CANCEL_WAIT: Duration = Duration::from_secs(30);

/// How far shutdown has gone. Only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Running.
    No,
    /// No new task; running ones get `drain_timeout`, then are cancelled.
    Drain,
    /// Cancel running tasks now.
    Now,
}

/// The assembled agent.
pub struct Agent {
    link: Link,
    tasks: TaskManager,
    drain_timeout: Duration,
    cancel_wait: Duration,
    tls: TlsHandle,
    renewer: Option<Renewer>,
}

impl Agent {
    /// Build from the configuration: reads the certificate files, creates `data_dir`; task
    /// output goes through `spooled` (see [`open_spool`]).
    pub fn new(
        config: &Config,
        executor: Arc<dyn Executor>,
        spooled: Spooled,
    ) -> Result<Agent, AgentError> {
        create_data_dir(&config.data_dir)?;
        let cp = &config.control_plane;
        let tls = TlsHandle::new(tls::client_config(
            &cp.ca_file,
            &cp.cert_file,
            &cp.key_file,
            cp.spki_pin,
        )?);
        let mut link =
            LinkSettings::new(cp.endpoint.clone(), tls.clone(), config.agent.name.clone());
        link.renewer = Some(Renewer {
            ca_file: cp.ca_file.clone(),
            cert_file: cp.cert_file.clone(),
            key_file: cp.key_file.clone(),
            spki_pin: cp.spki_pin,
            tls,
            jitter: Renewer::jitter_for(&config.agent.name),
        });
        link.backoff = Backoff {
            initial: cp.backoff_initial,
            max: cp.backoff_max,
        };
        link.connect_timeout = cp.connect_timeout;
        link.pool = config.agent.pool.clone();
        link.labels = config.agent.labels.clone();
        let mut tasks = TaskSettings::new(config.agent.slots);
        tasks.max_archive_bytes = Some(config.sandbox_settings().max_archive_bytes);
        // Tasks' outcomes, step durations, log bytes and egress decisions feed the metrics.
        let executor =
            crate::metrics::MeteredExecutor::new(executor, crate::metrics::global().clone());
        let tasks = TaskManager::with_spool(tasks, executor, spooled.spool, spooled.loaded);
        Ok(Agent::assemble(link, tasks, config.agent.drain_timeout))
    }

    /// Build from explicit settings (tests, embedding).
    pub fn from_parts(
        link: LinkSettings,
        tasks: TaskSettings,
        executor: Arc<dyn Executor>,
        drain_timeout: Duration,
    ) -> Agent {
        Agent::assemble(link, TaskManager::new(tasks, executor), drain_timeout)
    }

    fn assemble(link: LinkSettings, tasks: TaskManager, drain_timeout: Duration) -> Agent {
        let tls = link.tls.clone();
        let renewer = link.renewer.clone();
        Agent {
            link: Link::new(link, tasks.clone()),
            tasks,
            drain_timeout,
            cancel_wait: DEFAULT_CANCEL_WAIT,
            tls,
            renewer,
        }
    }

    /// The TLS configuration the next connection uses (replace it to reload certificates).
    pub fn tls(&self) -> TlsHandle {
        self.tls.clone()
    }

    /// The certificate renewer, if this agent renews.
    pub fn renewer(&self) -> Option<Renewer> {
        self.renewer.clone()
    }

    /// After the drain timeout, how long cancelled tasks get to end and have their `done`
    /// acknowledged before the link closes anyway.
    pub fn with_cancel_wait(mut self, cancel_wait: Duration) -> Agent {
        self.cancel_wait = cancel_wait;
        self
    }

    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.link.status()
    }

    pub fn tasks(&self) -> TaskManager {
        self.tasks.clone()
    }

    /// Run until `shutdown` resolves, then drain and close cleanly.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (tx, rx) = watch::channel(Stop::No);
        let agent = self.run_until(rx);
        tokio::pin!(agent);
        tokio::select! {
            _ = &mut agent => return,
            _ = shutdown => {}
        }
        let _ = tx.send(Stop::Drain);
        agent.await;
    }

    /// Run until `stop` reaches [`Stop::Drain`]; drain; cancel at once if it reaches
    /// [`Stop::Now`] (or the sender is dropped) before the drain is over.
    pub async fn run_until(self, mut stop: watch::Receiver<Stop>) {
        let link_stop = CancellationToken::new();
        let link = tokio::spawn(self.link.run(link_stop.clone()));
        let _ = stop.wait_for(|s| *s >= Stop::Drain).await;
        let tasks = self.tasks;
        tasks.start_draining();
        let held = tasks.held();
        let now = async {
            let _ = stop.wait_for(|s| *s >= Stop::Now).await;
        };
        tokio::pin!(now);
        if held > 0 {
            info!(
                tasks = held,
                drain_timeout = %humantime::format_duration(self.drain_timeout),
                "shutting down: accepting no new task, waiting for running ones (a second SIGTERM cancels them now)"
            );
            let drained = tokio::select! {
                r = tokio::time::timeout(self.drain_timeout, tasks.wait_idle()) => {
                    if r.is_err() {
                        warn!(tasks = tasks.held(), "drain time is over; cancelling the tasks still running");
                    }
                    r.is_ok()
                }
                _ = &mut now => {
                    warn!(tasks = tasks.held(), "asked to stop now; cancelling the tasks still running");
                    false
                }
            };
            if !drained {
                tasks.cancel_all("the agent is shutting down");
                let _ = tokio::time::timeout(self.cancel_wait, tasks.wait_idle()).await;
            }
        } else {
            info!("shutting down");
        }
        link_stop.cancel();
        if let Err(e) = link.await {
            error!(error = %e, "link task ended abnormally");
        }
    }
}

fn create_data_dir(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |e: std::io::Error| AgentError::DataDir {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)
}

enum Readiness {
    Ready(Sandbox),
    Unavailable(String),
}

/// [`Executor`] over the Docker sandbox. Until Docker answers and the image is there, every task
/// is rejected with the reason; preparation is retried in the background.
pub struct SandboxExecutor {
    state: RwLock<Readiness>,
    /// The sandbox once ready, for tasks resumed after a restart (they wait for it).
    ready: watch::Receiver<Option<Sandbox>>,
}

/// How long a task resumed after a restart waits for the Docker sandbox.
const RESUME_WAIT: Duration = Duration::from_secs(600);

impl SandboxExecutor {
    /// Start preparing the sandbox (connect to Docker, apply the image pull policy, remove
    /// orphaned objects of this agent except those of the `live` tasks the spool still holds)
    /// and wait at most `first_wait` for the first attempt. On failure the error is logged and
    /// the attempt repeated every `retry`.
    pub async fn start(
        settings: SandboxSettings,
        agent_id: String,
        live: Vec<uuid::Uuid>,
        first_wait: Duration,
        retry: Duration,
    ) -> Arc<SandboxExecutor> {
        let (ready_tx, ready) = watch::channel(None);
        let exec = Arc::new(SandboxExecutor {
            state: RwLock::new(Readiness::Unavailable(
                "the Docker sandbox is being prepared".into(),
            )),
            ready,
        });
        let (attempted_tx, mut attempted) = watch::channel(false);
        let weak = Arc::downgrade(&exec);
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                let result = prepare(settings.clone(), &agent_id, &live).await;
                let Some(exec) = weak.upgrade() else { return };
                match result {
                    Ok(sandbox) => {
                        let _ = ready_tx.send(Some(sandbox.clone()));
                        exec.set(Readiness::Ready(sandbox));
                        let _ = attempted_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        let reason = format!("Docker sandbox unavailable: {e}");
                        if reason != last_error {
                            error!(
                                error = %e,
                                retry_in = %humantime::format_duration(retry),
                                "the Docker sandbox is not usable; tasks will be rejected until it is"
                            );
                            last_error = reason.clone();
                        }
                        exec.set(Readiness::Unavailable(reason));
                        let _ = attempted_tx.send(true);
                    }
                }
                drop(exec);
                tokio::time::sleep(retry).await;
            }
        });
        let _ = tokio::time::timeout(first_wait, attempted.wait_for(|done| *done)).await;
        exec
    }

    fn set(&self, r: Readiness) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = r;
    }

    fn sandbox(&self) -> Result<Sandbox, String> {
        match &*self.state.read().unwrap_or_else(PoisonError::into_inner) {
            Readiness::Ready(s) => Ok(s.clone()),
            Readiness::Unavailable(r) => Err(r.clone()),
        }
    }
}

async fn prepare(
    settings: SandboxSettings,
    agent_id: &str,
    live: &[uuid::Uuid],
) -> Result<Sandbox, SandboxError> {
    let sandbox = Sandbox::connect(settings, agent_id).await?;
    let version = sandbox.engine_version().await?;
    sandbox.ensure_image().await?;
    let removed = sandbox.cleanup_orphans(live).await?;
    info!(
        docker = %version,
        image = %sandbox.settings().image,
        orphans_removed = removed,
        "Docker sandbox ready"
    );
    Ok(sandbox)
}

impl Executor for SandboxExecutor {
    fn availability(&self) -> Result<(), String> {
        self.sandbox().map(|_| ())
    }

    fn run(
        &self,
        inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        match self.sandbox() {
            Ok(sandbox) => Box::pin(async move { sandbox.run_task(inputs, out, cancel).await }),
            Err(reason) => Box::pin(async move {
                TaskResult {
                    outcome: Outcome::Failed,
                    reason: Some(reason),
                    summary: Summary::default(),
                }
            }),
        }
    }
    fn resume(
        &self,
        journal: TaskJournal,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let mut ready = self.ready.clone();
        Box::pin(async move {
            let waited = tokio::select! {
                r = tokio::time::timeout(RESUME_WAIT, ready.wait_for(Option::is_some)) => {
                    r.ok().and_then(|r| r.ok()).and_then(|s| s.clone())
                }
                _ = cancel.cancelled() => None,
            };
            match waited {
                Some(sandbox) => sandbox.resume_task(journal, out, cancel).await,
                None => TaskResult {
                    outcome: Outcome::Lost,
                    reason: Some(format!(
                        "the agent restarted while the task ran, and the Docker sandbox was not usable within {} to finish it",
                        humantime::format_duration(RESUME_WAIT)
                    )),
                    summary: Summary::default(),
                },
            }
        })
    }
}
