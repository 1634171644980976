//! The control plane's shared state and the operations both endpoints perform on it.
//!
//! Owns: the [`ControlPlane`] value (config, store, blobs, hub, counters, change notifications)
//! and audit writing. Never holds the hub lock across an `.await` or while waiting on the network.

use crate::at_rest::{AtRest, BlobStore};
use crate::audit::AuditEntry;
use crate::config::{CpConfig, DataDir};
use crate::hub::Hub;
use crate::store::{Store, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;
use tokio::sync::{watch, Notify};

/// Errors opening the control plane's state.
#[derive(Debug, Error)]
pub enum CpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AtRest(#[from] crate::at_rest::AtRestError),
}

/// Counters exposed by `GET /api/v1/status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames from agents that could not be decoded (answered with `error`).
    pub decode_errors: AtomicU64,
    /// Messages that broke the protocol's order (answered with `protocol_violation`).
    pub protocol_violations: AtomicU64,
    /// TLS handshakes refused on the agent endpoint.
    pub refused_handshakes: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct ControlPlane {
    pub config: CpConfig,
    pub dd: DataDir,
    pub store: Store,
    pub blobs: BlobStore,
    pub counters: Counters,
    hub: Mutex<Hub>,
    next_conn: AtomicU64,
    /// Bumped whenever task data changes (logs, state); log followers wait on it.
    changes: watch::Sender<u64>,
    /// Wakes the dispatcher (a task was queued, a slot freed, an agent connected).
    dispatch: Notify,
    pub started_ms: i64,
}

impl ControlPlane {
    /// Open the database and blob store of `dd`, sealing with `at_rest`'s keys.
    pub fn open(dd: DataDir, config: CpConfig, at_rest: AtRest) -> Result<ControlPlane, CpError> {
        let store = Store::open(&dd.db(), at_rest.clone())?;
        let blobs = BlobStore::open(&dd.blobs(), at_rest)?;
        Ok(Self::with_parts(dd, config, store, blobs))
    }

    pub fn with_parts(dd: DataDir, config: CpConfig, store: Store, blobs: BlobStore) -> Self {
        ControlPlane {
            config,
            dd,
            store,
            blobs,
            counters: Counters::default(),
            hub: Mutex::new(Hub::default()),
            next_conn: AtomicU64::new(1),
            changes: watch::channel(0).0,
            dispatch: Notify::new(),
            started_ms: crate::now_ms(),
        }
    }

    pub fn hub(&self) -> MutexGuard<'_, Hub> {
        // The hub holds plain maps; a panic elsewhere cannot leave them half-updated in a way
        // that matters more than losing the whole process would.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Append an audit record; a failure is logged (the action itself goes on).
    pub fn audit(&self, who: &str, action: &str, target: &str, detail: &str) {
        let entry = AuditEntry::new(who, action, target, detail);
        if let Err(e) = self.store.audit(&entry, crate::now_ms()) {
            tracing::error!(action, target, error = %e, "cannot write audit record");
        }
    }

    pub fn notify_change(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Ask the dispatcher to look at the queue now.
    pub fn request_dispatch(&self) {
        self.dispatch.notify_one();
    }
}

/// The dispatcher: runs [`ControlPlane::dispatch_now`] whenever asked, and again when a
/// rejection cooldown ends. Push, not polling: it sleeps until there is something to do.
pub async fn run_dispatcher(cp: Arc<ControlPlane>) {
    loop {
        let notified = cp.dispatch.notified();
        let wake = cp.dispatch_now();
        match wake {
            Some(at) => {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Rejection, REJECT_COOLDOWN};
    use crate::hub::{AgentConn, Outbound};
    use crate::store_tasks::{NewTask, StoredBlob, TaskInputs};
    use delegate_protocol::{decode_text, Message, Op};
    use std::collections::BTreeSet;
    use tokio::sync::mpsc;
    use uuid::Uuid;

    fn plane(dir: &std::path::Path) -> Arc<ControlPlane> {
        let store = Store::open_in_memory().unwrap();
        let blobs = BlobStore::open(&dir.join("blobs"), AtRest::default()).unwrap();
        Arc::new(ControlPlane::with_parts(
            DataDir::new(dir),
            CpConfig::default(),
            store,
            blobs,
        ))
    }

    fn queue(cp: &ControlPlane, id: u128) -> Uuid {
        let id = Uuid::from_u128(id);
        cp.store
            .insert_task(
                &NewTask {
                    id,
                    op: Op::Validate,
                    workspace: "w".into(),
                    pool: "default".into(),
                    inputs: TaskInputs::default(),
                    archive: StoredBlob {
                        blob: "b".into(),
                        size: 1,
                        sha256: "a".repeat(64),
                    },
                    plan: None,
                    parent: None,
                },
                crate::now_ms(),
            )
            .unwrap();
        id
    }

    fn connect(cp: &ControlPlane, name: &str, slots: u32) -> mpsc::UnboundedReceiver<Outbound> {
        let (tx, rx) = mpsc::unbounded_channel();
        cp.hub().register(
            name,
            AgentConn {
                conn_id: cp.next_conn_id(),
                peer: "test".into(),
                pool: "default".into(),
                slots,
                tx,
                close: None,
                held: BTreeSet::new(),
                ready: true,
            },
        );
        rx
    }

    fn assigned(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<Uuid> {
        let mut out = Vec::new();
        while let Ok(Outbound::Text(t)) = rx.try_recv() {
            if let Ok(Message::Assign(a)) = decode_text(&t) {
                out.push(a.task.task_id);
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_task_returns_to_the_same_agent_only_after_the_cooldown() {
        let tmp = tempfile::tempdir().unwrap();
        let cp = plane(tmp.path());
        let mut rx = connect(&cp, "a1", 1);
        let id = queue(&cp, 1);
        cp.hub().rejections.insert(
            id,
            vec![Rejection {
                agent: "a1".into(),
                at: tokio::time::Instant::now(),
            }],
        );
        let start = tokio::time::Instant::now();
        assert_eq!(cp.dispatch_now(), Some(start + REJECT_COOLDOWN));
        assert!(
            assigned(&mut rx).is_empty(),
            "not straight back to the rejecter"
        );
        // The dispatcher sleeps until the cooldown ends (paused time jumps there), then assigns.
        let task = tokio::spawn(run_dispatcher(cp.clone()));
        while cp.store.task(id).unwrap().unwrap().agent.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(tokio::time::Instant::now() >= start + REJECT_COOLDOWN);
        assert_eq!(assigned(&mut rx), vec![id]);
        task.abort();
    }

    #[tokio::test]
    async fn never_more_than_the_slots() {
        let tmp = tempfile::tempdir().unwrap();
        let cp = plane(tmp.path());
        let mut rx = connect(&cp, "a1", 2);
        let ids: Vec<Uuid> = (1..=3).map(|i| queue(&cp, i)).collect();
        cp.dispatch_now();
        assert_eq!(assigned(&mut rx), ids[..2].to_vec());
        cp.dispatch_now();
        assert!(assigned(&mut rx).is_empty());
        assert_eq!(cp.store.queued_tasks().unwrap().len(), 1);
        // Not ready (Welcome not sent yet): nothing is assigned to it.
        let mut rx2 = connect(&cp, "a2", 5);
        cp.hub().agents.get_mut("a2").unwrap().ready = false;
        cp.dispatch_now();
        assert!(assigned(&mut rx2).is_empty());
    }
}
