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
    pub fn open(dd: DataDir, config: CpConfig) -> Result<ControlPlane, CpError> {
        let at_rest = AtRest::default();
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
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                }
            }
            None => notified.await,
        }
    }
}
