//! Shared helpers for the in-process control plane tests: a data dir from `init`, `serve::start`
//! on ephemeral ports, and a raw tokio-rustls + tokio-tungstenite agent client.
#![allow(dead_code)]

use delegate_controlplane::api::{AgentView, AuditView};
use delegate_controlplane::client::ApiClient;
use delegate_controlplane::config::{CpConfig, DataDir};
use delegate_controlplane::init::{init, InitOptions};
use delegate_controlplane::serve::{start, Running};
use delegate_protocol::{decode_text, encode_text, Hello, Message};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

pub struct Env {
    pub _tmp: tempfile::TempDir,
    pub dd: DataDir,
    pub running: Option<Running>,
}

impl Env {
    pub async fn new(heartbeat_ms: u64) -> Env {
        Self::with_config(CpConfig {
            heartbeat_interval_ms: heartbeat_ms,
            ..CpConfig::default()
        })
        .await
    }

    /// `cfg` with both listen addresses replaced by ephemeral loopback ports.
    pub async fn with_config(cfg: CpConfig) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("delegate_controlplane=debug")
            .try_init();
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("cp"));
        init(
            &dd,
            &InitOptions {
                agents: vec!["a1".into(), "a2".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let cfg = CpConfig {
            agent_listen: "127.0.0.1:0".into(),
            api_listen: "127.0.0.1:0".into(),
            ..cfg
        };
        std::fs::write(dd.config(), cfg.to_toml()).unwrap();
        let running = start(&dd).await.unwrap();
        Env {
            _tmp: tmp,
            dd,
            running: Some(running),
        }
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().agent_addr
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::from_data_dir(&self.dd).unwrap()
    }

    pub fn bundle(&self, name: &str) -> (String, String) {
        let dir = self.dd.agent_dir(name);
        (
            std::fs::read_to_string(dir.join("agent.pem")).unwrap(),
            std::fs::read_to_string(dir.join("agent.key")).unwrap(),
        )
    }

    pub async fn audit(&self) -> Vec<AuditView> {
        self.api().get_json("/api/v1/audit").await.unwrap()
    }

    /// Wait until an audit record matches; the trail is written asynchronously to the client.
    pub async fn wait_audit(&self, pred: impl Fn(&AuditView) -> bool) -> AuditView {
        for _ in 0..500 {
            if let Some(r) = self.audit().await.into_iter().find(&pred) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no matching audit record in {:#?}", self.audit().await);
    }

    pub async fn agents(&self) -> Vec<AgentView> {
        self.api().get_json("/api/v1/agents").await.unwrap()
    }

    pub async fn wait_agent_state(&self, name: &str, state: &str) {
        for _ in 0..500 {
            if self
                .agents()
                .await
                .iter()
                .any(|a| a.name == name && a.state == state)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{name} never became {state}: {:?}", self.agents().await);
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in delegate_controlplane::tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    roots
}

pub fn client_config(
    ca: &Path,
    identity: Option<(&str, &str)>,
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots(ca));
    match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

/// TLS then WebSocket; the error text of whichever step failed.
pub async fn connect_with(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    path: &str,
) -> Result<Ws, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}{path}", addr.port()), tls)
            .await
            .map_err(|e| format!("ws: {e}"))?;
    Ok(ws)
}

pub async fn connect(env: &Env, name: &str) -> Ws {
    let (cert, key) = env.bundle(name);
    let cfg = client_config(
        &env.dd.ca_cert(),
        Some((&cert, &key)),
        &rustls::version::TLS13,
    );
    connect_with(env.agent_addr(), cfg, "/v1/agent")
        .await
        .unwrap()
}

pub fn hello(name: &str, versions: Vec<u16>) -> Message {
    Message::Hello(Hello {
        versions,
        agent_version: "9.9.9".into(),
        name: name.into(),
        pool: "default".into(),
        labels: BTreeMap::from([("os".into(), "linux".into())]),
        slots: 2,
        tasks: vec![],
    })
}

pub async fn send(ws: &mut Ws, msg: &Message) {
    ws.send(WsMessage::text(encode_text(msg))).await.unwrap();
}

/// Next control message, skipping server heartbeats unless asked for.
pub async fn recv(ws: &mut Ws, skip_heartbeats: bool) -> Option<Message> {
    loop {
        match ws.next().await? {
            Ok(WsMessage::Text(t)) => {
                let m = decode_text(t.as_str()).unwrap();
                if skip_heartbeats && matches!(m, Message::Heartbeat(_)) {
                    continue;
                }
                return Some(m);
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Something the control plane sent, heartbeats skipped.
#[derive(Debug)]
pub enum Incoming {
    Control(Message),
    Binary(delegate_protocol::BinaryFrame),
}

pub async fn recv_any(ws: &mut Ws) -> Option<Incoming> {
    loop {
        match ws.next().await? {
            Ok(WsMessage::Text(t)) => {
                let m = decode_text(t.as_str()).unwrap();
                if matches!(m, Message::Heartbeat(_)) {
                    continue;
                }
                return Some(Incoming::Control(m));
            }
            Ok(WsMessage::Binary(b)) => {
                return Some(Incoming::Binary(
                    delegate_protocol::decode_binary(&b).unwrap(),
                ))
            }
            Ok(WsMessage::Close(f)) => {
                eprintln!("closed by the server: {f:?}");
                return None;
            }
            Err(e) => {
                eprintln!("websocket error: {e}");
                return None;
            }
            Ok(_) => continue,
        }
    }
}

/// The next control message (fails on a binary frame).
pub async fn recv_msg(ws: &mut Ws) -> Message {
    match recv_any(ws).await {
        Some(Incoming::Control(m)) => m,
        other => panic!("expected a control message, got {other:?}"),
    }
}

pub fn hello_with(name: &str, slots: u32, tasks: Vec<delegate_protocol::HeldTask>) -> Message {
    Message::Hello(Hello {
        versions: vec![1],
        agent_version: "9.9.9".into(),
        name: name.into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        slots,
        tasks,
    })
}

/// Connect as `name` with `slots`, say hello, return the socket and the welcome.
pub async fn agent(
    env: &Env,
    name: &str,
    slots: u32,
    tasks: Vec<delegate_protocol::HeldTask>,
) -> (Ws, delegate_protocol::Welcome) {
    let mut ws = connect(env, name).await;
    send(&mut ws, &hello_with(name, slots, tasks)).await;
    match recv_msg(&mut ws).await {
        Message::Welcome(w) => (ws, w),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Read input chunks of `kind` until the last one; returns the blob.
pub async fn read_blob(ws: &mut Ws, kind: delegate_protocol::ChunkKind) -> Vec<u8> {
    let mut out = Vec::new();
    let mut expect = 0;
    loop {
        match recv_any(ws).await {
            Some(Incoming::Binary(delegate_protocol::BinaryFrame::Chunk(c))) => {
                assert_eq!(c.kind, kind);
                assert_eq!(c.seq, expect, "input chunks are numbered from 0");
                expect += 1;
                out.extend_from_slice(&c.data);
                if c.last {
                    return out;
                }
            }
            other => panic!("expected a {kind:?} chunk, got {other:?}"),
        }
    }
}

pub async fn send_binary(ws: &mut Ws, frame: delegate_protocol::BinaryFrame) {
    ws.send(WsMessage::binary(delegate_protocol::encode_binary(&frame)))
        .await
        .unwrap();
}

pub fn sha256_hex(data: &[u8]) -> String {
    delegate_controlplane::tasks::sha256_hex(data)
}

pub async fn submit(
    env: &Env,
    req: &delegate_controlplane::task_ops::SubmitRequest,
) -> delegate_controlplane::api_tasks::TaskView {
    env.api().post_json("/api/v1/tasks", req).await.unwrap()
}

pub async fn show(env: &Env, id: &str) -> delegate_controlplane::api_tasks::TaskView {
    env.api()
        .get_json(&format!("/api/v1/tasks/{id}"))
        .await
        .unwrap()
}

/// The next message that is not a heartbeat; server heartbeats are answered so the link stays up.
pub async fn recv_alive(ws: &mut Ws) -> Message {
    loop {
        match recv(ws, false).await.expect("the link closed") {
            Message::Heartbeat(_) => {
                send(
                    ws,
                    &Message::Heartbeat(delegate_protocol::Heartbeat { ts_ms: 1 }),
                )
                .await
            }
            m => return m,
        }
    }
}

/// Read until an ack for `task` reaches `seq`; any other message fails the test.
pub async fn wait_ack(ws: &mut Ws, task: uuid::Uuid, seq: u64) {
    loop {
        match recv_alive(ws).await {
            Message::Ack(a) if a.task_id == task && a.seq >= seq => return,
            Message::Ack(_) => {}
            Message::Error(e) => panic!("unexpected error: {e:?}"),
            other => panic!("unexpected {other:?} while waiting for ack {seq}"),
        }
    }
}

/// Upload `data` as artifact `kind` starting at `seq`, announcing `announce_sha`; returns the
/// next free seq.
pub async fn artifact(
    ws: &mut Ws,
    task: uuid::Uuid,
    mut seq: u64,
    kind: delegate_protocol::ChunkKind,
    data: &[u8],
    announce_sha: &str,
) -> u64 {
    use delegate_protocol::{Artifact, BinaryFrame, ChunkFrame};
    let chunks: Vec<&[u8]> = data.chunks(1000).collect();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        send_binary(
            ws,
            BinaryFrame::Chunk(ChunkFrame {
                task_id: task,
                seq,
                kind,
                last: i + 1 == n,
                data: c.to_vec(),
            }),
        )
        .await;
        seq += 1;
    }
    send(
        ws,
        &Message::Artifact(Artifact {
            task_id: task,
            seq,
            kind,
            size: data.len() as u64,
            sha256: announce_sha.to_string(),
        }),
    )
    .await;
    seq + 1
}
