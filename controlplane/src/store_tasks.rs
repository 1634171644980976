//! Task rows and everything stored about a task: sequenced output (logs, events, artifact parts,
//! artifacts, done), state transitions and listing.
//!
//! Owns: the task queries of [`Store`]. Never stores secret values: only their names are kept,
//! in `TaskInputs::secret_names`. Log data, artifact parts and summaries (which carry tofu
//! outputs) are sealed ([`crate::at_rest`]) before they reach SQLite.

use crate::at_rest::AtRest;
use crate::seq::{classify, SeqDecision};
use crate::store::{Store, StoreError};
use delegate_protocol::{Op, Outcome, Summary};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Assigned,
    Running,
    Finished,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Finished => "finished",
        }
    }
    pub fn parse(s: &str) -> Option<TaskState> {
        Some(match s {
            "queued" => TaskState::Queued,
            "assigned" => TaskState::Assigned,
            "running" => TaskState::Running,
            "finished" => TaskState::Finished,
            _ => return None,
        })
    }
}

/// What the task runs with, apart from the archive. Secret values are never here.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskInputs {
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub var_files: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_secs: u64,
    /// Names of the secrets given at submit; the values live only in memory.
    #[serde(default)]
    pub secret_names: Vec<String>,
}

/// A blob in the blob store with its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub blob: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: Uuid,
    pub op: Op,
    pub workspace: String,
    pub pool: String,
    pub inputs: TaskInputs,
    pub archive: StoredBlob,
    /// For apply: the approved plan.
    pub plan: Option<StoredBlob>,
    /// For apply: the plan task it was approved from.
    pub parent: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: Uuid,
    pub op: Op,
    pub workspace: String,
    pub pool: String,
    pub state: TaskState,
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
    pub summary: Option<Summary>,
    pub agent: Option<String>,
    pub inputs: TaskInputs,
    pub archive: StoredBlob,
    pub plan: Option<StoredBlob>,
    pub parent: Option<Uuid>,
    pub approved_as: Option<Uuid>,
    pub acked_seq: u64,
    pub cancel_requested: bool,
    /// Set when something the agent sent was wrong (e.g. an artifact hash): `done` then ends
    /// the task failed with this reason whatever the agent reported.
    pub fail_reason: Option<String>,
    pub last_reject: Option<String>,
    pub created_at_ms: i64,
    pub assigned_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Set while the task's agent is silent past its lease (see `lease`).
    pub lease_expired_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub seq: u64,
    pub stream: String,
    pub at_ms: i64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: u64,
    pub at_ms: i64,
    /// The event as JSON (`EventKind`).
    pub event: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    pub kind: String,
    pub size: u64,
    pub sha256: String,
    pub blob: String,
    pub created_at_ms: i64,
}

const TASK_COLS: &str = "id, op, workspace, pool, state, outcome, reason, summary, agent, inputs,
    archive_blob, archive_size, archive_sha256, plan_blob, plan_size, plan_sha256, parent_task,
    approved_as, acked_seq, cancel_requested, fail_reason, last_reject, created_at_ms,
    assigned_at_ms, started_at_ms, finished_at_ms, lease_expired_at_ms";

fn corrupt(what: &str, id: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("tasks.{what} of {id} is invalid").into(),
    )
}

/// A task row as read, its summary still sealed.
struct RawTask {
    row: TaskRow,
    sealed_summary: Option<Vec<u8>>,
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<RawTask> {
    let id: String = r.get(0)?;
    let uuid = Uuid::parse_str(&id).map_err(|_| corrupt("id", &id))?;
    let op: String = r.get(1)?;
    let state: String = r.get(4)?;
    let outcome: Option<String> = r.get(5)?;
    let sealed_summary: Option<Vec<u8>> = match r.get_ref(7)? {
        rusqlite::types::ValueRef::Null => None,
        rusqlite::types::ValueRef::Blob(b) => Some(b.to_vec()),
        _ => return Err(corrupt("summary (not sealed)", &id)),
    };
    let inputs: String = r.get(9)?;
    let plan_blob: Option<String> = r.get(13)?;
    let parse_uuid = |v: Option<String>, what: &str| -> rusqlite::Result<Option<Uuid>> {
        v.map(|s| Uuid::parse_str(&s).map_err(|_| corrupt(what, &id)))
            .transpose()
    };
    let row = TaskRow {
        id: uuid,
        op: Op::parse(&op).ok_or_else(|| corrupt("op", &id))?,
        workspace: r.get(2)?,
        pool: r.get(3)?,
        state: TaskState::parse(&state).ok_or_else(|| corrupt("state", &id))?,
        outcome: outcome
            .map(|o| Outcome::parse(&o).ok_or_else(|| corrupt("outcome", &id)))
            .transpose()?,
        reason: r.get(6)?,
        summary: None,
        agent: r.get(8)?,
        inputs: serde_json::from_str(&inputs).map_err(|_| corrupt("inputs", &id))?,
        archive: StoredBlob {
            blob: r.get(10)?,
            size: r.get::<_, i64>(11)? as u64,
            sha256: r.get(12)?,
        },
        plan: match plan_blob {
            Some(blob) => Some(StoredBlob {
                blob,
                size: r.get::<_, Option<i64>>(14)?.unwrap_or(0) as u64,
                sha256: r.get::<_, Option<String>>(15)?.unwrap_or_default(),
            }),
            None => None,
        },
        parent: parse_uuid(r.get(16)?, "parent_task")?,
        approved_as: parse_uuid(r.get(17)?, "approved_as")?,
        acked_seq: r.get::<_, i64>(18)? as u64,
        cancel_requested: r.get::<_, i64>(19)? != 0,
        fail_reason: r.get(20)?,
        last_reject: r.get(21)?,
        created_at_ms: r.get(22)?,
        assigned_at_ms: r.get(23)?,
        started_at_ms: r.get(24)?,
        finished_at_ms: r.get(25)?,
        lease_expired_at_ms: r.get(26)?,
    };
    Ok(RawTask {
        row,
        sealed_summary,
    })
}

fn unseal_task(at_rest: &AtRest, raw: RawTask) -> Result<TaskRow, StoreError> {
    let RawTask {
        mut row,
        sealed_summary,
    } = raw;
    if let Some(sealed) = sealed_summary {
        let what = format!("summary of task {}", row.id);
        let json = at_rest.open(&what, &sealed)?;
        row.summary = Some(
            serde_json::from_slice(&json)
                .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?,
        );
    }
    Ok(row)
}

fn get_task(c: &Connection, at_rest: &AtRest, id: Uuid) -> Result<Option<TaskRow>, StoreError> {
    c.query_row(
        &format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"),
        [id.to_string()],
        task_from_row,
    )
    .optional()?
    .map(|raw| unseal_task(at_rest, raw))
    .transpose()
}

/// Finish a task inside a transaction (no-op if already finished). Returns whether it changed.
/// The summary is sealed (it holds tofu outputs).
pub fn finish_in(
    c: &Connection,
    at_rest: &AtRest,
    id: Uuid,
    outcome: Outcome,
    reason: Option<&str>,
    summary: Option<&Summary>,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let summary = summary
        .map(|s| at_rest.seal(&serde_json::to_vec(s).unwrap_or_default()))
        .transpose()?;
    let n = c.execute(
        "UPDATE tasks SET state = 'finished', outcome = ?2, reason = ?3, summary = ?4,
             finished_at_ms = ?5
         WHERE id = ?1 AND state != 'finished'",
        params![id.to_string(), outcome.as_str(), reason, summary, now_ms],
    )?;
    Ok(n == 1)
}

/// `data` must already be sealed (`Store::at_rest`).
pub fn insert_log(
    c: &Connection,
    id: Uuid,
    seq: u64,
    stream: &str,
    data: &[u8],
    now_ms: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO task_logs (task_id, seq, stream, at_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.to_string(), seq as i64, stream, now_ms, data],
    )?;
    Ok(())
}

pub fn insert_event(
    c: &Connection,
    id: Uuid,
    seq: u64,
    at_ms: i64,
    event_json: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO task_events (task_id, seq, at_ms, event) VALUES (?1, ?2, ?3, ?4)",
        params![id.to_string(), seq as i64, at_ms, event_json],
    )?;
    Ok(())
}

/// `data` must already be sealed (`Store::at_rest`).
pub fn insert_part(
    c: &Connection,
    id: Uuid,
    seq: u64,
    kind: &str,
    data: &[u8],
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO artifact_parts (task_id, seq, kind, data) VALUES (?1, ?2, ?3, ?4)",
        params![id.to_string(), seq as i64, kind, data],
    )?;
    Ok(())
}

/// Hand the stored parts of an artifact to `each`, in order, one at a time (opened: `each` gets
/// plaintext), then delete them. A part that fails to open stops it with an integrity error
/// naming the task, kind and sequence number.
pub fn drain_parts(
    c: &Connection,
    at_rest: &AtRest,
    id: Uuid,
    kind: &str,
    mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    {
        let mut stmt = c.prepare(
            "SELECT seq, data FROM artifact_parts WHERE task_id = ?1 AND kind = ?2 ORDER BY seq",
        )?;
        let mut rows = stmt.query(params![id.to_string(), kind])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let sealed = r.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            let what = format!("{kind} artifact part of task {id} seq {seq}");
            each(&at_rest.open(&what, sealed)?)?;
        }
    }
    c.execute(
        "DELETE FROM artifact_parts WHERE task_id = ?1 AND kind = ?2",
        params![id.to_string(), kind],
    )?;
    Ok(())
}

pub fn insert_artifact(
    c: &Connection,
    id: Uuid,
    kind: &str,
    blob: &StoredBlob,
    now_ms: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT OR REPLACE INTO artifacts (task_id, kind, size, sha256, blob, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            id.to_string(),
            kind,
            blob.size as i64,
            blob.sha256,
            blob.blob,
            now_ms
        ],
    )?;
    Ok(())
}

pub fn set_fail_reason(c: &Connection, id: Uuid, reason: &str) -> Result<(), StoreError> {
    c.execute(
        "UPDATE tasks SET fail_reason = COALESCE(fail_reason, ?2) WHERE id = ?1",
        params![id.to_string(), reason],
    )?;
    Ok(())
}

impl Store {
    pub fn insert_task(&self, t: &NewTask, now_ms: i64) -> Result<(), StoreError> {
        let inputs = serde_json::to_string(&t.inputs).unwrap_or_else(|_| "{}".into());
        self.db().execute(
            "INSERT INTO tasks (id, op, workspace, pool, state, inputs, archive_blob, archive_size,
                 archive_sha256, plan_blob, plan_size, plan_sha256, parent_task, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                t.id.to_string(),
                t.op.as_str(),
                t.workspace,
                t.pool,
                inputs,
                t.archive.blob,
                t.archive.size as i64,
                t.archive.sha256,
                t.plan.as_ref().map(|p| p.blob.clone()),
                t.plan.as_ref().map(|p| p.size as i64),
                t.plan.as_ref().map(|p| p.sha256.clone()),
                t.parent.map(|p| p.to_string()),
                now_ms
            ],
        )?;
        Ok(())
    }

    pub fn task(&self, id: Uuid) -> Result<Option<TaskRow>, StoreError> {
        get_task(&self.db(), &self.at_rest, id)
    }

    /// All tasks, newest first.
    pub fn tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks ORDER BY created_at_ms DESC, id"
            ))?
            .query_map([], task_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        drop(db);
        rows.into_iter()
            .map(|raw| unseal_task(&self.at_rest, raw))
            .collect()
    }

    /// Queued tasks, oldest first.
    pub fn queued_tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        self.tasks_where("state = 'queued'", [])
    }

    /// Tasks assigned to or running on `agent`.
    pub fn held_by(&self, agent: &str) -> Result<Vec<TaskRow>, StoreError> {
        self.tasks_where("agent = ?1 AND state IN ('assigned', 'running')", [agent])
    }

    /// Tasks assigned to or running on any agent (for the lease check).
    pub fn held_tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        self.tasks_where("agent IS NOT NULL AND state IN ('assigned', 'running')", [])
    }

    /// Mark a running task as past its agent's lease (`Some(now)`, only if not marked yet) or
    /// clear the mark (`None`). Returns whether it changed.
    pub fn set_lease_expired(&self, id: Uuid, at_ms: Option<i64>) -> Result<bool, StoreError> {
        let n = match at_ms {
            Some(at) => self.db().execute(
                "UPDATE tasks SET lease_expired_at_ms = ?2
                 WHERE id = ?1 AND state = 'running' AND lease_expired_at_ms IS NULL",
                params![id.to_string(), at],
            )?,
            None => self.db().execute(
                "UPDATE tasks SET lease_expired_at_ms = NULL
                 WHERE id = ?1 AND lease_expired_at_ms IS NOT NULL",
                [id.to_string()],
            )?,
        };
        Ok(n == 1)
    }

    /// Tasks not finished, oldest first.
    pub fn unfinished_tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        self.tasks_where("state != 'finished'", [])
    }

    fn tasks_where<P: rusqlite::Params>(
        &self,
        cond: &str,
        p: P,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE {cond} ORDER BY created_at_ms, id"
            ))?
            .query_map(p, task_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        drop(db);
        rows.into_iter()
            .map(|raw| unseal_task(&self.at_rest, raw))
            .collect()
    }

    pub fn task_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let db = self.db();
        let mut out = BTreeMap::new();
        for s in ["queued", "assigned", "running", "finished"] {
            out.insert(s.to_string(), 0);
        }
        let rows = db
            .prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        for (s, n) in rows {
            out.insert(s, n as u64);
        }
        Ok(out)
    }

    /// queued → assigned to `agent`. False if the task was not queued.
    pub fn mark_assigned(&self, id: Uuid, agent: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE tasks SET state = 'assigned', agent = ?2, assigned_at_ms = ?3
             WHERE id = ?1 AND state = 'queued'",
            params![id.to_string(), agent, now_ms],
        )?;
        Ok(n == 1)
    }

    /// assigned → running (the agent accepted, or said in Hello that it holds the task).
    pub fn mark_running(&self, id: Uuid, agent: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE tasks SET state = 'running', started_at_ms = COALESCE(started_at_ms, ?3)
             WHERE id = ?1 AND agent = ?2 AND state IN ('assigned', 'running')",
            params![id.to_string(), agent, now_ms],
        )?;
        Ok(n == 1)
    }

    /// assigned → queued again (rejected, or the assignment never reached the agent).
    pub fn requeue(&self, id: Uuid, reason: &str) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE tasks SET state = 'queued', agent = NULL, assigned_at_ms = NULL,
                 last_reject = ?2
             WHERE id = ?1 AND state = 'assigned'",
            params![id.to_string(), reason],
        )?;
        Ok(n == 1)
    }

    /// End a task (no-op if it already ended). Returns whether it changed.
    pub fn finish(
        &self,
        id: Uuid,
        outcome: Outcome,
        reason: Option<&str>,
        summary: Option<&Summary>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        finish_in(
            &self.db(),
            &self.at_rest,
            id,
            outcome,
            reason,
            summary,
            now_ms,
        )
    }

    pub fn set_cancel_requested(&self, id: Uuid) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE tasks SET cancel_requested = 1 WHERE id = ?1",
            [id.to_string()],
        )?;
        Ok(())
    }

    /// Record that plan task `plan` was approved as apply task `apply` (once only).
    pub fn set_approved_as(&self, plan: Uuid, apply: Uuid) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE tasks SET approved_as = ?2 WHERE id = ?1 AND approved_as IS NULL",
            params![plan.to_string(), apply.to_string()],
        )?;
        Ok(n == 1)
    }

    /// Apply one sequenced message for task `id`: if `seq` is the next expected one, run
    /// `write` and advance the acknowledged point, in one transaction.
    pub fn sequenced<F>(&self, id: Uuid, seq: u64, write: F) -> Result<SeqDecision, StoreError>
    where
        F: FnOnce(&Connection) -> Result<(), StoreError>,
    {
        let mut db = self.db();
        let tx = db.transaction()?;
        let acked: i64 = tx
            .query_row(
                "SELECT acked_seq FROM tasks WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::Corrupt(format!("task {id} does not exist")))?;
        let decision = classify(acked as u64, seq);
        if decision == SeqDecision::Store {
            write(&tx)?;
            tx.execute(
                "UPDATE tasks SET acked_seq = ?2 WHERE id = ?1",
                params![id.to_string(), seq as i64],
            )?;
            tx.commit()?;
        }
        Ok(decision)
    }

    /// Log rows after `after_seq`, at most `limit`.
    pub fn logs(&self, id: Uuid, after_seq: u64, limit: u32) -> Result<Vec<LogRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(
                "SELECT seq, stream, at_ms, data FROM task_logs
                 WHERE task_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?
            .query_map(params![id.to_string(), after_seq as i64, limit], |r| {
                Ok(LogRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    stream: r.get(1)?,
                    at_ms: r.get(2)?,
                    data: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(db);
        rows.into_iter()
            .map(|mut row| {
                let what = format!("log of task {id} seq {}", row.seq);
                row.data = self.at_rest.open(&what, &row.data)?;
                Ok(row)
            })
            .collect()
    }

    pub fn events(&self, id: Uuid) -> Result<Vec<EventRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare("SELECT seq, at_ms, event FROM task_events WHERE task_id = ?1 ORDER BY seq")?
            .query_map([id.to_string()], |r| {
                Ok(EventRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    at_ms: r.get(1)?,
                    event: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn artifacts(&self, id: Uuid) -> Result<Vec<ArtifactRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(
                "SELECT kind, size, sha256, blob, created_at_ms FROM artifacts
                 WHERE task_id = ?1 ORDER BY kind",
            )?
            .query_map([id.to_string()], |r| {
                Ok(ArtifactRow {
                    kind: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                    blob: r.get(3)?,
                    created_at_ms: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_task(id: u128, op: Op) -> NewTask {
        NewTask {
            id: Uuid::from_u128(id),
            op,
            workspace: "ws".into(),
            pool: "default".into(),
            inputs: TaskInputs {
                vars: BTreeMap::from([("a".into(), "1".into())]),
                secret_names: vec!["TOKEN".into()],
                ..Default::default()
            },
            archive: StoredBlob {
                blob: "b1".into(),
                size: 10,
                sha256: "0".repeat(64),
            },
            plan: None,
            parent: None,
        }
    }

    #[test]
    fn lifecycle_and_listing() {
        let s = Store::open_in_memory().unwrap();
        s.insert_task(&new_task(1, Op::Plan), 10).unwrap();
        s.insert_task(&new_task(2, Op::Validate), 20).unwrap();
        let q = s.queued_tasks().unwrap();
        assert_eq!(
            q.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![Uuid::from_u128(1), Uuid::from_u128(2)]
        );
        let id = Uuid::from_u128(1);
        assert!(s.mark_assigned(id, "a1", 30).unwrap());
        assert!(
            !s.mark_assigned(id, "a2", 31).unwrap(),
            "only a queued task can be assigned"
        );
        assert_eq!(s.held_by("a1").unwrap().len(), 1);
        assert!(s.requeue(id, "busy").unwrap());
        let t = s.task(id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Queued);
        assert_eq!(t.last_reject.as_deref(), Some("busy"));
        assert!(t.agent.is_none());
        assert!(s.mark_assigned(id, "a1", 40).unwrap());
        assert!(s.mark_running(id, "a1", 50).unwrap());
        assert!(
            !s.mark_running(id, "a2", 50).unwrap(),
            "another agent cannot claim it"
        );
        let summary = Summary {
            add: 2,
            ..Default::default()
        };
        assert!(s
            .finish(id, Outcome::Succeeded, None, Some(&summary), 60)
            .unwrap());
        assert!(!s
            .finish(id, Outcome::Failed, Some("late"), None, 70)
            .unwrap());
        let t = s.task(id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Finished);
        assert_eq!(t.outcome, Some(Outcome::Succeeded));
        assert_eq!(t.summary, Some(summary));
        assert_eq!(t.inputs.secret_names, vec!["TOKEN".to_string()]);
        assert_eq!(t.started_at_ms, Some(50));
        assert_eq!(t.finished_at_ms, Some(60));
        let counts = s.task_counts().unwrap();
        assert_eq!(counts["finished"], 1);
        assert_eq!(counts["queued"], 1);
    }

    #[test]
    fn sequenced_stores_once_in_order() {
        let s = Store::open_in_memory().unwrap();
        let id = Uuid::from_u128(1);
        s.insert_task(&new_task(1, Op::Plan), 10).unwrap();
        let log = |seq: u64, text: &'static str| {
            let sealed = s.at_rest().seal(text.as_bytes()).unwrap();
            s.sequenced(id, seq, |c| insert_log(c, id, seq, "stdout", &sealed, 1))
        };
        assert_eq!(log(1, "a").unwrap(), SeqDecision::Store);
        assert_eq!(log(2, "b").unwrap(), SeqDecision::Store);
        assert_eq!(log(2, "b").unwrap(), SeqDecision::Duplicate { acked: 2 });
        assert_eq!(log(4, "d").unwrap(), SeqDecision::Gap { expected: 3 });
        assert_eq!(log(3, "c").unwrap(), SeqDecision::Store);
        let logs = s.logs(id, 0, 100).unwrap();
        let text: Vec<u8> = logs.iter().flat_map(|l| l.data.clone()).collect();
        assert_eq!(text, b"abc");
        assert_eq!(s.logs(id, 2, 100).unwrap().len(), 1);
        assert_eq!(s.task(id).unwrap().unwrap().acked_seq, 3);
        // A failing write stores nothing and does not advance.
        let r = s.sequenced(id, 4, |_| Err(StoreError::Corrupt("boom".into())));
        assert!(r.is_err());
        assert_eq!(s.task(id).unwrap().unwrap().acked_seq, 3);
    }

    #[test]
    fn artifact_parts_assemble_in_order() {
        let s = Store::open_in_memory().unwrap();
        let id = Uuid::from_u128(1);
        s.insert_task(&new_task(1, Op::Plan), 10).unwrap();
        let seal = |b: &[u8]| s.at_rest().seal(b).unwrap();
        s.sequenced(id, 1, |c| insert_part(c, id, 1, "plan", &seal(b"ab")))
            .unwrap();
        s.sequenced(id, 2, |c| insert_event(c, id, 2, 5, "{}"))
            .unwrap();
        s.sequenced(id, 3, |c| insert_part(c, id, 3, "plan", &seal(b"cd")))
            .unwrap();
        s.sequenced(id, 4, |c| {
            let mut joined = Vec::new();
            drain_parts(c, s.at_rest(), id, "plan", |p| {
                joined.extend_from_slice(p);
                Ok(())
            })?;
            assert_eq!(joined, b"abcd");
            insert_artifact(
                c,
                id,
                "plan",
                &StoredBlob {
                    blob: "x".into(),
                    size: 4,
                    sha256: "1".repeat(64),
                },
                9,
            )
        })
        .unwrap();
        let a = s.artifacts(id).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].size, 4);
        assert_eq!(s.events(id).unwrap().len(), 1);
    }
}
