//! The task lifecycle on the link side: slots, Accept/Reject, input chunks and their verification,
//! sequencing and acknowledgement of everything a task reports, resend after a reconnect, cancel,
//! and the state-backend relay.
//!
//! [`TaskManager`] is shared by the link (which feeds it the control plane's messages and pulls
//! frames to send) and by one driver per running task (which turns the executor's
//! [`TaskOutput`]s into sequenced frames). Execution itself is behind the [`Executor`] trait: the
//! Docker sandbox in the daemon, a fake in tests.
//!
//! Rules this module keeps: a dropped connection never stops a running task (its output waits in
//! the task's [`Outbox`]); a plan whose hash differs from the approved one never reaches the
//! executor; `done` is the last sequenced message and is sent only after the result; a task is
//! forgotten once `done` is acknowledged. It never logs task output or secrets.
//!
//! With a [`Spool`] ([`TaskManager::with_spool`]), every sequenced message is appended to the
//! task's encrypted spool before it enters the outbox, and the task's journal (spec without
//! secret values, then the executor's [`ExecJournal`] updates) is appended in order with them.
//! A task is listed in Hello from the moment it runs until its `done` is acknowledged, also
//! across agent restarts: tasks reloaded from the spool resend from Welcome's resume point,
//! running ones are handed to [`Executor::resume`], and a task whose spool failed its integrity
//! check ends `lost` with the error as its reason. While the spool is full, the task's driver
//! waits (so the executor's bounded channel fills and its log reader stops reading). Spool
//! appends happen under the task table's lock: one `write` of sealed records (plus `fdatasync`
//! for a journal); the lock is never held across an await.

pub mod inputs;
pub mod lifecycle;
pub mod outbox;

pub use lifecycle::{InvalidTransition, Phase};
pub use outbox::{Outbox, OutboxError, WireFrame};

use crate::spool::journal::{ExecJournal, TaskJournal};
use crate::spool::record::RecordBody;
use crate::spool::{LoadedTask, Spool, TaskSpool};
use crate::task_io::{StateReply, TaskInputs, TaskOutput, TaskOutputTx, TaskResult};
use base64::Engine;
use bytes::Bytes;
use delegate_protocol::{
    encode_binary, encode_text, Accept, Ack, BinaryFrame, Cancel, ChunkFrame, ChunkKind, Done,
    ErrorCode, ErrorMsg, Event, HeldTask, Message, Op, Outcome, Reject, ResumePoint, StateMethod,
    StateRequest, StateResponse, Summary, TaskSpec,
};
use futures_util::future::BoxFuture;
use inputs::{InputAssembly, Progress};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

/// Runs a task whose inputs were verified. Implemented over the Docker sandbox by the daemon and
/// by fakes in tests.
pub trait Executor: Send + Sync + 'static {
    /// `Ok` when tasks can start now; otherwise the reason every Assign is rejected with (e.g. the
    /// container engine cannot be reached).
    fn availability(&self) -> Result<(), String>;

    /// Run the task to its end, reporting through `out`. `cancel` fires on a `cancel` message.
    fn run(
        &self,
        inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult>;

    /// Finish a task that was running when the agent stopped, from its journal (its containers
    /// may still be running). The default cannot: the task ends `lost`.
    fn resume(
        &self,
        journal: TaskJournal,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        drop((journal, out, cancel));
        Box::pin(async {
            TaskResult {
                outcome: Outcome::Lost,
                reason: Some(
                    "the agent restarted while the task ran and this agent cannot resume tasks"
                        .into(),
                ),
                summary: Summary::default(),
            }
        })
    }
}

/// How often "the spool is full" may be logged.
const SPOOL_FULL_LOG_EVERY: Duration = Duration::from_secs(30);

/// Largest payload of an outbound log or artifact chunk frame.
pub const OUT_CHUNK: usize = 256 * 1024;

/// Tunables of the task side.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// Tasks run at once (advertised in Hello).
    pub slots: u32,
    /// How long an accepted task waits for its input chunks before it fails.
    pub inputs_timeout: Duration,
    /// How long a relayed state request waits (for the link to come up and for the answer)
    /// before tofu is answered 503.
    pub state_timeout: Duration,
    /// Unacknowledged bytes a task may hold before its output reader is made to wait.
    pub outbox_limit: usize,
    /// Capacity of the channel from the executor.
    pub output_buffer: usize,
    /// Refuse an Assign whose archive is larger than this.
    pub max_archive_bytes: Option<u64>,
}

impl TaskSettings {
    pub fn new(slots: u32) -> Self {
        TaskSettings {
            slots,
            inputs_timeout: Duration::from_secs(600),
            state_timeout: Duration::from_secs(60),
            outbox_limit: 64 * 1024 * 1024,
            output_buffer: 64,
            max_archive_bytes: None,
        }
    }
}

struct Entry {
    phase: Phase,
    /// Unknown for a task reloaded from the spool without a journal.
    op: Option<Op>,
    outbox: Outbox,
    /// Where the task's messages are persisted (none without a spool, or after a write failed).
    spool: Option<TaskSpool>,
    /// The latest journal, once the task runs.
    journal: Option<TaskJournal>,
    /// Reloaded from a damaged spool: once the control plane says where it stands, the task ends
    /// `lost` with this reason.
    broken: Option<String>,
    cancel: CancellationToken,
    /// Kept until the inputs are complete and the task starts.
    spec: Option<TaskSpec>,
    inputs: Option<InputAssembly>,
    /// Seq of `done`, once queued.
    done_seq: Option<u64>,
}

struct PendingState {
    task_id: Uuid,
    frame: WireFrame,
    sent: bool,
    reply: oneshot::Sender<StateReply>,
}

#[derive(Default)]
struct State {
    tasks: BTreeMap<Uuid, Entry>,
    /// Unsequenced frames for the current connection (accept, reject, error).
    conn: VecDeque<WireFrame>,
    states: BTreeMap<u64, PendingState>,
    connected: bool,
    draining: bool,
    next_request_id: u64,
    /// Round-robin position among task outboxes.
    rr_after: Option<Uuid>,
    spool: Option<Spool>,
    /// Appends waiting for spool space.
    spool_waiters: usize,
    spool_full_logged: Option<tokio::time::Instant>,
}

struct Inner {
    settings: TaskSettings,
    executor: Arc<dyn Executor>,
    state: Mutex<State>,
    /// Something new to send.
    outgoing: Notify,
    /// An outbox shrank (or a task went away).
    space: Notify,
    /// A task was forgotten.
    changed: Notify,
}

/// The link side of all tasks. Cheap to clone.
#[derive(Clone)]
pub struct TaskManager {
    inner: Arc<Inner>,
}

impl TaskManager {
    /// A task manager that keeps unacknowledged output in memory only (tests, embedding).
    pub fn new(settings: TaskSettings, executor: Arc<dyn Executor>) -> Self {
        Self::build(settings, executor, None)
    }

    fn build(settings: TaskSettings, executor: Arc<dyn Executor>, spool: Option<Spool>) -> Self {
        TaskManager {
            inner: Arc::new(Inner {
                settings,
                executor,
                state: Mutex::new(State {
                    next_request_id: 1,
                    spool,
                    ..State::default()
                }),
                outgoing: Notify::new(),
                space: Notify::new(),
                changed: Notify::new(),
            }),
        }
    }

    /// A task manager that spools every sequenced message, taking over the tasks reloaded from
    /// the spool: their output is resent after Welcome, running ones are resumed through the
    /// executor (must be called inside a Tokio runtime), damaged ones end `lost`.
    pub fn with_spool(
        settings: TaskSettings,
        executor: Arc<dyn Executor>,
        spool: Spool,
        loaded: Vec<LoadedTask>,
    ) -> Self {
        let m = Self::build(settings, executor, Some(spool));
        for t in loaded {
            m.inner.restore(t);
        }
        m
    }

    /// Ids of the tasks that run (or are being resumed) now: their Docker objects must stay.
    pub fn running_tasks(&self) -> Vec<Uuid> {
        self.inner
            .lock()
            .tasks
            .iter()
            .filter(|(_, e)| e.phase == Phase::Running)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The spool's figures, when there is one.
    pub fn spool_stats(&self) -> Option<crate::spool::SpoolStats> {
        self.inner.lock().spool.as_ref().map(Spool::stats)
    }

    /// Slots advertised in Hello.
    pub fn slots(&self) -> u32 {
        self.inner.settings.slots
    }

    /// Tasks the agent holds (running, or with unacknowledged output), for Hello.
    pub fn held_tasks(&self) -> Vec<HeldTask> {
        self.inner
            .lock()
            .tasks
            .iter()
            .map(|(id, e)| HeldTask {
                task_id: *id,
                acked_seq: e.outbox.acked(),
            })
            .collect()
    }

    /// Number of tasks holding a slot.
    pub fn busy_slots(&self) -> usize {
        self.inner.lock().busy()
    }

    /// Number of tasks held at all (including those waiting for `done` to be acknowledged).
    pub fn held(&self) -> usize {
        self.inner.lock().tasks.len()
    }

    /// The phase of a task, if held.
    pub fn phase(&self, task_id: Uuid) -> Option<Phase> {
        self.inner.lock().tasks.get(&task_id).map(|e| e.phase)
    }

    /// A connection was established and welcomed: resend everything unacknowledged, starting after
    /// each resume point; drop tasks the control plane does not know.
    pub fn on_connected(&self, resume: &[ResumePoint]) {
        let inner = &self.inner;
        let mut st = inner.lock();
        st.connected = true;
        for e in st.tasks.values_mut() {
            e.outbox.rewind();
        }
        for rp in resume {
            let Some(e) = st.tasks.get_mut(&rp.task_id) else {
                continue;
            };
            if !rp.known {
                info!(task_id = %rp.task_id, "control plane does not know this task; dropping it");
                e.cancel.cancel();
                if let Some(e) = st.tasks.remove(&rp.task_id) {
                    remove_spool(rp.task_id, e.spool);
                }
                continue;
            }
            if rp.acked_seq > MAX_RESUME_SEQ {
                // No task gets near this; numbering on from it would overflow. Not trusted.
                warn!(task_id = %rp.task_id, acked_seq = rp.acked_seq, "resume point out of range; the task ends lost");
                e.cancel.cancel();
                e.phase = Phase::Running;
                st.finish(
                    rp.task_id,
                    Outcome::Lost,
                    Some(format!(
                        "the control plane's resume point for this task ({}) is out of range",
                        rp.acked_seq
                    )),
                    Summary::default(),
                );
                continue;
            }
            if rp.acked_seq > e.outbox.last_seq() {
                // The control plane holds more than we do: our history of it was lost.
                e.outbox.restart_at(rp.acked_seq);
                if let Some(sp) = e.spool.as_mut() {
                    if let Err(err) = sp.reset_at(rp.acked_seq) {
                        warn!(task_id = %rp.task_id, error = %err, "cannot reset the task's spool");
                    }
                }
            } else if let Err(err) = e.outbox.resume_from(rp.acked_seq) {
                warn!(task_id = %rp.task_id, error = %err, "resume point does not fit this task's output");
            }
            if let Some(reason) = e.broken.take() {
                e.phase = Phase::Running;
                st.finish(rp.task_id, Outcome::Lost, Some(reason), Summary::default());
            }
        }
        // Tasks still waiting for their inputs ask for them again; the control plane answers an
        // `accept` for a task it already runs here by sending the inputs from the start.
        let waiting: Vec<Uuid> = st
            .tasks
            .iter()
            .filter(|(_, e)| e.phase.awaits_inputs() && e.spec.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            st.conn
                .push_back(text(&Message::Accept(Accept { task_id: id })));
        }
        st.compact(false);
        st.forget_acked_tasks();
        drop(st);
        inner.space.notify_waiters();
        inner.changed.notify_waiters();
        inner.outgoing.notify_one();
    }

    /// The connection is gone. Running tasks go on; their output waits. Tasks still waiting for
    /// inputs drop what arrived and ask again on the next connection (bounded by the inputs
    /// timeout that started at assignment); relayed state requests that were sent get 503 (their
    /// answer will not arrive).
    pub fn on_disconnected(&self) {
        let mut st = self.inner.lock();
        st.connected = false;
        st.conn.clear();
        let sent: Vec<u64> = st
            .states
            .iter()
            .filter(|(_, p)| p.sent)
            .map(|(id, _)| *id)
            .collect();
        for id in sent {
            if let Some(p) = st.states.remove(&id) {
                let _ = p
                    .reply
                    .send(unavailable("the connection to the control plane was lost"));
            }
        }
        // Inputs cut off with the connection: start over. The next connection asks for them
        // again (`accept` once more), and the control plane sends them from the beginning.
        for (id, e) in st.tasks.iter_mut() {
            if !e.phase.awaits_inputs() {
                continue;
            }
            if let Some(spec) = e.spec.as_ref() {
                if e.phase == Phase::ReceivingInputs {
                    info!(task_id = %id, "inputs interrupted by the lost connection; they will be asked for again");
                }
                e.inputs = Some(InputAssembly::new(spec));
                e.phase = Phase::Received;
            }
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }

    /// Handle a control message about tasks: `assign`, `ack`, `cancel`, `state_response`. Any
    /// other message is answered with `protocol_violation`.
    pub fn handle_message(&self, msg: Message) {
        match msg {
            Message::Assign(a) => self.inner.assign(a.task),
            Message::Ack(a) => self.inner.ack(a),
            Message::Cancel(c) => self.inner.cancel(c),
            Message::StateResponse(r) => self.inner.state_response(r),
            other => self.inner.send_error(
                ErrorCode::ProtocolViolation,
                format!("the agent does not accept {:?} messages", other.type_name()),
                None,
            ),
        }
    }

    /// Handle a binary frame from the control plane: input chunks. A log frame is answered with
    /// `protocol_violation`.
    pub fn handle_binary(&self, frame: BinaryFrame) {
        match frame {
            BinaryFrame::Chunk(c) => self.inner.chunk(c),
            BinaryFrame::Log(l) => self.inner.send_error(
                ErrorCode::ProtocolViolation,
                "log frames flow from the agent to the control plane only".into(),
                Some(l.task_id),
            ),
        }
    }

    /// Queue an `error` for the current connection.
    pub fn send_error(&self, code: ErrorCode, message: String, task_id: Option<Uuid>) {
        self.inner.send_error(code, message, task_id);
    }

    /// The next frame to send on the current connection, marked as sent. Order: connection
    /// replies, state requests, then task outboxes in turn.
    pub fn next_outgoing(&self) -> Option<WireFrame> {
        self.inner.lock().next_outgoing()
    }

    /// Whether [`Self::next_outgoing`] would return something.
    pub fn has_outgoing(&self) -> bool {
        self.inner.lock().has_outgoing()
    }

    /// Resolves when something may have been queued since the last call.
    pub async fn outgoing_ready(&self) {
        self.inner.outgoing.notified().await;
    }

    /// Stop accepting tasks (SIGTERM): every new Assign is rejected.
    pub fn start_draining(&self) {
        self.inner.lock().draining = true;
    }

    /// Cancel every running task (shutdown after the drain timeout). Tasks still waiting for
    /// inputs end as cancelled at once.
    pub fn cancel_all(&self, reason: &str) {
        let ids: Vec<Uuid> = self.inner.lock().tasks.keys().copied().collect();
        for task_id in ids {
            self.inner.cancel(Cancel {
                task_id,
                reason: reason.to_string(),
            });
        }
    }

    /// Resolves once no task is held any more (all `done`s acknowledged).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.lock().tasks.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

fn unavailable(why: &str) -> StateReply {
    StateReply {
        status: 503,
        body: format!("delegate agent: {why}").into_bytes(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn text(msg: &Message) -> WireFrame {
    WireFrame::Text(encode_text(msg))
}

impl State {
    fn busy(&self) -> usize {
        self.tasks.values().filter(|e| e.phase.holds_slot()).count()
    }

    /// Record a task's result: `done` is queued as its last sequenced message.
    fn finish(&mut self, id: Uuid, outcome: Outcome, reason: Option<String>, summary: Summary) {
        let Some(e) = self.tasks.get_mut(&id) else {
            return;
        };
        if let Err(err) = e.phase.advance(Phase::Finishing) {
            warn!(task_id = %id, error = %err, "task result ignored");
            return;
        }
        e.inputs = None;
        e.spec = None;
        let reason = reason.map(|r| truncate(r, delegate_protocol::limits::MAX_TEXT));
        let op = e.op.map(|o| o.to_string()).unwrap_or_default();
        info!(task_id = %id, %op, outcome = outcome.as_str(), reason = reason.as_deref().unwrap_or(""), "task finished");
        let seq = e.outbox.last_seq() + 1;
        let done = text(&Message::Done(Done {
            task_id: id,
            seq,
            outcome,
            reason,
            summary: Some(summary),
        }));
        let _ = e.commit(id, vec![(done, true)], false);
        e.done_seq = Some(seq);
    }

    /// Delete what acknowledgements freed in every task's spool. `pressure`: appends wait.
    fn compact(&mut self, pressure: bool) {
        let pressure = pressure || self.spool_waiters > 0;
        for (id, e) in self.tasks.iter_mut() {
            let acked = e.outbox.acked();
            if let Some(sp) = e.spool.as_mut() {
                if let Err(err) = sp.ack(acked, pressure) {
                    warn!(task_id = %id, error = %err, "cannot delete acknowledged spool files");
                }
            }
        }
    }

    /// Forget tasks whose `done` was acknowledged.
    fn forget_acked_tasks(&mut self) {
        let finished: Vec<Uuid> = self
            .tasks
            .iter()
            .filter(|(_, e)| e.done_seq.is_some_and(|d| e.outbox.acked() >= d))
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            if let Some(mut e) = self.tasks.remove(&id) {
                let _ = e.phase.advance(Phase::Done);
                remove_spool(id, e.spool.take());
                debug!(task_id = %id, "task done and acknowledged; forgotten");
            }
        }
    }

    fn has_outgoing(&self) -> bool {
        self.connected
            && (!self.conn.is_empty()
                || self.states.values().any(|p| !p.sent)
                || self.tasks.values().any(|e| e.outbox.has_unsent()))
    }

    fn next_outgoing(&mut self) -> Option<WireFrame> {
        if !self.connected {
            return None;
        }
        if let Some(f) = self.conn.pop_front() {
            return Some(f);
        }
        if let Some(p) = self.states.values_mut().find(|p| !p.sent) {
            p.sent = true;
            return Some(p.frame.clone());
        }
        // Round robin over the tasks, starting after the last one served.
        let start = self.rr_after;
        let after = start
            .map(|s| {
                self.tasks
                    .range((std::ops::Bound::Excluded(s), std::ops::Bound::Unbounded))
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let before: Vec<Uuid> = self
            .tasks
            .keys()
            .copied()
            .filter(|id| start.is_none_or(|s| *id <= s))
            .collect();
        for id in after.into_iter().chain(before) {
            if let Some(f) = self.tasks.get_mut(&id).and_then(|e| e.outbox.next_unsent()) {
                self.rr_after = Some(id);
                return Some(f);
            }
        }
        None
    }
}

/// Why the task's secrets cannot be used: one the log redactor cannot match safely (too short
/// or too long). Names the secret, never its value.
fn secret_problem(spec: &TaskSpec) -> Option<String> {
    spec.secrets.0.iter().find_map(|(name, value)| {
        crate::redact::validate_secret(value)
            .err()
            .map(|p| format!("secret {name} refused: {p}"))
    })
}

/// Delete a finished task's spool files.
fn remove_spool(id: Uuid, spool: Option<TaskSpool>) {
    if let Some(sp) = spool {
        if let Err(err) = sp.remove() {
            warn!(task_id = %id, error = %err, "cannot delete the task's spool files");
        }
    }
}

impl Entry {
    fn new(op: Option<Op>, spool: Option<TaskSpool>) -> Entry {
        Entry {
            phase: Phase::Received,
            op,
            outbox: Outbox::new(),
            spool,
            journal: None,
            broken: None,
            cancel: CancellationToken::new(),
            spec: None,
            inputs: None,
            done_seq: None,
        }
    }

    /// Record frames numbered from `outbox.last_seq() + 1` (`true`: the task's `done`) and, with
    /// `journal`, the task's journal after them: one spool write first, then the outbox. If the
    /// spool cannot be written, the task goes on in memory only (its spool files are deleted, so
    /// a restart reports it lost instead of resuming from a hole) and the error is returned.
    fn commit(
        &mut self,
        id: Uuid,
        frames: Vec<(WireFrame, bool)>,
        journal: bool,
    ) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(sp) = self.spool.as_mut() {
            let first = self.outbox.last_seq() + 1;
            let mut batch: Vec<RecordBody> = frames
                .iter()
                .zip(first..)
                .map(|((frame, done), seq)| RecordBody::Frame {
                    seq,
                    frame: frame.clone(),
                    done: *done,
                })
                .collect();
            if let Some(j) = self.journal.as_ref().filter(|_| journal) {
                batch.push(RecordBody::Journal {
                    after_seq: first + frames.len() as u64 - 1,
                    json: j.to_json(),
                });
            }
            let appended = sp.append(&batch, false);
            if let Err(err) = appended {
                error!(
                    task_id = %id,
                    error = %err,
                    "cannot write to the spool: this task's output is now kept in memory only and is lost if the agent stops"
                );
                remove_spool(id, self.spool.take());
                result = Err(err.to_string());
            }
        }
        for (frame, _) in frames {
            self.outbox.push_frame(frame);
        }
        result
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, frame: WireFrame) {
        let mut st = self.lock();
        if st.connected {
            st.conn.push_back(frame);
        }
        drop(st);
        self.outgoing.notify_one();
    }

    /// Take over a task reloaded from the spool.
    fn restore(self: &Arc<Self>, t: LoadedTask) {
        let id = t.task;
        let op = t.journal.as_ref().map(|j| j.spec.op);
        let mut e = Entry::new(op, Some(t.spool));
        e.outbox = Outbox::restore(t.acked, t.frames.into_iter().map(|(_, f)| f));
        e.journal = t.journal.clone();
        let mut st = self.lock();
        if let Some(reason) = t.broken {
            error!(task_id = %id, %reason, "the task's spool is damaged; the task will be reported lost");
            e.phase = Phase::Finishing;
            e.broken = Some(format!(
                "the agent restarted and this task's spool could not be read, so its output and \
                 progress after the last acknowledged message are lost: {reason}"
            ));
        } else if let Some(done) = t.done_seq {
            info!(task_id = %id, "task finished before the agent stopped; resending what was not acknowledged");
            e.phase = Phase::Finishing;
            e.done_seq = Some(done);
        } else if let Some(journal) = t.journal {
            info!(task_id = %id, op = %journal.spec.op, "task was running when the agent stopped; resuming it");
            e.phase = Phase::Running;
            let cancel = e.cancel.clone();
            let executor = self.executor.clone();
            tokio::spawn(drive(self.clone(), id, move |tx| {
                executor.resume(journal, tx, cancel)
            }));
        } else {
            e.phase = Phase::Finishing;
            e.broken = Some("the agent restarted before the task started running".into());
        }
        st.tasks.insert(id, e);
    }

    fn send_error(&self, code: ErrorCode, message: String, task_id: Option<Uuid>) {
        self.queue(text(&Message::Error(ErrorMsg {
            code,
            message: truncate(message, delegate_protocol::limits::MAX_TEXT),
            task_id,
        })));
    }

    fn assign(self: &Arc<Self>, spec: TaskSpec) {
        let id = spec.task_id;
        // Ask the executor first: it may take its own lock.
        let available = self.executor.availability();
        let mut st = self.lock();
        if st.tasks.contains_key(&id) {
            drop(st);
            self.send_error(
                ErrorCode::ProtocolViolation,
                format!("task {id} is already held by this agent"),
                Some(id),
            );
            return;
        }
        let refusal = if st.draining {
            Some("agent is shutting down".to_string())
        } else if let Err(why) = available {
            Some(why)
        } else if st.busy() >= self.settings.slots as usize {
            Some("no free slot".to_string())
        } else {
            match self.settings.max_archive_bytes {
                Some(max) if spec.archive.size > max => Some(format!(
                    "workspace archive of {} bytes exceeds this agent's limit of {max} bytes",
                    spec.archive.size
                )),
                _ => None,
            }
        };
        if let Some(reason) = refusal {
            info!(task_id = %id, op = %spec.op, %reason, "task rejected");
            if st.connected {
                st.conn.push_back(text(&Message::Reject(Reject {
                    task_id: id,
                    reason: truncate(reason, delegate_protocol::limits::MAX_TEXT),
                })));
            }
            drop(st);
            self.outgoing.notify_one();
            return;
        }
        info!(task_id = %id, op = %spec.op, workspace = %spec.workspace, "task accepted");
        let spool = st.spool.as_ref().map(|s| s.task(id));
        let mut entry = Entry::new(Some(spec.op), spool);
        entry.inputs = Some(InputAssembly::new(&spec));
        entry.spec = Some(spec);
        st.tasks.insert(id, entry);
        if st.connected {
            st.conn
                .push_back(text(&Message::Accept(Accept { task_id: id })));
        }
        drop(st);
        self.outgoing.notify_one();

        let weak = Arc::downgrade(self);
        let timeout = self.settings.inputs_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(inner) = weak.upgrade() {
                inner.inputs_timed_out(id, timeout);
            }
        });
    }

    fn inputs_timed_out(&self, id: Uuid, after: Duration) {
        let mut st = self.lock();
        if st.tasks.get(&id).is_some_and(|e| e.phase.awaits_inputs()) {
            st.finish(
                id,
                Outcome::Failed,
                Some(format!(
                    "the task's inputs did not arrive within {}",
                    humantime::format_duration(after)
                )),
                Summary::default(),
            );
            drop(st);
            self.outgoing.notify_one();
            self.changed.notify_waiters();
        }
    }

    fn chunk(self: &Arc<Self>, chunk: ChunkFrame) {
        let id = chunk.task_id;
        let mut st = self.lock();
        let Some(e) = st.tasks.get_mut(&id) else {
            drop(st);
            self.send_error(
                ErrorCode::ProtocolViolation,
                format!("input chunk for task {id}, which this agent does not hold"),
                Some(id),
            );
            return;
        };
        if !e.phase.awaits_inputs() {
            let phase = e.phase;
            drop(st);
            self.send_error(
                ErrorCode::ProtocolViolation,
                format!("input chunk for task {id}, which is not receiving inputs ({phase:?})"),
                Some(id),
            );
            return;
        }
        let progress = match e.inputs.as_mut() {
            Some(asm) => asm.push(&chunk),
            None => return,
        };
        match progress {
            Ok(Progress::NeedMore) => {
                if e.phase == Phase::Received {
                    let _ = e.phase.advance(Phase::ReceivingInputs);
                }
            }
            Ok(Progress::Complete { archive, plan }) => {
                let Some(spec) = e.spec.take() else {
                    return;
                };
                if let Some(problem) = secret_problem(&spec) {
                    st.finish(id, Outcome::Failed, Some(problem), Summary::default());
                    drop(st);
                    self.outgoing.notify_one();
                    self.changed.notify_waiters();
                    return;
                }
                if let Err(err) = e.phase.advance(Phase::Running) {
                    warn!(task_id = %id, error = %err, "cannot start task");
                    return;
                }
                e.inputs = None;
                // From here on the task is listed in Hello, also after a restart.
                e.journal = Some(TaskJournal::new(&spec, plan.is_some(), now_ms()));
                let _ = e.commit(id, Vec::new(), true);
                let cancel = e.cancel.clone();
                drop(st);
                info!(task_id = %id, "inputs verified; task running");
                let inputs = TaskInputs {
                    spec,
                    archive,
                    plan,
                };
                let executor = self.executor.clone();
                tokio::spawn(drive(self.clone(), id, move |tx| {
                    executor.run(inputs, tx, cancel)
                }));
            }
            Err(err) => {
                warn!(task_id = %id, error = %err, "task inputs refused");
                st.finish(
                    id,
                    Outcome::Failed,
                    Some(err.to_string()),
                    Summary::default(),
                );
                drop(st);
                self.outgoing.notify_one();
                self.changed.notify_waiters();
            }
        }
    }

    fn ack(&self, ack: Ack) {
        let mut st = self.lock();
        let Some(e) = st.tasks.get_mut(&ack.task_id) else {
            debug!(task_id = %ack.task_id, seq = ack.seq, "ack for a task no longer held");
            return;
        };
        match e.outbox.ack(ack.seq) {
            Ok(0) => {}
            Ok(_) => {
                let acked = e.outbox.acked();
                let pressure = st.spool_waiters > 0;
                if let Some(e) = st.tasks.get_mut(&ack.task_id) {
                    if let Some(sp) = e.spool.as_mut() {
                        if let Err(err) = sp.ack(acked, pressure) {
                            warn!(task_id = %ack.task_id, error = %err, "cannot delete acknowledged spool files");
                        }
                    }
                }
                st.forget_acked_tasks();
                drop(st);
                self.space.notify_waiters();
                self.changed.notify_waiters();
            }
            Err(err) => {
                drop(st);
                warn!(task_id = %ack.task_id, error = %err, "bad ack");
                self.send_error(
                    ErrorCode::ProtocolViolation,
                    err.to_string(),
                    Some(ack.task_id),
                );
            }
        }
    }

    fn cancel(&self, c: Cancel) {
        let mut st = self.lock();
        let Some(e) = st.tasks.get_mut(&c.task_id) else {
            debug!(task_id = %c.task_id, "cancel for a task not held");
            return;
        };
        info!(task_id = %c.task_id, reason = %c.reason, "task cancel requested");
        match e.phase {
            Phase::Running => e.cancel.cancel(),
            Phase::Received | Phase::ReceivingInputs => {
                st.finish(
                    c.task_id,
                    Outcome::Cancelled,
                    Some(format!("cancelled before it started: {}", c.reason)),
                    Summary::default(),
                );
                drop(st);
                self.outgoing.notify_one();
                self.changed.notify_waiters();
            }
            Phase::Finishing | Phase::Done => {}
        }
    }

    fn state_response(&self, r: StateResponse) {
        let Some(p) = self.lock().states.remove(&r.request_id) else {
            debug!(
                request_id = r.request_id,
                "state response for no pending request"
            );
            return;
        };
        let reply = match r
            .body_b64
            .as_deref()
            .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        {
            None => StateReply {
                status: r.status,
                body: Vec::new(),
            },
            Some(Ok(body)) => StateReply {
                status: r.status,
                body,
            },
            Some(Err(_)) => StateReply {
                status: 502,
                body: b"delegate agent: the control plane's state response body is not base64"
                    .to_vec(),
            },
        };
        debug!(task_id = %p.task_id, request_id = r.request_id, status = r.status, "state response relayed");
        let _ = p.reply.send(reply);
    }

    /// Wait until the task's outbox and the spool have room (or the task is gone). While the
    /// spool is full this holds the task's driver, so the executor's bounded channel fills and
    /// its log reader stops reading: back-pressure instead of dropped output.
    async fn wait_space(&self, id: Uuid) {
        let mut waiting = false;
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.still_full(id, &mut waiting) {
                return;
            }
            notified.await;
        }
    }

    /// One look for [`Self::wait_space`]: whether the task must wait. `waiting` tracks whether
    /// it is counted among the spool's waiters.
    fn still_full(&self, id: Uuid, waiting: &mut bool) -> bool {
        let mut st = self.lock();
        let held = st.tasks.contains_key(&id);
        let outbox_full = st
            .tasks
            .get(&id)
            .is_some_and(|e| e.outbox.unacked_bytes() >= self.settings.outbox_limit);
        let mut spool_full = held && st.spool.as_ref().is_some_and(Spool::is_full);
        if spool_full && !*waiting {
            *waiting = true;
            st.spool_waiters += 1;
            if let Some(s) = &st.spool {
                s.note_wait();
            }
            // Free what acknowledgements allow before waiting for more of them.
            st.compact(true);
            spool_full = st.spool.as_ref().is_some_and(Spool::is_full);
            let now = tokio::time::Instant::now();
            if spool_full
                && st
                    .spool_full_logged
                    .is_none_or(|t| now.duration_since(t) >= SPOOL_FULL_LOG_EVERY)
            {
                st.spool_full_logged = Some(now);
                if let Some(s) = &st.spool {
                    warn!(
                        task_id = %id,
                        spool_bytes = s.usage(),
                        max_bytes = s.max_bytes(),
                        "spool full: task output waits for the control plane's acknowledgements (tofu is held back, nothing is dropped)"
                    );
                }
            }
        }
        if outbox_full || spool_full {
            return true;
        }
        if *waiting {
            *waiting = false;
            st.spool_waiters = st.spool_waiters.saturating_sub(1);
        }
        false
    }

    /// Append sequenced messages to the task's spool and outbox; `build` receives the seq of
    /// the first. With `journal`, the task's journal follows them in the same spool write.
    async fn push_many(
        &self,
        id: Uuid,
        with_journal: bool,
        exec: Option<ExecJournal>,
        build: impl FnOnce(u64) -> Vec<WireFrame>,
    ) -> Result<(), String> {
        self.wait_space(id).await;
        let mut st = self.lock();
        let Some(e) = st.tasks.get_mut(&id) else {
            return Err("the task is no longer held".into());
        };
        let frames = build(e.outbox.last_seq() + 1);
        if let (Some(exec), Some(j)) = (exec, e.journal.as_mut()) {
            j.exec = Some(exec);
        }
        let result = e.commit(
            id,
            frames.into_iter().map(|f| (f, false)).collect(),
            with_journal,
        );
        drop(st);
        self.outgoing.notify_one();
        result
    }

    /// Append one sequenced message to the task's spool and outbox.
    async fn push(&self, id: Uuid, build: impl FnOnce(u64) -> WireFrame) {
        let _ = self
            .push_many(id, false, None, |seq| vec![build(seq)])
            .await;
    }

    async fn output(self: &Arc<Self>, id: Uuid, out: TaskOutput) {
        match out {
            TaskOutput::Log { stream, data } => {
                for piece in data.chunks(OUT_CHUNK) {
                    self.push(id, |seq| {
                        WireFrame::Binary(Bytes::from(delegate_protocol::binary::encode_log(
                            &id, seq, stream, piece,
                        )))
                    })
                    .await;
                }
            }
            TaskOutput::Event(event) => {
                self.push(id, |seq| {
                    text(&Message::Event(Event {
                        task_id: id,
                        seq,
                        at_ms: now_ms(),
                        event,
                    }))
                })
                .await;
            }
            TaskOutput::Artifact { kind, data } => self.artifact(id, kind, data).await,
            TaskOutput::Journal { exec, saved } => {
                let result = if self.lock().spool.is_some() {
                    self.push_many(id, true, Some(*exec), |_| Vec::new()).await
                } else {
                    Ok(())
                };
                let _ = saved.send(result);
            }
            TaskOutput::State {
                method,
                lock_id,
                body,
                reply,
            } => self.relay_state(id, method, lock_id, body, reply),
        }
    }

    async fn artifact(&self, id: Uuid, kind: ChunkKind, data: Vec<u8>) {
        let sha256 = inputs::sha256_hex(&data);
        let size = data.len() as u64;
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(OUT_CHUNK).collect()
        };
        let n = pieces.len();
        // One spool write for all chunks, the `artifact` message and the journal noting it: after
        // a crash the artifact is in the spool whole or not at all, so it is never sent twice.
        let exec = {
            let mut st = self.lock();
            st.tasks.get_mut(&id).and_then(|e| {
                let j = e.journal.as_mut()?;
                if !j.artifacts.contains(&kind) {
                    j.artifacts.push(kind);
                }
                Some(j.exec.clone())
            })
        };
        let noted = exec.is_some();
        let build = |first: u64| {
            let mut frames: Vec<WireFrame> = pieces
                .into_iter()
                .zip(first..)
                .enumerate()
                .map(|(i, (piece, seq))| {
                    WireFrame::Binary(Bytes::from(encode_binary(&BinaryFrame::Chunk(
                        ChunkFrame {
                            task_id: id,
                            seq,
                            kind,
                            last: i + 1 == n,
                            data: piece.to_vec(),
                        },
                    ))))
                })
                .collect();
            frames.push(text(&Message::Artifact(delegate_protocol::Artifact {
                task_id: id,
                seq: first + n as u64,
                kind,
                size,
                sha256,
            })));
            frames
        };
        let _ = self.push_many(id, noted, exec.flatten(), build).await;
    }

    fn relay_state(
        self: &Arc<Self>,
        task_id: Uuid,
        method: StateMethod,
        lock_id: Option<String>,
        body: Option<Vec<u8>>,
        reply: oneshot::Sender<StateReply>,
    ) {
        if body
            .as_ref()
            .is_some_and(|b| b.len() > delegate_protocol::limits::MAX_STATE_BYTES)
        {
            let _ = reply.send(StateReply {
                status: 413,
                body: format!(
                    "delegate agent: state bodies are limited to {} bytes",
                    delegate_protocol::limits::MAX_STATE_BYTES
                )
                .into_bytes(),
            });
            return;
        }
        let body_b64 = body.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        let mut st = self.lock();
        let request_id = st.next_request_id;
        st.next_request_id += 1;
        let frame = text(&Message::StateRequest(StateRequest {
            task_id,
            request_id,
            method,
            lock_id,
            body_b64,
        }));
        st.states.insert(
            request_id,
            PendingState {
                task_id,
                frame,
                sent: false,
                reply,
            },
        );
        drop(st);
        self.outgoing.notify_one();
        let weak: Weak<Inner> = Arc::downgrade(self);
        let timeout = self.settings.state_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(inner) = weak.upgrade() {
                if let Some(p) = inner.lock().states.remove(&request_id) {
                    warn!(task_id = %p.task_id, request_id, "state request unanswered; replying 503");
                    let _ = p
                        .reply
                        .send(unavailable("no answer from the control plane in time"));
                }
            }
        });
    }

    fn finish(&self, id: Uuid, result: TaskResult) {
        self.lock()
            .finish(id, result.outcome, result.reason, result.summary);
        self.outgoing.notify_one();
        self.changed.notify_waiters();
    }
}

/// Highest resume point taken from a control plane (2^48 messages: centuries of output); above
/// it the agent could not number on without overflowing.
const MAX_RESUME_SEQ: u64 = 1 << 48;

/// Log output merged into one message at most (see [`coalesce`]).
pub const COALESCE_BYTES: usize = 64 * 1024;

/// Merge the log output of the same stream already waiting behind `first` into one message, up
/// to [`COALESCE_BYTES`]: a chatty step then costs a frame and a spool record per burst instead
/// of per line. Only what is already queued is taken, so nothing waits for more output; the
/// first message of another kind or stream is left in `held`, so order is kept.
fn coalesce(
    first: TaskOutput,
    rx: &mut mpsc::Receiver<TaskOutput>,
    held: &mut Option<TaskOutput>,
) -> TaskOutput {
    let TaskOutput::Log { stream, data } = first else {
        return first;
    };
    if data.len() >= COALESCE_BYTES {
        return TaskOutput::Log { stream, data };
    }
    let mut merged: Option<bytes::BytesMut> = None;
    let mut len = data.len();
    loop {
        match rx.try_recv() {
            Ok(TaskOutput::Log {
                stream: s,
                data: more,
            }) if s == stream && len + more.len() <= COALESCE_BYTES => {
                len += more.len();
                merged
                    .get_or_insert_with(|| {
                        let mut b = bytes::BytesMut::with_capacity(COALESCE_BYTES);
                        b.extend_from_slice(&data);
                        b
                    })
                    .extend_from_slice(&more);
            }
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    TaskOutput::Log {
        stream,
        data: merged.map(|b| b.freeze()).unwrap_or(data),
    }
}

/// Run one task on the executor (`start` starts or resumes it) and turn its output into
/// sequenced messages; `done` last.
async fn drive(
    inner: Arc<Inner>,
    id: Uuid,
    start: impl FnOnce(TaskOutputTx) -> BoxFuture<'static, TaskResult>,
) {
    let (tx, mut rx) = mpsc::channel(inner.settings.output_buffer.max(1));
    // Its own task, so a panic in the executor becomes a failed task, not a stuck one.
    let mut run = tokio::spawn(start(tx));
    let mut held: Option<TaskOutput> = None;
    let joined = loop {
        let next = match held.take() {
            Some(out) => Some(out),
            None => tokio::select! {
                out = rx.recv() => out,
                joined = &mut run => break joined,
            },
        };
        match next {
            Some(out) => {
                let out = coalesce(out, &mut rx, &mut held);
                inner.output(id, out).await
            }
            None => break (&mut run).await,
        }
    };
    loop {
        let out = match held.take() {
            Some(out) => out,
            None => match rx.try_recv() {
                Ok(out) => out,
                Err(_) => break,
            },
        };
        let out = coalesce(out, &mut rx, &mut held);
        inner.output(id, out).await;
    }
    let result = joined.unwrap_or_else(|e| {
        warn!(task_id = %id, error = %e, "task executor stopped unexpectedly");
        TaskResult {
            outcome: Outcome::Failed,
            reason: Some("internal error: the agent's task runner stopped unexpectedly".into()),
            summary: Summary::default(),
        }
    });
    inner.finish(id, result);
}

#[cfg(test)]
mod tests;
