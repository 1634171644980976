//! The in-memory side of the control plane: which agents are connected right now (with the
//! channel to each connection's writer and the tasks each holds), and task secrets.
//!
//! Owns: connection registration/replacement and what is only ever in memory. Never performs I/O
//! and never blocks: callers hold its lock briefly, never across an `.await`.

use crate::dispatch::Rejection;
use delegate_protocol::{encode_text, Message, Secrets};
use std::collections::{BTreeSet, HashMap};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Something for a connection's writer to put on the socket.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Binary(Vec<u8>),
}

/// A live agent connection.
#[derive(Debug)]
pub struct AgentConn {
    pub conn_id: u64,
    pub peer: String,
    pub pool: String,
    pub slots: u32,
    pub tx: mpsc::UnboundedSender<Outbound>,
    /// Fired to make the connection close itself (replaced, shutdown), with the reason.
    pub close: Option<oneshot::Sender<String>>,
    /// Tasks assigned to this agent and not finished.
    pub held: BTreeSet<Uuid>,
    /// False until Welcome is queued: dispatch never sends an Assign ahead of it.
    pub ready: bool,
}

impl AgentConn {
    pub fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.held.len() as u32)
    }
}

#[derive(Debug, Default)]
pub struct Hub {
    pub agents: HashMap<String, AgentConn>,
    /// Task secrets: memory only, never in the database, logs or API output.
    pub secrets: HashMap<Uuid, Secrets>,
    /// Recent rejections per queued task, so a task is not offered straight back to the agent
    /// that refused it.
    pub rejections: HashMap<Uuid, Vec<Rejection>>,
    /// Succeeded plans whose secrets are kept for approval, until `approval_ttl` has passed or a
    /// newer plan or apply of the workspace has finished.
    pub kept: HashMap<Uuid, KeptPlan>,
    /// Why the kept secrets of a plan were dropped (for approve's message), until `until_ms`.
    pub dropped: HashMap<Uuid, DroppedSecrets>,
}

/// A plan awaiting approval whose secrets are in [`Hub::secrets`].
#[derive(Debug, Clone)]
pub struct KeptPlan {
    pub workspace: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct DroppedSecrets {
    /// Completes "the plan's secrets …".
    pub reason: String,
    /// Forgotten after this (the plan's approval window is over by then in any case).
    pub until_ms: i64,
}

impl Hub {
    /// Register a connection; a previous connection of the same identity is returned (its close
    /// signal not yet fired) so the caller can close it.
    pub fn register(&mut self, name: &str, conn: AgentConn) -> Option<AgentConn> {
        self.agents.insert(name.to_string(), conn)
    }

    /// Remove `name` if `conn_id` is still its current connection. Returns whether it was.
    pub fn unregister(&mut self, name: &str, conn_id: u64) -> Option<AgentConn> {
        if self.agents.get(name).map(|c| c.conn_id) == Some(conn_id) {
            self.agents.remove(name)
        } else {
            None
        }
    }

    pub fn is_current(&self, name: &str, conn_id: u64) -> bool {
        self.agents.get(name).map(|c| c.conn_id) == Some(conn_id)
    }

    /// A task is over: forget what memory held for it (its slot, secrets, rejections).
    /// `keep_secrets` keeps the secrets (a succeeded plan that may still be approved).
    pub fn forget_task(&mut self, agent: Option<&str>, id: Uuid, keep_secrets: bool) {
        if let Some(c) = agent.and_then(|a| self.agents.get_mut(a)) {
            c.held.remove(&id);
        }
        if !keep_secrets {
            self.secrets.remove(&id);
            self.kept.remove(&id);
        }
        self.rejections.remove(&id);
    }

    /// Queue a control message to `name`'s connection. False if not connected.
    pub fn send(&self, name: &str, msg: &Message) -> bool {
        match self.agents.get(name) {
            Some(c) => c.tx.send(Outbound::Text(encode_text(msg))).is_ok(),
            None => false,
        }
    }

    pub fn send_binary(&self, name: &str, bytes: Vec<u8>) -> bool {
        match self.agents.get(name) {
            Some(c) => c.tx.send(Outbound::Binary(bytes)).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> (AgentConn, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            AgentConn {
                conn_id: id,
                peer: "p".into(),
                pool: "default".into(),
                slots: 2,
                tx,
                close: None,
                held: BTreeSet::new(),
                ready: true,
            },
            rx,
        )
    }

    #[test]
    fn replacement_keeps_newest() {
        let mut hub = Hub::default();
        let (c1, _r1) = conn(1);
        let (c2, _r2) = conn(2);
        assert!(hub.register("a", c1).is_none());
        assert_eq!(hub.register("a", c2).map(|c| c.conn_id), Some(1));
        // The old connection closing must not remove the new one.
        assert!(hub.unregister("a", 1).is_none());
        assert!(hub.is_current("a", 2));
        assert!(hub.unregister("a", 2).is_some());
        assert!(hub.agents.is_empty());
    }

    #[test]
    fn free_slots_count_held_tasks() {
        let (mut c, _r) = conn(1);
        assert_eq!(c.free_slots(), 2);
        c.held.insert(Uuid::from_u128(1));
        c.held.insert(Uuid::from_u128(2));
        c.held.insert(Uuid::from_u128(3));
        assert_eq!(c.free_slots(), 0);
    }
}
