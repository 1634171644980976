//! The agent endpoint: TCP accept → TLS 1.3 with a required client certificate → WebSocket on
//! `/v1/agent` → Hello/Welcome → heartbeats and message handling until the link ends.
//!
//! Owns: one task per connection, its reader loop and its writer task, refusal logging and
//! auditing, liveness (three silent heartbeat intervals = dead), decode errors. The agent's
//! identity is the CN of its verified certificate, never what it claims in Hello.
//! Never panics on anything a peer sends, and never holds the hub lock across an `.await`.

use crate::cp::{ControlPlane, Counters};
use crate::hub::{AgentConn, Outbound};
use crate::store::AgentHello;
use crate::tasks::{Fault, Reply};
use delegate_protocol::{
    decode_binary, decode_text, encode_text, limits, negotiate, ErrorCode, ErrorMsg, Heartbeat,
    Hello, Message, Welcome, SUPPORTED_VERSIONS,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

/// How long a peer has for the TLS handshake, the WebSocket upgrade, and then for Hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The WebSocket path agents connect to.
pub const AGENT_PATH: &str = "/v1/agent";
/// Frames handled before acknowledgements are flushed, when a burst keeps arriving.
const MAX_BURST: usize = 256;

type Ws = WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

/// Accept agent connections until the task is dropped.
pub async fn serve(cp: Arc<ControlPlane>, listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: keep serving, but do not spin.
                tracing::warn!(error = %e, "agent endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cp = cp.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move { handle_tcp(cp, tcp, peer, acceptor).await });
    }
}

fn refuse(cp: &ControlPlane, peer: SocketAddr, reason: &str) {
    Counters::bump(&cp.counters.refused_handshakes);
    tracing::warn!(%peer, reason, "agent connection refused");
    cp.audit("unknown", "agent.refused", &peer.to_string(), reason);
}

/// The reason a TLS handshake failed, as rustls puts it (e.g. "peer sent no certificates").
fn tls_reason(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

async fn handle_tcp(
    cp: Arc<ControlPlane>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => return refuse(&cp, peer, "TLS handshake timed out"),
        Ok(Err(e)) => {
            return refuse(
                &cp,
                peer,
                &format!("TLS handshake failed: {}", tls_reason(&e)),
            )
        }
        Ok(Ok(s)) => s,
    };
    let (identity, serial) = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match (
            crate::pki::common_name(cert.as_ref()),
            crate::pki::serial_hex(cert.as_ref()),
        ) {
            (Ok(cn), Ok(serial)) => (cn, serial),
            (Err(e), _) | (_, Err(e)) => {
                return refuse(&cp, peer, &format!("client certificate: {e}"))
            }
        },
        None => return refuse(&cp, peer, "no client certificate"),
    };
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(limits::MAX_WS_MESSAGE))
        .max_frame_size(Some(limits::MAX_WS_MESSAGE));
    // The error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &tungstenite::handshake::server::Request,
                      resp: tungstenite::handshake::server::Response| {
        if req.uri().path() == AGENT_PATH {
            Ok(resp)
        } else {
            let mut err = tungstenite::handshake::server::ErrorResponse::new(Some(format!(
                "not found: agents connect to {AGENT_PATH}"
            )));
            *err.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
            Err(err)
        }
    };
    let ws = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(tls, check_path, Some(ws_config)),
    )
    .await
    {
        Err(_) => {
            return refuse(
                &cp,
                peer,
                &format!("agent {identity}: WebSocket upgrade timed out"),
            )
        }
        Ok(Err(e)) => {
            return refuse(
                &cp,
                peer,
                &format!("agent {identity}: WebSocket upgrade failed: {e}"),
            )
        }
        Ok(Ok(ws)) => ws,
    };
    // Revoked or superseded: told why and closed before Hello (see `revoke`).
    if let Err(r) = crate::revoke::admit_certificate(&cp, &identity, &serial) {
        return crate::revoke::refuse_connection(&cp, &identity, &peer.to_string(), ws, r).await;
    }
    run_connection(cp, identity, peer, ws).await;
}

/// Why a connection ended, for the log, the audit record and the connection history.
type EndReason = String;

async fn run_connection(cp: Arc<ControlPlane>, identity: String, peer: SocketAddr, ws: Ws) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let (beat_tx, beat_rx) = oneshot::channel::<Duration>();
    // The writer owns the heartbeats: they leave on time even while the reader is busy storing a
    // large burst (a resent spool after a restart), so the agent never takes a slow store for a
    // dead link.
    let writer = tokio::spawn(async move {
        let mut beat_rx = Some(beat_rx);
        let mut beats: Option<tokio::time::Interval> = None;
        loop {
            let out = tokio::select! {
                out = rx.recv() => out,
                interval = async { beat_rx.as_mut().expect("guarded").await }, if beat_rx.is_some() => {
                    beat_rx = None;
                    // An error means the connection was never welcomed: no heartbeats.
                    if let Ok(i) = interval {
                        let mut t = tokio::time::interval_at(Instant::now() + i, i);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        beats = Some(t);
                    }
                    continue;
                }
                _ = async { beats.as_mut().expect("guarded").tick().await }, if beats.is_some() => {
                    Some(Outbound::Text(encode_text(&Message::Heartbeat(Heartbeat {
                        ts_ms: crate::now_ms() as u64,
                    }))))
                }
            };
            let Some(out) = out else { break };
            let msg = match out {
                Outbound::Text(t) => WsMessage::text(t),
                Outbound::Binary(b) => WsMessage::binary(b),
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let mut session = Session {
        cp: cp.clone(),
        agent: identity.clone(),
        peer: peer.to_string(),
        tx,
        beats: Some(beat_tx),
        conn_id: 0,
        db_conn_id: None,
        decode_errors: 0,
        acks: BTreeMap::new(),
    };
    let reason = session.run(&mut stream).await;
    session.finish(&reason);
    drop(session);
    // Let the writer flush what is queued (a final error message) and close the socket.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

struct Session {
    cp: Arc<ControlPlane>,
    agent: String,
    peer: String,
    tx: mpsc::UnboundedSender<Outbound>,
    /// Starts the writer's heartbeats once the agent is welcomed.
    beats: Option<oneshot::Sender<Duration>>,
    /// Hub connection id (0 until registered).
    conn_id: u64,
    /// Row in the connection history (None until Hello is accepted).
    db_conn_id: Option<i64>,
    decode_errors: u64,
    /// Highest stored seq per task not yet acknowledged on this connection.
    acks: BTreeMap<Uuid, u64>,
}

/// A decoded WebSocket message.
enum Decoded {
    Control(Message),
    Binary(delegate_protocol::BinaryFrame),
}

/// What a received frame led to.
enum Step {
    Continue,
    End(EndReason),
}

impl Session {
    fn send(&self, msg: &Message) {
        let _ = self.tx.send(Outbound::Text(encode_text(msg)));
    }

    fn send_error(&self, code: ErrorCode, message: String, task_id: Option<Uuid>) {
        self.send(&Message::Error(ErrorMsg {
            code,
            message,
            task_id,
        }));
    }

    fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.cp.config.heartbeat_interval_ms)
    }

    async fn run(&mut self, stream: &mut futures_util::stream::SplitStream<Ws>) -> EndReason {
        // Phase 1: Hello within HANDSHAKE_TIMEOUT.
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let hello = loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = sleep_until(deadline) => return "no hello within 10 s".into(),
            };
            match item {
                None => return "connection closed before hello".into(),
                Some(Err(e)) => return format!("websocket error before hello: {e}"),
                Some(Ok(m)) => match self.decode(m) {
                    Ok(Some(Decoded::Control(Message::Hello(h)))) => break h,
                    Ok(Some(other)) => {
                        let what = match &other {
                            Decoded::Control(m) => m.type_name(),
                            Decoded::Binary(_) => "a binary frame",
                        };
                        self.violation(format!("expected hello first, got {what}"), None);
                    }
                    Ok(None) => {}
                    Err(reason) => return reason,
                },
            }
        };
        let (close_tx, mut close_rx) = oneshot::channel();
        if let Err(reason) = self.accept_hello(hello, close_tx) {
            return reason;
        }

        // Phase 2: connected. Heartbeats go out from the writer.
        let interval = self.heartbeat_interval();
        if let Some(beats) = self.beats.take() {
            let _ = beats.send(interval);
        }
        let mut last_rx = Instant::now();
        loop {
            let item = tokio::select! {
                biased;
                reason = &mut close_rx => {
                    return reason.unwrap_or_else(|_| "closed by the control plane".into());
                }
                _ = sleep_until(last_rx + interval * 3) => {
                    return format!(
                        "no frame from the agent for 3 heartbeat intervals ({} ms)",
                        interval.as_millis() * 3
                    );
                }
                item = stream.next() => item,
            };
            // Take the burst that is already readable, store it, then acknowledge it in one go.
            let mut burst = vec![item];
            while burst.len() < MAX_BURST {
                match stream.next().now_or_never() {
                    Some(item) => burst.push(item),
                    None => break,
                }
            }
            let end = self.ingest(burst);
            // The agent was sending all along: the time spent storing is not its silence.
            last_rx = Instant::now();
            if let Some(reason) = end {
                return reason;
            }
        }
    }

    /// Handle a burst of frames: store work (SQLite, sealing) is blocking, so on a multi-thread
    /// runtime it runs with this worker handed over to the blocking pool, and other connections,
    /// the API and the dispatcher keep running meanwhile.
    fn ingest(
        &mut self,
        burst: Vec<Option<Result<WsMessage, tungstenite::Error>>>,
    ) -> Option<EndReason> {
        let multi = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .unwrap_or(false);
        if multi {
            tokio::task::block_in_place(|| self.ingest_now(burst))
        } else {
            self.ingest_now(burst)
        }
    }

    fn ingest_now(
        &mut self,
        burst: Vec<Option<Result<WsMessage, tungstenite::Error>>>,
    ) -> Option<EndReason> {
        let mut end = None;
        for item in burst {
            match item {
                None => end = Some("connection closed by the agent".into()),
                Some(Err(e)) => end = Some(format!("websocket error: {e}")),
                Some(Ok(m)) => {
                    if let Step::End(reason) = self.on_ws_message(m) {
                        end = Some(reason);
                    }
                }
            }
            if end.is_some() {
                break;
            }
        }
        self.flush_acks();
        end
    }

    /// Decode a WebSocket message into a control message. Undecodable frames are answered and
    /// counted (`Ok(None)`); a close frame ends the connection (`Err`).
    fn decode(&mut self, m: WsMessage) -> Result<Option<Decoded>, EndReason> {
        let result = match m {
            WsMessage::Text(t) => decode_text(t.as_str()).map(Decoded::Control),
            WsMessage::Binary(b) => decode_binary(&b).map(Decoded::Binary),
            WsMessage::Close(frame) => {
                return Err(match frame {
                    Some(f) if !f.reason.is_empty() => {
                        format!("closed by the agent: {}", f.reason.as_str())
                    }
                    _ => "closed by the agent".into(),
                })
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => return Ok(None),
        };
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => {
                self.decode_errors += 1;
                Counters::bump(&self.cp.counters.decode_errors);
                tracing::warn!(
                    agent = %self.agent,
                    peer = %self.peer,
                    error = %e,
                    count = self.decode_errors,
                    "undecodable frame from agent"
                );
                self.send_error(e.code(), e.to_string(), None);
                Ok(None)
            }
        }
    }

    fn accept_hello(
        &mut self,
        hello: Hello,
        close_tx: oneshot::Sender<String>,
    ) -> Result<(), EndReason> {
        let version = match negotiate(SUPPORTED_VERSIONS, &hello.versions) {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                if hello.versions.is_empty() {
                    // An empty offer is how `delegate doctor` asks which versions are spoken: a
                    // check from an agent host, not a refused agent.
                    tracing::info!(agent = %self.agent, peer = %self.peer, "version probe (delegate doctor)");
                    self.cp.audit(
                        &self.agent,
                        "agent.probed",
                        &self.agent,
                        &format!("version probe from {} (delegate doctor)", self.peer),
                    );
                } else {
                    tracing::warn!(agent = %self.agent, peer = %self.peer, "{msg}");
                    self.cp
                        .audit(&self.agent, "agent.refused", &self.agent, &msg);
                }
                self.send_error(ErrorCode::UnsupportedVersion, msg.clone(), None);
                return Err(msg);
            }
        };
        if let Err(r) = crate::revoke::admit_hello(&self.cp, &self.agent, &hello.pool) {
            return Err(self.refuse_identity(r));
        }
        if hello.name != self.agent {
            tracing::info!(
                agent = %self.agent,
                claimed = %hello.name,
                "hello names a different agent; identity comes from the certificate"
            );
        }
        self.conn_id = self.cp.next_conn_id();
        let replaced = self.cp.hub().register(
            &self.agent,
            AgentConn {
                conn_id: self.conn_id,
                peer: self.peer.clone(),
                pool: hello.pool.clone(),
                slots: hello.slots,
                tx: self.tx.clone(),
                close: Some(close_tx),
                held: BTreeSet::new(),
                ready: false,
            },
        );
        if let Some(mut old) = replaced {
            if let Some(close) = old.close.take() {
                let _ = close.send(format!("replaced by a new connection from {}", self.peer));
            }
        }
        // A revocation recorded between the check above and the registration found no
        // connection to close: look again now that this one is visible to it.
        if let Err(r) = crate::revoke::admit_hello(&self.cp, &self.agent, &hello.pool) {
            self.cp.hub().unregister(&self.agent, self.conn_id);
            return Err(self.refuse_identity(r));
        }
        let now = crate::now_ms();
        match self.cp.store.agent_connected(
            &AgentHello {
                name: &self.agent,
                pool: &hello.pool,
                labels: &hello.labels,
                version: &hello.agent_version,
                slots: hello.slots,
                peer: &self.peer,
            },
            now,
        ) {
            Ok(id) => self.db_conn_id = Some(id),
            Err(e) => {
                tracing::error!(agent = %self.agent, error = %e, "cannot record agent connection");
                self.send_error(
                    ErrorCode::Internal,
                    "control plane storage error".into(),
                    None,
                );
                return Err(format!("storage error: {e}"));
            }
        }
        tracing::info!(
            agent = %self.agent,
            peer = %self.peer,
            version = %hello.agent_version,
            pool = %hello.pool,
            slots = hello.slots,
            protocol = version,
            "agent connected"
        );
        self.cp.audit(
            &self.agent,
            "agent.connected",
            &self.agent,
            &format!(
                "peer {} version {} pool {} slots {} protocol {version}",
                self.peer, hello.agent_version, hello.pool, hello.slots
            ),
        );
        let resume = self.cp.resume_points(&self.agent, &hello.tasks);
        self.send(&Message::Welcome(Welcome {
            version,
            agent_id: self.agent.clone(),
            heartbeat_interval_ms: self.cp.config.heartbeat_interval_ms,
            resume,
        }));
        self.cp.after_welcome(&self.agent);
        Ok(())
    }

    fn on_ws_message(&mut self, m: WsMessage) -> Step {
        let msg = match self.decode(m) {
            Ok(Some(Decoded::Control(msg))) => msg,
            Ok(Some(Decoded::Binary(frame))) => {
                self.on_binary_frame(frame);
                return Step::Continue;
            }
            Ok(None) => return Step::Continue,
            Err(reason) => return Step::End(reason),
        };
        match msg {
            Message::Heartbeat(_) => {
                if let Err(e) = self.cp.store.agent_heartbeat(&self.agent, crate::now_ms()) {
                    tracing::warn!(agent = %self.agent, error = %e, "cannot record heartbeat");
                }
            }
            Message::RenewRequest(r) => {
                let result = crate::enroll::renew(&self.cp, &self.agent, &r.csr_pem);
                self.on_reply(result);
            }
            Message::Error(e) => {
                tracing::warn!(
                    agent = %self.agent,
                    code = e.code.as_str(),
                    message = %e.message,
                    task = ?e.task_id,
                    "agent reported an error"
                );
            }
            Message::Hello(_)
            | Message::Welcome(_)
            | Message::Assign(_)
            | Message::Ack(_)
            | Message::Cancel(_)
            | Message::StateResponse(_) => {
                self.violation(
                    format!("{} is not a message an agent sends here", msg.type_name()),
                    None,
                );
            }
            other => {
                let result = self.cp.on_task_message(&self.agent, other);
                self.on_reply(result);
            }
        }
        Step::Continue
    }

    fn on_binary_frame(&mut self, frame: delegate_protocol::BinaryFrame) {
        let result = self.cp.on_binary_frame(&self.agent, frame);
        self.on_reply(result);
    }

    fn on_reply(&mut self, result: Result<Reply, Fault>) {
        match result {
            Ok(reply) => {
                if let Some((task, seq)) = reply.ack {
                    let e = self.acks.entry(task).or_insert(seq);
                    *e = (*e).max(seq);
                }
                for m in reply.send {
                    self.send(&m);
                }
                for b in reply.binary {
                    let _ = self.tx.send(Outbound::Binary(b));
                }
            }
            Err(fault) => self.fault(fault),
        }
    }

    fn fault(&self, fault: Fault) {
        if fault.code == ErrorCode::ProtocolViolation {
            return self.violation(fault.message, fault.task_id);
        }
        tracing::warn!(agent = %self.agent, task = ?fault.task_id, code = fault.code.as_str(), "{}", fault.message);
        self.send_error(fault.code, fault.message, fault.task_id);
    }

    fn violation(&self, message: String, task_id: Option<Uuid>) {
        Counters::bump(&self.cp.counters.protocol_violations);
        tracing::warn!(agent = %self.agent, task = ?task_id, "protocol violation: {message}");
        self.send_error(ErrorCode::ProtocolViolation, message, task_id);
    }

    /// Refuse this identity after its Hello: audited, told why; returns the end reason.
    fn refuse_identity(&self, r: crate::revoke::Refusal) -> EndReason {
        crate::revoke::audit_refusal(&self.cp, &self.agent, &self.peer, &r);
        self.send(&r.message());
        r.to_string()
    }

    fn flush_acks(&mut self) {
        for (task_id, seq) in std::mem::take(&mut self.acks) {
            self.send(&Message::Ack(delegate_protocol::Ack { task_id, seq }));
        }
    }

    /// Record the end of the connection (only if Hello was accepted).
    fn finish(&mut self, reason: &str) {
        let Some(db_conn_id) = self.db_conn_id else {
            tracing::info!(agent = %self.agent, peer = %self.peer, reason, "agent connection ended before hello");
            return;
        };
        let removed = self.cp.hub().unregister(&self.agent, self.conn_id);
        let still_connected = removed.is_none();
        if let Err(e) = self.cp.store.agent_disconnected(
            &self.agent,
            db_conn_id,
            reason,
            still_connected,
            crate::now_ms(),
        ) {
            tracing::error!(agent = %self.agent, error = %e, "cannot record disconnection");
        }
        tracing::info!(
            agent = %self.agent,
            peer = %self.peer,
            reason,
            decode_errors = self.decode_errors,
            "agent disconnected"
        );
        self.cp.audit(
            &self.agent,
            "agent.disconnected",
            &self.agent,
            &format!("peer {}: {reason}", self.peer),
        );
        if let Some(conn) = removed {
            self.cp.after_disconnect(&self.agent, conn);
        }
    }
}
