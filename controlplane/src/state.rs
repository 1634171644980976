//! The default state backend, control plane side: relayed `state_request`s from agents (scoped to
//! the workspace of a task the agent holds) and the admin operations of the user API.
//!
//! Owns: mapping OpenTofu http backend requests to store operations and HTTP statuses
//! (GET 200/204, POST 200, LOCK 200/423, UNLOCK 200/409, DELETE 200, 423 on writes against
//! another lock). Never lets an agent name a workspace: it is always the task's.
//!
//! A write without a lock id from the task that holds the workspace's lock is that holder's
//! write: the agent uses it to store the `errored.tfstate` an apply left when it could not save
//! its state while the agent (its backend) was down. Another task's write still needs the id.

use crate::cp::ControlPlane;
use crate::lock::{lock_id_of, Decision};
use crate::store_state::{NewStateVersion, StateVersionRow};
use crate::store_tasks::TaskState;
use crate::tasks::{sha256_hex, Fault, Reply};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use delegate_protocol::{Message, StateMethod, StateRequest, StateResponse};
use thiserror::Error;

/// Errors of the admin state operations. `Locked` is retryable once the lock is released.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("state must be JSON: {0}")]
    NotJson(String),
    #[error("workspace {workspace} is locked: {holder}")]
    Locked { workspace: String, holder: String },
    #[error("{0}")]
    Storage(String),
}

impl From<crate::store::StoreError> for StateError {
    fn from(e: crate::store::StoreError) -> Self {
        StateError::Storage(e.to_string())
    }
}

impl From<crate::at_rest::AtRestError> for StateError {
    fn from(e: crate::at_rest::AtRestError) -> Self {
        StateError::Storage(e.to_string())
    }
}

/// An HTTP status and optional body for tofu.
type HttpReply = (u16, Option<Vec<u8>>);

/// `serial` and `lineage` from a state file, when it is JSON with them.
pub fn state_meta(data: &[u8]) -> Result<(Option<i64>, Option<String>), String> {
    // A value-free message: a state holds secrets.
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| crate::json_body::describe_plain(&e))?;
    Ok((
        v.get("serial").and_then(|s| s.as_i64()),
        v.get("lineage")
            .and_then(|s| s.as_str())
            .map(str::to_string),
    ))
}

fn response(request_id: u64, status: u16, body: Option<&[u8]>) -> Reply {
    Reply {
        send: vec![Message::StateResponse(StateResponse {
            request_id,
            status,
            body_b64: body.map(|b| B64.encode(b)),
        })],
        ..Reply::default()
    }
}

impl ControlPlane {
    pub fn on_state_request(&self, agent: &str, r: &StateRequest) -> Result<Reply, Fault> {
        let task = match self.store.task(r.task_id) {
            Ok(Some(t)) if t.agent.as_deref() == Some(agent) => t,
            Ok(_) => {
                tracing::warn!(agent, task = %r.task_id, "state request for a task the agent does not hold");
                let msg = format!("task {} is not assigned to agent {agent}", r.task_id);
                return Ok(response(r.request_id, 403, Some(msg.as_bytes())));
            }
            Err(e) => {
                tracing::error!(error = %e, "state request: cannot read task");
                return Ok(response(
                    r.request_id,
                    500,
                    Some(b"control plane storage error"),
                ));
            }
        };
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            let msg = format!(
                "task {} is {}; its state access has ended",
                task.id,
                task.state.as_str()
            );
            return Ok(response(r.request_id, 403, Some(msg.as_bytes())));
        }
        let body = match r.body_b64.as_deref().map(|b| B64.decode(b)).transpose() {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("body_b64 is not base64: {e}");
                return Ok(response(r.request_id, 400, Some(msg.as_bytes())));
            }
        };
        let ws = task.workspace.as_str();
        let tid = task.id.to_string();
        let (status, out): HttpReply = match self.state_op(agent, ws, &tid, r, body) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(workspace = ws, error = %e, "state request failed");
                (500, Some(b"control plane storage error".to_vec()))
            }
        };
        Ok(response(r.request_id, status, out.as_deref()))
    }

    fn state_op(
        &self,
        agent: &str,
        ws: &str,
        task_id: &str,
        r: &StateRequest,
        body: Option<Vec<u8>>,
    ) -> Result<HttpReply, StateError> {
        let now = crate::now_ms();
        let target = format!("workspace/{ws}");
        Ok(match r.method {
            StateMethod::Get => match self.store.state_latest(ws)? {
                Some(v) => (200, Some(self.state_bytes(&v)?)),
                None => (204, None),
            },
            StateMethod::Post => {
                let Some(data) = body else {
                    return Ok((400, Some(b"POST needs the state as its body".to_vec())));
                };
                let (serial, lineage) = match state_meta(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        return Ok((400, Some(format!("state is not JSON: {e}").into_bytes())))
                    }
                };
                let blob = self.blobs.put("state", &data)?;
                let new = NewStateVersion {
                    serial,
                    lineage,
                    size: data.len() as u64,
                    sha256: sha256_hex(&data),
                    blob: blob.clone(),
                    task_id: Some(task_id.to_string()),
                };
                let lock_id = match &r.lock_id {
                    Some(id) => Some(id.clone()),
                    None => self.store.lock_held_by_task(ws, task_id)?,
                };
                match self
                    .store
                    .state_write(ws, lock_id.as_deref(), false, &new, now)?
                {
                    Ok(version) => {
                        self.audit(
                            agent,
                            "state.written",
                            &target,
                            &format!("version {version} by task {task_id}"),
                        );
                        self.notify_change();
                        (200, None)
                    }
                    Err(refusal) => {
                        let _ = self.blobs.delete(&blob);
                        self.refused(agent, &target, "write", refusal)
                    }
                }
            }
            StateMethod::Lock => {
                let info = body.unwrap_or_default();
                let Some(id) = lock_id_of(&info).or_else(|| r.lock_id.clone()) else {
                    return Ok((
                        400,
                        Some(b"LOCK body must be tofu's lock info JSON with an ID".to_vec()),
                    ));
                };
                let info_text = String::from_utf8_lossy(&info).into_owned();
                match self
                    .store
                    .state_lock_acquire(ws, &id, &info_text, Some(task_id), now)?
                {
                    Decision::Acquire => {
                        self.audit(
                            agent,
                            "state.locked",
                            &target,
                            &format!("lock {id} by task {task_id}"),
                        );
                        (200, None)
                    }
                    Decision::Refuse { status, holder } => {
                        self.audit(
                            agent,
                            "state.lock_refused",
                            &target,
                            &format!("task {task_id} wanted lock {id}; held: {holder}"),
                        );
                        (status, Some(holder.into_bytes()))
                    }
                    Decision::Allow | Decision::Release => (200, None),
                }
            }
            StateMethod::Unlock => {
                let id = body
                    .as_deref()
                    .and_then(lock_id_of)
                    .or_else(|| r.lock_id.clone());
                match self.store.state_unlock(ws, id.as_deref(), false)? {
                    Decision::Release => {
                        self.audit(
                            agent,
                            "state.unlocked",
                            &target,
                            &format!("lock {} by task {task_id}", id.unwrap_or_default()),
                        );
                        (200, None)
                    }
                    Decision::Refuse { status, holder } => (status, Some(holder.into_bytes())),
                    Decision::Allow | Decision::Acquire => (200, None),
                }
            }
            StateMethod::Delete => match self.store.state_delete(ws, r.lock_id.as_deref())? {
                Ok(blobs) => {
                    for b in blobs {
                        let _ = self.blobs.delete(&b);
                    }
                    self.audit(
                        agent,
                        "state.deleted",
                        &target,
                        &format!("by task {task_id}"),
                    );
                    (200, None)
                }
                Err(refusal) => self.refused(agent, &target, "delete", refusal),
            },
        })
    }

    fn refused(&self, agent: &str, target: &str, what: &str, d: Decision) -> HttpReply {
        match d {
            Decision::Refuse { status, holder } => {
                self.audit(
                    agent,
                    "state.write_refused",
                    target,
                    &format!("{what} refused; lock held: {holder}"),
                );
                (status, Some(holder.into_bytes()))
            }
            _ => (500, None),
        }
    }

    /// A task ended with `outcome`: release the locks it still holds, except when an apply (or
    /// a self-applying plan) ended `lost`. Then nobody knows what it did to the infrastructure,
    /// so, as for an apply lost with its agent's lease (`lease`), its lock stays for a human, who
    /// checks the workspace and force-unlocks it.
    pub fn locks_after_end(
        &self,
        t: &crate::store_tasks::TaskRow,
        outcome: delegate_protocol::Outcome,
    ) {
        if outcome != delegate_protocol::Outcome::Lost
            || !crate::lease::applies(t.op, t.inputs.auto_approve)
        {
            return self.release_locks_of(t.id);
        }
        match self.store.locks_of_task(&t.id.to_string()) {
            Ok(held) => {
                for (ws, lock_id) in held {
                    tracing::warn!(task = %t.id, workspace = %ws, "state lock kept: the apply ended lost");
                    self.audit(
                        "controlplane",
                        "state.lock_kept",
                        &format!("workspace/{ws}"),
                        &format!(
                            "lock {lock_id} kept: {} task {} ended lost; a human must check the \
                             workspace's infrastructure and state, then force-unlock it \
                             (DELETE /api/v1/workspaces/{ws}/lock)",
                            t.op, t.id
                        ),
                    );
                }
            }
            Err(e) => {
                tracing::error!(task = %t.id, error = %e, "cannot list the task's state locks")
            }
        }
    }

    /// A task ended: release the state locks it still holds (tofu killed by cancel or timeout,
    /// or a lost agent, cannot unlock), so the workspace is not wedged.
    pub fn release_locks_of(&self, task_id: uuid::Uuid) {
        match self.store.release_task_locks(&task_id.to_string()) {
            Ok(released) => {
                for (ws, lock_id) in released {
                    tracing::info!(task = %task_id, workspace = %ws, "released the state lock of an ended task");
                    self.audit(
                        "controlplane",
                        "state.unlocked",
                        &format!("workspace/{ws}"),
                        &format!("lock {lock_id} released: task {task_id} ended holding it"),
                    );
                }
            }
            Err(e) => {
                tracing::error!(task = %task_id, error = %e, "cannot release the task's state locks")
            }
        }
    }

    /// Admin: push a new state version (e.g. to change state behind tofu's back). Refused while
    /// the workspace is locked unless `force`.
    pub fn push_state(
        &self,
        ws: &str,
        data: &[u8],
        force: bool,
        who: &str,
    ) -> Result<u64, StateError> {
        let (serial, lineage) = state_meta(data).map_err(StateError::NotJson)?;
        let blob = self
            .blobs
            .put("state", data)
            .map_err(|e| StateError::Storage(e.to_string()))?;
        let new = NewStateVersion {
            serial,
            lineage,
            size: data.len() as u64,
            sha256: sha256_hex(data),
            blob: blob.clone(),
            task_id: None,
        };
        match self
            .store
            .state_write(ws, None, force, &new, crate::now_ms())
            .map_err(|e| StateError::Storage(e.to_string()))?
        {
            Ok(version) => {
                self.audit(
                    who,
                    "state.pushed",
                    &format!("workspace/{ws}"),
                    &format!("version {version}{}", if force { " (forced)" } else { "" }),
                );
                Ok(version)
            }
            Err(d) => {
                let _ = self.blobs.delete(&blob);
                let holder = match d {
                    Decision::Refuse { holder, .. } => holder,
                    _ => String::new(),
                };
                Err(StateError::Locked {
                    workspace: ws.to_string(),
                    holder,
                })
            }
        }
    }

    /// The bytes of a state version; a damaged blob is an error naming the version.
    pub fn state_bytes(&self, v: &StateVersionRow) -> Result<Vec<u8>, StateError> {
        let what = format!("state version {} of workspace {}", v.version, v.workspace);
        self.blobs
            .get(&what, &v.blob)
            .map_err(|e| StateError::Storage(e.to_string()))
    }
}
