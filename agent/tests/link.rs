//! The agent's link and task flow against a small in-test control plane: a tokio-rustls server
//! (TLS 1.3, client certificate required, rcgen certificates) speaking the protocol through
//! tokio-tungstenite. The executor is a scripted fake; no Docker.
//!
//! Waits are bounded only as hang guards; nothing asserts on elapsed time.

use bytes::Bytes;
use delegate_agent::daemon::Agent;
use delegate_agent::link::machine::Backoff;
use delegate_agent::link::{LinkPhase, LinkSettings, LinkStatus};
use delegate_agent::task_io::{TaskInputs, TaskOutput, TaskOutputTx, TaskResult};
use delegate_agent::tasks::{Executor, TaskManager, TaskSettings};
use delegate_protocol::{
    decode_binary, decode_text, encode_binary, encode_text, Accept, Ack, Assign, BinaryFrame,
    BlobRef, Cancel, ChunkFrame, ChunkKind, ErrorCode, EventKind, Frame, Hello, LogStream, Message,
    Op, Outcome, ResumePoint, Secrets, Summary, TaskSpec, Welcome, SUPPORTED_VERSIONS,
};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use ring::digest;
use rustls::pki_types::PrivateKeyDer;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Hang guard for any single wait in these tests.
const GUARD: Duration = Duration::from_secs(20);

async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("hang guard: {what}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Certificates
// ------------------------------------------------------------------------------------------------

struct Pki {
    dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "link test CA");
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_cert,
            ca_key,
        }
    }

    fn leaf(&self, cn: &str, sans: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (cert, key)
    }

    fn write(&self, name: &str, data: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    /// The agent's files: CA, certificate, key.
    fn agent_files(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.leaf(name, &[name]);
        (
            self.write("ca.pem", &self.ca_cert.pem()),
            self.write(&format!("{name}.pem"), &cert.pem()),
            self.write(&format!("{name}.key"), &key.serialize_pem()),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ------------------------------------------------------------------------------------------------
// The in-test control plane
// ------------------------------------------------------------------------------------------------

type ServerWs = WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

struct Server {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    port: u16,
    server_spki: [u8; 32],
}

impl Server {
    async fn start(pki: &Pki) -> Server {
        let (cert, key) = pki.leaf("control plane", &["127.0.0.1", "localhost"]);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_cert.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spki = digest::digest(&digest::SHA256, &key.public_key_der());
        let mut server_spki = [0u8; 32];
        server_spki.copy_from_slice(spki.as_ref());
        Server {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            port,
            server_spki,
        }
    }

    fn url(&self) -> String {
        format!("wss://127.0.0.1:{}/v1/agent", self.port)
    }

    /// Accept one connection through TLS and the WebSocket upgrade.
    async fn accept(&self) -> ServerWs {
        guard("accept", async {
            loop {
                let (tcp, _) = self.listener.accept().await.unwrap();
                // A TLS failure (e.g. a refused pin on the client side) is not a connection.
                let Ok(tls) = self.acceptor.accept(tcp).await else {
                    continue;
                };
                if let Ok(ws) = tokio_tungstenite::accept_async(tls).await {
                    return ws;
                }
            }
        })
        .await
    }

    /// Accept a connection, read Hello, answer Welcome, hand the connection to a [`Peer`].
    async fn accept_welcome(&self, heartbeat: Duration, resume: Vec<ResumePoint>) -> (Hello, Peer) {
        let mut ws = self.accept().await;
        let hello = match guard("hello", next_frame(&mut ws)).await {
            Some(Frame::Control(Message::Hello(h))) => h,
            other => panic!("expected hello, got {other:?}"),
        };
        let welcome = Message::Welcome(Welcome {
            version: 1,
            agent_id: hello.name.clone(),
            heartbeat_interval_ms: heartbeat.as_millis() as u64,
            resume,
        });
        ws.send(WsMessage::Text(encode_text(&welcome).into()))
            .await
            .unwrap();
        (hello, Peer::spawn(ws, heartbeat))
    }
}

/// The next protocol frame, or None when the connection ended. Closes are reported as None.
async fn next_frame(ws: &mut ServerWs) -> Option<Frame> {
    loop {
        match ws.next().await? {
            Ok(WsMessage::Text(t)) => {
                return Some(Frame::Control(
                    decode_text(t.as_str()).expect("agent sent bad JSON"),
                ))
            }
            Ok(WsMessage::Binary(b)) => {
                return Some(Frame::Binary(
                    decode_binary(&b).expect("agent sent a bad frame"),
                ))
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[derive(Debug)]
enum Incoming {
    Frame(Frame),
    Close(Option<CloseFrame>),
    Ended,
}

enum Command {
    Send(WsMessage),
    /// Stop sending anything (heartbeats included); keep the socket open and keep reading.
    Silence,
    /// Drop the connection abruptly.
    Drop,
}

/// A welcomed connection served by a background task: it sends heartbeats, counts the agent's,
/// and forwards every other frame to the test.
struct Peer {
    rx: mpsc::UnboundedReceiver<Incoming>,
    cmd: mpsc::UnboundedSender<Command>,
    heartbeats: Arc<AtomicU64>,
}

impl Peer {
    fn spawn(mut ws: ServerWs, interval: Duration) -> Peer {
        let (tx, rx) = mpsc::unbounded_channel();
        let (cmd, mut cmd_rx) = mpsc::unbounded_channel();
        let heartbeats = Arc::new(AtomicU64::new(0));
        let seen = heartbeats.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            let mut silent = false;
            loop {
                tokio::select! {
                    _ = ticker.tick(), if !silent => {
                        let hb = Message::Heartbeat(delegate_protocol::Heartbeat { ts_ms: 1 });
                        if ws.send(WsMessage::Text(encode_text(&hb).into())).await.is_err() {
                            let _ = tx.send(Incoming::Ended);
                            return;
                        }
                    }
                    c = cmd_rx.recv() => match c {
                        Some(Command::Send(m)) => {
                            if ws.send(m).await.is_err() {
                                let _ = tx.send(Incoming::Ended);
                                return;
                            }
                        }
                        Some(Command::Silence) => silent = true,
                        Some(Command::Drop) | None => return,
                    },
                    m = ws.next() => match m {
                        Some(Ok(WsMessage::Text(t))) => {
                            let msg = decode_text(t.as_str()).expect("agent sent bad JSON");
                            if matches!(msg, Message::Heartbeat(_)) {
                                seen.fetch_add(1, Ordering::SeqCst);
                            } else {
                                let _ = tx.send(Incoming::Frame(Frame::Control(msg)));
                            }
                        }
                        Some(Ok(WsMessage::Binary(b))) => {
                            let f = decode_binary(&b).expect("agent sent a bad frame");
                            let _ = tx.send(Incoming::Frame(Frame::Binary(f)));
                        }
                        Some(Ok(WsMessage::Close(f))) => {
                            let _ = tx.send(Incoming::Close(f));
                            // Answer the close like a real server, then end.
                            let _ = ws.close(None).await;
                            return;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            let _ = tx.send(Incoming::Ended);
                            return;
                        }
                    },
                }
            }
        });
        Peer {
            rx,
            cmd,
            heartbeats,
        }
    }

    fn send(&self, m: &Message) {
        let _ = self
            .cmd
            .send(Command::Send(WsMessage::Text(encode_text(m).into())));
    }

    fn send_binary(&self, f: &BinaryFrame) {
        let _ = self.cmd.send(Command::Send(WsMessage::Binary(Bytes::from(
            encode_binary(f),
        ))));
    }

    fn send_raw(&self, m: WsMessage) {
        let _ = self.cmd.send(Command::Send(m));
    }

    fn silence(&self) {
        let _ = self.cmd.send(Command::Silence);
    }

    fn drop_connection(&self) {
        let _ = self.cmd.send(Command::Drop);
    }

    async fn next(&mut self) -> Incoming {
        guard("next frame from the agent", self.rx.recv())
            .await
            .unwrap_or(Incoming::Ended)
    }

    async fn frame(&mut self) -> Frame {
        match self.next().await {
            Incoming::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    async fn control(&mut self) -> Message {
        match self.frame().await {
            Frame::Control(m) => m,
            other => panic!("expected a control message, got {other:?}"),
        }
    }

    async fn wait_heartbeats(&self, n: u64) {
        guard("agent heartbeats", async {
            while self.heartbeats.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------------
// The scripted executor
// ------------------------------------------------------------------------------------------------

struct Run {
    inputs: TaskInputs,
    out: TaskOutputTx,
    cancel: CancellationToken,
    finish: oneshot::Sender<TaskResult>,
}

struct FakeExecutor {
    runs: mpsc::UnboundedSender<Run>,
}

impl Executor for FakeExecutor {
    fn availability(&self) -> Result<(), String> {
        Ok(())
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
            result.await.unwrap_or(TaskResult {
                outcome: Outcome::Failed,
                reason: Some("test dropped the run".into()),
                summary: Summary::default(),
            })
        })
    }
}

// ------------------------------------------------------------------------------------------------
// The agent under test
// ------------------------------------------------------------------------------------------------

struct TestAgent {
    status: watch::Receiver<LinkStatus>,
    tasks: TaskManager,
    runs: mpsc::UnboundedReceiver<Run>,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

fn link_settings(pki: &Pki, server: &Server, pin: Option<[u8; 32]>) -> LinkSettings {
    let (ca, cert, key) = pki.agent_files("runner-1");
    let tls = delegate_agent::tls::client_config(&ca, &cert, &key, pin).unwrap();
    let endpoint = delegate_agent::config::parse_wss_url(&server.url()).unwrap();
    let mut s = LinkSettings::new(endpoint, tls, "runner-1".into());
    s.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    s.connect_timeout = Duration::from_secs(5);
    s.close_timeout = Duration::from_secs(2);
    s.pool = "edge".into();
    s.labels = BTreeMap::from([("os".to_string(), "linux".to_string())]);
    s
}

/// An agent whose shutdown does not wait for tasks the test leaves behind.
fn start_agent(settings: LinkSettings, slots: u32) -> TestAgent {
    start_agent_draining(settings, slots, Duration::ZERO)
}

fn start_agent_draining(settings: LinkSettings, slots: u32, drain: Duration) -> TestAgent {
    let (tx, runs) = mpsc::unbounded_channel();
    let agent = Agent::from_parts(
        settings,
        TaskSettings::new(slots),
        Arc::new(FakeExecutor { runs: tx }),
        drain,
    )
    .with_cancel_wait(Duration::ZERO);
    let status = agent.status();
    let tasks = agent.tasks();
    let (shutdown, shutdown_rx) = oneshot::channel();
    let done = tokio::spawn(agent.run(async {
        let _ = shutdown_rx.await;
    }));
    TestAgent {
        status,
        tasks,
        runs,
        shutdown: Some(shutdown),
        done,
    }
}

impl TestAgent {
    async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        guard("agent stop", self.done).await.unwrap();
    }

    async fn status_where(&mut self, what: &str, f: impl Fn(&LinkStatus) -> bool) -> LinkStatus {
        guard(what, self.status.wait_for(|s| f(s)))
            .await
            .unwrap()
            .clone()
    }

    async fn next_run(&mut self) -> Run {
        guard("executor run", self.runs.recv()).await.unwrap()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data).as_ref())
}

fn spec(id: Uuid, archive: &[u8], plan: Option<&[u8]>) -> TaskSpec {
    TaskSpec {
        task_id: id,
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

/// Send a blob as chunks of `size` bytes, index from 0, `last` on the final one.
fn send_blob(peer: &Peer, id: Uuid, kind: ChunkKind, data: &[u8], size: usize) {
    let pieces: Vec<&[u8]> = data.chunks(size).collect();
    let n = pieces.len();
    for (i, p) in pieces.into_iter().enumerate() {
        peer.send_binary(&BinaryFrame::Chunk(ChunkFrame {
            task_id: id,
            seq: i as u64,
            kind,
            last: i + 1 == n,
            data: p.to_vec(),
        }));
    }
}

/// Assign a task and stream its archive; returns the executor's run.
async fn assign_and_start(agent: &mut TestAgent, peer: &mut Peer, id: Uuid) -> Run {
    let archive = b"a tar.gz, pretend".repeat(20);
    peer.send(&Message::Assign(Assign {
        task: spec(id, &archive, None),
    }));
    assert_eq!(
        peer.control().await,
        Message::Accept(Accept { task_id: id })
    );
    send_blob(peer, id, ChunkKind::Workspace, &archive, 64);
    let run = agent.next_run().await;
    assert_eq!(run.inputs.archive, archive);
    run
}

fn seq_of(f: &Frame) -> u64 {
    match f {
        Frame::Control(Message::Event(e)) => e.seq,
        Frame::Control(Message::Artifact(a)) => a.seq,
        Frame::Control(Message::Done(d)) => d.seq,
        Frame::Binary(b) => b.seq(),
        other => panic!("not a sequenced frame: {other:?}"),
    }
}

fn log(data: &str) -> TaskOutput {
    TaskOutput::Log {
        stream: LogStream::Stdout,
        data: Bytes::from(data.to_string()),
    }
}

/// Line `i` on alternating streams: lines queued together stay a frame each (queued output of
/// one stream is merged into one frame).
fn log_line(i: u32) -> TaskOutput {
    TaskOutput::Log {
        stream: if i.is_multiple_of(2) {
            LogStream::Stdout
        } else {
            LogStream::Stderr
        },
        data: Bytes::from(format!("line {i}\n")),
    }
}

/// Long enough that a loaded CI machine does not starve a heartbeat into a false dead peer.
const HB: Duration = Duration::from_millis(400);

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn hello_welcome_heartbeats_and_clean_close() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 3);
    let (hello, mut peer) = server.accept_welcome(HB, vec![]).await;
    assert_eq!(hello.versions, SUPPORTED_VERSIONS.to_vec());
    assert_eq!(hello.name, "runner-1");
    assert_eq!(hello.pool, "edge");
    assert_eq!(hello.slots, 3);
    assert_eq!(hello.labels.get("os").map(String::as_str), Some("linux"));
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(hello.tasks.is_empty());

    let st = agent
        .status_where("connected", |s| {
            matches!(s.phase, LinkPhase::Connected { .. })
        })
        .await;
    assert_eq!(st.connections, 1);
    match st.phase {
        LinkPhase::Connected {
            agent_id,
            version,
            heartbeat_interval,
        } => {
            assert_eq!(agent_id, "runner-1");
            assert_eq!(version, 1);
            assert_eq!(heartbeat_interval, HB);
        }
        other => panic!("{other:?}"),
    }
    // The agent heartbeats on its own, every interval.
    peer.wait_heartbeats(3).await;

    // Shutdown: a close frame with a normal code, then the agent returns.
    let stop = tokio::spawn(agent.stop());
    match peer.next().await {
        Incoming::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    guard("stop", stop).await.unwrap();
}

#[tokio::test]
async fn reconnects_after_the_server_drops_the_connection() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, peer) = server.accept_welcome(HB, vec![]).await;
    agent
        .status_where("connected", |s| s.connections == 1)
        .await;
    peer.drop_connection();
    let (hello, _peer2) = server.accept_welcome(HB, vec![]).await;
    assert_eq!(hello.name, "runner-1");
    let st = agent
        .status_where("reconnected", |s| s.connections == 2)
        .await;
    assert_eq!(st.failures, 1);
    assert!(st.last_error.is_some());
    agent.stop().await;
}

#[tokio::test]
async fn silent_server_is_detected_as_dead_and_the_agent_reconnects() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    agent
        .status_where("connected", |s| s.connections == 1)
        .await;
    // Blackhole: the server keeps the socket open and keeps reading, but sends nothing.
    peer.silence();
    // The agent gives up on this connection by itself and comes back on a new one.
    let (_, _peer2) = server.accept_welcome(HB, vec![]).await;
    let st = agent
        .status_where("reconnected", |s| s.connections == 2)
        .await;
    let reason = st.last_error.unwrap_or_default();
    assert!(reason.contains("presumed dead"), "{reason}");
    // It went on heartbeating into the silence before giving up, then closed its side.
    assert!(peer.heartbeats.load(Ordering::SeqCst) >= 1);
    match peer.next().await {
        Incoming::Ended | Incoming::Close(_) => {}
        Incoming::Frame(f) => panic!("unexpected {f:?}"),
    }
    agent.stop().await;
}

#[tokio::test]
async fn unsupported_version_is_reported_and_retried() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let mut ws = server.accept().await;
    let _hello = guard("hello", next_frame(&mut ws)).await;
    let refusal = Message::Error(delegate_protocol::ErrorMsg {
        code: ErrorCode::UnsupportedVersion,
        message: "no common protocol version: we speak [2], the peer speaks [1]".into(),
        task_id: None,
    });
    ws.send(WsMessage::Text(encode_text(&refusal).into()))
        .await
        .unwrap();
    let _ = ws.close(None).await;
    // The agent backs off and tries again; meanwhile its status says why.
    let mut ws2 = server.accept().await;
    let st = agent
        .status_where("refusal recorded", |s| s.failures >= 1)
        .await;
    let reason = st.last_error.unwrap_or_default();
    assert!(
        reason.contains("unsupported_version") && reason.contains("we speak [2]"),
        "{reason}"
    );
    assert!(matches!(
        guard("hello again", next_frame(&mut ws2)).await,
        Some(Frame::Control(Message::Hello(_)))
    ));
    drop(ws2);
    agent.stop().await;
}

#[tokio::test]
async fn wrong_spki_pin_never_connects() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, Some([9u8; 32])), 1);
    // Keep the server accepting (each TLS handshake fails on the agent's side).
    let accept = tokio::spawn(async move {
        let _ = server.accept().await;
    });
    let st = agent.status_where("pin refusal", |s| s.failures >= 2).await;
    assert!(st.last_error.unwrap_or_default().contains("spki_pin"));
    assert_eq!(st.connections, 0);
    accept.abort();
    agent.stop().await;
}

#[tokio::test]
async fn right_spki_pin_connects() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let pin = server.server_spki;
    let mut agent = start_agent(link_settings(&pki, &server, Some(pin)), 1);
    let (_hello, _peer) = server.accept_welcome(HB, vec![]).await;
    agent
        .status_where("connected", |s| s.connections == 1)
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn task_flow_sequences_acks_and_forgets() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 2);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    let id = Uuid::new_v4();
    let run = assign_and_start(&mut agent, &mut peer, id).await;

    run.out
        .send(TaskOutput::Event(EventKind::StepStarted {
            step: "init".into(),
        }))
        .await
        .unwrap();
    run.out
        .send(log("Initializing the backend...\n"))
        .await
        .unwrap();
    run.out
        .send(TaskOutput::Artifact {
            kind: ChunkKind::Plan,
            data: b"binary plan".to_vec(),
        })
        .await
        .unwrap();
    run.finish
        .send(TaskResult {
            outcome: Outcome::Succeeded,
            reason: None,
            summary: Summary {
                add: 1,
                ..Summary::default()
            },
        })
        .unwrap();

    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(peer.frame().await);
    }
    let seqs: Vec<u64> = frames.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(matches!(&frames[0], Frame::Control(Message::Event(e)) if e.task_id == id));
    assert!(
        matches!(&frames[1], Frame::Binary(BinaryFrame::Log(l)) if l.data == b"Initializing the backend...\n")
    );
    assert!(
        matches!(&frames[2], Frame::Binary(BinaryFrame::Chunk(c)) if c.last && c.kind == ChunkKind::Plan)
    );
    assert!(
        matches!(&frames[3], Frame::Control(Message::Artifact(a)) if a.sha256 == sha256_hex(b"binary plan") && a.size == 11)
    );
    assert!(
        matches!(&frames[4], Frame::Control(Message::Done(d)) if d.outcome == Outcome::Succeeded && d.summary.as_ref().map(|s| s.add) == Some(1))
    );
    peer.send(&Message::Ack(Ack {
        task_id: id,
        seq: 5,
    }));
    let tasks = agent.tasks.clone();
    guard("task forgotten", async {
        while tasks.held() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn output_is_resent_after_a_reconnect_from_the_resume_point() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    let id = Uuid::new_v4();
    let run = assign_and_start(&mut agent, &mut peer, id).await;
    for i in 1..=3 {
        run.out.send(log_line(i)).await.unwrap();
    }
    for want in 1..=3 {
        assert_eq!(seq_of(&peer.frame().await), want);
    }
    peer.send(&Message::Ack(Ack {
        task_id: id,
        seq: 1,
    }));
    // Wait for the agent to have the ack before the connection goes away.
    let tasks = agent.tasks.clone();
    guard("ack applied", async {
        while tasks.held_tasks().first().map(|t| t.acked_seq) != Some(1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    peer.drop_connection();

    // While disconnected the task goes on and finishes.
    for i in 4..=5 {
        run.out.send(log_line(i)).await.unwrap();
    }
    run.finish
        .send(TaskResult {
            outcome: Outcome::Succeeded,
            reason: None,
            summary: Summary::default(),
        })
        .unwrap();

    // The control plane had stored 1 and 2 (the ack for 2 was lost with the connection).
    let mut ws = server.accept().await;
    let hello = match guard("hello", next_frame(&mut ws)).await {
        Some(Frame::Control(Message::Hello(h))) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(hello.tasks.len(), 1);
    assert_eq!(hello.tasks[0].task_id, id);
    assert_eq!(hello.tasks[0].acked_seq, 1);
    let welcome = Message::Welcome(Welcome {
        version: 1,
        agent_id: "runner-1".into(),
        heartbeat_interval_ms: HB.as_millis() as u64,
        resume: vec![ResumePoint {
            task_id: id,
            acked_seq: 2,
            known: true,
        }],
    });
    ws.send(WsMessage::Text(encode_text(&welcome).into()))
        .await
        .unwrap();
    let mut peer = Peer::spawn(ws, HB);
    let mut got = Vec::new();
    loop {
        let f = peer.frame().await;
        let done = matches!(f, Frame::Control(Message::Done(_)));
        got.push(f);
        if done {
            break;
        }
    }
    let seqs: Vec<u64> = got.iter().map(seq_of).collect();
    assert_eq!(
        seqs,
        vec![3, 4, 5, 6],
        "resent in order, from after the resume point"
    );
    let lines: Vec<String> = got[..3]
        .iter()
        .map(|f| match f {
            Frame::Binary(BinaryFrame::Log(l)) => String::from_utf8_lossy(&l.data).into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(lines, vec!["line 3\n", "line 4\n", "line 5\n"]);
    peer.send(&Message::Ack(Ack {
        task_id: id,
        seq: 6,
    }));
    guard("task forgotten", async {
        while tasks.held() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn plan_with_another_hash_is_refused_and_never_runs() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    let id = Uuid::new_v4();
    let archive = b"workspace".to_vec();
    let approved = b"approved plan file".to_vec();
    peer.send(&Message::Assign(Assign {
        task: spec(id, &archive, Some(&approved)),
    }));
    assert!(matches!(peer.control().await, Message::Accept(_)));
    send_blob(&peer, id, ChunkKind::Workspace, &archive, 4);
    send_blob(&peer, id, ChunkKind::Plan, b"tampered plan file", 4);
    match peer.control().await {
        Message::Done(d) => {
            assert_eq!(d.seq, 1);
            assert_eq!(d.outcome, Outcome::Failed);
            let reason = d.reason.unwrap_or_default();
            assert!(reason.contains("plan sha256 mismatch"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        agent.runs.try_recv().is_err(),
        "the executor must not run it"
    );
    agent.stop().await;
}

#[tokio::test]
async fn cancel_reaches_the_running_task() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    let id = Uuid::new_v4();
    let run = assign_and_start(&mut agent, &mut peer, id).await;
    peer.send(&Message::Cancel(Cancel {
        task_id: id,
        reason: "cancelled by admin".into(),
    }));
    guard("cancel token", run.cancel.cancelled()).await;
    run.finish
        .send(TaskResult {
            outcome: Outcome::Cancelled,
            reason: Some("cancelled by admin".into()),
            summary: Summary::default(),
        })
        .unwrap();
    match peer.control().await {
        Message::Done(d) => assert_eq!(d.outcome, Outcome::Cancelled),
        other => panic!("{other:?}"),
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_full_agent_rejects_with_no_free_slot() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (hello, mut peer) = server.accept_welcome(HB, vec![]).await;
    assert_eq!(hello.slots, 1);
    let _run = assign_and_start(&mut agent, &mut peer, Uuid::new_v4()).await;
    let second = Uuid::new_v4();
    peer.send(&Message::Assign(Assign {
        task: spec(second, b"x", None),
    }));
    match peer.control().await {
        Message::Reject(r) => {
            assert_eq!(r.task_id, second);
            assert_eq!(r.reason, "no free slot");
        }
        other => panic!("{other:?}"),
    }
    agent.stop().await;
}

#[tokio::test]
async fn undecodable_frames_get_errors_and_the_link_stays_up() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut agent = start_agent(link_settings(&pki, &server, None), 1);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    peer.send_raw(WsMessage::Text("this is not json".into()));
    peer.send_raw(WsMessage::Text(r#"{"type":"bogus"}"#.into()));
    peer.send_raw(WsMessage::Binary(Bytes::from_static(b"\x00short")));
    peer.send(&Message::Accept(Accept {
        task_id: Uuid::new_v4(),
    }));
    let mut codes = Vec::new();
    for _ in 0..4 {
        match peer.control().await {
            Message::Error(e) => codes.push(e.code),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        codes,
        vec![
            ErrorCode::Malformed,
            ErrorCode::UnknownType,
            ErrorCode::Malformed,
            ErrorCode::ProtocolViolation
        ]
    );
    // Still the same connection, still working.
    let _run = assign_and_start(&mut agent, &mut peer, Uuid::new_v4()).await;
    assert_eq!(agent.status.borrow().connections, 1);
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_drains_running_tasks_then_closes() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    // The drain bound is a hang guard here: the task ends well before it.
    let mut agent = start_agent_draining(link_settings(&pki, &server, None), 2, GUARD);
    let (_, mut peer) = server.accept_welcome(HB, vec![]).await;
    let id = Uuid::new_v4();
    let run = assign_and_start(&mut agent, &mut peer, id).await;
    let shutdown = agent.shutdown.take().unwrap();
    let _ = shutdown.send(());
    // Draining: a new task is refused.
    let tasks = agent.tasks.clone();
    let second = Uuid::new_v4();
    let mut reason = String::new();
    // The shutdown signal is asynchronous; assign until the agent says it is shutting down.
    for _ in 0..100 {
        peer.send(&Message::Assign(Assign {
            task: spec(second, b"x", None),
        }));
        match peer.control().await {
            Message::Reject(r) => {
                reason = r.reason;
                if reason == "agent is shutting down" {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reason, "agent is shutting down");
    // The running task finishes; its done goes out; only after the ack does the agent close.
    run.out.send(log("still running\n")).await.unwrap();
    run.finish
        .send(TaskResult {
            outcome: Outcome::Succeeded,
            reason: None,
            summary: Summary::default(),
        })
        .unwrap();
    assert_eq!(seq_of(&peer.frame().await), 1);
    assert!(matches!(peer.control().await, Message::Done(_)));
    assert_eq!(tasks.held(), 1);
    peer.send(&Message::Ack(Ack {
        task_id: id,
        seq: 2,
    }));
    match peer.next().await {
        Incoming::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected close, got {other:?}"),
    }
    guard("agent exit", agent.done).await.unwrap();
}

/// The real binary: without a reachable Docker engine it still connects, rejects every task with
/// the Docker error, and on SIGTERM closes the WebSocket cleanly and exits 0.
#[tokio::test]
async fn binary_without_docker_rejects_tasks_and_stops_cleanly_on_sigterm() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let (ca, cert, key) = pki.agent_files("runner-bin");
    let config = pki.write(
        "agent.toml",
        &format!(
            r#"data_dir = "data"
[control_plane]
url = "{url}"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
[agent]
name = "runner-bin"
slots = 2
[sandbox]
pull_policy = "never"
[log]
format = "json"
"#,
            url = server.url(),
            ca = ca.display(),
            cert = cert.display(),
            key = key.display()
        ),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delegate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (hello, mut peer) = server.accept_welcome(HB, vec![]).await;
    assert_eq!(hello.name, "runner-bin");
    assert_eq!(hello.slots, 2);

    let id = Uuid::new_v4();
    peer.send(&Message::Assign(Assign {
        task: spec(id, b"x", None),
    }));
    match peer.control().await {
        Message::Reject(r) => {
            assert_eq!(r.task_id, id);
            assert!(r.reason.contains("Docker"), "{}", r.reason);
        }
        other => panic!("{other:?}"),
    }

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    match peer.next().await {
        Incoming::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let status = guard("agent exit", child.wait()).await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert_eq!(status.code(), Some(0), "{stderr}");
    // JSON logs as configured, one object per line.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(
        stderr.contains("connected to the control plane"),
        "{stderr}"
    );
}
