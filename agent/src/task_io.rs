//! The seam between the link side of a task (sequencing, sending, acknowledging: `tasks`) and the
//! execution side (Docker sandbox: `sandbox`).
//!
//! The execution side never sees the WebSocket: it reports everything through a bounded
//! [`TaskOutputTx`], so a slow link or a full spool applies back-pressure to the task's log reader
//! instead of dropping output. The link side never sees Docker.

use bytes::Bytes;
use delegate_protocol::{ChunkKind, EventKind, LogStream, StateMethod, Summary, TaskSpec};
use tokio::sync::{mpsc, oneshot};

/// Inputs of one task, received over the link and verified (size and sha256) before execution.
#[derive(Debug)]
pub struct TaskInputs {
    pub spec: TaskSpec,
    /// The workspace archive (tar.gz), not yet unpacked or checked for hostile entries.
    pub archive: Vec<u8>,
    /// For apply: the approved plan file, its sha256 already verified against `spec.plan`.
    pub plan: Option<Vec<u8>>,
}

/// One thing the execution side reports about a running task.
#[derive(Debug)]
pub enum TaskOutput {
    /// Output bytes as produced, already redacted (whole lines where possible).
    Log {
        stream: LogStream,
        data: Bytes,
    },
    Event(EventKind),
    /// A finished artifact (plan file, plan JSON); the link side chunks it and sends its sha256.
    Artifact {
        kind: ChunkKind,
        data: Vec<u8>,
    },
    /// A request tofu made to the default http backend; the link side relays it to the control
    /// plane and answers on `reply`.
    State {
        method: StateMethod,
        lock_id: Option<String>,
        body: Option<Vec<u8>>,
        reply: oneshot::Sender<StateReply>,
    },
    /// Where the execution stands (Docker objects, step states, summary so far), for finishing
    /// the task after an agent restart. The link side records it in the task's spool durably and
    /// in order with everything reported before it, then answers on `saved` (`Err`: why it could
    /// not be recorded; the sandbox must then not start or remove a step container).
    Journal {
        exec: Box<crate::spool::journal::ExecJournal>,
        saved: oneshot::Sender<Result<(), String>>,
    },
}

/// Answer to a relayed state request: an HTTP status and body to give tofu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReply {
    pub status: u16,
    pub body: Vec<u8>,
}

pub type TaskOutputTx = mpsc::Sender<TaskOutput>;
pub type TaskOutputRx = mpsc::Receiver<TaskOutput>;

/// How a task ended, from the execution side's point of view.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub outcome: delegate_protocol::Outcome,
    /// Why it failed, was cancelled or timed out, in words for the user. Never contains secrets.
    pub reason: Option<String>,
    pub summary: Summary,
}
