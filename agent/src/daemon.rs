//! The agent daemon assembled from its parts: configuration → TLS → task manager over an executor
//! → link; plus the executor over the Docker sandbox and the shutdown sequence.
//!
//! Owns the order of start and stop: the link runs until shutdown is asked; then no new task is
//! accepted, running tasks get `agent.drain_timeout` to finish (their output keeps flowing), the
//! rest are cancelled, and the WebSocket is closed with a close frame.
//!
//! Must never: stop the link because Docker is unavailable (tasks are rejected with the Docker
//! error instead, and Docker is retried in the background), or exit with tasks' unacknowledged
//! output while the drain time has not run out.

use crate::config::Config;
use crate::link::machine::Backoff;
use crate::link::{Link, LinkSettings, LinkStatus};
use crate::sandbox::{Sandbox, SandboxError, SandboxSettings};
use crate::task_io::{TaskInputs, TaskOutputTx, TaskResult};
use crate::tasks::{Executor, TaskManager, TaskSettings};
use crate::tls::{self, TlsError};
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
}

impl AgentError {
    /// Whether the operator must fix the configuration (exit code 2) rather than the environment.
    pub fn is_config(&self) -> bool {
        matches!(self, AgentError::Tls(_))
    }
}

/// How long to wait for running tasks after they were cancelled at the end of the drain.
pub const DEFAULT_CANCEL_WAIT: Duration = Duration::from_secs(30);

/// The assembled agent.
pub struct Agent {
    link: Link,
    tasks: TaskManager,
    drain_timeout: Duration,
    cancel_wait: Duration,
}

impl Agent {
    /// Build from the configuration: reads the certificate files, creates `data_dir`.
    pub fn new(config: &Config, executor: Arc<dyn Executor>) -> Result<Agent, AgentError> {
        create_data_dir(&config.data_dir)?;
        let cp = &config.control_plane;
        let tls = tls::client_config(&cp.ca_file, &cp.cert_file, &cp.key_file, cp.spki_pin)?;
        let mut link = LinkSettings::new(cp.endpoint.clone(), tls, config.agent.name.clone());
        link.backoff = Backoff {
            initial: cp.backoff_initial,
            max: cp.backoff_max,
        };
        link.connect_timeout = cp.connect_timeout;
        link.pool = config.agent.pool.clone();
        link.labels = config.agent.labels.clone();
        let mut tasks = TaskSettings::new(config.agent.slots);
        tasks.max_archive_bytes = Some(config.sandbox_settings().max_archive_bytes);
        Ok(Agent::from_parts(
            link,
            tasks,
            executor,
            config.agent.drain_timeout,
        ))
    }

    /// Build from explicit settings (tests, embedding).
    pub fn from_parts(
        link: LinkSettings,
        tasks: TaskSettings,
        executor: Arc<dyn Executor>,
        drain_timeout: Duration,
    ) -> Agent {
        let tasks = TaskManager::new(tasks, executor);
        Agent {
            link: Link::new(link, tasks.clone()),
            tasks,
            drain_timeout,
            cancel_wait: DEFAULT_CANCEL_WAIT,
        }
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
        let stop = CancellationToken::new();
        let link = tokio::spawn(self.link.run(stop.clone()));
        shutdown.await;
        let tasks = self.tasks;
        tasks.start_draining();
        let held = tasks.held();
        if held > 0 {
            info!(
                tasks = held,
                drain_timeout = %humantime::format_duration(self.drain_timeout),
                "shutting down: accepting no new task, waiting for running ones"
            );
            if tokio::time::timeout(self.drain_timeout, tasks.wait_idle())
                .await
                .is_err()
            {
                warn!(
                    tasks = tasks.held(),
                    "drain time is over; cancelling the tasks still running"
                );
                tasks.cancel_all("the agent is shutting down");
                let _ = tokio::time::timeout(self.cancel_wait, tasks.wait_idle()).await;
            }
        } else {
            info!("shutting down");
        }
        stop.cancel();
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
}

impl SandboxExecutor {
    /// Start preparing the sandbox (connect to Docker, apply the image pull policy, remove
    /// orphaned objects of this agent) and wait at most `first_wait` for the first attempt. On
    /// failure the error is logged and the attempt repeated every `retry`.
    pub async fn start(
        settings: SandboxSettings,
        agent_id: String,
        first_wait: Duration,
        retry: Duration,
    ) -> Arc<SandboxExecutor> {
        let exec = Arc::new(SandboxExecutor {
            state: RwLock::new(Readiness::Unavailable(
                "the Docker sandbox is being prepared".into(),
            )),
        });
        let (attempted_tx, mut attempted) = watch::channel(false);
        let weak = Arc::downgrade(&exec);
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                let result = prepare(settings.clone(), &agent_id).await;
                let Some(exec) = weak.upgrade() else { return };
                match result {
                    Ok(sandbox) => {
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

async fn prepare(settings: SandboxSettings, agent_id: &str) -> Result<Sandbox, SandboxError> {
    let sandbox = Sandbox::connect(settings, agent_id).await?;
    let version = sandbox.engine_version().await?;
    sandbox.ensure_image().await?;
    let removed = sandbox.cleanup_orphans(&[]).await?;
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
}
