//! The link to the control plane: one outbound WebSocket over TLS 1.3 with the agent's client
//! certificate, kept up for the life of the agent.
//!
//! Owns the connection lifecycle ([`machine::LinkState`]): connect (TCP with a timeout, TLS,
//! WebSocket upgrade, Hello/Welcome), the frame loop (heartbeats both ways, dead-peer detection
//! after three silent intervals, decoding every frame and answering an undecodable one with
//! `error`), and reconnecting with exponential backoff and full jitter. Task messages go to and
//! come from the [`TaskManager`]; this module never interprets them.
//!
//! Must never: crash or stop reconnecting on anything the peer sends, block the frame loop on a
//! write (a writer task owns the sink, so a blackholed peer is still detected by the timer), log
//! task output or secrets, or flood the agent's log with the peer's bad frames (rate-limited).
//!
//! Certificates: every connection attempt takes the TLS configuration current at that moment from
//! the [`TlsHandle`], so a reload (SIGHUP) or a renewal is used by the next connection while the
//! current one stays up. With a [`Renewer`], a welcomed connection sends `renew_request` when the
//! certificate reaches about two thirds of its life and installs the `renew_response` off the
//! frame loop (a blocking task), retrying on the renewal schedule if no answer comes.

pub mod liveness;
pub mod machine;

use crate::config::Endpoint;
use crate::renew::Renewer;
use crate::tasks::{TaskManager, WireFrame};
use crate::tls::TlsHandle;
use delegate_protocol::{
    decode_binary, decode_text, encode_text, limits, ErrorCode, ErrorMsg, Heartbeat, Hello,
    Message, RenewRequest, RenewResponse, Welcome, SUPPORTED_VERSIONS,
};
use futures_util::{SinkExt, StreamExt};
use liveness::{Liveness, RateLimit};
use machine::{Backoff, LinkEvent, LinkState, Policy};
use rustls::pki_types::ServerName;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Bounds on the heartbeat interval a control plane may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
const MAX_HEARTBEAT: Duration = Duration::from_secs(600);
/// Frames queued for the writer task.
const WRITE_QUEUE: usize = 32;

/// Why a connection attempt failed or a connection ended. Every variant is retried with backoff;
/// none stops the agent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no connection within {0:?} (TCP, TLS, WebSocket and hello/welcome)")]
    Timeout(Duration),
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(String),
    #[error("the control plane refused the connection ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("nothing received from the control plane for {0:?} (three heartbeat intervals): peer presumed dead")]
    DeadPeer(Duration),
    #[error("the control plane closed the connection{0}")]
    Closed(String),
    #[error("connection error: {0}")]
    Io(String),
}

impl LinkError {
    /// Always true: the link reconnects after any of these.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// What the link needs to know.
#[derive(Clone)]
pub struct LinkSettings {
    pub endpoint: Endpoint,
    /// The client configuration; each connection attempt takes the current one.
    pub tls: TlsHandle,
    /// Renew the client certificate over the link; `None`: never.
    pub renewer: Option<Renewer>,
    /// How long to wait for `renew_response` before trying again on the renewal schedule.
    pub renew_timeout: Duration,
    pub backoff: Backoff,
    pub connect_timeout: Duration,
    /// A connection that lasted this long resets the backoff.
    pub stable_after: Duration,
    /// On shutdown, how long to wait for the control plane's close reply.
    pub close_timeout: Duration,
    pub agent_version: String,
    pub name: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
}

impl LinkSettings {
    pub fn new(endpoint: Endpoint, tls: impl Into<TlsHandle>, name: String) -> Self {
        LinkSettings {
            endpoint,
            tls: tls.into(),
            renewer: None,
            renew_timeout: Duration::from_secs(300),
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            connect_timeout: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            name,
            pool: "default".into(),
            labels: BTreeMap::new(),
        }
    }
}

/// What the link is doing, for logs, health and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub phase: LinkPhase,
    /// Welcomed connections since start.
    pub connections: u64,
    /// Failed attempts and lost connections since start.
    pub failures: u64,
    /// Why the last attempt failed or the last connection ended (kept while the next attempt
    /// runs).
    pub last_error: Option<String>,
    /// Certificates renewed over the link since start.
    pub renewals: u64,
    /// Why the last renewal attempt failed, if it did (cleared by a successful one).
    pub renew_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkPhase {
    Connecting {
        attempt: u32,
    },
    Connected {
        agent_id: String,
        version: u16,
        heartbeat_interval: Duration,
    },
    Disconnected {
        attempt: u32,
        backoff: Duration,
    },
    Stopped,
}

/// How a session ended when it did not fail.
enum SessionEnd {
    Stopped,
}

/// The agent's link. Create it, take a [`Self::status`] receiver if wanted, then [`Self::run`].
pub struct Link {
    settings: LinkSettings,
    tasks: TaskManager,
    status: watch::Sender<LinkStatus>,
}

impl Link {
    pub fn new(settings: LinkSettings, tasks: TaskManager) -> Self {
        let (status, _) = watch::channel(LinkStatus {
            phase: LinkPhase::Connecting { attempt: 0 },
            connections: 0,
            failures: 0,
            last_error: None,
            renewals: 0,
            renew_error: None,
        });
        Link {
            settings,
            tasks,
            status,
        }
    }

    /// Follow the link's status.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.subscribe()
    }

    /// Connect and keep connected until `stop` fires; then close the WebSocket cleanly (close
    /// frame) and return.
    pub async fn run(self, stop: CancellationToken) {
        let policy = Policy {
            backoff: self.settings.backoff,
            stable_after: self.settings.stable_after,
        };
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let mut state = LinkState::start();
        let mut connections = 0u64;
        loop {
            let (event, reason) = match state {
                LinkState::Stopped => break,
                LinkState::Disconnected { backoff, .. } => {
                    tokio::select! {
                        _ = stop.cancelled() => (LinkEvent::Stop, None),
                        _ = tokio::time::sleep(backoff) => (LinkEvent::BackoffElapsed, None),
                    }
                }
                LinkState::Connecting { attempt } => {
                    self.status
                        .send_modify(|s| s.phase = LinkPhase::Connecting { attempt });
                    let attempt_result = tokio::select! {
                        _ = stop.cancelled() => None,
                        r = tokio::time::timeout(self.settings.connect_timeout, connect(&self.settings, &self.tasks)) => Some(r),
                    };
                    match attempt_result {
                        None => (LinkEvent::Stop, None),
                        Some(Err(_)) => (
                            LinkEvent::ConnectFailed,
                            Some(LinkError::Timeout(self.settings.connect_timeout)),
                        ),
                        Some(Ok(Err(e))) => (LinkEvent::ConnectFailed, Some(e)),
                        Some(Ok(Ok((ws, welcome)))) => {
                            connections += 1;
                            let at = Instant::now();
                            state = match state.on(LinkEvent::Welcomed { at }, &policy, &mut rng) {
                                Ok(s) => s,
                                Err(e) => {
                                    error!(error = %e, "link state machine");
                                    break;
                                }
                            };
                            let interval = Duration::from_millis(welcome.heartbeat_interval_ms)
                                .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
                            info!(
                                agent_id = %welcome.agent_id,
                                protocol_version = welcome.version,
                                heartbeat_ms = interval.as_millis() as u64,
                                resumed_tasks = welcome.resume.len(),
                                url = %self.settings.endpoint.url,
                                "connected to the control plane"
                            );
                            if welcome.agent_id != self.settings.name {
                                warn!(
                                    agent_id = %welcome.agent_id,
                                    name = %self.settings.name,
                                    "the control plane knows this agent by its certificate under another name than agent.name"
                                );
                            }
                            self.status.send_modify(|s| {
                                s.connections = connections;
                                s.phase = LinkPhase::Connected {
                                    agent_id: welcome.agent_id.clone(),
                                    version: welcome.version,
                                    heartbeat_interval: interval,
                                };
                            });
                            let end = session(
                                ws,
                                &welcome,
                                interval,
                                &self.tasks,
                                &stop,
                                &self.settings,
                                &self.status,
                            )
                            .await;
                            self.tasks.on_disconnected();
                            match end {
                                Ok(SessionEnd::Stopped) => (LinkEvent::Stop, None),
                                Err(e) => (LinkEvent::Lost { at: Instant::now() }, Some(e)),
                            }
                        }
                    }
                }
                LinkState::Connected { .. } => {
                    // Sessions run inside the Connecting arm; reaching here is a bug.
                    error!("link loop found a connected state without a session");
                    (LinkEvent::Lost { at: Instant::now() }, None)
                }
            };
            state = match state.on(event, &policy, &mut rng) {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "link state machine");
                    break;
                }
            };
            if let LinkState::Disconnected { attempt, backoff } = state {
                let reason = reason.map(|e| e.to_string()).unwrap_or_default();
                match event {
                    LinkEvent::Lost { .. } => {
                        warn!(error = %reason, retry_in_ms = backoff.as_millis() as u64, "connection to the control plane lost")
                    }
                    _ if reason.contains("unsupported_version") => {
                        error!(error = %reason, retry_in_ms = backoff.as_millis() as u64, "the control plane speaks no protocol version this agent speaks; upgrade one of them")
                    }
                    _ => {
                        warn!(error = %reason, attempt, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the control plane")
                    }
                }
                self.status.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(reason);
                    s.phase = LinkPhase::Disconnected { attempt, backoff };
                });
            }
        }
        info!("link stopped");
        self.status.send_modify(|s| s.phase = LinkPhase::Stopped);
    }
}

fn hello(settings: &LinkSettings, tasks: &TaskManager) -> Hello {
    let mut held = tasks.held_tasks();
    held.truncate(limits::MAX_ENTRIES);
    Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        agent_version: settings.agent_version.clone(),
        name: settings.name.clone(),
        pool: settings.pool.clone(),
        labels: settings.labels.clone(),
        slots: tasks.slots(),
        tasks: held,
    }
}

/// TCP, TLS, WebSocket upgrade, Hello, Welcome.
async fn connect(settings: &LinkSettings, tasks: &TaskManager) -> Result<(Ws, Welcome), LinkError> {
    let mut ws = open(&settings.endpoint, settings.tls.current()).await?;
    let hello = Message::Hello(hello(settings, tasks));
    ws.send(WsMessage::Text(encode_text(&hello).into()))
        .await
        .map_err(|e| LinkError::Io(e.to_string()))?;
    welcome(ws).await
}

/// What [`probe`] learned about a control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The protocol versions the control plane speaks.
    pub versions: Vec<u16>,
    /// The version this agent would use with it (the highest both speak), if any.
    pub negotiated: Option<u16>,
}

/// Check a control plane without becoming a connected agent: TCP, TLS 1.3 with the client
/// certificate, the WebSocket upgrade, then a `hello` offering no protocol version. The control
/// plane answers `unsupported_version` naming the versions it speaks (PROTOCOL.md) and closes, so
/// the probe never replaces a running agent's connection nor is given a task. An agent whose
/// certificate is refused learns it here.
pub async fn probe(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<ProbeReport, LinkError> {
    let mut ws = open(endpoint, tls).await?;
    let hello = Message::Hello(Hello {
        versions: vec![],
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        name: name.to_string(),
        pool: "probe".into(),
        labels: BTreeMap::new(),
        slots: 1,
        tasks: vec![],
    });
    ws.send(WsMessage::Text(encode_text(&hello).into()))
        .await
        .map_err(|e| LinkError::Io(e.to_string()))?;
    let report = match welcome(ws).await {
        Ok((mut ws, w)) => {
            // A control plane that accepted an empty offer: close at once, politely.
            let _ = ws.close(None).await;
            ProbeReport {
                versions: vec![w.version],
                negotiated: SUPPORTED_VERSIONS.contains(&w.version).then_some(w.version),
            }
        }
        Err(LinkError::Refused { code, message })
            if code == ErrorCode::UnsupportedVersion.as_str() =>
        {
            let versions = parse_spoken_versions(&message).ok_or_else(|| {
                LinkError::Handshake(format!(
                    "cannot read the control plane's versions from {message:?}"
                ))
            })?;
            let negotiated = delegate_protocol::negotiate(&versions, SUPPORTED_VERSIONS).ok();
            ProbeReport {
                versions,
                negotiated,
            }
        }
        Err(e) => return Err(e),
    };
    Ok(report)
}

/// The control plane's versions from `no common protocol version: we speak [1, 2], the peer
/// speaks []`.
pub fn parse_spoken_versions(message: &str) -> Option<Vec<u16>> {
    let start = message.find("we speak [")? + "we speak [".len();
    let end = start + message[start..].find(']')?;
    let list = message[start..end].trim();
    if list.is_empty() {
        return Some(vec![]);
    }
    list.split(',')
        .map(|v| v.trim().trim_start_matches('v').parse::<u16>().ok())
        .collect()
}

/// TCP, TLS and the WebSocket upgrade.
async fn open(ep: &Endpoint, tls: Arc<rustls::ClientConfig>) -> Result<Ws, LinkError> {
    let addr = if ep.host.contains(':') {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    debug!(%addr, "connecting");
    let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| LinkError::Connect {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(ep.host.clone()).map_err(|e| LinkError::Tls {
        addr: addr.clone(),
        reason: format!("invalid server name {:?}: {e}", ep.host),
    })?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| LinkError::Tls {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(limits::MAX_WS_MESSAGE))
        .max_frame_size(Some(limits::MAX_WS_MESSAGE));
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(ep.url.as_str(), tls, Some(ws_config))
            .await
            .map_err(|e| LinkError::Upgrade(e.to_string()))?;
    Ok(ws)
}

/// Read the answer to `hello`.
async fn welcome(mut ws: Ws) -> Result<(Ws, Welcome), LinkError> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or_else(|| LinkError::Closed(" before welcome".into()))?
            .map_err(|e| LinkError::Io(e.to_string()))?;
        match frame {
            WsMessage::Text(t) => match decode_text(t.as_str()) {
                Ok(Message::Welcome(w)) => {
                    if !SUPPORTED_VERSIONS.contains(&w.version) {
                        let msg = format!(
                            "the control plane chose protocol version {}, this agent speaks {:?}",
                            w.version, SUPPORTED_VERSIONS
                        );
                        let _ = ws
                            .send(error_message(
                                ErrorCode::UnsupportedVersion,
                                msg.clone(),
                                None,
                            ))
                            .await;
                        return Err(LinkError::Handshake(msg));
                    }
                    return Ok((ws, w));
                }
                Ok(Message::Error(e)) => {
                    return Err(LinkError::Refused {
                        code: e.code.as_str().to_string(),
                        message: e.message,
                    })
                }
                // A heartbeat before the welcome is harmless.
                Ok(Message::Heartbeat(_)) => continue,
                Ok(other) => {
                    return Err(LinkError::Handshake(format!(
                        "expected welcome, got {:?}",
                        other.type_name()
                    )))
                }
                Err(e) => {
                    return Err(LinkError::Handshake(format!(
                        "undecodable answer to hello: {e}"
                    )))
                }
            },
            WsMessage::Close(frame) => return Err(LinkError::Closed(close_reason(frame.as_ref()))),
            WsMessage::Binary(_) => {
                return Err(LinkError::Handshake(
                    "expected welcome, got a binary frame".into(),
                ))
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
        }
    }
}

fn close_reason(frame: Option<&CloseFrame>) -> String {
    match frame {
        None => String::new(),
        Some(f) if f.reason.is_empty() => format!(" (code {})", u16::from(f.code)),
        Some(f) => format!(" (code {}: {})", u16::from(f.code), f.reason.as_str()),
    }
}

fn error_message(code: ErrorCode, message: String, task_id: Option<uuid::Uuid>) -> WsMessage {
    let mut message = message;
    if message.len() > limits::MAX_TEXT {
        let mut end = limits::MAX_TEXT - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    WsMessage::Text(
        encode_text(&Message::Error(ErrorMsg {
            code,
            message,
            task_id,
        }))
        .into(),
    )
}

fn to_ws(frame: WireFrame) -> WsMessage {
    match frame {
        WireFrame::Text(t) => WsMessage::Text(t.into()),
        WireFrame::Binary(b) => WsMessage::Binary(b),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Owns the sink; ends with an error text when a write fails.
async fn writer(
    mut sink: futures_util::stream::SplitSink<Ws, WsMessage>,
    mut rx: mpsc::Receiver<WsMessage>,
) -> Result<(), String> {
    while let Some(m) = rx.recv().await {
        let closing = matches!(m, WsMessage::Close(_));
        sink.send(m).await.map_err(|e| e.to_string())?;
        if closing {
            break;
        }
    }
    let _ = sink.flush().await;
    Ok(())
}

/// Renewal within one connection: when to ask next, and an install under way.
struct Renewal<'a> {
    renewer: Option<&'a Renewer>,
    name: &'a str,
    timeout: Duration,
    /// Attempts that failed or got no answer (on this connection).
    failures: u32,
    next: Option<Instant>,
    awaiting: bool,
    installing: Option<tokio::task::JoinHandle<Result<crate::renew::Installed, String>>>,
}

impl<'a> Renewal<'a> {
    fn new(settings: &'a LinkSettings) -> Self {
        let mut r = Renewal {
            renewer: settings.renewer.as_ref(),
            name: &settings.name,
            timeout: settings.renew_timeout,
            failures: 0,
            next: None,
            awaiting: false,
            installing: None,
        };
        r.schedule();
        r
    }

    /// Plan the next attempt from the certificate on disk.
    fn schedule(&mut self) {
        let Some(renewer) = self.renewer else {
            return;
        };
        match renewer.wait(std::time::SystemTime::now(), self.failures) {
            Ok(wait) => {
                // Far-future waits are capped so a sleeping laptop or a changed clock is noticed.
                let wait = wait.min(Duration::from_secs(6 * 3600));
                self.next = Some(Instant::now() + wait);
            }
            Err(e) => {
                warn!(error = %e, "cannot read the client certificate to plan its renewal");
                self.next = Some(Instant::now() + Duration::from_secs(3600));
            }
        }
    }

    /// The timer fired: either send a request, or the last one went unanswered.
    fn fire(&mut self, control: &mut VecDeque<WsMessage>, status: &watch::Sender<LinkStatus>) {
        let Some(renewer) = self.renewer else {
            self.next = None;
            return;
        };
        if self.awaiting {
            self.awaiting = false;
            self.failures = self.failures.saturating_add(1);
            let msg = format!(
                "no renew_response within {}",
                humantime::format_duration(self.timeout)
            );
            warn!(error = %msg, "certificate renewal: will try again");
            status.send_modify(|s| s.renew_error = Some(msg));
            self.schedule();
            return;
        }
        // Re-check against the file: a reload may have installed a fresh certificate meanwhile.
        match renewer.wait(std::time::SystemTime::now(), self.failures) {
            Ok(w) if !w.is_zero() && self.failures == 0 => {
                self.next = Some(Instant::now() + w.min(Duration::from_secs(6 * 3600)));
                return;
            }
            _ => {}
        }
        match renewer.csr_pem(self.name) {
            Ok(csr_pem) => {
                info!("client certificate due for renewal: sending renew_request");
                control.push_back(WsMessage::Text(
                    encode_text(&Message::RenewRequest(RenewRequest { csr_pem })).into(),
                ));
                self.awaiting = true;
                self.next = Some(Instant::now() + self.timeout);
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                warn!(error = %e, "certificate renewal: cannot make a CSR");
                status.send_modify(|s| s.renew_error = Some(e.to_string()));
                self.schedule();
            }
        }
    }

    /// A `renew_response` arrived: install it off the frame loop.
    fn answer(&mut self, resp: RenewResponse) {
        let Some(renewer) = self.renewer else {
            warn!("renew_response received but this agent does not renew; ignored");
            return;
        };
        if self.installing.is_some() {
            warn!("renew_response received while another is being installed; ignored");
            return;
        }
        self.awaiting = false;
        self.next = None;
        let renewer = renewer.clone();
        self.installing = Some(tokio::task::spawn_blocking(move || {
            renewer
                .install(&resp, std::time::SystemTime::now())
                .map_err(|e| e.to_string())
        }));
    }

    /// The install finished.
    fn installed(
        &mut self,
        result: Result<Result<crate::renew::Installed, String>, tokio::task::JoinError>,
        status: &watch::Sender<LinkStatus>,
    ) {
        self.installing = None;
        match result {
            Ok(Ok(done)) => {
                let until = humantime::format_rfc3339_seconds(done.validity.not_after);
                info!(valid_until = %until, ca_replaced = done.ca_replaced, "client certificate renewed; the next connection uses it");
                self.failures = 0;
                status.send_modify(|s| {
                    s.renewals += 1;
                    s.renew_error = None;
                });
            }
            Ok(Err(e)) => {
                self.failures = self.failures.saturating_add(1);
                warn!(error = %e, "certificate renewal: the answer was refused; keeping the current certificate");
                status.send_modify(|s| s.renew_error = Some(e));
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                error!(error = %e, "certificate renewal: install task failed");
                status.send_modify(|s| s.renew_error = Some(e.to_string()));
            }
        }
        self.schedule();
    }
}

async fn join_install(
    h: &mut Option<tokio::task::JoinHandle<Result<crate::renew::Installed, String>>>,
) -> Result<Result<crate::renew::Installed, String>, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The frame loop of one welcomed connection.
async fn session(
    ws: Ws,
    welcome: &Welcome,
    interval: Duration,
    tasks: &TaskManager,
    stop: &CancellationToken,
    settings: &LinkSettings,
    status: &watch::Sender<LinkStatus>,
) -> Result<SessionEnd, LinkError> {
    let close_timeout = settings.close_timeout;
    let mut renewal = Renewal::new(settings);
    tasks.on_connected(&welcome.resume);
    let (sink, mut stream) = ws.split();
    let (wtx, wrx) = mpsc::channel::<WsMessage>(WRITE_QUEUE);
    let mut writer_task = tokio::spawn(writer(sink, wrx));
    let mut live = Liveness::new(interval, Instant::now());
    let mut bad_frames = RateLimit::new(5, Duration::from_secs(60));
    let mut peer_errors = RateLimit::new(5, Duration::from_secs(60));
    // Link-level frames (heartbeats, errors about undecodable frames) go before task frames.
    let mut control: VecDeque<WsMessage> = VecDeque::new();

    let result = loop {
        let now = Instant::now();
        if live.is_dead(now) {
            break Err(LinkError::DeadPeer(
                interval * liveness::DEAD_AFTER_INTERVALS,
            ));
        }
        if live.heartbeat_due(now) {
            control.push_back(WsMessage::Text(
                encode_text(&Message::Heartbeat(Heartbeat { ts_ms: now_ms() })).into(),
            ));
            live.heartbeat_sent(now);
        }
        let want_send = !control.is_empty() || tasks.has_outgoing();
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(SessionEnd::Stopped),
            _ = tokio::time::sleep_until(live.next_wakeup()) => {}
            _ = sleep_until_opt(renewal.next) => renewal.fire(&mut control, status),
            r = join_install(&mut renewal.installing) => renewal.installed(r, status),
            frame = stream.next() => {
                live.received(Instant::now());
                match frame {
                    None => break Err(LinkError::Closed(String::new())),
                    Some(Err(e)) => break Err(LinkError::Io(e.to_string())),
                    Some(Ok(WsMessage::Close(f))) => break Err(LinkError::Closed(close_reason(f.as_ref()))),
                    Some(Ok(WsMessage::Text(t))) => match decode_text(t.as_str()) {
                        Ok(Message::RenewResponse(r)) => renewal.answer(r),
                        Ok(msg) => handle_control(msg, tasks, &mut control, &mut peer_errors),
                        Err(e) => refuse_frame(e, &mut control, &mut bad_frames),
                    },
                    Some(Ok(WsMessage::Binary(b))) => match decode_binary(&b) {
                        Ok(frame) => tasks.handle_binary(frame),
                        Err(e) => refuse_frame(e, &mut control, &mut bad_frames),
                    },
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                }
            }
            permit = wtx.reserve(), if want_send => {
                let Ok(permit) = permit else {
                    break Err(LinkError::Io("the connection writer stopped".into()));
                };
                if let Some(m) = control.pop_front().or_else(|| tasks.next_outgoing().map(to_ws)) {
                    permit.send(m);
                }
            }
            _ = tasks.outgoing_ready() => {}
            w = &mut writer_task => {
                let reason = match w {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => "writer ended".into(),
                    Err(e) => e.to_string(),
                };
                break Err(LinkError::Io(reason));
            }
        }
    };

    if let Ok(SessionEnd::Stopped) = result {
        // Clean close: our close frame, then wait (bounded) for the peer's.
        let _ = wtx
            .send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "agent shutting down".into(),
            })))
            .await;
        drop(wtx);
        let _ = tokio::time::timeout(close_timeout, async {
            let _ = (&mut writer_task).await;
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
        info!("closed the connection to the control plane");
    }
    writer_task.abort();
    result
}

/// A decoded control message from the control plane.
fn handle_control(
    msg: Message,
    tasks: &TaskManager,
    control: &mut VecDeque<WsMessage>,
    peer_errors: &mut RateLimit,
) {
    match msg {
        Message::Heartbeat(_) => {}
        Message::Assign(_) | Message::Ack(_) | Message::Cancel(_) | Message::StateResponse(_) => {
            tasks.handle_message(msg)
        }
        Message::Error(e) => {
            if let Some(suppressed) = peer_errors.allow(Instant::now()) {
                warn!(code = e.code.as_str(), message = %e.message, task_id = ?e.task_id, suppressed, "the control plane reported an error");
            }
        }
        other => control.push_back(error_message(
            ErrorCode::ProtocolViolation,
            format!(
                "the control plane must not send {:?} on an established connection",
                other.type_name()
            ),
            None,
        )),
    }
}

/// An undecodable frame: answered with `error`, logged (rate-limited), dropped.
fn refuse_frame(
    e: delegate_protocol::DecodeError,
    control: &mut VecDeque<WsMessage>,
    log_limit: &mut RateLimit,
) {
    if let Some(suppressed) = log_limit.allow(Instant::now()) {
        warn!(error = %e, suppressed, "undecodable frame from the control plane");
    }
    control.push_back(error_message(e.code(), e.to_string(), None));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoken_versions_are_read_from_the_documented_message() {
        let m = "no common protocol version: we speak [1], the peer speaks []";
        assert_eq!(parse_spoken_versions(m), Some(vec![1]));
        let m = "no common protocol version: we speak [1, 2, 3], the peer speaks [4]";
        assert_eq!(parse_spoken_versions(m), Some(vec![1, 2, 3]));
        assert_eq!(parse_spoken_versions("we speak []"), Some(vec![]));
        assert_eq!(parse_spoken_versions("something else"), None);
        assert_eq!(parse_spoken_versions("we speak [x]"), None);
        assert_eq!(parse_spoken_versions("we speak [1"), None);
    }
}
