//! Operating the agent: systemd notifications, metrics and health, SIGHUP reload, SIGTERM drain,
//! certificate renewal over the link, enrollment, and `delegate doctor`.
//!
//! The control plane here is a small in-test server (tokio-rustls, TLS 1.3, client certificate
//! required, rcgen certificates) speaking the protocol; the executor is scripted; no Docker (the
//! binary is pointed at a Docker socket that does not exist). Waits are bounded only as hang
//! guards; nothing asserts on elapsed time.

use bytes::Bytes;
use delegate_agent::daemon::Agent;
use delegate_agent::link::machine::Backoff;
use delegate_agent::link::LinkSettings;
use delegate_agent::metrics::{Metrics, MetricsListen};
use delegate_agent::notify::{Notifier, NotifyTarget};
use delegate_agent::renew::Renewer;
use delegate_agent::service::{self, Control, Ended, ServiceParts};
use delegate_agent::task_io::{TaskInputs, TaskOutputTx, TaskResult};
use delegate_agent::tasks::{Executor, TaskSettings};
use delegate_protocol::{
    decode_text, encode_binary, encode_text, Ack, Assign, BinaryFrame, BlobRef, ChunkFrame,
    ChunkKind, ErrorCode, ErrorMsg, Message, Op, Outcome, RenewResponse, Secrets, Summary,
    TaskSpec, Welcome,
};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const GUARD: Duration = Duration::from_secs(30);

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
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "ops test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client certificate for `key`, valid from `from_days` (relative to now) for `days`.
    fn client(&self, key: &KeyPair, cn: &str, from_days: i64, days: u64) -> String {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let day = Duration::from_secs(86400);
        let now = SystemTime::now();
        let from = if from_days < 0 {
            now - day * (-from_days) as u32
        } else {
            now + day * from_days as u32
        };
        p.not_before = from.into();
        p.not_after = (from + day * days as u32).into();
        p.signed_by(key, &self.ca, &self.ca_key).unwrap().pem()
    }

    /// Write ca.pem, agent.pem, agent.key (0600); returns the key.
    fn agent_files(&self, from_days: i64, days: u64) -> KeyPair {
        let key = KeyPair::generate().unwrap();
        std::fs::write(self.path("ca.pem"), self.ca.pem()).unwrap();
        std::fs::write(
            self.path("agent.pem"),
            self.client(&key, "runner-1", from_days, days),
        )
        .unwrap();
        write_private(&self.path("agent.key"), &key.serialize_pem());
        key
    }

    fn server_config(&self, with_ca_in_chain: bool) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "control plane");
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let mut chain = vec![cert.der().clone()];
        if with_ca_in_chain {
            chain.push(self.ca.der().clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, PrivateKeyDer::try_from(key.serialize_der()).unwrap())
                .unwrap(),
        )
    }
}

fn write_private(path: &Path, data: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(data.as_bytes()).unwrap();
}

fn pem_cert(pem: &[u8]) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem).unwrap()
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
}

/// One welcomed agent connection.
struct Conn {
    ws: ServerWs,
    /// The client certificate the agent presented.
    peer_cert: CertificateDer<'static>,
}

impl Server {
    async fn start(pki: &Pki) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        Server {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(pki.server_config(false)),
            port,
        }
    }

    fn url(&self) -> String {
        format!("wss://127.0.0.1:{}/v1/agent", self.port)
    }

    /// Accept connections until one sends a real hello; answer it with welcome. Probes (a hello
    /// offering no version) get `unsupported_version` like the real control plane.
    async fn accept_welcome(&self) -> Conn {
        guard("accept", async {
            loop {
                let (tcp, _) = self.listener.accept().await.unwrap();
                let Ok(tls) = self.acceptor.accept(tcp).await else {
                    continue;
                };
                let peer_cert = match tls.get_ref().1.peer_certificates() {
                    Some(c) if !c.is_empty() => c[0].clone().into_owned(),
                    _ => continue,
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    continue;
                };
                let hello = match ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => match decode_text(t.as_str()) {
                        Ok(Message::Hello(h)) => h,
                        _ => continue,
                    },
                    _ => continue,
                };
                if hello.versions.is_empty() {
                    let e = Message::Error(ErrorMsg {
                        code: ErrorCode::UnsupportedVersion,
                        message: "no common protocol version: we speak [1], the peer speaks []"
                            .into(),
                        task_id: None,
                    });
                    let _ = ws.send(WsMessage::Text(encode_text(&e).into())).await;
                    let _ = ws.close(None).await;
                    continue;
                }
                let w = Message::Welcome(Welcome {
                    version: 1,
                    agent_id: hello.name.clone(),
                    heartbeat_interval_ms: 400,
                    resume: vec![],
                });
                ws.send(WsMessage::Text(encode_text(&w).into()))
                    .await
                    .unwrap();
                return Conn { ws, peer_cert };
            }
        })
        .await
    }
}

impl Conn {
    fn send(&mut self, m: &Message) -> impl std::future::Future<Output = ()> + '_ {
        let text = encode_text(m);
        async move { self.ws.send(WsMessage::Text(text.into())).await.unwrap() }
    }

    /// The next message other than a heartbeat (answering heartbeats so the agent stays).
    async fn next(&mut self) -> Option<Message> {
        guard("next message", async {
            loop {
                match self.ws.next().await? {
                    Ok(WsMessage::Text(t)) => {
                        let m = decode_text(t.as_str()).expect("agent sent bad JSON");
                        if let Message::Heartbeat(_) = m {
                            let hb = Message::Heartbeat(delegate_protocol::Heartbeat { ts_ms: 1 });
                            let _ = self.ws.send(WsMessage::Text(encode_text(&hb).into())).await;
                            continue;
                        }
                        return Some(m);
                    }
                    Ok(WsMessage::Binary(_)) => continue,
                    Ok(WsMessage::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                }
            }
        })
        .await
    }

    /// Wait for `n` heartbeats from the agent: the connection is alive.
    async fn heartbeats(&mut self, n: usize) {
        guard("heartbeats", async {
            let mut seen = 0;
            while seen < n {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => {
                        if let Ok(Message::Heartbeat(_)) = decode_text(t.as_str()) {
                            seen += 1;
                            let hb = Message::Heartbeat(delegate_protocol::Heartbeat { ts_ms: 1 });
                            let _ = self.ws.send(WsMessage::Text(encode_text(&hb).into())).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => panic!("connection ended while waiting for heartbeats"),
                }
            }
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------------
// A scripted executor
// ------------------------------------------------------------------------------------------------

struct Run {
    cancel: CancellationToken,
    finish: oneshot::Sender<TaskResult>,
    _out: TaskOutputTx,
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
        _inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let (finish, result) = oneshot::channel();
        let c = cancel.clone();
        let _ = self.runs.send(Run {
            cancel,
            finish,
            _out: out,
        });
        Box::pin(async move {
            tokio::select! {
                r = result => r.unwrap_or(TaskResult { outcome: Outcome::Failed, reason: None, summary: Summary::default() }),
                _ = c.cancelled() => TaskResult {
                    outcome: Outcome::Cancelled,
                    reason: Some("cancelled".into()),
                    summary: Summary::default(),
                },
            }
        })
    }
}

fn spec(id: Uuid, archive: &[u8]) -> TaskSpec {
    TaskSpec {
        task_id: id,
        op: Op::Plan,
        workspace: "w".into(),
        auto_approve: false,
        vars: BTreeMap::new(),
        var_files: vec![],
        env: BTreeMap::new(),
        secrets: Secrets::default(),
        archive: BlobRef {
            size: archive.len() as u64,
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, archive).as_ref()),
        },
        plan: None,
        timeout_secs: 0,
        egress: vec![],
    }
}

async fn assign(conn: &mut Conn, id: Uuid) -> Message {
    let archive = b"archive bytes".to_vec();
    conn.send(&Message::Assign(Assign {
        task: spec(id, &archive),
    }))
    .await;
    let answer = conn.next().await.expect("answer to assign");
    if let Message::Accept(_) = answer {
        let chunk = BinaryFrame::Chunk(ChunkFrame {
            task_id: id,
            seq: 0,
            kind: ChunkKind::Workspace,
            last: true,
            data: archive,
        });
        conn.ws
            .send(WsMessage::Binary(Bytes::from(encode_binary(&chunk))))
            .await
            .unwrap();
    }
    answer
}

fn link_settings(pki: &Pki, server: &Server) -> LinkSettings {
    let tls = delegate_agent::tls::client_config(
        &pki.path("ca.pem"),
        &pki.path("agent.pem"),
        &pki.path("agent.key"),
        None,
    )
    .unwrap();
    let endpoint = delegate_agent::config::parse_wss_url(&server.url()).unwrap();
    let mut s = LinkSettings::new(endpoint, tls, "runner-1".into());
    s.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    s
}

struct Service {
    control: mpsc::Sender<Control>,
    runs: mpsc::UnboundedReceiver<Run>,
    done: tokio::task::JoinHandle<Ended>,
}

fn start_service(
    settings: LinkSettings,
    drain: Duration,
    notifier: Notifier,
    metrics: Metrics,
    listen: Option<MetricsListen>,
) -> Service {
    let (tx, runs) = mpsc::unbounded_channel();
    let executor: Arc<dyn Executor> = Arc::new(FakeExecutor { runs: tx });
    let agent = Agent::from_parts(settings, TaskSettings::new(2), executor.clone(), drain)
        .with_cancel_wait(GUARD);
    let (control, rx) = mpsc::channel(8);
    let parts = ServiceParts {
        notifier,
        metrics,
        metrics_listen: listen,
        reloader: None,
        executor,
    };
    Service {
        control,
        runs,
        done: tokio::spawn(service::run(agent, parts, rx)),
    }
}

/// Datagrams from a notify socket the test owns.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    rx: mpsc::UnboundedReceiver<String>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            rx,
        }
    }

    /// Wait for a datagram containing `needle`; returns it.
    async fn wait_for(&mut self, needle: &str, seen: &mut Vec<String>) -> String {
        guard(&format!("notification {needle}"), async {
            loop {
                let m = self.rx.recv().await.expect("notify socket closed");
                seen.push(m.clone());
                if m.contains(needle) {
                    return m;
                }
            }
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------------
// systemd notifications
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn service_sends_ready_status_watchdog_and_stopping() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let mut sock = NotifySocket::new();
    let notifier = Notifier::new(
        Some(NotifyTarget::Path(sock.path.clone())),
        Some(Duration::from_millis(50)),
    );
    let svc = start_service(
        link_settings(&pki, &server),
        GUARD,
        notifier,
        Metrics::new(),
        None,
    );
    let mut seen = Vec::new();
    let ready = sock.wait_for("READY=1", &mut seen).await;
    assert!(ready.contains("STATUS="), "{ready}");
    let _conn = server.accept_welcome().await;
    let status = sock
        .wait_for("STATUS=connected as runner-1", &mut seen)
        .await;
    assert!(status.contains("tasks running 0/2"), "{status}");
    sock.wait_for("WATCHDOG=1", &mut seen).await;
    sock.wait_for("WATCHDOG=1", &mut seen).await;
    svc.control.send(Control::Stop).await.unwrap();
    let stopping = sock.wait_for("STOPPING=1", &mut seen).await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    assert_eq!(guard("service end", svc.done).await.unwrap(), Ended::Clean);
    // READY=1 came exactly once, before anything about stopping.
    assert_eq!(seen.iter().filter(|m| m.contains("READY=1")).count(), 1);
}

/// The binary reads NOTIFY_SOCKET and WATCHDOG_USEC. Without Docker its start-up checks do not
/// pass, so READY=1 is withheld, while the status says why and the watchdog keeps going.
#[tokio::test]
async fn binary_without_docker_withholds_ready_but_reports_status_watchdog_and_stopping() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let config = write_config(&pki, &server.url(), "info", "");
    let mut sock = NotifySocket::new();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delegate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("NOTIFY_SOCKET", &sock.path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let _conn = server.accept_welcome().await;
    let status = sock.wait_for("Docker sandbox unavailable", &mut seen).await;
    assert!(status.starts_with("STATUS="), "{status}");
    sock.wait_for("WATCHDOG=1", &mut seen).await;
    sock.wait_for("WATCHDOG=1", &mut seen).await;
    signal(&child, "TERM");
    sock.wait_for("STOPPING=1", &mut seen).await;
    let code = guard("exit", child.wait()).await.unwrap();
    assert_eq!(code.code(), Some(0));
    assert!(
        !seen.iter().any(|m| m.contains("READY=1")),
        "READY=1 sent although Docker is unusable: {seen:?}"
    );
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn write_config(pki: &Pki, url: &str, level: &str, extra: &str) -> PathBuf {
    let path = pki.path("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"data_dir = "data"
[control_plane]
url = "{url}"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
backoff_initial_ms = 20
backoff_max_ms = 200
[agent]
name = "runner-1"
slots = 2
[sandbox]
pull_policy = "never"
[log]
level = "{level}"
{extra}"#
        ),
    )
    .unwrap();
    path
}

// ------------------------------------------------------------------------------------------------
// Metrics and health
// ------------------------------------------------------------------------------------------------

async fn http_get_unix(path: &Path, target: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = guard("connect metrics socket", async {
        loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    guard("metrics answer", s.read_to_string(&mut buf))
        .await
        .unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

#[tokio::test]
async fn metrics_and_health_on_a_unix_socket() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let sock = pki.path("metrics.sock");
    let metrics = Metrics::new();
    let mut svc = start_service(
        link_settings(&pki, &server),
        GUARD,
        Notifier::disabled(),
        metrics.clone(),
        Some(MetricsListen::Unix(sock.clone())),
    );
    let (code, body) = http_get_unix(&sock, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let mut conn = server.accept_welcome().await;
    // Ready once connected.
    guard("ready", async {
        loop {
            if http_get_unix(&sock, "/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // One running task shows up by phase.
    let id = Uuid::new_v4();
    assert!(matches!(assign(&mut conn, id).await, Message::Accept(_)));
    let run = guard("run", svc.runs.recv()).await.unwrap();
    let (code, text) = http_get_unix(&sock, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "delegate_link_state{state=\"connected\"} 1",
        "delegate_link_connections_total 1",
        "delegate_tasks{phase=\"running\"} 1",
        "delegate_slots 2",
        "delegate_ready 1",
        "delegate_draining 0",
        "# EOF",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // Draining: not ready any more, still alive.
    svc.control.send(Control::Stop).await.unwrap();
    guard("not ready while draining", async {
        loop {
            let (code, body) = http_get_unix(&sock, "/readyz").await;
            if code == 503 {
                assert!(body.contains("draining"), "{body}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(http_get_unix(&sock, "/healthz").await.0, 200);
    let _ = run.finish.send(TaskResult {
        outcome: Outcome::Succeeded,
        reason: None,
        summary: Summary::default(),
    });
    // Acknowledge done so the drain ends.
    loop {
        match conn.next().await {
            Some(Message::Done(d)) => {
                conn.send(&Message::Ack(Ack {
                    task_id: d.task_id,
                    seq: d.seq,
                }))
                .await;
                break;
            }
            Some(_) => continue,
            None => panic!("connection ended before done"),
        }
    }
    assert_eq!(guard("service end", svc.done).await.unwrap(), Ended::Clean);
    // The socket is removed on stop.
    assert!(!sock.exists());
}

#[test]
fn metrics_refuses_a_non_loopback_listen_address_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "data_dir = \"d\"\n[control_plane]\nurl = \"wss://cp/v1/agent\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n[agent]\nname = \"a\"\n[metrics]\nlisten = \"0.0.0.0:9464\"\n",
    )
    .unwrap();
    let e = delegate_agent::config::load(&file).unwrap_err().to_string();
    assert!(
        e.contains("metrics.listen") && e.contains("not a loopback address"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------------
// Drain
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn drain_lets_a_running_task_finish_rejects_new_ones_and_a_second_stop_cancels() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let mut svc = start_service(
        link_settings(&pki, &server),
        GUARD,
        Notifier::disabled(),
        Metrics::new(),
        None,
    );
    let mut conn = server.accept_welcome().await;
    let first = Uuid::new_v4();
    let second = Uuid::new_v4();
    assert!(matches!(assign(&mut conn, first).await, Message::Accept(_)));
    let run1 = guard("run 1", svc.runs.recv()).await.unwrap();
    assert!(matches!(
        assign(&mut conn, second).await,
        Message::Accept(_)
    ));
    let run2 = guard("run 2", svc.runs.recv()).await.unwrap();

    svc.control.send(Control::Stop).await.unwrap();
    // A new task is refused while draining (the stop is asynchronous: retry until it is seen).
    let mut reason = String::new();
    for _ in 0..200 {
        match assign(&mut conn, Uuid::new_v4()).await {
            Message::Reject(r) if r.reason == "agent is shutting down" => {
                reason = r.reason;
                break;
            }
            Message::Reject(_) | Message::Accept(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(reason, "agent is shutting down");
    // The first task finishes normally during the drain.
    run1.finish
        .send(TaskResult {
            outcome: Outcome::Succeeded,
            reason: None,
            summary: Summary::default(),
        })
        .unwrap();
    let mut dones = BTreeMap::new();
    while !dones.contains_key(&first) {
        if let Some(Message::Done(d)) = conn.next().await {
            conn.send(&Message::Ack(Ack {
                task_id: d.task_id,
                seq: d.seq,
            }))
            .await;
            dones.insert(d.task_id, d.outcome);
        }
    }
    assert_eq!(dones[&first], Outcome::Succeeded);
    assert!(!run2.cancel.is_cancelled());
    // A second stop cancels the other one at once (the drain time is far from over).
    svc.control.send(Control::Stop).await.unwrap();
    guard("cancel", run2.cancel.cancelled()).await;
    while !dones.contains_key(&second) {
        match conn.next().await {
            Some(Message::Done(d)) => {
                conn.send(&Message::Ack(Ack {
                    task_id: d.task_id,
                    seq: d.seq,
                }))
                .await;
                dones.insert(d.task_id, d.outcome);
            }
            Some(_) => {}
            None => panic!("connection ended before the cancelled task's done"),
        }
    }
    assert_eq!(dones[&second], Outcome::Cancelled);
    assert_eq!(guard("service end", svc.done).await.unwrap(), Ended::Clean);
}

// ------------------------------------------------------------------------------------------------
// SIGHUP
// ------------------------------------------------------------------------------------------------

/// Collects the child's stderr lines.
fn collect(stderr: tokio::process::ChildStderr) -> Arc<Mutex<String>> {
    use tokio::io::AsyncBufReadExt;
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let mut g = b.lock().unwrap();
            g.push_str(&l);
            g.push('\n');
        }
    });
    buf
}

async fn wait_log(buf: &Arc<Mutex<String>>, needle: &str) {
    guard(&format!("log line {needle:?}"), async {
        loop {
            if buf.lock().unwrap().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn sighup_reloads_log_level_and_certificates_without_dropping_the_connection() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let config = write_config(&pki, &server.url(), "info", "");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delegate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    let mut conn = server.accept_welcome().await;
    let old_cert = conn.peer_cert.clone();
    wait_log(&log, "connected to the control plane").await;
    assert!(!log.lock().unwrap().contains("DEBUG"));

    // New certificate and key on disk, debug level in the file; then SIGHUP.
    pki.agent_files(-1, 30);
    write_config(&pki, &server.url(), "debug", "");
    signal(&child, "HUP");
    wait_log(&log, "reloaded (SIGHUP)").await;
    assert!(
        log.lock().unwrap().contains("log level debug"),
        "{}",
        log.lock().unwrap()
    );
    // The connection made before the reload is still up and in use.
    conn.heartbeats(2).await;
    // Force a reconnect: the new connection presents the new certificate, and debug lines flow.
    drop(conn);
    let conn2 = server.accept_welcome().await;
    assert_ne!(conn2.peer_cert, old_cert);
    let new_pem = std::fs::read(pki.path("agent.pem")).unwrap();
    assert_eq!(conn2.peer_cert, pem_cert(&new_pem));
    wait_log(&log, "DEBUG").await;

    // A reload with a broken file keeps everything as it was.
    std::fs::write(&config, "data_dir = [").unwrap();
    signal(&child, "HUP");
    wait_log(&log, "reload (SIGHUP) refused").await;
    signal(&child, "TERM");
    let status = guard("exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", log.lock().unwrap());
}

/// The real binary installs the egress hook: a SIGHUP with new `allow`/`deny` rules replaces the
/// sandbox's policy (reported as applied, and the hook's own line says how many rules the sandbox
/// now has) instead of being reported as needing a restart; the other `[egress]` keys are
/// reported as needing one; a bad rule refuses the whole reload.
#[tokio::test]
async fn sighup_replaces_the_egress_policy() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    let egress = |allow: &str, extra: &str| format!("[egress]\nallow = [{allow}]\n{extra}");
    let config = write_config(
        &pki,
        &server.url(),
        "info",
        &egress("\"a.example:443\"", ""),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delegate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    let mut conn = server.accept_welcome().await;
    wait_log(&log, "connected to the control plane").await;

    // Two allow rules and a deny rule instead of one allow rule.
    write_config(
        &pki,
        &server.url(),
        "info",
        &egress(
            "\"b.example:443\", \"10.1.0.0/16\"",
            "deny = [\"10.1.2.0/24\"]\n",
        ),
    );
    signal(&child, "HUP");
    wait_log(&log, "reloaded (SIGHUP)").await;
    let text = log.lock().unwrap().clone();
    let replaced = text
        .lines()
        .find(|l| l.contains("egress policy replaced"))
        .unwrap_or_else(|| panic!("the egress hook did not run:\n{text}"));
    assert!(
        replaced.contains("allow=2") && replaced.contains("deny=1"),
        "{replaced}"
    );
    let reloaded = text
        .lines()
        .find(|l| l.contains("reloaded (SIGHUP)"))
        .unwrap();
    assert!(reloaded.contains("egress policy"), "{reloaded}");
    assert!(
        !reloaded.contains("only after a restart"),
        "the egress change was not applied live: {reloaded}"
    );

    // hosts / firewall are not behind the handle: reported as needing a restart.
    write_config(
        &pki,
        &server.url(),
        "info",
        &egress(
            "\"b.example:443\", \"10.1.0.0/16\"",
            "deny = [\"10.1.2.0/24\"]\nfirewall = \"off\"\n",
        ),
    );
    log.lock().unwrap().clear();
    signal(&child, "HUP");
    wait_log(&log, "reloaded (SIGHUP)").await;
    assert!(
        log.lock()
            .unwrap()
            .contains("only after a restart: egress.hosts/max_connections/firewall"),
        "{}",
        log.lock().unwrap()
    );
    assert!(!log.lock().unwrap().contains("egress policy replaced"));

    // A bad rule: the reload is refused, the hook is not called.
    write_config(&pki, &server.url(), "info", &egress("\"x:0\"", ""));
    log.lock().unwrap().clear();
    signal(&child, "HUP");
    wait_log(&log, "reload (SIGHUP) refused").await;
    assert!(!log.lock().unwrap().contains("egress policy replaced"));

    // The connection was never dropped.
    conn.heartbeats(1).await;
    signal(&child, "TERM");
    let status = guard("exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", log.lock().unwrap());
}

// ------------------------------------------------------------------------------------------------
// Renewal over the link
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn renewal_over_the_link_is_used_by_the_next_connection() {
    let pki = Pki::new();
    // Issued 3 days ago for 4 days: past two thirds, due at once.
    let key = pki.agent_files(-3, 4);
    let server = Server::start(&pki).await;
    let mut settings = link_settings(&pki, &server);
    let tls = settings.tls.clone();
    settings.renewer = Some(Renewer {
        ca_file: pki.path("ca.pem"),
        cert_file: pki.path("agent.pem"),
        key_file: pki.path("agent.key"),
        spki_pin: None,
        tls: tls.clone(),
        jitter: 0.0,
    });
    let before = tls.current();
    let svc = start_service(settings, GUARD, Notifier::disabled(), Metrics::new(), None);
    let mut conn = server.accept_welcome().await;
    let old_cert = conn.peer_cert.clone();
    let csr = loop {
        match conn.next().await {
            Some(Message::RenewRequest(r)) => break r.csr_pem,
            Some(_) => continue,
            None => panic!("connection ended before renew_request"),
        }
    };
    // Sign as the control plane does: same key (the CSR's), fresh validity.
    let params = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
    {
        use rcgen::PublicKeyData;
        assert_eq!(params.public_key.der_bytes(), key.der_bytes());
    }
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "runner-1");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let csr_params = rcgen::CertificateSigningRequestParams {
        params: p,
        public_key: params.public_key,
    };
    let new_cert = csr_params.signed_by(&pki.ca, &pki.ca_key).unwrap().pem();
    conn.send(&Message::RenewResponse(RenewResponse {
        cert_pem: new_cert.clone(),
        ca_pem: None,
    }))
    .await;
    guard("certificate written", async {
        while std::fs::read_to_string(pki.path("agent.pem")).unwrap() != new_cert {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    guard("TLS swapped", async {
        while Arc::ptr_eq(&before, &tls.current()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The current connection stays up...
    conn.heartbeats(2).await;
    // ...and the next one presents the renewed certificate.
    drop(conn);
    let conn2 = server.accept_welcome().await;
    assert_ne!(conn2.peer_cert, old_cert);
    assert_eq!(conn2.peer_cert, pem_cert(new_cert.as_bytes()));
    svc.control.send(Control::Stop).await.unwrap();
    drop(conn2);
    assert_eq!(guard("service end", svc.done).await.unwrap(), Ended::Clean);
}

// ------------------------------------------------------------------------------------------------
// Enrollment
// ------------------------------------------------------------------------------------------------

/// An HTTPS enrollment endpoint as docs/enrollment.md describes: tokens "good" (one use),
/// "used" (410), anything else 401.
async fn enroll_server(pki: &Pki, with_ca_in_chain: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = (*pki.server_config(with_ca_in_chain)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let ca_pem = pki.ca.pem();
    let ca_der = pki.ca.der().clone();
    let ca_key = pki.ca_key.serialize_pem();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let used = Arc::new(Mutex::new(false));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let ca_pem = ca_pem.clone();
            let ca_der = ca_der.clone();
            let ca_key = ca_key.clone();
            let log = log.clone();
            let used = used.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let ca_pem = ca_pem.clone();
                    let ca_der = ca_der.clone();
                    let ca_key = ca_key.clone();
                    let log = log.clone();
                    let used = used.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        log.lock().unwrap().push(format!("{path} {}", v["name"]));
                        let reply = |status: u16, v: serde_json::Value| {
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(v.to_string())))
                        };
                        if path != "/api/v1/enroll" {
                            return reply(404, serde_json::json!({"error": "not found"}));
                        }
                        match v["token"].as_str() {
                            Some("good") if !*used.lock().unwrap() => {}
                            Some("good") | Some("used") => {
                                return reply(
                                    410,
                                    serde_json::json!({"error": "token already used"}),
                                )
                            }
                            _ => return reply(401, serde_json::json!({"error": "unknown token"})),
                        }
                        *used.lock().unwrap() = true;
                        let csr = rcgen::CertificateSigningRequestParams::from_pem(
                            v["csr_pem"].as_str().unwrap(),
                        )
                        .unwrap();
                        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                        p.distinguished_name
                            .push(DnType::CommonName, v["name"].as_str().unwrap());
                        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
                        let issuer_key = KeyPair::from_pem(&ca_key).unwrap();
                        let issuer = CertificateParams::from_ca_cert_der(&ca_der)
                            .unwrap()
                            .self_signed(&issuer_key)
                            .unwrap();
                        let cert = rcgen::CertificateSigningRequestParams {
                            params: p,
                            public_key: csr.public_key,
                        }
                        .signed_by(&issuer, &issuer_key)
                        .unwrap();
                        reply(
                            200,
                            serde_json::json!({
                                "cert_pem": cert.pem(),
                                "ca_pem": ca_pem,
                                "agent_url": "wss://127.0.0.1:8443/v1/agent",
                                "pool": "airgap",
                                "name": v["name"],
                            }),
                        )
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, seen)
}

fn enroll_cmd(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_delegate"));
    cmd.arg("enroll")
        .args(args)
        .env_remove("DELEGATE_ENROLL_TOKEN");
    cmd.output().unwrap()
}

#[tokio::test]
async fn enroll_writes_a_working_bundle_and_reports_refused_tokens() {
    let pki = Pki::new();
    let (port, seen) = enroll_server(&pki, true).await;
    let url = format!("https://127.0.0.1:{port}");
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, pki.ca.der()).as_ref());
    let out = pki.path("tls");
    let o = out.to_str().unwrap().to_string();

    let r = tokio::task::spawn_blocking({
        let (url, hash, o) = (url.clone(), hash.clone(), o.clone());
        move || {
            enroll_cmd(&[
                "--url",
                &url,
                "--token",
                "good",
                "--ca-sha256",
                &hash,
                "--name",
                "vm-1",
                "--out",
                &o,
            ])
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        stdout.contains("enrolled as vm-1 in pool airgap"),
        "{stdout}"
    );
    assert_eq!(seen.lock().unwrap()[0], "/api/v1/enroll \"vm-1\"");
    let cfg = delegate_agent::config::load(&out.join("agent.toml")).unwrap();
    assert_eq!(cfg.agent.name, "vm-1");
    assert_eq!(cfg.agent.pool, "airgap");
    assert!(cfg.check_files().is_empty(), "{:?}", cfg.check_files());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("agent.key")), 0o600);
    assert_eq!(mode(&out), 0o700);

    // Used and unknown tokens: the server's message, exit 1, nothing written; the token is not echoed.
    for (token, status, message) in [
        ("good", "410", "token already used"),
        ("s3cret-unknown", "401", "unknown token"),
    ] {
        let out2 = pki.path(&format!("tls-{status}"));
        let r = tokio::task::spawn_blocking({
            let (url, hash, o2) = (
                url.clone(),
                hash.clone(),
                out2.to_str().unwrap().to_string(),
            );
            move || {
                enroll_cmd(&[
                    "--url",
                    &url,
                    "--token",
                    token,
                    "--ca-sha256",
                    &hash,
                    "--name",
                    "vm-2",
                    "--out",
                    &o2,
                ])
            }
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("HTTP {status}")) && err.contains(message),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        assert!(!out2.exists());
    }

    // A wrong hash: refused before anything is sent.
    let before = seen.lock().unwrap().len();
    let r = tokio::task::spawn_blocking({
        let (url, o3) = (
            url.clone(),
            pki.path("tls-wrong").to_str().unwrap().to_string(),
        );
        move || {
            enroll_cmd(&[
                "--url",
                &url,
                "--token",
                "good",
                "--ca-sha256",
                &"ab".repeat(32),
                "--name",
                "vm-3",
                "--out",
                &o3,
            ])
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("--ca-sha256"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), before);

    // An existing key is never overwritten.
    let r = tokio::task::spawn_blocking({
        let (url, hash, o) = (url.clone(), hash.clone(), o.clone());
        move || {
            enroll_cmd(&[
                "--url",
                &url,
                "--token",
                "x",
                "--ca-sha256",
                &hash,
                "--name",
                "vm-1",
                "--out",
                &o,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));

    // --if-absent on that enrolled directory: exit 0, nothing sent, nothing changed.
    let before = seen.lock().unwrap().len();
    let key_before = std::fs::read(out.join("agent.key")).unwrap();
    let if_absent = |dir: String| {
        let (url, hash) = (url.clone(), hash.clone());
        tokio::task::spawn_blocking(move || {
            enroll_cmd(&[
                "--if-absent",
                "--url",
                &url,
                "--token",
                "good",
                "--ca-sha256",
                &hash,
                "--name",
                "vm-1",
                "--out",
                &dir,
            ])
        })
    };
    let r = if_absent(o.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(stdout.contains("already enrolled"), "{stdout}");
    assert_eq!(seen.lock().unwrap().len(), before, "nothing is sent");
    assert_eq!(std::fs::read(out.join("agent.key")).unwrap(), key_before);
    // A key without the rest (an enrollment that did not finish) is not an identity: refused
    // with and without the flag, naming what is missing.
    let partial = pki.path("tls-partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(out.join("agent.key"), partial.join("agent.key")).unwrap();
    let r = if_absent(partial.to_str().unwrap().to_string())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("agent.pem and agent.toml") && err.contains("did not finish"),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().len(), before);
}

#[tokio::test]
async fn enroll_refuses_a_server_that_does_not_present_the_pinned_ca() {
    let pki = Pki::new();
    let (port, seen) = enroll_server(&pki, false).await;
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, pki.ca.der()).as_ref());
    let o = pki.path("tls").to_str().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}");
    let r = tokio::task::spawn_blocking(move || {
        enroll_cmd(&[
            "--url",
            &url,
            "--token",
            "good",
            "--ca-sha256",
            &hash,
            "--name",
            "vm-1",
            "--out",
            &o,
        ])
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("pinned sha256"), "{err}");
    assert!(seen.lock().unwrap().is_empty());
}

// ------------------------------------------------------------------------------------------------
// doctor
// ------------------------------------------------------------------------------------------------

fn doctor(config: &Path) -> (i32, serde_json::Value) {
    doctor_with_path(config, None)
}

/// `doctor`, with `PATH` replaced when given (to hide nft and iptables).
fn doctor_with_path(config: &Path, path: Option<&Path>) -> (i32, serde_json::Value) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_delegate"));
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd
        .args([
            "doctor",
            "--json",
            "--timeout",
            "5",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn level_of(v: &serde_json::Value, check: &str) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .map(|c| c["level"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no check {check} in {v:#}"))
}

fn detail_of(v: &serde_json::Value, check: &str) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .map(|c| format!("{} (fix: {})", c["detail"], c["fix"]))
        .unwrap()
}

#[tokio::test]
async fn doctor_reports_each_failing_check_and_passes_the_control_plane_probe() {
    let pki = Pki::new();
    pki.agent_files(-1, 30);
    let server = Server::start(&pki).await;
    // The host firewall off: a warning that says what that leaves open, not a failure.
    let config = write_config(
        &pki,
        &server.url(),
        "info",
        "[egress]\nallow = [\"registry.example:443\"]\nfirewall = \"off\"\n",
    );
    std::fs::create_dir_all(pki.path("data")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pki.path("data"), std::fs::Permissions::from_mode(0o700)).unwrap();
    // The control plane answers the probe; no agent connection is made by it.
    let accepted = Arc::new(Mutex::new(0u32));
    let count = accepted.clone();
    let srv = tokio::spawn(async move {
        let _conn = server.accept_welcome().await;
        *count.lock().unwrap() += 1;
    });
    let (code, v) = tokio::task::spawn_blocking({
        let c = config.clone();
        move || doctor(&c)
    })
    .await
    .unwrap();
    assert_eq!(level_of(&v, "config"), "ok");
    assert_eq!(level_of(&v, "key permissions"), "ok");
    assert_eq!(level_of(&v, "data_dir permissions"), "ok");
    assert_eq!(
        level_of(&v, "certificate"),
        "ok",
        "{}",
        detail_of(&v, "certificate")
    );
    assert_eq!(
        level_of(&v, "control plane"),
        "ok",
        "{}",
        detail_of(&v, "control plane")
    );
    assert!(detail_of(&v, "control plane").contains("protocol v1"));
    assert_eq!(level_of(&v, "egress"), "ok");
    assert_eq!(level_of(&v, "egress firewall"), "warn");
    assert!(detail_of(&v, "egress firewall").contains("off"));
    // Docker is pointed at nothing: both Docker checks fail, so the exit code is 1.
    assert_eq!(level_of(&v, "docker"), "fail");
    assert_eq!(level_of(&v, "sandbox image"), "fail");
    assert_eq!(code, 1);
    assert_eq!(
        *accepted.lock().unwrap(),
        0,
        "the probe must not become an agent connection"
    );
    srv.abort();

    // Now break things, one per check.
    std::fs::set_permissions(
        pki.path("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(pki.path("data"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // An expired certificate.
    let key = KeyPair::from_pem(&std::fs::read_to_string(pki.path("agent.key")).unwrap()).unwrap();
    std::fs::write(pki.path("agent.pem"), pki.client(&key, "runner-1", -10, 2)).unwrap();
    // Nothing listens at the URL any more; the mirror is not on the allowlist.
    write_config(
        &pki,
        "wss://127.0.0.1:9/v1/agent",
        "info",
        "[egress]\nallow = [\"registry.example:443\"]\n",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "pull_policy = \"never\"",
        "pull_policy = \"never\"\nprovider_mirror = \"https://mirror.internal:8443/providers/\"",
    );
    std::fs::write(&config, text).unwrap();
    // The firewall at its default (auto) on a host without nft or iptables (an empty PATH): the
    // agent would start but refuse every task, so doctor fails it.
    let no_tools = pki.path("empty-path");
    std::fs::create_dir_all(&no_tools).unwrap();
    let (code, v) = tokio::task::spawn_blocking({
        let c = config.clone();
        move || doctor_with_path(&c, Some(&no_tools))
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    for check in [
        "key permissions",
        "data_dir permissions",
        "certificate",
        "control plane",
        "egress",
        "egress firewall",
        "docker",
        "sandbox image",
    ] {
        assert_eq!(
            level_of(&v, check),
            "fail",
            "{check}: {}",
            detail_of(&v, check)
        );
    }
    assert!(detail_of(&v, "key permissions").contains("chmod 600"));
    assert!(detail_of(&v, "data_dir permissions").contains("chmod 700"));
    assert!(detail_of(&v, "egress").contains("mirror.internal:8443"));
    let fw = detail_of(&v, "egress firewall");
    assert!(
        fw.contains("neither nft nor iptables") && fw.contains("install nftables"),
        "{fw}"
    );

    // A configuration that does not load: one failing check naming the key.
    std::fs::write(&config, "data_dir = \"d\"\n[agent]\nslots = 0\n").unwrap();
    let (code, v) = tokio::task::spawn_blocking(move || doctor(&config))
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert_eq!(level_of(&v, "config"), "fail");
    assert!(detail_of(&v, "config").contains("agent.slots"));

    // The text form: one line per check, `ok|warn|FAIL  check  detail  (fix: hint)`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_delegate"))
        .args([
            "doctor",
            "--config",
            pki.path("agent.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("FAIL  config  "), "{text}");
    assert!(text.contains("(fix: "), "{text}");
}
