//! The Docker sandbox: runs one tofu task end to end in hardened containers and reports through
//! the task's [`TaskOutputTx`].
//!
//! Owns: the task's Docker objects (one internal network, one workspace volume, one container per
//! step, all labelled with agent, task and pool), the order of steps per operation, the default
//! state backend endpoint on the task network, cancel and timeout of a running step, and removal of
//! everything a task created — whatever the outcome, including errors and a panicking runner.
//!
//! Must never: touch Docker before the workspace archive has passed [`archive::normalise`], mount
//! the Docker socket or a host path into a sandbox (the one exception: the operator's provider
//! filesystem mirror, read-only), listen on anything but a task network's gateway, put a secret
//! value in a log line, an error or a task result reason, keep a task's secret values in memory
//! beyond the task (the copies it holds are zeroized when dropped), or panic on task input.
//!
//! Air-gapped pools ([`crate::mirror`]): with `[sandbox] provider_mirror` or
//! `provider_filesystem_mirror` set, every task's workspace volume gets the tofu CLI
//! configuration naming only the mirror (`.delegate/tofu.tfrc`, written with the workspace), every
//! step the `TF_CLI_CONFIG_FILE` pointing at it (reserved: a task cannot set it), and, for a
//! filesystem mirror, the read-only mount of the mirror directory.
//!
//! The agent is assumed to run on the Docker host (systemd on a VM): the state backend listens on
//! the task network's gateway address, which the host holds on the network's bridge. An agent that
//! itself runs in a container would have to join each task network and listen on its own address
//! there instead; [`docker::TaskNetwork`] is where that choice would be made (not implemented).
//!
//! Submodules: [`archive`] (archive rules, pure), [`steps`] (command lines, env, plan JSON, pure),
//! [`logs`] (redaction and line splitting, pure), [`backend`] (http state backend), [`image`]
//! (pull policy, image build), [`docker`] (container configuration and step runner),
//! [`recover`] (the step journal, and finishing a task after an agent restart).

pub mod archive;
pub mod backend;
pub mod docker;
pub mod egress_wiring;
mod hcl;
pub mod image;
pub mod logs;
pub mod recover;
pub mod steps;

use crate::egress::firewall;
use crate::task_io::{TaskInputs, TaskOutput, TaskOutputTx, TaskResult};
use archive::{ArchiveError, Limits};
use backend::{BackendError, Credentials, StateServer};
use bollard::Docker;
use delegate_protocol::{ChunkKind, LogStream, Op, Outcome, Summary};
use docker::{StepContainer, StepFailure, StepRun};
use egress_wiring::{EgressError, EgressPlan, EgressSettings, FirewallRegistry, TaskEgress};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use steps::{After, BackendEnv, Step, StepError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

pub use docker::{LABEL_AGENT, LABEL_CACHE, LABEL_POOL, LABEL_STEP, LABEL_TASK};
pub use image::{LABEL_BINARY, LABEL_BINARY_VERSION};

/// Longest reason put in a task result.
const MAX_REASON: usize = 2000;
/// Timeout of one Docker API request (until its response headers; streams are not cut).
const DOCKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// When the sandbox image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Never pull; a missing image is an error.
    Never,
    /// Pull only when the image is not present.
    #[default]
    IfMissing,
    /// Pull before every task.
    Always,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Never => "never",
            PullPolicy::IfMissing => "if-missing",
            PullPolicy::Always => "always",
        }
    }
    pub fn parse(s: &str) -> Option<PullPolicy> {
        Some(match s {
            "never" => PullPolicy::Never,
            "if-missing" => PullPolicy::IfMissing,
            "always" => PullPolicy::Always,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    pub image: String,
    pub pull_policy: PullPolicy,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// SIGINT, then this long for tofu to exit, then SIGKILL.
    pub cancel_grace: Duration,
    /// Compressed size of a workspace archive.
    pub max_archive_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_files: u64,
    /// Added to every container, volume and network (tests put their run id here). The agent's
    /// own `io.delegate.*` labels win over same-named entries.
    pub extra_labels: BTreeMap<String, String>,
    /// Mount a per-pool provider plugin cache volume — only into tasks whose workspace carries a
    /// `.terraform.lock.hcl`, so every cached provider is checked against checksums the workspace
    /// pins (a task cannot plant a provider another task would trust).
    pub plugin_cache: bool,
    pub pool: String,
    /// The egress allowlist and how it is enforced (`[egress]`).
    pub egress: EgressSettings,
    /// Air-gapped pools: where tofu installs providers from (`[sandbox] provider_mirror` /
    /// `provider_filesystem_mirror`); `None`: tofu's own defaults (the providers' registries,
    /// through the egress allowlist).
    pub provider_mirror: Option<crate::mirror::ProviderMirror>,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            image: "delegate-sandbox:local".into(),
            pull_policy: PullPolicy::IfMissing,
            memory_bytes: 2 << 30,
            nano_cpus: 1_000_000_000,
            pids_limit: 512,
            default_timeout: Duration::from_secs(3600),
            max_timeout: Duration::from_secs(4 * 3600),
            cancel_grace: Duration::from_secs(10),
            max_archive_bytes: 64 << 20,
            max_unpacked_bytes: 512 << 20,
            max_files: 20_000,
            extra_labels: BTreeMap::new(),
            plugin_cache: false,
            pool: "default".into(),
            egress: EgressSettings::default(),
            provider_mirror: None,
        }
    }
}

impl SandboxSettings {
    /// The timeout of a task asking for `requested_secs` (0: the default), never above the maximum.
    pub fn effective_timeout(&self, requested_secs: u64) -> Duration {
        let wanted = if requested_secs == 0 {
            self.default_timeout
        } else {
            Duration::from_secs(requested_secs)
        };
        wanted.min(self.max_timeout)
    }

    /// What a task needs for the provider mirror, if one is configured.
    fn mirror(&self) -> Option<crate::mirror::MirrorSetup> {
        self.provider_mirror.as_ref().map(crate::mirror::setup)
    }

    /// The agent's own step variables beyond [`steps::build_env`]'s (the mirror's).
    fn mirror_env(mirror: Option<&crate::mirror::MirrorSetup>) -> &[(String, String)] {
        mirror.map(|m| m.env.as_slice()).unwrap_or_default()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_archive_bytes: self.max_archive_bytes,
            max_unpacked_bytes: self.max_unpacked_bytes,
            max_files: self.max_files,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot reach the Docker engine: {0}")]
    Connect(#[source] bollard::errors::Error),
    #[error("Docker {op} failed: {source}")]
    Docker {
        op: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "sandbox image `{image}` is not present and pull_policy is `never`; build it with \
         `delegate sandbox build-image --from-binary PATH --tag {image}`"
    )]
    ImageMissing { image: String },
    #[error("pulling sandbox image `{image}` failed: {message}")]
    Pull { image: String, message: String },
    #[error("building the sandbox image failed: {0}")]
    Build(String),
    #[error("cannot build a sandbox image from {path}: {reason}")]
    Binary { path: String, reason: String },
    #[error("task network {0} has no IPv4 gateway address")]
    NoGateway(String),
    #[error("cannot fetch a file from the workspace: {0}")]
    Download(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Steps(#[from] StepError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Egress(#[from] EgressError),
}

impl SandboxError {
    /// Whether trying again later may succeed (the engine or registry may recover); input and
    /// configuration errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            SandboxError::Connect(_)
            | SandboxError::Docker { .. }
            | SandboxError::Pull { .. }
            | SandboxError::NoGateway(_)
            | SandboxError::Download(_)
            | SandboxError::Backend(_) => true,
            SandboxError::Egress(e) => e.is_retryable(),
            SandboxError::ImageMissing { .. }
            | SandboxError::Build(_)
            | SandboxError::Binary { .. }
            | SandboxError::Archive(_)
            | SandboxError::Steps(_) => false,
        }
    }
}

/// Why a running task was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    TimedOut,
}

/// Cancel token plus the task deadline: whichever comes first stops the task.
#[derive(Debug, Clone)]
pub struct StopSignal {
    cancel: CancellationToken,
    deadline: Instant,
    timeout: Duration,
}

impl StopSignal {
    pub fn new(cancel: CancellationToken, timeout: Duration) -> StopSignal {
        StopSignal {
            cancel,
            deadline: Instant::now() + timeout,
            timeout,
        }
    }

    /// Resolves when the task must stop. Cancel wins over a deadline passed at the same time.
    pub async fn fired(&self) -> StopReason {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => StopReason::Cancelled,
            _ = tokio::time::sleep_until(self.deadline) => StopReason::TimedOut,
        }
    }

    pub fn check(&self) -> Option<StopReason> {
        if self.cancel.is_cancelled() {
            Some(StopReason::Cancelled)
        } else if Instant::now() >= self.deadline {
            Some(StopReason::TimedOut)
        } else {
            None
        }
    }

    /// Run `fut` unless the task is stopped first.
    async fn guard<T, F>(&self, during: &str, fut: F) -> Result<T, Ended>
    where
        F: Future<Output = Result<T, SandboxError>>,
    {
        tokio::select! {
            biased;
            r = self.fired() => Err(Ended::stopped(r, self.timeout, during)),
            v = fut => v.map_err(|e| Ended::failed(e.to_string())),
        }
    }
}

/// How a task ended, when not with success.
#[derive(Debug, Clone, PartialEq)]
struct Ended {
    outcome: Outcome,
    reason: String,
}

impl Ended {
    fn failed(reason: impl Into<String>) -> Ended {
        Ended {
            outcome: Outcome::Failed,
            reason: reason.into(),
        }
    }

    fn stopped(reason: StopReason, timeout: Duration, during: &str) -> Ended {
        match reason {
            StopReason::Cancelled => Ended {
                outcome: Outcome::Cancelled,
                reason: format!("cancelled {during}"),
            },
            StopReason::TimedOut => Ended {
                outcome: Outcome::TimedOut,
                reason: format!(
                    "timed out after {} {during}",
                    humantime::format_duration(timeout)
                ),
            },
        }
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The outcome of a step once it exited, as a pure decision.
fn judge_step(
    step: &Step,
    run_stopped: Option<StopReason>,
    exit_code: i64,
    timeout: Duration,
) -> Result<(), Ended> {
    if let Some(r) = run_stopped {
        return Err(Ended::stopped(
            r,
            timeout,
            &format!("during step `{}`", step.name),
        ));
    }
    if !step.ok_codes.contains(&exit_code) {
        return Err(Ended::failed(format!(
            "step `{}` exited with code {exit_code}",
            step.name
        )));
    }
    Ok(())
}

pub(crate) async fn connect_docker() -> Result<Docker, SandboxError> {
    Docker::connect_with_defaults()
        .map_err(SandboxError::Connect)?
        .with_timeout(DOCKER_REQUEST_TIMEOUT)
        .negotiate_version()
        .await
        .map_err(SandboxError::Connect)
}

struct Inner {
    docker: Docker,
    settings: SandboxSettings,
    agent_id: String,
    /// How task bridges are isolated from the host; `None` when `egress.firewall = "off"`.
    firewall: Option<firewall::Backend>,
    firewalls: FirewallRegistry,
}

/// The sandbox of one agent. Cheap to clone; tasks run concurrently on clones or shared refs.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("agent_id", &self.inner.agent_id)
            .field("image", &self.inner.settings.image)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Connect to the local Docker engine (`DOCKER_HOST` honoured), negotiate the API version.
    pub async fn connect(
        settings: SandboxSettings,
        agent_id: &str,
    ) -> Result<Sandbox, SandboxError> {
        let docker = connect_docker().await?;
        let firewall = egress_wiring::firewall_backend(settings.egress.firewall).await?;
        if firewall.is_none() {
            tracing::warn!(
                "egress.firewall = \"off\": sandboxes can reach services listening on this host's \
                 addresses unless the task bridges are isolated some other way"
            );
        }
        Ok(Sandbox {
            inner: Arc::new(Inner {
                docker,
                settings,
                agent_id: agent_id.to_string(),
                firewall,
                firewalls: FirewallRegistry::default(),
            }),
        })
    }

    pub fn settings(&self) -> &SandboxSettings {
        &self.inner.settings
    }

    /// Docker engine version string, for logs and diagnostics.
    pub async fn engine_version(&self) -> Result<String, SandboxError> {
        let v = self
            .inner
            .docker
            .version()
            .await
            .map_err(|source| SandboxError::Docker {
                op: "version",
                source,
            })?;
        Ok(v.version.unwrap_or_else(|| "unknown".into()))
    }

    /// Apply the pull policy to the configured image.
    pub async fn ensure_image(&self) -> Result<(), SandboxError> {
        let s = &self.inner.settings;
        image::ensure(&self.inner.docker, &s.image, s.pull_policy).await
    }

    /// Remove containers, volumes and networks labelled with this agent whose task is not in
    /// `live`. Returns how many were removed.
    pub async fn cleanup_orphans(&self, live: &[uuid::Uuid]) -> Result<usize, SandboxError> {
        let agent = format!("{LABEL_AGENT}={}", self.inner.agent_id);
        let is_live = |labels: &HashMap<String, String>| {
            labels
                .get(LABEL_TASK)
                .and_then(|t| uuid::Uuid::parse_str(t).ok())
                .is_some_and(|t| live.contains(&t))
        };
        // Firewall rules of orphaned task bridges go with their networks.
        if let Some(backend) = self.inner.firewall {
            for (labels, bridge) in
                docker::task_bridges(&self.inner.docker, std::slice::from_ref(&agent)).await?
            {
                if !is_live(&labels) {
                    FirewallRegistry::release_bridge(backend, &bridge).await;
                }
            }
        }
        docker::remove_labelled(&self.inner.docker, &[agent], is_live).await
    }

    /// Run the whole task. Never panics: every failure is a [`TaskResult`] with outcome `Failed`
    /// and a reason. Everything created for the task is removed before this returns, whatever
    /// the outcome; if this future is dropped early, the runner is aborted and removal still
    /// happens in the background.
    pub async fn run_task(
        &self,
        inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> TaskResult {
        let task = inputs.spec.task_id;
        let timeout = self
            .inner
            .settings
            .effective_timeout(inputs.spec.timeout_secs);
        let stop = StopSignal::new(cancel, timeout);
        let touched = Arc::new(AtomicBool::new(false));
        let runner = tokio::spawn(self.inner.clone().run(inputs, out, stop, touched.clone()));
        let mut guard = CleanupGuard {
            inner: self.inner.clone(),
            task,
            touched: touched.clone(),
            abort: Some(runner.abort_handle()),
        };
        let result = match runner.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%task, error = %e, "task runner died");
                TaskResult {
                    outcome: Outcome::Failed,
                    reason: Some("internal error: the task runner stopped unexpectedly".into()),
                    summary: Summary::default(),
                }
            }
        };
        guard.abort = None;
        if touched.load(Ordering::SeqCst) {
            self.inner.remove_task_objects(task).await;
        }
        result
    }
}

/// Removes a task's objects if `run_task` is dropped before it could.
struct CleanupGuard {
    inner: Arc<Inner>,
    task: uuid::Uuid,
    touched: Arc<AtomicBool>,
    abort: Option<tokio::task::AbortHandle>,
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let Some(abort) = self.abort.take() else {
            return;
        };
        abort.abort();
        if self.touched.load(Ordering::SeqCst) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let inner = self.inner.clone();
                let task = self.task;
                rt.spawn(async move { inner.remove_task_objects(task).await });
            }
        }
    }
}

/// `delegate sandbox build-image --from-binary PATH --tag TAG`: build a `FROM scratch` image holding
/// the static tofu/terraform binary at `/bin/NAME` (no base image, no pull), labelled
/// `io.delegate.binary=tofu|terraform` (detected from its `version` output, else its file name) so
/// steps call the right name, plus `labels`.
pub async fn build_image_from_binary(
    binary: &std::path::Path,
    tag: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), SandboxError> {
    image::build_from_binary(binary, tag, labels).await
}

impl Inner {
    fn labels(&self, task: uuid::Uuid) -> HashMap<String, String> {
        docker::task_labels(
            &self.settings.extra_labels,
            &self.agent_id,
            &self.settings.pool,
            task,
        )
    }

    async fn remove_task_objects(&self, task: uuid::Uuid) {
        // The firewall rules first, the network (and its bridge) after.
        self.firewalls.release(task).await;
        let filter = [
            format!("{LABEL_AGENT}={}", self.agent_id),
            format!("{LABEL_TASK}={task}"),
        ];
        match docker::remove_labelled(&self.docker, &filter, |_| false).await {
            Ok(n) => tracing::debug!(%task, removed = n, "task objects removed"),
            Err(e) => tracing::warn!(%task, error = %e, "could not remove task objects"),
        }
    }

    async fn run(
        self: Arc<Self>,
        inputs: TaskInputs,
        out: TaskOutputTx,
        stop: StopSignal,
        touched: Arc<AtomicBool>,
    ) -> TaskResult {
        let mut summary = Summary::default();
        let mut egress = None;
        let result = self
            .execute(inputs, &out, &stop, &touched, &mut summary, &mut egress)
            .await;
        // Whatever the outcome: revoke the credentials, stop the proxy and deliver its last
        // records before the task's result. The firewall rules and the network go afterwards,
        // in `remove_task_objects`.
        if let Some(e) = egress {
            e.finish().await;
        }
        match result {
            Ok(()) => TaskResult {
                outcome: Outcome::Succeeded,
                reason: None,
                summary,
            },
            Err(e) => TaskResult {
                outcome: e.outcome,
                reason: Some(bounded(e.reason)),
                summary,
            },
        }
    }

    async fn system_line(&self, out: &TaskOutputTx, text: &str) -> Result<(), Ended> {
        let data = bytes::Bytes::from(format!("delegate: {text}\n"));
        out.send(TaskOutput::Log {
            stream: LogStream::System,
            data,
        })
        .await
        .map_err(|_| output_closed())
    }

    async fn execute(
        &self,
        inputs: TaskInputs,
        out: &TaskOutputTx,
        stop: &StopSignal,
        touched: &AtomicBool,
        summary: &mut Summary,
        egress_slot: &mut Option<TaskEgress>,
    ) -> Result<(), Ended> {
        let TaskInputs {
            spec,
            archive,
            plan,
        } = inputs;
        let task = spec.task_id;
        let settings = &self.settings;

        // 1. Everything that can be refused is refused before Docker sees anything.
        let limits = settings.limits();
        let mut ws = tokio::task::spawn_blocking(move || archive::normalise(&archive, &limits))
            .await
            .map_err(|_| Ended::failed("internal error while checking the workspace archive"))?
            .map_err(|e| Ended::failed(e.to_string()))?;
        let steps =
            steps::plan_steps(&spec, plan.is_some()).map_err(|e| Ended::failed(e.to_string()))?;
        for f in &spec.var_files {
            let rel: Vec<&str> = f
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if !ws.has_file(&rel.join("/")) {
                return Err(Ended::failed(format!(
                    "var file {f:?} is not a file of the workspace"
                )));
            }
        }
        egress_wiring::check_task_env(spec.env.keys().chain(spec.secrets.0.keys()))
            .map_err(Ended::failed)?;
        let default_backend = spec.op != Op::Validate && !ws.declares_backend;
        let plugin_cache = settings.plugin_cache && ws.has_lock_file;
        let mirror = settings.mirror();
        let mirror_env = SandboxSettings::mirror_env(mirror.as_ref());
        let placeholder = BackendEnv {
            address: String::new(),
            username: String::new(),
            password: String::new(),
        };
        drop(Zeroizing::new(
            steps::build_env(
                &spec,
                default_backend.then_some(&placeholder),
                plugin_cache,
                mirror_env,
            )
            .map_err(|e| Ended::failed(e.to_string()))?,
        ));
        if default_backend {
            ws.add_file(steps::BACKEND_FILE, steps::BACKEND_FILE_BODY.as_bytes()).map_err(|_| {
                Ended::failed(format!(
                    "workspace file `{}` is reserved: the agent writes it into workspaces that declare no backend",
                    steps::BACKEND_FILE
                ))
            })?;
        }
        if let Some(p) = &plan {
            ws.add_file(steps::PLAN_REL, p)
                .map_err(|e| Ended::failed(e.to_string()))?;
        }
        // Under `.delegate/`, which a workspace archive cannot hold, so this cannot collide.
        if let Some(m) = &mirror {
            ws.add_file(crate::mirror::CLI_CONFIG_REL, m.content.as_bytes())
                .map_err(|e| Ended::failed(e.to_string()))?;
        }
        drop(plan);
        let ws_tar = tokio::task::spawn_blocking(move || ws.into_tar())
            .await
            .map_err(|_| Ended::failed("internal error while packing the workspace"))?
            .map_err(|e| Ended::failed(e.to_string()))?;
        if let Some(r) = stop.check() {
            return Err(Ended::stopped(r, stop.timeout, "before any step"));
        }

        // 2. The task's Docker objects.
        touched.store(true, Ordering::SeqCst);
        let d = &self.docker;
        let labels = self.labels(task);
        let binary = stop
            .guard("while preparing the sandbox image", async {
                image::ensure(d, &settings.image, settings.pull_policy).await?;
                image::binary_of(d, &settings.image).await
            })
            .await?;
        let fail = |e: SandboxError| Ended::failed(e.to_string());
        let bridge = egress_wiring::bridge_name(task);
        let net =
            docker::create_task_network(d, &docker::network_name(task), Some(&bridge), &labels)
                .await
                .map_err(fail)?;
        let volume = docker::volume_name(task);
        docker::create_volume(d, &volume, &labels)
            .await
            .map_err(fail)?;
        let cache_volume = if plugin_cache {
            let name = docker::cache_volume_name(&settings.pool);
            let mut cache_labels: HashMap<String, String> =
                settings.extra_labels.clone().into_iter().collect();
            cache_labels.insert(LABEL_POOL.into(), settings.pool.clone());
            cache_labels.insert(LABEL_CACHE.into(), "plugins".into());
            docker::create_volume(d, &name, &cache_labels)
                .await
                .map_err(fail)?;
            Some(name)
        } else {
            None
        };

        // 3. The default state backend, reachable from the task network only.
        let mut _server: Option<StateServer> = None;
        let mut backend_env = None;
        if default_backend {
            let creds = Credentials::generate();
            let server = StateServer::start(net.gateway, &creds, out.clone())
                .await
                .map_err(|e| Ended::failed(e.to_string()))?;
            backend_env = Some(BackendEnv {
                address: server.url(),
                username: creds.username.clone(),
                password: creds.password.clone(),
            });
            _server = Some(server);
            self.system_line(out, "no backend declared: state is kept by the control plane (http backend served by the agent)")
                .await?;
        }

        // 4. Egress: the task's proxy on the gateway, and the host firewall rules of its bridge,
        //    before any container can start on the network.
        let task_secrets = task_secrets(&spec, backend_env.as_ref());
        let mut protected = crate::egress::local::host_addresses()
            .map_err(|e| fail(EgressError::HostAddresses(e).into()))?;
        protected.extend(docker::network_subnets(d).await.map_err(fail)?);
        let operator = settings.egress.policy.current();
        let mut started = TaskEgress::start(
            EgressPlan {
                task,
                operator,
                requested: &spec.egress,
                gateway: net.gateway,
                subnet: net.subnet,
                bridge: &net.bridge,
                backend_port: _server.as_ref().map(|s| s.addr().port()),
                protected,
            },
            &settings.egress,
            self.firewall.map(|b| (&self.firewalls, b)),
            out.clone(),
            task_secrets.to_vec(),
        )
        .await
        .map_err(|e| fail(e.into()))?;
        let egress_env = started.env.clone();
        let egress_password = started.password.clone();
        let refused = std::mem::take(&mut started.refused);
        *egress_slot = Some(started);
        for (entry, why) in refused {
            let text = format!("egress entry {entry:?} not granted: {why}");
            send(
                out,
                TaskOutput::Event(delegate_protocol::EventKind::Notice {
                    level: "warn".into(),
                    text: bounded(text.clone()),
                }),
            )
            .await?;
            self.system_line(out, &text).await?;
        }

        // 5. The workspace into the volume.
        let mut tars = vec![ws_tar];
        if cache_volume.is_some() {
            tars.push(
                docker::owned_dir_tar(steps::PLUGIN_CACHE_DIR)
                    .map_err(|e| Ended::failed(e.to_string()))?,
            );
        }
        let prep = docker::prep_config(
            &settings.image,
            &binary,
            labels.clone(),
            &volume,
            cache_volume.as_deref(),
        );
        stop.guard(
            "while uploading the workspace",
            docker::upload_workspace(d, &docker::prep_name(task), prep, tars),
        )
        .await?;

        // From here on an agent restart can finish the task (see `recover`).
        let mut journal = recover::Journaler::new(recover::Prepared {
            image: &settings.image,
            binary: &binary,
            net: &net,
            volume: &volume,
            cache_volume: cache_volume.as_deref(),
            timeout: stop.timeout,
            backend: backend_env
                .as_ref()
                .zip(_server.as_ref().map(|s| s.addr().port())),
            steps: &steps,
        });
        journal.save(out).await?;

        // 6. The steps.
        let mut env = Zeroizing::new(
            steps::build_env(&spec, backend_env.as_ref(), plugin_cache, mirror_env)
                .map_err(|e| Ended::failed(e.to_string()))?,
        );
        env.extend(egress_env);
        let mut secrets = task_secrets;
        secrets.push(egress_password.into_bytes());
        let ro_binds = mirror.map(|m| m.ro_mounts).unwrap_or_default();
        let resources = docker::Resources {
            memory_bytes: settings.memory_bytes,
            nano_cpus: settings.nano_cpus,
            pids_limit: settings.pids_limit,
        };
        let mut plan_exit = None;
        for (index, step) in steps.iter().enumerate() {
            if let Some(r) = stop.check() {
                return Err(Ended::stopped(
                    r,
                    stop.timeout,
                    &format!("before step `{}`", step.name),
                ));
            }
            let mut step_labels = labels.clone();
            step_labels.insert(LABEL_STEP.into(), step.name.into());
            let config = docker::step_config(&StepContainer {
                image: &settings.image,
                binary: &binary,
                args: &step.args,
                env: &env,
                labels: step_labels,
                network: &net.name,
                volume: &volume,
                cache_volume: cache_volume.as_deref(),
                ro_binds: &ro_binds,
                resources,
            });
            let name = docker::step_container_name(task, index, step.name);
            journal.started(out, index).await?;
            let run = docker::run_step(
                d,
                &name,
                config,
                step,
                &secrets,
                stop,
                settings.cancel_grace,
                out,
            )
            .await;
            self.finish_step(
                FinishStep {
                    index,
                    step,
                    collect: step,
                    secrets: &secrets,
                },
                run,
                &mut plan_exit,
                &mut journal,
                out,
                stop,
                summary,
            )
            .await?;
        }
        Ok(())
    }

    /// Everything after a step container ran (or failed to): on failure remove what was created
    /// and say why; else journal the exit, judge it, collect what it produced
    /// ([`Self::after_step`] with `collect`), remove the container and journal the step done.
    /// Shared by a normal run and the steps a resumed task runs afresh ([`recover`]).
    #[allow(clippy::too_many_arguments)]
    async fn finish_step(
        &self,
        f: FinishStep<'_>,
        run: Result<StepRun, (Option<String>, StepFailure)>,
        plan_exit: &mut Option<i64>,
        journal: &mut recover::Journaler,
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
    ) -> Result<(), Ended> {
        let d = &self.docker;
        let run = match run {
            Ok(run) => run,
            Err((id, failure)) => {
                if let Some(id) = id {
                    docker::remove_container(d, &id).await;
                }
                return Err(match failure {
                    StepFailure::Docker(e) => Ended::failed(e.to_string()),
                    StepFailure::OutputClosed => output_closed(),
                    StepFailure::CaptureTooLarge => Ended::failed(format!(
                        "output of step `{}` exceeds {} bytes",
                        f.step.name,
                        docker::MAX_CAPTURE
                    )),
                });
            }
        };
        if f.step.name == "plan" {
            *plan_exit = Some(run.exit_code);
        }
        journal.exited(out, f.index, f.step, &run).await?;
        let after = self
            .after_step(f.collect, &run, *plan_exit, f.secrets, out, stop, summary)
            .await;
        docker::remove_container(d, &run.container).await;
        after?;
        journal.done(out, f.index, summary).await
    }

    /// Judge a finished step and collect what it produced.
    #[allow(clippy::too_many_arguments)]
    async fn after_step(
        &self,
        step: &Step,
        run: &StepRun,
        plan_exit: Option<i64>,
        secrets: &[Vec<u8>],
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
    ) -> Result<(), Ended> {
        judge_step(step, run.stopped, run.exit_code, stop.timeout)?;
        let failed = |e: StepError| Ended::failed(e.to_string());
        match step.after {
            After::Nothing => {}
            After::UploadPlanFile => {
                let data = stop
                    .guard(
                        "while fetching the plan file",
                        docker::download_file(&self.docker, &run.container, steps::PLAN_PATH),
                    )
                    .await?;
                send(
                    out,
                    TaskOutput::Artifact {
                        kind: ChunkKind::Plan,
                        data,
                    },
                )
                .await?;
            }
            After::PlanJson { upload, drift } => {
                let facts = steps::parse_plan_json(&run.stdout).map_err(failed)?;
                steps::apply_plan_facts(summary, facts, drift.then_some(plan_exit == Some(2)));
                if upload {
                    send(
                        out,
                        TaskOutput::Artifact {
                            kind: ChunkKind::PlanJson,
                            data: run.stdout.clone(),
                        },
                    )
                    .await?;
                }
            }
            After::Applied => summary.applied = true,
            After::Outputs => {
                let mut outputs = steps::parse_outputs(&run.stdout).map_err(failed)?;
                steps::redact_json(&mut outputs, secrets);
                summary.outputs = Some(outputs);
            }
        }
        Ok(())
    }
}

/// Which step [`Inner::finish_step`] finishes.
struct FinishStep<'a> {
    index: usize,
    /// The step as run (its name and exit codes).
    step: &'a Step,
    /// The step as collected: the same, or with artifacts the spool already holds left out.
    collect: &'a Step,
    /// For redacting what is collected (outputs).
    secrets: &'a [Vec<u8>],
}

/// Copies of a task's secret values the sandbox holds (for redaction), zeroized when dropped.
pub(crate) type SecretCopies = Zeroizing<Vec<Vec<u8>>>;

/// The task's secret values and its state backend password, as held for redaction.
fn task_secrets(spec: &delegate_protocol::TaskSpec, backend: Option<&BackendEnv>) -> SecretCopies {
    let mut v: Vec<Vec<u8>> = spec
        .secrets
        .0
        .values()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    if let Some(b) = backend {
        v.push(b.password.as_bytes().to_vec());
    }
    Zeroizing::new(v)
}

fn output_closed() -> Ended {
    Ended {
        outcome: Outcome::Cancelled,
        reason: "the task's output channel closed".into(),
    }
}

async fn send(out: &TaskOutputTx, msg: TaskOutput) -> Result<(), Ended> {
    out.send(msg).await.map_err(|_| output_closed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = SandboxSettings::default();
        assert_eq!(s.image, "delegate-sandbox:local");
        assert_eq!(s.pull_policy, PullPolicy::IfMissing);
        assert_eq!(s.memory_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(s.nano_cpus, 1_000_000_000);
        assert_eq!(s.pids_limit, 512);
        assert_eq!(s.default_timeout, Duration::from_secs(3600));
        assert_eq!(s.max_timeout, Duration::from_secs(4 * 3600));
        assert_eq!(s.cancel_grace, Duration::from_secs(10));
        assert_eq!(s.max_archive_bytes, 64 * 1024 * 1024);
        assert_eq!(s.max_unpacked_bytes, 512 * 1024 * 1024);
        assert_eq!(s.max_files, 20_000);
        assert_eq!(s.provider_mirror, None);
        assert_eq!(s.mirror(), None);
        assert!(SandboxSettings::mirror_env(s.mirror().as_ref()).is_empty());
        let s = SandboxSettings {
            provider_mirror: Some(crate::mirror::ProviderMirror::Filesystem(
                "/srv/providers".into(),
            )),
            ..SandboxSettings::default()
        };
        let m = s.mirror().unwrap();
        let names: Vec<&str> = SandboxSettings::mirror_env(Some(&m))
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(names, ["TF_CLI_CONFIG_FILE", "TOFU_CLI_CONFIG_FILE"]);
        assert_eq!(m.ro_mounts.len(), 1);
    }

    #[test]
    fn timeouts_default_and_clamp() {
        let s = SandboxSettings::default();
        assert_eq!(s.effective_timeout(0), Duration::from_secs(3600));
        assert_eq!(s.effective_timeout(30), Duration::from_secs(30));
        assert_eq!(
            s.effective_timeout(10 * 3600),
            Duration::from_secs(4 * 3600)
        );
    }

    #[test]
    fn pull_policy_names() {
        for p in [PullPolicy::Never, PullPolicy::IfMissing, PullPolicy::Always] {
            assert_eq!(PullPolicy::parse(p.as_str()), Some(p));
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
        assert_eq!(PullPolicy::parse("sometimes"), None);
    }

    #[test]
    fn missing_image_error_names_image_and_command() {
        let e = SandboxError::ImageMissing {
            image: "delegate-sandbox:local".into(),
        };
        let text = e.to_string();
        assert!(text.contains("`delegate-sandbox:local`"), "{text}");
        assert!(
            text.contains(
                "delegate sandbox build-image --from-binary PATH --tag delegate-sandbox:local"
            ),
            "{text}"
        );
        assert!(!e.is_retryable());
    }

    #[test]
    fn step_judgement() {
        let step = steps::plan_steps(
            &delegate_protocol::TaskSpec {
                task_id: uuid::Uuid::nil(),
                op: Op::Drift,
                workspace: "w".into(),
                auto_approve: false,
                vars: Default::default(),
                var_files: vec![],
                env: Default::default(),
                secrets: Default::default(),
                archive: delegate_protocol::BlobRef {
                    size: 1,
                    sha256: "0".repeat(64),
                },
                plan: None,
                timeout_secs: 0,
                egress: vec![],
            },
            false,
        )
        .unwrap()
        .remove(1);
        let t = Duration::from_secs(90);
        assert_eq!(judge_step(&step, None, 0, t), Ok(()));
        assert_eq!(judge_step(&step, None, 2, t), Ok(()));
        let e = judge_step(&step, None, 1, t).unwrap_err();
        assert_eq!(e, Ended::failed("step `plan` exited with code 1"));
        let e = judge_step(&step, Some(StopReason::Cancelled), 0, t).unwrap_err();
        assert_eq!(e.outcome, Outcome::Cancelled);
        assert_eq!(e.reason, "cancelled during step `plan`");
        let e = judge_step(&step, Some(StopReason::TimedOut), 130, t).unwrap_err();
        assert_eq!(e.outcome, Outcome::TimedOut);
        assert_eq!(e.reason, "timed out after 1m 30s during step `plan`");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_signal_cancel_and_deadline() {
        let token = CancellationToken::new();
        let stop = StopSignal::new(token.clone(), Duration::from_secs(60));
        assert_eq!(stop.check(), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(stop.check(), Some(StopReason::TimedOut));
        assert_eq!(stop.fired().await, StopReason::TimedOut);
        token.cancel();
        assert_eq!(stop.check(), Some(StopReason::Cancelled), "cancel wins");
        assert_eq!(stop.fired().await, StopReason::Cancelled);

        let stop = StopSignal::new(CancellationToken::new(), Duration::from_secs(5));
        let r = stop
            .guard(
                "while testing",
                std::future::pending::<Result<(), SandboxError>>(),
            )
            .await;
        assert_eq!(r.unwrap_err().outcome, Outcome::TimedOut);
    }

    #[test]
    fn reasons_are_bounded() {
        let long = "é".repeat(MAX_REASON);
        let b = bounded(long);
        assert!(b.len() <= MAX_REASON + '…'.len_utf8());
        assert_eq!(bounded("short".into()), "short");
    }
}
