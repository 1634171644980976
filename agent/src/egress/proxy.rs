//! The egress proxy: the only way out of a sandbox's internal network.
//!
//! One [`EgressProxy`] listens on one address (the task network's gateway IP) and serves any number
//! of registered tasks, each with its own credentials, policy and optional source network. For
//! every connection it reads one request head (bounded in size and time), authenticates it
//! (`Proxy-Authorization: Basic`, 407 otherwise), decides with [`super::matcher`], resolves names
//! itself through an injectable [`Resolver`] (only after the name passed the rules, so the proxy
//! never resolves names no rule allows), checks every resolved address and connects only to those
//! checked addresses — never a second lookup, so DNS rebinding cannot swap the address after the
//! check. For `CONNECT` to port 443 (more with [`ProxyConfig::sni_ports`]) it reads the client's
//! TLS ClientHello before connecting upstream and refuses a missing server name or one that
//! differs from the CONNECT host (an IP literal allowed by a network rule needs no server name: TLS
//! carries none for addresses). Then it
//! relays bytes both ways, counting them, until both sides close, the connection is idle for
//! `idle_timeout`, the task is unregistered or the proxy shuts down.
//!
//! Plain HTTP (`GET http://host/path`) relays exactly one request per connection: the head is
//! rewritten (origin-form target, checked `Host`, `Connection: close`), the `Content-Length` body
//! follows, nothing else the client sends reaches the upstream.
//!
//! Every request that gets an answer produces one [`EgressRecord`] on the caller's channel (for
//! an allowed tunnel, when it ends, with its byte counts). Denials answer with a short plain-text
//! reason. At most `max_connections` connections are served at once; more get a 503.
//!
//! This module never logs a password, never resolves a name before the rules allowed it, never
//! connects to an address it did not check, and never panics on what a client sends.

use super::matcher::{self, normalize_host, Decision, Denial, Host};
use super::request::{self, Credentials, Kind, RequestError, RequestHead, MAX_HEAD};
use super::rules::{Cidr, Policy};
use super::sni::{self, SniError, MAX_CLIENT_HELLO};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How the proxy is bounded.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where to listen: the task network's gateway IP and a port (0: any free port).
    pub listen: SocketAddr,
    /// Most connections (tunnels included) served at once; more are answered 503.
    pub max_connections: usize,
    /// Time allowed for a request head, and for the TLS ClientHello after a CONNECT.
    pub header_timeout: Duration,
    /// A tunnel with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed to connect upstream (per address tried).
    pub connect_timeout: Duration,
    /// Time allowed for a name lookup.
    pub resolve_timeout: Duration,
    /// CONNECT ports whose tunnels must start with a TLS ClientHello naming the CONNECT host.
    pub sni_ports: Vec<u16>,
    /// Networks refused unless an allow rule explicitly covers them: the Docker bridge subnets and
    /// the host's own addresses.
    pub protected: Vec<Cidr>,
}

impl ProxyConfig {
    /// Defaults: 256 connections, 10 s for a head, 5 min idle, 10 s to connect, 5 s to resolve,
    /// server names checked on port 443.
    pub fn new(listen: SocketAddr, protected: Vec<Cidr>) -> ProxyConfig {
        ProxyConfig {
            listen,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(5),
            sni_ports: vec![443],
            protected,
        }
    }
}

/// Why the proxy could not start or take a task.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// Retryable: the address may not exist yet (network still being created) or be in use.
    #[error("egress proxy cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// Not retryable: a programming error on the caller's side.
    #[error("task {0} is already registered with this egress proxy")]
    AlreadyRegistered(String),
}

/// One egress decision, for the audit trail and the task's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRecord {
    /// The task whose credentials were used; `None` when none were valid.
    pub task_id: Option<String>,
    /// `host:port` as the client asked (empty if the request could not be read that far).
    pub destination: String,
    /// The address connected to, or the address that was refused.
    pub resolved: Option<SocketAddr>,
    pub allowed: bool,
    /// The rule that allowed it (canonical text).
    pub rule: Option<String>,
    /// Why it was denied, or for an allowed connection why it ended abnormally (upstream
    /// unreachable, idle timeout, task unregistered, proxy shut down).
    pub reason: Option<String>,
    /// Bytes from the sandbox to the upstream.
    pub bytes_up: u64,
    /// Bytes from the upstream to the sandbox.
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// Resolves names for the proxy. The system resolver in production; tests map names to their own
/// addresses without touching `/etc/hosts`.
pub trait Resolver: Send + Sync + 'static {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The host's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// A fixed name → addresses table (tests, air-gapped pools with a static mirror map). Unknown
/// names fail to resolve.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    names: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    pub fn new() -> StaticResolver {
        StaticResolver::default()
    }

    /// Map a name (normalised like a request host) to addresses.
    pub fn insert(mut self, name: &str, addrs: &[IpAddr]) -> StaticResolver {
        let key = match normalize_host(name) {
            Ok(Host::Name(n)) => n,
            _ => name.to_ascii_lowercase(),
        };
        self.names.insert(key, addrs.to_vec());
        self
    }
}

impl Resolver for StaticResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let found = self.names.get(host).cloned();
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name not known"))
        })
    }
}

/// A task's proxy credentials. The password is a secret: it never shows in `Debug`, and it is in
/// the URL and environment values below, which must be treated as secrets too (redacted from logs).
#[derive(Clone, PartialEq, Eq)]
pub struct TaskCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for TaskCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl TaskCredentials {
    /// `http://user:password@addr` for a proxy listening on `proxy`.
    pub fn proxy_url(&self, proxy: SocketAddr) -> String {
        format!("http://{}:{}@{}", self.user, self.password, proxy)
    }

    /// The environment a sandbox needs: `HTTPS_PROXY`, `HTTP_PROXY` (and their lower-case forms,
    /// which curl and others read) pointing at the proxy, and `NO_PROXY`/`no_proxy` listing what the
    /// sandbox reaches directly (the agent's state backend on the gateway IP).
    pub fn sandbox_env(&self, proxy: SocketAddr, no_proxy: &[String]) -> Vec<(String, String)> {
        let url = self.proxy_url(proxy);
        let no = no_proxy.join(",");
        vec![
            ("HTTPS_PROXY".into(), url.clone()),
            ("https_proxy".into(), url.clone()),
            ("HTTP_PROXY".into(), url.clone()),
            ("http_proxy".into(), url),
            ("NO_PROXY".into(), no.clone()),
            ("no_proxy".into(), no),
        ]
    }
}

/// What one credential grants.
struct Grant {
    task_id: String,
    password_digest: [u8; 32],
    policy: Arc<Policy>,
    source: Option<Cidr>,
    /// Cancelled when the task is unregistered: its open tunnels close.
    cancel: CancellationToken,
}

/// State shared by the accept loop and every connection.
struct Shared {
    config: ProxyConfig,
    resolver: Arc<dyn Resolver>,
    records: mpsc::Sender<EgressRecord>,
    /// user name → grant.
    grants: RwLock<HashMap<String, Arc<Grant>>>,
    shutdown: CancellationToken,
}

/// A running egress proxy. Dropping it without [`EgressProxy::shutdown`] stops accepting and
/// closes every connection too, without waiting for their records.
pub struct EgressProxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl EgressProxy {
    /// Bind `config.listen` and serve until [`EgressProxy::shutdown`]. Records go to `records`.
    pub async fn start(
        config: ProxyConfig,
        resolver: Arc<dyn Resolver>,
        records: mpsc::Sender<EgressRecord>,
    ) -> Result<EgressProxy, ProxyError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            config,
            resolver,
            records,
            grants: RwLock::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(EgressProxy {
            shared,
            local_addr,
            accept: Some(accept),
        })
    }

    /// The address the proxy listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Let `task_id` use the proxy under `policy` (the already narrowed task policy), optionally only
    /// from addresses in `source` (the task network's subnet). Returns fresh random credentials.
    pub fn register(
        &self,
        task_id: &str,
        policy: Policy,
        source: Option<Cidr>,
    ) -> Result<TaskCredentials, ProxyError> {
        let mut grants = self
            .shared
            .grants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if grants.values().any(|g| g.task_id == task_id) {
            return Err(ProxyError::AlreadyRegistered(task_id.to_string()));
        }
        let creds = TaskCredentials {
            user: format!("task-{}", random_hex(8)),
            password: random_hex(32),
        };
        grants.insert(
            creds.user.clone(),
            Arc::new(Grant {
                task_id: task_id.to_string(),
                password_digest: digest(&creds.password),
                policy: Arc::new(policy),
                source,
                cancel: self.shared.shutdown.child_token(),
            }),
        );
        Ok(creds)
    }

    /// Revoke a task's credentials and close its open tunnels. Returns whether it was registered.
    pub fn unregister(&self, task_id: &str) -> bool {
        let mut grants = self
            .shared
            .grants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let users: Vec<String> = grants
            .iter()
            .filter(|(_, g)| g.task_id == task_id)
            .map(|(u, _)| u.clone())
            .collect();
        for u in &users {
            if let Some(g) = grants.remove(u) {
                g.cancel.cancel();
            }
        }
        !users.is_empty()
    }

    /// Stop accepting, close every connection and wait until each has sent its record.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "egress proxy accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                conns.spawn(async move {
                    let _permit = permit;
                    serve(stream, peer, &shared).await;
                });
            }
            Err(_) => {
                conns.spawn(async move {
                    let started = Instant::now();
                    let mut stream = stream;
                    let reason = "the egress proxy is at its connection limit";
                    let _ = timeout(
                        Duration::from_secs(2),
                        reply_error(&mut stream, 503, reason),
                    )
                    .await;
                    let rec = record(None, String::new(), started).denied(None, reason.to_string());
                    let _ = shared.records.send(rec).await;
                });
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// A record under construction.
struct Rec {
    task_id: Option<String>,
    destination: String,
    started: Instant,
}

fn record(task_id: Option<String>, destination: String, started: Instant) -> Rec {
    Rec {
        task_id,
        destination,
        started,
    }
}

impl Rec {
    fn denied(self, resolved: Option<SocketAddr>, reason: String) -> EgressRecord {
        EgressRecord {
            task_id: self.task_id,
            destination: self.destination,
            resolved,
            allowed: false,
            rule: None,
            reason: Some(reason),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: elapsed_ms(self.started),
        }
    }

    fn allowed(self, resolved: Option<SocketAddr>, rule: String, end: Relayed) -> EgressRecord {
        EgressRecord {
            task_id: self.task_id,
            destination: self.destination,
            resolved,
            allowed: true,
            rule: Some(rule),
            reason: end.reason,
            bytes_up: end.up,
            bytes_down: end.down,
            duration_ms: elapsed_ms(self.started),
        }
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Serve one connection and send its record (if it asked anything).
async fn serve<S>(client: S, peer: SocketAddr, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Some(rec) = handle(client, peer, shared).await {
        if shared.records.send(rec).await.is_err() {
            tracing::debug!("egress record receiver is gone");
        }
    }
}

/// The whole life of one client connection. Returns its record, or `None` when the client closed
/// without asking anything.
async fn handle<S>(mut client: S, peer: SocketAddr, shared: &Shared) -> Option<EgressRecord>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let cfg = &shared.config;

    // 1. The request head, bounded in bytes and time.
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::select! {
        r = timeout(cfg.header_timeout, read_head(&mut client, &mut buf)) => r,
        // Shutting down: nothing was decided yet, so there is nothing to record.
        _ = shared.shutdown.cancelled() => return None,
    };
    let head = match read {
        Err(_) => {
            let reason = "no complete request head in time".to_string();
            reply_error(&mut client, 408, &reason).await;
            return Some(record(None, String::new(), started).denied(None, reason));
        }
        Ok(Err(HeadError::Closed)) if buf.is_empty() => return None,
        Ok(Err(HeadError::Closed)) => {
            return Some(record(None, String::new(), started).denied(
                None,
                "the client closed before a complete request head".into(),
            ))
        }
        Ok(Err(HeadError::Io(e))) => {
            return Some(
                record(None, String::new(), started)
                    .denied(None, format!("reading the request failed: {e}")),
            )
        }
        Ok(Err(HeadError::Bad(e))) => {
            let reason = e.to_string();
            reply_error(&mut client, e.status(), &reason).await;
            return Some(record(None, String::new(), started).denied(None, reason));
        }
        Ok(Ok(h)) => h,
    };
    let destination = head.destination();

    // 2. Credentials: which task, and its grant.
    let grant = match authenticate(shared, head.credentials.as_ref(), peer.ip()) {
        Ok(g) => g,
        Err(reason) => {
            reply_auth_required(&mut client, reason).await;
            return Some(record(None, destination, started).denied(None, reason.to_string()));
        }
    };
    let rec = record(Some(grant.task_id.clone()), destination, started);

    // 3. The decision: rules on the name first, then resolution, then every address.
    let host = match normalize_host(&head.host) {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("bad host: {e}");
            reply_error(&mut client, 400, &reason).await;
            return Some(rec.denied(None, reason));
        }
    };
    let resolved = match &host {
        Host::Ip(_) => Vec::new(),
        Host::Name(name) => {
            if let Err(d) = matcher::check_name(&grant.policy, name, head.port) {
                return Some(deny(&mut client, rec, head.port, d).await);
            }
            match timeout(cfg.resolve_timeout, shared.resolver.lookup(name, head.port)).await {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => {
                    let reason = format!("cannot resolve {name}: {e}");
                    reply_error(&mut client, 502, &reason).await;
                    return Some(rec.denied(None, reason));
                }
                Err(_) => {
                    let reason = format!("cannot resolve {name}: timed out");
                    reply_error(&mut client, 504, &reason).await;
                    return Some(rec.denied(None, reason));
                }
            }
        }
    };
    let (rule, addrs) =
        match matcher::decide(&grant.policy, &host, head.port, &resolved, &cfg.protected) {
            Decision::Allowed { rule, addrs } => (rule, addrs),
            Decision::Denied(d) => return Some(deny(&mut client, rec, head.port, d).await),
        };

    // 4. Connect and relay.
    let leftover = buf.split_off(head.head_len.min(buf.len()));
    match head.kind {
        Kind::Connect => {
            connect_tunnel(
                client, shared, &grant, rec, &host, head.port, rule, addrs, leftover,
            )
            .await
        }
        Kind::Forward(fwd) => {
            let upstream = match connect_any(&addrs, head.port, cfg.connect_timeout).await {
                Ok(u) => u,
                Err(e) => {
                    let reason = format!("cannot connect upstream: {e}");
                    reply_error(&mut client, 502, &reason).await;
                    return Some(rec.allowed(
                        None,
                        rule,
                        Relayed {
                            up: 0,
                            down: 0,
                            reason: Some(reason),
                        },
                    ));
                }
            };
            let connected = upstream.peer_addr().ok();
            let host_header = match head.port {
                80 => host.to_string(),
                p => format!("{host}:{p}"),
            };
            let mut first = fwd.upstream_head(&host_header);
            let body_here = usize::try_from(fwd.content_length)
                .unwrap_or(usize::MAX)
                .min(leftover.len());
            first.extend_from_slice(&leftover[..body_here]);
            let rest = fwd.content_length - body_here as u64;
            let end = relay(
                client,
                upstream,
                first,
                Some(rest),
                cfg.idle_timeout,
                &grant.cancel,
            )
            .await;
            Some(rec.allowed(connected, rule, end))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connect_tunnel<S>(
    mut client: S,
    shared: &Shared,
    grant: &Grant,
    rec: Rec,
    host: &Host,
    port: u16,
    rule: String,
    addrs: Vec<IpAddr>,
    mut initial: Vec<u8>,
) -> Option<EgressRecord>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &shared.config;
    const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let upstream = match host {
        Host::Name(name) if cfg.sni_ports.contains(&port) => {
            // The ClientHello comes only after the 200; read it before any upstream connection.
            if client.write_all(ESTABLISHED).await.is_err() {
                return Some(rec.allowed(None, rule, gone()));
            }
            let checked = tokio::select! {
                r = timeout(cfg.header_timeout, read_client_hello(&mut client, &mut initial)) => Some(r),
                _ = grant.cancel.cancelled() => None,
            };
            let refusal = match checked {
                None => Some(cancel_reason()),
                Some(Err(_)) => Some("no TLS ClientHello in time".to_string()),
                Some(Ok(Err(HelloError::Closed))) => {
                    Some("the client closed before a TLS ClientHello".into())
                }
                Some(Ok(Err(HelloError::Io(e)))) => {
                    Some(format!("reading the TLS ClientHello failed: {e}"))
                }
                Some(Ok(Err(HelloError::Bad(e)))) => Some(e.to_string()),
                Some(Ok(Ok(None))) => {
                    Some("the TLS ClientHello names no server (SNI missing)".into())
                }
                Some(Ok(Ok(Some(sni)))) => match normalize_host(&sni) {
                    Ok(Host::Name(n)) if &n == name => None,
                    _ => Some(format!(
                        "the TLS server name {:?} differs from the CONNECT host {name}",
                        sni
                    )),
                },
            };
            if let Some(reason) = refusal {
                if initial.first() == Some(&22) {
                    // A fatal access_denied alert, so TLS clients report a refusal, not a reset.
                    let _ = client.write_all(&[21, 3, 3, 0, 2, 2, 49]).await;
                }
                let _ = client.shutdown().await;
                return Some(rec.denied(None, reason));
            }
            match connect_any(&addrs, port, cfg.connect_timeout).await {
                Ok(u) => u,
                Err(e) => {
                    let _ = client.shutdown().await;
                    let end = Relayed {
                        up: 0,
                        down: 0,
                        reason: Some(format!("cannot connect upstream: {e}")),
                    };
                    return Some(rec.allowed(None, rule, end));
                }
            }
        }
        _ => {
            let upstream = match connect_any(&addrs, port, cfg.connect_timeout).await {
                Ok(u) => u,
                Err(e) => {
                    let reason = format!("cannot connect upstream: {e}");
                    reply_error(&mut client, 502, &reason).await;
                    return Some(rec.allowed(
                        None,
                        rule,
                        Relayed {
                            up: 0,
                            down: 0,
                            reason: Some(reason),
                        },
                    ));
                }
            };
            if client.write_all(ESTABLISHED).await.is_err() {
                return Some(rec.allowed(upstream.peer_addr().ok(), rule, gone()));
            }
            upstream
        }
    };
    let connected = upstream.peer_addr().ok();
    let end = relay(
        client,
        upstream,
        initial,
        None,
        cfg.idle_timeout,
        &grant.cancel,
    )
    .await;
    Some(rec.allowed(connected, rule, end))
}

async fn deny<S>(client: &mut S, rec: Rec, port: u16, d: Denial) -> EgressRecord
where
    S: AsyncWrite + AsyncRead + Unpin,
{
    let addr = match &d {
        Denial::Refused { addr, .. }
        | Denial::AddressDenied { addr, .. }
        | Denial::NoNetworkRule { addr, .. } => Some(SocketAddr::new(*addr, port)),
        _ => None,
    };
    let reason = d.to_string();
    reply_error(client, 403, &format!("egress denied: {reason}")).await;
    rec.denied(addr, reason)
}

/// Find the grant for these credentials, from this peer.
fn authenticate(
    shared: &Shared,
    creds: Option<&Credentials>,
    peer: IpAddr,
) -> Result<Arc<Grant>, &'static str> {
    let creds = creds.ok_or("missing proxy credentials")?;
    let grants = shared.grants.read().unwrap_or_else(|p| p.into_inner());
    let grant = grants.get(&creds.user).cloned();
    drop(grants);
    // Compare a digest even for an unknown user, so timing does not tell users apart.
    let given = digest(&creds.password);
    let ok = match &grant {
        Some(g) => ct_eq(&g.password_digest, &given),
        None => {
            let _ = ct_eq(&[0; 32], &given);
            false
        }
    };
    let grant = match grant {
        Some(g) if ok && !g.cancel.is_cancelled() => g,
        _ => return Err("invalid proxy credentials"),
    };
    match grant.source {
        Some(net) if !net.contains(&matcher::canonical_ip(peer)) => {
            Err("these proxy credentials are not valid from this address")
        }
        _ => Ok(grant),
    }
}

enum HeadError {
    Closed,
    Io(io::Error),
    Bad(RequestError),
}

async fn read_head<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
) -> Result<RequestHead, HeadError> {
    let mut chunk = [0u8; 4096];
    loop {
        match request::parse_head(buf) {
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Bad(e)),
        }
        let room = MAX_HEAD - buf.len();
        let n = client
            .read(&mut chunk[..room.min(4096)])
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum HelloError {
    Closed,
    Io(io::Error),
    Bad(SniError),
}

/// Read until `buf` holds a complete ClientHello; its server name.
async fn read_client_hello<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<String>, HelloError> {
    let mut chunk = [0u8; 4096];
    loop {
        match sni::parse_client_hello(buf) {
            Ok(Some(hello)) => return Ok(hello.server_name),
            Ok(None) => {}
            Err(e) => return Err(HelloError::Bad(e)),
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Err(HelloError::Bad(SniError::TooLarge));
        }
        let room = MAX_CLIENT_HELLO - buf.len();
        let n = client
            .read(&mut chunk[..room.min(4096)])
            .await
            .map_err(HelloError::Io)?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connect to the first checked address that answers.
async fn connect_any(addrs: &[IpAddr], port: u16, limit: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for ip in addrs {
        match timeout(limit, TcpStream::connect(SocketAddr::new(*ip, port))).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Relayed {
    up: u64,
    down: u64,
    /// Why it ended abnormally; `None` when both sides closed.
    reason: Option<String>,
}

/// Last time a byte moved, shared by both directions.
struct Activity(Mutex<Instant>);

impl Activity {
    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let deadline = activity.last() + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Copy `r` to `w` (at most `limit` bytes), counting into `count`. Half-closes `w` at EOF when
/// `propagate_eof`.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    limit: Option<u64>,
    count: &AtomicU64,
    activity: &Activity,
    propagate_eof: bool,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut remaining = limit;
    loop {
        let want = match remaining {
            Some(0) => return Ok(()),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(buf.len()),
            None => buf.len(),
        };
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            if propagate_eof {
                w.shutdown().await?;
            }
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if let Some(r) = remaining.as_mut() {
            *r -= n as u64;
        }
    }
}

/// Relay between the client and the upstream. `first` goes upstream before anything else. With
/// `up_limit` (plain HTTP) at most that many more client bytes go upstream and the relay ends when
/// the upstream closes; without it (a tunnel) it ends when both directions have closed.
async fn relay<C, U>(
    client: C,
    mut upstream: U,
    first: Vec<u8>,
    up_limit: Option<u64>,
    idle_timeout: Duration,
    cancel: &CancellationToken,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let activity = Activity(Mutex::new(Instant::now()));
    let result: Result<(), String> = async {
        if !first.is_empty() {
            tokio::select! {
                r = upstream.write_all(&first) => r.map_err(|e| format!("upstream write failed: {e}"))?,
                _ = cancel.cancelled() => return Err(cancel_reason()),
            }
            up.fetch_add(first.len() as u64, Ordering::Relaxed);
        }
        let (cr, cw) = tokio::io::split(client);
        let (ur, uw) = tokio::io::split(upstream);
        let to_up = pump(cr, uw, up_limit, &up, &activity, up_limit.is_none());
        let to_down = pump(ur, cw, None, &down, &activity, true);
        tokio::pin!(to_up);
        tokio::pin!(to_down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut to_up, if !up_done => {
                    up_done = true;
                    r.map_err(|e| format!("relay ended: {e}"))?;
                }
                r = &mut to_down, if !down_done => {
                    down_done = true;
                    r.map_err(|e| format!("relay ended: {e}"))?;
                    if up_limit.is_some() {
                        return Ok(());
                    }
                }
                _ = idle(&activity, idle_timeout) => return Err("closed after the idle timeout".to_string()),
                _ = cancel.cancelled() => return Err(cancel_reason()),
            }
            if up_done && down_done {
                return Ok(());
            }
        }
    }
    .await;
    Relayed {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        reason: result.err(),
    }
}

fn gone() -> Relayed {
    Relayed {
        up: 0,
        down: 0,
        reason: Some("the client went away".into()),
    }
}

fn cancel_reason() -> String {
    "closed: the task's egress was revoked or the proxy stopped".to_string()
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

async fn write_error<S: AsyncWrite + Unpin>(
    client: &mut S,
    status: u16,
    reason: &str,
) -> io::Result<()> {
    write_response(client, status, "", reason).await
}

async fn write_response<S: AsyncWrite + Unpin>(
    client: &mut S,
    status: u16,
    extra: &str,
    reason: &str,
) -> io::Result<()> {
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        status_text(status),
        body.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(body.as_bytes()).await?;
    client.flush().await
}

/// Answer an error and close without resetting what the client may still be sending (a reset
/// could destroy the answer before the client reads it).
async fn reply_error<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, status: u16, reason: &str) {
    if write_error(client, status, reason).await.is_ok() {
        linger(client).await;
    }
}

async fn reply_auth_required<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, reason: &str) {
    let extra = "Proxy-Authenticate: Basic realm=\"delegate-egress\"\r\n";
    if write_response(client, 407, extra, reason).await.is_ok() {
        linger(client).await;
    }
}

async fn linger<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut budget = 64 * 1024usize;
    let _ = timeout(Duration::from_secs(1), async {
        while budget > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

fn digest(password: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, password.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use tokio::io::duplex;

    fn shared(
        policy_allow: &[&str],
    ) -> (Arc<Shared>, mpsc::Receiver<EgressRecord>, TaskCredentials) {
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            config: ProxyConfig::new("127.0.0.1:0".parse().unwrap(), vec![]),
            resolver: Arc::new(
                StaticResolver::new().insert("a.example", &["10.9.9.9".parse().unwrap()]),
            ),
            records: tx,
            grants: RwLock::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        });
        let allow: Vec<String> = policy_allow.iter().map(|s| s.to_string()).collect();
        let policy = Policy::parse(&allow, &[]).unwrap();
        let creds = TaskCredentials {
            user: "task-x".into(),
            password: "pw".into(),
        };
        shared.grants.write().unwrap().insert(
            creds.user.clone(),
            Arc::new(Grant {
                task_id: "t1".into(),
                password_digest: digest(&creds.password),
                policy: Arc::new(policy),
                source: None,
                cancel: shared.shutdown.child_token(),
            }),
        );
        (shared, rx, creds)
    }

    fn auth(c: &TaskCredentials) -> String {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
        format!("Proxy-Authorization: Basic {token}\r\n")
    }

    /// Run one connection over an in-memory pipe; returns what the client read and the record.
    async fn exchange(shared: &Shared, input: Vec<u8>) -> (String, Option<EgressRecord>) {
        let (mut near, far) = duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let client = async move {
            near.write_all(&input).await.unwrap();
            near.shutdown().await.unwrap();
            let mut out = Vec::new();
            near.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };
        let (out, rec) = tokio::join!(client, handle(far, peer, shared));
        (out, rec)
    }

    #[tokio::test]
    async fn garbage_gets_400_and_a_record() {
        let (shared, _rx, _) = shared(&[]);
        let (out, rec) = exchange(&shared, b"\x16\x03\x01garbage\r\n\r\n".to_vec()).await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        let rec = rec.unwrap();
        assert!(!rec.allowed && rec.task_id.is_none());
    }

    #[tokio::test]
    async fn missing_or_wrong_credentials_get_407() {
        let (shared, _rx, creds) = shared(&["a.example"]);
        let (out, rec) =
            exchange(&shared, b"CONNECT a.example:443 HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(
            out.starts_with("HTTP/1.1 407 ") && out.contains("Proxy-Authenticate: Basic"),
            "{out}"
        );
        assert_eq!(
            rec.unwrap().reason.as_deref(),
            Some("missing proxy credentials")
        );
        let wrong = TaskCredentials {
            user: creds.user.clone(),
            password: "nope".into(),
        };
        let req = format!("CONNECT a.example:443 HTTP/1.1\r\n{}\r\n", auth(&wrong));
        let (out, rec) = exchange(&shared, req.into_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 407 "), "{out}");
        let rec = rec.unwrap();
        assert_eq!(rec.reason.as_deref(), Some("invalid proxy credentials"));
        assert_eq!(rec.destination, "a.example:443");
    }

    #[tokio::test]
    async fn denial_names_the_task_and_the_reason() {
        let (shared, _rx, creds) = shared(&["a.example"]);
        let req = format!("CONNECT b.example:443 HTTP/1.1\r\n{}\r\n", auth(&creds));
        let (out, rec) = exchange(&shared, req.into_bytes()).await;
        assert!(
            out.starts_with("HTTP/1.1 403 ")
                && out.contains("b.example:443 is not in the egress allowlist"),
            "{out}"
        );
        let rec = rec.unwrap();
        assert_eq!(rec.task_id.as_deref(), Some("t1"));
        assert!(!rec.allowed);
    }

    #[tokio::test]
    async fn a_closed_connection_without_a_request_is_not_recorded() {
        let (shared, _rx, _) = shared(&[]);
        let (out, rec) = exchange(&shared, Vec::new()).await;
        assert_eq!((out.as_str(), rec), ("", None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_times_out() {
        let (shared, _rx, _) = shared(&[]);
        let (mut near, far) = duplex(1024);
        let peer: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let client = async move {
            near.write_all(b"CONNECT a.exa").await.unwrap();
            let mut out = Vec::new();
            near.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };
        let (out, rec) = tokio::join!(client, handle(far, peer, &shared));
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        assert_eq!(
            rec.unwrap().reason.as_deref(),
            Some("no complete request head in time")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_relay_is_closed_with_its_counts() {
        let (mut client, proxy_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let cancel = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                proxy_side,
                upstream_side,
                b"hi".to_vec(),
                None,
                Duration::from_secs(300),
                &cancel,
            )
            .await
        });
        client.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 5];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hiabc");
        upstream.write_all(b"xy").await.unwrap();
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.unwrap();
        // Nothing more moves: the paused clock runs to the idle deadline.
        let end = relay.await.unwrap();
        assert_eq!(
            end,
            Relayed {
                up: 5,
                down: 2,
                reason: Some("closed after the idle timeout".into())
            }
        );
    }

    #[tokio::test]
    async fn a_relay_ends_when_both_sides_close_and_on_cancel() {
        let (mut client, proxy_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let relay_task = tokio::spawn(async move {
            relay(
                proxy_side,
                upstream_side,
                Vec::new(),
                None,
                Duration::from_secs(300),
                &c2,
            )
            .await
        });
        client.write_all(b"up").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"up", "the client's EOF reaches the upstream");
        upstream.write_all(b"down").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"down");
        let end = relay_task.await.unwrap();
        assert_eq!(
            end,
            Relayed {
                up: 2,
                down: 4,
                reason: None
            }
        );

        let (_client, proxy_side) = duplex(1024);
        let (upstream_side, _upstream) = duplex(1024);
        let c3 = cancel.clone();
        cancel.cancel();
        let end = relay(
            proxy_side,
            upstream_side,
            Vec::new(),
            None,
            Duration::from_secs(300),
            &c3,
        )
        .await;
        assert_eq!(end.reason, Some(cancel_reason()));
    }

    #[tokio::test]
    async fn a_plain_http_relay_sends_only_the_declared_body() {
        let (mut client, proxy_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let cancel = CancellationToken::new();
        let relay_task = tokio::spawn(async move {
            relay(
                proxy_side,
                upstream_side,
                b"HEAD\r\n\r\n".to_vec(),
                Some(3),
                Duration::from_secs(300),
                &cancel,
            )
            .await
        });
        client
            .write_all(b"bodyGET http://evil.example/ HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = [0u8; 11];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HEAD\r\n\r\nbod");
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        upstream.shutdown().await.unwrap();
        let end = relay_task.await.unwrap();
        assert_eq!((end.up, end.down, end.reason), (11, 19, None));
        let mut more = Vec::new();
        upstream.read_to_end(&mut more).await.unwrap();
        assert!(
            more.is_empty(),
            "nothing after the body reached the upstream: {more:?}"
        );
    }

    #[test]
    fn credentials_never_show_their_password() {
        let c = TaskCredentials {
            user: "task-1".into(),
            password: "topsecret".into(),
        };
        assert!(!format!("{c:?}").contains("topsecret"));
        let env = c.sandbox_env("172.30.0.1:3128".parse().unwrap(), &["172.30.0.1".into()]);
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(
            get("HTTPS_PROXY"),
            "http://task-1:topsecret@172.30.0.1:3128"
        );
        assert_eq!(get("http_proxy"), get("HTTP_PROXY"));
        assert_eq!(get("NO_PROXY"), "172.30.0.1");
    }

    #[test]
    fn digests_compare_in_constant_time_shape() {
        assert!(ct_eq(&digest("a"), &digest("a")));
        assert!(!ct_eq(&digest("a"), &digest("b")));
        assert_eq!(random_hex(32).len(), 64);
        assert_ne!(random_hex(8), random_hex(8));
    }
}
