//! End to end: tofu tasks through the real control plane, the real agent, real Docker and the real
//! tofu/terraform binary in a locally built sandbox image.

use base64::Engine;
use delegate_tests::assert_eventually;
use delegate_tests::fleet::{Fleet, TASK_WAIT};
use serde_json::{json, Value};
use std::time::Duration;

fn no_leftovers(f: &Fleet) {
    // Objects go when the task ends; give the agent a moment after Done.
    let start = std::time::Instant::now();
    loop {
        let left = f.leftovers();
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "labelled Docker objects left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn latest_state(f: &Fleet, ws: &str) -> Value {
    let (status, v) = f.api.get(&format!("/api/v1/workspaces/{ws}/state")).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn resources(state: &Value) -> Vec<String> {
    state["resources"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .flat_map(|r| {
                    let base = format!(
                        "{}.{}",
                        r["type"].as_str().unwrap(),
                        r["name"].as_str().unwrap()
                    );
                    r["instances"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(move |i| match &i["index_key"] {
                            Value::String(k) => format!("{base}[\"{k}\"]"),
                            Value::Null => base.clone(),
                            other => format!("{base}[{other}]"),
                        })
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_approve_apply_destroy_with_state_in_the_default_backend() {
    let f = Fleet::start(&["worker"], 2).await;
    let ws = f.workspace("hello");

    let plan = f.submit(&ws, &["--op", "plan", "--var", "greeting=hi"]);
    let shown = f.succeeded(&plan).await;
    assert_eq!(shown["op"], "plan");
    assert_eq!(shown["summary"]["add"], 3, "{shown:#}");
    let sha = shown["plan_sha256"]
        .as_str()
        .expect("plan sha256 recorded")
        .to_string();
    assert_eq!(sha.len(), 64);
    let logs = f.logs(&plan);
    assert!(
        logs.contains("Plan: 3 to add, 0 to change, 0 to destroy."),
        "{logs}"
    );
    // Nothing applied yet: no state version.
    let (status, _) = f.api.get("/api/v1/workspaces/hello/state").await;
    assert_eq!(status, 204, "a plan must not write state");

    let approved = f.cp.cli_json(&["approve", &plan, "--json"]);
    let apply = approved["id"].as_str().unwrap().to_string();
    let shown = f.succeeded(&apply).await;
    assert_eq!(shown["op"], "apply");
    assert_eq!(
        shown["plan_sha256"],
        sha.as_str(),
        "apply carries the approved plan's hash"
    );
    assert_eq!(shown["summary"]["applied"], true);
    let outputs = shown["summary"]["outputs"].to_string();
    assert!(outputs.contains("hi, world!"), "{outputs}");
    assert!(f
        .logs(&apply)
        .contains("Apply complete! Resources: 3 added"));

    // The default backend kept the state, versioned, and the CLI shows it.
    let state = latest_state(&f, "hello").await;
    let mut have = resources(&state);
    have.sort();
    assert_eq!(
        have,
        vec![
            "terraform_data.greeting[\"delegate\"]",
            "terraform_data.greeting[\"world\"]",
            "terraform_data.summary"
        ]
    );
    let versions = f.cp.cli_json(&["state", "hello", "--json"]);
    let n = versions.as_array().unwrap().len();
    assert!(n >= 1, "{versions}");
    let out = f.cp.cli(&["state", "hello", "--version", &n.to_string()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi, world!"));

    // A second plan sees the stored state: nothing to do.
    let again = f.submit(&ws, &["--op", "plan", "--var", "greeting=hi"]);
    let shown = f.succeeded(&again).await;
    assert_eq!(shown["summary"]["add"], 0, "{shown:#}");
    assert!(f.logs(&again).contains("No changes."));

    // Destroy, through the same backend.
    let destroy = f.submit(&ws, &["--op", "destroy", "--var", "greeting=hi"]);
    let shown = f.succeeded(&destroy).await;
    assert_eq!(shown["summary"]["destroy"], 3, "{shown:#}");
    assert!(resources(&latest_state(&f, "hello").await).is_empty());
    assert!(
        f.cp.cli_json(&["state", "hello", "--json"])
            .as_array()
            .unwrap()
            .len()
            > n
    );
    no_leftovers(&f);
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_detected_after_state_changes_behind_tofus_back() {
    let f = Fleet::start(&["watcher"], 1).await;
    let ws = f.workspace("hello");
    let id = f.submit(&ws, &["--op", "plan", "--auto-approve"]);
    let shown = f.succeeded(&id).await;
    assert_eq!(shown["summary"]["applied"], true, "{shown:#}");

    let id = f.submit(&ws, &["--op", "drift"]);
    let shown = f.succeeded(&id).await;
    assert_eq!(
        shown["summary"]["drift"], false,
        "fresh apply has no drift: {shown:#}"
    );

    // Someone edits the state: the world greeting now says something else.
    let mut state = latest_state(&f, "hello").await;
    state["serial"] = json!(state["serial"].as_u64().unwrap() + 1);
    for r in state["resources"].as_array_mut().unwrap() {
        if r["name"] == "greeting" {
            for inst in r["instances"].as_array_mut().unwrap() {
                if inst["index_key"] == "world" {
                    inst["attributes"]["input"]["value"] = json!("tampered");
                    inst["attributes"]["output"]["value"] = json!("tampered");
                }
            }
        }
    }
    let (status, body) = f
        .api
        .put_json("/api/v1/workspaces/hello/state", &state)
        .await;
    assert_eq!(status, 200, "{body}");

    let id = f.submit(&ws, &["--op", "drift"]);
    let shown = f.succeeded(&id).await;
    assert_eq!(shown["summary"]["drift"], true, "{shown:#}");
    let addrs: Vec<String> = shown["summary"]["drift_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(
        addrs.contains(&"terraform_data.greeting[\"world\"]".to_string()),
        "{addrs:?}"
    );
    assert!(
        !addrs.contains(&"terraform_data.greeting[\"delegate\"]".to_string()),
        "{addrs:?}"
    );
    no_leftovers(&f);
}

/// Hold the workspace lock as another tofu would.
async fn hold_lock(f: &Fleet, ws: &str, id: &str) {
    let info = json!({"ID": id, "Operation": "OperationTypeApply", "Who": "someone@elsewhere",
        "Version": "1.11.4", "Created": "2026-11-25T00:00:00Z", "Info": "", "Path": ""});
    let (status, body) = f
        .api
        .post_json(&format!("/api/v1/workspaces/{ws}/lock"), &info)
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_conflict_names_the_holder_and_cancel_and_timeout_stop_a_waiting_tofu() {
    let f = Fleet::start(&["locker"], 2).await;
    let ws = f.workspace("hello");
    hold_lock(&f, "hello", "held-by-e2e-test-4242").await;

    // Plain plan: the lock is taken, tofu fails at once and says who holds it.
    let id = f.submit(&ws, &["--op", "plan"]);
    let shown = f.finished(&id).await;
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    let logs = f.logs(&id);
    assert!(
        logs.contains("held-by-e2e-test-4242"),
        "holder not named: {logs}"
    );
    assert!(
        logs.contains("someone@elsewhere"),
        "holder not named: {logs}"
    );

    // A plan told to wait for the lock is mid-run until cancelled.
    let waiting = f.submit(
        &ws,
        &[
            "--op",
            "plan",
            "--env",
            "TF_CLI_ARGS_plan=-lock-timeout=600s",
        ],
    );
    assert_eventually!(TASK_WAIT, "plan step running", {
        f.show(&waiting)["events"].as_array().is_some_and(|ev| {
            ev.iter()
                .any(|e| e["event"]["kind"] == "step_started" && e["event"]["step"] == "plan")
        })
    });
    let out = f.cp.cli(&["cancel", &waiting]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = f.finished(&waiting).await;
    assert_eq!(shown["outcome"], "cancelled", "{shown:#}");

    // The same with a task timeout instead of a cancel.
    let slow = f.submit(
        &ws,
        &[
            "--op",
            "plan",
            "--timeout",
            "8",
            "--env",
            "TF_CLI_ARGS_plan=-lock-timeout=600s",
        ],
    );
    let shown = f.finished(&slow).await;
    assert_eq!(shown["outcome"], "timed_out", "{shown:#}");

    // The lock released, the workspace works again.
    let (status, _) = f
        .api
        .call(reqwest_delete(), "/api/v1/workspaces/hello/lock", None)
        .await;
    assert_eq!(status, 200);
    let id = f.submit(&ws, &["--op", "plan"]);
    f.succeeded(&id).await;
    no_leftovers(&f);
}

fn reqwest_delete() -> reqwest::Method {
    reqwest::Method::DELETE
}

fn hostile_archive() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let data = b"resource \"terraform_data\" \"x\" {}\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    tar.append_data(&mut h, "main.tf", &data[..]).unwrap();
    // `append_data` refuses `..`, so write the name into the header by hand.
    let evil = b"owned\n";
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..14].copy_from_slice(b"../../escape.t");
    h.set_size(evil.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    tar.append(&h, &evil[..]).unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archive_is_refused_before_anything_is_created() {
    let f = Fleet::start(&["guard"], 1).await;
    let archive = base64::engine::general_purpose::STANDARD.encode(hostile_archive());
    let (status, body) = f
        .api
        .post_json(
            "/api/v1/tasks",
            &json!({"op": "plan", "workspace": "evil", "archive_b64": archive}),
        )
        .await;
    assert!(
        status == 200 || status == 201 || status == 202,
        "{status} {body}"
    );
    let id = body["id"].as_str().unwrap().to_string();
    let shown = f.finished(&id).await;
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("escape.t"),
        "reason must name the entry: {reason}"
    );
    assert!(
        !shown["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"]["kind"] == "step_started"),
        "no step may run: {shown:#}"
    );
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tasks_run_in_parallel_without_mixing_lines() {
    let f = Fleet::start(&["duo"], 2).await;
    let ws = f.workspace("hello");
    let a = f.submit(
        &ws,
        &[
            "--op",
            "plan",
            "--workspace",
            "alpha",
            "--var",
            "greeting=alpha-only",
        ],
    );
    let b = f.submit(
        &ws,
        &[
            "--op",
            "plan",
            "--workspace",
            "beta",
            "--var",
            "greeting=beta-only",
        ],
    );
    let sa = f.succeeded(&a).await;
    let sb = f.succeeded(&b).await;
    // Both held a slot at the same time: their running intervals overlap.
    let t = |v: &Value, k: &str| v[k].as_str().unwrap().to_string();
    assert!(
        t(&sa, "started_at") < t(&sb, "finished_at")
            && t(&sb, "started_at") < t(&sa, "finished_at"),
        "tasks ran one after the other: {sa:#} {sb:#}"
    );
    let (la, lb) = (f.logs(&a), f.logs(&b));
    assert!(
        la.contains("alpha-only") && !la.contains("beta-only"),
        "{la}"
    );
    assert!(
        lb.contains("beta-only") && !lb.contains("alpha-only"),
        "{lb}"
    );
    no_leftovers(&f);
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_reports_errors_and_success() {
    let f = Fleet::start(&["checker"], 1).await;
    let ws = f.workspace("hello");
    let ok = f.submit(&ws, &["--op", "validate"]);
    f.succeeded(&ok).await;
    std::fs::write(ws.join("broken.tf"), "resource \"terraform_data\" {\n").unwrap();
    let bad = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&bad).await;
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    no_leftovers(&f);
}
