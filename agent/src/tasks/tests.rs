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
        run.out
            .send(TaskOutput::Log {
                stream: LogStream::Stdout,
                data: Bytes::from(format!("line {i}\n")),
            })
            .await
            .unwrap();
    }
    for want in 1..=3 {
        assert_eq!(seq_of(&next(&h.m).await), Some(want));
    }
    // The link drops; the task keeps running and its output waits.
    h.m.on_disconnected();
    for i in 3..5 {
        run.out
            .send(TaskOutput::Log {
                stream: LogStream::Stderr,
                data: Bytes::from(format!("line {i}\n")),
            })
            .await
            .unwrap();
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

#[tokio::test]
async fn link_lost_while_receiving_inputs_fails_the_task() {
    let mut h = harness(TaskSettings::new(1));
    h.m.handle_message(Message::Assign(Assign {
        task: spec(13, b"abc", None),
    }));
    h.m.handle_binary(chunk(13, ChunkKind::Workspace, 0, false, b"a"));
    h.m.on_disconnected();
    assert_eq!(h.m.busy_slots(), 0);
    h.m.on_connected(&[]);
    match &sent(&h.m)[..] {
        [Frame::Control(Message::Done(d))] => assert_eq!(d.outcome, Outcome::Failed),
        other => panic!("{other:?}"),
    }
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
        st.tasks.insert(
            Uuid::from_u128(id),
            Entry {
                phase: Phase::Running,
                op: Op::Plan,
                outbox,
                cancel: CancellationToken::new(),
                spec: None,
                inputs: None,
                done_seq: None,
            },
        );
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
