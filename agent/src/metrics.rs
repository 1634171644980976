//! The agent's own metrics (Prometheus / OpenMetrics text, through `prometheus-client`) and its
//! health endpoints, served only on a loopback address or a unix socket, and only when
//! `[metrics] listen` is set.
//!
//! Owns: the metric families ([`Metrics`]), the executor wrapper that observes what tasks report
//! ([`MeteredExecutor`]: outcomes, step durations, log bytes, egress decisions), the listen
//! address rules ([`MetricsListen::parse`]) and the small HTTP server ([`serve`]):
//!
//! - `GET /metrics`: every family below, refreshed from the agent's state at scrape time;
//! - `GET /healthz`: 200 while the process answers (the probe takes the task manager's lock, so a
//!   wedged agent fails it by timing out);
//! - `GET /readyz`: 200 when the agent can take tasks (sandbox usable, connected, not draining),
//!   503 with the reason otherwise.
//!
//! Hooks for other modules: [`global`] is the process's metrics; the spool's size and waits are
//! read at scrape time (`service::AgentProbe`); egress decisions are counted from the
//! `EventKind::Egress` events tasks report (or [`Metrics::egress_decision`] for one that is not).
//!
//! Must never: listen on a non-loopback address, put task output, secrets or unbounded label
//! values (task ids) into a metric, or block a task's output on the metrics.

use crate::task_io::{TaskInputs, TaskOutput, TaskOutputTx, TaskResult};
use crate::tasks::Executor;
use bytes::Bytes;
use delegate_protocol::EventKind;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why the metrics endpoint could not be set up. Not retryable without a configuration change.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics.listen: {0}")]
    Listen(String),
    #[error("cannot listen for metrics on {addr}: {reason}")]
    Bind { addr: String, reason: String },
}

/// Where the metrics and health endpoints listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl MetricsListen {
    /// `IP:PORT` on a loopback address (`127.0.0.0/8`, `[::1]`), or `unix:/absolute/path`.
    /// Anything reachable from off the host is refused: the agent listens on nothing else.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            let p = PathBuf::from(path);
            if !p.is_absolute() {
                return Err(format!(
                    "{s:?}: a unix socket needs an absolute path, e.g. \"unix:/run/delegate/metrics.sock\""
                ));
            }
            return Ok(MetricsListen::Unix(p));
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!("{s:?} is neither IP:PORT nor unix:/path (e.g. \"127.0.0.1:9464\" or \"unix:/run/delegate/metrics.sock\")")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s:?} is not a loopback address: the agent serves metrics only on 127.0.0.0/8, [::1] or a unix socket (it must listen on nothing reachable from off the host); put a local exporter or an authenticated proxy in front if it must be scraped remotely"
            ));
        }
        Ok(MetricsListen::Tcp(addr))
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    op: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
}

/// Link states shown by `delegate_link_state`.
pub const LINK_STATES: [&str; 4] = ["connecting", "connected", "disconnected", "stopped"];
/// Task phases shown by `delegate_tasks`.
pub const TASK_PHASES: [&str; 4] = ["received", "receiving_inputs", "running", "finishing"];

fn step_histogram() -> Histogram {
    // 0.5 s .. ~68 min.
    Histogram::new(exponential_buckets(0.5, 2.0, 14))
}

struct Inner {
    registry: Registry,
    link_state: Family<StateLabel, Gauge>,
    link_connections: Counter,
    link_failures: Counter,
    tasks: Family<PhaseLabel, Gauge>,
    slots: Gauge,
    tasks_finished: Family<OutcomeLabels, Counter>,
    step_duration: Family<StepLabel, Histogram, fn() -> Histogram>,
    log_bytes: Family<StreamLabel, Counter>,
    spool_bytes: Gauge,
    spool_waits: Counter,
    egress: Family<DecisionLabel, Counter>,
    draining: Gauge,
    ready: Gauge,
    cert_expiry: Gauge,
    renewals: Family<ResultLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
}

/// The agent's metric families. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The process's metrics: what the daemon serves and what other modules report into.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("delegate");
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
        registry.register("agent_info", "The agent's version (always 1)", info);
        let link_state = Family::<StateLabel, Gauge>::default();
        registry.register(
            "link_state",
            "1 for the link's current state (connecting, connected, disconnected, stopped)",
            link_state.clone(),
        );
        let link_connections = Counter::default();
        registry.register(
            "link_connections",
            "Welcomed connections to the control plane since start (reconnects = this minus 1)",
            link_connections.clone(),
        );
        let link_failures = Counter::default();
        registry.register(
            "link_failures",
            "Failed connection attempts and lost connections since start",
            link_failures.clone(),
        );
        let tasks = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "tasks",
            "Tasks held, by phase (received, receiving_inputs, running, finishing)",
            tasks.clone(),
        );
        let slots = Gauge::default();
        registry.register("slots", "Task slots advertised", slots.clone());
        let tasks_finished = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "tasks_finished",
            "Tasks the sandbox ran to an end, by operation and outcome",
            tasks_finished.clone(),
        );
        let step_duration =
            Family::<StepLabel, Histogram, fn() -> Histogram>::new_with_constructor(step_histogram);
        registry.register(
            "step_duration_seconds",
            "Duration of sandbox steps (init, plan, apply, ...)",
            step_duration.clone(),
        );
        let log_bytes = Family::<StreamLabel, Counter>::default();
        registry.register(
            "task_log_bytes",
            "Bytes of task output (after redaction), by stream",
            log_bytes.clone(),
        );
        let spool_bytes = Gauge::default();
        registry.register(
            "spool_bytes",
            "Bytes held in the encrypted spool",
            spool_bytes.clone(),
        );
        let spool_waits = Counter::default();
        registry.register(
            "spool_waits",
            "Appends that waited for spool space (back-pressure on a task's output)",
            spool_waits.clone(),
        );
        let egress = Family::<DecisionLabel, Counter>::default();
        registry.register(
            "egress_requests",
            "Egress proxy decisions, by decision (allowed, denied)",
            egress.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while the agent is draining (SIGTERM)",
            draining.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the agent can take tasks (sandbox usable, connected, not draining)",
            ready.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the client certificate on disk expires (Unix time)",
            cert_expiry.clone(),
        );
        let renewals = Family::<ResultLabel, Counter>::default();
        registry.register(
            "certificate_renewals",
            "Certificate renewals over the link, by result",
            renewals.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Reloads (SIGHUP), by result (ok, failed)",
            reloads.clone(),
        );
        for s in LINK_STATES {
            let _ = link_state.get_or_create(&StateLabel { state: s.into() });
        }
        for p in TASK_PHASES {
            let _ = tasks.get_or_create(&PhaseLabel { phase: p.into() });
        }
        for d in ["allowed", "denied"] {
            let _ = egress.get_or_create(&DecisionLabel { decision: d.into() });
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                link_state,
                link_connections,
                link_failures,
                tasks,
                slots,
                tasks_finished,
                step_duration,
                log_bytes,
                spool_bytes,
                spool_waits,
                egress,
                draining,
                ready,
                cert_expiry,
                renewals,
                reloads,
            }),
        }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// The link's state (one of [`LINK_STATES`]) and its cumulative counts.
    pub fn set_link(&self, state: &str, connections: u64, failures: u64) {
        for s in LINK_STATES {
            self.inner
                .link_state
                .get_or_create(&StateLabel { state: s.into() })
                .set(i64::from(s == state));
        }
        raise(&self.inner.link_connections, connections);
        raise(&self.inner.link_failures, failures);
    }

    /// Tasks held by phase ([`TASK_PHASES`]), and the slots advertised.
    pub fn set_tasks(&self, by_phase: &[(&str, usize)], slots: u32) {
        for p in TASK_PHASES {
            let n = by_phase
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, n)| *n)
                .sum::<usize>();
            self.inner
                .tasks
                .get_or_create(&PhaseLabel { phase: p.into() })
                .set(n as i64);
        }
        self.inner.slots.set(i64::from(slots));
    }

    pub fn task_finished(&self, op: &str, outcome: &str) {
        self.inner
            .tasks_finished
            .get_or_create(&OutcomeLabels {
                op: op.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn step_finished(&self, step: &str, seconds: f64) {
        // Step names are the agent's own (init, plan, show, apply, ...), a small fixed set.
        self.inner
            .step_duration
            .get_or_create(&StepLabel { step: step.into() })
            .observe(seconds);
    }

    pub fn log_bytes(&self, stream: &str, n: u64) {
        self.inner
            .log_bytes
            .get_or_create(&StreamLabel {
                stream: stream.into(),
            })
            .inc_by(n);
    }

    /// The spool's bytes now and the appends that have waited for space so far.
    pub fn set_spool(&self, bytes: u64, waits: u64) {
        self.inner
            .spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        raise(&self.inner.spool_waits, waits);
    }

    /// One egress decision.
    pub fn egress_decision(&self, allowed: bool) {
        let decision = if allowed { "allowed" } else { "denied" };
        self.inner
            .egress
            .get_or_create(&DecisionLabel {
                decision: decision.into(),
            })
            .inc();
    }

    pub fn set_draining(&self, draining: bool) {
        self.inner.draining.set(i64::from(draining));
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.set(i64::from(ready));
    }

    pub fn set_cert_expiry(&self, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.inner.cert_expiry.set(secs);
    }

    /// Renewals seen so far (a cumulative count from the link status).
    pub fn set_renewals(&self, ok: u64) {
        raise(
            &self.inner.renewals.get_or_create(&ResultLabel {
                result: "ok".into(),
            }),
            ok,
        );
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.inner
            .reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }
}

/// Bring a counter up to a cumulative value kept elsewhere (never down).
fn raise(c: &Counter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

// ------------------------------------------------------------------------------------------------
// The executor wrapper
// ------------------------------------------------------------------------------------------------

/// Wraps an [`Executor`] and counts what its tasks report, passing everything on unchanged and
/// in order (the forwarding channel holds one item, so back-pressure reaches the task as before).
pub struct MeteredExecutor {
    inner: Arc<dyn Executor>,
    metrics: Metrics,
}

impl MeteredExecutor {
    pub fn new(inner: Arc<dyn Executor>, metrics: Metrics) -> Arc<MeteredExecutor> {
        Arc::new(MeteredExecutor { inner, metrics })
    }
}

/// Count one output item.
pub fn observe_output(metrics: &Metrics, out: &TaskOutput) {
    match out {
        TaskOutput::Log { stream, data } => metrics.log_bytes(stream.as_str(), data.len() as u64),
        TaskOutput::Event(EventKind::StepFinished {
            step, duration_ms, ..
        }) => metrics.step_finished(step, *duration_ms as f64 / 1000.0),
        TaskOutput::Event(EventKind::Egress { allowed, .. }) => metrics.egress_decision(*allowed),
        _ => {}
    }
}

impl Executor for MeteredExecutor {
    fn availability(&self) -> Result<(), String> {
        self.inner.availability()
    }

    fn run(
        &self,
        inputs: TaskInputs,
        out: TaskOutputTx,
        cancel: tokio_util::sync::CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let op = inputs.spec.op.to_string();
        let (tx, rx) = mpsc::channel::<TaskOutput>(1);
        let run = self.inner.run(inputs, tx, cancel);
        metered(run, rx, out, op, self.metrics.clone())
    }

    fn resume(
        &self,
        journal: crate::spool::journal::TaskJournal,
        out: TaskOutputTx,
        cancel: tokio_util::sync::CancellationToken,
    ) -> BoxFuture<'static, TaskResult> {
        let op = journal.spec.op.to_string();
        let (tx, rx) = mpsc::channel::<TaskOutput>(1);
        let run = self.inner.resume(journal, tx, cancel);
        metered(run, rx, out, op, self.metrics.clone())
    }
}

/// Forward `rx` to `out`, counting, while `run` runs; count the outcome. Returns when `run`
/// does (after passing on what it had already sent), even if a sender clone outlives it.
fn metered(
    run: BoxFuture<'static, TaskResult>,
    mut rx: mpsc::Receiver<TaskOutput>,
    out: TaskOutputTx,
    op: String,
    metrics: Metrics,
) -> BoxFuture<'static, TaskResult> {
    Box::pin(async move {
        let mut run = run;
        let mut open = true;
        let result = loop {
            tokio::select! {
                biased;
                item = rx.recv(), if open => match item {
                    Some(item) => {
                        observe_output(&metrics, &item);
                        // A gone receiver: keep draining so the task is not blocked.
                        let _ = out.send(item).await;
                    }
                    None => open = false,
                },
                r = &mut run => break r,
            }
        };
        while let Ok(item) = rx.try_recv() {
            observe_output(&metrics, &item);
            let _ = out.send(item).await;
        }
        metrics.task_finished(&op, result.outcome.as_str());
        result
    })
}

// ------------------------------------------------------------------------------------------------
// The HTTP endpoint
// ------------------------------------------------------------------------------------------------

/// What the endpoint asks the agent at each request.
pub trait Probe: Send + Sync + 'static {
    /// Bring the metrics up to date (link state, tasks by phase, ...).
    fn refresh(&self, metrics: &Metrics);
    /// `Ok` when the agent can take tasks; otherwise why not.
    fn ready(&self) -> Result<(), String>;
    /// `Ok` while the agent is alive.
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Answer one request (pure apart from the probe).
pub fn respond(
    method: &Method,
    path: &str,
    metrics: &Metrics,
    probe: &dyn Probe,
) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => {
            probe.refresh(metrics);
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        "/healthz" => match probe.live() {
            Ok(()) => (StatusCode::OK, TEXT, "ok\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
        "/readyz" => match probe.ready() {
            Ok(()) => (StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found (try /metrics, /healthz, /readyz)\n".into(),
        ),
    }
}

/// A bound listener, ready to [`Server::run`].
pub struct Server {
    listener: Listener,
    metrics: Metrics,
    probe: Arc<dyn Probe>,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Bind the endpoint. A unix socket path left by a previous run is replaced (only if it is a
/// socket); the new one is made group-accessible (0660) and nothing else.
pub async fn bind(
    listen: &MetricsListen,
    metrics: Metrics,
    probe: Arc<dyn Probe>,
) -> Result<Server, MetricsError> {
    let bind_err = |reason: String| MetricsError::Bind {
        addr: listen.to_string(),
        reason,
    };
    let listener = match listen {
        MetricsListen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                return Err(MetricsError::Listen(format!(
                    "{addr} is not a loopback address"
                )));
            }
            Listener::Tcp(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_err(e.to_string()))?,
            )
        }
        MetricsListen::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                } else {
                    return Err(bind_err("the path exists and is not a socket".into()));
                }
            }
            let l = tokio::net::UnixListener::bind(path).map_err(|e| bind_err(e.to_string()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| bind_err(e.to_string()))?;
            Listener::Unix(l, path.clone())
        }
    };
    Ok(Server {
        listener,
        metrics,
        probe,
    })
}

impl Server {
    /// The TCP address bound (tests bind port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Serve until `stop`; then remove the unix socket, if any.
    pub async fn run(self, stop: CancellationToken) {
        let Server {
            listener,
            metrics,
            probe,
        } = self;
        let where_ = match &listener {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        info!(listen = %where_, "serving /metrics, /healthz and /readyz");
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = accept(&listener) => a,
            };
            match accepted {
                Ok(io) => {
                    let metrics = metrics.clone();
                    let probe = probe.clone();
                    tokio::spawn(serve_conn(io, metrics, probe, stop.clone()));
                }
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

type BoxIo = Box<dyn IoStream>;
trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

async fn accept(l: &Listener) -> std::io::Result<BoxIo> {
    match l {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            Ok(Box::new(s))
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok(Box::new(s))
        }
    }
}

async fn serve_conn(io: BoxIo, metrics: Metrics, probe: Arc<dyn Probe>, stop: CancellationToken) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        let probe = probe.clone();
        async move {
            let (status, ctype, body) = respond(req.method(), req.uri().path(), &metrics, &*probe);
            let body = if req.method() == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(body)
            };
            Response::builder()
                .status(status)
                .header("content-type", ctype)
                .body(Full::new(body))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::select! {
        _ = stop.cancelled() => {}
        r = conn => if let Err(e) = r { debug!(error = %e, "metrics connection ended"); },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_must_be_loopback_or_unix() {
        assert_eq!(
            MetricsListen::parse("127.0.0.1:9464").unwrap(),
            MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert!(MetricsListen::parse("127.0.0.2:9464").is_ok());
        assert!(MetricsListen::parse("[::1]:9464").is_ok());
        assert_eq!(
            MetricsListen::parse("unix:/run/delegate/metrics.sock").unwrap(),
            MetricsListen::Unix("/run/delegate/metrics.sock".into())
        );
        for bad in [
            "0.0.0.0:9464",
            "10.0.0.5:9464",
            "[::]:9464",
            "192.168.1.1:80",
        ] {
            let e = MetricsListen::parse(bad).unwrap_err();
            assert!(e.contains("not a loopback address"), "{bad}: {e}");
        }
        assert!(MetricsListen::parse("unix:relative.sock")
            .unwrap_err()
            .contains("absolute"));
        assert!(MetricsListen::parse("localhost:9464")
            .unwrap_err()
            .contains("IP:PORT"));
        assert!(MetricsListen::parse("").is_err());
    }

    struct FixedProbe(Result<(), String>);
    impl Probe for FixedProbe {
        fn refresh(&self, m: &Metrics) {
            m.set_link("connected", 3, 2);
            m.set_tasks(&[("running", 2), ("finishing", 1)], 4);
        }
        fn ready(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    #[test]
    fn exposition_names_every_family() {
        let m = Metrics::new();
        m.task_finished("plan", "succeeded");
        m.step_finished("init", 1.5);
        m.log_bytes("stdout", 42);
        m.set_spool(1234, 5);
        m.egress_decision(false);
        m.egress_decision(true);
        m.egress_decision(true);
        m.set_draining(true);
        let (status, ctype, text) = respond(&Method::GET, "/metrics", &m, &FixedProbe(Ok(())));
        assert_eq!(status, StatusCode::OK);
        assert!(ctype.starts_with("application/openmetrics-text"));
        for line in [
            "delegate_link_state{state=\"connected\"} 1",
            "delegate_link_state{state=\"disconnected\"} 0",
            "delegate_link_connections_total 3",
            "delegate_link_failures_total 2",
            "delegate_tasks{phase=\"running\"} 2",
            "delegate_tasks{phase=\"finishing\"} 1",
            "delegate_tasks{phase=\"received\"} 0",
            "delegate_slots 4",
            "delegate_tasks_finished_total{op=\"plan\",outcome=\"succeeded\"} 1",
            "delegate_step_duration_seconds_count{step=\"init\"} 1",
            "delegate_task_log_bytes_total{stream=\"stdout\"} 42",
            "delegate_spool_bytes 1234",
            "delegate_spool_waits_total 5",
            "delegate_egress_requests_total{decision=\"allowed\"} 2",
            "delegate_egress_requests_total{decision=\"denied\"} 1",
            "delegate_draining 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Cumulative counts never go down.
        m.set_link("connecting", 1, 1);
        let text = m.encode();
        assert!(text.contains("delegate_link_connections_total 3"), "{text}");
        assert!(
            text.contains("delegate_link_state{state=\"connecting\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn health_and_readiness() {
        let m = Metrics::new();
        let (s, _, b) = respond(&Method::GET, "/healthz", &m, &FixedProbe(Err("x".into())));
        assert_eq!((s, b.as_str()), (StatusCode::OK, "ok\n"));
        let (s, _, b) = respond(
            &Method::GET,
            "/readyz",
            &m,
            &FixedProbe(Err("draining".into())),
        );
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(b.contains("draining"));
        let (s, _, _) = respond(&Method::GET, "/readyz", &m, &FixedProbe(Ok(())));
        assert_eq!(s, StatusCode::OK);
        let (s, _, _) = respond(&Method::GET, "/nope", &m, &FixedProbe(Ok(())));
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = respond(&Method::POST, "/metrics", &m, &FixedProbe(Ok(())));
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }
    struct Scripted;
    impl Executor for Scripted {
        fn availability(&self) -> Result<(), String> {
            Ok(())
        }
        fn run(
            &self,
            _inputs: TaskInputs,
            out: TaskOutputTx,
            _cancel: tokio_util::sync::CancellationToken,
        ) -> BoxFuture<'static, TaskResult> {
            Box::pin(async move {
                let items = vec![
                    TaskOutput::Event(EventKind::StepStarted {
                        step: "plan".into(),
                    }),
                    TaskOutput::Log {
                        stream: delegate_protocol::LogStream::Stdout,
                        data: Bytes::from_static(b"hello\n"),
                    },
                    TaskOutput::Event(EventKind::Egress {
                        destination: "x:443".into(),
                        address: None,
                        allowed: false,
                        detail: "not allowed".into(),
                        bytes_up: 0,
                        bytes_down: 0,
                        duration_ms: 0,
                    }),
                    TaskOutput::Event(EventKind::StepFinished {
                        step: "plan".into(),
                        exit_code: 0,
                        duration_ms: 2500,
                    }),
                ];
                for i in items {
                    out.send(i).await.unwrap();
                }
                // A sender clone that outlives the run must not hold the task up.
                std::mem::forget(out.clone());
                TaskResult {
                    outcome: delegate_protocol::Outcome::Succeeded,
                    reason: None,
                    summary: delegate_protocol::Summary::default(),
                }
            })
        }
    }

    #[tokio::test]
    async fn metered_executor_passes_everything_on_in_order_and_counts() {
        let m = Metrics::new();
        let exec = MeteredExecutor::new(Arc::new(Scripted), m.clone());
        let spec: delegate_protocol::TaskSpec = serde_json::from_value(serde_json::json!({
            "task_id": uuid::Uuid::new_v4(),
            "op": "plan",
            "workspace": "w",
            "archive": {"size": 0, "sha256": "00"},
        }))
        .unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let result = exec
            .run(
                TaskInputs {
                    spec,
                    archive: vec![],
                    plan: None,
                },
                tx,
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
        assert_eq!(result.outcome, delegate_protocol::Outcome::Succeeded);
        let mut kinds = Vec::new();
        while let Ok(i) = rx.try_recv() {
            kinds.push(match i {
                TaskOutput::Log { .. } => "log",
                TaskOutput::Event(EventKind::StepStarted { .. }) => "started",
                TaskOutput::Event(EventKind::StepFinished { .. }) => "finished",
                TaskOutput::Event(EventKind::Egress { .. }) => "egress",
                _ => "other",
            });
        }
        assert_eq!(kinds, vec!["started", "log", "egress", "finished"]);
        let text = m.encode();
        for line in [
            "delegate_tasks_finished_total{op=\"plan\",outcome=\"succeeded\"} 1",
            "delegate_task_log_bytes_total{stream=\"stdout\"} 6",
            "delegate_egress_requests_total{decision=\"denied\"} 1",
            "delegate_step_duration_seconds_sum{step=\"plan\"} 2.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
