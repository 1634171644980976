//! At-rest key management: `keys rotate` (a new current key; old data stays readable) and
//! `keys reseal` (re-encrypt every sealed blob file and database value under the current key),
//! both audited (`keys.rotated`, `keys.resealed`).
//!
//! A running control plane does both itself (through the API, so its key ring in memory and the
//! files never disagree); when it is not running the CLI opens the data directory directly
//! ([`Offline`]).
//!
//! Owns: the list of sealed database columns and walking them. Never logs or returns key bytes,
//! plaintext or secret values; a value that fails to open is reported by what it is ("log of
//! task … seq 4") and left as it was.

use crate::at_rest::{AtRest, AtRestError, BlobStore, Rotated};
use crate::audit::AuditEntry;
use crate::config::DataDir;
use crate::store::{Store, StoreError};
use delegate_crypto::Reseal;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of key operations. `AtRest` with an I/O cause may be retryable; the rest need a fix.
#[derive(Debug, Error)]
pub enum KeysError {
    #[error(
        "{0} is not a control plane data directory (run `delegate-cp init --data-dir {0}` first)"
    )]
    NotInitialised(String),
    #[error(transparent)]
    AtRest(#[from] AtRestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A column holding sealed values, and an SQL expression naming each row for messages.
struct SealedColumn {
    table: &'static str,
    column: &'static str,
    what: &'static str,
}

/// Every database column that holds sealed values. A new sealed column must be listed here, or
/// `keys reseal` would leave it under an old key.
const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        table: "task_logs",
        column: "data",
        what: "'log of task ' || task_id || ' seq ' || seq",
    },
    SealedColumn {
        table: "artifact_parts",
        column: "data",
        what: "kind || ' artifact part of task ' || task_id || ' seq ' || seq",
    },
    SealedColumn {
        table: "tasks",
        column: "summary",
        what: "'summary of task ' || id",
    },
    SealedColumn {
        table: "workspace_secrets",
        column: "value",
        what: "'secret ' || name || ' of workspace ' || workspace",
    },
];

/// Rows re-sealed per database transaction (keeps the database lock short).
const BATCH: i64 = 64;

/// What `keys reseal` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResealReport {
    /// The key everything is now sealed under.
    pub key_id: String,
    pub blobs_resealed: u64,
    pub blobs_already_current: u64,
    pub values_resealed: u64,
    pub values_already_current: u64,
    /// What could not be re-sealed and why (integrity failures name the task, artifact or state
    /// version). Those items are left as they were.
    pub failures: Vec<String>,
}

/// What `keys rotate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateReport {
    /// The new current key id.
    pub key_id: String,
    pub previous: String,
}

/// Make a new key current, reload the ring, audit `keys.rotated`.
pub fn rotate(store: &Store, at_rest: &AtRest, who: &str) -> Result<RotateReport, KeysError> {
    let Rotated { from, to } = at_rest.rotate()?;
    store.audit(
        &AuditEntry::new(
            who,
            "keys.rotated",
            "keys",
            format!(
                "new current key {to} (previous {from}); data sealed under {from} stays readable"
            ),
        ),
        crate::now_ms(),
    )?;
    tracing::info!(key = %to, previous = %from, "at-rest key rotated");
    Ok(RotateReport {
        key_id: to,
        previous: from,
    })
}

/// Re-seal every blob file and sealed database value under the current key; audit
/// `keys.resealed`. Blocking (file and database I/O): run it off the async threads.
pub fn reseal(store: &Store, blobs: &BlobStore, who: &str) -> Result<ResealReport, KeysError> {
    let mut report = ResealReport {
        key_id: blobs.at_rest().current_key_id(),
        ..Default::default()
    };
    for id in blobs.ids()? {
        // The owner only names a failure: it is an unindexed search over four tables.
        let what = || blob_owner(store, &id).unwrap_or_else(|| "unreferenced blob".to_string());
        match blobs.reseal(what, &id) {
            Ok(Reseal::Resealed { .. }) => report.blobs_resealed += 1,
            Ok(Reseal::AlreadyCurrent { .. }) => report.blobs_already_current += 1,
            // Deleted meanwhile (a state DELETE): nothing left to re-seal.
            Err(AtRestError::Crypto { source, .. })
                if matches!(&source, delegate_crypto::CryptoError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound) => {}
            Err(e) => report.failures.push(e.to_string()),
        }
    }
    for col in SEALED_COLUMNS {
        reseal_column(store, col, &mut report)?;
    }
    let detail = format!(
        "under key {}: {} blobs and {} database values re-sealed, {} and {} already current, {} failures",
        report.key_id,
        report.blobs_resealed,
        report.values_resealed,
        report.blobs_already_current,
        report.values_already_current,
        report.failures.len()
    );
    store.audit(
        &AuditEntry::new(who, "keys.resealed", "keys", detail.clone()),
        crate::now_ms(),
    )?;
    tracing::info!("keys resealed {detail}");
    for f in &report.failures {
        tracing::error!("cannot re-seal: {f}");
    }
    Ok(report)
}

fn reseal_column(
    store: &Store,
    col: &SealedColumn,
    report: &mut ResealReport,
) -> Result<(), KeysError> {
    let at_rest = store.at_rest().clone();
    let current = at_rest.current_key_id();
    let select = format!(
        "SELECT rowid, {c}, {w} FROM {t} WHERE {c} IS NOT NULL AND rowid > ?1 ORDER BY rowid LIMIT {BATCH}",
        c = col.column,
        w = col.what,
        t = col.table
    );
    let update = format!(
        "UPDATE {t} SET {c} = ?2 WHERE rowid = ?1 AND {c} = ?3",
        c = col.column,
        t = col.table
    );
    let mut after = 0i64;
    loop {
        let mut db = store.db();
        let tx = db.transaction().map_err(StoreError::from)?;
        let rows: Vec<(i64, Vec<u8>, String)> = tx
            .prepare(&select)
            .and_then(|mut s| {
                s.query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(StoreError::from)?;
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(());
        };
        for (rowid, sealed, what) in rows {
            match at_rest.key_id_of(&what, &sealed) {
                Ok(id) if id == current => {
                    report.values_already_current += 1;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    report.failures.push(e.to_string());
                    continue;
                }
            }
            let plain = match at_rest.open(&what, &sealed) {
                Ok(p) => zeroize::Zeroizing::new(p),
                Err(e) => {
                    report.failures.push(e.to_string());
                    continue;
                }
            };
            let resealed = at_rest.seal(&plain)?;
            tx.execute(&update, params![rowid, resealed, sealed])
                .map_err(StoreError::from)?;
            report.values_resealed += 1;
        }
        tx.commit().map_err(StoreError::from)?;
        after = last;
    }
}

/// What a blob is, for messages: the task, artifact or state version that refers to it.
pub fn blob_owner(store: &Store, blob: &str) -> Option<String> {
    store
        .db()
        .query_row(
            "SELECT 'workspace archive of task ' || id FROM tasks WHERE archive_blob = ?1
             UNION ALL SELECT 'approved plan of task ' || id FROM tasks WHERE plan_blob = ?1
             UNION ALL SELECT kind || ' artifact of task ' || task_id FROM artifacts WHERE blob = ?1
             UNION ALL SELECT 'state version ' || version || ' of workspace ' || workspace
                 FROM state_versions WHERE blob = ?1
             LIMIT 1",
            [blob],
            |r| r.get(0),
        )
        .optional()
        .ok()
        .flatten()
}

/// The data directory opened without a running control plane (for `keys` commands when `serve`
/// is not running).
pub struct Offline {
    pub store: Store,
    pub blobs: BlobStore,
    pub at_rest: AtRest,
}

impl Offline {
    pub fn open(dd: &DataDir, env_key: Option<&str>) -> Result<Offline, KeysError> {
        if !dd.config().exists() || !dd.db().exists() {
            return Err(KeysError::NotInitialised(dd.root.display().to_string()));
        }
        let at_rest = AtRest::load(&dd.keys_dir(), env_key)?;
        let store = Store::open(&dd.db(), at_rest.clone())?;
        let blobs = BlobStore::open(&dd.blobs(), at_rest.clone())?;
        Ok(Offline {
            store,
            blobs,
            at_rest,
        })
    }

    pub fn rotate(&self, who: &str) -> Result<RotateReport, KeysError> {
        rotate(&self.store, &self.at_rest, who)
    }

    pub fn reseal(&self, who: &str) -> Result<ResealReport, KeysError> {
        reseal(&self.store, &self.blobs, who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_tasks::{self as st, NewTask, StoredBlob, TaskInputs};
    use delegate_protocol::{Op, Outcome, Summary};
    use uuid::Uuid;

    fn key_of(at: &AtRest, sealed: &[u8]) -> String {
        at.key_id_of("x", sealed).unwrap()
    }

    #[test]
    fn rotate_then_reseal_moves_everything_to_the_new_key() {
        let tmp = tempfile::tempdir().unwrap();
        let at = AtRest::load(&tmp.path().join("keys"), None).unwrap();
        let store = Store::open(&tmp.path().join("cp.db"), at.clone()).unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs"), at.clone()).unwrap();
        let old_key = at.current_key_id();

        let archive = blobs.put("archive", b"archive bytes").unwrap();
        let id = Uuid::from_u128(1);
        store
            .insert_task(
                &NewTask {
                    id,
                    op: Op::Plan,
                    workspace: "w".into(),
                    pool: "p".into(),
                    inputs: TaskInputs::default(),
                    archive: StoredBlob {
                        blob: archive.clone(),
                        size: 13,
                        sha256: "0".repeat(64),
                    },
                    plan: None,
                    parent: None,
                },
                1,
            )
            .unwrap();
        let sealed = at.seal(b"a log line").unwrap();
        store
            .sequenced(id, 1, |c| st::insert_log(c, id, 1, "stdout", &sealed, 2))
            .unwrap();
        store.secret_set("w", "TOKEN", "tok-value-1", 3).unwrap();
        let summary = Summary {
            add: 1,
            outputs: Some(serde_json::json!({"ip": "10.1.2.3"})),
            ..Default::default()
        };
        store
            .finish(id, Outcome::Succeeded, None, Some(&summary), 4)
            .unwrap();

        let r = rotate(&store, &at, "test").unwrap();
        assert_eq!(r.previous, old_key);
        // Old data still readable; new data under the new key.
        assert_eq!(blobs.get("archive", &archive).unwrap(), b"archive bytes");
        assert_eq!(store.logs(id, 0, 10).unwrap()[0].data, b"a log line");
        assert_eq!(
            store.task(id).unwrap().unwrap().summary,
            Some(summary.clone())
        );
        let fresh = blobs.put("state", b"{}").unwrap();
        let raw = std::fs::read(blobs.file(&fresh).unwrap()).unwrap();
        assert_eq!(key_of(&at, &raw), r.key_id);

        let report = reseal(&store, &blobs, "test").unwrap();
        assert_eq!(report.key_id, r.key_id);
        assert_eq!(report.failures, Vec::<String>::new());
        assert_eq!(report.blobs_resealed, 1);
        assert_eq!(report.blobs_already_current, 1);
        assert_eq!(report.values_resealed, 3, "log, summary, secret");
        for col in SEALED_COLUMNS {
            let values: Vec<Vec<u8>> = store
                .db()
                .prepare(&format!(
                    "SELECT {} FROM {} WHERE {0} IS NOT NULL",
                    col.column, col.table
                ))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for v in values {
                assert_eq!(key_of(&at, &v), r.key_id, "{}.{}", col.table, col.column);
            }
        }
        let raw = std::fs::read(blobs.file(&archive).unwrap()).unwrap();
        assert_eq!(key_of(&at, &raw), r.key_id);
        assert_eq!(store.logs(id, 0, 10).unwrap()[0].data, b"a log line");
        assert_eq!(
            store.workspace_secrets("w").unwrap().0["TOKEN"],
            "tok-value-1"
        );
        assert_eq!(store.task(id).unwrap().unwrap().summary, Some(summary));
        let actions: Vec<String> = store
            .audit_records(Some("keys"))
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, vec!["keys.rotated", "keys.resealed"]);

        // A second reseal has nothing to do.
        let again = reseal(&store, &blobs, "test").unwrap();
        assert_eq!(again.blobs_resealed + again.values_resealed, 0);
    }

    #[test]
    fn damaged_items_are_reported_by_name_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let at = AtRest::load(&tmp.path().join("keys"), None).unwrap();
        let store = Store::open(&tmp.path().join("cp.db"), at.clone()).unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs"), at.clone()).unwrap();
        let blob = blobs.put("state", b"{\"serial\":1}").unwrap();
        store
            .state_write(
                "prod",
                None,
                false,
                &crate::store_state::NewStateVersion {
                    serial: Some(1),
                    lineage: None,
                    size: 12,
                    sha256: "0".repeat(64),
                    blob: blob.clone(),
                    task_id: None,
                },
                1,
            )
            .unwrap()
            .unwrap();
        let path = blobs.file(&blob).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        store.secret_set("prod", "TOKEN", "tok-value-1", 3).unwrap();
        store
            .db()
            .execute("UPDATE workspace_secrets SET value = X'00112233'", [])
            .unwrap();
        rotate(&store, &at, "test").unwrap();
        let report = reseal(&store, &blobs, "test").unwrap();
        assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
        assert!(
            report.failures[0].contains("state version 1 of workspace prod")
                && report.failures[0].contains("integrity"),
            "{:?}",
            report.failures
        );
        assert!(
            report.failures[1].contains("secret TOKEN of workspace prod"),
            "{:?}",
            report.failures
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
    }
}
