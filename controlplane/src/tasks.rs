//! Task messages from agents (the link side of tasks): Welcome's resume points, dispatch,
//! accept/reject, input streaming, sequenced messages (event, log, artifact chunk, artifact, done)
//! and what happens when an agent returns without a task it was running.
//!
//! Owns: task state transitions driven by agents. Never trusts an agent with a task it was not
//! assigned, and never re-runs a task that was running: it ends `lost` instead.

use crate::audit::AuditEntry;
use crate::cp::ControlPlane;
use crate::dispatch::{cooldown_ends, pick, Candidate, Rejection};
use crate::hub::{AgentConn, Hub};
use crate::seq::SeqDecision;
use crate::store::StoreError;
use crate::store_tasks::{self as st, StoredBlob, TaskRow, TaskState};
use delegate_protocol::{
    encode_binary, Assign, BinaryFrame, BlobRef, Cancel, ChunkFrame, ChunkKind, ErrorCode,
    EventKind, HeldTask, Message, Op, Outcome, ResumePoint, Secrets, TaskSpec,
};
use ring::digest::{Context, SHA256};
use std::collections::{BTreeSet, HashSet};
use tokio::time::Instant;
use uuid::Uuid;

/// Input blobs are streamed to agents in chunks of this size.
pub const INPUT_CHUNK: usize = 256 * 1024;

/// What to send back after handling a message: an acknowledgement to batch, control messages,
/// then binary frames.
#[derive(Debug, Default)]
pub struct Reply {
    pub ack: Option<(Uuid, u64)>,
    pub send: Vec<Message>,
    pub binary: Vec<Vec<u8>>,
}

/// A message the control plane refuses: answered with `error{code}` on the link.
#[derive(Debug)]
pub struct Fault {
    pub code: ErrorCode,
    pub message: String,
    pub task_id: Option<Uuid>,
}

impl Fault {
    fn violation(task_id: Uuid, message: String) -> Fault {
        Fault {
            code: ErrorCode::ProtocolViolation,
            message,
            task_id: Some(task_id),
        }
    }
    fn internal(task_id: Uuid, e: StoreError) -> Fault {
        tracing::error!(task = %task_id, error = %e, "storage error handling an agent message");
        Fault {
            code: ErrorCode::Internal,
            message: "control plane storage error".into(),
            task_id: Some(task_id),
        }
    }
}

/// One sequenced item from an agent.
enum Item<'a> {
    Log {
        stream: &'static str,
        data: &'a [u8],
    },
    Event(&'a delegate_protocol::Event),
    Part(&'a ChunkFrame),
    Artifact(&'a delegate_protocol::Artifact),
    Done(&'a delegate_protocol::Done),
}

/// The wire spec for a task. An `apply` without an approved plan (submitted directly) runs as a
/// plan that applies itself (`auto_approve`).
pub fn spec_for(t: &TaskRow, secrets: Secrets) -> TaskSpec {
    let (op, auto_approve) = match (t.op, &t.plan) {
        (Op::Apply, None) => (Op::Plan, true),
        (op, _) => (op, t.inputs.auto_approve),
    };
    TaskSpec {
        task_id: t.id,
        op,
        workspace: t.workspace.clone(),
        auto_approve,
        vars: t.inputs.vars.clone(),
        var_files: t.inputs.var_files.clone(),
        env: t.inputs.env.clone(),
        secrets,
        archive: BlobRef {
            size: t.archive.size,
            sha256: t.archive.sha256.clone(),
        },
        plan: t.plan.as_ref().map(|p| BlobRef {
            size: p.size,
            sha256: p.sha256.clone(),
        }),
        timeout_secs: t.inputs.timeout_secs,
        egress: vec![],
    }
}

/// A blob as input chunk frames: `seq` = index from 0, the last one flagged.
pub fn input_chunks(task_id: Uuid, kind: ChunkKind, data: &[u8]) -> Vec<Vec<u8>> {
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(INPUT_CHUNK).collect()
    };
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            encode_binary(&BinaryFrame::Chunk(ChunkFrame {
                task_id,
                seq: i as u64,
                kind,
                last: i + 1 == n,
                data: piece.to_vec(),
            }))
        })
        .collect()
}

/// The audit record for an egress proxy decision the agent reported (`egress.allowed` /
/// `egress.denied`; who = the agent, target = the task). None for other events.
pub fn egress_audit(agent: &str, task: Uuid, event: &EventKind) -> Option<AuditEntry> {
    let EventKind::Egress {
        destination,
        address,
        allowed,
        detail,
        bytes_up,
        bytes_down,
        duration_ms,
    } = event
    else {
        return None;
    };
    let (action, decision) = if *allowed {
        ("egress.allowed", format!("allowed: {detail}"))
    } else {
        ("egress.denied", format!("denied: {detail}"))
    };
    Some(AuditEntry::new(
        agent,
        action,
        task.to_string(),
        format!(
            "destination {destination} address {} {decision}; {bytes_up} bytes up, \
             {bytes_down} bytes down, {duration_ms} ms",
            address.as_deref().unwrap_or("-")
        ),
    ))
}

pub fn sha256_hex(data: &[u8]) -> String {
    let mut ctx = Context::new(&SHA256);
    ctx.update(data);
    hex::encode(ctx.finish().as_ref())
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

/// The time stored for an event: the agent's `at_ms`, or the control plane's receive time when
/// `at_ms` is past what RFC 3339 can show (year 9999). Such a value is a broken agent clock, not
/// a reason to refuse the event: refusing it would make the agent resend it forever.
fn event_time(at_ms: u64, now_ms: i64) -> i64 {
    match i64::try_from(at_ms) {
        Ok(at) if at <= crate::MAX_TIMESTAMP_MS => at,
        _ => {
            tracing::warn!(
                at_ms,
                "event time is past year 9999; storing the receive time instead"
            );
            now_ms
        }
    }
}

/// Whether a finished task keeps its secrets in memory: a succeeded plan may be approved, and
/// the apply needs them.
fn keeps_secrets(t: &TaskRow, outcome: Outcome) -> bool {
    t.op == Op::Plan && !t.inputs.auto_approve && outcome == Outcome::Succeeded
}

impl ControlPlane {
    /// At start: look at the queue (agents will connect and pick work up).
    pub fn on_start(&self) {
        self.request_dispatch();
    }

    /// Resume points for the tasks an agent lists in Hello, and the consequences for tasks it
    /// does not list: an assignment that never took is requeued, a running task is `lost`.
    pub fn resume_points(&self, agent: &str, held: &[HeldTask]) -> Vec<ResumePoint> {
        let listed: HashSet<Uuid> = held.iter().map(|h| h.task_id).collect();
        let mut points = Vec::with_capacity(held.len());
        let mut holding = BTreeSet::new();
        let now = crate::now_ms();
        for h in held {
            let row = match self.store.task(h.task_id) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(task = %h.task_id, error = %e, "cannot read task for resume");
                    None
                }
            };
            match row {
                Some(t)
                    if t.agent.as_deref() == Some(agent)
                        && matches!(t.state, TaskState::Assigned | TaskState::Running) =>
                {
                    if t.state == TaskState::Assigned {
                        // Its accept was lost with the old connection; it holds the task.
                        let _ = self.store.mark_running(t.id, agent, now);
                    }
                    if t.lease_expired_at_ms.is_some()
                        && matches!(self.store.set_lease_expired(t.id, None), Ok(true))
                    {
                        self.audit(
                            agent,
                            "task.lease_renewed",
                            &t.id.to_string(),
                            "agent reconnected",
                        );
                    }
                    holding.insert(t.id);
                    points.push(ResumePoint {
                        task_id: t.id,
                        acked_seq: t.acked_seq,
                        known: true,
                    });
                }
                other => points.push(ResumePoint {
                    task_id: h.task_id,
                    acked_seq: other.map(|t| t.acked_seq).unwrap_or(0),
                    known: false,
                }),
            }
        }
        let mut hub = self.hub();
        let mut lost = Vec::new();
        match self.store.held_by(agent) {
            Ok(tasks) => {
                for t in tasks.into_iter().filter(|t| !listed.contains(&t.id)) {
                    if self.drop_unlisted(&mut hub, agent, &t, now) {
                        lost.push(t);
                    }
                }
            }
            Err(e) => tracing::error!(agent, error = %e, "cannot list the agent's tasks"),
        }
        if let Some(c) = hub.agents.get_mut(agent) {
            c.held = holding;
        }
        drop(hub);
        for t in &lost {
            self.after_end(t, Outcome::Lost, now);
        }
        points
    }

    /// Returns whether `t` ended lost (the caller then runs `after_end`, without the hub lock).
    fn drop_unlisted(&self, hub: &mut Hub, agent: &str, t: &TaskRow, now: i64) -> bool {
        if t.state == TaskState::Assigned {
            let reason =
                format!("agent {agent} reconnected without it; the assignment never reached it");
            if let Ok(true) = self.store.requeue(t.id, &reason) {
                tracing::info!(task = %t.id, agent, "task requeued: {reason}");
                self.audit("controlplane", "task.requeued", &t.id.to_string(), &reason);
            }
            return false;
        }
        let reason = format!(
            "agent {agent} reconnected without this task (it restarted or lost it); \
             it is not re-run automatically"
        );
        if let Ok(true) = self
            .store
            .finish(t.id, Outcome::Lost, Some(&reason), None, now)
        {
            tracing::warn!(task = %t.id, agent, "task lost: {reason}");
            self.audit(
                "controlplane",
                "task.finished",
                &t.id.to_string(),
                &format!("lost: {reason}"),
            );
            hub.forget_task(Some(agent), t.id, false);
            self.notify_change();
            return true;
        }
        false
    }

    /// After Welcome is queued: the agent may now get work, and cancels it missed are resent.
    pub fn after_welcome(&self, agent: &str) {
        let mut hub = self.hub();
        let Some(conn) = hub.agents.get_mut(agent) else {
            return;
        };
        conn.ready = true;
        let held: Vec<Uuid> = conn.held.iter().copied().collect();
        for id in held {
            if let Ok(Some(t)) = self.store.task(id) {
                if t.cancel_requested {
                    hub.send(
                        agent,
                        &Message::Cancel(Cancel {
                            task_id: id,
                            reason: "cancelled by the user".into(),
                        }),
                    );
                }
            }
        }
        drop(hub);
        self.request_dispatch();
    }

    /// After an agent's current connection ended. Its tasks stay assigned to it: they outlive
    /// connections, and its next Hello says which it still holds.
    pub fn after_disconnect(&self, _agent: &str, _conn: AgentConn) {
        self.notify_change();
    }

    /// Assign queued tasks to agents with free slots. Returns when a rejection cooldown ends, if
    /// a task is waiting only for that.
    pub fn dispatch_now(&self) -> Option<Instant> {
        let queued = match self.store.queued_tasks() {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "dispatch: cannot read the queue");
                return None;
            }
        };
        if queued.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut hub = self.hub();
        for t in queued {
            let rejections: Vec<Rejection> = hub.rejections.get(&t.id).cloned().unwrap_or_default();
            let chosen = {
                let candidates: Vec<Candidate<'_>> = hub
                    .agents
                    .iter()
                    .filter(|(_, c)| c.ready)
                    .map(|(name, c)| Candidate {
                        name,
                        pool: &c.pool,
                        free_slots: c.free_slots(),
                    })
                    .collect();
                pick(&t.pool, &candidates, &rejections, now).map(str::to_string)
            };
            let Some(agent) = chosen else {
                if let Some(at) = cooldown_ends(&rejections, now) {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
                continue;
            };
            let secrets = hub.secrets.get(&t.id).cloned();
            if !t.inputs.secret_names.is_empty() && secrets.is_none() {
                let reason = "its secrets were held in memory only and the control plane \
                              restarted before it ran; submit it again";
                self.fail_queued(&mut hub, &t, reason);
                continue;
            }
            // The workspace's stored secrets, under the task's own (which win).
            let secrets = match self.store.workspace_secrets(&t.workspace) {
                Ok(stored) => crate::task_ops::merge_secrets(
                    stored,
                    &secrets.unwrap_or_default(),
                    &t.inputs.env,
                ),
                Err(e) => {
                    let reason = format!(
                        "the control plane cannot read the stored secrets of workspace {}: {e}",
                        t.workspace
                    );
                    self.fail_queued(&mut hub, &t, &reason);
                    continue;
                }
            };
            if let Err(e) = crate::task_ops::check_stored_secrets(&t.workspace, &secrets) {
                self.fail_queued(&mut hub, &t, &e.message);
                continue;
            }
            if let Err(e) = crate::task_ops::check_assign_size(&t, &secrets) {
                self.fail_queued(
                    &mut hub,
                    &t,
                    &format!("{} (with the workspace's stored secrets)", e.message),
                );
                continue;
            }
            match self.store.mark_assigned(t.id, &agent, crate::now_ms()) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(task = %t.id, error = %e, "dispatch: cannot assign");
                    continue;
                }
            }
            let spec = spec_for(&t, secrets);
            if let Some(c) = hub.agents.get_mut(&agent) {
                c.held.insert(t.id);
            }
            hub.send(&agent, &Message::Assign(Assign { task: spec }));
            tracing::info!(task = %t.id, agent = %agent, op = %t.op, "task assigned");
            self.audit(
                "controlplane",
                "task.assigned",
                &t.id.to_string(),
                &format!("to agent {agent}"),
            );
            self.notify_change();
        }
        wake
    }

    /// A queued task that cannot be dispatched ends `failed` with `reason`.
    fn fail_queued(&self, hub: &mut Hub, t: &TaskRow, reason: &str) {
        if let Ok(true) =
            self.store
                .finish(t.id, Outcome::Failed, Some(reason), None, crate::now_ms())
        {
            tracing::warn!(task = %t.id, "task failed before dispatch: {reason}");
            self.audit(
                "controlplane",
                "task.finished",
                &t.id.to_string(),
                &format!("failed: {reason}"),
            );
            hub.forget_task(None, t.id, false);
            self.notify_change();
        }
    }

    /// The task `id` as `agent` may speak about it.
    fn held_task(&self, agent: &str, id: Uuid) -> Result<TaskRow, Fault> {
        match self.store.task(id) {
            Ok(Some(t)) if t.agent.as_deref() == Some(agent) => Ok(t),
            Ok(_) => Err(Fault::violation(
                id,
                format!("task {id} is not assigned to agent {agent}"),
            )),
            Err(e) => Err(Fault::internal(id, e)),
        }
    }

    pub fn on_task_message(&self, agent: &str, msg: Message) -> Result<Reply, Fault> {
        match &msg {
            Message::Accept(a) => self.on_accept(agent, a.task_id),
            Message::Reject(r) => self.on_reject(agent, r.task_id, &r.reason),
            Message::Event(e) => self.on_sequenced(agent, e.task_id, e.seq, Item::Event(e)),
            Message::Artifact(a) => self.on_sequenced(agent, a.task_id, a.seq, Item::Artifact(a)),
            Message::Done(d) => self.on_sequenced(agent, d.task_id, d.seq, Item::Done(d)),
            Message::StateRequest(r) => self.on_state_request(agent, r),
            other => {
                let id = task_of(other).unwrap_or_default();
                Err(Fault::violation(
                    id,
                    format!("unexpected {}", other.type_name()),
                ))
            }
        }
    }

    pub fn on_binary_frame(&self, agent: &str, frame: BinaryFrame) -> Result<Reply, Fault> {
        match &frame {
            BinaryFrame::Log(l) => self.on_sequenced(
                agent,
                l.task_id,
                l.seq,
                Item::Log {
                    stream: l.stream.as_str(),
                    data: &l.data,
                },
            ),
            BinaryFrame::Chunk(c) => {
                if c.kind == ChunkKind::Workspace {
                    return Err(Fault::violation(
                        c.task_id,
                        "workspace chunks flow from the control plane to the agent only".into(),
                    ));
                }
                self.on_sequenced(agent, c.task_id, c.seq, Item::Part(c))
            }
        }
    }

    fn on_accept(&self, agent: &str, id: Uuid) -> Result<Reply, Fault> {
        let t = self.held_task(agent, id)?;
        match t.state {
            TaskState::Queued => Err(Fault::violation(
                id,
                format!("task {id} is not assigned to agent {agent}"),
            )),
            TaskState::Finished => {
                // Cancelled (or ended) between assign and accept: tell the agent to stop.
                Ok(Reply {
                    send: vec![Message::Cancel(Cancel {
                        task_id: id,
                        reason: format!(
                            "task already ended ({})",
                            t.outcome.map(Outcome::as_str).unwrap_or("finished")
                        ),
                    })],
                    ..Reply::default()
                })
            }
            TaskState::Assigned | TaskState::Running => {
                if t.state == TaskState::Assigned {
                    self.store
                        .mark_running(id, agent, crate::now_ms())
                        .map_err(|e| Fault::internal(id, e))?;
                    tracing::info!(task = %id, agent, "task accepted");
                    self.audit(agent, "task.accepted", &id.to_string(), "");
                    self.notify_change();
                }
                let what = format!("workspace archive of task {id}");
                let mut binary = match self.blobs.get(&what, &t.archive.blob) {
                    Ok(data) => input_chunks(id, ChunkKind::Workspace, &data),
                    Err(e) => return Err(self.input_missing(agent, &t, "workspace archive", e)),
                };
                if let Some(plan) = &t.plan {
                    let what = format!("approved plan of task {id}");
                    match self.blobs.get(&what, &plan.blob) {
                        Ok(data) => binary.extend(input_chunks(id, ChunkKind::Plan, &data)),
                        Err(e) => return Err(self.input_missing(agent, &t, "approved plan", e)),
                    }
                }
                Ok(Reply {
                    binary,
                    ..Reply::default()
                })
            }
        }
    }

    /// An input blob cannot be read: the task cannot run anywhere. Fail it and cancel it.
    fn input_missing(
        &self,
        agent: &str,
        t: &TaskRow,
        what: &str,
        e: crate::at_rest::AtRestError,
    ) -> Fault {
        tracing::error!(task = %t.id, error = %e, "cannot read the task's {what}");
        let reason = format!("the control plane cannot read the task's {what}: {e}");
        let now = crate::now_ms();
        if let Ok(true) = self
            .store
            .finish(t.id, Outcome::Failed, Some(&reason), None, now)
        {
            self.audit(
                "controlplane",
                "task.finished",
                &t.id.to_string(),
                &format!("failed: {reason}"),
            );
            let mut hub = self.hub();
            hub.forget_task(Some(agent), t.id, false);
            hub.send(
                agent,
                &Message::Cancel(Cancel {
                    task_id: t.id,
                    reason: reason.clone(),
                }),
            );
            drop(hub);
            self.after_end(t, Outcome::Failed, now);
            self.notify_change();
        }
        Fault {
            code: ErrorCode::Internal,
            message: reason,
            task_id: Some(t.id),
        }
    }

    fn on_reject(&self, agent: &str, id: Uuid, reason: &str) -> Result<Reply, Fault> {
        let t = self.held_task(agent, id)?;
        match t.state {
            TaskState::Assigned => {
                let mut hub = self.hub();
                self.store
                    .requeue(id, &format!("rejected by {agent}: {reason}"))
                    .map_err(|e| Fault::internal(id, e))?;
                if let Some(c) = hub.agents.get_mut(agent) {
                    c.held.remove(&id);
                }
                hub.rejections.entry(id).or_default().push(Rejection {
                    agent: agent.to_string(),
                    at: Instant::now(),
                });
                drop(hub);
                tracing::info!(task = %id, agent, reason, "task rejected; back in the queue");
                self.audit(agent, "task.rejected", &id.to_string(), reason);
                self.notify_change();
                self.request_dispatch();
                Ok(Reply::default())
            }
            // Ended meanwhile (cancelled): nothing to do.
            TaskState::Finished => Ok(Reply::default()),
            _ => Err(Fault::violation(
                id,
                format!("task {id} was already accepted; it cannot be rejected"),
            )),
        }
    }

    fn on_sequenced(
        &self,
        agent: &str,
        id: Uuid,
        seq: u64,
        item: Item<'_>,
    ) -> Result<Reply, Fault> {
        let t = self.held_task(agent, id)?;
        if t.state == TaskState::Assigned {
            // Output before accept: the accept was lost with an earlier connection.
            let _ = self.store.mark_running(id, agent, crate::now_ms());
        }
        if t.state == TaskState::Finished && seq > t.acked_seq {
            return Err(Fault::violation(id, format!("task {id} has already ended")));
        }
        let now = crate::now_ms();
        let at_rest = self.store.at_rest().clone();
        let mut finished: Option<(Outcome, Option<String>)> = None;
        let mut artifact_note: Option<String> = None;
        let decision = self
            .store
            .sequenced(id, seq, |c| match &item {
                Item::Log { stream, data } => {
                    st::insert_log(c, id, seq, stream, &at_rest.seal(data)?, now)
                }
                Item::Event(e) => {
                    let json = serde_json::to_string(&e.event).unwrap_or_else(|_| "{}".into());
                    st::insert_event(c, id, seq, event_time(e.at_ms, now), &json)?;
                    // An egress decision is also an audit record, stored with the event: once.
                    if let Some(entry) = egress_audit(agent, id, &e.event) {
                        crate::store::audit_in(c, &entry, now)?;
                    }
                    Ok(())
                }
                Item::Part(p) => {
                    st::insert_part(c, id, seq, p.kind.as_str(), &at_rest.seal(&p.data)?)
                }
                Item::Artifact(a) => {
                    // Streamed from the sealed parts into a sealed blob, hashed on the way.
                    let kind = a.kind.as_str();
                    let mut blob = self
                        .blobs
                        .writer(&format!("{kind} artifact of task {id}"))?;
                    st::drain_parts(c, &at_rest, id, kind, |part| Ok(blob.write(part)?))?;
                    let (size, sha) = (blob.size(), blob.sha256());
                    if size != a.size || sha != a.sha256 {
                        let reason = format!(
                            "artifact {kind} does not match what the agent announced: received \
                             {size} bytes with sha256 {sha}, announced {} bytes with sha256 {}",
                            a.size, a.sha256
                        );
                        st::set_fail_reason(c, id, &reason)?;
                        artifact_note = Some(reason);
                        return Ok(());
                    }
                    let put = blob.commit()?;
                    st::insert_artifact(
                        c,
                        id,
                        kind,
                        &StoredBlob {
                            blob: put.id,
                            size: put.size,
                            sha256: put.sha256,
                        },
                        now,
                    )
                }
                Item::Done(d) => {
                    let fail: Option<String> = c.query_row(
                        "SELECT fail_reason FROM tasks WHERE id = ?1",
                        [id.to_string()],
                        |r| r.get(0),
                    )?;
                    let (outcome, reason) = match fail {
                        Some(f) => (Outcome::Failed, Some(f)),
                        None => (d.outcome, d.reason.clone()),
                    };
                    st::finish_in(
                        c,
                        &at_rest,
                        id,
                        outcome,
                        reason.as_deref(),
                        d.summary.as_ref(),
                        now,
                    )?;
                    finished = Some((outcome, reason));
                    Ok(())
                }
            })
            .map_err(|e| Fault::internal(id, e))?;
        match decision {
            SeqDecision::Store => {}
            SeqDecision::Duplicate { acked } => {
                return Ok(Reply {
                    ack: Some((id, acked)),
                    ..Reply::default()
                })
            }
            SeqDecision::Gap { expected } => {
                return Err(Fault::violation(
                    id,
                    format!("task {id}: expected sequence number {expected}, got {seq}"),
                ))
            }
        }
        if let Some(note) = artifact_note {
            tracing::warn!(task = %id, agent, "{note}");
            self.audit(agent, "task.artifact_rejected", &id.to_string(), &note);
        }
        if let Item::Artifact(a) = &item {
            tracing::debug!(task = %id, kind = a.kind.as_str(), size = a.size, "artifact stored");
        }
        if let Some((outcome, reason)) = finished {
            let keeps = keeps_secrets(&t, outcome);
            let mut hub = self.hub();
            hub.forget_task(Some(agent), id, keeps);
            drop(hub);
            self.secrets_after_finish(&t, outcome, keeps, now);
            tracing::info!(task = %id, agent, outcome = outcome.as_str(), reason = reason.as_deref().unwrap_or(""), "task finished");
            let detail = match &reason {
                Some(r) => format!("{}: {r}", outcome.as_str()),
                None => outcome.as_str().to_string(),
            };
            self.audit(agent, "task.finished", &id.to_string(), &detail);
            self.locks_after_end(&t, outcome);
            self.request_dispatch();
        }
        self.notify_change();
        Ok(Reply {
            ack: Some((id, seq)),
            ..Reply::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::decode_binary;

    #[test]
    fn event_times_past_year_9999_become_the_receive_time() {
        assert_eq!(event_time(1_764_105_600_000, 5), 1_764_105_600_000);
        assert_eq!(
            event_time(crate::MAX_TIMESTAMP_MS as u64, 5),
            crate::MAX_TIMESTAMP_MS
        );
        for at in [253_402_300_800_000, i64::MAX as u64, u64::MAX] {
            assert_eq!(event_time(at, 5), 5, "{at}");
        }
    }

    #[test]
    fn chunks_cover_the_blob_in_order() {
        let id = Uuid::from_u128(9);
        let data: Vec<u8> = (0..(INPUT_CHUNK * 2 + 10)).map(|i| i as u8).collect();
        let frames = input_chunks(id, ChunkKind::Workspace, &data);
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let BinaryFrame::Chunk(c) = decode_binary(f).unwrap() else {
                panic!()
            };
            assert_eq!(c.seq, i as u64);
            assert_eq!(c.last, i == 2);
            assert_eq!(c.kind, ChunkKind::Workspace);
            joined.extend(c.data);
        }
        assert_eq!(joined, data);
        let empty = input_chunks(id, ChunkKind::Plan, &[]);
        assert_eq!(empty.len(), 1);
    }

    #[test]
    fn egress_decisions_become_audit_records() {
        let task = Uuid::from_u128(5);
        let allowed = EventKind::Egress {
            destination: "registry.opentofu.org:443".into(),
            address: Some("192.0.2.10:443".into()),
            allowed: true,
            detail: "rule registry.opentofu.org:443".into(),
            bytes_up: 1200,
            bytes_down: 34000,
            duration_ms: 250,
        };
        let e = egress_audit("a1", task, &allowed).unwrap();
        assert_eq!(e.who, "a1");
        assert_eq!(e.action, "egress.allowed");
        assert_eq!(e.target, task.to_string());
        assert_eq!(
            e.detail,
            "destination registry.opentofu.org:443 address 192.0.2.10:443 allowed: rule \
             registry.opentofu.org:443; 1200 bytes up, 34000 bytes down, 250 ms"
        );
        let denied = EventKind::Egress {
            destination: "169.254.169.254:80".into(),
            address: None,
            allowed: false,
            detail: "link-local address refused".into(),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        };
        let e = egress_audit("a1", task, &denied).unwrap();
        assert_eq!(e.action, "egress.denied");
        assert!(
            e.detail.starts_with(
                "destination 169.254.169.254:80 address - denied: link-local address refused;"
            ),
            "{}",
            e.detail
        );
        let other = EventKind::StepStarted {
            step: "init".into(),
        };
        assert!(egress_audit("a1", task, &other).is_none());
    }

    #[test]
    fn direct_apply_runs_as_self_approving_plan() {
        let t = TaskRow {
            id: Uuid::from_u128(1),
            op: Op::Apply,
            workspace: "w".into(),
            pool: "p".into(),
            state: TaskState::Queued,
            outcome: None,
            reason: None,
            summary: None,
            agent: None,
            inputs: Default::default(),
            archive: StoredBlob {
                blob: "b".into(),
                size: 3,
                sha256: "a".repeat(64),
            },
            plan: None,
            parent: None,
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
        };
        let spec = spec_for(&t, Secrets::default());
        assert_eq!(spec.op, Op::Plan);
        assert!(spec.auto_approve);
        assert!(spec.validate().is_ok());
        let mut approved = t.clone();
        approved.plan = Some(StoredBlob {
            blob: "p".into(),
            size: 5,
            sha256: "b".repeat(64),
        });
        let spec = spec_for(&approved, Secrets::default());
        assert_eq!(spec.op, Op::Apply);
        assert!(!spec.auto_approve);
        assert_eq!(spec.plan.unwrap().sha256, "b".repeat(64));
    }
}
