//! State versions and the lock per workspace (the default `http` backend's storage).
//!
//! Owns: the state queries of [`Store`]; lock checks and the writes they guard happen in one
//! transaction. State bytes themselves live in the blob store (sealed there).

use crate::lock::{self, Decision, Held};
use crate::store::{Store, StoreError};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateVersionRow {
    pub workspace: String,
    pub version: u64,
    /// tofu's own `serial` from the state JSON, when present.
    pub serial: Option<i64>,
    pub lineage: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub blob: String,
    /// The task that wrote it (None: pushed through the admin API).
    pub task_id: Option<String>,
    pub created_at_ms: i64,
}

/// A version about to be recorded (its blob is already written).
#[derive(Debug, Clone)]
pub struct NewStateVersion {
    pub serial: Option<i64>,
    pub lineage: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub blob: String,
    pub task_id: Option<String>,
}

const COLS: &str =
    "workspace, version, serial, lineage, size, sha256, blob, task_id, created_at_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StateVersionRow> {
    Ok(StateVersionRow {
        workspace: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        serial: r.get(2)?,
        lineage: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        sha256: r.get(5)?,
        blob: r.get(6)?,
        task_id: r.get(7)?,
        created_at_ms: r.get(8)?,
    })
}

fn held(c: &Connection, ws: &str) -> Result<Option<Held>, StoreError> {
    Ok(c.query_row(
        "SELECT lock_id, info FROM state_locks WHERE workspace = ?1",
        [ws],
        |r| {
            Ok(Held {
                lock_id: r.get(0)?,
                info: r.get(1)?,
            })
        },
    )
    .optional()?)
}

impl Store {
    pub fn state_versions(&self, ws: &str) -> Result<Vec<StateVersionRow>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(&format!(
                "SELECT {COLS} FROM state_versions WHERE workspace = ?1 ORDER BY version"
            ))?
            .query_map([ws], row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn state_version(
        &self,
        ws: &str,
        version: u64,
    ) -> Result<Option<StateVersionRow>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!("SELECT {COLS} FROM state_versions WHERE workspace = ?1 AND version = ?2"),
                params![ws, version as i64],
                row,
            )
            .optional()?)
    }

    pub fn state_latest(&self, ws: &str) -> Result<Option<StateVersionRow>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!(
                    "SELECT {COLS} FROM state_versions WHERE workspace = ?1
                     ORDER BY version DESC LIMIT 1"
                ),
                [ws],
                row,
            )
            .optional()?)
    }

    pub fn state_lock(&self, ws: &str) -> Result<Option<Held>, StoreError> {
        held(&self.db(), ws)
    }

    /// Record a new version if the lock allows a write with `lock_id` (or `force`). Returns the
    /// new version number, or the refusal.
    pub fn state_write(
        &self,
        ws: &str,
        lock_id: Option<&str>,
        force: bool,
        new: &NewStateVersion,
        now_ms: i64,
    ) -> Result<Result<u64, Decision>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let decision = lock::write(held(&tx, ws)?.as_ref(), lock_id);
        if !force {
            if let Decision::Refuse { .. } = decision {
                return Ok(Err(decision));
            }
        }
        let next: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM state_versions WHERE workspace = ?1",
            [ws],
            |r| r.get(0),
        )?;
        tx.execute(
            &format!(
                "INSERT INTO state_versions ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                ws,
                next,
                new.serial,
                new.lineage,
                new.size as i64,
                new.sha256,
                new.blob,
                new.task_id,
                now_ms
            ],
        )?;
        tx.commit()?;
        Ok(Ok(next as u64))
    }

    /// LOCK: take the lock if free. Returns the decision (Acquire/Allow succeeded).
    pub fn state_lock_acquire(
        &self,
        ws: &str,
        id: &str,
        info: &str,
        task_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Decision, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let decision = lock::lock(held(&tx, ws)?.as_ref(), id);
        if decision == Decision::Acquire {
            tx.execute(
                "INSERT INTO state_locks (workspace, lock_id, info, task_id, locked_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![ws, id, info, task_id, now_ms],
            )?;
            tx.commit()?;
        }
        Ok(decision)
    }

    /// UNLOCK with `id` (None only releases a free workspace). `force` releases any lock.
    pub fn state_unlock(
        &self,
        ws: &str,
        id: Option<&str>,
        force: bool,
    ) -> Result<Decision, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let current = held(&tx, ws)?;
        let decision = if force && current.is_some() {
            Decision::Release
        } else {
            lock::unlock(current.as_ref(), id)
        };
        if decision == Decision::Release {
            tx.execute("DELETE FROM state_locks WHERE workspace = ?1", [ws])?;
            tx.commit()?;
        }
        Ok(decision)
    }

    /// The id of the lock `task_id` holds on `ws`, if it holds it.
    pub fn lock_held_by_task(&self, ws: &str, task_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT lock_id FROM state_locks WHERE workspace = ?1 AND task_id = ?2",
                [ws, task_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The locks a task holds: (workspace, lock id).
    pub fn locks_of_task(&self, task_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT workspace, lock_id FROM state_locks WHERE task_id = ?1")?;
        let rows = stmt
            .query_map([task_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Release every lock a task still holds (it ended without unlocking: killed, timed out,
    /// lost). Returns the workspaces and the lock ids released.
    pub fn release_task_locks(&self, task_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let held = tx
            .prepare("SELECT workspace, lock_id FROM state_locks WHERE task_id = ?1")?
            .query_map([task_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute("DELETE FROM state_locks WHERE task_id = ?1", [task_id])?;
        tx.commit()?;
        Ok(held)
    }

    /// DELETE: forget every version of the workspace's state. Returns their blob ids.
    pub fn state_delete(
        &self,
        ws: &str,
        lock_id: Option<&str>,
    ) -> Result<Result<Vec<String>, Decision>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let decision = lock::write(held(&tx, ws)?.as_ref(), lock_id);
        if let Decision::Refuse { .. } = decision {
            return Ok(Err(decision));
        }
        let blobs = tx
            .prepare("SELECT blob FROM state_versions WHERE workspace = ?1")?
            .query_map([ws], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute("DELETE FROM state_versions WHERE workspace = ?1", [ws])?;
        tx.commit()?;
        Ok(Ok(blobs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(blob: &str) -> NewStateVersion {
        NewStateVersion {
            serial: Some(1),
            lineage: Some("l".into()),
            size: 2,
            sha256: "0".repeat(64),
            blob: blob.into(),
            task_id: None,
        }
    }

    #[test]
    fn versions_and_locks() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.state_latest("w").unwrap().is_none());
        assert_eq!(s.state_write("w", None, false, &v("b1"), 1).unwrap(), Ok(1));
        assert_eq!(s.state_write("w", None, false, &v("b2"), 2).unwrap(), Ok(2));
        assert_eq!(
            s.state_write("other", None, false, &v("b3"), 2).unwrap(),
            Ok(1)
        );
        assert_eq!(s.state_latest("w").unwrap().unwrap().blob, "b2");
        assert_eq!(s.state_version("w", 1).unwrap().unwrap().blob, "b1");
        assert_eq!(s.state_versions("w").unwrap().len(), 2);

        let info = r#"{"ID":"L1"}"#;
        assert_eq!(
            s.state_lock_acquire("w", "L1", info, None, 3).unwrap(),
            Decision::Acquire
        );
        assert!(matches!(
            s.state_lock_acquire("w", "L2", "{}", None, 3).unwrap(),
            Decision::Refuse { status: 423, ref holder } if holder == info
        ));
        assert!(s
            .state_write("w", Some("L2"), false, &v("x"), 4)
            .unwrap()
            .is_err());
        assert!(s
            .state_write("w", None, false, &v("x"), 4)
            .unwrap()
            .is_err());
        assert_eq!(
            s.state_write("w", Some("L1"), false, &v("b4"), 4).unwrap(),
            Ok(3)
        );
        assert_eq!(
            s.state_write("w", None, true, &v("b5"), 4).unwrap(),
            Ok(4),
            "forced"
        );
        assert!(matches!(
            s.state_unlock("w", Some("L2"), false).unwrap(),
            Decision::Refuse { status: 409, .. }
        ));
        assert_eq!(
            s.state_unlock("w", Some("L1"), false).unwrap(),
            Decision::Release
        );
        assert!(s.state_lock("w").unwrap().is_none());
        // Another workspace's lock is independent.
        assert_eq!(
            s.state_lock_acquire("other", "L9", "{}", None, 5).unwrap(),
            Decision::Acquire
        );
        assert_eq!(
            s.state_lock_acquire("w", "L2", "{}", None, 5).unwrap(),
            Decision::Acquire
        );
        assert!(s.state_delete("w", Some("L9")).unwrap().is_err());
        // A task that ends holding a lock gives it up.
        assert_eq!(
            s.state_lock_acquire("third", "L7", "{}", Some("t7"), 6)
                .unwrap(),
            Decision::Acquire
        );
        assert_eq!(
            s.release_task_locks("t7").unwrap(),
            vec![("third".to_string(), "L7".to_string())]
        );
        assert!(s.state_lock("third").unwrap().is_none());
        assert!(s.state_lock("w").unwrap().is_some(), "other locks stay");
        assert_eq!(s.state_delete("w", Some("L2")).unwrap().unwrap().len(), 4);
        assert!(s.state_latest("w").unwrap().is_none());
    }
}
