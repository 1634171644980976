//! User API routes for tasks and workspace state, and their JSON shapes.
//!
//! Owns: `/api/v1/tasks...` and `/api/v1/workspaces/...`. Never returns secret values (a task
//! shows its secret names only) and never logs request bodies.

use crate::api::{ApiError, ApiResult};
use crate::cp::ControlPlane;
use crate::store_tasks::{TaskRow, TaskState};
use crate::task_ops::{OpError, SubmitRequest};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use delegate_protocol::{Outcome, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        ApiError::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            e.message,
        )
    }
}

/// `GET /api/v1/tasks/{id}` (and each item of `GET /api/v1/tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub op: String,
    pub workspace: String,
    pub pool: String,
    /// `queued`, `assigned`, `running`, `finished`.
    pub state: String,
    /// Present once finished: `succeeded`, `failed`, `cancelled`, `timed_out`, `lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub summary: Option<Summary>,
    pub agent: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// For a plan: the stored plan file's hash; for an apply: the approved plan's.
    pub plan_sha256: Option<String>,
    pub auto_approve: bool,
    pub vars: BTreeMap<String, String>,
    pub var_files: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Names only; values are never shown.
    pub secrets: Vec<String>,
    pub timeout_secs: u64,
    pub archive_sha256: String,
    pub archive_size: u64,
    /// For an apply made by `approve`: the plan task.
    pub approved_from: Option<String>,
    /// For an approved plan: the apply task made from it.
    pub approved_as: Option<String>,
    pub cancel_requested: bool,
    /// Why the last agent that was offered this task rejected it.
    pub last_reject: Option<String>,
    /// Set while the task's agent is silent past its lease (the control plane waits for it up
    /// to `lost_after_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expired_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventView>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<ArtifactView>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub at: String,
    /// The event as the agent sent it (`kind`, `step`, `exit_code`, ...).
    pub event: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub kind: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: String,
}

/// `GET /api/v1/workspaces/{ws}/state/versions` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateVersionView {
    pub workspace: String,
    pub version: u64,
    pub serial: Option<i64>,
    pub lineage: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub task_id: Option<String>,
    pub created_at: String,
}

/// `GET /api/v1/tasks/{id}/logs` ndjson line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: u64,
    pub stream: String,
    pub at: String,
    /// The bytes as text (invalid UTF-8 replaced); `format=raw` gives the exact bytes.
    pub data: String,
}

pub fn task_view(cp: &ControlPlane, t: &TaskRow, detail: bool) -> Result<TaskView, ApiError> {
    let artifacts = cp.store.artifacts(t.id)?;
    let plan_sha256 = match &t.plan {
        Some(p) => Some(p.sha256.clone()),
        None => artifacts
            .iter()
            .find(|a| a.kind == "plan")
            .map(|a| a.sha256.clone()),
    };
    let events = if detail {
        Some(
            cp.store
                .events(t.id)?
                .into_iter()
                .map(|e| EventView {
                    seq: e.seq,
                    at: crate::rfc3339(e.at_ms),
                    event: serde_json::from_str(&e.event).unwrap_or(serde_json::Value::Null),
                })
                .collect(),
        )
    } else {
        None
    };
    Ok(TaskView {
        id: t.id.to_string(),
        op: t.op.to_string(),
        workspace: t.workspace.clone(),
        pool: t.pool.clone(),
        state: t.state.as_str().into(),
        outcome: t.outcome.map(|o| o.as_str().to_string()),
        reason: t.reason.clone(),
        summary: t.summary.clone(),
        agent: t.agent.clone(),
        created_at: crate::rfc3339(t.created_at_ms),
        started_at: t.started_at_ms.map(crate::rfc3339),
        finished_at: t.finished_at_ms.map(crate::rfc3339),
        plan_sha256,
        auto_approve: t.inputs.auto_approve,
        vars: t.inputs.vars.clone(),
        var_files: t.inputs.var_files.clone(),
        env: t.inputs.env.clone(),
        secrets: t.inputs.secret_names.clone(),
        timeout_secs: t.inputs.timeout_secs,
        archive_sha256: t.archive.sha256.clone(),
        archive_size: t.archive.size,
        approved_from: t.parent.map(|p| p.to_string()),
        approved_as: t.approved_as.map(|p| p.to_string()),
        cancel_requested: t.cancel_requested,
        last_reject: t.last_reject.clone(),
        lease_expired_at: t.lease_expired_at_ms.map(crate::rfc3339),
        events,
        artifacts: detail.then(|| {
            artifacts
                .iter()
                .map(|a| ArtifactView {
                    kind: a.kind.clone(),
                    size: a.size,
                    sha256: a.sha256.clone(),
                    created_at: crate::rfc3339(a.created_at_ms),
                })
                .collect()
        }),
    })
}

pub fn routes(max_archive: u64) -> Router<Arc<ControlPlane>> {
    // base64 grows the archive by 4/3; the rest of the JSON is bounded by the field limits.
    let submit_limit =
        (max_archive as usize / 3 + 1) * 4 + 2 * delegate_protocol::limits::MAX_CONTROL_FRAME;
    Router::new()
        .route(
            "/api/v1/tasks",
            post(submit)
                .layer(DefaultBodyLimit::max(submit_limit))
                .get(list_tasks),
        )
        .route("/api/v1/tasks/{id}", get(show_task))
        .route("/api/v1/tasks/{id}/logs", get(task_logs))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/tasks/{id}/approve", post(approve_task))
        .route("/api/v1/tasks/{id}/artifacts", get(list_artifacts))
        .route("/api/v1/tasks/{id}/artifacts/{kind}", get(get_artifact))
        .route(
            "/api/v1/workspaces/{ws}/state",
            get(latest_state)
                .put(push_state)
                .layer(DefaultBodyLimit::max(
                    delegate_protocol::limits::MAX_STATE_BYTES,
                )),
        )
        .route(
            "/api/v1/workspaces/{ws}/state/versions",
            get(state_versions),
        )
        .route(
            "/api/v1/workspaces/{ws}/state/versions/{n}",
            get(state_version),
        )
        .route(
            "/api/v1/workspaces/{ws}/lock",
            get(get_lock).post(admin_lock).delete(force_unlock),
        )
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::bad_request(format!("{id:?} is not a task id")))
}

fn load(cp: &ControlPlane, id: &str) -> Result<TaskRow, ApiError> {
    let uuid = parse_id(id)?;
    cp.store
        .task(uuid)?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

async fn submit(
    State(cp): State<Arc<ControlPlane>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request too large: the workspace archive limit is {} bytes (max_archive_bytes in controlplane.toml)",
                    cp.config.max_archive_bytes
                ),
            )
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    // Never serde's own message: it would quote the offending value (a secret, say).
    let req: SubmitRequest = crate::json_body::parse(&body, "invalid submit request")?;
    let row = cp.submit(&req, "api")?;
    Ok((StatusCode::CREATED, Json(task_view(&cp, &row, false)?)))
}

async fn list_tasks(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<Vec<TaskView>>> {
    let rows = cp.store.tasks()?;
    let views = rows
        .iter()
        .map(|t| task_view(&cp, t, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(views))
}

async fn show_task(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    let t = load(&cp, &id)?;
    Ok(Json(task_view(&cp, &t, true)?))
}

async fn cancel_task(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    let t = cp.cancel(parse_id(&id)?, "api")?;
    Ok(Json(task_view(&cp, &t, false)?))
}

async fn approve_task(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let t = cp.approve(parse_id(&id)?, "api")?;
    Ok((StatusCode::CREATED, Json(task_view(&cp, &t, false)?)))
}

async fn list_artifacts(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ArtifactView>>> {
    let t = load(&cp, &id)?;
    Ok(Json(
        task_view(&cp, &t, true)?.artifacts.unwrap_or_default(),
    ))
}

async fn get_artifact(
    State(cp): State<Arc<ControlPlane>>,
    Path((id, kind)): Path<(String, String)>,
) -> ApiResult<Response> {
    let t = load(&cp, &id)?;
    let a = cp
        .store
        .artifacts(t.id)?
        .into_iter()
        .find(|a| a.kind == kind)
        .ok_or_else(|| ApiError::not_found(format!("task {id} has no {kind} artifact")))?;
    let what = format!("{kind} artifact of task {}", t.id);
    let data = cp.blobs.get(&what, &a.blob).map_err(ApiError::internal)?;
    let ctype = if kind == "plan_json" {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok(([(header::CONTENT_TYPE, ctype)], data).into_response())
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    #[serde(default)]
    after_seq: u64,
    #[serde(default)]
    follow: Option<String>,
    /// `ndjson` (default), `raw` or `sse`.
    #[serde(default)]
    format: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes" | ""))
}

/// How `GET /api/v1/tasks/{id}/logs` encodes log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One [`LogLine`] JSON object per line.
    Ndjson,
    /// The bytes exactly as the task produced them.
    Raw,
    /// Server-sent events: `id: SEQ`, `event: stdout|stderr|system`, `data: <LogLine JSON>`;
    /// a final `event: end` carries the task's state and outcome.
    Sse,
}

impl LogFormat {
    pub fn parse(s: Option<&str>) -> Option<LogFormat> {
        match s {
            None | Some("ndjson") => Some(LogFormat::Ndjson),
            Some("raw") => Some(LogFormat::Raw),
            Some("sse") => Some(LogFormat::Sse),
            Some(_) => None,
        }
    }
    fn content_type(self) -> &'static str {
        match self {
            LogFormat::Ndjson => "application/x-ndjson",
            LogFormat::Raw => "application/octet-stream",
            LogFormat::Sse => "text/event-stream",
        }
    }
}

/// Encode stored log rows in `format`.
pub fn render_logs(format: LogFormat, rows: Vec<crate::store_tasks::LogRow>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        if format == LogFormat::Raw {
            out.extend_from_slice(&r.data);
            continue;
        }
        let line = LogLine {
            seq: r.seq,
            stream: r.stream,
            at: crate::rfc3339(r.at_ms),
            data: String::from_utf8_lossy(&r.data).into_owned(),
        };
        let json = serde_json::to_string(&line).unwrap_or_default();
        if format == LogFormat::Sse {
            out.extend_from_slice(
                format!("id: {}\nevent: {}\ndata: {json}\n\n", line.seq, line.stream).as_bytes(),
            );
        } else {
            out.extend_from_slice(json.as_bytes());
            out.push(b'\n');
        }
    }
    out
}

struct LogStream {
    cp: Arc<ControlPlane>,
    id: Uuid,
    after: u64,
    follow: bool,
    format: LogFormat,
    ended: bool,
    changes: tokio::sync::watch::Receiver<u64>,
}

/// The next batch of log output, waiting for more while following; None at the end.
async fn next_logs(mut s: LogStream) -> Option<(Result<Bytes, std::io::Error>, LogStream)> {
    if s.ended {
        return None;
    }
    loop {
        s.changes.borrow_and_update();
        // Read the task *before* the logs: every log is stored before `done`, so once it is
        // finished, an empty read means there is nothing more.
        let task = s.cp.store.task(s.id).ok().flatten();
        let finished = task.as_ref().is_none_or(|t| t.state == TaskState::Finished);
        let rows = match s.cp.store.logs(s.id, s.after, 512) {
            Ok(r) => r,
            Err(e) => {
                // Never a silently short log: the client sees the stream fail (SSE: an `error`
                // event naming what could not be read).
                tracing::error!(task = %s.id, error = %e, "cannot read logs");
                s.ended = true;
                if s.format == LogFormat::Sse {
                    let err = serde_json::json!({ "error": e.to_string() });
                    return Some((Ok(Bytes::from(format!("event: error\ndata: {err}\n\n"))), s));
                }
                return Some((Err(std::io::Error::other(e.to_string())), s));
            }
        };
        if let Some(last) = rows.last() {
            s.after = last.seq;
            let out = render_logs(s.format, rows);
            return Some((Ok(Bytes::from(out)), s));
        }
        if !s.follow || finished {
            s.ended = true;
            if s.format != LogFormat::Sse {
                return None;
            }
            let end = serde_json::json!({
                "id": s.id.to_string(),
                "state": task.as_ref().map(|t| t.state.as_str()),
                "outcome": task.as_ref().and_then(|t| t.outcome).map(|o| o.as_str()),
            });
            return Some((Ok(Bytes::from(format!("event: end\ndata: {end}\n\n"))), s));
        }
        tokio::select! {
            _ = s.changes.changed() => {}
            // Belt and braces: re-check now and then even without a notification.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn task_logs(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let t = load(&cp, &id)?;
    let format = LogFormat::parse(q.format.as_deref()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "format {:?}: use ndjson, raw or sse",
            q.format.as_deref().unwrap_or_default()
        ))
    })?;
    // An SSE client reconnecting says where it stopped.
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(q.after_seq);
    // A damaged first batch is a 500 naming it, before any byte is sent.
    cp.store.logs(t.id, after, 512)?;
    let state = LogStream {
        changes: cp.subscribe_changes(),
        cp: cp.clone(),
        id: t.id,
        after,
        follow: truthy(&q.follow),
        format,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, next_logs);
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(stream),
    )
        .into_response())
}

fn check_ws(ws: &str) -> Result<(), ApiError> {
    crate::task_ops::check_name("workspace", ws).map_err(ApiError::from)
}

async fn latest_state(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
) -> ApiResult<Response> {
    check_ws(&ws)?;
    match cp.store.state_latest(&ws)? {
        Some(v) => {
            let data = cp.state_bytes(&v).map_err(ApiError::internal)?;
            Ok(([(header::CONTENT_TYPE, "application/json")], data).into_response())
        }
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: Option<String>,
}

async fn push_state(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
    Query(q): Query<ForceQuery>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    check_ws(&ws)?;
    match cp.push_state(&ws, &body, truthy(&q.force), "api") {
        Ok(version) => Ok(Json(
            serde_json::json!({ "workspace": ws, "version": version }),
        )),
        Err(crate::state::StateError::NotJson(e)) => {
            Err(ApiError::bad_request(format!("state must be JSON: {e}")))
        }
        Err(e @ crate::state::StateError::Locked { .. }) => Err(ApiError::new(
            StatusCode::LOCKED,
            format!("{e} (add ?force=1 to push anyway)"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn state_versions(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
) -> ApiResult<Json<Vec<StateVersionView>>> {
    check_ws(&ws)?;
    Ok(Json(
        cp.store
            .state_versions(&ws)?
            .into_iter()
            .map(|v| StateVersionView {
                workspace: v.workspace,
                version: v.version,
                serial: v.serial,
                lineage: v.lineage,
                size: v.size,
                sha256: v.sha256,
                task_id: v.task_id,
                created_at: crate::rfc3339(v.created_at_ms),
            })
            .collect(),
    ))
}

async fn state_version(
    State(cp): State<Arc<ControlPlane>>,
    Path((ws, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_ws(&ws)?;
    let n: u64 = n
        .parse()
        .map_err(|_| ApiError::bad_request(format!("version {n:?} is not a number")))?;
    let v = cp
        .store
        .state_version(&ws, n)?
        .ok_or_else(|| ApiError::not_found(format!("workspace {ws} has no state version {n}")))?;
    let data = cp.state_bytes(&v).map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], data).into_response())
}

async fn get_lock(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
) -> ApiResult<Response> {
    check_ws(&ws)?;
    match cp.store.state_lock(&ws)? {
        Some(h) => Ok(([(header::CONTENT_TYPE, "application/json")], h.info).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Admin: take the workspace lock with tofu's lock info JSON (as another tofu would). 200, or
/// 423 with the holder's lock info.
async fn admin_lock(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    check_ws(&ws)?;
    let id = crate::lock::lock_id_of(&body).ok_or_else(|| {
        ApiError::bad_request("the body must be tofu's lock info JSON with a non-empty \"ID\"")
    })?;
    let info = String::from_utf8_lossy(&body).into_owned();
    match cp
        .store
        .state_lock_acquire(&ws, &id, &info, None, crate::now_ms())?
    {
        crate::lock::Decision::Refuse { status, holder } => Ok((
            StatusCode::from_u16(status).unwrap_or(StatusCode::LOCKED),
            [(header::CONTENT_TYPE, "application/json")],
            holder,
        )
            .into_response()),
        decision => {
            if decision == crate::lock::Decision::Acquire {
                cp.audit(
                    "api",
                    "state.locked",
                    &format!("workspace/{ws}"),
                    &format!("lock {id}"),
                );
            }
            Ok(([(header::CONTENT_TYPE, "application/json")], info).into_response())
        }
    }
}

async fn force_unlock(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    check_ws(&ws)?;
    let released = cp.store.state_unlock(&ws, None, true)? == crate::lock::Decision::Release;
    if released {
        cp.audit(
            "api",
            "state.force_unlocked",
            &format!("workspace/{ws}"),
            "",
        );
    }
    Ok(Json(
        serde_json::json!({ "workspace": ws, "released": released }),
    ))
}

/// Whether a task outcome counts as success for CLI exit codes.
pub fn succeeded(v: &TaskView) -> bool {
    v.outcome.as_deref() == Some(Outcome::Succeeded.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_tasks::LogRow;

    fn rows() -> Vec<LogRow> {
        vec![
            LogRow {
                seq: 3,
                stream: "stdout".into(),
                at_ms: 0,
                data: b"a\n".to_vec(),
            },
            LogRow {
                seq: 4,
                stream: "stderr".into(),
                at_ms: 0,
                data: vec![0xff, b'\n'],
            },
        ]
    }

    #[test]
    fn log_formats() {
        assert_eq!(
            render_logs(LogFormat::Raw, rows()),
            vec![b'a', b'\n', 0xff, b'\n']
        );
        let nd = String::from_utf8(render_logs(LogFormat::Ndjson, rows())).unwrap();
        let lines: Vec<LogLine> = nd
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[1].seq, 4);
        assert_eq!(lines[1].stream, "stderr");
        assert_eq!(lines[1].data, "\u{fffd}\n");
        let sse = String::from_utf8(render_logs(LogFormat::Sse, rows())).unwrap();
        assert!(sse.starts_with("id: 3\nevent: stdout\ndata: {"), "{sse}");
        assert_eq!(sse.matches("\n\n").count(), 2);
        assert_eq!(LogFormat::parse(Some("sse")), Some(LogFormat::Sse));
        assert_eq!(LogFormat::parse(Some("xml")), None);
    }
}
