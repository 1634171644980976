//! Tasks end to end against the in-process control plane, with a raw client playing the agent:
//! submit, dispatch (slots, reject), inputs, sequenced output and acks, artifacts, done, logs,
//! cancel, approve, lost tasks, and the state relay.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use delegate_controlplane::api_tasks::{StateVersionView, TaskView};
use delegate_controlplane::config::CpConfig;
use delegate_controlplane::task_ops::SubmitRequest;
use delegate_protocol::{
    Accept, BinaryFrame, ChunkKind, Done, ErrorCode, Event, EventKind, HeldTask, LogFrame,
    LogStream, Message, Op, Outcome, Reject, Secrets, StateMethod, StateRequest, Summary,
};
use std::collections::BTreeMap;
use uuid::Uuid;

const SECRET: &str = "s3cr3t-value-4242";

fn request(op: &str, workspace: &str, archive: &[u8]) -> SubmitRequest {
    SubmitRequest {
        op: op.into(),
        workspace: workspace.into(),
        pool: None,
        archive_b64: B64.encode(archive),
        vars: BTreeMap::from([("greeting".into(), "hi".into())]),
        var_files: vec![],
        env: BTreeMap::from([("TF_LOG".into(), "ERROR".into())]),
        secrets: Secrets(BTreeMap::from([("API_TOKEN".into(), SECRET.into())])),
        auto_approve: false,
        timeout_secs: 600,
    }
}

async fn wait_state(env: &Env, id: &str, state: &str) -> TaskView {
    for _ in 0..500 {
        let t = show(env, id).await;
        if t.state == state {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("task {id} never became {state}: {:?}", show(env, id).await);
}

async fn expect_assign(ws: &mut Ws) -> delegate_protocol::TaskSpec {
    match recv_msg(ws).await {
        Message::Assign(a) => a.task,
        other => panic!("expected assign, got {other:?}"),
    }
}

async fn log(ws: &mut Ws, task: Uuid, seq: u64, stream: LogStream, data: &[u8]) {
    send_binary(
        ws,
        BinaryFrame::Log(LogFrame {
            task_id: task,
            seq,
            stream,
            data: data.to_vec(),
        }),
    )
    .await;
}

async fn done(ws: &mut Ws, task: Uuid, seq: u64, outcome: Outcome, summary: Option<Summary>) {
    send(
        ws,
        &Message::Done(Done {
            task_id: task,
            seq,
            outcome,
            reason: (outcome != Outcome::Succeeded)
                .then(|| format!("agent says {}", outcome.as_str())),
            summary,
        }),
    )
    .await;
}

/// Run a plan task to success on `ws`; returns the plan file bytes.
async fn run_plan(ws: &mut Ws, spec: &delegate_protocol::TaskSpec, archive: &[u8]) -> Vec<u8> {
    let id = spec.task_id;
    send(ws, &Message::Accept(Accept { task_id: id })).await;
    assert_eq!(read_blob(ws, ChunkKind::Workspace).await, archive);
    send(
        ws,
        &Message::Event(Event {
            task_id: id,
            seq: 1,
            at_ms: 1_764_105_600_000,
            event: EventKind::StepStarted {
                step: "init".into(),
            },
        }),
    )
    .await;
    log(ws, id, 2, LogStream::Stdout, b"Initializing...\n").await;
    log(ws, id, 3, LogStream::Stderr, b"warning: x\n").await;
    wait_ack(ws, id, 3).await;
    let plan: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    let next = artifact(ws, id, 4, ChunkKind::Plan, &plan, &sha256_hex(&plan)).await;
    let json = br#"{"format_version":"1.2"}"#;
    let next = artifact(ws, id, next, ChunkKind::PlanJson, json, &sha256_hex(json)).await;
    done(
        ws,
        id,
        next,
        Outcome::Succeeded,
        Some(Summary {
            add: 2,
            ..Default::default()
        }),
    )
    .await;
    wait_ack(ws, id, next).await;
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_then_approve_then_apply() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let archive: Vec<u8> = b"pretend this is a tar.gz ".repeat(20_000);
    let t = submit(&env, &request("plan", "hello", &archive)).await;
    assert_eq!(t.state, "queued");
    assert!(t.outcome.is_none());
    assert_eq!(t.secrets, vec!["API_TOKEN".to_string()]);

    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.task_id.to_string(), t.id);
    assert_eq!(spec.op, Op::Plan);
    assert_eq!(spec.workspace, "hello");
    assert_eq!(spec.archive.size, archive.len() as u64);
    assert_eq!(spec.archive.sha256, sha256_hex(&archive));
    assert_eq!(spec.vars["greeting"], "hi");
    assert_eq!(
        spec.secrets.0["API_TOKEN"], SECRET,
        "secrets reach the agent over the link"
    );
    assert_eq!(spec.timeout_secs, 600);
    let id = spec.task_id;

    let plan = run_plan(&mut ws, &spec, &archive).await;

    let shown = show(&env, &t.id).await;
    assert_eq!(shown.state, "finished");
    assert_eq!(shown.outcome.as_deref(), Some("succeeded"));
    assert_eq!(shown.agent.as_deref(), Some("a1"));
    assert_eq!(shown.plan_sha256, Some(sha256_hex(&plan)));
    assert_eq!(shown.summary.as_ref().unwrap().add, 2);
    assert!(shown.started_at.is_some() && shown.finished_at.is_some());
    assert_eq!(shown.events.as_ref().unwrap().len(), 1);
    let show_json = serde_json::to_string(&shown).unwrap();
    assert!(!show_json.contains(SECRET));

    // Logs, in order, exactly.
    let raw = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{id}/logs?format=raw"))
        .await
        .unwrap();
    assert_eq!(raw, b"Initializing...\nwarning: x\n");
    let nd = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{id}/logs?after_seq=2"))
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = nd
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["stream"], "stderr");
    assert_eq!(lines[0]["seq"], 3);
    // Artifacts.
    let got = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{id}/artifacts/plan"))
        .await
        .unwrap();
    assert_eq!(got, plan);

    // Approve: an apply task carrying the plan's hash, with the same inputs.
    let out = delegate_controlplane::cli::approve(&env.api(), &t.id, true)
        .await
        .unwrap();
    let apply_id: String = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.task_id.to_string(), apply_id);
    assert_eq!(spec.op, Op::Apply);
    assert_eq!(spec.plan.as_ref().unwrap().sha256, sha256_hex(&plan));
    assert_eq!(
        spec.secrets.0["API_TOKEN"], SECRET,
        "the apply gets the plan's secrets"
    );
    assert_eq!(spec.vars["greeting"], "hi");
    send(
        &mut ws,
        &Message::Accept(Accept {
            task_id: spec.task_id,
        }),
    )
    .await;
    assert_eq!(read_blob(&mut ws, ChunkKind::Workspace).await, archive);
    assert_eq!(read_blob(&mut ws, ChunkKind::Plan).await, plan);
    done(
        &mut ws,
        spec.task_id,
        1,
        Outcome::Succeeded,
        Some(Summary {
            applied: true,
            ..Default::default()
        }),
    )
    .await;
    wait_ack(&mut ws, spec.task_id, 1).await;
    let applied = show(&env, &apply_id).await;
    assert_eq!(applied.op, "apply");
    assert_eq!(applied.outcome.as_deref(), Some("succeeded"));
    assert_eq!(applied.plan_sha256, Some(sha256_hex(&plan)));
    assert_eq!(applied.approved_from.as_deref(), Some(t.id.as_str()));

    // Approving twice, or approving an apply, is refused with a message.
    let err = env
        .api()
        .post_json::<_, TaskView>(
            &format!("/api/v1/tasks/{}/approve", t.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("already approved"), "{err}");
    let err = env
        .api()
        .post_json::<_, TaskView>(
            &format!("/api/v1/tasks/{apply_id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only a plan"), "{err}");

    let audit: Vec<String> = env
        .api()
        .get_json::<Vec<delegate_controlplane::api::AuditView>>(&format!(
            "/api/v1/audit?task={}",
            t.id
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    for a in [
        "task.submitted",
        "task.assigned",
        "task.accepted",
        "task.finished",
        "task.approved",
    ] {
        assert!(audit.iter().any(|x| x == a), "{a} missing from {audit:?}");
    }

    // Secrets never reach the database or the audit trail.
    env.running.unwrap().shutdown().await;
    for f in ["cp.db", "cp.db-wal"] {
        if let Ok(bytes) = std::fs::read(env.dd.root.join(f)) {
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "secret found in {f}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequencing_duplicates_gaps_and_bad_artifacts() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w", b"archive")).await;
    let spec = expect_assign(&mut ws).await;
    let id = spec.task_id;
    send(&mut ws, &Message::Accept(Accept { task_id: id })).await;
    read_blob(&mut ws, ChunkKind::Workspace).await;
    log(&mut ws, id, 1, LogStream::Stdout, b"one\n").await;
    log(&mut ws, id, 2, LogStream::Stdout, b"two\n").await;
    wait_ack(&mut ws, id, 2).await;
    // A resend is ignored but acknowledged again.
    log(&mut ws, id, 2, LogStream::Stdout, b"two\n").await;
    wait_ack(&mut ws, id, 2).await;
    // A gap is a protocol violation naming the task; nothing is stored.
    log(&mut ws, id, 4, LogStream::Stdout, b"four\n").await;
    match recv_msg(&mut ws).await {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::ProtocolViolation);
            assert_eq!(e.task_id, Some(id));
            assert!(
                e.message.contains("expected sequence number 3"),
                "{}",
                e.message
            );
        }
        other => panic!("expected error, got {other:?}"),
    }
    // Another agent's task, or no task: refused.
    log(&mut ws, Uuid::from_u128(77), 1, LogStream::Stdout, b"x").await;
    assert!(
        matches!(recv_msg(&mut ws).await, Message::Error(e) if e.code == ErrorCode::ProtocolViolation)
    );
    // An artifact whose hash does not match fails the task whatever done says.
    let next = artifact(
        &mut ws,
        id,
        3,
        ChunkKind::Plan,
        b"plan bytes",
        &"0".repeat(64),
    )
    .await;
    done(&mut ws, id, next, Outcome::Succeeded, None).await;
    wait_ack(&mut ws, id, next).await;
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.outcome.as_deref(), Some("failed"));
    assert!(
        shown.reason.as_deref().unwrap().contains("does not match"),
        "{:?}",
        shown.reason
    );
    let raw = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{id}/logs?format=raw"))
        .await
        .unwrap();
    assert_eq!(raw, b"one\ntwo\n");
    // Resending done after it was stored is acknowledged, not an error.
    done(&mut ws, id, next, Outcome::Succeeded, None).await;
    wait_ack(&mut ws, id, next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_respected_and_rejects_requeue() {
    let env = Env::new(5000).await;
    let (mut a1, _) = agent(&env, "a1", 1, vec![]).await;
    let t1 = submit(&env, &request("validate", "w1", b"x")).await;
    let t2 = submit(&env, &request("validate", "w2", b"y")).await;
    let s1 = expect_assign(&mut a1).await;
    assert_eq!(s1.task_id.to_string(), t1.id, "oldest first");
    send(
        &mut a1,
        &Message::Accept(Accept {
            task_id: s1.task_id,
        }),
    )
    .await;
    read_blob(&mut a1, ChunkKind::Workspace).await;
    // One slot: the second task waits.
    assert_eq!(wait_state(&env, &t1.id, "running").await.state, "running");
    assert_eq!(show(&env, &t2.id).await.state, "queued");
    done(&mut a1, s1.task_id, 1, Outcome::Succeeded, None).await;
    // The freed slot brings the next task at once.
    let s2 = loop {
        match recv_msg(&mut a1).await {
            Message::Ack(_) => continue,
            Message::Assign(a) => break a.task,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(s2.task_id.to_string(), t2.id);
    // Rejected: back to the queue, and to another agent rather than straight back.
    send(
        &mut a1,
        &Message::Reject(Reject {
            task_id: s2.task_id,
            reason: "disk full".into(),
        }),
    )
    .await;
    let (mut a2, _) = agent(&env, "a2", 1, vec![]).await;
    let again = expect_assign(&mut a2).await;
    assert_eq!(again.task_id, s2.task_id);
    let shown = show(&env, &t2.id).await;
    assert_eq!(shown.agent.as_deref(), Some("a2"));
    assert!(shown.last_reject.as_deref().unwrap().contains("disk full"));
    env.wait_audit(|r| r.action == "task.rejected" && r.detail == "disk full")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running() {
    let env = Env::new(5000).await;
    // Queued (no agent): cancelled at once.
    let t = submit(&env, &request("plan", "w", b"x")).await;
    let out = delegate_controlplane::cli::cancel(&env.api(), &t.id, false)
        .await
        .unwrap();
    assert!(out.contains("cancelled"), "{out}");
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.state, "finished");
    assert_eq!(shown.outcome.as_deref(), Some("cancelled"));
    // Again: refused.
    let err = delegate_controlplane::cli::cancel(&env.api(), &t.id, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already finished"), "{err}");

    // Running: the agent is told; the outcome comes with done.
    let (mut ws, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w", b"x")).await;
    let spec = expect_assign(&mut ws).await;
    send(
        &mut ws,
        &Message::Accept(Accept {
            task_id: spec.task_id,
        }),
    )
    .await;
    read_blob(&mut ws, ChunkKind::Workspace).await;
    wait_state(&env, &t.id, "running").await;
    let out = delegate_controlplane::cli::cancel(&env.api(), &t.id, false)
        .await
        .unwrap();
    assert!(out.contains("cancel requested"), "{out}");
    match recv_msg(&mut ws).await {
        Message::Cancel(c) => assert_eq!(c.task_id, spec.task_id),
        other => panic!("expected cancel, got {other:?}"),
    }
    assert_eq!(show(&env, &t.id).await.state, "running");
    done(&mut ws, spec.task_id, 1, Outcome::Cancelled, None).await;
    wait_ack(&mut ws, spec.task_id, 1).await;
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.outcome.as_deref(), Some("cancelled"));
    assert!(shown.cancel_requested);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_or_loses_tasks() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let t1 = submit(&env, &request("plan", "w1", b"x")).await;
    let s1 = expect_assign(&mut ws).await;
    let t2 = submit(&env, &request("plan", "w2", b"y")).await;
    let s2 = expect_assign(&mut ws).await;
    for s in [&s1, &s2] {
        send(&mut ws, &Message::Accept(Accept { task_id: s.task_id })).await;
        read_blob(&mut ws, ChunkKind::Workspace).await;
    }
    log(&mut ws, s1.task_id, 1, LogStream::Stdout, b"before\n").await;
    wait_ack(&mut ws, s1.task_id, 1).await;
    drop(ws);
    // Back, holding only the first task: it resumes after the stored seq; the second is lost.
    let (mut ws, welcome) = agent(
        &env,
        "a1",
        2,
        vec![HeldTask {
            task_id: s1.task_id,
            acked_seq: 1,
        }],
    )
    .await;
    assert_eq!(welcome.resume.len(), 1);
    assert!(welcome.resume[0].known);
    assert_eq!(welcome.resume[0].acked_seq, 1);
    let lost = show(&env, &t2.id).await;
    assert_eq!(lost.outcome.as_deref(), Some("lost"));
    assert!(
        lost.reason
            .as_deref()
            .unwrap()
            .contains("reconnected without"),
        "{:?}",
        lost.reason
    );
    log(&mut ws, s1.task_id, 2, LogStream::Stdout, b"after\n").await;
    done(&mut ws, s1.task_id, 3, Outcome::Succeeded, None).await;
    wait_ack(&mut ws, s1.task_id, 3).await;
    let raw = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{}/logs?format=raw", t1.id))
        .await
        .unwrap();
    assert_eq!(raw, b"before\nafter\n");
    // A finished task listed in Hello is not known any more.
    drop(ws);
    let (_ws, welcome) = agent(
        &env,
        "a1",
        2,
        vec![HeldTask {
            task_id: s1.task_id,
            acked_seq: 3,
        }],
    )
    .await;
    assert!(!welcome.resume[0].known);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_until_done() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w", b"x")).await;
    let spec = expect_assign(&mut ws).await;
    send(
        &mut ws,
        &Message::Accept(Accept {
            task_id: spec.task_id,
        }),
    )
    .await;
    read_blob(&mut ws, ChunkKind::Workspace).await;
    let api = env.api();
    let id = t.id.clone();
    let follower = tokio::spawn(async move {
        let mut out = Vec::new();
        delegate_controlplane::cli::logs(&api, &id, true, &mut out)
            .await
            .unwrap();
        out
    });
    for i in 1..=20u64 {
        log(
            &mut ws,
            spec.task_id,
            i,
            LogStream::Stdout,
            format!("line {i}\n").as_bytes(),
        )
        .await;
    }
    done(&mut ws, spec.task_id, 21, Outcome::Succeeded, None).await;
    let out = follower.await.unwrap();
    let want: String = (1..=20).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(out).unwrap(), want);
    // Server-sent events: one event per log, then the end with the outcome.
    let sse = env
        .api()
        .get_bytes(&format!(
            "/api/v1/tasks/{}/logs?format=sse&follow=1&after_seq=18",
            t.id
        ))
        .await
        .unwrap();
    let sse = String::from_utf8(sse).unwrap();
    assert!(sse.starts_with("id: 19\nevent: stdout\ndata: "), "{sse}");
    assert!(sse.contains("id: 20\n"), "{sse}");
    assert!(sse.contains(r#""outcome":"succeeded""#), "{sse}");
    assert!(sse.contains("event: end\n"), "{sse}");
}

/// A raw API call; returns the status and body text.
async fn raw_call(env: &Env, method: &str, path: &str, body: String) -> (u16, String) {
    let tls = delegate_controlplane::tls::api_client_config(&env.dd.ca_cert()).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let token = std::fs::read_to_string(env.dd.api_token()).unwrap();
    let addr = env.running.as_ref().unwrap().api_addr;
    let resp = http
        .request(
            method.parse().unwrap(),
            format!("https://127.0.0.1:{}{path}", addr.port()),
        )
        .bearer_auth(token.trim())
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn state_req(
    ws: &mut Ws,
    task: Uuid,
    request_id: u64,
    method: StateMethod,
    lock_id: Option<&str>,
    body: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    send(
        ws,
        &Message::StateRequest(StateRequest {
            task_id: task,
            request_id,
            method,
            lock_id: lock_id.map(str::to_string),
            body_b64: body.map(|b| B64.encode(b)),
        }),
    )
    .await;
    loop {
        match recv_msg(ws).await {
            Message::StateResponse(r) => {
                assert_eq!(r.request_id, request_id);
                return (
                    r.status,
                    r.body_b64
                        .map(|b| B64.decode(b).unwrap())
                        .unwrap_or_default(),
                );
            }
            Message::Ack(_) => continue,
            other => panic!("expected state_response, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_relay_versions_and_locks() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 3, vec![]).await;
    let mut specs = Vec::new();
    for ws_name in ["shared", "shared", "other"] {
        submit(&env, &request("plan", ws_name, b"x")).await;
        let s = expect_assign(&mut ws).await;
        send(&mut ws, &Message::Accept(Accept { task_id: s.task_id })).await;
        read_blob(&mut ws, ChunkKind::Workspace).await;
        specs.push(s);
    }
    let (a, b, c) = (specs[0].task_id, specs[1].task_id, specs[2].task_id);
    assert_eq!(
        state_req(&mut ws, a, 1, StateMethod::Get, None, None)
            .await
            .0,
        204
    );
    let lock_a = br#"{"ID":"lock-a","Operation":"OperationTypePlan","Who":"a"}"#;
    let lock_b = br#"{"ID":"lock-b","Operation":"OperationTypePlan","Who":"b"}"#;
    assert_eq!(
        state_req(&mut ws, a, 2, StateMethod::Lock, None, Some(lock_a))
            .await
            .0,
        200
    );
    // The second task of the workspace is refused with the holder's lock.
    let (status, holder) = state_req(&mut ws, b, 3, StateMethod::Lock, None, Some(lock_b)).await;
    assert_eq!(status, 423);
    assert_eq!(holder, lock_a);
    // Another workspace is independent.
    assert_eq!(
        state_req(&mut ws, c, 4, StateMethod::Lock, None, Some(lock_b))
            .await
            .0,
        200
    );
    let state1 = br#"{"version":4,"serial":1,"lineage":"L","resources":[]}"#;
    // The holder's own write needs no lock id (the agent's errored.tfstate recovery); it is
    // still the holder's write: c holds its workspace's lock.
    assert_eq!(
        state_req(&mut ws, c, 50, StateMethod::Post, None, Some(state1))
            .await
            .0,
        200
    );
    assert_eq!(
        state_req(&mut ws, c, 51, StateMethod::Get, None, None).await,
        (200, state1.to_vec())
    );
    assert_eq!(
        state_req(
            &mut ws,
            a,
            5,
            StateMethod::Post,
            Some("lock-a"),
            Some(state1)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        state_req(&mut ws, b, 6, StateMethod::Post, None, Some(state1))
            .await
            .0,
        423
    );
    assert_eq!(
        state_req(&mut ws, b, 7, StateMethod::Get, None, None).await,
        (200, state1.to_vec())
    );
    assert_eq!(
        state_req(&mut ws, b, 8, StateMethod::Unlock, None, Some(lock_b))
            .await
            .0,
        409
    );
    assert_eq!(
        state_req(&mut ws, a, 9, StateMethod::Unlock, None, Some(lock_a))
            .await
            .0,
        200
    );
    assert_eq!(
        state_req(&mut ws, b, 10, StateMethod::Lock, None, Some(lock_b))
            .await
            .0,
        200
    );
    // Not a task of this agent: refused.
    assert_eq!(
        state_req(
            &mut ws,
            Uuid::from_u128(5),
            11,
            StateMethod::Get,
            None,
            None
        )
        .await
        .0,
        403
    );

    // Versions through the API and the CLI.
    let versions: Vec<StateVersionView> = env
        .api()
        .get_json("/api/v1/workspaces/shared/state/versions")
        .await
        .unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].serial, Some(1));
    assert_eq!(versions[0].task_id, Some(a.to_string()));
    let listing = delegate_controlplane::cli::state(&env.api(), "shared", None, false)
        .await
        .unwrap();
    assert!(listing.starts_with("VERSION"), "{listing}");
    let v1 = delegate_controlplane::cli::state(&env.api(), "shared", Some(1), false)
        .await
        .unwrap();
    assert_eq!(v1.trim_end().as_bytes(), state1);
    // Admin push: refused while locked, unless forced.
    let state2 = br#"{"version":4,"serial":2,"lineage":"L","resources":[]}"#.to_vec();
    let err = env
        .api()
        .put_bytes::<serde_json::Value>("/api/v1/workspaces/shared/state", state2.clone())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(423));
    let r: serde_json::Value = env
        .api()
        .put_bytes("/api/v1/workspaces/shared/state?force=1", state2.clone())
        .await
        .unwrap();
    assert_eq!(r["version"], 2);
    assert_eq!(
        state_req(&mut ws, b, 12, StateMethod::Get, None, None).await,
        (200, state2)
    );
    let lock: Vec<u8> = env
        .api()
        .get_bytes("/api/v1/workspaces/shared/lock")
        .await
        .unwrap();
    assert_eq!(lock, lock_b);
    // An admin lock (held "as another tofu would") is refused while b holds it.
    let other = serde_json::json!({"ID": "admin-1", "Who": "ops"});
    let (status, _) = raw_call(
        &env,
        "POST",
        "/api/v1/workspaces/shared/lock",
        other.to_string(),
    )
    .await;
    assert_eq!(status, 423);
    let (status, _) = raw_call(
        &env,
        "POST",
        "/api/v1/workspaces/free/lock",
        other.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let lock = env
        .api()
        .get_bytes("/api/v1/workspaces/free/lock")
        .await
        .unwrap();
    assert_eq!(lock, other.to_string().as_bytes());
    let (status, body) = raw_call(
        &env,
        "DELETE",
        "/api/v1/workspaces/free/lock",
        String::new(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A task that ends still holding its lock (killed tofu) releases it.
    done(&mut ws, b, 1, Outcome::Cancelled, None).await;
    wait_ack(&mut ws, b, 1).await;
    let lock = env
        .api()
        .get_bytes("/api/v1/workspaces/shared/lock")
        .await
        .unwrap();
    assert!(
        lock.is_empty(),
        "lock still held: {}",
        String::from_utf8_lossy(&lock)
    );
    env.wait_audit(|r| r.action == "state.unlocked" && r.detail.contains("ended holding it"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_archive_is_refused_with_413() {
    let env = Env::with_config(CpConfig {
        max_archive_bytes: 1000,
        ..CpConfig::default()
    })
    .await;
    let err = env
        .api()
        .post_json::<_, TaskView>("/api/v1/tasks", &request("plan", "w", &vec![7u8; 5000]))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(413));
    assert!(err.to_string().contains("max_archive_bytes"), "{err}");
    // The CLI checks before uploading.
    let dir = env.dd.root.join("big");
    std::fs::create_dir(&dir).unwrap();
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("blob.bin"), noise).unwrap();
    let args = delegate_controlplane::cli::SubmitArgs {
        dir,
        op: "plan".into(),
        ..Default::default()
    };
    let err =
        delegate_controlplane::cli::submit(&env.api(), &args, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("max_archive_bytes"), "{err}");
    let err = env
        .api()
        .post_json::<_, TaskView>("/api/v1/tasks", &request("nuke", "w", b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_answered_without_their_values() {
    let env = Env::new(5000).await;
    let archive = B64.encode(b"tar");
    let cases = [
        (
            "POST",
            "/api/v1/tasks".to_string(),
            format!(
                r#"{{"op":"plan","workspace":"w","archive_b64":"{archive}","secrets":"TOKEN=abc-leak-me"}}"#
            ),
            "at secrets:",
        ),
        (
            "POST",
            "/api/v1/tasks".to_string(),
            format!(
                r#"{{"op":"plan","workspace":"w","archive_b64":"{archive}","vars":{{"v":["abc-leak-me"]}}}}"#
            ),
            "at vars.v:",
        ),
        (
            "PUT",
            "/api/v1/workspaces/w/secrets/TOKEN".to_string(),
            r#"{"value":["abc-leak-me"]}"#.to_string(),
            "value",
        ),
        (
            "POST",
            "/api/v1/tokens".to_string(),
            r#"{"pool":["abc-leak-me"]}"#.to_string(),
            "at pool:",
        ),
    ];
    for (method, path, body, names) in cases {
        let (status, text) = raw_call(&env, method, &path, body).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(!text.contains("abc-leak-me"), "{path}: {text}");
        assert!(text.contains(names), "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_year_9999_does_not_break_the_task_view() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w", b"x")).await;
    let spec = expect_assign(&mut ws).await;
    send(
        &mut ws,
        &Message::Accept(Accept {
            task_id: spec.task_id,
        }),
    )
    .await;
    read_blob(&mut ws, ChunkKind::Workspace).await;
    for (seq, at_ms) in [(1, 253_402_300_800_000u64), (2, u64::MAX)] {
        send(
            &mut ws,
            &Message::Event(Event {
                task_id: spec.task_id,
                seq,
                at_ms,
                event: EventKind::StepStarted {
                    step: "init".into(),
                },
            }),
        )
        .await;
        wait_ack(&mut ws, spec.task_id, seq).await;
    }
    // Twice: the view used to panic on every request.
    for _ in 0..2 {
        let shown = show(&env, &t.id).await;
        let events = shown.events.unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        for e in events {
            assert!(e.at.starts_with("20"), "receive time stored: {}", e.at);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_apply_keeps_its_state_lock_for_a_human_and_a_lost_plan_does_not() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let mut ids = Vec::new();
    for (op, ws_name) in [("destroy", "wedge"), ("plan", "loose")] {
        submit(&env, &request(op, ws_name, b"x")).await;
        let s = expect_assign(&mut ws).await;
        send(&mut ws, &Message::Accept(Accept { task_id: s.task_id })).await;
        read_blob(&mut ws, ChunkKind::Workspace).await;
        ids.push(s.task_id);
    }
    let (apply, plan) = (ids[0], ids[1]);
    let lock = |id: &str| format!(r#"{{"ID":"{id}","Operation":"OperationTypeApply","Who":"t"}}"#);
    let lock_w = lock("lock-w");
    let lock_l = lock("lock-l");
    assert_eq!(
        state_req(
            &mut ws,
            apply,
            1,
            StateMethod::Lock,
            None,
            Some(lock_w.as_bytes())
        )
        .await
        .0,
        200
    );
    assert_eq!(
        state_req(
            &mut ws,
            plan,
            2,
            StateMethod::Lock,
            None,
            Some(lock_l.as_bytes())
        )
        .await
        .0,
        200
    );
    done(&mut ws, apply, 1, Outcome::Lost, None).await;
    wait_ack(&mut ws, apply, 1).await;
    done(&mut ws, plan, 1, Outcome::Lost, None).await;
    wait_ack(&mut ws, plan, 1).await;
    let held = |ws: &'static str| {
        let api = env.api();
        async move {
            api.get_bytes(&format!("/api/v1/workspaces/{ws}/lock"))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        held("wedge").await,
        lock_w.as_bytes(),
        "the lost apply's lock stays"
    );
    assert!(
        held("loose").await.is_empty(),
        "the lost plan's lock is released"
    );
    let kept = env
        .wait_audit(|r| r.action == "state.lock_kept" && r.target == "workspace/wedge")
        .await;
    assert!(
        kept.detail.contains("force-unlock") && kept.detail.contains("lock-w"),
        "{}",
        kept.detail
    );
}
