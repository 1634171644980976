//! Agent restarts against the real Docker engine and the real tofu/terraform binary on PATH.
//!
//! A "first life" runs a task on a runtime of its own and is killed at a chosen moment: the
//! runtime is dropped with the task's future forgotten, so no cleanup runs, sockets close and the
//! step containers keep running, as after SIGKILL. What the link side would have spooled is
//! collected (logs, events, artifacts, the latest journal). The "second life" is a fresh
//! `Sandbox` of the same agent that resumes the task from that journal.
//!
//! Every test labels its objects with its own run id and checks that nothing so labelled is left.

mod common;

use bytes::Bytes;
use common::*;
use delegate_agent::sandbox::{docker as sdocker, Sandbox};
use delegate_agent::spool::journal::{ExecJournal, TaskJournal};
use delegate_agent::task_io::{StateReply, TaskInputs, TaskOutput, TaskResult};
use delegate_protocol::{
    BlobRef, ChunkKind, EventKind, LogStream, Op, Outcome, Secrets, StateMethod, TaskSpec,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Resources in the chatty workspace: enough that plan and apply print for a while.
const SIZE: &str = "1500";

fn chatty() -> Vec<u8> {
    let main = r#"
variable "size" {
  type    = number
  default = 10
}

resource "terraform_data" "item" {
  count = var.size
  input = { name = "chatty-${count.index}", index = count.index }
}

output "count" {
  value = length(terraform_data.item)
}
"#;
    tar_gz(&[("main.tf", main)])
}

fn inputs(op: Op, plan: Option<Vec<u8>>, secret: Option<&str>) -> TaskInputs {
    let archive = chatty();
    let mut secrets = Secrets::default();
    if let Some(s) = secret {
        secrets.0.insert("TF_VAR_unused_secret".into(), s.into());
    }
    TaskInputs {
        spec: TaskSpec {
            task_id: Uuid::new_v4(),
            op,
            workspace: "itest".into(),
            auto_approve: false,
            vars: BTreeMap::from([("size".to_string(), SIZE.to_string())]),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets,
            archive: BlobRef {
                size: archive.len() as u64,
                sha256: sha256_hex(&archive),
            },
            plan: plan.as_ref().map(|p| BlobRef {
                size: p.len() as u64,
                sha256: sha256_hex(p),
            }),
            timeout_secs: 0,
            egress: vec![],
        },
        archive,
        plan,
    }
}

/// The control plane's state store, shared by both lives.
#[derive(Clone, Default)]
struct FakeState(Arc<Mutex<Store>>);

/// State and lock id.
type Store = (Option<Vec<u8>>, Option<String>);

impl FakeState {
    fn answer(
        &self,
        method: StateMethod,
        lock_id: Option<String>,
        body: Option<Vec<u8>>,
    ) -> StateReply {
        let mut s = self.0.lock().unwrap();
        let ok = |body: Vec<u8>| StateReply { status: 200, body };
        match method {
            StateMethod::Get => match &s.0 {
                Some(st) => ok(st.clone()),
                None => StateReply {
                    status: 404,
                    body: vec![],
                },
            },
            StateMethod::Post => {
                s.0 = body;
                ok(vec![])
            }
            StateMethod::Lock => {
                s.1 = lock_id;
                ok(vec![])
            }
            StateMethod::Unlock => {
                s.1 = None;
                ok(vec![])
            }
            StateMethod::Delete => {
                s.0 = None;
                ok(vec![])
            }
        }
    }

    fn state(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap().0.clone()
    }
}

/// What the link side got from one life of the task.
#[derive(Default, Debug)]
struct Seen {
    logs: Vec<(LogStream, Bytes)>,
    events: Vec<EventKind>,
    artifacts: Vec<(ChunkKind, Vec<u8>)>,
    exec: Option<ExecJournal>,
    /// Log lines since the last `StepStarted`.
    lines_in_step: usize,
}

impl Seen {
    fn text(&self) -> String {
        self.logs
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
    fn started(&self, step: &str) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, EventKind::StepStarted { step: s } if s == step))
            .count()
    }
    fn in_step(&self, step: &str) -> bool {
        matches!(self.events.iter().rev().find(|e| matches!(e, EventKind::StepStarted { .. } | EventKind::StepFinished { .. })),
            Some(EventKind::StepStarted { step: s }) if s == step)
    }
}

/// Collect a life's output, answering state requests and journal saves like the link side.
fn collect(
    mut rx: mpsc::Receiver<TaskOutput>,
    fake: FakeState,
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            {
                let mut s = seen.lock().unwrap();
                match msg {
                    TaskOutput::Log { stream, data } => {
                        s.logs.push((stream, data));
                        s.lines_in_step += 1;
                    }
                    TaskOutput::Event(e) => {
                        if matches!(e, EventKind::StepStarted { .. }) {
                            s.lines_in_step = 0;
                        }
                        s.events.push(e);
                    }
                    TaskOutput::Artifact { kind, data } => s.artifacts.push((kind, data)),
                    TaskOutput::Journal { exec, saved } => {
                        s.exec = Some(*exec);
                        let _ = saved.send(Ok(()));
                    }
                    TaskOutput::State {
                        method,
                        lock_id,
                        body,
                        reply,
                    } => {
                        let _ = reply.send(fake.answer(method, lock_id, body));
                    }
                }
            }
            changed.notify_one();
        }
    })
}

/// Run the task until `kill` says so, then die without cleaning up. Returns what was reported,
/// and the result if the task ended first.
fn first_life(
    run: &Run,
    inputs: TaskInputs,
    fake: FakeState,
    kill: impl Fn(&Seen) -> bool + Send + 'static,
) -> (Seen, Option<TaskResult>) {
    let settings = run.settings();
    let agent = run.agent();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let result = rt.block_on({
            let seen = seen.clone();
            async move {
                image().await;
                let sandbox = Sandbox::connect(settings, &agent).await.unwrap();
                let (tx, rx) = mpsc::channel(64);
                let changed = Arc::new(Notify::new());
                let _collector = collect(rx, fake, seen.clone(), changed.clone());
                let mut task = Box::pin(sandbox.run_task(inputs, tx, CancellationToken::new()));
                loop {
                    tokio::select! {
                        r = &mut task => return Some(r),
                        _ = changed.notified() => {
                            if kill(&seen.lock().unwrap()) {
                                // SIGKILL: nothing of the task's cleanup runs.
                                std::mem::forget(task);
                                return None;
                            }
                        }
                    }
                }
            }
        });
        drop(rt);
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        (seen, result)
    })
    .join()
    .expect("first life panicked")
}

/// The journal the spool would hold after the first life.
fn journal_of(
    inputs_spec: &TaskSpec,
    has_plan: bool,
    started_at_ms: u64,
    seen: &Seen,
) -> TaskJournal {
    let mut j = TaskJournal::new(inputs_spec, has_plan, started_at_ms);
    j.exec = seen.exec.clone();
    j.artifacts = seen.artifacts.iter().map(|(k, _)| *k).collect();
    j.last_spooled_ms = Some(started_at_ms);
    j
}

async fn second_life(run: &Run, journal: TaskJournal, fake: FakeState) -> (Seen, TaskResult) {
    let sandbox = run.sandbox().await;
    let (tx, rx) = mpsc::channel(64);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let collector = collect(rx, fake, seen.clone(), Arc::new(Notify::new()));
    let result = sandbox
        .resume_task(journal, tx, CancellationToken::new())
        .await;
    collector.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen, result)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn step_container_exists(run: &Run, task: Uuid, index: usize, step: &str) -> bool {
    let d = bollard::Docker::connect_with_defaults().unwrap();
    let _ = run;
    d.inspect_container(&sdocker::step_container_name(task, index, step), None)
        .await
        .is_ok()
}

/// A saved plan of the chatty workspace, made by a normal run.
async fn plan_file(run: &Run, fake: &FakeState) -> Vec<u8> {
    let (seen, result) = first_life(run, inputs(Op::Plan, None, None), fake.clone(), |_| false);
    let result = result.expect("plan ran to its end");
    assert_eq!(
        result.outcome,
        Outcome::Succeeded,
        "{:?}\n{}",
        result.reason,
        seen.text()
    );
    seen.artifacts
        .into_iter()
        .find(|(k, _)| *k == ChunkKind::Plan)
        .map(|(_, d)| d)
        .expect("plan file")
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_plan_the_plan_is_followed_and_the_task_finishes() {
    let run = Run::new("itest-restart");
    let fake = FakeState::default();
    let task = inputs(Op::Plan, None, None);
    let spec = task.spec.clone();
    let started = now_ms();
    let (first, result) = first_life(&run, task, fake.clone(), |s| {
        s.in_step("plan") && s.lines_in_step >= 3
    });
    assert!(result.is_none(), "killed before the end");
    assert!(
        step_container_exists(&run, spec.task_id, 1, "plan").await,
        "the plan container outlived the agent"
    );
    let journal = journal_of(&spec, false, started, &first);
    let (second, result) = second_life(&run, journal, fake).await;
    assert_eq!(
        result.outcome,
        Outcome::Succeeded,
        "{:?}\n{}",
        result.reason,
        second.text()
    );
    // Followed if it still ran when the agent came back, else collected: never run again.
    let text = second.text();
    assert!(
        text.contains("the agent restarted while step `plan` ran")
            || text.contains("step `plan` ended (exit code 0) while the agent was away"),
        "{text}"
    );
    assert_eq!(
        first.started("plan") + second.started("plan"),
        1,
        "plan not run twice"
    );
    let kinds: Vec<ChunkKind> = first
        .artifacts
        .iter()
        .chain(&second.artifacts)
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(kinds, vec![ChunkKind::Plan, ChunkKind::PlanJson]);
    assert_eq!(result.summary.add, SIZE.parse::<u64>().unwrap());
    run.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_apply_the_apply_is_not_rerun_and_its_state_is_saved() {
    let run = Run::new("itest-restart");
    let fake = FakeState::default();
    let plan = plan_file(&run, &fake).await;
    let task = inputs(Op::Apply, Some(plan), None);
    let spec = task.spec.clone();
    let started = now_ms();
    let (first, result) = first_life(&run, task, fake.clone(), |s| {
        s.in_step("apply") && s.lines_in_step >= 3
    });
    assert!(result.is_none(), "killed before the end");
    let journal = journal_of(&spec, true, started, &first);
    let (second, result) = second_life(&run, journal, fake.clone()).await;
    assert_eq!(
        result.outcome,
        Outcome::Succeeded,
        "{:?}\n{}",
        result.reason,
        second.text()
    );
    assert!(result.summary.applied);
    assert_eq!(
        first.started("apply") + second.started("apply"),
        1,
        "apply ran once"
    );
    assert_eq!(second.started("output"), 1);
    let outputs = result.summary.outputs.expect("outputs");
    assert_eq!(outputs["count"]["value"], SIZE.parse::<u64>().unwrap());
    let state = String::from_utf8(fake.state().expect("state saved")).unwrap();
    assert!(
        state.contains("chatty-1499"),
        "the apply's state reached the backend"
    );
    run.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_secrets_the_apply_is_collected_and_the_task_ends_lost_saying_why() {
    let run = Run::new("itest-restart");
    let fake = FakeState::default();
    let plan = plan_file(&run, &fake).await;
    let secret = format!("s3cr3t-{}", Uuid::new_v4().simple());
    let task = inputs(Op::Apply, Some(plan), Some(&secret));
    let spec = task.spec.clone();
    let started = now_ms();
    let (first, result) = first_life(&run, task, fake.clone(), |s| {
        s.in_step("apply") && s.lines_in_step >= 3
    });
    assert!(result.is_none());
    let journal = journal_of(&spec, true, started, &first);
    assert!(
        journal.spec.secrets.0.is_empty(),
        "the journal holds no secret value"
    );
    let (second, result) = second_life(&run, journal, fake.clone()).await;
    assert_eq!(result.outcome, Outcome::Lost, "{:?}", result.reason);
    let reason = result.reason.unwrap();
    assert!(reason.contains("TF_VAR_unused_secret"), "{reason}");
    assert!(reason.contains("the apply ran"), "{reason}");
    assert!(!reason.contains(&secret));
    assert!(
        second.text().contains("not shown from here on"),
        "{}",
        second.text()
    );
    assert_eq!(
        second.started("output"),
        0,
        "no new container without the secrets"
    );
    assert!(fake.state().is_some(), "the apply still saved its state");
    run.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_apply_container_gone_without_an_exit_code_ends_lost() {
    let run = Run::new("itest-restart");
    let fake = FakeState::default();
    let plan = plan_file(&run, &fake).await;
    let task = inputs(Op::Apply, Some(plan), None);
    let spec = task.spec.clone();
    let started = now_ms();
    let (first, result) = first_life(&run, task, fake.clone(), |s| {
        s.in_step("apply") && s.lines_in_step >= 1
    });
    assert!(result.is_none());
    // Someone removed the apply container while the agent was down.
    let d = bollard::Docker::connect_with_defaults().unwrap();
    sdocker::remove_container(&d, &sdocker::step_container_name(spec.task_id, 2, "apply")).await;
    let journal = journal_of(&spec, true, started, &first);
    let (second, result) = second_life(&run, journal, fake).await;
    assert_eq!(result.outcome, Outcome::Lost, "{:?}", result.reason);
    assert!(
        result
            .reason
            .as_deref()
            .unwrap()
            .contains("cannot prove whether the apply ran"),
        "{:?}",
        result.reason
    );
    assert_eq!(second.started("apply"), 0);
    run.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_cleanup_spares_the_containers_of_live_tasks() {
    let run = Run::new("itest-restart");
    let fake = FakeState::default();
    let task = inputs(Op::Plan, None, None);
    let spec = task.spec.clone();
    let (_first, result) = first_life(&run, task, fake, |s| s.in_step("plan"));
    assert!(result.is_none());
    let sandbox = run.sandbox().await;
    assert_eq!(sandbox.cleanup_orphans(&[spec.task_id]).await.unwrap(), 0);
    assert!(step_container_exists(&run, spec.task_id, 1, "plan").await);
    assert!(
        sandbox.cleanup_orphans(&[]).await.unwrap() >= 3,
        "container, network, volume"
    );
    run.assert_clean().await;
}
