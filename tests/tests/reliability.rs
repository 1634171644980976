//! End to end: nothing lost, nothing duplicated, nothing in the clear — through cut connections,
//! control plane restarts and agent crashes, with the real binaries, Docker and tofu.

use delegate_tests::fleet::{assert_same_log, Fleet, TASK_WAIT};
use delegate_tests::net::Relay;
use delegate_tests::process::table;
use delegate_tests::{assert_eventually, RunningAgent};
use rand::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// Route the agent through a relay the test can cut, with quick reconnects.
fn via_relay(relay_port: u16) -> impl Fn(&mut toml::Table) {
    move |doc: &mut toml::Table| {
        let cp = table(doc, "control_plane");
        cp.insert(
            "url".into(),
            toml::Value::String(format!("wss://127.0.0.1:{relay_port}/v1/agent")),
        );
        cp.insert("backoff_initial_ms".into(), toml::Value::Integer(50));
        cp.insert("backoff_max_ms".into(), toml::Value::Integer(400));
    }
}

fn step_started(f: &Fleet, id: &str, step: &str) -> bool {
    f.show(id)["events"].as_array().is_some_and(|ev| {
        ev.iter()
            .any(|e| e["event"]["kind"] == "step_started" && e["event"]["step"] == step)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_survive_a_hundred_cut_connections_byte_for_byte() {
    let f = Fleet::start(&["steadfast"], 1).await;
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", f.cp.agent_port).parse().unwrap();
    let relay = Relay::start(target).await;
    let mut f = f;
    // Re-point the agent at the relay and restart it.
    let config = f.cp.agent_dir("steadfast").join("agent.toml");
    delegate_tests::process::edit_toml(&config, via_relay(relay.addr.port()));
    f.agents.clear();
    f.agents
        .push(RunningAgent::start(&config, "steadfast", &[]));
    let connects = f.cp.audit_actions("agent.connected").len();
    assert_eventually!(Duration::from_secs(60), "agent back through the relay", {
        f.cp.audit_actions("agent.connected").len() > connects
            && f.cp.agent_state("steadfast").as_deref() == Some("connected")
    });

    let ws = f.workspace("chatty");
    let args = ["--op", "plan", "--var", "size=300"];

    // Baseline: the same plan with the link left alone.
    let base = f.submit(&ws, &args);
    f.succeeded(&base).await;
    let expected = f.logs(&base);
    assert!(expected.lines().count() > 3_000, "chatty plan too quiet");

    // Now cut the connection at random moments, 100 times, while plans run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Cuts land anywhere: during assignment, while the inputs arrive, while steps run, while
    // artifacts and `done` are sent, and between tasks.
    let cutter = {
        let (stop, cuts) = (stop.clone(), cuts.clone());
        let relay = std::sync::Arc::new(relay);
        let r = relay.clone();
        let h = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            while cuts.load(std::sync::atomic::Ordering::SeqCst) < 100 && Instant::now() < deadline
            {
                let wait = rand::thread_rng().gen_range(30..250);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if r.cut() > 0 {
                    cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
            }
        });
        (h, relay)
    };
    let mut runs = Vec::new();
    let started = Instant::now();
    while cuts.load(std::sync::atomic::Ordering::SeqCst) < 100
        && started.elapsed() < Duration::from_secs(600)
    {
        let id = f.submit(&ws, &args);
        let shown = f.finished(&id).await;
        assert_eq!(shown["outcome"], "succeeded", "{shown:#}");
        runs.push(id);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = cutter.0.await;
    let total_cuts = cuts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(total_cuts >= 100, "only {total_cuts} cuts happened");
    assert!(!runs.is_empty());
    for id in &runs {
        assert_same_log(
            &format!("task {id} after {total_cuts} cuts"),
            &expected,
            &f.logs(id),
        );
    }
    drop(cutter.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_restart_mid_task_loses_nothing() {
    let mut f = Fleet::start(&["survivor"], 1).await;
    let ws = f.workspace("chatty");
    let args = ["--op", "plan", "--var", "size=300"];
    let base = f.submit(&ws, &args);
    f.succeeded(&base).await;
    let expected = f.logs(&base);

    let id = f.submit(&ws, &args);
    assert_eventually!(
        TASK_WAIT,
        "plan step running",
        step_started(&f, &id, "plan")
    );
    f.cp.stop(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.cp.start().await;
    let shown = f.succeeded(&id).await;
    assert_eq!(shown["outcome"], "succeeded");
    assert_same_log("after a control plane restart", &expected, &f.logs(&id));
}

fn grep_tree(root: &Path, needles: &[&[u8]]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                for n in needles {
                    if bytes.windows(n.len()).any(|w| w == *n) {
                        hits.push(format!(
                            "{} contains {:?}",
                            p.display(),
                            String::from_utf8_lossy(n)
                        ));
                    }
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_and_state_never_touch_disk_in_the_clear_and_logs_are_redacted() {
    let f = Fleet::start(&["vault"], 1).await;
    let ws = f.workspace("hello");
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let state_marker = format!("state-marker-{}", uuid::Uuid::new_v4().simple());
    // Only sealed places may hold the marker: it enters through a file of the workspace (the
    // archive), then the plan, the logs and the state.
    std::fs::write(
        ws.join("marker.auto.tfvars"),
        format!("names = [\"{state_marker}\"]\n"),
    )
    .unwrap();
    // The secret reaches tofu as TF_VAR_greeting, so tofu prints it in the plan and stores it in
    // state: the logs must show it redacted and the disks must hold it sealed.
    let id = f.submit(
        &ws,
        &[
            "--op",
            "plan",
            "--auto-approve",
            "--secret",
            &format!("TF_VAR_greeting={secret}"),
        ],
    );
    let shown = f.succeeded(&id).await;
    assert_eq!(shown["summary"]["applied"], true);
    let logs = f.logs(&id);
    assert!(
        logs.contains(&state_marker),
        "the plain variable shows in the log"
    );
    assert!(!logs.contains(&secret), "secret leaked into the task log");
    assert!(
        logs.contains("[REDACTED]"),
        "no redaction marker in:\n{logs}"
    );
    let shown_text = shown.to_string();
    assert!(!shown_text.contains(&secret), "secret in show --json");
    let audit = f.cp.cli(&["audit", "--json"]);
    assert!(
        !String::from_utf8_lossy(&audit.stdout).contains(&secret),
        "secret in audit"
    );

    // The state (with the marker and the secret in it) is stored, sealed.
    let state = f
        .api
        .get("/api/v1/workspaces/hello/state")
        .await
        .1
        .to_string();
    assert!(state.contains(&state_marker), "the state holds the marker");

    // Byte search: the control plane's and the agent's data directories hold neither in the clear.
    let needles: Vec<&[u8]> = vec![secret.as_bytes(), state_marker.as_bytes()];
    let mut hits = grep_tree(f.cp.path(), &needles);
    // The test's own copy of the workspace and the agent logs are not the product's data.
    hits.retain(|h| {
        !h.contains("/workspaces/") && !h.contains("agent-") && !h.contains("serve.log")
    });
    assert!(
        hits.is_empty(),
        "plaintext found on disk:\n{}",
        hits.join("\n")
    );
    for a in &f.agents {
        assert!(!a.log().contains(&secret), "secret in the agent's own log");
    }
    assert!(
        !f.cp.log().contains(&secret),
        "secret in the control plane's log"
    );
}
