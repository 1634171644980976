//! Finishing a task after an agent restart, from its journal and the labelled containers that
//! kept running; and the journal hooks a normal run calls ([`Journaler`]).
//!
//! Owns: the decision where to pick a task up ([`plan_resume`], pure), following a step
//! container that outlived the agent, collecting a step that ended while the agent was down,
//! and running the remaining steps. Must never: start an apply whose outcome it cannot prove
//! (an apply container that is gone without a recorded exit code ends the task `lost`); run a
//! step in a new container when the task had secrets (their values lived in the old process's
//! memory only: the task ends `lost`, saying so and what already happened); stream the output
//! of a step whose secrets it cannot redact (it waits for that step's exit without reading it).
//!
//! What the journal guarantees (see [`crate::spool::journal`]): `started` is on disk before a
//! step's container is created, `exited` (with the code) before it is removed, and an artifact
//! with its note in one spool write. So after a restart, for the first step not `done`:
//!
//! | journal   | container          | what happens |
//! |-----------|--------------------|--------------|
//! | pending   | -                  | run it and the rest |
//! | started   | running            | follow it to its end, then collect |
//! | started   | exited             | collect its exit code (it is not run again) |
//! | started   | created, never run | apply: start it (provably never ran); others: run afresh |
//! | started   | gone               | apply: `lost` (cannot prove whether it ran); others: run again |
//! | exited    | any                | collect with the recorded code |
//!
//! Steps whose stdout is data (`show -json`, `output -json`) lost that data with the old
//! process; they only read, so they are run again.
//!
//! Output while the agent was down: step containers keep Docker's `none` log driver, so what a
//! step printed while no agent was attached is gone. That is deliberate: any other driver would
//! write the step's raw output, before redaction, to the Docker host's disk in the clear. The
//! task log says so instead ("output of step `plan` between … and … was not captured"), and
//! following resumes with the next byte the step prints.
//!
//! After a restart the task's state backend is served again on the same gateway port with the
//! same credentials (from the journal), so a followed step can still save state. Its egress
//! proxy is not: a followed step has no egress until it ends; steps run afterwards get a fresh
//! proxy and firewall rules.

use super::backend::{Credentials, StateServer};
use super::docker::{self, StepContainer, StepRun, TaskNetwork};
use super::egress_wiring::{EgressError, EgressPlan, FirewallRegistry, TaskEgress};
use super::logs::{Redactor, StreamLog, PARTIAL_FLUSH_AFTER};
use super::steps::{self, After, BackendEnv, Step};
use super::{
    bounded, judge_step, output_closed, send, Ended, FinishStep, Inner, Sandbox, SandboxError,
    SandboxSettings, StopReason, StopSignal, LABEL_STEP,
};
use crate::spool::journal::{BackendJournal, ExecJournal, StepJournal, StepState, TaskJournal};
use crate::task_io::{TaskOutput, TaskOutputTx, TaskResult};
use bollard::container::{AttachContainerOptions, LogOutput};
use bollard::models::ContainerStateStatusEnum;
use bollard::Docker;
use bytes::Bytes;
use delegate_protocol::{ChunkKind, EventKind, LogStream, Outcome, StateMethod, Summary};
use futures_util::StreamExt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where tofu leaves the state it could not save to its backend.
const ERRORED_STATE_PATH: &str = "/workspace/errored.tfstate";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lost(reason: impl Into<String>) -> Ended {
    Ended {
        outcome: Outcome::Lost,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Journal hooks of a normal run
// ---------------------------------------------------------------------------------------------

/// What the journal records once the task's Docker objects exist.
pub(super) struct Prepared<'a> {
    pub image: &'a str,
    pub binary: &'a str,
    pub net: &'a TaskNetwork,
    pub volume: &'a str,
    pub cache_volume: Option<&'a str>,
    pub timeout: Duration,
    /// The state backend's environment and port, when the task uses it.
    pub backend: Option<(&'a BackendEnv, u16)>,
    pub steps: &'a [Step],
}

/// Records a task's progress through the link side's spool, durably, before the sandbox goes on.
pub(super) struct Journaler {
    exec: ExecJournal,
}

impl Journaler {
    pub(super) fn new(p: Prepared<'_>) -> Journaler {
        Journaler {
            exec: ExecJournal {
                image: p.image.to_string(),
                binary: p.binary.to_string(),
                network: p.net.name.clone(),
                gateway: p.net.gateway.to_string(),
                subnet: p.net.subnet.map(|s| s.to_string()),
                bridge: p.net.bridge.clone(),
                volume: p.volume.to_string(),
                cache_volume: p.cache_volume.map(str::to_string),
                timeout_secs: p.timeout.as_secs(),
                backend: p.backend.map(|(b, port)| BackendJournal {
                    port,
                    username: b.username.clone(),
                    password: b.password.clone(),
                }),
                steps: p
                    .steps
                    .iter()
                    .map(|s| StepJournal {
                        name: s.name.to_string(),
                        state: StepState::Pending,
                    })
                    .collect(),
                summary: Summary::default(),
                plan_exit: None,
            },
        }
    }

    fn resumed(exec: ExecJournal) -> Journaler {
        Journaler { exec }
    }

    /// Record the current state; returns once it is on disk.
    pub(super) async fn save(&self, out: &TaskOutputTx) -> Result<(), Ended> {
        let (saved, answer) = oneshot::channel();
        send(
            out,
            TaskOutput::Journal {
                exec: Box::new(self.exec.clone()),
                saved,
            },
        )
        .await?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(Ended::failed(format!(
                "the agent cannot record the task's progress on disk, so it does not go on: {why}"
            ))),
            Err(_) => Err(output_closed()),
        }
    }

    fn set(&mut self, index: usize, state: StepState) {
        if let Some(s) = self.exec.steps.get_mut(index) {
            s.state = state;
        }
    }

    /// Step `index` is about to get its container.
    pub(super) async fn started(&mut self, out: &TaskOutputTx, index: usize) -> Result<(), Ended> {
        self.set(index, StepState::Started);
        self.save(out).await
    }

    /// Step `index` exited; recorded before its container is removed.
    pub(super) async fn exited(
        &mut self,
        out: &TaskOutputTx,
        index: usize,
        step: &Step,
        run: &StepRun,
    ) -> Result<(), Ended> {
        if step.name == "plan" {
            self.exec.plan_exit = Some(run.exit_code);
        }
        self.set(
            index,
            StepState::Exited {
                exit_code: run.exit_code,
                stopped: run.stopped.is_some(),
            },
        );
        self.save(out).await
    }

    /// Step `index` was judged and collected.
    pub(super) async fn done(
        &mut self,
        out: &TaskOutputTx,
        index: usize,
        summary: &Summary,
    ) -> Result<(), Ended> {
        self.exec.summary = summary.clone();
        self.set(index, StepState::Done);
        self.save(out).await
    }
}

// ---------------------------------------------------------------------------------------------
// The decision, as pure functions
// ---------------------------------------------------------------------------------------------

/// What Docker shows of a step's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Missing,
    /// Created and never started.
    Created {
        id: String,
    },
    Running {
        id: String,
    },
    Exited {
        id: String,
        exit_code: i64,
    },
}

/// Where to pick a task up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Every step is done: the task succeeded with the journal's summary.
    Finished,
    /// Run steps from `index` on in new containers.
    RunFrom { index: usize },
    /// Follow the running container of step `index` to its end; `blind`: without reading its
    /// output (the secrets to redact it with are gone, or its stdout is data).
    Follow {
        index: usize,
        id: String,
        blind: bool,
    },
    /// Start the never-started container of step `index`, then follow it.
    StartCreated {
        index: usize,
        id: String,
        blind: bool,
    },
    /// Step `index` ended while the agent was away (or its exit was recorded): judge and collect.
    Collect {
        index: usize,
        exit_code: i64,
        stopped: bool,
        /// Whether `StepFinished` still has to be reported (the exit was not recorded).
        report: bool,
    },
    /// The task cannot go on.
    Lost(String),
}

/// Whether a step changes infrastructure (never run twice).
pub fn mutates(step: &Step) -> bool {
    matches!(step.after, After::Applied) || step.name == "apply"
}

/// Why steps cannot run in new containers after a restart, if they cannot.
pub fn new_containers_refused(journal: &TaskJournal) -> Option<String> {
    journal.had_secrets().then(|| {
        format!(
            "the task's secrets ({}) were held in the agent's memory only and did not survive the restart",
            journal.secret_names.join(", ")
        )
    })
}

/// The first step not done, if any.
pub fn current_step(exec: &ExecJournal) -> Option<usize> {
    exec.steps.iter().position(|s| s.state != StepState::Done)
}

/// Decide where to pick the task up, from the journal and what Docker shows of the current
/// step's container (`seen`; ignored when the journal already says enough).
pub fn plan_resume(journal: &TaskJournal, steps: &[Step], seen: &Seen) -> Resume {
    let Some(exec) = &journal.exec else {
        return Resume::Lost(
            "the agent restarted while the task's sandbox was being prepared; the workspace \
             archive was held in memory only, so the task cannot continue"
                .into(),
        );
    };
    let names: Vec<&str> = steps.iter().map(|s| s.name).collect();
    let journaled: Vec<&str> = exec.steps.iter().map(|s| s.name.as_str()).collect();
    if names != journaled {
        return Resume::Lost(format!(
            "the task's journal lists steps {journaled:?} but the task has steps {names:?}"
        ));
    }
    let Some(index) = current_step(exec) else {
        return Resume::Finished;
    };
    let step = &steps[index];
    let secrets_gone = journal.had_secrets();
    let blind = secrets_gone || step.capture_stdout;
    match (&exec.steps[index].state, seen) {
        (StepState::Done, _) => Resume::Finished,
        (StepState::Pending, _) => Resume::RunFrom { index },
        (StepState::Exited { exit_code, stopped }, _) => Resume::Collect {
            index,
            exit_code: *exit_code,
            stopped: *stopped,
            report: false,
        },
        (StepState::Started, Seen::Running { id }) => Resume::Follow {
            index,
            id: id.clone(),
            blind,
        },
        (StepState::Started, Seen::Exited { exit_code, .. }) => Resume::Collect {
            index,
            exit_code: *exit_code,
            stopped: false,
            report: true,
        },
        (StepState::Started, Seen::Created { id }) => {
            if mutates(step) || secrets_gone {
                // Provably never ran: starting it is not running it twice.
                Resume::StartCreated {
                    index,
                    id: id.clone(),
                    blind,
                }
            } else {
                Resume::RunFrom { index }
            }
        }
        (StepState::Started, Seen::Missing) => {
            if mutates(step) {
                Resume::Lost(format!(
                    "the agent restarted during step `{}` and its container is gone without a \
                     recorded exit code: the agent cannot prove whether the {} ran, so it does not \
                     run it again; check the workspace's state before planning again",
                    step.name, step.name
                ))
            } else {
                Resume::RunFrom { index }
            }
        }
    }
}

/// The timeout left for a resumed task, from when it started.
pub fn remaining(started_at_ms: u64, timeout: Duration, now_ms: u64) -> Duration {
    let deadline = started_at_ms.saturating_add(timeout.as_millis() as u64);
    Duration::from_millis(deadline.saturating_sub(now_ms))
}

/// The task log's words for output a step printed while no agent read it.
pub fn gap_line(step: &str, last_spooled_ms: Option<u64>, now_ms: u64) -> String {
    match last_spooled_ms {
        Some(t) if t <= now_ms => format!(
            "the agent restarted while step `{step}` ran; whatever it printed in the \
             {} s the agent was away was not captured (step output is never stored by Docker, so \
             that it never reaches the host's disk unencrypted)",
            (now_ms - t).div_ceil(1000)
        ),
        _ => format!(
            "the agent restarted while step `{step}` ran; whatever it printed while the \
             agent was away was not captured (step output is never stored by Docker, so that it \
             never reaches the host's disk unencrypted)"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------------------------

/// What Docker shows of the container named `name`.
pub async fn seen(docker: &Docker, name: &str) -> Result<Seen, SandboxError> {
    match docker.inspect_container(name, None).await {
        Ok(c) => {
            let id = c.id.unwrap_or_else(|| name.to_string());
            let state = c.state.unwrap_or_default();
            Ok(match state.status {
                Some(ContainerStateStatusEnum::CREATED) => Seen::Created { id },
                Some(ContainerStateStatusEnum::RUNNING)
                | Some(ContainerStateStatusEnum::PAUSED)
                | Some(ContainerStateStatusEnum::RESTARTING) => Seen::Running { id },
                _ => Seen::Exited {
                    id,
                    exit_code: state.exit_code.unwrap_or(-1),
                },
            })
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(Seen::Missing),
        Err(source) => Err(SandboxError::Docker {
            op: "inspect step container",
            source,
        }),
    }
}

/// How long a container ran, from Docker's timestamps (0 when unknown).
async fn ran_for(docker: &Docker, id: &str) -> Duration {
    let Ok(c) = docker.inspect_container(id, None).await else {
        return Duration::ZERO;
    };
    let state = c.state.unwrap_or_default();
    let parse = |t: Option<String>| t.and_then(|t| humantime::parse_rfc3339_weak(&t).ok());
    match (parse(state.started_at), parse(state.finished_at)) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default(),
        (Some(a), None) => SystemTime::now().duration_since(a).unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

/// Follow a container to its end: stream its output (unless `blind`), stop it with SIGINT then
/// SIGKILL after `grace` when `stop` fires. Returns the exit code and whether it was stopped.
#[allow(clippy::too_many_arguments)]
async fn follow(
    docker: &Docker,
    id: &str,
    step: &Step,
    secrets: &[Vec<u8>],
    blind: bool,
    start: bool,
    stop: &StopSignal,
    grace: Duration,
    out: &TaskOutputTx,
) -> Result<(i64, Option<StopReason>), Ended> {
    let fail = |op: &'static str| {
        move |source| Ended::failed(SandboxError::Docker { op, source }.to_string())
    };
    let mut output = if blind {
        None
    } else {
        let attach = AttachContainerOptions::<String> {
            stdout: Some(true),
            stderr: Some(true),
            stream: Some(true),
            logs: Some(false),
            ..Default::default()
        };
        Some(
            docker
                .attach_container(id, Some(attach))
                .await
                .map_err(fail("attach"))?
                .output,
        )
    };
    if start {
        send(
            out,
            TaskOutput::Event(EventKind::StepStarted {
                step: step.name.to_string(),
            }),
        )
        .await?;
        docker
            .start_container::<String>(id, None)
            .await
            .map_err(fail("start step container"))?;
    }
    let mut stdout_log = StreamLog::new(Redactor::new(secrets));
    let mut stderr_log = StreamLog::new(Redactor::new(secrets));
    let mut flush_at: Option<Instant> = None;
    let mut stopped: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let exited = docker::exit_code(docker, id);
    tokio::pin!(exited);
    let code = loop {
        tokio::select! {
            biased;
            reason = stop.fired(), if stopped.is_none() => {
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
                log(out, LogStream::System, vec![Bytes::from(line)]).await?;
                docker::kill(docker, id, "SIGINT").await;
                kill_at = Some(Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(far)), if kill_at.is_some() => {
                docker::kill(docker, id, "SIGKILL").await;
                kill_at = None;
                give_up_at = Some(Instant::now() + docker::AFTER_KILL_WAIT);
            }
            _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(far)), if give_up_at.is_some() => {
                break -1;
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(far)), if flush_at.is_some() => {
                flush_at = None;
                log(out, LogStream::Stdout, stdout_log.flush_partial().into_iter().collect()).await?;
                log(out, LogStream::Stderr, stderr_log.flush_partial().into_iter().collect()).await?;
            }
            item = next_output(&mut output) => match item {
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    log(out, LogStream::Stdout, stdout_log.push(&message)).await?;
                    if stdout_log.has_partial() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + PARTIAL_FLUSH_AFTER);
                    }
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    log(out, LogStream::Stderr, stderr_log.push(&message)).await?;
                    if stderr_log.has_partial() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + PARTIAL_FLUSH_AFTER);
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    tracing::warn!(container = %id, error = %e, "attach stream of a followed step failed; waiting for its exit without output");
                    output = None;
                }
                // The stream ended: the container is stopping; the exit arm reports the code.
                None => output = None,
            },
            code = &mut exited => break code,
        }
    };
    log(out, LogStream::Stdout, stdout_log.finish()).await?;
    log(out, LogStream::Stderr, stderr_log.finish()).await?;
    Ok((code, stopped))
}

/// A container's attach output.
type AttachStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// The next attach item, or never when there is no stream.
async fn next_output(
    output: &mut Option<AttachStream>,
) -> Option<Result<LogOutput, bollard::errors::Error>> {
    match output {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn log(out: &TaskOutputTx, stream: LogStream, lines: Vec<Bytes>) -> Result<(), Ended> {
    for data in lines {
        send(out, TaskOutput::Log { stream, data }).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resuming
// ---------------------------------------------------------------------------------------------

impl Sandbox {
    /// Finish a task that was running when the agent stopped, from its journal. Never panics;
    /// whatever the outcome, the task's Docker objects (and its firewall rules) are removed
    /// before this returns.
    pub async fn resume_task(
        &self,
        journal: TaskJournal,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> TaskResult {
        let task = journal.spec.task_id;
        let bridge = journal.exec.as_ref().map(|e| e.bridge.clone());
        let timeout = journal
            .exec
            .as_ref()
            .map(|e| Duration::from_secs(e.timeout_secs))
            .unwrap_or_else(|| {
                self.inner
                    .settings
                    .effective_timeout(journal.spec.timeout_secs)
            });
        let left = remaining(journal.started_at_ms, timeout, now_ms());
        let stop = StopSignal {
            cancel,
            deadline: Instant::now() + left,
            timeout,
        };
        let inner = self.inner.clone();
        let runner = tokio::spawn(inner.clone().resume(journal, out, stop));
        let result = match runner.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%task, error = %e, "resumed task runner died");
                TaskResult {
                    outcome: Outcome::Failed,
                    reason: Some("internal error: the task runner stopped unexpectedly".into()),
                    summary: Summary::default(),
                }
            }
        };
        // Rules a previous agent process installed are not in this process's registry.
        if let (Some(backend), Some(bridge)) = (inner.firewall, bridge) {
            if !bridge.is_empty() && !inner.firewalls.is_tracked(task) {
                FirewallRegistry::release_bridge(backend, &bridge).await;
            }
        }
        inner.remove_task_objects(task).await;
        result
    }
}

/// What the resumed steps run with once they need new containers.
/// The environment and secret copies of steps run afresh; both hold secret values and are
/// zeroized when dropped.
struct Fresh {
    env: zeroize::Zeroizing<Vec<String>>,
    secrets: super::SecretCopies,
}

impl Inner {
    async fn resume(
        self: Arc<Self>,
        journal: TaskJournal,
        out: TaskOutputTx,
        stop: StopSignal,
    ) -> TaskResult {
        let mut summary = journal
            .exec
            .as_ref()
            .map(|e| e.summary.clone())
            .unwrap_or_default();
        let mut egress = None;
        let mut server = None;
        let result = self
            .resume_steps(
                &journal,
                &out,
                &stop,
                &mut summary,
                &mut egress,
                &mut server,
            )
            .await;
        if let Some(e) = egress {
            e.finish().await;
        }
        drop(server);
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

    #[allow(clippy::too_many_arguments)]
    async fn resume_steps(
        &self,
        journal: &TaskJournal,
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
        egress_slot: &mut Option<TaskEgress>,
        server_slot: &mut Option<StateServer>,
    ) -> Result<(), Ended> {
        let spec = &journal.spec;
        let task = spec.task_id;
        let steps = steps::plan_steps(spec, journal.has_plan)
            .map_err(|e| lost(format!("the task cannot be resumed: {e}")))?;
        let Some(exec) = journal.exec.clone() else {
            return Err(match plan_resume(journal, &steps, &Seen::Missing) {
                Resume::Lost(r) => lost(r),
                _ => lost("the task's journal has no sandbox"),
            });
        };
        let d = &self.docker;
        let index = current_step(&exec);
        let seen_now = match index {
            Some(i) => seen(d, &docker::step_container_name(task, i, steps[i].name))
                .await
                .map_err(|e| Ended::failed(e.to_string()))?,
            None => Seen::Missing,
        };
        let decision = plan_resume(journal, &steps, &seen_now);
        tracing::info!(%task, ?decision, "resuming task after an agent restart");
        let mut j = Journaler::resumed(exec.clone());
        let gateway: IpAddr = exec
            .gateway
            .parse()
            .map_err(|_| lost("the task's journal holds no usable gateway address"))?;

        // The state backend where the old process served it, with the same credentials.
        let mut backend_env = None;
        if let Some(b) = &exec.backend {
            let creds = Credentials {
                username: b.username.clone(),
                password: b.password.clone(),
            };
            match StateServer::start_on(gateway, b.port, &creds, out.clone()).await {
                Ok(s) => {
                    backend_env = Some(BackendEnv {
                        address: s.url(),
                        username: creds.username.clone(),
                        password: creds.password.clone(),
                    });
                    *server_slot = Some(s);
                }
                Err(e) => {
                    tracing::warn!(%task, error = %e, "cannot serve the task's state backend on its old port")
                }
            }
        }
        // What redacts a followed step's output: the backend password (user secrets are gone;
        // a task that had any is followed blind).
        let mut redact: Vec<Vec<u8>> = Vec::new();
        if let Some(b) = &exec.backend {
            redact.push(b.password.as_bytes().to_vec());
        }

        let mut plan_exit = exec.plan_exit;
        let from = match decision {
            Resume::Finished => return Ok(()),
            Resume::Lost(reason) => return Err(lost(reason)),
            Resume::RunFrom { index } => index,
            Resume::Follow { index, id, blind } => {
                self.system_line(
                    out,
                    &gap_line(steps[index].name, journal.last_spooled_ms, now_ms()),
                )
                .await?;
                self.follow_and_collect(
                    journal,
                    &steps,
                    index,
                    id,
                    blind,
                    false,
                    &redact,
                    &mut plan_exit,
                    &mut j,
                    out,
                    stop,
                    summary,
                )
                .await?
            }
            Resume::StartCreated { index, id, blind } => {
                self.follow_and_collect(
                    journal,
                    &steps,
                    index,
                    id,
                    blind,
                    true,
                    &redact,
                    &mut plan_exit,
                    &mut j,
                    out,
                    stop,
                    summary,
                )
                .await?
            }
            Resume::Collect {
                index,
                exit_code,
                stopped,
                report,
            } => {
                let step = &steps[index];
                let name = docker::step_container_name(task, index, step.name);
                if report {
                    self.system_line(
                        out,
                        &format!(
                            "step `{}` ended (exit code {exit_code}) while the agent was away; it is collected, not run again",
                            step.name
                        ),
                    )
                    .await?;
                    let duration = ran_for(d, &name).await;
                    send(
                        out,
                        TaskOutput::Event(EventKind::StepFinished {
                            step: step.name.to_string(),
                            exit_code,
                            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                        }),
                    )
                    .await?;
                }
                if report && mutates(step) && exit_code != 0 && !stopped {
                    return Err(self
                        .mutation_ended_away(journal, step.name, exit_code, out)
                        .await);
                }
                if step.name == "plan" {
                    plan_exit = Some(exit_code);
                }
                let run = StepRun {
                    container: name,
                    exit_code,
                    stopped: stopped.then_some(StopReason::Cancelled),
                    stdout: Vec::new(),
                    duration: Duration::ZERO,
                };
                if report {
                    j.exited(out, index, step, &run).await?;
                }
                self.collect(journal, &steps, index, &run, &mut j, out, stop, summary)
                    .await?
            }
        };
        if from >= steps.len() {
            return Ok(());
        }
        if let Some(why) = new_containers_refused(journal) {
            let done: Vec<&str> = steps[..from].iter().map(|s| s.name).collect();
            return Err(lost(format!(
                "the agent restarted while the task ran; steps {done:?} are complete{}, but step \
                 `{}` cannot run: {why}; submit the task again",
                if summary.applied {
                    " (the apply ran)"
                } else {
                    ""
                },
                steps[from].name
            )));
        }
        let fresh = self
            .fresh(
                journal,
                &exec,
                gateway,
                backend_env.as_ref(),
                out,
                egress_slot,
                server_slot,
            )
            .await?;
        self.run_rest(
            journal, &steps, from, &exec, &fresh, plan_exit, &mut j, out, stop, summary,
        )
        .await
    }

    /// Follow step `index`'s container that outlived the agent (or start the one it created and
    /// never started) to its end, record its exit, then collect it.
    #[allow(clippy::too_many_arguments)]
    async fn follow_and_collect(
        &self,
        journal: &TaskJournal,
        steps: &[Step],
        index: usize,
        id: String,
        blind: bool,
        start: bool,
        redact: &[Vec<u8>],
        plan_exit: &mut Option<i64>,
        j: &mut Journaler,
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
    ) -> Result<usize, Ended> {
        let d = &self.docker;
        let step = &steps[index];
        if blind && journal.had_secrets() && !step.capture_stdout {
            self.system_line(
                out,
                &format!(
                    "the output of step `{}` is not shown from here on: the task's secrets needed to redact it did not survive the agent restart",
                    step.name
                ),
            )
            .await?;
        }
        let (code, stopped) = follow(
            d,
            &id,
            step,
            redact,
            blind,
            start,
            stop,
            self.settings.cancel_grace,
            out,
        )
        .await?;
        let duration = ran_for(d, &id).await;
        send(
            out,
            TaskOutput::Event(EventKind::StepFinished {
                step: step.name.to_string(),
                exit_code: code,
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            }),
        )
        .await?;
        let run = StepRun {
            container: id,
            exit_code: code,
            stopped,
            stdout: Vec::new(),
            duration,
        };
        if step.name == "plan" {
            *plan_exit = Some(code);
        }
        j.exited(out, index, step, &run).await?;
        self.collect(journal, steps, index, &run, j, out, stop, summary)
            .await
    }

    /// Judge and collect step `index` after it ended; returns the index to go on from.
    #[allow(clippy::too_many_arguments)]
    async fn collect(
        &self,
        journal: &TaskJournal,
        steps: &[Step],
        index: usize,
        run: &StepRun,
        j: &mut Journaler,
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
    ) -> Result<usize, Ended> {
        let step = &steps[index];
        judge_step(step, run.stopped, run.exit_code, stop.timeout)?;
        match step.after {
            After::Nothing => {}
            After::Applied => summary.applied = true,
            After::UploadPlanFile => {
                if !journal.artifacts.contains(&ChunkKind::Plan) {
                    let data = stop
                        .guard(
                            "while fetching the plan file",
                            self.download_from_volume(journal, steps::PLAN_PATH),
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
            }
            // Their stdout was data held by the old process: run them again (they only read).
            After::PlanJson { .. } | After::Outputs => return Ok(index),
        }
        j.done(out, index, summary).await?;
        Ok(index + 1)
    }

    /// A step that changes infrastructure ended with an error while the agent was away. What it
    /// printed from then on was not captured, so the agent cannot prove where it stands: the task
    /// ends `lost`. The agent serves the task's state backend, so a step that ended while it was
    /// down may have failed only because it could not save its state; tofu then leaves the state
    /// in `errored.tfstate`. With the agent's backend, that state is stored as a new state
    /// version (the task still holds the workspace's lock), so the control plane holds what the
    /// step did; the reason says which happened.
    async fn mutation_ended_away(
        &self,
        journal: &TaskJournal,
        step: &str,
        exit_code: i64,
        out: &TaskOutputTx,
    ) -> Ended {
        let mut reason = format!(
            "step `{step}` ended with exit code {exit_code} while the agent was away; what it \
             printed from then on was not captured, so the agent cannot prove where the {step} stands"
        );
        let agent_backend = journal.exec.as_ref().is_some_and(|e| e.backend.is_some());
        if agent_backend {
            if let Ok(state) = self.download_from_volume(journal, ERRORED_STATE_PATH).await {
                let (tx, rx) = oneshot::channel();
                let relayed = out
                    .send(TaskOutput::State {
                        method: StateMethod::Post,
                        lock_id: None,
                        body: Some(state),
                        reply: tx,
                    })
                    .await;
                let status = match relayed {
                    Ok(()) => rx.await.ok().map(|r| r.status),
                    Err(_) => None,
                };
                match status {
                    Some(200) => reason.push_str(
                        "; tofu could not save the state it left (errored.tfstate), so the agent \
                         stored that state as a new state version",
                    ),
                    other => reason.push_str(&format!(
                        "; tofu could not save the state it left (errored.tfstate) and neither \
                         could the agent ({}); the file is lost with the task's volume",
                        other.map_or("the relay closed".to_string(), |s| format!("status {s}"))
                    )),
                }
            }
        }
        reason.push_str("; check the workspace's state before running it again");
        lost(reason)
    }

    /// A file from the task's volume, through a never-started helper container.
    async fn download_from_volume(
        &self,
        journal: &TaskJournal,
        path: &str,
    ) -> Result<Vec<u8>, SandboxError> {
        let task = journal.spec.task_id;
        let Some(exec) = &journal.exec else {
            return Err(SandboxError::Download("the task has no volume".into()));
        };
        let name = format!("delegate-{task}-collect");
        docker::remove_container(&self.docker, &name).await;
        let config = docker::prep_config(
            &exec.image,
            &exec.binary,
            self.labels(task),
            &exec.volume,
            exec.cache_volume.as_deref(),
        );
        let created = self
            .docker
            .create_container(
                Some(bollard::container::CreateContainerOptions {
                    name: name.clone(),
                    platform: None,
                }),
                config,
            )
            .await
            .map_err(|source| SandboxError::Docker {
                op: "create collect container",
                source,
            })?;
        let data = docker::download_file(&self.docker, &created.id, path).await;
        docker::remove_container(&self.docker, &created.id).await;
        data
    }

    /// The environment of steps run in new containers: the task's plain env, its state backend
    /// (the old one when it could be served again, else a new one) and a fresh egress proxy.
    #[allow(clippy::too_many_arguments)]
    async fn fresh(
        &self,
        journal: &TaskJournal,
        exec: &ExecJournal,
        gateway: IpAddr,
        backend: Option<&BackendEnv>,
        out: &TaskOutputTx,
        egress_slot: &mut Option<TaskEgress>,
        server_slot: &mut Option<StateServer>,
    ) -> Result<Fresh, Ended> {
        let spec = &journal.spec;
        let fail = |e: SandboxError| Ended::failed(e.to_string());
        let mut backend_env = backend.cloned();
        if exec.backend.is_some() && backend_env.is_none() {
            let creds = Credentials::generate();
            let s = StateServer::start(gateway, &creds, out.clone())
                .await
                .map_err(|e| Ended::failed(e.to_string()))?;
            backend_env = Some(BackendEnv {
                address: s.url(),
                username: creds.username.clone(),
                password: creds.password.clone(),
            });
            *server_slot = Some(s);
        }
        let mut secrets: super::SecretCopies = Default::default();
        if let Some(b) = &backend_env {
            secrets.push(b.password.as_bytes().to_vec());
        }
        // The old rules name the old proxy's port; no step container runs on the bridge now.
        if let Some(backend) = self.firewall {
            if !exec.bridge.is_empty() {
                FirewallRegistry::release_bridge(backend, &exec.bridge).await;
            }
        }
        let mut protected = crate::egress::local::host_addresses()
            .map_err(|e| fail(EgressError::HostAddresses(e).into()))?;
        protected.extend(docker::network_subnets(&self.docker).await.map_err(fail)?);
        let subnet = exec.subnet.as_deref().and_then(|s| s.parse().ok());
        let started = TaskEgress::start(
            EgressPlan {
                task: spec.task_id,
                operator: self.settings.egress.policy.current(),
                requested: &spec.egress,
                gateway,
                subnet,
                bridge: &exec.bridge,
                backend_port: server_slot.as_ref().map(|s| s.addr().port()),
                protected,
            },
            &self.settings.egress,
            self.firewall.map(|b| (&self.firewalls, b)),
            out.clone(),
            secrets.to_vec(),
        )
        .await
        .map_err(|e| fail(e.into()))?;
        // The mirror of the current settings; its CLI configuration is in the volume already
        // (written with the workspace).
        let mirror = self.settings.mirror();
        let mut env = zeroize::Zeroizing::new(
            steps::build_env(
                spec,
                backend_env.as_ref(),
                exec.cache_volume.is_some(),
                SandboxSettings::mirror_env(mirror.as_ref()),
            )
            .map_err(|e| Ended::failed(e.to_string()))?,
        );
        env.extend(started.env.clone());
        secrets.push(started.password.clone().into_bytes());
        *egress_slot = Some(started);
        Ok(Fresh { env, secrets })
    }

    /// Run steps `from..` in new containers, journaled as a normal run is.
    #[allow(clippy::too_many_arguments)]
    async fn run_rest(
        &self,
        journal: &TaskJournal,
        steps: &[Step],
        from: usize,
        exec: &ExecJournal,
        fresh: &Fresh,
        mut plan_exit: Option<i64>,
        j: &mut Journaler,
        out: &TaskOutputTx,
        stop: &StopSignal,
        summary: &mut Summary,
    ) -> Result<(), Ended> {
        let task = journal.spec.task_id;
        let d = &self.docker;
        let labels = self.labels(task);
        let ro_binds = self
            .settings
            .mirror()
            .map(|m| m.ro_mounts)
            .unwrap_or_default();
        let resources = docker::Resources {
            memory_bytes: self.settings.memory_bytes,
            nano_cpus: self.settings.nano_cpus,
            pids_limit: self.settings.pids_limit,
        };
        for (index, step) in steps.iter().enumerate().skip(from) {
            if let Some(r) = stop.check() {
                return Err(Ended::stopped(
                    r,
                    stop.timeout,
                    &format!("before step `{}`", step.name),
                ));
            }
            let name = docker::step_container_name(task, index, step.name);
            // A container of an earlier life of this step (it ran, its data was lost): it only
            // read, so it goes. An apply's is never replaced.
            match seen(d, &name)
                .await
                .map_err(|e| Ended::failed(e.to_string()))?
            {
                Seen::Missing => {}
                _ if mutates(step) => {
                    return Err(lost(format!(
                    "found a container of step `{}` that the task's journal does not account for; \
                         the agent does not run the {} again",
                    step.name, step.name
                )))
                }
                Seen::Created { id } | Seen::Running { id } | Seen::Exited { id, .. } => {
                    docker::remove_container(d, &id).await;
                }
            }
            let mut step_labels = labels.clone();
            step_labels.insert(LABEL_STEP.into(), step.name.into());
            let config = docker::step_config(&StepContainer {
                image: &exec.image,
                binary: &exec.binary,
                args: &step.args,
                env: &fresh.env,
                labels: step_labels,
                network: &exec.network,
                volume: &exec.volume,
                cache_volume: exec.cache_volume.as_deref(),
                ro_binds: &ro_binds,
                resources,
            });
            j.started(out, index).await?;
            let run = docker::run_step(
                d,
                &name,
                config,
                step,
                &fresh.secrets,
                stop,
                self.settings.cancel_grace,
                out,
            )
            .await;
            // An artifact the spool already holds is not sent again.
            let mut collect = step.clone();
            if let After::PlanJson { drift, .. } = collect.after {
                if journal.artifacts.contains(&ChunkKind::PlanJson) {
                    collect.after = After::PlanJson {
                        upload: false,
                        drift,
                    };
                }
            }
            if collect.after == After::UploadPlanFile
                && journal.artifacts.contains(&ChunkKind::Plan)
            {
                collect.after = After::Nothing;
            }
            self.finish_step(
                FinishStep {
                    index,
                    step,
                    collect: &collect,
                    secrets: &fresh.secrets,
                },
                run,
                &mut plan_exit,
                j,
                out,
                stop,
                summary,
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::{BlobRef, Op, Secrets, TaskSpec};
    use std::collections::BTreeMap;

    fn spec(op: Op, secrets: bool) -> TaskSpec {
        TaskSpec {
            task_id: uuid::Uuid::from_u128(1),
            op,
            workspace: "w".into(),
            auto_approve: false,
            vars: BTreeMap::new(),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets: if secrets {
                Secrets(BTreeMap::from([("TOKEN".into(), "abcdefgh".into())]))
            } else {
                Secrets::default()
            },
            archive: BlobRef {
                size: 1,
                sha256: "0".repeat(64),
            },
            plan: None,
            timeout_secs: 0,
            egress: vec![],
        }
    }

    fn journal(op: Op, secrets: bool, states: &[StepState]) -> (TaskJournal, Vec<Step>) {
        let has_plan = op == Op::Apply;
        let spec = spec(op, secrets);
        let steps = steps::plan_steps(&spec, has_plan).unwrap();
        let mut j = TaskJournal::new(&spec, has_plan, 1_000);
        j.exec = Some(ExecJournal {
            image: "img".into(),
            binary: "tofu".into(),
            network: "net".into(),
            gateway: "172.30.0.1".into(),
            subnet: None,
            bridge: "dl".into(),
            volume: "vol".into(),
            cache_volume: None,
            timeout_secs: 60,
            backend: None,
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepJournal {
                    name: s.name.into(),
                    state: states.get(i).cloned().unwrap_or(StepState::Pending),
                })
                .collect(),
            summary: Summary::default(),
            plan_exit: None,
        });
        (j, steps)
    }

    use StepState::{Done, Exited, Pending, Started};

    #[test]
    fn no_sandbox_yet_is_lost() {
        let (mut j, steps) = journal(Op::Plan, false, &[]);
        j.exec = None;
        assert!(
            matches!(plan_resume(&j, &steps, &Seen::Missing), Resume::Lost(r) if r.contains("in memory only"))
        );
    }

    #[test]
    fn all_done_is_finished() {
        let (j, steps) = journal(Op::Plan, false, &[Done, Done, Done]);
        assert_eq!(plan_resume(&j, &steps, &Seen::Missing), Resume::Finished);
    }

    #[test]
    fn a_running_step_is_followed_blind_when_secrets_are_gone() {
        // Plan op: init, plan, show.
        let (j, steps) = journal(Op::Plan, false, &[Done, Started]);
        let running = Seen::Running { id: "c1".into() };
        assert_eq!(
            plan_resume(&j, &steps, &running),
            Resume::Follow {
                index: 1,
                id: "c1".into(),
                blind: false
            }
        );
        let (j, steps) = journal(Op::Plan, true, &[Done, Started]);
        assert_eq!(
            plan_resume(&j, &steps, &running),
            Resume::Follow {
                index: 1,
                id: "c1".into(),
                blind: true
            }
        );
        // A step whose stdout is data is followed blind (and run again afterwards).
        let (j, steps) = journal(Op::Plan, false, &[Done, Done, Started]);
        assert_eq!(
            plan_resume(&j, &steps, &running),
            Resume::Follow {
                index: 2,
                id: "c1".into(),
                blind: true
            }
        );
    }

    #[test]
    fn a_step_that_ended_while_away_is_collected_not_rerun() {
        // Apply op: init, show, apply, output.
        let (j, steps) = journal(Op::Apply, true, &[Done, Done, Started]);
        let exited = Seen::Exited {
            id: "c".into(),
            exit_code: 0,
        };
        assert_eq!(
            plan_resume(&j, &steps, &exited),
            Resume::Collect {
                index: 2,
                exit_code: 0,
                stopped: false,
                report: true
            }
        );
        // Recorded exit: collected whatever Docker shows.
        let (j, steps) = journal(
            Op::Apply,
            false,
            &[
                Done,
                Done,
                Exited {
                    exit_code: 1,
                    stopped: false,
                },
            ],
        );
        assert_eq!(
            plan_resume(&j, &steps, &Seen::Missing),
            Resume::Collect {
                index: 2,
                exit_code: 1,
                stopped: false,
                report: false
            }
        );
    }

    #[test]
    fn an_apply_that_cannot_be_proven_is_lost_never_rerun() {
        let (j, steps) = journal(Op::Apply, false, &[Done, Done, Started]);
        match plan_resume(&j, &steps, &Seen::Missing) {
            Resume::Lost(r) => {
                assert!(r.contains("cannot prove whether the apply ran"), "{r}");
            }
            other => panic!("{other:?}"),
        }
        // Auto-approved plan: the apply step is mutating there too.
        let mut s = spec(Op::Plan, false);
        s.auto_approve = true;
        let steps = steps::plan_steps(&s, false).unwrap();
        let idx = steps.iter().position(|s| s.name == "apply").unwrap();
        assert!(mutates(&steps[idx]));
        assert!(!mutates(&steps[0]));
    }

    #[test]
    fn a_never_started_container_is_started_for_an_apply_and_replaced_otherwise() {
        let created = Seen::Created { id: "c".into() };
        let (j, steps) = journal(Op::Apply, false, &[Done, Done, Started]);
        assert_eq!(
            plan_resume(&j, &steps, &created),
            Resume::StartCreated {
                index: 2,
                id: "c".into(),
                blind: false
            }
        );
        let (j, steps) = journal(Op::Plan, false, &[Done, Started]);
        assert_eq!(
            plan_resume(&j, &steps, &created),
            Resume::RunFrom { index: 1 }
        );
        // Without secrets a missing read-only step simply runs again.
        assert_eq!(
            plan_resume(&j, &steps, &Seen::Missing),
            Resume::RunFrom { index: 1 }
        );
    }

    #[test]
    fn pending_runs_from_there_and_secrets_refuse_new_containers() {
        let (j, steps) = journal(Op::Plan, false, &[Done, Pending]);
        assert_eq!(
            plan_resume(&j, &steps, &Seen::Missing),
            Resume::RunFrom { index: 1 }
        );
        assert_eq!(new_containers_refused(&j), None);
        let (j, _) = journal(Op::Plan, true, &[Done]);
        let why = new_containers_refused(&j).unwrap();
        assert!(
            why.contains("TOKEN") && why.contains("memory only"),
            "{why}"
        );
        assert!(!why.contains("abcdefgh"));
    }

    #[test]
    fn mismatched_steps_are_lost() {
        let (j, _) = journal(Op::Plan, false, &[Done]);
        let other = steps::plan_steps(&spec(Op::Validate, false), false).unwrap();
        assert!(matches!(
            plan_resume(&j, &other, &Seen::Missing),
            Resume::Lost(_)
        ));
    }

    #[test]
    fn remaining_time_and_gap_line() {
        let t = Duration::from_secs(60);
        assert_eq!(remaining(1_000, t, 11_000), Duration::from_secs(50));
        assert_eq!(remaining(1_000, t, 100_000), Duration::ZERO);
        let l = gap_line("plan", Some(1_000), 8_500);
        assert!(l.contains("step `plan`") && l.contains("8 s"), "{l}");
        assert!(gap_line("plan", None, 5).contains("while the agent was away"));
    }
}
