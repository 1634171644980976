//! The Docker sandbox against the real engine and the real tofu/terraform binary on PATH.
//!
//! Every test labels what it creates with its own run id (through `extra_labels`) and uses its own
//! agent id; a guard removes anything so labelled when the test ends, pass or fail, and each test
//! checks that nothing labelled is left. The state backend is answered by [`FakeState`], an
//! in-memory stand-in for the control plane (state plus lock, per OpenTofu's http backend rules).

mod common;

use bytes::Bytes;
use common::*;
use delegate_agent::sandbox::{
    docker as sdocker, PullPolicy, Sandbox, SandboxError, SandboxSettings,
};
use delegate_agent::task_io::{StateReply, TaskInputs, TaskOutput, TaskResult};
use delegate_protocol::{
    BlobRef, ChunkKind, EventKind, LogStream, Op, Outcome, Secrets, StateMethod, TaskSpec,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn inputs(op: Op, archive: Vec<u8>, plan: Option<Vec<u8>>) -> TaskInputs {
    TaskInputs {
        spec: TaskSpec {
            task_id: Uuid::new_v4(),
            op,
            workspace: "itest".into(),
            auto_approve: false,
            vars: BTreeMap::new(),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets: Secrets::default(),
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

const HELLO: &str = r#"
variable "greeting" {
  type = string
}

variable "token" {
  type    = string
  default = "unset"
}

resource "terraform_data" "hello" {
  input = var.greeting
}

resource "terraform_data" "second" {
  input = "fixed"
}

output "message" {
  value = terraform_data.hello.output
}

output "token_echo" {
  value = "token is ${var.token}"
}

output "hidden" {
  value     = "classified-${var.greeting}"
  sensitive = true
}
"#;

/// The control plane's side of the state relay, in memory.
#[derive(Default)]
struct StateStore {
    state: Option<Vec<u8>>,
    /// Lock id and the lock-info JSON tofu sent.
    lock: Option<(String, Vec<u8>)>,
    requests: Vec<(StateMethod, Option<String>)>,
}

#[derive(Clone, Default)]
struct FakeState {
    store: Arc<Mutex<StateStore>>,
    /// When set, requests are not answered (tofu blocks), as with a hung control plane...
    hang: bool,
    /// ...until this fires, if given.
    release: Option<CancellationToken>,
    first_request: Arc<Notify>,
}

impl FakeState {
    fn answer(
        &self,
        method: StateMethod,
        lock_id: Option<String>,
        body: Option<Vec<u8>>,
    ) -> StateReply {
        let mut s = self.store.lock().unwrap();
        s.requests.push((method, lock_id.clone()));
        let ok = |body: Vec<u8>| StateReply { status: 200, body };
        match method {
            StateMethod::Get => match &s.state {
                Some(st) => ok(st.clone()),
                None => StateReply {
                    status: 404,
                    body: vec![],
                },
            },
            StateMethod::Post => {
                if let (Some((held, _)), Some(id)) = (&s.lock, &lock_id) {
                    if held != id {
                        return StateReply {
                            status: 409,
                            body: b"lock held by another".to_vec(),
                        };
                    }
                }
                s.state = body;
                ok(vec![])
            }
            StateMethod::Lock => {
                if let Some((_, info)) = &s.lock {
                    return StateReply {
                        status: 423,
                        body: info.clone(),
                    };
                }
                s.lock = Some((lock_id.unwrap_or_default(), body.unwrap_or_default()));
                ok(vec![])
            }
            StateMethod::Unlock => {
                s.lock = None;
                ok(vec![])
            }
            StateMethod::Delete => {
                s.state = None;
                ok(vec![])
            }
        }
    }
}

#[derive(Default, Debug)]
struct Collected {
    logs: Vec<(LogStream, Bytes)>,
    events: Vec<EventKind>,
    artifacts: Vec<(ChunkKind, Vec<u8>)>,
}

impl Collected {
    fn text(&self) -> String {
        self.logs
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
    fn artifact(&self, kind: ChunkKind) -> Option<&Vec<u8>> {
        self.artifacts
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d)
    }
    fn steps_started(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                EventKind::StepStarted { step } => Some(step.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Run a task, answering state requests with `fake`, collecting everything it reports.
async fn run(
    sandbox: &Sandbox,
    inputs: TaskInputs,
    fake: &FakeState,
    cancel: CancellationToken,
) -> (TaskResult, Collected) {
    let (tx, mut rx) = mpsc::channel::<TaskOutput>(64);
    let fake = fake.clone();
    let collector = tokio::spawn(async move {
        let mut c = Collected::default();
        let mut hung: Vec<oneshot::Sender<StateReply>> = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                TaskOutput::Log { stream, data } => c.logs.push((stream, data)),
                TaskOutput::Event(e) => c.events.push(e),
                TaskOutput::Artifact { kind, data } => c.artifacts.push((kind, data)),
                TaskOutput::Journal { saved, .. } => {
                    let _ = saved.send(Ok(()));
                }
                TaskOutput::State {
                    method,
                    lock_id,
                    body,
                    reply,
                } => {
                    fake.first_request.notify_one();
                    if fake.hang {
                        match fake.release.clone() {
                            Some(release) => {
                                let fake = fake.clone();
                                tokio::spawn(async move {
                                    release.cancelled().await;
                                    let _ = reply.send(fake.answer(method, lock_id, body));
                                });
                            }
                            None => {
                                fake.store.lock().unwrap().requests.push((method, lock_id));
                                hung.push(reply);
                            }
                        }
                    } else {
                        let _ = reply.send(fake.answer(method, lock_id, body));
                    }
                }
            }
        }
        c
    });
    let result = sandbox.run_task(inputs, tx, cancel).await;
    let collected = collector.await.unwrap();
    (result, collected)
}

fn assert_succeeded(result: &TaskResult, c: &Collected) {
    assert_eq!(
        result.outcome,
        Outcome::Succeeded,
        "reason: {:?}\nlogs:\n{}",
        result.reason,
        c.text()
    );
}

#[tokio::test]
async fn plan_apply_drift_destroy_with_the_default_backend() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    let archive = tar_gz(&[("main.tf", HELLO)]);
    let secret = "s3cr3t-Zq9-value";

    // Plan.
    let mut plan_in = inputs(Op::Plan, archive.clone(), None);
    plan_in.spec.vars.insert("greeting".into(), "hi".into());
    plan_in
        .spec
        .secrets
        .0
        .insert("TF_VAR_token".into(), secret.into());
    let (result, c) = run(&sb, plan_in, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert_eq!(
        (
            result.summary.add,
            result.summary.change,
            result.summary.destroy
        ),
        (2, 0, 0)
    );
    assert!(!result.summary.applied);
    assert_eq!(c.steps_started(), ["init", "plan", "show"]);
    let finished: Vec<(String, i64)> = c
        .events
        .iter()
        .filter_map(|e| match e {
            EventKind::StepFinished {
                step, exit_code, ..
            } => Some((step.clone(), *exit_code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        [("init".into(), 0), ("plan".into(), 0), ("show".into(), 0)]
    );
    let plan_file = c
        .artifact(ChunkKind::Plan)
        .expect("plan file artifact")
        .clone();
    assert!(plan_file.starts_with(b"PK"), "a plan file is a zip archive");
    let plan_json: serde_json::Value =
        serde_json::from_slice(c.artifact(ChunkKind::PlanJson).expect("plan JSON artifact"))
            .unwrap();
    assert_eq!(
        plan_json["resource_changes"].as_array().map(Vec::len),
        Some(2)
    );
    let text = c.text();
    assert!(
        text.contains("Plan: 2 to add, 0 to change, 0 to destroy"),
        "{text}"
    );
    assert!(text.contains("delegate: no backend declared"), "{text}");
    assert!(!text.contains(secret), "secret leaked into logs");
    assert!(!text.contains('\u{1b}'), "-no-color");
    {
        let s = fake.store.lock().unwrap();
        assert!(
            s.requests.iter().any(|(m, _)| *m == StateMethod::Lock),
            "{:?}",
            s.requests
        );
        assert!(s.lock.is_none(), "plan released its lock");
    }

    // Apply exactly that plan.
    let mut apply_in = inputs(Op::Apply, archive.clone(), Some(plan_file));
    apply_in
        .spec
        .secrets
        .0
        .insert("TF_VAR_token".into(), secret.into());
    let (result, c) = run(&sb, apply_in, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert!(result.summary.applied);
    assert_eq!(result.summary.add, 2);
    assert_eq!(c.steps_started(), ["init", "show", "apply", "output"]);
    let outputs = result.summary.outputs.clone().expect("outputs");
    assert_eq!(outputs["message"]["value"], "hi");
    assert_eq!(outputs["hidden"]["sensitive"], true);
    assert!(
        outputs["hidden"].get("value").is_none(),
        "sensitive value dropped"
    );
    assert_eq!(outputs["token_echo"]["value"], "token is [REDACTED]");
    let text = c.text();
    assert!(
        text.contains("Apply complete! Resources: 2 added"),
        "{text}"
    );
    assert!(
        text.contains("[REDACTED]"),
        "the echoed secret is masked: {text}"
    );
    assert!(!text.contains(secret), "secret leaked into logs: {text}");
    assert!(c.artifacts.is_empty(), "apply uploads no artifacts");
    let state = fake
        .store
        .lock()
        .unwrap()
        .state
        .clone()
        .expect("state written through the backend");
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(state["resources"].as_array().map(Vec::len), Some(2));

    // Drift: none yet.
    let mut drift_in = inputs(Op::Drift, archive.clone(), None);
    drift_in.spec.vars.insert("greeting".into(), "hi".into());
    drift_in
        .spec
        .secrets
        .0
        .insert("TF_VAR_token".into(), secret.into());
    let (result, c) = run(&sb, drift_in, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert_eq!(result.summary.drift, Some(false), "{}", c.text());
    assert!(result.summary.drift_addresses.is_empty());

    // Change the state behind tofu's back: drift on that resource.
    {
        let mut s = fake.store.lock().unwrap();
        let mut st: serde_json::Value = serde_json::from_slice(s.state.as_ref().unwrap()).unwrap();
        for r in st["resources"].as_array_mut().unwrap() {
            if r["name"] == "hello" {
                let attrs = &mut r["instances"][0]["attributes"];
                attrs["input"] = serde_json::json!({"value": "tampered", "type": "string"});
                attrs["output"] = serde_json::json!({"value": "tampered", "type": "string"});
            }
        }
        s.state = Some(serde_json::to_vec(&st).unwrap());
    }
    let mut drift_in = inputs(Op::Drift, archive.clone(), None);
    drift_in.spec.vars.insert("greeting".into(), "hi".into());
    drift_in
        .spec
        .secrets
        .0
        .insert("TF_VAR_token".into(), secret.into());
    let (result, c) = run(&sb, drift_in, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert_eq!(result.summary.drift, Some(true), "{}", c.text());
    assert_eq!(result.summary.drift_addresses, ["terraform_data.hello"]);
    assert!(c.artifact(ChunkKind::PlanJson).is_some());

    // Destroy.
    let mut destroy_in = inputs(Op::Destroy, archive, None);
    destroy_in.spec.vars.insert("greeting".into(), "hi".into());
    destroy_in
        .spec
        .secrets
        .0
        .insert("TF_VAR_token".into(), secret.into());
    let (result, c) = run(&sb, destroy_in, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert!(result.summary.applied);
    assert_eq!(result.summary.destroy, 2);
    let state = fake.store.lock().unwrap().state.clone().unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(
        state["resources"].as_array().map(Vec::len),
        Some(0),
        "{state}"
    );

    run_id.assert_clean().await;
}

#[tokio::test]
async fn plan_with_auto_approve_applies_in_one_task() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.auto_approve = true;
    task.spec.vars.insert("greeting".into(), "auto".into());
    let (result, c) = run(&sb, task, &fake, CancellationToken::new()).await;
    assert_succeeded(&result, &c);
    assert_eq!(
        c.steps_started(),
        ["init", "plan", "show", "apply", "output"]
    );
    assert!(result.summary.applied);
    assert_eq!(result.summary.add, 2);
    assert_eq!(
        result.summary.outputs.as_ref().unwrap()["message"]["value"],
        "auto"
    );
    assert!(c.artifact(ChunkKind::Plan).is_some() && c.artifact(ChunkKind::PlanJson).is_some());
    assert!(fake.store.lock().unwrap().state.is_some());
    run_id.assert_clean().await;
}

#[tokio::test]
async fn validate_needs_no_backend_and_reports_errors() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    let (result, c) = run(
        &sb,
        inputs(Op::Validate, tar_gz(&[("main.tf", HELLO)]), None),
        &fake,
        CancellationToken::new(),
    )
    .await;
    assert_succeeded(&result, &c);
    assert_eq!(c.steps_started(), ["init", "validate"]);
    assert!(
        c.text().contains("The configuration is valid"),
        "{}",
        c.text()
    );
    assert!(fake.store.lock().unwrap().requests.is_empty());

    let broken = r#"resource "terraform_data" "x" { input = var.missing }"#;
    let (result, c) = run(
        &sb,
        inputs(Op::Validate, tar_gz(&[("main.tf", broken)]), None),
        &fake,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, Outcome::Failed);
    let reason = result.reason.unwrap();
    assert!(
        reason.starts_with("step `") && reason.ends_with("exited with code 1"),
        "{reason}"
    );
    assert!(
        c.text().contains("Reference to undeclared input variable"),
        "{}",
        c.text()
    );
    run_id.assert_clean().await;
}

#[tokio::test]
async fn own_backend_is_kept() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    // A local backend inside the volume: the agent must not add its own.
    let ws = r#"
terraform {
  backend "local" {
    path = "/workspace/own.tfstate"
  }
}
resource "terraform_data" "x" {}
"#;
    let (result, c) = run(
        &sb,
        inputs(Op::Plan, tar_gz(&[("main.tf", ws)]), None),
        &fake,
        CancellationToken::new(),
    )
    .await;
    assert_succeeded(&result, &c);
    assert_eq!(result.summary.add, 1);
    assert!(
        fake.store.lock().unwrap().requests.is_empty(),
        "no request reached the default backend"
    );
    assert!(!c.text().contains("no backend declared"));
    run_id.assert_clean().await;
}

#[tokio::test]
async fn lock_held_elsewhere_fails_with_the_holder() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    let holder = r#"{"ID":"aaaaaaaa-1111-2222-3333-bbbbbbbbbbbb","Operation":"OperationTypeApply","Info":"","Who":"someone@elsewhere","Version":"1.11.4","Created":"2026-01-01T00:00:00Z","Path":""}"#;
    fake.store.lock().unwrap().lock = Some((
        "aaaaaaaa-1111-2222-3333-bbbbbbbbbbbb".into(),
        holder.as_bytes().to_vec(),
    ));
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.vars.insert("greeting".into(), "hi".into());
    let (result, c) = run(&sb, task, &fake, CancellationToken::new()).await;
    assert_eq!(result.outcome, Outcome::Failed, "{}", c.text());
    assert_eq!(
        result.reason.as_deref(),
        Some("step `plan` exited with code 1")
    );
    let text = c.text();
    assert!(text.contains("Error acquiring the state lock"), "{text}");
    assert!(
        text.contains("ID=aaaaaaaa-1111-2222-3333-bbbbbbbbbbbb"),
        "holder shown: {text}"
    );
    run_id.assert_clean().await;
}

#[tokio::test]
async fn hostile_archive_is_refused_before_docker() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState::default();
    // A `..` entry, written byte for byte (tar builders refuse to make one).
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(4);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escaped.tf");
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(b"evil");
    raw.resize(1024 + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let archive = gz.finish().unwrap();

    let (result, c) = run(
        &sb,
        inputs(Op::Plan, archive, None),
        &fake,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, Outcome::Failed);
    let reason = result.reason.unwrap();
    assert!(
        reason.contains("\"../escaped.tf\"") && reason.contains("`..`"),
        "{reason}"
    );
    assert!(c.events.is_empty() && c.logs.is_empty());
    // Not even a network or a volume was made.
    run_id.assert_clean().await;
}

/// A hung state backend blocks tofu inside a step, deterministically: no timing guesses.
async fn blocked_task(
    cancel_after_first_request: bool,
    timeout_secs: u64,
) -> (Run, TaskResult, Collected, FakeState) {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState {
        hang: true,
        ..FakeState::default()
    };
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.vars.insert("greeting".into(), "hi".into());
    task.spec.timeout_secs = timeout_secs;
    let cancel = CancellationToken::new();
    if cancel_after_first_request {
        let (cancel, notify) = (cancel.clone(), fake.first_request.clone());
        tokio::spawn(async move {
            notify.notified().await;
            cancel.cancel();
        });
    }
    let (result, c) = run(&sb, task, &fake, cancel).await;
    (run_id, result, c, fake)
}

#[tokio::test]
async fn cancel_stops_the_running_step() {
    let (run_id, result, c, fake) = blocked_task(true, 0).await;
    assert_eq!(
        result.outcome,
        Outcome::Cancelled,
        "{:?}\n{}",
        result.reason,
        c.text()
    );
    let reason = result.reason.unwrap();
    assert!(reason.starts_with("cancelled during step `"), "{reason}");
    assert!(!fake.store.lock().unwrap().requests.is_empty());
    // The stopped step reported its end; nothing ran after it.
    let last_started = c.steps_started().last().cloned().unwrap();
    assert!(reason.contains(&format!("`{last_started}`")), "{reason}");
    assert!(
        matches!(c.events.last(), Some(EventKind::StepFinished { step, .. }) if *step == last_started)
    );
    assert!(c.artifacts.is_empty());
    assert!(c.logs.iter().any(|(s, l)| *s == LogStream::System
        && String::from_utf8_lossy(l).contains("cancel requested: interrupting step")));
    run_id.assert_clean().await;
}

#[tokio::test]
async fn cancel_sends_sigint_first() {
    // The hung request is answered once the task is cancelled, so tofu can react to SIGINT and
    // exit by itself; with a long grace period, an exit code of 137 would mean SIGKILL was needed.
    let run_id = Run::new("itest-agent");
    let settings = SandboxSettings {
        cancel_grace: Duration::from_secs(120),
        ..run_id.settings()
    };
    image().await;
    let sb = Sandbox::connect(settings, &run_id.agent()).await.unwrap();
    let cancel = CancellationToken::new();
    let fake = FakeState {
        hang: true,
        release: Some(cancel.clone()),
        ..FakeState::default()
    };
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.vars.insert("greeting".into(), "hi".into());
    let (trigger, notify) = (cancel.clone(), fake.first_request.clone());
    tokio::spawn(async move {
        notify.notified().await;
        trigger.cancel();
    });
    let (result, c) = run(&sb, task, &fake, cancel).await;
    assert_eq!(
        result.outcome,
        Outcome::Cancelled,
        "{:?}\n{}",
        result.reason,
        c.text()
    );
    let codes: Vec<i64> = c
        .events
        .iter()
        .filter_map(|e| match e {
            EventKind::StepFinished { exit_code, .. } => Some(*exit_code),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes.len(),
        1,
        "no step after the cancelled one: {:?}",
        c.events
    );
    assert_ne!(
        codes[0], 137,
        "tofu was SIGKILLed instead of stopping on SIGINT"
    );
    run_id.assert_clean().await;
}

#[tokio::test]
async fn dropping_run_task_still_removes_everything() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let fake = FakeState {
        hang: true,
        ..FakeState::default()
    };
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.vars.insert("greeting".into(), "hi".into());
    let notify = fake.first_request.clone();
    let handle = tokio::spawn({
        let sb = sb.clone();
        async move { run(&sb, task, &fake, CancellationToken::new()).await }
    });
    notify.notified().await;
    assert!(
        !run_id.leftovers().await.is_empty(),
        "the task is running in Docker"
    );
    handle.abort();
    let _ = handle.await;
    // Removal happens in the background once the future is dropped.
    for _ in 0..600 {
        if run_id.leftovers().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_id.assert_clean().await;
}

#[tokio::test]
async fn running_step_is_hardened_as_configured() {
    // While tofu is blocked inside a step, look at what Docker actually runs.
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let cancel = CancellationToken::new();
    let fake = FakeState {
        hang: true,
        ..FakeState::default()
    };
    let mut task = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
    task.spec.vars.insert("greeting".into(), "hi".into());
    let task_id = task.spec.task_id;
    let notify = fake.first_request.clone();
    let runner = tokio::spawn({
        let (sb, cancel) = (sb.clone(), cancel.clone());
        async move { run(&sb, task, &fake, cancel).await }
    });
    notify.notified().await;

    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![run_id.label(), format!("io.delegate.task={task_id}")],
    )]);
    let running = docker
        .list_containers(Some(bollard::container::ListContainersOptions {
            filters: filters.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(running.len(), 1, "one step container at a time");
    let c = docker
        .inspect_container(running[0].id.as_deref().unwrap(), None)
        .await
        .unwrap();
    let config = c.config.unwrap();
    let host = c.host_config.unwrap();
    assert_eq!(config.user.as_deref(), Some("65534:65534"));
    assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
    let labels = config.labels.unwrap();
    assert_eq!(
        labels.get("io.delegate.step").map(String::as_str),
        Some("init")
    );
    assert_eq!(
        labels.get("io.delegate.agent").map(String::as_str),
        Some(format!("itest-agent-{}", run_id.id).as_str())
    );
    let env = config.env.unwrap();
    for want in ["TF_IN_AUTOMATION=1", "TF_INPUT=0", "HOME=/tmp"] {
        assert!(env.iter().any(|e| e == want), "{want} in {env:?}");
    }
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.privileged, Some(false));
    assert_eq!(host.init, Some(true));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
    assert!(host
        .security_opt
        .unwrap()
        .iter()
        .any(|o| o.starts_with("no-new-privileges")));
    assert_eq!(host.memory, Some(512 << 20));
    assert_eq!(host.pids_limit, Some(512));
    assert_eq!(host.log_config.and_then(|l| l.typ).as_deref(), Some("none"));
    assert!(host.binds.unwrap_or_default().is_empty(), "no host paths");
    let mounts = c.mounts.unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].destination.as_deref(), Some("/workspace"));
    assert_eq!(
        mounts[0].name.as_deref(),
        Some(sdocker::volume_name(task_id).as_str())
    );
    let network = host.network_mode.unwrap();
    assert_eq!(network, sdocker::network_name(task_id));
    let net = docker
        .inspect_network(
            &network,
            None::<bollard::network::InspectNetworkOptions<String>>,
        )
        .await
        .unwrap();
    assert_eq!(net.internal, Some(true), "no route out");

    cancel.cancel();
    let (result, _c) = runner.await.unwrap();
    assert_eq!(result.outcome, Outcome::Cancelled);
    run_id.assert_clean().await;
}

#[tokio::test]
async fn timeout_stops_the_task() {
    let (run_id, result, c, _fake) = blocked_task(false, 1).await;
    assert_eq!(
        result.outcome,
        Outcome::TimedOut,
        "{:?}\n{}",
        result.reason,
        c.text()
    );
    assert!(result.reason.unwrap().starts_with("timed out after 1s"));
    run_id.assert_clean().await;
}

#[tokio::test]
async fn two_tasks_in_parallel_keep_their_own_output() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let (fa, fb) = (FakeState::default(), FakeState::default());
    let task = |greeting: &str| {
        let mut t = inputs(Op::Plan, tar_gz(&[("main.tf", HELLO)]), None);
        t.spec.vars.insert("greeting".into(), greeting.into());
        t
    };
    let ((ra, ca), (rb, cb)) = tokio::join!(
        run(&sb, task("alpha-greeting"), &fa, CancellationToken::new()),
        run(&sb, task("bravo-greeting"), &fb, CancellationToken::new())
    );
    assert_succeeded(&ra, &ca);
    assert_succeeded(&rb, &cb);
    assert!(ca.text().contains("alpha-greeting") && !ca.text().contains("bravo-greeting"));
    assert!(cb.text().contains("bravo-greeting") && !cb.text().contains("alpha-greeting"));
    run_id.assert_clean().await;
}

#[tokio::test]
async fn pull_policies() {
    let run_id = Run::new("itest-agent");
    image().await;
    let agent = format!("itest-agent-{}", run_id.id);
    let with = |image: &str, policy| SandboxSettings {
        image: image.into(),
        pull_policy: policy,
        ..run_id.settings()
    };
    let missing = format!("delegate-sandbox:absent-{}", run_id.id);
    let sb = Sandbox::connect(with(&missing, PullPolicy::Never), &agent)
        .await
        .unwrap();
    let e = sb.ensure_image().await.unwrap_err();
    assert!(matches!(e, SandboxError::ImageMissing { .. }));
    let text = e.to_string();
    assert!(
        text.contains(&missing) && text.contains("delegate sandbox build-image"),
        "{text}"
    );

    // Present: no pull (a pull could not succeed on this machine, so success proves none ran).
    let sb = Sandbox::connect(with(IMAGE, PullPolicy::IfMissing), &agent)
        .await
        .unwrap();
    sb.ensure_image().await.unwrap();
    let sb = Sandbox::connect(with(IMAGE, PullPolicy::Never), &agent)
        .await
        .unwrap();
    sb.ensure_image().await.unwrap();
    assert!(!sb.engine_version().await.unwrap().is_empty());

    // Always tries the registry and says why it failed.
    let sb = Sandbox::connect(with(&missing, PullPolicy::Always), &agent)
        .await
        .unwrap();
    match sb.ensure_image().await {
        Err(SandboxError::Pull { image, message }) => {
            assert_eq!(image, missing);
            assert!(!message.is_empty());
        }
        other => panic!("expected a pull error, got {other:?}"),
    }
    run_id.assert_clean().await;
}

#[tokio::test]
async fn orphans_are_removed_live_tasks_kept() {
    let run_id = Run::new("itest-agent");
    let sb = run_id.sandbox().await;
    let agent = format!("itest-agent-{}", run_id.id);
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let (live, dead) = (Uuid::new_v4(), Uuid::new_v4());
    for task in [live, dead] {
        let labels = sdocker::task_labels(&run_id.settings().extra_labels, &agent, "itest", task);
        sdocker::create_volume(&docker, &sdocker::volume_name(task), &labels)
            .await
            .unwrap();
        sdocker::create_network(&docker, &sdocker::network_name(task), &labels)
            .await
            .unwrap();
    }
    // Another agent's objects are not ours to remove.
    let other = sdocker::task_labels(
        &run_id.settings().extra_labels,
        "someone-else",
        "itest",
        dead,
    );
    sdocker::create_volume(
        &docker,
        &format!("delegate-{}-other", Uuid::new_v4()),
        &other,
    )
    .await
    .unwrap();

    let removed = sb.cleanup_orphans(&[live]).await.unwrap();
    assert_eq!(removed, 2);
    let left = run_id.leftovers().await;
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().any(|l| l.contains(&live.to_string())));
    assert!(
        !left.iter().any(|l| l.contains(&dead.to_string())),
        "{left:?}"
    );

    assert_eq!(sb.cleanup_orphans(&[]).await.unwrap(), 2);
    let _ = sdocker::remove_labelled(&docker, &[run_id.label()], |_| false).await;
    run_id.assert_clean().await;
}
