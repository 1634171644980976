//! End to end: the agent process is SIGKILLed while a task's step runs, and started again on the
//! same data dir and config. The step's container outlives it; the new process re-attaches to it,
//! collects it and finishes the task, or ends an apply it cannot prove `lost`. Real control plane,
//! real agent, real Docker, real tofu/terraform.
//!
//! The workspace is `examples/slow`: a plan or apply prints a line for `terraform_data.before`,
//! then works silently on the CPU for `BATCHES` batches (about ten seconds of one core each),
//! then prints the rest. The test kills the agent once that first line reached the control plane,
//! so the kill lands inside the step. Terraform prints nothing during the work, so nothing was
//! printed while the agent was away and the task's log can be compared with an undisturbed run.
//!
//! The agent has to be back before the work ends: the task's state backend is served by the
//! agent, and a plan or apply that ends while it is down cannot release its lock or save its
//! state. `BATCHES` leaves a wide margin; the test says so when it was not enough. One case lets
//! the apply end while the agent is down, to show what then happens (collected, not run again;
//! failed, its state not saved).
//!
//! Limitation these tests live with: step containers use Docker's `none` log driver, so whatever a
//! step prints between the agent's death and the new agent's attach is gone; the task log says so
//! in one line ("... whatever it printed in the N s the agent was away was not captured ...").

use delegate_tests::fleet::{assert_same_log, Fleet, TASK_WAIT};
use delegate_tests::RunningAgent;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// Batches of CPU work between the first and the rest of a step's output (each about ten seconds
/// of one core; the sandbox gives a step one core).
const BATCHES: &str = "3";

/// The cases start a lot of CPU work; one at a time, so they do not slow each other down.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The line of the task log that says output was not captured while the agent was away.
fn gap_line(step: &str) -> String {
    format!("the agent restarted while step `{step}` ran; whatever it printed in the ")
}

fn events(shown: &Value) -> Vec<Value> {
    shown["events"].as_array().cloned().unwrap_or_default()
}

/// How many `step_started` events the task has for `step`.
fn started_count(shown: &Value, step: &str) -> usize {
    events(shown)
        .iter()
        .filter(|e| e["event"]["kind"] == "step_started" && e["event"]["step"] == step)
        .count()
}

fn count_lines(log: &str, prefix: &str) -> usize {
    log.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Ids of this run's containers of `task`'s step `step` in Docker state `status` (`running`, ...;
/// empty for any).
fn step_containers(f: &Fleet, task: &str, step: &str, status: &str) -> Vec<String> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-aq", "--no-trunc"])
        .arg("--filter")
        .arg(format!("label={}={}", delegate_tests::RUN_LABEL, f.run))
        .arg("--filter")
        .arg(format!("label=io.delegate.task={task}"))
        .arg("--filter")
        .arg(format!("label=io.delegate.step={step}"));
    if !status.is_empty() {
        cmd.arg("--filter").arg(format!("status={status}"));
    }
    let out = cmd.output().expect("docker ps");
    assert!(out.status.success(), "docker ps failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Wait until the task's stored log holds a line starting with `prefix`.
async fn log_shows(f: &Fleet, task: &str, prefix: &str) {
    let start = Instant::now();
    loop {
        let log = f.logs(task);
        if log.lines().any(|l| l.starts_with(prefix)) {
            return;
        }
        let shown = f.show(task);
        assert!(
            shown["state"] != "finished",
            "task {task} finished before printing {prefix:?}: {shown:#}\n{log}"
        );
        assert!(
            start.elapsed() < TASK_WAIT,
            "timed out after {TASK_WAIT:?} waiting for {prefix:?} in the log of task {task}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGKILL the (only running) agent and wait for the process to be gone. The dead agent stays in
/// the fleet so its log is printed if the test fails.
fn sigkill_agent(f: &mut Fleet) {
    let agent = f.agents.last_mut().expect("an agent runs");
    agent.signal(libc::SIGKILL);
    let exit = agent
        .wait(Duration::from_secs(60))
        .expect("the agent exits after SIGKILL");
    assert_eq!(exit, None, "killed by a signal, not exited: {exit:?}");
}

/// Start the agent again with the same config (so the same data dir and spool).
fn restart_agent(f: &mut Fleet, name: &str) {
    let config = f.cp.agent_dir(name).join("agent.toml");
    f.agents.push(RunningAgent::start(&config, name, &[]));
}

/// Every Docker object of this run is gone (the agent removes them once the task ended).
async fn no_leftovers(f: &Fleet) {
    let start = Instant::now();
    loop {
        let left = f.leftovers();
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "labelled Docker objects left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The latest state of `ws`, as `(type.name, input)` pairs (numbers and strings as text).
async fn state_inputs(f: &Fleet, ws: &str) -> Vec<(String, String)> {
    let (status, state) = f.api.get(&format!("/api/v1/workspaces/{ws}/state")).await;
    assert_eq!(status, 200, "{state}");
    let mut out = Vec::new();
    for r in state["resources"].as_array().expect("resources") {
        for i in r["instances"].as_array().expect("instances") {
            out.push((
                format!(
                    "{}.{}",
                    r["type"].as_str().unwrap(),
                    r["name"].as_str().unwrap()
                ),
                match &i["attributes"]["input"]["value"] {
                    Value::Number(n) => n.as_f64().unwrap_or(f64::NAN).to_string(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Insist the task's log has no non-blank line twice, apart from lines that repeat as often in
/// `allowed` (an undisturbed run's log).
fn no_duplicates(what: &str, log: &str, allowed: &str) {
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        *seen.entry(l).or_default() += 1;
    }
    let mut normal = std::collections::HashMap::<&str, usize>::new();
    for l in allowed.lines() {
        *normal.entry(l).or_default() += 1;
    }
    let dup: Vec<_> = seen
        .iter()
        .filter(|(l, n)| **n > 1 && **n > normal.get(*l).copied().unwrap_or(1))
        .collect();
    assert!(dup.is_empty(), "{what}: lines repeated: {dup:?}\n{log}");
}

/// A fleet of one agent with the `slow` workspace applied once (without work) in workspace `ws`.
async fn prepared(name: &str, ws: &str) -> (Fleet, std::path::PathBuf) {
    let f = Fleet::start(&[name], 1).await;
    let dir = f.workspace("slow");
    let id = f.submit(
        &dir,
        &[
            "--op",
            "plan",
            "--workspace",
            ws,
            "--auto-approve",
            "--var",
            "batches=0",
        ],
    );
    let shown = f.succeeded(&id).await;
    assert_eq!(shown["summary"]["applied"], true, "{shown:#}");
    (f, dir)
}

/// (a) SIGKILL mid-plan: the new agent follows the plan's container to its end; the task succeeds
/// with the log an undisturbed plan has, plus one line saying what was not captured.
#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_plan_reattaches_and_the_plan_succeeds() {
    let _serial = SERIAL.lock().await;
    let (mut f, dir) = prepared("phoenix", "kill-plan").await;
    let args = [
        "--op",
        "plan",
        "--workspace",
        "kill-plan",
        "--var",
        &format!("batches={BATCHES}"),
    ];

    // The same plan, undisturbed: what the log must be.
    let base = f.submit(&dir, &args);
    f.succeeded(&base).await;
    let expected = f.logs(&base);
    assert!(
        expected.contains("Plan: 0 to add, 1 to change, 0 to destroy."),
        "{expected}"
    );

    let id = f.submit(&dir, &args);
    log_shows(&f, &id, "terraform_data.before: Refreshing state...").await;
    let running = step_containers(&f, &id, "plan", "running");
    assert_eq!(running.len(), 1, "the plan's container runs: {running:?}");
    let killed_at = Instant::now();
    sigkill_agent(&mut f);
    // The agent is gone; its step container is not.
    assert_eq!(
        step_containers(&f, &id, "plan", "running"),
        running,
        "the plan's container keeps running without the agent"
    );
    restart_agent(&mut f, "phoenix");

    let shown = f.finished(&id).await;
    let log = f.logs(&id);
    assert_eq!(
        shown["outcome"], "succeeded",
        "{shown:#}\n{log}\n(if the plan's container exited before the new agent came back, \
         raise BATCHES: the step could not release its state lock without the agent)"
    );
    eprintln!(
        "mid-plan: task finished {:?} after the kill",
        killed_at.elapsed()
    );

    // Re-attached, not re-run: one step_started for the plan, its first line once, and the line
    // that says what the agent could not capture.
    assert_eq!(started_count(&shown, "plan"), 1, "{shown:#}");
    assert_eq!(
        count_lines(&log, "terraform_data.before: Refreshing state..."),
        1,
        "{log}"
    );
    let gap = gap_line("plan");
    let gaps: Vec<&str> = log.lines().filter(|l| l.contains(&gap)).collect();
    assert_eq!(gaps.len(), 1, "one gap line in:\n{log}");
    eprintln!("mid-plan: {}", gaps[0]);
    assert!(
        log.contains("Plan: 0 to add, 1 to change, 0 to destroy."),
        "{log}"
    );
    // Apart from that line, exactly the undisturbed plan's log: nothing lost (tofu printed
    // nothing while the agent was away), nothing twice.
    let without_gap: String = log
        .split_inclusive('\n')
        .filter(|l| !l.contains(&gap))
        .collect();
    assert_same_log("plan after an agent SIGKILL", &expected, &without_gap);
    no_duplicates("plan after an agent SIGKILL", &log, &expected);
    // The plan file and its JSON were collected as for any plan.
    assert_eq!(shown["summary"]["change"], 1, "{shown:#}");
    assert!(shown["plan_sha256"].as_str().is_some(), "{shown:#}");
    no_leftovers(&f).await;
}

/// (b) SIGKILL mid-apply: the new agent follows the apply's container to its end; the apply ran
/// once and the task succeeds with the state it saved.
#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_apply_reattaches_and_the_apply_runs_once() {
    let _serial = SERIAL.lock().await;
    let (mut f, dir) = prepared("lazarus", "kill-apply").await;
    let plan = f.submit(
        &dir,
        &[
            "--op",
            "plan",
            "--workspace",
            "kill-apply",
            "--var",
            &format!("batches={BATCHES}"),
            "--var",
            "marker=second",
        ],
    );
    let shown = f.succeeded(&plan).await;
    assert_eq!(shown["summary"]["change"], 2, "{shown:#}");
    let approved = f.cp.cli_json(&["approve", &plan, "--json"]);
    let id = approved["id"].as_str().unwrap().to_string();

    log_shows(&f, &id, "terraform_data.before: Modifications complete").await;
    let running = step_containers(&f, &id, "apply", "running");
    assert_eq!(running.len(), 1, "the apply's container runs: {running:?}");
    sigkill_agent(&mut f);
    assert_eq!(
        step_containers(&f, &id, "apply", "running"),
        running,
        "the apply's container keeps running without the agent"
    );
    restart_agent(&mut f, "lazarus");

    let shown = f.finished(&id).await;
    let log = f.logs(&id);
    assert_eq!(
        shown["outcome"], "succeeded",
        "{shown:#}\n{log}\n(if the apply's container exited before the new agent came back, \
         raise BATCHES: the step could not save its state without the agent)"
    );
    assert_eq!(shown["summary"]["applied"], true, "{shown:#}");

    // Once: one step_started, each change once, one summary line.
    assert_eq!(started_count(&shown, "apply"), 1, "{shown:#}");
    for line in [
        "terraform_data.before: Modifying...",
        "terraform_data.before: Modifications complete",
        "terraform_data.after: Modifying...",
        "terraform_data.after: Modifications complete",
        "Apply complete! Resources: 0 added, 2 changed, 0 destroyed.",
    ] {
        assert_eq!(count_lines(&log, line), 1, "{line:?} once in:\n{log}");
    }
    let gap = gap_line("apply");
    let gaps: Vec<&str> = log.lines().filter(|l| l.contains(&gap)).collect();
    assert_eq!(gaps.len(), 1, "one gap line in:\n{log}");
    eprintln!("mid-apply: {}", gaps[0]);
    no_duplicates("apply after an agent SIGKILL", &log, "");
    // The state the apply saved through the agent's backend after the restart: each resource
    // once, with the values of this apply.
    let work = BATCHES.parse::<u64>().unwrap() * 1_000_000;
    assert_eq!(
        state_inputs(&f, "kill-apply").await,
        [
            ("terraform_data.after".to_string(), work.to_string()),
            ("terraform_data.before".to_string(), "second".to_string()),
        ]
    );
    // The output step ran after the restart, in a new container.
    assert_eq!(started_count(&shown, "output"), 1, "{shown:#}");
    no_leftovers(&f).await;
}

/// (c) The apply's container is removed while the agent is down: nothing proves whether the apply
/// ran, so the task ends `lost`, is not run again, and says why.
#[tokio::test(flavor = "multi_thread")]
async fn apply_whose_container_vanished_while_the_agent_was_down_ends_lost() {
    let _serial = SERIAL.lock().await;
    let (mut f, dir) = prepared("orphan", "kill-gone").await;
    let plan = f.submit(
        &dir,
        &[
            "--op",
            "plan",
            "--workspace",
            "kill-gone",
            "--var",
            &format!("batches={BATCHES}"),
            "--var",
            "marker=second",
        ],
    );
    f.succeeded(&plan).await;
    let approved = f.cp.cli_json(&["approve", &plan, "--json"]);
    let id = approved["id"].as_str().unwrap().to_string();

    log_shows(&f, &id, "terraform_data.before: Modifications complete").await;
    let running = step_containers(&f, &id, "apply", "running");
    assert_eq!(running.len(), 1, "the apply's container runs: {running:?}");
    sigkill_agent(&mut f);
    let out = Command::new("docker")
        .args(["rm", "-f"])
        .args(&running)
        .output()
        .unwrap();
    assert!(out.status.success(), "docker rm -f: {out:?}");
    assert!(step_containers(&f, &id, "apply", "").is_empty());
    restart_agent(&mut f, "orphan");

    let shown = f.finished(&id).await;
    let log = f.logs(&id);
    assert_eq!(shown["outcome"], "lost", "{shown:#}\n{log}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("during step `apply`")
            && reason.contains("container is gone without a recorded exit code")
            && reason.contains("cannot prove whether the apply ran")
            && reason.contains("check the workspace's state"),
        "the reason says what happened and asks for a check: {reason}"
    );
    // Not run again: the apply started once, and no step after it ran.
    assert_eq!(started_count(&shown, "apply"), 1, "{shown:#}");
    assert_eq!(started_count(&shown, "output"), 0, "{shown:#}");
    assert_eq!(
        count_lines(&log, "terraform_data.before: Modifying..."),
        1,
        "{log}"
    );
    assert!(!log.contains("Apply complete!"), "{log}");
    // The control plane's audit trail has the agent's verdict with the reason.
    let audit = f.cp.cli_json(&["audit", "--task", &id, "--json"]);
    let finished: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "task.finished")
        .collect();
    assert_eq!(finished.len(), 1, "{audit:#}");
    let detail = finished[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("lost: ") && detail.contains("cannot prove whether the apply ran"),
        "{detail}"
    );
    // The workspace's stored state is the one from before this apply: the apply's changes were
    // never saved, which is what the reason asks a human to check.
    assert_eq!(
        state_inputs(&f, "kill-gone").await,
        [
            ("terraform_data.after".to_string(), "0".to_string()),
            ("terraform_data.before".to_string(), "first".to_string()),
        ]
    );
    no_leftovers(&f).await;
}

/// (e) The apply ends while the agent is down: the new agent collects its exit code from Docker
/// and does not run it again. The apply could not save its state (the task's state backend is
/// served by the agent), so tofu exits 1 leaving errored.tfstate; what tofu printed about it was
/// written while no agent read the container, and is not in the task's log. The agent stores
/// that state on the control plane and ends the task lost, for a human to check.
#[tokio::test(flavor = "multi_thread")]
async fn apply_that_ended_while_the_agent_was_down_is_collected_not_rerun() {
    let _serial = SERIAL.lock().await;
    let (mut f, dir) = prepared("sleeper", "kill-late").await;
    let plan = f.submit(
        &dir,
        &[
            "--op",
            "plan",
            "--workspace",
            "kill-late",
            "--var",
            "batches=1",
            "--var",
            "marker=second",
        ],
    );
    f.succeeded(&plan).await;
    let approved = f.cp.cli_json(&["approve", &plan, "--json"]);
    let id = approved["id"].as_str().unwrap().to_string();

    log_shows(&f, &id, "terraform_data.before: Modifications complete").await;
    let running = step_containers(&f, &id, "apply", "running");
    assert_eq!(running.len(), 1, "the apply's container runs: {running:?}");
    sigkill_agent(&mut f);
    // tofu retries saving its state for a while before it gives up: a generous bound.
    let start = Instant::now();
    while step_containers(&f, &id, "apply", "exited").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the apply's container did not exit without the agent"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.ExitCode}}"])
        .args(&running)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(code, "1", "tofu cannot save the state without the agent");
    restart_agent(&mut f, "sleeper");

    let shown = f.finished(&id).await;
    let log = f.logs(&id);
    eprintln!("ended-while-down: task log:\n{log}");
    assert!(
        log.contains(
            "step `apply` ended (exit code 1) while the agent was away; it is collected, not run again"
        ),
        "{log}"
    );
    assert_eq!(started_count(&shown, "apply"), 1, "{shown:#}");
    assert_eq!(started_count(&shown, "output"), 0, "{shown:#}");
    assert_eq!(
        count_lines(&log, "terraform_data.before: Modifying..."),
        1,
        "{log}"
    );
    // The agent cannot prove where the apply stands (what tofu printed after the kill is
    // lost), so the task is lost for a human; the state tofu could not save to the agent's
    // backend (errored.tfstate) is stored on the control plane as a new version.
    assert_eq!(shown["outcome"], "lost", "{shown:#}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    for part in [
        "step `apply` ended with exit code 1 while the agent was away",
        "cannot prove where the apply stands",
        "errored.tfstate",
        "stored that state as a new state version",
        "check the workspace's state",
    ] {
        assert!(reason.contains(part), "{part}: {shown:#}");
    }
    assert_eq!(shown["summary"]["applied"], false, "{shown:#}");
    assert!(!log.contains("Error"), "{log}");
    let state = state_inputs(&f, "kill-late").await;
    assert!(
        state.contains(&("terraform_data.before".to_string(), "second".to_string())),
        "the control plane holds what the apply did: {state:?}"
    );
    assert!(
        f.cp.audit_actions("state.written")
            .iter()
            .any(|r| r["detail"].as_str().unwrap_or_default().contains(&id)),
        "the recovered state is audited as written by the task"
    );
    no_leftovers(&f).await;
}
