//! TaskManager driven without a network: messages in, frames out, a scripted executor.

use super::*;
use delegate_protocol::{
    decode_binary, decode_text, Assign, BlobRef, EventKind, Frame, LogStream, Secrets,
};
use inputs::sha256_hex;

/// One call of the fake executor, handed to the test to script.
struct Run {
    inputs: TaskInputs,
    out: TaskOutputTx,
    cancel: CancellationToken,
    finish: oneshot::Sender<TaskResult>,
}

struct Fake {
    runs: mpsc::UnboundedSender<Run>,
    available: Mutex<Result<(), String>>,
    resumes: Mutex<Option<mpsc::UnboundedSender<Resumed>>>,
}

/// One `resume` call of the fake executor.
struct Resumed {
    journal: TaskJournal,
    out: TaskOutputTx,
    finish: oneshot::Sender<TaskResult>,
}

impl Executor for Fake {
    fn availability(&self) -> Result<(), String> {
        self.available.lock().unwrap().clone()
    }
    fn run(
        &self,
        inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let (finish, result) = oneshot::channel();
        let _ = self.runs.send(Run {
            inputs,
            out,
            cancel,
            finish,
        });
        Box::pin(async move {
            match result.await {
                Ok(r) => r,
                Err(_) => panic!("the test dropped the run"),
            }
        })
    }
    fn resume(
        &self,
        journal: TaskJournal,
        out: TaskOutputTx,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let (finish, result) = oneshot::channel();
        if let Some(tx) = self.resumes.lock().unwrap().as_ref() {
            let _ = tx.send(Resumed {
                journal,
                out,
                finish,
            });
        }
        Box::pin(async move {
            result.await.unwrap_or(TaskResult {
                outcome: Outcome::Lost,
                reason: Some("fake cannot resume".into()),
                summary: Summary::default(),
            })
        })
    }
}

struct Harness {
    m: TaskManager,
    fake: Arc<Fake>,
    runs: mpsc::UnboundedReceiver<Run>,
}

fn harness(settings: TaskSettings) -> Harness {
    let (tx, runs) = mpsc::unbounded_channel();
    let fake = Arc::new(Fake {
        runs: tx,
        available: Mutex::new(Ok(())),
        resumes: Mutex::new(None),
    });
    let m = TaskManager::new(settings, fake.clone());
    m.on_connected(&[]);
    Harness { m, fake, runs }
}

fn spec(id: u128, archive: &[u8], plan: Option<&[u8]>) -> TaskSpec {
    TaskSpec {
        task_id: Uuid::from_u128(id),
        op: if plan.is_some() { Op::Apply } else { Op::Plan },
        workspace: "hello".into(),
        auto_approve: false,
        vars: BTreeMap::new(),
        var_files: vec![],
        env: BTreeMap::new(),
        secrets: Secrets::default(),
        archive: BlobRef {
            size: archive.len() as u64,
            sha256: sha256_hex(archive),
        },
        plan: plan.map(|p| BlobRef {
            size: p.len() as u64,
            sha256: sha256_hex(p),
        }),
        timeout_secs: 0,
        egress: vec![],
    }
}

fn chunk(id: u128, kind: ChunkKind, seq: u64, last: bool, data: &[u8]) -> BinaryFrame {
    BinaryFrame::Chunk(ChunkFrame {
        task_id: Uuid::from_u128(id),
        seq,
        kind,
        last,
        data: data.to_vec(),
    })
}

fn decode(f: WireFrame) -> Frame {
    match f {
        WireFrame::Text(t) => Frame::Control(decode_text(&t).expect("agent sent valid JSON")),
        WireFrame::Binary(b) => Frame::Binary(decode_binary(&b).expect("agent sent a valid frame")),
    }
}

/// Everything queued right now.
fn sent(m: &TaskManager) -> Vec<Frame> {
    std::iter::from_fn(|| m.next_outgoing())
        .map(decode)
        .collect()
}

/// The next frame, waiting for it to be queued.
async fn next(m: &TaskManager) -> Frame {
    loop {
        if let Some(f) = m.next_outgoing() {
            return decode(f);
        }
        tokio::time::timeout(Duration::from_secs(30), m.outgoing_ready())
            .await
            .expect("nothing was queued");
    }
}

fn seq_of(f: &Frame) -> Option<u64> {
    match f {
        Frame::Control(Message::Event(e)) => Some(e.seq),
        Frame::Control(Message::Artifact(a)) => Some(a.seq),
        Frame::Control(Message::Done(d)) => Some(d.seq),
        Frame::Binary(b) => Some(b.seq()),
        _ => None,
    }
}

fn ack(id: u128, seq: u64) -> Message {
    Message::Ack(Ack {
        task_id: Uuid::from_u128(id),
        seq,
    })
}

/// Assign + all input chunks; returns the executor's run.
async fn start(h: &mut Harness, id: u128, archive: &[u8]) -> Run {
    h.m.handle_message(Message::Assign(Assign {
        task: spec(id, archive, None),
    }));
    assert_eq!(
        sent(&h.m),
        vec![Frame::Control(Message::Accept(Accept {
            task_id: Uuid::from_u128(id)
        }))]
    );
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 0, true, archive));
    h.runs.recv().await.expect("task started")
}

fn result(outcome: Outcome) -> TaskResult {
    TaskResult {
        outcome,
        reason: None,
        summary: Summary {
            add: 2,
            ..Summary::default()
        },
    }
}

#[tokio::test]
async fn full_task_flow_with_sequence_numbers() {
    let mut h = harness(TaskSettings::new(2));
    let id = 1;
    let archive = b"workspace archive bytes".repeat(3);
    h.m.handle_message(Message::Assign(Assign {
        task: spec(id, &archive, None),
    }));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Accept(_))]
    ));
    assert_eq!(h.m.phase(Uuid::from_u128(id)), Some(Phase::Received));
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 0, false, &archive[..10]));
    assert_eq!(h.m.phase(Uuid::from_u128(id)), Some(Phase::ReceivingInputs));
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 1, true, &archive[10..]));
    let run = h.runs.recv().await.unwrap();
    assert_eq!(run.inputs.archive, archive);
    assert_eq!(run.inputs.plan, None);
    assert_eq!(h.m.phase(Uuid::from_u128(id)), Some(Phase::Running));

    run.out
        .send(TaskOutput::Event(EventKind::StepStarted {
            step: "init".into(),
        }))
        .await
        .unwrap();
    run.out
        .send(TaskOutput::Log {
            stream: LogStream::Stdout,
            data: Bytes::from_static(b"Initializing...\n"),
        })
        .await
        .unwrap();
    run.out
        .send(TaskOutput::Artifact {
            kind: ChunkKind::Plan,
            data: b"planfile".to_vec(),
        })
        .await
        .unwrap();
    run.finish.send(result(Outcome::Succeeded)).unwrap();

    let mut frames = Vec::new();
    loop {
        let f = next(&h.m).await;
        let is_done = matches!(f, Frame::Control(Message::Done(_)));
        frames.push(f);
        if is_done {
            break;
        }
    }
    let seqs: Vec<u64> = frames.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(matches!(&frames[0], Frame::Control(Message::Event(_))));
    assert!(
        matches!(&frames[1], Frame::Binary(BinaryFrame::Log(l)) if l.data == b"Initializing...\n")
    );
    assert!(
        matches!(&frames[2], Frame::Binary(BinaryFrame::Chunk(c)) if c.last && c.kind == ChunkKind::Plan && c.data == b"planfile")
    );
    match &frames[3] {
        Frame::Control(Message::Artifact(a)) => {
            assert_eq!(
                (a.size, a.sha256.as_str()),
                (8, sha256_hex(b"planfile").as_str())
            );
        }
        other => panic!("{other:?}"),
    }
    match &frames[4] {
        Frame::Control(Message::Done(d)) => {
            assert_eq!(d.outcome, Outcome::Succeeded);
            assert_eq!(d.summary.as_ref().map(|s| s.add), Some(2));
        }
        other => panic!("{other:?}"),
    }
    // The slot is free once the result is known; the task is forgotten once done is acked.
    assert_eq!(h.m.busy_slots(), 0);
    assert_eq!(h.m.phase(Uuid::from_u128(id)), Some(Phase::Finishing));
    h.m.handle_message(ack(id, 4));
    assert_eq!(h.m.held(), 1);
    h.m.handle_message(ack(id, 5));
    assert_eq!(h.m.held(), 0);
    assert!(h.m.held_tasks().is_empty());
    h.m.wait_idle().await;
}

#[tokio::test]
async fn rejects_when_full_unavailable_or_draining() {
    let mut h = harness(TaskSettings::new(1));
    let _run = start(&mut h, 1, b"a").await;
    let reject_reason = |frames: Vec<Frame>| match &frames[..] {
        [Frame::Control(Message::Reject(r))] => r.reason.clone(),
        other => panic!("{other:?}"),
    };
    h.m.handle_message(Message::Assign(Assign {
        task: spec(2, b"b", None),
    }));
    assert_eq!(reject_reason(sent(&h.m)), "no free slot");

    let h = harness(TaskSettings::new(1));
    *h.fake.available.lock().unwrap() =
        Err("docker: cannot connect to /var/run/docker.sock".into());
    h.m.handle_message(Message::Assign(Assign {
        task: spec(3, b"c", None),
    }));
    assert!(reject_reason(sent(&h.m)).contains("docker.sock"));
    assert_eq!(h.m.held(), 0);

    let h = harness(TaskSettings::new(1));
    h.m.start_draining();
    h.m.handle_message(Message::Assign(Assign {
        task: spec(4, b"d", None),
    }));
    assert_eq!(reject_reason(sent(&h.m)), "agent is shutting down");

    let mut settings = TaskSettings::new(1);
    settings.max_archive_bytes = Some(3);
    let h = harness(settings);
    h.m.handle_message(Message::Assign(Assign {
        task: spec(5, b"four", None),
    }));
    assert!(reject_reason(sent(&h.m)).contains("exceeds"));
}

#[tokio::test]
async fn duplicate_assign_is_a_protocol_violation() {
    let mut h = harness(TaskSettings::new(2));
    let _run = start(&mut h, 1, b"a").await;
    h.m.handle_message(Message::Assign(Assign {
        task: spec(1, b"a", None),
    }));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Error(e))] if e.code == ErrorCode::ProtocolViolation
    ));
}

#[tokio::test]
async fn plan_with_wrong_hash_fails_and_never_runs() {
    let mut h = harness(TaskSettings::new(1));
    let id = 7;
    let approved = b"approved plan".to_vec();
    h.m.handle_message(Message::Assign(Assign {
        task: spec(id, b"ws", Some(&approved)),
    }));
    sent(&h.m);
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 0, true, b"ws"));
    h.m.handle_binary(chunk(id, ChunkKind::Plan, 0, true, b"tampered plan"));
    match &sent(&h.m)[..] {
        [Frame::Control(Message::Done(d))] => {
            assert_eq!(d.seq, 1);
            assert_eq!(d.outcome, Outcome::Failed);
            let reason = d.reason.as_deref().unwrap();
            assert!(reason.contains("plan sha256 mismatch"), "{reason}");
            assert!(reason.contains(&sha256_hex(&approved)), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        h.runs.try_recv().is_err(),
        "the executor must never see the plan"
    );
}

#[tokio::test]
async fn apply_with_the_approved_plan_runs_with_it() {
    let mut h = harness(TaskSettings::new(1));
    let plan = b"approved plan".to_vec();
    h.m.handle_message(Message::Assign(Assign {
        task: spec(8, b"ws", Some(&plan)),
    }));
    sent(&h.m);
    h.m.handle_binary(chunk(8, ChunkKind::Workspace, 0, true, b"ws"));
    h.m.handle_binary(chunk(8, ChunkKind::Plan, 0, false, &plan[..4]));
    h.m.handle_binary(chunk(8, ChunkKind::Plan, 1, true, &plan[4..]));
    let run = h.runs.recv().await.unwrap();
    assert_eq!(run.inputs.plan.as_deref(), Some(&plan[..]));
}

#[tokio::test]
async fn output_survives_a_reconnect_and_resumes_after_the_ack() {
    let mut h = harness(TaskSettings::new(1));
    let id = 9;
    let run = start(&mut h, id, b"a").await;
    for i in 0..3 {
        run.out.send(log_line(i)).await.unwrap();
    }
    for want in 1..=3 {
        assert_eq!(seq_of(&next(&h.m).await), Some(want));
    }
    // The link drops; the task keeps running and its output waits.
    h.m.on_disconnected();
    for i in 3..5 {
        run.out.send(log_line(i)).await.unwrap();
    }
    run.finish.send(result(Outcome::Succeeded)).unwrap();
    // Wait for done to be queued (not sendable while disconnected).
    while h.m.phase(Uuid::from_u128(id)) != Some(Phase::Finishing) {
        tokio::task::yield_now().await;
    }
    assert!(h.m.next_outgoing().is_none());
    assert_eq!(
        h.m.held_tasks(),
        vec![HeldTask {
            task_id: Uuid::from_u128(id),
            acked_seq: 0
        }]
    );
    // The control plane stored 1 and 2.
    h.m.on_connected(&[ResumePoint {
        task_id: Uuid::from_u128(id),
        acked_seq: 2,
        known: true,
    }]);
    let seqs: Vec<u64> = sent(&h.m).iter().filter_map(seq_of).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    h.m.handle_message(ack(id, 6));
    assert_eq!(h.m.held(), 0);
}

#[tokio::test]
async fn unknown_task_on_resume_is_dropped_and_cancelled() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 10, b"a").await;
    h.m.on_disconnected();
    h.m.on_connected(&[ResumePoint {
        task_id: Uuid::from_u128(10),
        acked_seq: 0,
        known: false,
    }]);
    assert!(run.cancel.is_cancelled());
    assert_eq!(h.m.held(), 0);
    // Its late output goes nowhere.
    run.out
        .send(TaskOutput::Event(EventKind::StepStarted {
            step: "plan".into(),
        }))
        .await
        .unwrap();
    run.finish.send(result(Outcome::Cancelled)).unwrap();
    tokio::task::yield_now().await;
    assert!(sent(&h.m).is_empty());
}

#[tokio::test]
async fn cancel_running_fires_the_token() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 11, b"a").await;
    h.m.handle_message(Message::Cancel(Cancel {
        task_id: Uuid::from_u128(11),
        reason: "by admin".into(),
    }));
    run.cancel.cancelled().await;
    run.finish.send(result(Outcome::Cancelled)).unwrap();
    match next(&h.m).await {
        Frame::Control(Message::Done(d)) => assert_eq!(d.outcome, Outcome::Cancelled),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cancel_all_reaches_every_task() {
    let mut h = harness(TaskSettings::new(2));
    let run = start(&mut h, 30, b"a").await;
    h.m.handle_message(Message::Assign(Assign {
        task: spec(31, b"b", None),
    }));
    sent(&h.m);
    h.m.cancel_all("agent shutting down");
    assert!(run.cancel.is_cancelled());
    assert_eq!(h.m.phase(Uuid::from_u128(31)), Some(Phase::Finishing));
}

#[tokio::test]
async fn cancel_before_inputs_ends_the_task_without_running_it() {
    let mut h = harness(TaskSettings::new(1));
    h.m.handle_message(Message::Assign(Assign {
        task: spec(12, b"a", None),
    }));
    sent(&h.m);
    h.m.handle_message(Message::Cancel(Cancel {
        task_id: Uuid::from_u128(12),
        reason: "by admin".into(),
    }));
    match &sent(&h.m)[..] {
        [Frame::Control(Message::Done(d))] => {
            assert_eq!(d.outcome, Outcome::Cancelled);
            assert!(d.reason.as_deref().unwrap().contains("by admin"));
        }
        other => panic!("{other:?}"),
    }
    // A late chunk is refused, and nothing runs.
    h.m.handle_binary(chunk(12, ChunkKind::Workspace, 0, true, b"a"));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Error(_))]
    ));
    assert!(h.runs.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn inputs_that_never_arrive_time_out() {
    let mut settings = TaskSettings::new(1);
    settings.inputs_timeout = Duration::from_secs(5);
    let h = harness(settings);
    h.m.handle_message(Message::Assign(Assign {
        task: spec(14, b"abc", None),
    }));
    sent(&h.m);
    match next(&h.m).await {
        Frame::Control(Message::Done(d)) => {
            assert!(d
                .reason
                .as_deref()
                .unwrap()
                .contains("did not arrive within 5s"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unknown_chunks_and_bad_acks_get_errors() {
    let mut h = harness(TaskSettings::new(1));
    h.m.handle_binary(chunk(99, ChunkKind::Workspace, 0, true, b"x"));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Error(e))] if e.code == ErrorCode::ProtocolViolation
    ));
    let _run = start(&mut h, 15, b"a").await;
    h.m.handle_message(ack(15, 3));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Error(e))] if e.message.contains("acknowledged seq 3")
    ));
    h.m.handle_message(Message::Heartbeat(delegate_protocol::Heartbeat {
        ts_ms: 1,
    }));
    assert!(matches!(
        &sent(&h.m)[..],
        [Frame::Control(Message::Error(_))]
    ));
}

#[tokio::test]
async fn long_logs_and_artifacts_are_split() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 16, b"a").await;
    let big = vec![b'x'; OUT_CHUNK * 2 + 10];
    run.out
        .send(TaskOutput::Log {
            stream: LogStream::Stdout,
            data: Bytes::from(big.clone()),
        })
        .await
        .unwrap();
    run.out
        .send(TaskOutput::Artifact {
            kind: ChunkKind::PlanJson,
            data: big.clone(),
        })
        .await
        .unwrap();
    run.finish.send(result(Outcome::Succeeded)).unwrap();
    let mut frames = Vec::new();
    loop {
        let f = next(&h.m).await;
        let done = matches!(f, Frame::Control(Message::Done(_)));
        frames.push(f);
        if done {
            break;
        }
    }
    // 3 log frames, 3 chunks, artifact, done.
    assert_eq!(frames.len(), 8);
    let logs: Vec<u8> = frames[..3]
        .iter()
        .flat_map(|f| match f {
            Frame::Binary(BinaryFrame::Log(l)) => {
                assert!(l.data.len() <= OUT_CHUNK);
                l.data.clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(logs, big);
    let lasts: Vec<bool> = frames[3..6]
        .iter()
        .map(|f| match f {
            Frame::Binary(BinaryFrame::Chunk(c)) => c.last,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(lasts, vec![false, false, true]);
    assert!(
        matches!(&frames[6], Frame::Control(Message::Artifact(a)) if a.size == big.len() as u64 && a.sha256 == sha256_hex(&big))
    );
}

#[tokio::test]
async fn a_full_outbox_holds_back_the_executor_until_acked() {
    let mut settings = TaskSettings::new(1);
    // A log frame of 80 bytes is 108 on the wire: two fill the outbox.
    settings.outbox_limit = 200;
    settings.output_buffer = 1;
    let mut h = harness(settings);
    let id = 17;
    let run = start(&mut h, id, b"a").await;
    let line = Bytes::from(vec![b'y'; 80]);
    // Two lines fill the outbox; the driver then holds the third and waits, the fourth fills the
    // channel, and the fifth send blocks.
    for _ in 0..4 {
        run.out
            .send(TaskOutput::Log {
                stream: LogStream::Stdout,
                data: line.clone(),
            })
            .await
            .unwrap();
    }
    assert_eq!(seq_of(&next(&h.m).await), Some(1));
    assert_eq!(seq_of(&next(&h.m).await), Some(2));
    let blocked = run.out.send(TaskOutput::Log {
        stream: LogStream::Stdout,
        data: line.clone(),
    });
    tokio::pin!(blocked);
    let mut blocked_sends = 0;
    loop {
        tokio::select! {
            biased;
            r = &mut blocked => { r.unwrap(); break; }
            _ = tokio::task::yield_now() => {
                blocked_sends += 1;
                if blocked_sends == 50 {
                    // Nothing moves until the control plane acknowledges.
                    assert!(h.m.next_outgoing().is_none());
                    h.m.handle_message(ack(id, 2));
                }
            }
        }
    }
    assert!(blocked_sends >= 50, "the sender was not held back");
    assert_eq!(seq_of(&next(&h.m).await), Some(3));
}

#[tokio::test]
async fn executor_panic_fails_the_task() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 18, b"a").await;
    drop(run.finish); // the fake panics when its result is dropped
    match next(&h.m).await {
        Frame::Control(Message::Done(d)) => {
            assert_eq!(d.outcome, Outcome::Failed);
            assert!(d.reason.as_deref().unwrap().contains("internal error"));
        }
        other => panic!("{other:?}"),
    }
}

async fn state_request(
    out: &TaskOutputTx,
    method: StateMethod,
    body: &[u8],
) -> oneshot::Receiver<StateReply> {
    let (reply, rx) = oneshot::channel();
    out.send(TaskOutput::State {
        method,
        lock_id: Some("lock-1".into()),
        body: Some(body.to_vec()),
        reply,
    })
    .await
    .unwrap();
    rx
}

#[tokio::test]
async fn state_requests_are_relayed_and_answered() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 19, b"a").await;
    let rx = state_request(&run.out, StateMethod::Lock, b"{\"ID\":\"x\"}").await;
    let req = match next(&h.m).await {
        Frame::Control(Message::StateRequest(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(req.method, StateMethod::Lock);
    assert_eq!(req.lock_id.as_deref(), Some("lock-1"));
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(req.body_b64.unwrap())
            .unwrap(),
        b"{\"ID\":\"x\"}"
    );
    h.m.handle_message(Message::StateResponse(StateResponse {
        request_id: req.request_id,
        status: 423,
        body_b64: Some(base64::engine::general_purpose::STANDARD.encode(b"held")),
    }));
    assert_eq!(
        rx.await.unwrap(),
        StateReply {
            status: 423,
            body: b"held".to_vec()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn state_request_while_link_down_waits_then_503() {
    let mut settings = TaskSettings::new(1);
    settings.state_timeout = Duration::from_secs(20);
    let mut h = harness(settings);
    let run = start(&mut h, 20, b"a").await;

    // Link down: the request waits, then comes up in time and is sent.
    h.m.on_disconnected();
    let rx = state_request(&run.out, StateMethod::Get, b"").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.m.next_outgoing().is_none());
    h.m.on_connected(&[]);
    let req = match next(&h.m).await {
        Frame::Control(Message::StateRequest(r)) => r,
        other => panic!("{other:?}"),
    };
    // The connection drops before the answer: 503 at once.
    h.m.on_disconnected();
    assert_eq!(rx.await.unwrap().status, 503);
    // A late answer for it is ignored.
    h.m.handle_message(Message::StateResponse(StateResponse {
        request_id: req.request_id,
        status: 200,
        body_b64: None,
    }));

    // Link down for longer than the bound: 503.
    let rx = state_request(&run.out, StateMethod::Get, b"").await;
    let reply = rx.await.unwrap();
    assert_eq!(reply.status, 503);
    assert!(String::from_utf8_lossy(&reply.body).contains("delegate agent"));
}

#[test]
fn round_robin_serves_every_task() {
    let mut st = State {
        connected: true,
        ..State::default()
    };
    for id in [1u128, 2] {
        let mut outbox = Outbox::new();
        for i in 0..2 {
            outbox.push(|_| WireFrame::Text(format!("{id}-{i}")));
        }
        let mut e = Entry::new(Some(Op::Plan), None);
        e.phase = Phase::Running;
        e.outbox = outbox;
        st.tasks.insert(Uuid::from_u128(id), e);
    }
    let order: Vec<WireFrame> = std::iter::from_fn(|| st.next_outgoing()).collect();
    let texts: Vec<String> = order
        .into_iter()
        .map(|f| match f {
            WireFrame::Text(t) => t,
            WireFrame::Binary(_) => unreachable!(),
        })
        .collect();
    assert_eq!(texts, vec!["1-0", "2-0", "1-1", "2-1"]);
}

// ---------------------------------------------------------------------------------------------
// With a spool
// ---------------------------------------------------------------------------------------------

use crate::spool::journal::{StepJournal, StepState};
use crate::spool::{SpoolSettings, QUARANTINE_DIR};
use delegate_protocol::ResumePoint;

const SECRET: &str = "hunter2-never-on-disk-5b1e";
const LOG_MARKER: &str = "LOGMARKER-0c77d2";

fn spool_ring() -> delegate_crypto::KeyRing {
    delegate_crypto::KeyRing::from_key("t", &[5u8; 32]).unwrap()
}

struct Spooled {
    h: Harness,
    resumes: mpsc::UnboundedReceiver<Resumed>,
}

/// A manager over the spool in `dir` (reloading whatever is there), connected with `resume`.
fn spooled(dir: &std::path::Path, settings: TaskSettings, max_bytes: u64) -> Spooled {
    let (tx, runs) = mpsc::unbounded_channel();
    let (rtx, resumes) = mpsc::unbounded_channel();
    let fake = Arc::new(Fake {
        runs: tx,
        available: Mutex::new(Ok(())),
        resumes: Mutex::new(Some(rtx)),
    });
    let (spool, loaded) = Spool::open(
        SpoolSettings {
            dir: dir.join("spool"),
            max_bytes,
            segment_bytes: 4096,
        },
        spool_ring(),
    )
    .unwrap();
    let m = TaskManager::with_spool(settings, fake.clone(), spool, loaded);
    Spooled {
        h: Harness { m, fake, runs },
        resumes,
    }
}

/// One life of the agent: `f` runs on a runtime of its own, which is then dropped with every
/// task it spawned, as when the process is killed.
fn life<F>(f: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f());
        drop(rt);
    })
    .join()
    .expect("the first life panicked");
}

fn known(id: u128, acked_seq: u64) -> ResumePoint {
    ResumePoint {
        task_id: Uuid::from_u128(id),
        acked_seq,
        known: true,
    }
}

/// Alternating streams, so that lines queued together stay one frame each (output of the same
/// stream already queued is merged, see `coalesce`).
fn log_line(i: usize) -> TaskOutput {
    TaskOutput::Log {
        stream: if i.is_multiple_of(2) {
            LogStream::Stdout
        } else {
            LogStream::Stderr
        },
        data: Bytes::from(format!("{LOG_MARKER} line {i}\n")),
    }
}

fn log_text(f: &Frame) -> Option<String> {
    match f {
        Frame::Binary(BinaryFrame::Log(l)) => Some(String::from_utf8_lossy(&l.data).into_owned()),
        _ => None,
    }
}

fn dir_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.extend(std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn has(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Start task `id` (with a secret) on a spooled manager.
async fn start_spooled(s: &mut Spooled, id: u128) -> Run {
    let mut task = spec(id, b"archive", None);
    task.secrets.0.insert("TOKEN".into(), SECRET.into());
    s.h.m.handle_message(Message::Assign(Assign { task }));
    sent(&s.h.m);
    s.h.m
        .handle_binary(chunk(id, ChunkKind::Workspace, 0, true, b"archive"));
    s.h.runs.recv().await.expect("task started")
}

#[tokio::test]
async fn restart_resends_unacked_output_in_order_and_resumes_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let id = 41;
    let dir = tmp.path().to_path_buf();
    life(move || async move {
        let mut s = spooled(&dir, TaskSettings::new(1), 1 << 20);
        s.h.m.on_connected(&[]);
        let run = start_spooled(&mut s, id).await;
        for i in 0..6 {
            run.out.send(log_line(i)).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 6 {
            got.push(next(&s.h.m).await);
        }
        s.h.m.handle_message(ack(id, 2));
        // The agent dies here, with the task running.
        std::mem::forget(run.finish);
    });
    let bytes = dir_bytes(tmp.path());
    assert!(!has(&bytes, LOG_MARKER), "log output in the clear on disk");
    assert!(!has(&bytes, SECRET), "secret on disk");

    let mut s = spooled(tmp.path(), TaskSettings::new(1), 1 << 20);
    let held = s.h.m.held_tasks();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].task_id, Uuid::from_u128(id));
    assert!(held[0].acked_seq <= 2);
    assert_eq!(s.h.m.running_tasks(), vec![Uuid::from_u128(id)]);
    let resumed = s.resumes.recv().await.expect("resumed");
    assert_eq!(resumed.journal.spec.task_id, Uuid::from_u128(id));
    assert!(resumed.journal.spec.secrets.0.is_empty());
    assert_eq!(resumed.journal.secret_names, vec!["TOKEN".to_string()]);

    // The control plane stored up to seq 4 (acks 3 and 4 were lost with the agent).
    s.h.m.on_connected(&[known(id, 4)]);
    let resent: Vec<Frame> = sent(&s.h.m);
    assert_eq!(
        resent.iter().filter_map(seq_of).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(
        log_text(&resent[0]).unwrap(),
        format!("{LOG_MARKER} line 4\n")
    );
    // The resumed run goes on numbering after what was spooled.
    resumed.out.send(log_line(6)).await.unwrap();
    assert_eq!(seq_of(&next(&s.h.m).await), Some(7));
    resumed.finish.send(result(Outcome::Succeeded)).unwrap();
    let done = next(&s.h.m).await;
    assert!(matches!(&done, Frame::Control(Message::Done(d)) if d.seq == 8));
    s.h.m.handle_message(ack(id, 8));
    assert_eq!(s.h.m.held(), 0);
    assert!(
        !tmp.path()
            .join("spool")
            .join(Uuid::from_u128(id).to_string())
            .exists(),
        "spool files deleted once done is acknowledged"
    );
}

#[tokio::test]
async fn a_finished_task_is_resent_not_resumed_and_unknown_tasks_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    life(move || async move {
        let mut s = spooled(&dir, TaskSettings::new(2), 1 << 20);
        s.h.m.on_connected(&[]);
        for id in [51, 52] {
            let run = start_spooled(&mut s, id).await;
            run.out.send(log_line(0)).await.unwrap();
            run.finish.send(result(Outcome::Succeeded)).unwrap();
        }
        let mut dones = 0;
        while dones < 2 {
            if matches!(next(&s.h.m).await, Frame::Control(Message::Done(_))) {
                dones += 1;
            }
        }
    });
    let mut s = spooled(tmp.path(), TaskSettings::new(2), 1 << 20);
    assert_eq!(s.h.m.held(), 2);
    assert!(s.h.m.running_tasks().is_empty());
    assert_eq!(s.h.m.busy_slots(), 0);
    s.h.m.on_connected(&[
        known(51, 1),
        ResumePoint {
            task_id: Uuid::from_u128(52),
            acked_seq: 0,
            known: false,
        },
    ]);
    let resent = sent(&s.h.m);
    // Seq 1 was the log line; 2 the done.
    assert_eq!(
        resent.iter().filter_map(seq_of).collect::<Vec<_>>(),
        vec![2]
    );
    assert!(
        matches!(&resent[0], Frame::Control(Message::Done(d)) if d.outcome == Outcome::Succeeded)
    );
    assert!(s.resumes.try_recv().is_err(), "nothing resumed");
    assert!(!tmp
        .path()
        .join("spool")
        .join(Uuid::from_u128(52).to_string())
        .exists());
    s.h.m.handle_message(ack(51, 2));
    assert_eq!(s.h.m.held(), 0);
}

#[tokio::test]
async fn a_damaged_spool_ends_that_task_lost_naming_the_file_and_spares_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    life(move || async move {
        let mut s = spooled(&dir, TaskSettings::new(2), 1 << 20);
        s.h.m.on_connected(&[]);
        for id in [61, 62] {
            let run = start_spooled(&mut s, id).await;
            for i in 0..3 {
                run.out.send(log_line(i)).await.unwrap();
            }
            std::mem::forget(run.finish);
        }
        let mut n = 0;
        while n < 6 {
            next(&s.h.m).await;
            n += 1;
        }
    });
    let victim = std::fs::read_dir(
        tmp.path()
            .join("spool")
            .join(Uuid::from_u128(61).to_string()),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap()
    .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();

    let mut s = spooled(tmp.path(), TaskSettings::new(2), 1 << 20);
    assert_eq!(s.h.m.held(), 2);
    // Task 62 is resumed; 61 is not.
    let resumed = s.resumes.recv().await.unwrap();
    assert_eq!(resumed.journal.spec.task_id, Uuid::from_u128(62));
    assert!(tmp.path().join("spool").join(QUARANTINE_DIR).exists());
    s.h.m.on_connected(&[known(61, 2), known(62, 3)]);
    let frames = sent(&s.h.m);
    let done = frames
        .iter()
        .find_map(|f| match f {
            Frame::Control(Message::Done(d)) => Some(d.clone()),
            _ => None,
        })
        .expect("a done for the damaged task");
    assert_eq!(done.task_id, Uuid::from_u128(61));
    assert_eq!(done.seq, 3, "right after the control plane's resume point");
    assert_eq!(done.outcome, Outcome::Lost);
    let reason = done.reason.unwrap();
    assert!(reason.contains(&victim.display().to_string()), "{reason}");
    assert!(reason.contains("integrity"), "{reason}");
    // The other task goes on.
    resumed.out.send(log_line(9)).await.unwrap();
    let f = next(&s.h.m).await;
    assert_eq!(seq_of(&f), Some(4));
    assert_eq!(log_text(&f).unwrap(), format!("{LOG_MARKER} line 9\n"));
}

#[tokio::test]
async fn a_full_spool_holds_the_executor_back_without_dropping_output() {
    let tmp = tempfile::tempdir().unwrap();
    let mut settings = TaskSettings::new(1);
    settings.output_buffer = 1;
    let mut s = spooled(tmp.path(), settings, 3000);
    s.h.m.on_connected(&[]);
    let id = 71;
    let run = start_spooled(&mut s, id).await;
    let total = 60;
    let out = run.out.clone();
    let producer = tokio::spawn(async move {
        for i in 0..total {
            out.send(log_line(i)).await.unwrap();
        }
    });
    // Without acks the spool fills and the producer is held back: take what is sent until an
    // append waits for space (bounded in steps, not in time).
    let mut received = Vec::new();
    for _ in 0..100_000 {
        if s.h.m.spool_stats().unwrap().waits >= 1 {
            break;
        }
        while let Some(f) = s.h.m.next_outgoing() {
            received.push(decode(f));
        }
        tokio::task::yield_now().await;
    }
    let stats = s.h.m.spool_stats().unwrap();
    assert!(stats.waits >= 1, "{stats:?}");
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!producer.is_finished(), "the executor must be held back");
    assert!(received.len() < total + 1);
    // Acks make room; everything arrives once, in order.
    while received.iter().filter(|f| log_text(f).is_some()).count() < total {
        let last = received.iter().filter_map(seq_of).max().unwrap_or(0);
        s.h.m.handle_message(ack(id, last));
        received.push(next(&s.h.m).await);
    }
    producer.await.unwrap();
    let logs: Vec<String> = received.iter().filter_map(log_text).collect();
    let expected: Vec<String> = (0..total)
        .map(|i| format!("{LOG_MARKER} line {i}\n"))
        .collect();
    assert_eq!(logs, expected);
    let seqs: Vec<u64> = received.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn journal_updates_and_artifact_notes_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let id = 81;
    let dir = tmp.path().to_path_buf();
    life(move || async move {
        let mut s = spooled(&dir, TaskSettings::new(1), 1 << 20);
        s.h.m.on_connected(&[]);
        let run = start_spooled(&mut s, id).await;
        let exec = crate::spool::journal::ExecJournal {
            image: "img".into(),
            binary: "tofu".into(),
            network: "net".into(),
            gateway: "172.31.0.1".into(),
            subnet: None,
            bridge: String::new(),
            volume: "vol".into(),
            cache_volume: None,
            timeout_secs: 600,
            backend: None,
            steps: vec![StepJournal {
                name: "plan".into(),
                state: StepState::Started,
            }],
            summary: Summary::default(),
            plan_exit: None,
        };
        let (saved, ok) = oneshot::channel();
        run.out
            .send(TaskOutput::Journal {
                exec: Box::new(exec),
                saved,
            })
            .await
            .unwrap();
        assert_eq!(ok.await.unwrap(), Ok(()));
        run.out
            .send(TaskOutput::Artifact {
                kind: ChunkKind::Plan,
                data: vec![7u8; 3 * OUT_CHUNK + 5],
            })
            .await
            .unwrap();
        let mut n = 0;
        while n < 5 {
            next(&s.h.m).await;
            n += 1;
        }
        std::mem::forget(run.finish);
    });
    let mut s = spooled(tmp.path(), TaskSettings::new(1), 1 << 20);
    let resumed = s.resumes.recv().await.unwrap();
    let j = resumed.journal;
    assert_eq!(j.artifacts, vec![ChunkKind::Plan]);
    let exec = j.exec.unwrap();
    assert_eq!(exec.steps[0].state, StepState::Started);
    assert_eq!(exec.network, "net");
}

#[tokio::test]
async fn without_a_spool_journal_updates_are_acknowledged() {
    let mut h = harness(TaskSettings::new(1));
    let run = start(&mut h, 91, b"a").await;
    let (saved, ok) = oneshot::channel();
    run.out
        .send(TaskOutput::Journal {
            exec: Box::new(crate::spool::journal::ExecJournal {
                image: String::new(),
                binary: String::new(),
                network: String::new(),
                gateway: String::new(),
                subnet: None,
                bridge: String::new(),
                volume: String::new(),
                cache_volume: None,
                timeout_secs: 1,
                backend: None,
                steps: vec![],
                summary: Summary::default(),
                plan_exit: None,
            }),
            saved,
        })
        .await
        .unwrap();
    assert_eq!(ok.await.unwrap(), Ok(()));
}

#[tokio::test]
async fn a_secret_too_short_to_redact_fails_the_task_before_it_runs() {
    let mut h = harness(TaskSettings::new(1));
    let mut task = spec(95, b"ws", None);
    task.secrets.0.insert("PIN".into(), "123".into());
    h.m.handle_message(Message::Assign(Assign { task }));
    sent(&h.m);
    h.m.handle_binary(chunk(95, ChunkKind::Workspace, 0, true, b"ws"));
    match &sent(&h.m)[..] {
        [Frame::Control(Message::Done(d))] => {
            assert_eq!(d.outcome, Outcome::Failed);
            let reason = d.reason.as_deref().unwrap();
            assert!(reason.contains("secret PIN refused"), "{reason}");
            assert!(!reason.contains("123"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.runs.try_recv().is_err(), "never ran");
}

#[tokio::test]
async fn inputs_cut_off_by_a_lost_connection_are_asked_for_again() {
    let mut h = harness(TaskSettings::new(1));
    let id = 77;
    let task = Uuid::from_u128(id);
    let archive = b"0123456789".repeat(4);
    h.m.handle_message(Message::Assign(Assign {
        task: spec(id, &archive, None),
    }));
    assert_eq!(
        sent(&h.m),
        vec![Frame::Control(Message::Accept(Accept { task_id: task }))]
    );
    // Half the archive arrives, then the link drops.
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 0, false, &archive[..20]));
    assert_eq!(h.m.phase(task), Some(Phase::ReceivingInputs));
    h.m.on_disconnected();
    // The task is not failed: it is still held and waits for its inputs.
    assert_eq!(h.m.phase(task), Some(Phase::Received));
    assert_eq!(h.m.held_tasks().len(), 1);
    assert!(h.m.next_outgoing().is_none());
    // The next connection asks again, and the inputs arrive from the beginning.
    h.m.on_connected(&[ResumePoint {
        task_id: task,
        acked_seq: 0,
        known: true,
    }]);
    assert_eq!(
        sent(&h.m),
        vec![Frame::Control(Message::Accept(Accept { task_id: task }))]
    );
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 0, false, &archive[..20]));
    h.m.handle_binary(chunk(id, ChunkKind::Workspace, 1, true, &archive[20..]));
    let run = h
        .runs
        .recv()
        .await
        .expect("task started with the resent inputs");
    assert_eq!(&run.inputs.archive[..], &archive[..]);
    run.finish.send(result(Outcome::Succeeded)).unwrap();
}

#[tokio::test]
async fn queued_output_of_one_stream_is_merged_in_order_and_nothing_else_is() {
    let mut h = harness(TaskSettings::new(1));
    let id = 78;
    let run = start(&mut h, id, b"a").await;
    let line = |stream, text: &str| TaskOutput::Log {
        stream,
        data: Bytes::from(text.to_string()),
    };
    // Queued before the driver runs: three stdout lines, an event, stderr, stdout.
    run.out.send(line(LogStream::Stdout, "a\n")).await.unwrap();
    run.out.send(line(LogStream::Stdout, "b\n")).await.unwrap();
    run.out.send(line(LogStream::Stdout, "c\n")).await.unwrap();
    run.out
        .send(TaskOutput::Event(EventKind::StepStarted {
            step: "plan".into(),
        }))
        .await
        .unwrap();
    run.out.send(line(LogStream::Stderr, "d\n")).await.unwrap();
    run.out.send(line(LogStream::Stdout, "e\n")).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(next(&h.m).await);
    }
    let shape: Vec<String> = got
        .iter()
        .map(|f| match f {
            Frame::Binary(BinaryFrame::Log(l)) => {
                format!("{}:{}", l.stream.as_str(), String::from_utf8_lossy(&l.data))
            }
            Frame::Control(Message::Event(_)) => "event".into(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        shape,
        vec!["stdout:a\nb\nc\n", "event", "stderr:d\n", "stdout:e\n"]
    );
    let seqs: Vec<u64> = got.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    run.finish.send(result(Outcome::Succeeded)).unwrap();
}

#[tokio::test]
async fn an_out_of_range_resume_point_ends_the_task_lost_instead_of_overflowing() {
    let mut h = harness(TaskSettings::new(1));
    let id = 79;
    let run = start(&mut h, id, b"a").await;
    h.m.on_disconnected();
    h.m.on_connected(&[ResumePoint {
        task_id: Uuid::from_u128(id),
        acked_seq: u64::MAX,
        known: true,
    }]);
    assert!(run.cancel.is_cancelled());
    match &sent(&h.m)[..] {
        [Frame::Control(Message::Done(d))] => {
            assert_eq!(d.outcome, Outcome::Lost);
            assert!(
                d.reason.as_deref().unwrap().contains("out of range"),
                "{d:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}
