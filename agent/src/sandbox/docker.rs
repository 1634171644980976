//! Docker objects of a task: names, labels, the hardened container configuration, the per-task
//! network and volume, running one step with its output streamed as produced, and removal.
//!
//! Owns: every `create_*` call the sandbox makes and the security settings of the containers.
//! Must never: mount the Docker socket, mount a host path other than the operator's read-only
//! provider filesystem mirror ([`StepContainer::ro_binds`], from `[sandbox]
//! provider_filesystem_mirror`, never from a task), mount anything of the host writable, start a
//! container without the hardening of [`step_config`], or create an object without the task's
//! labels.

use super::logs::{Redactor, StreamLog, PARTIAL_FLUSH_AFTER};
use super::steps::{Step, PLUGIN_CACHE_DIR, WORKDIR};
use super::{SandboxError, StopReason, StopSignal};
use crate::egress::rules::Cidr;
use crate::task_io::{TaskOutput, TaskOutputTx};
use bollard::container::{
    AttachContainerOptions, Config, CreateContainerOptions, DownloadFromContainerOptions,
    KillContainerOptions, ListContainersOptions, LogOutput, RemoveContainerOptions,
    UploadToContainerOptions, WaitContainerOptions,
};
use bollard::models::{
    HostConfig, HostConfigLogConfig, Mount, MountBindOptions, MountBindOptionsPropagationEnum,
    MountTypeEnum, MountVolumeOptions,
};
use bollard::network::{CreateNetworkOptions, InspectNetworkOptions, ListNetworksOptions};
use bollard::volume::{CreateVolumeOptions, ListVolumesOptions, RemoveVolumeOptions};
use bollard::Docker;
use bytes::Bytes;
use delegate_protocol::{EventKind, LogStream};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

pub const LABEL_AGENT: &str = "io.delegate.agent";
pub const LABEL_TASK: &str = "io.delegate.task";
pub const LABEL_POOL: &str = "io.delegate.pool";
pub const LABEL_STEP: &str = "io.delegate.step";
pub const LABEL_CACHE: &str = "io.delegate.cache";
/// The sandbox user, as Docker's `User`.
pub const SANDBOX_USER: &str = "65534:65534";
pub const TMPFS_OPTIONS: &str = "rw,noexec,nosuid,size=256m";
/// Largest stdout a step may hand to the agent as data (`show -json`, `output -json`).
pub const MAX_CAPTURE: usize = 256 * 1024 * 1024;
/// Largest file fetched back from a volume (the plan file).
pub const MAX_DOWNLOAD: usize = 512 * 1024 * 1024;
/// After SIGKILL, how long to wait for Docker to report the exit before giving up on the step.
pub(super) const AFTER_KILL_WAIT: Duration = Duration::from_secs(60);

/// Labels of every object of a task. The agent's own labels override same-named extra labels.
pub fn task_labels(
    extra: &BTreeMap<String, String>,
    agent_id: &str,
    pool: &str,
    task: Uuid,
) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = extra.clone().into_iter().collect();
    l.insert(LABEL_AGENT.into(), agent_id.into());
    l.insert(LABEL_TASK.into(), task.to_string());
    l.insert(LABEL_POOL.into(), pool.into());
    l
}

pub fn network_name(task: Uuid) -> String {
    format!("delegate-{task}-net")
}
pub fn volume_name(task: Uuid) -> String {
    format!("delegate-{task}-ws")
}
pub fn prep_name(task: Uuid) -> String {
    format!("delegate-{task}-prep")
}
pub fn step_container_name(task: Uuid, index: usize, step: &str) -> String {
    format!("delegate-{task}-{index}-{step}")
}
/// The per-pool plugin cache volume; the pool name is reduced to Docker's name alphabet.
pub fn cache_volume_name(pool: &str) -> String {
    let clean: String = pool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, pool.as_bytes());
    format!(
        "delegate-plugins-{clean}-{}",
        hex::encode(&digest.as_ref()[..4])
    )
}

/// Container resources from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
}

/// Everything that varies between step containers.
#[derive(Debug, Clone)]
pub struct StepContainer<'a> {
    pub image: &'a str,
    pub binary: &'a str,
    pub args: &'a [String],
    pub env: &'a [String],
    pub labels: HashMap<String, String>,
    pub network: &'a str,
    pub volume: &'a str,
    pub cache_volume: Option<&'a str>,
    /// Host directories mounted read-only: (host path, container path). Only the operator's
    /// provider filesystem mirror goes here.
    pub ro_binds: &'a [(PathBuf, String)],
    pub resources: Resources,
}

fn volume_mount(source: &str, target: &str) -> Mount {
    Mount {
        target: Some(target.into()),
        source: Some(source.into()),
        typ: Some(MountTypeEnum::VOLUME),
        read_only: Some(false),
        // Never copy image content into the volume: it holds only what the agent uploaded.
        volume_options: Some(MountVolumeOptions {
            no_copy: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mounts(volume: &str, cache_volume: Option<&str>) -> Vec<Mount> {
    let mut m = vec![volume_mount(volume, WORKDIR)];
    if let Some(c) = cache_volume {
        m.push(volume_mount(c, PLUGIN_CACHE_DIR));
    }
    m
}

/// A read-only bind mount of a host directory, with no mount propagation back to the host.
fn ro_bind(source: &std::path::Path, target: &str) -> Mount {
    Mount {
        target: Some(target.into()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountTypeEnum::BIND),
        read_only: Some(true),
        bind_options: Some(MountBindOptions {
            propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The hardened configuration of a step container.
pub fn step_config(s: &StepContainer<'_>) -> Config<String> {
    let host = HostConfig {
        memory: Some(s.resources.memory_bytes),
        // No swap beyond the memory limit.
        memory_swap: Some(s.resources.memory_bytes),
        nano_cpus: Some(s.resources.nano_cpus),
        pids_limit: Some(s.resources.pids_limit),
        init: Some(true),
        privileged: Some(false),
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            TMPFS_OPTIONS.to_string(),
        )])),
        mounts: Some(
            mounts(s.volume, s.cache_volume)
                .into_iter()
                .chain(s.ro_binds.iter().map(|(h, c)| ro_bind(h, c)))
                .collect(),
        ),
        binds: None,
        network_mode: Some(s.network.into()),
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        auto_remove: Some(false),
        ipc_mode: Some("private".into()),
        ..Default::default()
    };
    Config {
        image: Some(s.image.into()),
        entrypoint: Some(vec![s.binary.into()]),
        cmd: Some(s.args.to_vec()),
        env: Some(s.env.to_vec()),
        user: Some(SANDBOX_USER.into()),
        working_dir: Some(WORKDIR.into()),
        labels: Some(s.labels.clone()),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(false),
        tty: Some(false),
        stop_signal: Some("SIGINT".into()),
        host_config: Some(host),
        ..Default::default()
    }
}

/// The never-started helper container through which the workspace is uploaded into the volume.
/// Its root filesystem stays writable because Docker refuses uploads to `/` otherwise; it never
/// runs anything.
pub fn prep_config(
    image: &str,
    binary: &str,
    labels: HashMap<String, String>,
    volume: &str,
    cache_volume: Option<&str>,
) -> Config<String> {
    Config {
        image: Some(image.into()),
        entrypoint: Some(vec![binary.into()]),
        cmd: Some(vec!["version".into()]),
        user: Some(SANDBOX_USER.into()),
        labels: Some(labels),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            mounts: Some(mounts(volume, cache_volume)),
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            privileged: Some(false),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn docker_err(op: &'static str) -> impl FnOnce(bollard::errors::Error) -> SandboxError {
    move |source| SandboxError::Docker { op, source }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The task's internal network: its name and the host-side gateway address on its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNetwork {
    pub name: String,
    /// Where agent services for the task (state backend, egress proxy) listen. Only containers on
    /// this network reach it.
    pub gateway: IpAddr,
    /// The network's IPv4 subnet (the egress proxy accepts the task's credentials only from it).
    pub subnet: Option<Cidr>,
    /// The bridge interface on the host (the host firewall rules are bound to it).
    pub bridge: String,
}

/// Docker's option naming a bridge network's interface.
pub const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

pub async fn create_network(
    docker: &Docker,
    name: &str,
    labels: &HashMap<String, String>,
) -> Result<TaskNetwork, SandboxError> {
    create_task_network(docker, name, None, labels).await
}

/// Create the internal network, on a bridge interface named `bridge` when given (else Docker's
/// `br-<id>`), and read back its gateway, subnet and bridge.
pub async fn create_task_network(
    docker: &Docker,
    name: &str,
    bridge: Option<&str>,
    labels: &HashMap<String, String>,
) -> Result<TaskNetwork, SandboxError> {
    let mut options = HashMap::new();
    if let Some(b) = bridge {
        options.insert(BRIDGE_NAME_OPTION.to_string(), b.to_string());
    }
    let opts = CreateNetworkOptions {
        name: name.to_string(),
        check_duplicate: true,
        driver: "bridge".to_string(),
        internal: true,
        labels: labels.clone(),
        options,
        ..Default::default()
    };
    docker
        .create_network(opts)
        .await
        .map_err(docker_err("create network"))?;
    let net = docker
        .inspect_network(name, None::<InspectNetworkOptions<String>>)
        .await
        .map_err(docker_err("inspect network"))?;
    let configs = net.ipam.and_then(|i| i.config).unwrap_or_default();
    let (gateway, subnet) = configs
        .iter()
        .filter_map(|c| {
            let g = c.gateway.as_deref()?.parse::<IpAddr>().ok()?;
            let s = c.subnet.as_deref().and_then(|s| s.parse::<Cidr>().ok());
            Some((g, s))
        })
        .find(|(g, _)| g.is_ipv4())
        .ok_or_else(|| SandboxError::NoGateway(name.to_string()))?;
    let bridge = net
        .options
        .as_ref()
        .and_then(|o| o.get(BRIDGE_NAME_OPTION).cloned())
        .or_else(|| {
            net.id
                .as_deref()
                .map(|id| format!("br-{}", &id[..id.len().min(12)]))
        })
        .unwrap_or_default();
    Ok(TaskNetwork {
        name: name.to_string(),
        gateway,
        subnet,
        bridge,
    })
}

/// The subnets of every Docker network on this engine (the egress proxy refuses them unless a
/// rule explicitly allows one).
pub async fn network_subnets(docker: &Docker) -> Result<Vec<Cidr>, SandboxError> {
    let networks = docker
        .list_networks(None::<ListNetworksOptions<String>>)
        .await
        .map_err(docker_err("list networks"))?;
    let mut out = Vec::new();
    for n in networks {
        for c in n.ipam.and_then(|i| i.config).unwrap_or_default() {
            if let Some(net) = c.subnet.as_deref().and_then(|s| s.parse::<Cidr>().ok()) {
                if !out.contains(&net) {
                    out.push(net);
                }
            }
        }
    }
    Ok(out)
}

/// The bridge interfaces of this agent's task networks matching `labels`, with the task each
/// belongs to (for removing firewall rules of networks a previous run left behind).
pub async fn task_bridges(
    docker: &Docker,
    labels: &[String],
) -> Result<Vec<(HashMap<String, String>, String)>, SandboxError> {
    let filters = HashMap::from([("label".to_string(), labels.to_vec())]);
    let networks = docker
        .list_networks(Some(ListNetworksOptions { filters }))
        .await
        .map_err(docker_err("list networks"))?;
    Ok(networks
        .into_iter()
        .filter_map(|n| {
            let bridge = n.options.as_ref()?.get(BRIDGE_NAME_OPTION)?.clone();
            Some((n.labels.unwrap_or_default(), bridge))
        })
        .collect())
}

pub async fn create_volume(
    docker: &Docker,
    name: &str,
    labels: &HashMap<String, String>,
) -> Result<(), SandboxError> {
    let opts = CreateVolumeOptions {
        name: name.to_string(),
        driver: "local".to_string(),
        labels: labels.clone(),
        ..Default::default()
    };
    docker
        .create_volume(opts)
        .await
        .map_err(docker_err("create volume"))?;
    Ok(())
}

/// A tar holding only `DIR/` owned by the sandbox user: uploaded at `/` it makes a freshly
/// mounted volume's root writable for the sandbox.
pub fn owned_dir_tar(dir: &str) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(super::archive::SANDBOX_UID);
    h.set_gid(super::archive::SANDBOX_GID);
    h.set_size(0);
    b.append_data(
        &mut h,
        format!("{}/", dir.trim_matches('/')),
        std::io::empty(),
    )?;
    b.into_inner()
}

/// Create the helper container, upload the workspace (and cache-root) tars at `/`, remove it.
pub async fn upload_workspace(
    docker: &Docker,
    name: &str,
    config: Config<String>,
    tars: Vec<Vec<u8>>,
) -> Result<(), SandboxError> {
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_string(),
                platform: None,
            }),
            config,
        )
        .await
        .map_err(docker_err("create upload container"))?;
    let mut result = Ok(());
    for tar in tars {
        let opts = UploadToContainerOptions {
            path: "/".to_string(),
            no_overwrite_dir_non_dir: "1".to_string(),
        };
        if let Err(e) = docker
            .upload_to_container(&created.id, Some(opts), Bytes::from(tar))
            .await
        {
            result = Err(SandboxError::Docker {
                op: "upload workspace",
                source: e,
            });
            break;
        }
    }
    remove_container(docker, &created.id).await;
    result
}

pub async fn remove_container(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptions {
        force: true,
        v: false,
        link: false,
    };
    if let Err(e) = docker.remove_container(id, Some(opts)).await {
        if !is_not_found(&e) {
            tracing::warn!(container = id, error = %e, "could not remove container");
        }
    }
}

/// Fetch one regular file from a (stopped) container's filesystem or volumes.
pub async fn download_file(
    docker: &Docker,
    container: &str,
    path: &str,
) -> Result<Vec<u8>, SandboxError> {
    let opts = DownloadFromContainerOptions {
        path: path.to_string(),
    };
    let mut stream = docker.download_from_container(container, Some(opts));
    let mut tar = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(docker_err("download file"))?;
        if tar.len() + chunk.len() > MAX_DOWNLOAD + 64 * 1024 {
            return Err(SandboxError::Download(format!(
                "{path} is larger than {MAX_DOWNLOAD} bytes"
            )));
        }
        tar.extend_from_slice(&chunk);
    }
    first_file_of_tar(&tar)
        .ok_or_else(|| SandboxError::Download(format!("{path} is not a regular file")))
}

/// The content of the first regular file of a tar.
pub fn first_file_of_tar(tar: &[u8]) -> Option<Vec<u8>> {
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        if entry.header().entry_type().is_file() {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).ok()?;
            return Some(data);
        }
    }
    None
}

/// Remove every container, network and volume matching all these labels (`key=value`).
/// Containers first (they hold the others). Returns how many objects went.
pub async fn remove_labelled(
    docker: &Docker,
    labels: &[String],
    keep: impl Fn(&HashMap<String, String>) -> bool,
) -> Result<usize, SandboxError> {
    let filters = HashMap::from([("label".to_string(), labels.to_vec())]);
    let mut removed = 0;
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: filters.clone(),
            ..Default::default()
        }))
        .await
        .map_err(docker_err("list containers"))?;
    for c in containers {
        if keep(&c.labels.unwrap_or_default()) {
            continue;
        }
        if let Some(id) = c.id {
            let opts = RemoveContainerOptions {
                force: true,
                v: false,
                link: false,
            };
            match docker.remove_container(&id, Some(opts)).await {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(container = %id, error = %e, "could not remove container"),
            }
        }
    }
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: filters.clone(),
        }))
        .await
        .map_err(docker_err("list networks"))?;
    for n in networks {
        if keep(&n.labels.unwrap_or_default()) {
            continue;
        }
        if let Some(name) = n.name {
            match docker.remove_network(&name).await {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(network = %name, error = %e, "could not remove network"),
            }
        }
    }
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions { filters }))
        .await
        .map_err(docker_err("list volumes"))?;
    for v in volumes.volumes.unwrap_or_default() {
        if keep(&v.labels) {
            continue;
        }
        match docker
            .remove_volume(&v.name, Some(RemoveVolumeOptions { force: true }))
            .await
        {
            Ok(()) => removed += 1,
            Err(e) if is_not_found(&e) => {}
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "could not remove volume"),
        }
    }
    Ok(removed)
}

/// How a step ended.
#[derive(Debug)]
pub struct StepRun {
    pub container: String,
    pub exit_code: i64,
    /// Set when the step was stopped by cancel or timeout.
    pub stopped: Option<StopReason>,
    /// Stdout, when the step captures it.
    pub stdout: Vec<u8>,
    pub duration: Duration,
}

/// Why a step could not run to an exit code.
#[derive(Debug)]
pub enum StepFailure {
    Docker(SandboxError),
    /// The task's output channel closed: nobody is listening any more.
    OutputClosed,
    CaptureTooLarge,
}

/// Sends task output; a closed channel becomes [`StepFailure::OutputClosed`].
async fn send(out: &TaskOutputTx, msg: TaskOutput) -> Result<(), StepFailure> {
    out.send(msg).await.map_err(|_| StepFailure::OutputClosed)
}

async fn send_lines(
    out: &TaskOutputTx,
    stream: LogStream,
    lines: Vec<Bytes>,
) -> Result<(), StepFailure> {
    for data in lines {
        send(out, TaskOutput::Log { stream, data }).await?;
    }
    Ok(())
}

pub(super) async fn kill(docker: &Docker, id: &str, signal: &str) {
    let opts = KillContainerOptions {
        signal: signal.to_string(),
    };
    if let Err(e) = docker.kill_container(id, Some(opts)).await {
        // 409: not running any more, which is what we wanted.
        tracing::debug!(container = id, signal, error = %e, "kill");
    }
}

/// The exit code once the container stopped (-1 when Docker cannot tell).
pub(super) async fn exit_code(docker: &Docker, id: &str) -> i64 {
    let opts = WaitContainerOptions {
        condition: "not-running".to_string(),
    };
    match docker.wait_container(id, Some(opts)).next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        _ => match docker.inspect_container(id, None).await {
            Ok(c) => c.state.and_then(|s| s.exit_code).unwrap_or(-1),
            Err(_) => -1,
        },
    }
}

/// Run one step container to its end: attach before start, stream output as produced, stop it
/// with SIGINT then SIGKILL after `grace` when `stop` fires. The container is left for the
/// caller to read files from and remove.
#[allow(clippy::too_many_arguments)]
pub async fn run_step(
    docker: &Docker,
    name: &str,
    config: Config<String>,
    step: &Step,
    secrets: &[Vec<u8>],
    stop: &StopSignal,
    grace: Duration,
    out: &TaskOutputTx,
) -> Result<StepRun, (Option<String>, StepFailure)> {
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_string(),
                platform: None,
            }),
            config,
        )
        .await
        .map_err(|e| {
            (
                None,
                StepFailure::Docker(SandboxError::Docker {
                    op: "create step container",
                    source: e,
                }),
            )
        })?;
    let id = created.id;
    let fail = |f: StepFailure| (Some(id.clone()), f);
    let attach = AttachContainerOptions::<String> {
        stdout: Some(true),
        stderr: Some(true),
        stream: Some(true),
        logs: Some(false),
        ..Default::default()
    };
    let mut output = docker
        .attach_container(&id, Some(attach))
        .await
        .map_err(|e| {
            fail(StepFailure::Docker(SandboxError::Docker {
                op: "attach",
                source: e,
            }))
        })?
        .output;
    send(
        out,
        TaskOutput::Event(EventKind::StepStarted {
            step: step.name.to_string(),
        }),
    )
    .await
    .map_err(fail)?;
    let started = Instant::now();
    docker
        .start_container::<String>(&id, None)
        .await
        .map_err(|e| {
            fail(StepFailure::Docker(SandboxError::Docker {
                op: "start step container",
                source: e,
            }))
        })?;

    let mut stdout_log = StreamLog::new(Redactor::new(secrets));
    let mut stderr_log = StreamLog::new(Redactor::new(secrets));
    let mut captured = Vec::new();
    let mut capture_overflow = false;
    let mut stdout_flush: Option<Instant> = None;
    let mut stderr_flush: Option<Instant> = None;
    let mut stopped: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);

    loop {
        let next_flush = match (stdout_flush, stderr_flush) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            biased;
            reason = stop.fired(), if stopped.is_none() => {
                tracing::info!(container = %id, ?reason, "stopping step with SIGINT");
                stopped = Some(reason);
                let why = match reason {
                    StopReason::Cancelled => "cancel requested",
                    StopReason::TimedOut => "task timeout reached",
                };
                let line = format!(
                    "delegate: {why}: interrupting step `{}` (SIGINT, then SIGKILL after {})\n",
                    step.name,
                    humantime::format_duration(grace)
                );
                send_lines(out, LogStream::System, vec![Bytes::from(line)]).await.map_err(fail)?;
                kill(docker, &id, "SIGINT").await;
                kill_at = Some(Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(far)), if kill_at.is_some() => {
                tracing::info!(container = %id, "grace period over, SIGKILL");
                kill(docker, &id, "SIGKILL").await;
                kill_at = None;
                give_up_at = Some(Instant::now() + AFTER_KILL_WAIT);
            }
            _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(far)), if give_up_at.is_some() => {
                tracing::warn!(container = %id, "no exit reported after SIGKILL; leaving the step");
                break;
            }
            _ = tokio::time::sleep_until(next_flush.unwrap_or_else(far)), if next_flush.is_some() => {
                let now = Instant::now();
                if stdout_flush.is_some_and(|t| t <= now) {
                    stdout_flush = None;
                    if let Some(p) = stdout_log.flush_partial() {
                        send_lines(out, LogStream::Stdout, vec![p]).await.map_err(fail)?;
                    }
                }
                if stderr_flush.is_some_and(|t| t <= now) {
                    stderr_flush = None;
                    if let Some(p) = stderr_log.flush_partial() {
                        send_lines(out, LogStream::Stderr, vec![p]).await.map_err(fail)?;
                    }
                }
            }
            item = output.next() => match item {
                Some(Ok(LogOutput::StdOut { message })) if step.capture_stdout => {
                    if captured.len() + message.len() > MAX_CAPTURE {
                        capture_overflow = true;
                    } else {
                        captured.extend_from_slice(&message);
                    }
                }
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    let lines = stdout_log.push(&message);
                    send_lines(out, LogStream::Stdout, lines).await.map_err(fail)?;
                    stdout_flush = match (stdout_log.has_partial(), stdout_flush) {
                        (false, _) => None,
                        (true, Some(t)) => Some(t),
                        (true, None) => Some(Instant::now() + PARTIAL_FLUSH_AFTER),
                    };
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    let lines = stderr_log.push(&message);
                    send_lines(out, LogStream::Stderr, lines).await.map_err(fail)?;
                    stderr_flush = match (stderr_log.has_partial(), stderr_flush) {
                        (false, _) => None,
                        (true, Some(t)) => Some(t),
                        (true, None) => Some(Instant::now() + PARTIAL_FLUSH_AFTER),
                    };
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    // Output can no longer be streamed: do not let the step run on unseen.
                    tracing::warn!(container = %id, error = %e, "attach stream failed; killing the step");
                    kill(docker, &id, "SIGKILL").await;
                    give_up_at = Some(Instant::now() + AFTER_KILL_WAIT);
                    break;
                }
                None => break,
            },
        }
    }
    send_lines(out, LogStream::Stdout, stdout_log.finish())
        .await
        .map_err(fail)?;
    send_lines(out, LogStream::Stderr, stderr_log.finish())
        .await
        .map_err(fail)?;

    let code = tokio::select! {
        code = exit_code(docker, &id) => code,
        _ = tokio::time::sleep(AFTER_KILL_WAIT), if give_up_at.is_some() => -1,
    };
    let duration = started.elapsed();
    send(
        out,
        TaskOutput::Event(EventKind::StepFinished {
            step: step.name.to_string(),
            exit_code: code,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }),
    )
    .await
    .map_err(fail)?;
    if capture_overflow {
        return Err(fail(StepFailure::CaptureTooLarge));
    }
    Ok(StepRun {
        container: id,
        exit_code: code,
        stopped,
        stdout: captured,
        duration,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Config<String> {
        let args = vec!["plan".to_string(), "-no-color".to_string()];
        let env = vec!["TF_IN_AUTOMATION=1".to_string()];
        let labels = task_labels(
            &BTreeMap::from([
                ("io.delegate.run".into(), "r1".into()),
                (LABEL_AGENT.into(), "spoof".into()),
            ]),
            "agent-1",
            "pool-a",
            Uuid::nil(),
        );
        step_config(&StepContainer {
            image: "delegate-sandbox:local",
            binary: "terraform",
            args: &args,
            env: &env,
            labels,
            network: "delegate-x-net",
            volume: "delegate-x-ws",
            cache_volume: None,
            ro_binds: &[],
            resources: Resources {
                memory_bytes: 1 << 30,
                nano_cpus: 1_000_000_000,
                pids_limit: 256,
            },
        })
    }

    #[test]
    fn step_containers_are_hardened() {
        let c = sample();
        let h = c.host_config.as_ref().unwrap();
        assert_eq!(c.user.as_deref(), Some("65534:65534"));
        assert_eq!(c.entrypoint, Some(vec!["terraform".to_string()]));
        assert_eq!(
            c.cmd,
            Some(vec!["plan".to_string(), "-no-color".to_string()])
        );
        assert_eq!(c.working_dir.as_deref(), Some("/workspace"));
        assert_eq!(c.tty, Some(false));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.init, Some(true));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.cap_add, None);
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(h.memory, Some(1 << 30));
        assert_eq!(h.memory_swap, Some(1 << 30));
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        assert_eq!(h.pids_limit, Some(256));
        assert_eq!(h.network_mode.as_deref(), Some("delegate-x-net"));
        assert_eq!(h.log_config.as_ref().unwrap().typ.as_deref(), Some("none"));
        assert_eq!(
            h.tmpfs.as_ref().unwrap().get("/tmp").map(String::as_str),
            Some(TMPFS_OPTIONS)
        );
        assert!(h.binds.is_none(), "no host paths");
        assert!(h.devices.is_none());
        assert!(h.pid_mode.is_none() && h.userns_mode.is_none());
        let mounts = h.mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].typ, Some(MountTypeEnum::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some("delegate-x-ws"));
        assert_eq!(mounts[0].target.as_deref(), Some("/workspace"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("docker.sock"));
    }

    #[test]
    fn labels_cannot_be_spoofed_by_extra_labels() {
        let c = sample();
        let l = c.labels.unwrap();
        assert_eq!(l.get(LABEL_AGENT).map(String::as_str), Some("agent-1"));
        assert_eq!(
            l.get(LABEL_TASK).map(String::as_str),
            Some(Uuid::nil().to_string().as_str())
        );
        assert_eq!(l.get(LABEL_POOL).map(String::as_str), Some("pool-a"));
        assert_eq!(l.get("io.delegate.run").map(String::as_str), Some("r1"));
    }

    #[test]
    fn plugin_cache_is_the_only_other_mount() {
        let args: Vec<String> = vec![];
        let c = step_config(&StepContainer {
            image: "i",
            binary: "tofu",
            args: &args,
            env: &[],
            labels: HashMap::new(),
            network: "n",
            volume: "v",
            cache_volume: Some("delegate-plugins-p"),
            ro_binds: &[],
            resources: Resources {
                memory_bytes: 1,
                nano_cpus: 1,
                pids_limit: 1,
            },
        });
        let mounts = c.host_config.unwrap().mounts.unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].target.as_deref(), Some(PLUGIN_CACHE_DIR));
        assert!(mounts.iter().all(|m| m.typ == Some(MountTypeEnum::VOLUME)));
    }

    #[test]
    fn a_filesystem_mirror_is_the_only_host_path_and_read_only() {
        let args: Vec<String> = vec![];
        let mirror = crate::mirror::setup(&crate::mirror::ProviderMirror::Filesystem(
            "/srv/tofu-providers".into(),
        ));
        let c = step_config(&StepContainer {
            image: "i",
            binary: "tofu",
            args: &args,
            env: &[],
            labels: HashMap::new(),
            network: "n",
            volume: "v",
            cache_volume: None,
            ro_binds: &mirror.ro_mounts,
            resources: Resources {
                memory_bytes: 1,
                nano_cpus: 1,
                pids_limit: 1,
            },
        });
        let h = c.host_config.unwrap();
        assert!(h.binds.is_none());
        let mounts = h.mounts.unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].typ, Some(MountTypeEnum::VOLUME));
        let m = &mounts[1];
        assert_eq!(m.typ, Some(MountTypeEnum::BIND));
        assert_eq!(m.source.as_deref(), Some("/srv/tofu-providers"));
        assert_eq!(m.target.as_deref(), Some(crate::mirror::FS_MIRROR_MOUNT));
        assert_eq!(m.read_only, Some(true));
        assert_eq!(
            m.bind_options.as_ref().unwrap().propagation,
            Some(MountBindOptionsPropagationEnum::RPRIVATE)
        );
    }

    #[test]
    fn names() {
        let t = Uuid::nil();
        assert_eq!(
            network_name(t),
            "delegate-00000000-0000-0000-0000-000000000000-net"
        );
        assert_eq!(
            step_container_name(t, 2, "plan"),
            format!("delegate-{t}-2-plan")
        );
        let c = cache_volume_name("prod eu/1");
        assert!(c.starts_with("delegate-plugins-prod-eu-1-"), "{c}");
        assert_ne!(cache_volume_name("a/b"), cache_volume_name("a-b"));
    }

    #[test]
    fn owned_dir_and_first_file() {
        let t = owned_dir_tar("/plugin-cache/").unwrap();
        let mut a = tar::Archive::new(&t[..]);
        let e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("plugin-cache/"));
        assert_eq!(e.header().uid().unwrap(), 65534);

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "plan.tfplan", &b"PLAN"[..]).unwrap();
        assert_eq!(
            first_file_of_tar(&b.into_inner().unwrap()),
            Some(b"PLAN".to_vec())
        );
        assert_eq!(first_file_of_tar(b"garbage"), None);
    }
}
