//! The user API: HTTPS (TLS 1.3 only) with a bearer token, JSON in and out, under `/api/v1/`.
//!
//! Owns: routes, request validation, the JSON shapes, and the HTTPS accept loop. Never returns a
//! secret value and never logs the token or request bodies.

use crate::cp::ControlPlane;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An API error: an HTTP status and a message for the user, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `GET /api/v1/agents` item; the shape DESIGN.md section 7 fixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub state: String,
    pub version: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub last_heartbeat: Option<String>,
}

/// `GET /api/v1/audit` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    pub id: i64,
    pub at: String,
    pub who: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub started_at: String,
    pub agents_connected: u64,
    /// Frames from agents that could not be decoded, since start.
    pub decode_errors: u64,
    pub protocol_violations: u64,
    pub refused_handshakes: u64,
    /// Number of tasks per state.
    pub tasks: BTreeMap<String, u64>,
    /// Largest workspace archive accepted at submit.
    pub max_archive_bytes: u64,
}

pub fn router(cp: Arc<ControlPlane>, token: String) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{name}", get(agent_detail))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/audit/verify", get(audit_verify))
        .merge(crate::api_tasks::routes(cp.config.max_archive_bytes))
        .merge(crate::enroll::routes())
        .merge(crate::api_admin::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let token = token.clone();
                async move {
                    let presented = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    if crate::token::bearer_matches(presented, &token) {
                        next.run(req).await
                    } else {
                        ApiError::new(
                            StatusCode::UNAUTHORIZED,
                            "missing or wrong bearer token (see DIR/api-token)",
                        )
                        .into_response()
                    }
                }
            },
        ))
        // After the bearer layer, so without it: the bootstrap token in the body is the credential.
        .merge(crate::enroll::public_routes())
        .with_state(cp)
}

async fn status(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<StatusView>> {
    let agents_connected = cp.hub().agents.len() as u64;
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: crate::rfc3339(cp.started_ms),
        agents_connected,
        decode_errors: cp.counters.decode_errors.load(Ordering::Relaxed),
        protocol_violations: cp.counters.protocol_violations.load(Ordering::Relaxed),
        refused_handshakes: cp.counters.refused_handshakes.load(Ordering::Relaxed),
        tasks: cp.store.task_counts()?,
        max_archive_bytes: cp.config.max_archive_bytes,
    }))
}

async fn agents(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<Vec<AgentView>>> {
    let rows = cp.store.agents()?;
    let mut views = rows
        .into_iter()
        .map(|a| AgentView {
            name: a.name,
            state: a.state,
            version: a.version,
            pool: a.pool,
            labels: a.labels,
            last_heartbeat: a.last_heartbeat_ms.map(crate::rfc3339),
        })
        .collect();
    crate::revoke::overlay_identities(&mut views, &cp.store.agent_identities()?);
    Ok(Json(views))
}

/// `GET /api/v1/agents/{name}`: the listing's fields plus slots, held tasks and history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDetail {
    #[serde(flatten)]
    pub agent: AgentView,
    pub slots: u32,
    pub connected_at: Option<String>,
    /// Tasks assigned to or running on it.
    pub tasks: Vec<String>,
    pub connections: Vec<ConnectionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub peer: String,
    pub connected_at: String,
    pub disconnected_at: Option<String>,
    pub reason: Option<String>,
}

/// `GET /api/v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditVerifyView {
    pub ok: bool,
    pub records: u64,
    /// The first record whose hash does not verify.
    pub first_bad: Option<i64>,
}

async fn agent_detail(
    State(cp): State<Arc<ControlPlane>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<Json<AgentDetail>> {
    let a = cp
        .store
        .agents()?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no agent {name}")))?;
    let revoked = cp
        .store
        .agent_identity(&name)?
        .is_some_and(|i| i.is_revoked());
    let tasks = cp
        .store
        .held_by(&name)?
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    let connections = cp
        .store
        .connections(&name)?
        .into_iter()
        .map(|c| ConnectionView {
            peer: c.peer,
            connected_at: crate::rfc3339(c.connected_at_ms),
            disconnected_at: c.disconnected_at_ms.map(crate::rfc3339),
            reason: c.reason,
        })
        .collect();
    Ok(Json(AgentDetail {
        slots: a.slots,
        connected_at: a.connected_at_ms.map(crate::rfc3339),
        tasks,
        connections,
        agent: AgentView {
            name: a.name,
            state: if revoked { "revoked".into() } else { a.state },
            version: a.version,
            pool: a.pool,
            labels: a.labels,
            last_heartbeat: a.last_heartbeat_ms.map(crate::rfc3339),
        },
    }))
}

async fn audit_verify(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<AuditVerifyView>> {
    let records = cp.store.audit_records(None)?;
    let result = crate::audit::verify_chain(&records);
    Ok(Json(AuditVerifyView {
        ok: result.is_ok(),
        records: records.len() as u64,
        first_bad: result.err(),
    }))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    task: Option<String>,
}

async fn audit(
    State(cp): State<Arc<ControlPlane>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditView>>> {
    let rows = cp.store.audit_records(q.task.as_deref())?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AuditView {
                id: r.id,
                at: crate::rfc3339(r.at_ms),
                who: r.who,
                action: r.action,
                target: r.target,
                detail: r.detail,
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect(),
    ))
}

/// Serve the API over TLS until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "API: TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "API: TLS handshake timed out");
                        return;
                    }
                };
            let io = hyper_util::rt::TokioIo::new(tls);
            let svc = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}
