//! Agent leases and egress audit, end to end against the in-process control plane with raw
//! clients playing the agents: an assignment of a silent agent moves to another agent; a
//! running apply of a silent agent ends `lost` asking a human (its lock kept); a running plan is
//! marked, waits, and resumes when its agent returns; egress events become audit records.
//!
//! The lease tests wait (with a bound) for the control plane's periodic lease check; they assert
//! what happened, never how long it took.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use delegate_controlplane::api::AuditView;
use delegate_controlplane::config::CpConfig;
use delegate_controlplane::task_ops::SubmitRequest;
use delegate_protocol::{
    Accept, ChunkKind, Done, Event, EventKind, HeldTask, Message, Outcome, Secrets, StateMethod,
    StateRequest, TaskSpec,
};
use std::collections::BTreeMap;
use std::time::Duration;

fn request(op: &str, workspace: &str) -> SubmitRequest {
    SubmitRequest {
        op: op.into(),
        workspace: workspace.into(),
        pool: None,
        archive_b64: B64.encode(b"archive"),
        vars: BTreeMap::new(),
        var_files: vec![],
        env: BTreeMap::new(),
        secrets: Secrets::default(),
        auto_approve: false,
        timeout_secs: 0,
    }
}

async fn expect_assign(ws: &mut Ws) -> TaskSpec {
    loop {
        match recv_alive(ws).await {
            Message::Assign(a) => return a.task,
            Message::Ack(_) => continue,
            other => panic!("expected assign, got {other:?}"),
        }
    }
}

async fn task_audit(env: &Env, id: &str) -> Vec<AuditView> {
    env.api()
        .get_json(&format!("/api/v1/audit?task={id}"))
        .await
        .unwrap()
}

/// Wait (bounded) until the task's audit trail has `action`.
async fn wait_audit_action(env: &Env, id: &str, action: &str) -> AuditView {
    for _ in 0..1000 {
        if let Some(r) = task_audit(env, id)
            .await
            .into_iter()
            .find(|r| r.action == action)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {action} for {id}: {:#?}", task_audit(env, id).await);
}

fn lease_config(lost_after_ms: u64) -> CpConfig {
    CpConfig {
        // Lease: three 100 ms heartbeat intervals.
        heartbeat_interval_ms: 100,
        lost_after_ms,
        ..CpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_of_a_silent_agent_moves_to_another_agent() {
    let env = Env::with_config(lease_config(60_000)).await;
    let (mut a1, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("validate", "w")).await;
    let spec = expect_assign(&mut a1).await;
    assert_eq!(spec.task_id.to_string(), t.id);
    drop(a1); // gone before accepting
    let (mut a2, _) = agent(&env, "a2", 1, vec![]).await;
    let spec = expect_assign(&mut a2).await;
    assert_eq!(spec.task_id.to_string(), t.id, "the same task, now on a2");
    let requeued = wait_audit_action(&env, &t.id, "task.requeued").await;
    assert!(requeued.detail.contains("agent a1 silent"), "{requeued:?}");
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.agent.as_deref(), Some("a2"));
    assert!(shown.last_reject.unwrap().contains("agent a1 silent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_apply_of_a_silent_agent_ends_lost_for_a_human_and_keeps_its_lock() {
    let env = Env::with_config(lease_config(1_000)).await;
    let (mut a1, _) = agent(&env, "a1", 1, vec![]).await;
    // A direct apply runs as a plan that applies itself: never re-run.
    let t = submit(&env, &request("apply", "prod")).await;
    let spec = expect_assign(&mut a1).await;
    send(
        &mut a1,
        &Message::Accept(Accept {
            task_id: spec.task_id,
        }),
    )
    .await;
    read_blob(&mut a1, ChunkKind::Workspace).await;
    send(
        &mut a1,
        &Message::StateRequest(StateRequest {
            task_id: spec.task_id,
            request_id: 1,
            method: StateMethod::Lock,
            lock_id: None,
            body_b64: Some(B64.encode(br#"{"ID":"lock-1","Operation":"OperationTypeApply"}"#)),
        }),
    )
    .await;
    match recv_alive(&mut a1).await {
        Message::StateResponse(r) => assert_eq!(r.status, 200),
        other => panic!("{other:?}"),
    }
    drop(a1);
    wait_audit_action(&env, &t.id, "task.lease_expired").await;
    let finished = wait_audit_action(&env, &t.id, "task.finished").await;
    assert!(finished.detail.starts_with("lost: "), "{finished:?}");
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.outcome.as_deref(), Some("lost"));
    let reason = shown.reason.unwrap();
    assert!(
        reason.contains("never re-run") && reason.contains("a human must check"),
        "{reason}"
    );
    // The lock stays for the human; the task was not handed to anyone else.
    let lock = env
        .api()
        .get_bytes("/api/v1/workspaces/prod/lock")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&lock).contains("lock-1"));
    // ... and the kept lock is audited, naming the lost task.
    let kept = env
        .wait_audit(|r| r.action == "state.lock_kept" && r.target == "workspace/prod")
        .await;
    assert!(
        kept.detail.contains("lock-1") && kept.detail.contains(&t.id),
        "{kept:?}"
    );
    let (mut a2, _) = agent(&env, "a2", 1, vec![]).await;
    let next = submit(&env, &request("validate", "other")).await;
    let spec = expect_assign(&mut a2).await;
    assert_eq!(
        spec.task_id.to_string(),
        next.id,
        "a2 gets new work, never the lost apply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_plan_waits_for_its_agent_and_resumes() {
    let env = Env::with_config(lease_config(600_000)).await;
    let (mut a1, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w")).await;
    let spec = expect_assign(&mut a1).await;
    let id = spec.task_id;
    send(&mut a1, &Message::Accept(Accept { task_id: id })).await;
    read_blob(&mut a1, ChunkKind::Workspace).await;
    send(
        &mut a1,
        &Message::Event(Event {
            task_id: id,
            seq: 1,
            at_ms: 1,
            event: EventKind::StepStarted {
                step: "plan".into(),
            },
        }),
    )
    .await;
    wait_ack(&mut a1, id, 1).await;
    drop(a1);
    let expired = wait_audit_action(&env, &t.id, "task.lease_expired").await;
    assert!(expired.detail.contains("waiting for it"), "{expired:?}");
    let shown = show(&env, &t.id).await;
    assert_eq!(shown.state, "running");
    assert!(shown.lease_expired_at.is_some());
    assert!(delegate_controlplane::cli::show_text(&shown).contains("lease expired:"));

    let (mut a1, welcome) = agent(
        &env,
        "a1",
        1,
        vec![HeldTask {
            task_id: id,
            acked_seq: 1,
        }],
    )
    .await;
    assert!(welcome.resume[0].known);
    assert_eq!(welcome.resume[0].acked_seq, 1);
    wait_audit_action(&env, &t.id, "task.lease_renewed").await;
    assert!(show(&env, &t.id).await.lease_expired_at.is_none());
    send(
        &mut a1,
        &Message::Done(Done {
            task_id: id,
            seq: 2,
            outcome: Outcome::Succeeded,
            reason: None,
            summary: None,
        }),
    )
    .await;
    wait_ack(&mut a1, id, 2).await;
    assert_eq!(
        show(&env, &t.id).await.outcome.as_deref(),
        Some("succeeded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_events_become_audit_records_once() {
    let env = Env::new(5000).await;
    let (mut a1, _) = agent(&env, "a1", 1, vec![]).await;
    let t = submit(&env, &request("plan", "w")).await;
    let spec = expect_assign(&mut a1).await;
    let id = spec.task_id;
    send(&mut a1, &Message::Accept(Accept { task_id: id })).await;
    read_blob(&mut a1, ChunkKind::Workspace).await;
    let allowed = Event {
        task_id: id,
        seq: 1,
        at_ms: 1,
        event: EventKind::Egress {
            destination: "registry.opentofu.org:443".into(),
            address: Some("192.0.2.7:443".into()),
            allowed: true,
            detail: "rule registry.opentofu.org:443".into(),
            bytes_up: 517,
            bytes_down: 40_960,
            duration_ms: 123,
        },
    };
    let denied = Event {
        task_id: id,
        seq: 2,
        at_ms: 2,
        event: EventKind::Egress {
            destination: "169.254.169.254:80".into(),
            address: None,
            allowed: false,
            detail: "link-local address (cloud metadata) refused".into(),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        },
    };
    send(&mut a1, &Message::Event(allowed)).await;
    send(&mut a1, &Message::Event(denied.clone())).await;
    wait_ack(&mut a1, id, 2).await;
    // A resend after a reconnect is acknowledged, not audited twice.
    send(&mut a1, &Message::Event(denied)).await;
    wait_ack(&mut a1, id, 2).await;
    send(
        &mut a1,
        &Message::Done(Done {
            task_id: id,
            seq: 3,
            outcome: Outcome::Failed,
            reason: Some("provider download failed".into()),
            summary: None,
        }),
    )
    .await;
    wait_ack(&mut a1, id, 3).await;

    let out = delegate_controlplane::cli::audit(&env.api(), Some(&t.id), true)
        .await
        .unwrap();
    let records: Vec<AuditView> = serde_json::from_str(&out).unwrap();
    let egress: Vec<&AuditView> = records
        .iter()
        .filter(|r| r.action.starts_with("egress."))
        .collect();
    assert_eq!(egress.len(), 2, "{records:#?}");
    assert_eq!(egress[0].action, "egress.allowed");
    assert_eq!(egress[0].who, "a1");
    assert_eq!(egress[0].target, t.id);
    for part in [
        "destination registry.opentofu.org:443",
        "address 192.0.2.7:443",
        "allowed: rule registry.opentofu.org:443;",
        "517 bytes up",
        "40960 bytes down",
        "123 ms",
    ] {
        assert!(
            egress[0].detail.contains(part),
            "{part}: {}",
            egress[0].detail
        );
    }
    assert_eq!(egress[1].action, "egress.denied");
    assert!(
        egress[1].detail.contains("destination 169.254.169.254:80")
            && egress[1].detail.contains("denied: link-local address"),
        "{}",
        egress[1].detail
    );
    // The table form shows them too, and they stay events of the task.
    let table = delegate_controlplane::cli::audit(&env.api(), Some(&t.id), false)
        .await
        .unwrap();
    assert!(table.contains("egress.allowed") && table.contains("egress.denied"));
    let events = show(&env, &t.id).await.events.unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| e.event.get("kind").and_then(|k| k.as_str()))
        .collect();
    assert_eq!(kinds, vec!["egress", "egress"]);
    // The chain still verifies with records written inside the event's transaction.
    let v: delegate_controlplane::api::AuditVerifyView =
        env.api().get_json("/api/v1/audit/verify").await.unwrap();
    assert_eq!(v.first_bad, None);
}
