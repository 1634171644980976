//! The default state backend of a task: an HTTP endpoint speaking OpenTofu's `http` backend
//! protocol, served on the task's internal network only, relaying every request to the link side
//! as [`TaskOutput::State`] and answering tofu with the control plane's reply.
//!
//! Owns: the listener (bound to the task network's gateway address, never to a wildcard or
//! loopback address), basic-auth checking with per-task credentials, the mapping from HTTP methods
//! to [`StateMethod`], and the size limit of state bodies. Must never: serve another task's
//! requests, log or echo the credentials or state bodies, or keep running after the task ends
//! (dropping the [`StateServer`] stops it and every open connection).

use crate::task_io::{StateReply, TaskOutput, TaskOutputTx};
use bytes::Bytes;
use delegate_protocol::{limits, StateMethod};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The one path the backend serves.
pub const STATE_PATH: &str = "/state";
pub const USERNAME: &str = "delegate";

/// Why the backend could not start. Retryable only in the sense that a new task gets a new port.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot listen for the state backend on {addr}: {source}")]
    Bind {
        addr: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Per-task credentials tofu presents (as `TF_HTTP_USERNAME` / `TF_HTTP_PASSWORD`).
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// A fresh random password (256 bits) for one task.
    pub fn generate() -> Credentials {
        let bytes: [u8; 32] = rand::random();
        Credentials {
            username: USERNAME.into(),
            password: hex::encode(bytes),
        }
    }

    fn header_value(&self) -> String {
        use base64::Engine;
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Constant-time check of an `Authorization` header: both sides are MACed with a key drawn per
/// server and the tags compared by ring, so timing says nothing about the password.
struct AuthCheck {
    key: ring::hmac::Key,
    expected_tag: ring::hmac::Tag,
}

impl AuthCheck {
    fn new(creds: &Credentials) -> AuthCheck {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>())
        });
        let expected_tag = ring::hmac::sign(&key, creds.header_value().as_bytes());
        AuthCheck { key, expected_tag }
    }

    fn allows(&self, presented: Option<&[u8]>) -> bool {
        presented
            .is_some_and(|p| ring::hmac::verify(&self.key, p, self.expected_tag.as_ref()).is_ok())
    }
}

/// How a request maps to the relay, or the HTTP status that refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub method: StateMethod,
    pub lock_id: Option<String>,
}

/// Map an http-backend request: GET/POST/LOCK/UNLOCK/DELETE on [`STATE_PATH`]. The lock id comes
/// from `?ID=` (tofu adds it to POST while it holds the lock) or, for LOCK/UNLOCK, from the
/// lock-info JSON body.
pub fn map_request(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Mapped, StatusCode> {
    if path != STATE_PATH {
        return Err(StatusCode::NOT_FOUND);
    }
    let method = match method.as_str() {
        "GET" => StateMethod::Get,
        "POST" => StateMethod::Post,
        "LOCK" => StateMethod::Lock,
        "UNLOCK" => StateMethod::Unlock,
        "DELETE" => StateMethod::Delete,
        _ => return Err(StatusCode::METHOD_NOT_ALLOWED),
    };
    let from_query = query.and_then(|q| {
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "ID").then(|| percent_decode(v))
        })
    });
    let from_body = || {
        matches!(method, StateMethod::Lock | StateMethod::Unlock)
            .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
            .flatten()
            .and_then(|v| v.get("ID").and_then(|id| id.as_str()).map(str::to_string))
    };
    let lock_id = from_query
        .filter(|id| !id.is_empty())
        .or_else(from_body)
        .filter(|id| id.len() <= limits::MAX_NAME);
    Ok(Mapped { method, lock_id })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body held in memory.
pub struct Full(Option<Bytes>);

impl Body for Full {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full> {
    let mut r = Response::new(Full(Some(body.into())));
    *r.status_mut() = status;
    r
}

/// Read a request body, refusing more than `max` bytes.
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, StatusCode> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

struct Shared {
    auth: AuthCheck,
    out: TaskOutputTx,
    /// The last lock holder named in the task log, so a tofu retrying with `-lock-timeout` does
    /// not repeat the same line on every attempt.
    last_holder: std::sync::Mutex<Option<String>>,
}

/// A line for the task log naming who holds the workspace lock, from the lock JSON the control
/// plane answers a refused LOCK with. tofu itself prints only the holder's ID.
pub(crate) fn lock_holder_line(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            })
    };
    let id = field("ID")?;
    let mut line = format!("delegate: the workspace state is locked by ID={id}");
    for (label, key) in [
        ("who", "Who"),
        ("operation", "Operation"),
        ("since", "Created"),
    ] {
        if let Some(val) = field(key) {
            line.push_str(&format!(" {label}={val}"));
        }
    }
    line.push('\n');
    Some((id, line))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full>, Infallible> {
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !shared.auth.allows(presented) {
        let mut r = respond(StatusCode::UNAUTHORIZED, "unauthorized\n");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"delegate\""),
        );
        return Ok(r);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let body = match read_body(req.into_body(), limits::MAX_STATE_BYTES).await {
        Ok(b) => b,
        Err(status) => return Ok(respond(status, "request refused\n")),
    };
    let mapped = match map_request(&method, &path, query.as_deref(), &body) {
        Ok(m) => m,
        Err(status) => return Ok(respond(status, "not a state request\n")),
    };
    let body = matches!(
        mapped.method,
        StateMethod::Post | StateMethod::Lock | StateMethod::Unlock
    )
    .then_some(body);
    let (tx, rx) = oneshot::channel::<StateReply>();
    let msg = TaskOutput::State {
        method: mapped.method,
        lock_id: mapped.lock_id,
        body,
        reply: tx,
    };
    if shared.out.send(msg).await.is_err() {
        return Ok(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "state relay closed\n",
        ));
    }
    match rx.await {
        Ok(reply) => {
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            if matches!(reply.status, 409 | 423) {
                if let Some((id, line)) = lock_holder_line(&reply.body) {
                    let fresh = {
                        let mut last = shared.last_holder.lock().unwrap_or_else(|p| p.into_inner());
                        let fresh = last.as_deref() != Some(id.as_str());
                        *last = Some(id);
                        fresh
                    };
                    if fresh {
                        let _ = shared
                            .out
                            .send(TaskOutput::Log {
                                stream: delegate_protocol::LogStream::System,
                                data: Bytes::from(line),
                            })
                            .await;
                    }
                }
            }
            Ok(respond(status, reply.body))
        }
        Err(_) => Ok(respond(
            StatusCode::BAD_GATEWAY,
            "state relay gave no answer\n",
        )),
    }
}

/// A running backend. Dropping it stops the listener and every connection.
#[derive(Debug)]
pub struct StateServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StateServer {
    /// Listen on `ip` (the task network's gateway) on an ephemeral port.
    pub async fn start(
        ip: IpAddr,
        creds: &Credentials,
        out: TaskOutputTx,
    ) -> Result<StateServer, BackendError> {
        Self::start_on(ip, 0, creds, out).await
    }

    /// Listen on `ip:port` (after an agent restart: where a step that outlived the agent still
    /// sends its state requests).
    pub async fn start_on(
        ip: IpAddr,
        port: u16,
        creds: &Credentials,
        out: TaskOutputTx,
    ) -> Result<StateServer, BackendError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .map_err(|source| BackendError::Bind { addr: ip, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| BackendError::Bind { addr: ip, source })?;
        let shared = Arc::new(Shared {
            last_holder: std::sync::Mutex::new(None),
            auth: AuthCheck::new(creds),
            out,
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(StateServer { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL tofu uses as address, lock and unlock address.
    pub fn url(&self) -> String {
        format!("http://{}{STATE_PATH}", self.addr)
    }
}

impl Drop for StateServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in the set: aborting this task drops it, which aborts them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(30))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn lock_holder_line_names_the_holder_without_control_characters() {
        let body = br#"{"ID":"abc-1","Who":"alice@ci\u001b[2J","Operation":"OperationTypeApply","Created":"2026-11-25T00:00:00Z"}"#;
        let (id, line) = super::lock_holder_line(body).unwrap();
        assert_eq!(id, "abc-1");
        assert!(line.contains("ID=abc-1"));
        assert!(line.contains("who=alice@ci[2J"), "{line}");
        assert!(line.contains("operation=OperationTypeApply"));
        assert!(!line.contains('\u{1b}'));
        assert!(super::lock_holder_line(b"not json").is_none());
        assert!(super::lock_holder_line(br#"{"Who":"no id"}"#).is_none());
    }
    use super::*;

    #[test]
    fn maps_methods() {
        let m = |method: &str| {
            map_request(
                &Method::from_bytes(method.as_bytes()).unwrap(),
                STATE_PATH,
                None,
                b"",
            )
            .map(|m| m.method)
        };
        assert_eq!(m("GET"), Ok(StateMethod::Get));
        assert_eq!(m("POST"), Ok(StateMethod::Post));
        assert_eq!(m("LOCK"), Ok(StateMethod::Lock));
        assert_eq!(m("UNLOCK"), Ok(StateMethod::Unlock));
        assert_eq!(m("DELETE"), Ok(StateMethod::Delete));
        assert_eq!(m("PUT"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(m("PATCH"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(
            map_request(&Method::GET, "/other", None, b""),
            Err(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn lock_id_from_query_or_lock_info() {
        let post = map_request(
            &Method::POST,
            STATE_PATH,
            Some("ID=9216b09f-eb9b-95b1"),
            b"{}",
        )
        .unwrap();
        assert_eq!(post.lock_id.as_deref(), Some("9216b09f-eb9b-95b1"));
        let post = map_request(&Method::POST, STATE_PATH, Some("x=1&ID=a%2Db"), b"{}").unwrap();
        assert_eq!(post.lock_id.as_deref(), Some("a-b"));
        let post = map_request(&Method::POST, STATE_PATH, None, br#"{"ID":"nope"}"#).unwrap();
        assert_eq!(post.lock_id, None, "a POST body is state, not lock info");
        let info = br#"{"ID":"abc-123","Operation":"OperationTypePlan","Who":"nobody@x"}"#;
        let lock = map_request(
            &Method::from_bytes(b"LOCK").unwrap(),
            STATE_PATH,
            None,
            info,
        )
        .unwrap();
        assert_eq!(
            lock,
            Mapped {
                method: StateMethod::Lock,
                lock_id: Some("abc-123".into())
            }
        );
        let unlock = map_request(
            &Method::from_bytes(b"UNLOCK").unwrap(),
            STATE_PATH,
            None,
            info,
        )
        .unwrap();
        assert_eq!(unlock.lock_id.as_deref(), Some("abc-123"));
        let get = map_request(&Method::GET, STATE_PATH, None, b"").unwrap();
        assert_eq!(get.lock_id, None);
    }

    #[test]
    fn percent_decoding_is_forgiving() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn auth_accepts_only_the_exact_header() {
        let creds = Credentials::generate();
        assert_eq!(creds.password.len(), 64);
        assert!(!format!("{creds:?}").contains(&creds.password));
        let check = AuthCheck::new(&creds);
        assert!(check.allows(Some(creds.header_value().as_bytes())));
        assert!(!check.allows(None));
        assert!(!check.allows(Some(b"Basic ZGVsZWdhdGU6d3Jvbmc=")));
        let other = Credentials::generate();
        assert!(!check.allows(Some(other.header_value().as_bytes())));
    }
}
