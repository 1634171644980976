//! Task messages from agents: what the control plane does with accept/reject, sequenced
//! messages (event, log, chunk, artifact, done) and state requests, and what it says in Welcome
//! about tasks an agent holds.
//!
//! Owns: the link side of task handling. Never trusts an agent with a task it was not assigned.

use crate::cp::ControlPlane;
use crate::hub::AgentConn;
use delegate_protocol::{BinaryFrame, HeldTask, Message, ResumePoint};
use uuid::Uuid;

/// What to send back after handling a message: an acknowledgement to batch, and messages.
#[derive(Debug, Default)]
pub struct Reply {
    pub ack: Option<(Uuid, u64)>,
    pub send: Vec<Message>,
}

/// A message that breaks the protocol: answered with `protocol_violation`.
#[derive(Debug)]
pub struct Fault {
    pub message: String,
    pub task_id: Option<Uuid>,
}

fn task_of(msg: &Message) -> Option<Uuid> {
    match msg {
        Message::Accept(m) => Some(m.task_id),
        Message::Reject(m) => Some(m.task_id),
        Message::Event(m) => Some(m.task_id),
        Message::Artifact(m) => Some(m.task_id),
        Message::Done(m) => Some(m.task_id),
        Message::StateRequest(m) => Some(m.task_id),
        _ => None,
    }
}

impl ControlPlane {
    /// Resume points for the tasks an agent lists in Hello.
    pub fn resume_points(&self, _agent: &str, held: &[HeldTask]) -> Vec<ResumePoint> {
        held.iter()
            .map(|h| ResumePoint {
                task_id: h.task_id,
                acked_seq: h.acked_seq,
                known: false,
            })
            .collect()
    }

    /// At start: nothing to recover while tasks do not exist yet.
    pub fn on_start(&self) {}

    /// After Welcome: dispatch queued work to the agent.
    pub fn after_welcome(&self, _agent: &str) {}

    /// After an agent's current connection ended.
    pub fn after_disconnect(&self, _agent: &str, _conn: AgentConn) {}

    pub fn on_task_message(&self, agent: &str, msg: Message) -> Result<Reply, Fault> {
        let task_id = task_of(&msg);
        Err(Fault {
            message: match task_id {
                Some(t) => format!("task {t} is not assigned to agent {agent}"),
                None => format!("unexpected {}", msg.type_name()),
            },
            task_id,
        })
    }

    pub fn on_binary_frame(&self, agent: &str, frame: BinaryFrame) -> Result<Reply, Fault> {
        let t = frame.task_id();
        Err(Fault {
            message: format!("task {t} is not assigned to agent {agent}"),
            task_id: Some(t),
        })
    }
}
