//! At rest and secrets, end to end against the in-process control plane with a raw client
//! playing the agent: nothing in the clear under DIR after a run, key rotation and re-sealing
//! (online, offline, across restarts), damaged sealed data answered with a clear error naming
//! it, workspace secrets (sealed, merged, surviving restarts, never shown) and the minimum
//! secret length.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use delegate_controlplane::api_admin::{KeysView, SecretView};
use delegate_controlplane::api_tasks::TaskView;
use delegate_controlplane::cli_admin;
use delegate_controlplane::keys::{ResealReport, RotateReport};
use delegate_controlplane::task_ops::SubmitRequest;
use delegate_protocol::{
    Accept, BinaryFrame, ChunkKind, Done, LogFrame, LogStream, Message, Outcome, Secrets,
    StateMethod, StateRequest, Summary, TaskSpec,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use uuid::Uuid;

const TASK_SECRET: &str = "task-secret-9f8e7d6c5b4a";
const WS_SECRET: &str = "workspace-secret-1a2b3c4d5e";
const STATE_VALUE: &str = "state-value-77aa55cc33ee";

fn request(op: &str, workspace: &str, secrets: &[(&str, &str)]) -> SubmitRequest {
    SubmitRequest {
        op: op.into(),
        workspace: workspace.into(),
        pool: None,
        // Not a real archive (the control plane does not open it): it carries the state value so
        // the byte search also covers the stored archive.
        archive_b64: B64.encode(format!("archive with {STATE_VALUE} inside")),
        vars: BTreeMap::new(),
        var_files: vec![],
        env: BTreeMap::new(),
        secrets: Secrets(
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        auto_approve: false,
        timeout_secs: 0,
    }
}

async fn expect_assign(ws: &mut Ws) -> TaskSpec {
    loop {
        match recv_msg(ws).await {
            Message::Assign(a) => return a.task,
            Message::Ack(_) => continue,
            other => panic!("expected assign, got {other:?}"),
        }
    }
}

async fn state_post(ws: &mut Ws, task: Uuid, request_id: u64, body: &[u8]) -> u16 {
    send(
        ws,
        &Message::StateRequest(StateRequest {
            task_id: task,
            request_id,
            method: StateMethod::Post,
            lock_id: None,
            body_b64: Some(B64.encode(body)),
        }),
    )
    .await;
    loop {
        match recv_msg(ws).await {
            Message::StateResponse(r) => return r.status,
            Message::Ack(_) => continue,
            other => panic!("expected state_response, got {other:?}"),
        }
    }
}

fn state_json(serial: u64) -> Vec<u8> {
    format!(
        r#"{{"version":4,"serial":{serial},"lineage":"l-1","outputs":{{"ip":{{"value":"{STATE_VALUE}","type":"string"}}}}}}"#
    )
    .into_bytes()
}

fn plan_bytes() -> Vec<u8> {
    let mut p = b"PK\x03\x04 plan file ".to_vec();
    for i in 0..300u32 {
        p.extend_from_slice(format!("resource {i} = {STATE_VALUE}\n").as_bytes());
    }
    p
}

/// Accept `spec` and run it as a plan that writes state, logs the values (as an unredacted tofu
/// would), uploads a plan and plan JSON holding the state value and succeeds with outputs.
async fn run_plan(ws: &mut Ws, spec: &TaskSpec) {
    let id = spec.task_id;
    send(ws, &Message::Accept(Accept { task_id: id })).await;
    read_blob(ws, ChunkKind::Workspace).await;
    assert_eq!(state_post(ws, id, 1, &state_json(1)).await, 200);
    let line = format!("ip = \"{STATE_VALUE}\"\ntoken {TASK_SECRET} and {WS_SECRET}\n");
    send_binary(
        ws,
        BinaryFrame::Log(LogFrame {
            task_id: id,
            seq: 1,
            stream: LogStream::Stdout,
            data: line.into_bytes(),
        }),
    )
    .await;
    send_binary(
        ws,
        BinaryFrame::Log(LogFrame {
            task_id: id,
            seq: 2,
            stream: LogStream::Stderr,
            data: b"second line\n".to_vec(),
        }),
    )
    .await;
    wait_ack(ws, id, 2).await;
    let next = artifact(
        ws,
        id,
        3,
        ChunkKind::Plan,
        &plan_bytes(),
        &sha256_hex(&plan_bytes()),
    )
    .await;
    let json = format!(r#"{{"planned_values":{{"ip":"{STATE_VALUE}"}}}}"#);
    let next = artifact(
        ws,
        id,
        next,
        ChunkKind::PlanJson,
        json.as_bytes(),
        &sha256_hex(json.as_bytes()),
    )
    .await;
    send(
        ws,
        &Message::Done(Done {
            task_id: id,
            seq: next,
            outcome: Outcome::Succeeded,
            reason: None,
            summary: Some(Summary {
                add: 1,
                outputs: Some(serde_json::json!({ "ip": STATE_VALUE })),
                ..Default::default()
            }),
        }),
    )
    .await;
    wait_ack(ws, id, next).await;
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The key id in a sealed stream's header (magic, version, id length, id).
fn sealed_key_id(bytes: &[u8]) -> String {
    assert_eq!(&bytes[..4], b"DLGS", "not a sealed stream");
    let n = bytes[5] as usize;
    String::from_utf8(bytes[6..6 + n].to_vec()).unwrap()
}

fn blob_key_ids(dd: &delegate_controlplane::config::DataDir) -> Vec<String> {
    files(&dd.blobs())
        .iter()
        .map(|p| sealed_key_id(&std::fs::read(p).unwrap()))
        .collect()
}

/// Every sealed value in the database: (what, key id).
fn db_key_ids(dd: &delegate_controlplane::config::DataDir) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open(dd.db()).unwrap();
    let mut out = Vec::new();
    for (table, col) in [
        ("task_logs", "data"),
        ("artifact_parts", "data"),
        ("tasks", "summary"),
        ("workspace_secrets", "value"),
    ] {
        let rows: Vec<Vec<u8>> = c
            .prepare(&format!(
                "SELECT {col} FROM {table} WHERE {col} IS NOT NULL"
            ))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for v in rows {
            out.push((format!("{table}.{col}"), sealed_key_id(&v)));
        }
    }
    out
}

async fn restart(env: &mut Env) {
    env.running.take().unwrap().shutdown().await;
    env.running = Some(delegate_controlplane::serve::start(&env.dd).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_the_clear_under_the_data_directory() {
    let env = Env::new(5000).await;
    let out = cli_admin::secrets_set(&env.api(), "prod", "WS_TOKEN", WS_SECRET)
        .await
        .unwrap();
    assert!(!out.contains(WS_SECRET), "{out}");
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let t = submit(
        &env,
        &request("plan", "prod", &[("API_TOKEN", TASK_SECRET)]),
    )
    .await;
    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.secrets.0["API_TOKEN"], TASK_SECRET);
    assert_eq!(
        spec.secrets.0["WS_TOKEN"], WS_SECRET,
        "workspace secrets are merged into the task"
    );
    run_plan(&mut ws, &spec).await;

    // Everything reads back through the API.
    let api = env.api();
    let logs = api
        .get_bytes(&format!("/api/v1/tasks/{}/logs?format=raw", t.id))
        .await
        .unwrap();
    assert!(contains(&logs, STATE_VALUE));
    assert_eq!(
        api.get_bytes(&format!("/api/v1/tasks/{}/artifacts/plan", t.id))
            .await
            .unwrap(),
        plan_bytes()
    );
    assert_eq!(
        api.get_bytes("/api/v1/workspaces/prod/state/versions/1")
            .await
            .unwrap(),
        state_json(1)
    );
    let shown = show(&env, &t.id).await;
    assert_eq!(
        shown.summary.unwrap().outputs.unwrap()["ip"],
        STATE_VALUE,
        "the sealed summary opens"
    );
    // Names only, anywhere the API shows secrets; values never.
    let list = cli_admin::secrets_list(&api, "prod", true).await.unwrap();
    let parsed: Vec<SecretView> = serde_json::from_str(&list).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].name, "WS_TOKEN");
    let audit = serde_json::to_string(&env.audit().await).unwrap();
    let tasks = api.get_bytes("/api/v1/tasks").await.unwrap();
    for text in [list.as_bytes(), audit.as_bytes(), &tasks] {
        assert!(!contains(text, WS_SECRET) && !contains(text, TASK_SECRET));
    }
    assert!(audit.contains("secret.set"));

    // Stopped (so the WAL, if any, is what is left on disk): no file under DIR holds a secret
    // or the state value in the clear: not the database, its WAL, the blobs, or anything else.
    env.running.unwrap().shutdown().await;
    let all = files(&env.dd.root);
    assert!(all.iter().any(|p| p.ends_with("cp.db")));
    assert!(all.iter().filter(|p| p.starts_with(env.dd.blobs())).count() >= 4);
    for p in &all {
        let bytes = std::fs::read(p).unwrap();
        for needle in [TASK_SECRET, WS_SECRET, STATE_VALUE] {
            assert!(
                !contains(&bytes, needle),
                "{needle} in the clear in {}",
                p.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_keeps_old_data_readable_and_reseal_moves_it_online_and_offline() {
    let mut env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let t1 = submit(&env, &request("plan", "w", &[])).await;
    let spec = expect_assign(&mut ws).await;
    run_plan(&mut ws, &spec).await;
    let first: KeysView = env.api().get_json("/api/v1/keys").await.unwrap();
    assert!(blob_key_ids(&env.dd).iter().all(|k| *k == first.current));

    // Online rotation (the running control plane does it).
    let out = cli_admin::keys_rotate(&env.dd, None, true).await.unwrap();
    let rotated: RotateReport = serde_json::from_str(&out).unwrap();
    assert_eq!(rotated.previous, first.current);
    let now: KeysView = env.api().get_json("/api/v1/keys").await.unwrap();
    assert_eq!(now.current, rotated.key_id);
    assert_eq!(now.ids.len(), 2);
    // Old data still reads.
    let api = env.api();
    let logs = api
        .get_bytes(&format!("/api/v1/tasks/{}/logs?format=raw", t1.id))
        .await
        .unwrap();
    assert!(contains(&logs, "second line"));
    assert_eq!(
        api.get_bytes("/api/v1/workspaces/w/state/versions/1")
            .await
            .unwrap(),
        state_json(1)
    );
    // New data is sealed under the new key.
    let before: Vec<PathBuf> = files(&env.dd.blobs());
    let _: serde_json::Value = api
        .put_bytes("/api/v1/workspaces/w/state", state_json(2))
        .await
        .unwrap();
    let new_files: Vec<PathBuf> = files(&env.dd.blobs())
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new_files.len(), 1);
    assert_eq!(
        sealed_key_id(&std::fs::read(&new_files[0]).unwrap()),
        rotated.key_id
    );
    let t2 = submit(&env, &request("plan", "w2", &[])).await;
    let spec = expect_assign(&mut ws).await;
    run_plan(&mut ws, &spec).await;
    let t2_key = {
        let c = rusqlite::Connection::open(env.dd.db()).unwrap();
        let v: Vec<u8> = c
            .query_row(
                "SELECT data FROM task_logs WHERE task_id = ?1 AND seq = 1",
                [&t2.id],
                |r| r.get(0),
            )
            .unwrap();
        sealed_key_id(&v)
    };
    assert_eq!(t2_key, rotated.key_id);
    assert!(db_key_ids(&env.dd)
        .iter()
        .any(|(_, k)| *k == rotated.previous));

    // Online reseal: everything under the new key, still readable.
    let out = cli_admin::keys_reseal(&env.dd, None, true).await.unwrap();
    let report: ResealReport = serde_json::from_str(&out).unwrap();
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(
        report.blobs_resealed >= 4 && report.values_resealed >= 3,
        "{report:?}"
    );
    assert!(blob_key_ids(&env.dd).iter().all(|k| *k == rotated.key_id));
    assert!(db_key_ids(&env.dd)
        .iter()
        .all(|(_, k)| *k == rotated.key_id));
    assert!(contains(
        &api.get_bytes(&format!("/api/v1/tasks/{}/logs?format=raw", t1.id))
            .await
            .unwrap(),
        STATE_VALUE
    ));
    let actions: Vec<String> = env.audit().await.into_iter().map(|r| r.action).collect();
    assert!(actions.contains(&"keys.rotated".to_string()));
    assert!(actions.contains(&"keys.resealed".to_string()));

    // Offline: with the control plane stopped, the CLI works on the directory itself.
    drop(ws);
    env.running.take().unwrap().shutdown().await;
    let out = cli_admin::keys_rotate(&env.dd, None, true).await.unwrap();
    let offline: RotateReport = serde_json::from_str(&out).unwrap();
    assert_eq!(offline.previous, rotated.key_id);
    let out = cli_admin::keys_reseal(&env.dd, None, false).await.unwrap();
    assert!(out.contains(&offline.key_id), "{out}");
    assert!(blob_key_ids(&env.dd).iter().all(|k| *k == offline.key_id));

    // A restarted control plane uses the current key and reads everything.
    env.running = Some(delegate_controlplane::serve::start(&env.dd).await.unwrap());
    let keys: KeysView = env.api().get_json("/api/v1/keys").await.unwrap();
    assert_eq!(keys.current, offline.key_id);
    assert_eq!(keys.ids.len(), 3);
    assert_eq!(
        env.api()
            .get_bytes("/api/v1/workspaces/w/state/versions/2")
            .await
            .unwrap(),
        state_json(2)
    );
    assert_eq!(
        show(&env, &t2.id).await.summary.unwrap().outputs.unwrap()["ip"],
        STATE_VALUE
    );
    restart(&mut env).await;
    let audit: Vec<String> = env
        .audit()
        .await
        .into_iter()
        .filter(|r| r.action.starts_with("keys."))
        .map(|r| format!("{} {}", r.who, r.action))
        .collect();
    assert_eq!(
        audit,
        vec![
            "api keys.rotated",
            "api keys.resealed",
            "cli keys.rotated",
            "cli keys.resealed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_sealed_data_is_a_clear_error_naming_it() {
    let env = Env::new(5000).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let t = submit(&env, &request("plan", "w", &[])).await;
    let spec = expect_assign(&mut ws).await;
    run_plan(&mut ws, &spec).await;
    let c = rusqlite::Connection::open(env.dd.db()).unwrap();
    let blob_of = |sql: &str| -> PathBuf {
        let id: String = c.query_row(sql, [], |r| r.get(0)).unwrap();
        env.dd.blobs().join(id)
    };

    // A flipped bit in a state version.
    let state = blob_of("SELECT blob FROM state_versions WHERE version = 1");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let err = env
        .api()
        .get_bytes("/api/v1/workspaces/w/state/versions/1")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    let msg = err.to_string();
    assert!(
        msg.contains("state version 1 of workspace w") && msg.contains("integrity check failed"),
        "{msg}"
    );
    let msg = env
        .api()
        .get_bytes("/api/v1/workspaces/w/state")
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("state version 1 of workspace w"), "{msg}");

    // A truncated plan.
    let plan = blob_of("SELECT blob FROM artifacts WHERE kind = 'plan'");
    let bytes = std::fs::read(&plan).unwrap();
    std::fs::write(&plan, &bytes[..bytes.len() - 10]).unwrap();
    let err = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{}/artifacts/plan", t.id))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("plan artifact of task {}", t.id)) && msg.contains("integrity"),
        "{msg}"
    );

    // A cut log row and a damaged summary in the database.
    c.execute(
        "UPDATE task_logs SET data = substr(data, 1, length(data) - 1) WHERE seq = 2",
        [],
    )
    .unwrap();
    let err = env
        .api()
        .get_bytes(&format!("/api/v1/tasks/{}/logs?format=raw", t.id))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(
        err.to_string()
            .contains(&format!("log of task {} seq 2: integrity", t.id)),
        "{err}"
    );
    c.execute(
        "UPDATE tasks SET summary = X'444C475301' WHERE id = ?1",
        [&t.id],
    )
    .unwrap();
    let err = env
        .api()
        .get_json::<TaskView>(&format!("/api/v1/tasks/{}", t.id))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(
        err.to_string()
            .contains(&format!("summary of task {}: integrity", t.id)),
        "{err}"
    );

    // The agent asking about the damaged task gets a 500, and the control plane carries on.
    send(
        &mut ws,
        &Message::StateRequest(StateRequest {
            task_id: Uuid::parse_str(&t.id).unwrap(),
            request_id: 9,
            method: StateMethod::Get,
            lock_id: None,
            body_b64: None,
        }),
    )
    .await;
    // (Its task row itself no longer opens: a storage error, not a crash.)
    match recv_msg(&mut ws).await {
        Message::StateResponse(r) => assert_eq!(r.status, 500),
        other => panic!("{other:?}"),
    }
    let status: delegate_controlplane::api::StatusView =
        env.api().get_json("/api/v1/status").await.unwrap();
    assert_eq!(status.agents_connected, 1);

    // Reseal reports the damaged items by name and leaves them alone.
    cli_admin::keys_rotate(&env.dd, None, true).await.unwrap();
    let err = cli_admin::keys_reseal(&env.dd, None, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("state version 1 of workspace w"), "{err}");
    assert!(
        err.contains(&format!("plan artifact of task {}", t.id)),
        "{err}"
    );
    assert!(err.contains("could not be re-sealed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_secrets_survive_a_restart_and_short_secrets_are_refused() {
    let mut env = Env::new(5000).await;
    let api = env.api();
    // Too short, at submit and when stored: named, value not echoed.
    let err = api
        .post_json::<_, TaskView>(
            "/api/v1/tasks",
            &request("plan", "w", &[("TINY_ONE", "x9z")]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    let msg = err.to_string();
    assert!(
        msg.contains("TINY_ONE") && msg.contains("shorter than 4"),
        "{msg}"
    );
    assert!(!msg.contains("x9z"), "{msg}");
    let err = cli_admin::secrets_set(&api, "w", "TINY_TWO", "q7w")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TINY_TWO") && !err.contains("q7w"), "{err}");
    // A malformed body is refused without quoting it.
    let err = api
        .put_bytes::<serde_json::Value>(
            "/api/v1/workspaces/w/secrets/X",
            br#"{"value": 123456789, "other": "leak-me"}"#.to_vec(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        !err.contains("leak-me") && !err.contains("123456789"),
        "{err}"
    );
    for body in [
        &br#"{"value": "leak-me-2", "leak-me-3": 1}"#[..],
        br#"{"value": "leak-me-2\q"}"#,
        br#"{"value": "leak-me-2"} leak-me-3"#,
        br#"{"value": "leak-me-2"#,
    ] {
        let err = api
            .put_bytes::<serde_json::Value>("/api/v1/workspaces/w/secrets/X", body.to_vec())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid secret body") && !err.contains("leak-me"),
            "{err}"
        );
    }

    cli_admin::secrets_set(&api, "w", "WS_TOKEN", WS_SECRET)
        .await
        .unwrap();
    cli_admin::secrets_set(&api, "w", "SHADOWED", "workspace-value")
        .await
        .unwrap();
    cli_admin::secrets_set(&api, "w", "GONE_SOON", "remove-me-1")
        .await
        .unwrap();
    let out = cli_admin::secrets_rm(&api, "w", "GONE_SOON").await.unwrap();
    assert!(out.contains("removed"));
    let err = cli_admin::secrets_rm(&api, "w", "GONE_SOON")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no secret GONE_SOON"), "{err}");
    let table = cli_admin::secrets_list(&api, "w", false).await.unwrap();
    assert!(
        table.contains("SHADOWED") && table.contains("WS_TOKEN"),
        "{table}"
    );
    assert!(!table.contains("GONE_SOON") && !table.contains(WS_SECRET));

    // A plan with only workspace secrets, plus one shadowing a stored one.
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let mut req = request("plan", "w", &[]);
    req.env.insert("SHADOWED".into(), "plain-env".into());
    let plan = submit(&env, &req).await;
    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.secrets.0.len(), 1, "{:?}", spec.secrets);
    assert_eq!(spec.secrets.0["WS_TOKEN"], WS_SECRET);
    assert_eq!(spec.env["SHADOWED"], "plain-env");
    run_plan(&mut ws, &spec).await;
    // A plan with a task-level secret (memory only).
    let memory = submit(&env, &request("plan", "w", &[("SHADOWED", TASK_SECRET)])).await;
    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.secrets.0["SHADOWED"], TASK_SECRET, "task-level wins");
    assert_eq!(spec.secrets.0["WS_TOKEN"], WS_SECRET);
    run_plan(&mut ws, &spec).await;
    drop(ws);

    // After a restart, the workspace-secret plan can be approved; the memory-only one cannot.
    restart(&mut env).await;
    let (mut ws, _) = agent(&env, "a1", 2, vec![]).await;
    let out = delegate_controlplane::cli::approve(&env.api(), &plan.id, true)
        .await
        .unwrap();
    let apply_id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = expect_assign(&mut ws).await;
    assert_eq!(spec.task_id.to_string(), apply_id);
    assert_eq!(spec.secrets.0["WS_TOKEN"], WS_SECRET);
    let err = delegate_controlplane::cli::approve(&env.api(), &memory.id, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("held in memory only"), "{err}");
    let audit = serde_json::to_string(&env.audit().await).unwrap();
    assert!(audit.contains("secret.removed"));
    for s in [WS_SECRET, TASK_SECRET, "workspace-value", "remove-me-1"] {
        assert!(!audit.contains(s), "{s} in the audit trail");
    }
}
