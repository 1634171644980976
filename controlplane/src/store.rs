//! The control plane's database: SQLite (rusqlite, bundled) in `DIR/cp.db`, WAL mode, versioned
//! migrations recorded in `schema_migrations`.
//!
//! Owns: the schema and every query. Callers get plain row structs. Bytes that describe a task's
//! content (log data) pass through [`AtRest`] here; large blobs live in the `BlobStore`.
//! Never holds a secret in the clear: task secrets stay in the control plane's memory (`hub`),
//! only their names are stored; workspace secrets are sealed (`store_secrets`).

use crate::at_rest::{AtRest, AtRestError};
use crate::audit::{chain_hash, AuditEntry, AuditRecord, GENESIS};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;

/// Errors from the store. `Sqlite` with a busy/locked code is retryable; the others are not.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database content is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    AtRest(#[from] AtRestError),
    #[error("database schema version {found} is newer than this build knows ({known})")]
    TooNew { found: i64, known: i64 },
}

/// Schema migrations, applied in order; index + 1 is the version. Never edit a shipped entry:
/// append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: agents, their connection history, the audit trail.
    r#"
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        pool TEXT NOT NULL,
        labels TEXT NOT NULL,
        version TEXT NOT NULL,
        slots INTEGER NOT NULL,
        state TEXT NOT NULL,
        last_heartbeat_ms INTEGER,
        connected_at_ms INTEGER,
        first_seen_ms INTEGER NOT NULL
    );
    CREATE TABLE connections (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        peer TEXT NOT NULL,
        connected_at_ms INTEGER NOT NULL,
        disconnected_at_ms INTEGER,
        reason TEXT
    );
    CREATE INDEX connections_agent ON connections(agent);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        who TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_target ON audit(target);
    "#,
    // 2: tasks, their sequenced output, artifacts.
    r#"
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        op TEXT NOT NULL,
        workspace TEXT NOT NULL,
        pool TEXT NOT NULL,
        state TEXT NOT NULL,
        outcome TEXT,
        reason TEXT,
        summary TEXT,
        agent TEXT,
        inputs TEXT NOT NULL,
        archive_blob TEXT NOT NULL,
        archive_size INTEGER NOT NULL,
        archive_sha256 TEXT NOT NULL,
        plan_blob TEXT,
        plan_size INTEGER,
        plan_sha256 TEXT,
        parent_task TEXT,
        approved_as TEXT,
        acked_seq INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        fail_reason TEXT,
        last_reject TEXT,
        created_at_ms INTEGER NOT NULL,
        assigned_at_ms INTEGER,
        started_at_ms INTEGER,
        finished_at_ms INTEGER
    );
    CREATE INDEX tasks_state ON tasks(state, created_at_ms);
    CREATE INDEX tasks_agent ON tasks(agent, state);
    CREATE TABLE task_logs (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE task_events (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        event TEXT NOT NULL,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE artifact_parts (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE artifacts (
        task_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        blob TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (task_id, kind)
    );
    "#,
    // 3: state versions and locks per workspace (the default http backend).
    r#"
    CREATE TABLE state_versions (
        workspace TEXT NOT NULL,
        version INTEGER NOT NULL,
        serial INTEGER,
        lineage TEXT,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        blob TEXT NOT NULL,
        task_id TEXT,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, version)
    );
    CREATE TABLE state_locks (
        workspace TEXT PRIMARY KEY,
        lock_id TEXT NOT NULL,
        info TEXT NOT NULL,
        task_id TEXT,
        locked_at_ms INTEGER NOT NULL
    );
    "#,
    // 4: workspace secrets (values sealed, see `store_secrets`); lease mark of running tasks.
    r#"
    CREATE TABLE workspace_secrets (
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        value BLOB NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, name)
    );
    ALTER TABLE tasks ADD COLUMN lease_expired_at_ms INTEGER;
    "#,
    // 5: enrollment: bootstrap tokens (hash only), agent identities (enrolled/revoked names),
    // certificates issued by enrollment and renewal.
    r#"
    CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        pool TEXT NOT NULL,
        name_prefix TEXT,
        uses INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER,
        last_used_at_ms INTEGER
    );
    CREATE TABLE agent_identities (
        name TEXT PRIMARY KEY,
        pool TEXT,
        enrollment TEXT,
        token_id TEXT,
        enrolled_at_ms INTEGER,
        revoked_at_ms INTEGER,
        revoked_reason TEXT
    );
    CREATE TABLE agent_certs (
        serial TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        enrollment TEXT,
        kind TEXT NOT NULL,
        issued_at_ms INTEGER NOT NULL,
        not_after_ms INTEGER NOT NULL
    );
    CREATE INDEX agent_certs_name ON agent_certs(name);
    "#,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRow {
    pub name: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub slots: u32,
    /// `connected` or `disconnected`.
    pub state: String,
    pub last_heartbeat_ms: Option<i64>,
    pub connected_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRow {
    pub id: i64,
    pub agent: String,
    pub peer: String,
    pub connected_at_ms: i64,
    pub disconnected_at_ms: Option<i64>,
    pub reason: Option<String>,
}

/// What an agent told us in Hello, recorded on connect.
#[derive(Debug, Clone)]
pub struct AgentHello<'a> {
    pub name: &'a str,
    pub pool: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub version: &'a str,
    pub slots: u32,
    pub peer: &'a str,
}

pub struct Store {
    conn: Mutex<Connection>,
    pub(crate) at_rest: AtRest,
}

impl Store {
    /// Open (creating if needed) the database file and bring its schema up to date.
    pub fn open(path: &Path, at_rest: AtRest) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        Self::setup(conn, at_rest)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::setup(Connection::open_in_memory()?, AtRest::default())
    }

    fn setup(conn: Connection, at_rest: AtRest) -> Result<Store, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            at_rest,
        })
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seal/open for bytes kept in the database (log data, artifact parts).
    pub fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(current_version(&self.db())?)
    }

    // ---- agents ----

    /// Record a connection: the agent row (created on first sight) becomes connected.
    pub fn agent_connected(&self, h: &AgentHello<'_>, now_ms: i64) -> Result<i64, StoreError> {
        let labels = serde_json::to_string(h.labels).unwrap_or_else(|_| "{}".into());
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO agents (name, pool, labels, version, slots, state, last_heartbeat_ms,
                                 connected_at_ms, first_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'connected', ?6, ?6, ?6)
             ON CONFLICT(name) DO UPDATE SET pool = ?2, labels = ?3, version = ?4, slots = ?5,
                 state = 'connected', last_heartbeat_ms = ?6, connected_at_ms = ?6",
            params![h.name, h.pool, labels, h.version, h.slots, now_ms],
        )?;
        tx.execute(
            "INSERT INTO connections (agent, peer, connected_at_ms) VALUES (?1, ?2, ?3)",
            params![h.name, h.peer, now_ms],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    pub fn agent_heartbeat(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE agents SET last_heartbeat_ms = ?2 WHERE name = ?1",
            params![name, now_ms],
        )?;
        Ok(())
    }

    /// Close connection `conn_id`; the agent becomes disconnected unless `still_connected`
    /// (a newer connection replaced this one).
    pub fn agent_disconnected(
        &self,
        name: &str,
        conn_id: i64,
        reason: &str,
        still_connected: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE connections SET disconnected_at_ms = ?2, reason = ?3
             WHERE id = ?1 AND disconnected_at_ms IS NULL",
            params![conn_id, now_ms, reason],
        )?;
        if !still_connected {
            tx.execute(
                "UPDATE agents SET state = 'disconnected', connected_at_ms = NULL WHERE name = ?1",
                params![name],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// At start and at shutdown: nobody is connected.
    pub fn all_disconnected(&self, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE connections SET disconnected_at_ms = ?1, reason = ?2
             WHERE disconnected_at_ms IS NULL",
            params![now_ms, reason],
        )?;
        tx.execute(
            "UPDATE agents SET state = 'disconnected', connected_at_ms = NULL",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT name, pool, labels, version, slots, state, last_heartbeat_ms, connected_at_ms
             FROM agents ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, pool, labels, version, slots, state, hb, conn) = row?;
            let labels = serde_json::from_str(&labels)
                .map_err(|e| StoreError::Corrupt(format!("agents.labels of {name}: {e}")))?;
            out.push(AgentRow {
                name,
                pool,
                labels,
                version,
                slots,
                state,
                last_heartbeat_ms: hb,
                connected_at_ms: conn,
            });
        }
        Ok(out)
    }

    pub fn connections(&self, agent: &str) -> Result<Vec<ConnectionRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT id, agent, peer, connected_at_ms, disconnected_at_ms, reason
             FROM connections WHERE agent = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([agent], |r| {
            Ok(ConnectionRow {
                id: r.get(0)?,
                agent: r.get(1)?,
                peer: r.get(2)?,
                connected_at_ms: r.get(3)?,
                disconnected_at_ms: r.get(4)?,
                reason: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- audit ----

    /// Append a record to the hash chain.
    pub fn audit(&self, entry: &AuditEntry, now_ms: i64) -> Result<AuditRecord, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let record = audit_in(&tx, entry, now_ms)?;
        tx.commit()?;
        Ok(record)
    }

    /// Audit records in order; with `target`, only those about it.
    pub fn audit_records(&self, target: Option<&str>) -> Result<Vec<AuditRecord>, StoreError> {
        let db = self.db();
        let map = |r: &rusqlite::Row<'_>| {
            Ok(AuditRecord {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                who: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: r.get(5)?,
                prev_hash: r.get(6)?,
                hash: r.get(7)?,
            })
        };
        let cols = "SELECT id, at_ms, who, action, target, detail, prev_hash, hash FROM audit";
        let out = match target {
            Some(t) => db
                .prepare(&format!("{cols} WHERE target = ?1 ORDER BY id"))?
                .query_map([t], map)?
                .collect::<Result<Vec<_>, _>>()?,
            None => db
                .prepare(&format!("{cols} ORDER BY id"))?
                .query_map([], map)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(out)
    }
}

/// Append an audit record inside the caller's transaction (so a record and the change it
/// describes are stored together).
pub(crate) fn audit_in(
    tx: &Connection,
    entry: &AuditEntry,
    now_ms: i64,
) -> Result<AuditRecord, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, GENESIS.to_string()),
    };
    let hash = chain_hash(&prev, id, now_ms, entry);
    tx.execute(
        "INSERT INTO audit (id, at_ms, who, action, target, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            id,
            now_ms,
            entry.who,
            entry.action,
            entry.target,
            entry.detail,
            prev,
            hash
        ],
    )?;
    Ok(AuditRecord {
        id,
        at_ms: now_ms,
        who: entry.who.clone(),
        action: entry.action.clone(),
        target: entry.target.clone(),
        detail: entry.detail.clone(),
        prev_hash: prev,
        hash,
    })
}

fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at_ms INTEGER NOT NULL
         );",
    )?;
    let current = current_version(conn)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN;\n{sql}\nINSERT INTO schema_migrations (version, applied_at_ms) VALUES ({version}, {});\nCOMMIT;",
            crate::now_ms()
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK;");
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify_chain;

    fn hello<'a>(name: &'a str, labels: &'a BTreeMap<String, String>) -> AgentHello<'a> {
        AgentHello {
            name,
            pool: "default",
            labels,
            version: "0.1.0",
            slots: 2,
            peer: "127.0.0.1:5000",
        }
    }

    #[test]
    fn migrations_are_idempotent_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        let s = Store::open(&path, AtRest::default()).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(s);
        let s = Store::open(&path, AtRest::default()).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        drop(Store::open(&path, AtRest::default()).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute("INSERT INTO schema_migrations VALUES (999, 0)", [])
            .unwrap();
        drop(c);
        assert!(matches!(
            Store::open(&path, AtRest::default()),
            Err(StoreError::TooNew { found: 999, .. })
        ));
    }

    #[test]
    fn agent_lifecycle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        let labels = BTreeMap::from([("os".to_string(), "linux".to_string())]);
        let s = Store::open(&path, AtRest::default()).unwrap();
        let c1 = s.agent_connected(&hello("a1", &labels), 100).unwrap();
        s.agent_heartbeat("a1", 150).unwrap();
        let a = &s.agents().unwrap()[0];
        assert_eq!(a.state, "connected");
        assert_eq!(a.last_heartbeat_ms, Some(150));
        assert_eq!(a.labels, labels);
        // A replacing connection keeps the agent connected when the old one closes.
        let c2 = s.agent_connected(&hello("a1", &labels), 200).unwrap();
        s.agent_disconnected("a1", c1, "replaced", true, 210)
            .unwrap();
        assert_eq!(s.agents().unwrap()[0].state, "connected");
        s.agent_disconnected("a1", c2, "heartbeat timeout", false, 300)
            .unwrap();
        drop(s);
        let s = Store::open(&path, AtRest::default()).unwrap();
        let a = &s.agents().unwrap()[0];
        assert_eq!(a.state, "disconnected");
        let conns = s.connections("a1").unwrap();
        assert_eq!(conns.len(), 2);
        assert_eq!(conns[1].reason.as_deref(), Some("heartbeat timeout"));
    }

    #[test]
    fn audit_chain_and_filter() {
        let s = Store::open_in_memory().unwrap();
        s.audit(&AuditEntry::new("a1", "agent.connected", "a1", "peer x"), 1)
            .unwrap();
        s.audit(&AuditEntry::new("api", "task.submitted", "t1", ""), 2)
            .unwrap();
        s.audit(&AuditEntry::new("a1", "task.accepted", "t1", ""), 3)
            .unwrap();
        let all = s.audit_records(None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(verify_chain(&all), Ok(()));
        assert_eq!(s.audit_records(Some("t1")).unwrap().len(), 2);
    }
}
