//! What users do to tasks through the API: submit, cancel, approve.
//!
//! Owns: validating a submission (every limit the protocol will later enforce, checked up front
//! with a clear message), storing its archive, and the rules of cancel and approve. Secret values
//! go to the hub (memory) only; the database keeps their names.

use crate::cp::ControlPlane;
use crate::store_tasks::{NewTask, StoredBlob, TaskInputs, TaskRow, TaskState};
use crate::tasks::{sha256_hex, spec_for};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use delegate_protocol::{encode_text, limits, Assign, Cancel, Message, Op, Outcome, Secrets};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;
use uuid::Uuid;

/// A refused user request: the HTTP status and a message. Not retryable unless the status says
/// so (409 on a task state may change).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct OpError {
    pub status: u16,
    pub message: String,
}

fn bad(message: impl Into<String>) -> OpError {
    OpError {
        status: 400,
        message: message.into(),
    }
}

fn internal(e: impl std::fmt::Display) -> OpError {
    tracing::error!(error = %e, "task operation failed");
    OpError {
        status: 500,
        message: format!("internal error: {e}"),
    }
}

/// `POST /api/v1/tasks` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// `validate`, `plan`, `apply`, `destroy` or `drift`.
    pub op: String,
    pub workspace: String,
    #[serde(default)]
    pub pool: Option<String>,
    /// The workspace as a tar.gz, base64.
    pub archive_b64: String,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Paths inside the archive passed as `-var-file`.
    #[serde(default)]
    pub var_files: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables. Held in memory only; `Debug` prints names only.
    #[serde(default)]
    pub secrets: Secrets,
    #[serde(default)]
    pub auto_approve: bool,
    /// 0: the agent's default.
    #[serde(default)]
    pub timeout_secs: u64,
}

/// A submission that passed validation.
#[derive(Debug)]
pub struct ValidSubmit {
    pub op: Op,
    pub workspace: String,
    pub pool: String,
    pub archive: Vec<u8>,
    pub inputs: TaskInputs,
    pub secrets: Secrets,
}

/// Longest task timeout a user may ask for: one week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Workspace and pool names: they become directory-ish identifiers on the agent.
pub fn check_name(what: &str, s: &str) -> Result<(), OpError> {
    let ok = !s.is_empty()
        && s.len() <= limits::MAX_NAME
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} {s:?} is invalid: use 1-256 characters from a-z, A-Z, 0-9, '-', '_', '.', not starting with '.'"
        )))
    }
}

/// Pool names, for tasks and for enrollment tokens ([`crate::tokens::valid_pool`]): a name that
/// also starts with a letter or digit, as an agent's `agent.pool` must (a task for any other
/// pool could never run).
pub fn check_pool(s: &str) -> Result<(), OpError> {
    check_name("pool", s)?;
    if s.as_bytes()[0].is_ascii_alphanumeric() {
        Ok(())
    } else {
        Err(bad(format!(
            "pool {s:?} is invalid: it must start with a letter or digit (as an agent's agent.pool)"
        )))
    }
}

fn check_ident(what: &str, k: &str, allow_dash: bool) -> Result<(), OpError> {
    let mut bytes = k.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_');
    let rest_ok =
        bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || (allow_dash && b == b'-'));
    if first_ok && rest_ok && k.len() <= limits::MAX_NAME {
        Ok(())
    } else {
        Err(bad(format!("{what} name {k:?} is not a valid identifier")))
    }
}

fn check_map(what: &str, m: &BTreeMap<String, String>, allow_dash: bool) -> Result<(), OpError> {
    if m.len() > limits::MAX_ENTRIES {
        return Err(bad(format!(
            "too many {what}s: {} (limit {})",
            m.len(),
            limits::MAX_ENTRIES
        )));
    }
    for (k, v) in m {
        check_ident(what, k, allow_dash)?;
        if v.len() > limits::MAX_VALUE {
            return Err(bad(format!(
                "{what} {k} is {} bytes; the limit is {}",
                v.len(),
                limits::MAX_VALUE
            )));
        }
    }
    Ok(())
}

/// A secret's name and value (the message names the secret, never shows its value). Values
/// shorter than [`limits::MIN_SECRET_LEN`] bytes are refused: redacting them from logs would
/// also redact ordinary text; values longer than [`limits::MAX_SECRET_LEN`] are refused because
/// the agent's redactor refuses them (the task would be dispatched only to fail).
pub fn check_secret(name: &str, value: &str) -> Result<(), OpError> {
    check_ident("secret", name, false)?;
    if value.len() < limits::MIN_SECRET_LEN {
        return Err(bad(format!(
            "secret {name} is shorter than {} bytes; values that short cannot be redacted from \
             logs without redacting ordinary text, so they are refused",
            limits::MIN_SECRET_LEN
        )));
    }
    if value.len() > limits::MAX_SECRET_LEN {
        return Err(bad(format!(
            "secret {name} is {} bytes long; secrets may be at most {} bytes (the agent must \
             redact them from streamed logs); put larger material in a var file",
            value.len(),
            limits::MAX_SECRET_LEN
        )));
    }
    Ok(())
}

/// A workspace's stored secrets against the limits the agent enforces (a value stored before
/// [`limits::MAX_SECRET_LEN`] was checked at `secrets set` would make every task fail).
pub fn check_stored_secrets(workspace: &str, stored: &Secrets) -> Result<(), OpError> {
    for (name, value) in &stored.0 {
        check_secret(name, value).map_err(|e| {
            bad(format!(
                "workspace {workspace}'s stored {}; set it again with a valid value",
                e.message
            ))
        })?;
    }
    Ok(())
}

/// The secrets a task runs with: the workspace's stored set, overridden by the task's own
/// secrets and plain env of the same name (task-level wins).
pub fn merge_secrets(
    mut workspace: Secrets,
    task: &Secrets,
    env: &BTreeMap<String, String>,
) -> Secrets {
    let mut out = std::mem::take(&mut workspace.0);
    out.retain(|k, _| !env.contains_key(k));
    for (k, v) in &task.0 {
        out.insert(k.clone(), v.clone());
    }
    Secrets(out)
}

/// Check a submission against the limits; decode its archive.
pub fn validate_submit(
    req: &SubmitRequest,
    max_archive: u64,
    default_pool: &str,
) -> Result<ValidSubmit, OpError> {
    let op = Op::parse(&req.op).ok_or_else(|| {
        bad(format!(
            "op {:?} is not one of validate, plan, apply, destroy, drift",
            req.op
        ))
    })?;
    check_name("workspace", &req.workspace)?;
    let pool = req.pool.clone().unwrap_or_else(|| default_pool.to_string());
    check_pool(&pool)?;
    // Refuse an oversized archive before decoding it.
    let approx = (req.archive_b64.len() as u64 / 4) * 3;
    if approx > max_archive + 3 {
        return Err(too_large(approx, max_archive));
    }
    let archive = B64
        .decode(req.archive_b64.trim())
        .map_err(|e| bad(format!("archive_b64 is not base64: {e}")))?;
    if archive.is_empty() {
        return Err(bad("the workspace archive is empty"));
    }
    if archive.len() as u64 > max_archive {
        return Err(too_large(archive.len() as u64, max_archive));
    }
    check_map("variable", &req.vars, true)?;
    check_map("env variable", &req.env, false)?;
    check_map("secret", &req.secrets.0, false)?;
    for (k, v) in &req.secrets.0 {
        check_secret(k, v)?;
    }
    for k in req.secrets.0.keys() {
        if req.env.contains_key(k) {
            return Err(bad(format!("{k} is given both as --env and as --secret")));
        }
    }
    if req.var_files.len() > limits::MAX_ENTRIES {
        return Err(bad("too many var files"));
    }
    for f in &req.var_files {
        let p = std::path::Path::new(f);
        let ok = !f.is_empty()
            && f.len() <= limits::MAX_TEXT
            && p.is_relative()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(bad(format!(
                "var file {f:?} must be a relative path inside the workspace archive"
            )));
        }
    }
    if req.timeout_secs > MAX_TIMEOUT_SECS {
        return Err(bad(format!(
            "timeout of {} s is over the maximum of {MAX_TIMEOUT_SECS} s",
            req.timeout_secs
        )));
    }
    Ok(ValidSubmit {
        op,
        workspace: req.workspace.clone(),
        pool,
        archive,
        inputs: TaskInputs {
            auto_approve: req.auto_approve,
            vars: req.vars.clone(),
            var_files: req.var_files.clone(),
            env: req.env.clone(),
            timeout_secs: req.timeout_secs,
            secret_names: req.secrets.0.keys().cloned().collect(),
        },
        secrets: req.secrets.clone(),
    })
}

fn too_large(size: u64, max: u64) -> OpError {
    OpError {
        status: 413,
        message: format!(
            "workspace archive is {size} bytes; the limit is {max} bytes (max_archive_bytes in controlplane.toml)"
        ),
    }
}

/// Whether a task's Assign fits in one control frame.
pub fn check_assign_size(t: &TaskRow, secrets: &Secrets) -> Result<(), OpError> {
    let spec = spec_for(t, secrets.clone());
    let len = encode_text(&Message::Assign(Assign { task: spec })).len();
    if len > limits::MAX_CONTROL_FRAME {
        return Err(bad(format!(
            "variables, env and secrets together take {len} bytes; the limit is {} (put large values in a var file)",
            limits::MAX_CONTROL_FRAME
        )));
    }
    Ok(())
}

impl ControlPlane {
    /// Store and queue a task. Returns its row.
    pub fn submit(&self, req: &SubmitRequest, who: &str) -> Result<TaskRow, OpError> {
        let v = validate_submit(
            req,
            self.config.max_archive_bytes,
            &self.config.default_pool,
        )?;
        let id = Uuid::new_v4();
        let sha = sha256_hex(&v.archive);
        let new = NewTask {
            id,
            op: v.op,
            workspace: v.workspace,
            pool: v.pool,
            inputs: v.inputs,
            archive: StoredBlob {
                blob: String::new(),
                size: v.archive.len() as u64,
                sha256: sha,
            },
            plan: None,
            parent: None,
        };
        let stored = self
            .store
            .workspace_secrets(&new.workspace)
            .map_err(internal)?;
        let merged = merge_secrets(stored, &v.secrets, &new.inputs.env);
        // The task's own secrets were checked above: only stored ones can fail here.
        check_stored_secrets(&new.workspace, &merged)?;
        check_assign_size(&preview_row(&new), &merged)?;
        let blob = self.blobs.put("archive", &v.archive).map_err(internal)?;
        let new = NewTask {
            archive: StoredBlob {
                blob,
                ..new.archive
            },
            ..new
        };
        self.enqueue(new, v.secrets, who, "")
    }

    fn enqueue(
        &self,
        new: NewTask,
        secrets: Secrets,
        who: &str,
        extra: &str,
    ) -> Result<TaskRow, OpError> {
        let id = new.id;
        if !secrets.0.is_empty() {
            self.hub().secrets.insert(id, secrets);
        }
        if let Err(e) = self.store.insert_task(&new, crate::now_ms()) {
            self.hub().secrets.remove(&id);
            return Err(internal(e));
        }
        let detail = format!(
            "op {} workspace {} pool {} archive {} bytes sha256 {}{extra}",
            new.op, new.workspace, new.pool, new.archive.size, new.archive.sha256
        );
        tracing::info!(task = %id, "task submitted: {detail}");
        self.audit(who, "task.submitted", &id.to_string(), &detail);
        self.notify_change();
        self.request_dispatch();
        self.store
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| internal("task vanished"))
    }

    /// Cancel: a queued or assigned task ends at once; a running one is asked to stop (its
    /// outcome arrives with `done`).
    pub fn cancel(&self, id: Uuid, who: &str) -> Result<TaskRow, OpError> {
        // Under the hub lock, so dispatch cannot assign the task meanwhile.
        let mut hub = self.hub();
        let t = self
            .store
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let now = crate::now_ms();
        match t.state {
            TaskState::Finished => {
                return Err(OpError {
                    status: 409,
                    message: format!(
                        "task {id} already finished ({})",
                        t.outcome.map(Outcome::as_str).unwrap_or("finished")
                    ),
                })
            }
            TaskState::Queued | TaskState::Assigned => {
                let reason = if t.state == TaskState::Queued {
                    format!("cancelled by {who} before it was assigned")
                } else {
                    format!("cancelled by {who} before the agent accepted it")
                };
                self.store
                    .finish(id, Outcome::Cancelled, Some(&reason), None, now)
                    .map_err(internal)?;
                if let Some(agent) = &t.agent {
                    // It may have accepted meanwhile: tell it to stop.
                    hub.send(
                        agent,
                        &Message::Cancel(Cancel {
                            task_id: id,
                            reason: reason.clone(),
                        }),
                    );
                }
                hub.forget_task(t.agent.as_deref(), id, false);
                drop(hub);
                self.audit(who, "task.cancelled", &id.to_string(), &reason);
                self.after_end(&t, Outcome::Cancelled, now);
                self.request_dispatch();
            }
            TaskState::Running => {
                self.store.set_cancel_requested(id).map_err(internal)?;
                let sent = t.agent.as_deref().is_some_and(|a| {
                    hub.send(
                        a,
                        &Message::Cancel(Cancel {
                            task_id: id,
                            reason: format!("cancelled by {who}"),
                        }),
                    )
                });
                drop(hub);
                let detail = if sent {
                    "cancel sent to the agent".to_string()
                } else {
                    "agent not connected; cancel is sent when it reconnects".to_string()
                };
                self.audit(who, "task.cancel_requested", &id.to_string(), &detail);
            }
        }
        self.notify_change();
        self.store
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| not_found(id))
    }

    /// Turn a finished, succeeded plan into an apply task carrying the plan's sha256.
    pub fn approve(&self, id: Uuid, who: &str) -> Result<TaskRow, OpError> {
        self.approve_at(id, who, crate::now_ms())
    }

    /// [`Self::approve`] at `now_ms` (the plan's secrets may have expired by then).
    pub fn approve_at(&self, id: Uuid, who: &str, now_ms: i64) -> Result<TaskRow, OpError> {
        let t = self
            .store
            .task(id)
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let refuse = |message: String| OpError {
            status: 409,
            message,
        };
        if t.op != Op::Plan {
            return Err(refuse(format!(
                "task {id} is a {} task; only a plan can be approved",
                t.op
            )));
        }
        if t.inputs.auto_approve {
            return Err(refuse(format!(
                "task {id} was submitted with --auto-approve; it applied itself"
            )));
        }
        if t.state != TaskState::Finished {
            return Err(refuse(format!(
                "task {id} is {}; wait until the plan has finished",
                t.state.as_str()
            )));
        }
        if t.outcome != Some(Outcome::Succeeded) {
            return Err(refuse(format!(
                "task {id} ended {}; only a succeeded plan can be approved",
                t.outcome
                    .map(Outcome::as_str)
                    .unwrap_or("without an outcome")
            )));
        }
        if let Some(apply) = t.approved_as {
            return Err(refuse(format!(
                "task {id} was already approved as task {apply}"
            )));
        }
        if let Some(why) = self.approval_secrets_refusal(&t, now_ms) {
            self.audit(who, "task.approve_refused", &id.to_string(), &why);
            return Err(refuse(why));
        }
        let artifacts = self.store.artifacts(id).map_err(internal)?;
        let plan = artifacts
            .iter()
            .find(|a| a.kind == "plan")
            .ok_or_else(|| refuse(format!("task {id} has no stored plan file to apply")))?;
        let secrets = self.hub().secrets.get(&id).cloned().unwrap_or_default();
        if !t.inputs.secret_names.is_empty() && secrets.0.is_empty() {
            // Dropped since the check above (the window closed meanwhile).
            let why = self
                .approval_secrets_refusal(&t, now_ms)
                .unwrap_or_else(|| {
                    format!("the plan's secrets are gone; submit the plan again (task {id})")
                });
            self.audit(who, "task.approve_refused", &id.to_string(), &why);
            return Err(refuse(why));
        }
        let apply_id = Uuid::new_v4();
        if !self.store.set_approved_as(id, apply_id).map_err(internal)? {
            return Err(refuse(format!("task {id} was already approved")));
        }
        let new = NewTask {
            id: apply_id,
            op: Op::Apply,
            workspace: t.workspace.clone(),
            pool: t.pool.clone(),
            inputs: TaskInputs {
                auto_approve: false,
                ..t.inputs.clone()
            },
            archive: t.archive.clone(),
            plan: Some(StoredBlob {
                blob: plan.blob.clone(),
                size: plan.size,
                sha256: plan.sha256.clone(),
            }),
            parent: Some(id),
        };
        self.audit(
            who,
            "task.approved",
            &id.to_string(),
            &format!("as apply task {apply_id}, plan sha256 {}", plan.sha256),
        );
        let row = self.enqueue(
            new,
            secrets,
            who,
            &format!(" plan sha256 {} approved from {id}", plan.sha256),
        )?;
        let mut hub = self.hub();
        hub.secrets.remove(&id);
        hub.kept.remove(&id);
        drop(hub);
        Ok(row)
    }
}

fn not_found(id: Uuid) -> OpError {
    OpError {
        status: 404,
        message: format!("no task {id}"),
    }
}

/// The row a new task will have (for checks before it is stored).
fn preview_row(n: &NewTask) -> TaskRow {
    TaskRow {
        id: n.id,
        op: n.op,
        workspace: n.workspace.clone(),
        pool: n.pool.clone(),
        state: TaskState::Queued,
        outcome: None,
        reason: None,
        summary: None,
        agent: None,
        inputs: n.inputs.clone(),
        archive: n.archive.clone(),
        plan: n.plan.clone(),
        parent: n.parent,
        approved_as: None,
        acked_seq: 0,
        cancel_requested: false,
        fail_reason: None,
        last_reject: None,
        created_at_ms: 0,
        assigned_at_ms: None,
        started_at_ms: None,
        finished_at_ms: None,
        lease_expired_at_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> SubmitRequest {
        SubmitRequest {
            op: "plan".into(),
            workspace: "hello".into(),
            pool: None,
            archive_b64: B64.encode(b"tar.gz bytes"),
            vars: BTreeMap::from([("greeting".into(), "hi".into())]),
            var_files: vec![".delegate/varfiles/0.tfvars".into()],
            env: BTreeMap::new(),
            secrets: Secrets(BTreeMap::from([(
                "API_TOKEN".into(),
                "s3cr3t-value".into(),
            )])),
            auto_approve: false,
            timeout_secs: 60,
        }
    }

    #[test]
    fn valid_submission() {
        let v = validate_submit(&req(), 1000, "default").unwrap();
        assert_eq!(v.op, Op::Plan);
        assert_eq!(v.pool, "default");
        assert_eq!(v.archive, b"tar.gz bytes");
        assert_eq!(v.inputs.secret_names, vec!["API_TOKEN".to_string()]);
        // The stored inputs never hold secret values.
        let json = serde_json::to_string(&v.inputs).unwrap();
        assert!(!json.contains("s3cr3t"));
        assert!(!format!("{:?}", req()).contains("s3cr3t"));
    }

    #[test]
    fn refusals() {
        type Edit = Box<dyn Fn(&mut SubmitRequest)>;
        let cases: Vec<(Edit, u16, &str)> = vec![
            (Box::new(|r| r.op = "nuke".into()), 400, "op"),
            (Box::new(|r| r.workspace = "../x".into()), 400, "workspace"),
            (Box::new(|r| r.pool = Some("".into())), 400, "pool"),
            (Box::new(|r| r.pool = Some("-x".into())), 400, "pool"),
            (
                Box::new(|r| r.pool = Some("_x".into())),
                400,
                "letter or digit",
            ),
            (Box::new(|r| r.archive_b64 = "%%%".into()), 400, "base64"),
            (
                Box::new(|r| r.archive_b64 = B64.encode(vec![0u8; 2000])),
                413,
                "max_archive_bytes",
            ),
            (
                Box::new(|r| {
                    r.vars.insert("1bad".into(), "x".into());
                }),
                400,
                "variable",
            ),
            (
                Box::new(|r| {
                    r.env.insert("API_TOKEN".into(), "x".into());
                }),
                400,
                "both",
            ),
            (
                Box::new(|r| r.var_files = vec!["/etc/passwd".into()]),
                400,
                "var file",
            ),
            (
                Box::new(|r| r.var_files = vec!["a/../../b".into()]),
                400,
                "var file",
            ),
            (
                Box::new(|r| r.timeout_secs = MAX_TIMEOUT_SECS + 1),
                400,
                "timeout",
            ),
            (
                Box::new(|r| {
                    r.secrets.0.insert("SHORT_ONE".into(), "s3c".into());
                }),
                400,
                "secret SHORT_ONE is shorter than 4 bytes",
            ),
            (
                // Over what the agent's redactor accepts, under the general value limit.
                Box::new(|r| {
                    r.secrets.0.insert("BIG_ONE".into(), "s3cr3t".repeat(2000));
                }),
                400,
                "secret BIG_ONE is 12000 bytes long; secrets may be at most 8192 bytes",
            ),
        ];
        for (edit, status, word) in cases {
            let mut r = req();
            edit(&mut r);
            let err = validate_submit(&r, 1000, "default").unwrap_err();
            assert_eq!(err.status, status, "{err}");
            assert!(err.message.contains(word), "{err}");
            assert!(!err.message.contains("s3cr3t"), "{err}");
            assert!(!err.message.contains("\"s3c\""), "{err}");
        }
    }

    #[test]
    fn secret_checks_and_merge() {
        assert!(check_secret("TOKEN", "abcd").is_ok());
        let err = check_secret("TOKEN", "abc").unwrap_err();
        assert!(err.message.contains("TOKEN"), "{err}");
        assert!(!err.message.contains("abc"), "{err}");
        assert!(check_secret("1BAD", "abcdef").is_err());
        assert!(check_secret("TOKEN", &"k".repeat(limits::MAX_SECRET_LEN)).is_ok());
        let err = check_secret("TOKEN", &"k".repeat(limits::MAX_SECRET_LEN + 1)).unwrap_err();
        assert!(err.message.contains("secret TOKEN"), "{err}");
        assert!(err.message.contains("8192"), "{err}");
        assert!(!err.message.contains("kkkk"), "{err}");
        let stored = Secrets(BTreeMap::from([(
            "OLD_BIG".to_string(),
            "k".repeat(limits::MAX_SECRET_LEN + 1),
        )]));
        let err = check_stored_secrets("w", &stored).unwrap_err();
        assert!(
            err.message.contains("workspace w's stored secret OLD_BIG"),
            "{err}"
        );
        assert!(!err.message.contains("kkkk"), "{err}");
        let ws = Secrets(BTreeMap::from([
            ("A".to_string(), "ws-a-value".to_string()),
            ("B".to_string(), "ws-b-value".to_string()),
            ("C".to_string(), "ws-c-value".to_string()),
        ]));
        let task = Secrets(BTreeMap::from([(
            "A".to_string(),
            "task-a-value".to_string(),
        )]));
        let env = BTreeMap::from([("C".to_string(), "plain".to_string())]);
        let merged = merge_secrets(ws, &task, &env);
        assert_eq!(merged.0["A"], "task-a-value", "the task's own secret wins");
        assert_eq!(merged.0["B"], "ws-b-value");
        assert!(!merged.0.contains_key("C"), "a task env of that name wins");
    }
}
