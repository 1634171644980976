//! User API routes for workspace secrets and at-rest keys.
//!
//! Owns: `/api/v1/workspaces/{ws}/secrets...` and `/api/v1/keys...`. Never returns, logs or
//! echoes a secret value (a malformed body is answered without quoting it), and never returns
//! key material (ids only).

use crate::api::{ApiError, ApiResult};
use crate::cp::ControlPlane;
use crate::keys::{ResealReport, RotateReport};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `GET /api/v1/workspaces/{ws}/secrets` item: a name, never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretView {
    pub name: String,
    pub updated_at: String,
}

/// `PUT /api/v1/workspaces/{ws}/secrets/{name}` body. The value is wiped on drop and never
/// printed by `Debug`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    pub value: String,
}

impl Drop for SecretBody {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.value);
    }
}

impl std::fmt::Debug for SecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBody").finish_non_exhaustive()
    }
}

/// `GET /api/v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysView {
    /// The key new data is sealed under.
    pub current: String,
    /// Every key that can open data.
    pub ids: Vec<String>,
}

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/api/v1/workspaces/{ws}/secrets", get(list_secrets))
        .route(
            "/api/v1/workspaces/{ws}/secrets/{name}",
            put(set_secret).delete(remove_secret),
        )
        .route("/api/v1/keys", get(keys))
        .route("/api/v1/keys/rotate", post(rotate))
        .route("/api/v1/keys/reseal", post(reseal))
}

fn check_ws(ws: &str) -> Result<(), ApiError> {
    crate::task_ops::check_name("workspace", ws).map_err(ApiError::from)
}

async fn list_secrets(
    State(cp): State<Arc<ControlPlane>>,
    Path(ws): Path<String>,
) -> ApiResult<Json<Vec<SecretView>>> {
    check_ws(&ws)?;
    Ok(Json(
        cp.store
            .secret_names(&ws)?
            .into_iter()
            .map(|s| SecretView {
                name: s.name,
                updated_at: crate::rfc3339(s.updated_at_ms),
            })
            .collect(),
    ))
}

async fn set_secret(
    State(cp): State<Arc<ControlPlane>>,
    Path((ws, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    check_ws(&ws)?;
    // `parse` never quotes the body (here: the value) in its message.
    let body: SecretBody = crate::json_body::parse(&body, "invalid secret body")?;
    crate::task_ops::check_secret(&name, &body.value)?;
    let replaced = cp
        .store
        .secret_set(&ws, &name, &body.value, crate::now_ms())?;
    cp.audit(
        "api",
        "secret.set",
        &format!("workspace/{ws}"),
        &format!(
            "secret {name} {}",
            if replaced { "replaced" } else { "added" }
        ),
    );
    Ok(Json(
        serde_json::json!({ "workspace": ws, "name": name, "replaced": replaced }),
    ))
}

async fn remove_secret(
    State(cp): State<Arc<ControlPlane>>,
    Path((ws, name)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    check_ws(&ws)?;
    if !cp.store.secret_remove(&ws, &name)? {
        return Err(ApiError::not_found(format!(
            "workspace {ws} has no secret {name}"
        )));
    }
    cp.audit(
        "api",
        "secret.removed",
        &format!("workspace/{ws}"),
        &format!("secret {name}"),
    );
    Ok(Json(serde_json::json!({ "workspace": ws, "name": name })))
}

async fn keys(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<KeysView>> {
    let at = cp.store.at_rest();
    Ok(Json(KeysView {
        current: at.current_key_id(),
        ids: at.key_ids(),
    }))
}

async fn rotate(
    State(cp): State<Arc<ControlPlane>>,
) -> ApiResult<(StatusCode, Json<RotateReport>)> {
    let report =
        crate::keys::rotate(&cp.store, cp.store.at_rest(), "api").map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(report)))
}

async fn reseal(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<ResealReport>> {
    let worker = cp.clone();
    let report = tokio::task::spawn_blocking(move || {
        crate::keys::reseal(&worker.store, &worker.blobs, "api")
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(Json(report))
}
