//! The egress allowlist wired into one task: the task's proxy, its host firewall rules, the
//! sandbox's proxy environment and the audit trail of every decision.
//!
//! Owns, per task: the [`EgressProxy`] listening on the task network's gateway IP (one proxy per
//! task: it is reachable from that network alone, its lifetime is the task's, and a record it
//! produces belongs to the task even when the request carried no valid credentials), the task's
//! credentials and narrowed policy, the host firewall rules of the task bridge
//! ([`FirewallRegistry`], so every removal path finds them), and turning each
//! [`EgressRecord`] into an [`EventKind::Egress`] (the audit record, sequenced with the task's
//! output) plus, for a denial, a `System` log line the user sees next to tofu's error.
//!
//! Per agent: the operator's policy behind an [`EgressPolicy`] handle. Replacing it (SIGHUP reload)
//! changes what tasks started *afterwards* get; a running task keeps the policy it started with
//! (its proxy holds its own copy).
//!
//! Why host firewall rules and not only an `internal` network: see [`crate::egress`] (the gateway
//! IP is a host address, so host services on `0.0.0.0` would answer a sandbox there).
//!
//! Must never: start a step container before the firewall rules of its bridge are in place
//! (unless the operator turned them off), put the proxy password anywhere but the container's
//! environment (it is added to the task's redaction set), or let a task see another task's policy
//! or credentials.

use super::logs;
use crate::egress::firewall::{self, Backend, FirewallError, Isolation};
use crate::egress::proxy::{
    EgressProxy, EgressRecord, ProxyConfig, ProxyError, Resolver, SystemResolver,
};
use crate::egress::rules::{Cidr, Policy};
use crate::task_io::{TaskOutput, TaskOutputTx};
use bytes::Bytes;
use delegate_protocol::{limits, EventKind, LogStream};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Default most connections one task's proxy serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Records waiting to become events; the proxy waits (per connection) when this is full.
const RECORD_QUEUE: usize = 1024;
/// Longest the end of a task waits for the proxy's last records.
const FINISH_WAIT: Duration = Duration::from_secs(30);
/// Environment variables the agent sets for the proxy; a task may not set them (any case).
pub const PROXY_ENV: &[&str] = &["HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY"];

/// Which tool installs the per-bridge host firewall rules (`egress.firewall`; its names are
/// [`FirewallMode::as_str`], parsed in [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirewallMode {
    /// nft when it runs, else iptables; neither is an error (tasks are refused).
    #[default]
    Auto,
    Nft,
    Iptables,
    /// No rules: only for hosts where the operator isolates the task bridges some other way
    /// (e.g. an agent in a container, which cannot reach the bridges' INPUT path).
    Off,
}

impl FirewallMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FirewallMode::Auto => "auto",
            FirewallMode::Nft => "nft",
            FirewallMode::Iptables => "iptables",
            FirewallMode::Off => "off",
        }
    }
}

/// The operator's egress policy, shared between the configuration reload and the sandbox.
/// Cloning shares the handle; [`EgressPolicy::replace`] is seen by tasks that start afterwards.
#[derive(Clone, Default)]
pub struct EgressPolicy(Arc<RwLock<Arc<Policy>>>);

impl EgressPolicy {
    pub fn new(policy: Policy) -> EgressPolicy {
        EgressPolicy(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy a task starting now gets (before narrowing).
    pub fn current(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Swap the operator policy (SIGHUP reload). Running tasks keep theirs.
    pub fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }
}

/// Two handles are equal when their current policies are.
impl PartialEq for EgressPolicy {
    fn eq(&self, other: &Self) -> bool {
        *self.current() == *other.current()
    }
}

impl Eq for EgressPolicy {}

impl std::fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.current();
        let show = |rules: &[crate::egress::rules::Rule]| {
            rules.iter().map(|r| r.to_string()).collect::<Vec<_>>()
        };
        f.debug_struct("EgressPolicy")
            .field("allow", &show(&p.allow))
            .field("deny", &show(&p.deny))
            .finish()
    }
}

/// The sandbox's egress settings (from `[egress]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    pub policy: EgressPolicy,
    /// Names the proxy resolves to fixed addresses before asking the system resolver
    /// (`egress.hosts`: split-horizon names, mirrors known by address). Keys are normalised.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Most connections one task's proxy serves at once.
    pub max_connections: usize,
    pub firewall: FirewallMode,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            policy: EgressPolicy::default(),
            hosts: BTreeMap::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            firewall: FirewallMode::Auto,
        }
    }
}

/// Why a task's egress could not be set up.
#[derive(Debug, Error)]
pub enum EgressError {
    /// Retryable: the gateway address may not be up yet.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Not retryable without an operator (permissions, missing tool); see the message.
    #[error("cannot isolate the task network from the host: {0}")]
    Firewall(#[from] FirewallError),
    /// Not retryable: install nftables or iptables, or set `egress.firewall`.
    #[error(
        "neither nft nor iptables is usable, so the sandbox could reach services on the host; \
         install nftables, or set egress.firewall = \"off\" if the task bridges are isolated otherwise"
    )]
    NoFirewall,
    /// Retryable.
    #[error("cannot list the host's addresses: {0}")]
    HostAddresses(io::Error),
}

impl EgressError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, EgressError::Proxy(_) | EgressError::HostAddresses(_))
    }
}

/// The firewall backend for `mode`, checked usable (the tool is there and this process may
/// change the firewall): `None` when rules are off. Called once when the sandbox starts, so a
/// missing capability is a start-up error, not a failure of every task.
pub async fn firewall_backend(mode: FirewallMode) -> Result<Option<Backend>, EgressError> {
    let backend = match mode {
        FirewallMode::Off => return Ok(None),
        FirewallMode::Nft => Backend::Nft,
        FirewallMode::Iptables => Backend::Iptables,
        FirewallMode::Auto => firewall::detect().await.ok_or(EgressError::NoFirewall)?,
    };
    firewall::check(backend).await?;
    Ok(Some(backend))
}

/// The bridge interface name of a task network: `dlg` + 12 hex digits of the task id (15
/// characters, the kernel's limit), so the firewall rules can be named before Docker answers and
/// found again from the task id alone.
pub fn bridge_name(task: Uuid) -> String {
    format!("dlg{}", &task.simple().to_string()[..12])
}

/// Refuse task variables that would shadow the agent's proxy settings (any letter case).
pub fn check_task_env<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<(), String> {
    for name in names {
        if PROXY_ENV.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            return Err(format!(
                "variable {name} is reserved: the agent sets it to the task's egress proxy"
            ));
        }
    }
    Ok(())
}

/// `egress.hosts` first, then the system resolver. A name in the table never reaches DNS.
pub struct HostsResolver {
    hosts: BTreeMap<String, Vec<IpAddr>>,
}

impl HostsResolver {
    pub fn new(hosts: BTreeMap<String, Vec<IpAddr>>) -> HostsResolver {
        HostsResolver { hosts }
    }
}

impl Resolver for HostsResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        match self.hosts.get(host) {
            Some(addrs) => {
                let addrs = addrs.clone();
                Box::pin(async move { Ok(addrs) })
            }
            None => SystemResolver.lookup(host, port),
        }
    }
}

/// Host firewall rules per task, kept where every removal path (normal end, aborted runner,
/// orphan cleanup) finds them.
#[derive(Debug, Default)]
pub struct FirewallRegistry {
    applied: Mutex<HashMap<Uuid, (Backend, Isolation)>>,
}

impl FirewallRegistry {
    /// Install the rules for `task`; recorded before they are applied, so a failure halfway is
    /// still removed.
    pub async fn apply(
        &self,
        task: Uuid,
        backend: Backend,
        iso: Isolation,
    ) -> Result<(), FirewallError> {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(task, (backend, iso.clone()));
        firewall::apply(backend, &iso).await
    }

    /// Remove the task's rules, if any. Failures are logged: nothing else can be done, and the
    /// rules only ever refuse traffic.
    pub async fn release(&self, task: Uuid) {
        let entry = self
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&task);
        if let Some((backend, iso)) = entry {
            if let Err(e) = firewall::remove(backend, &iso).await {
                tracing::warn!(%task, bridge = %iso.bridge, error = %e, "could not remove the task's firewall rules");
            }
        }
    }

    /// Remove the rules of a bridge this agent no longer tracks (after a restart).
    pub async fn release_bridge(backend: Backend, bridge: &str) {
        let iso = Isolation {
            bridge: bridge.to_string(),
            gateway: IpAddr::from([0, 0, 0, 0]),
            proxy_port: 1,
            backend_port: None,
        };
        if let Err(e) = firewall::remove(backend, &iso).await {
            tracing::warn!(bridge, error = %e, "could not remove firewall rules of an orphaned bridge");
        }
    }

    pub fn is_tracked(&self, task: Uuid) -> bool {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&task)
    }
}

/// What a task's egress needs from the rest of the sandbox.
#[derive(Debug, Clone)]
pub struct EgressPlan<'a> {
    pub task: Uuid,
    /// The operator's policy as the task starts (a snapshot: later reloads do not change it).
    pub operator: Arc<Policy>,
    /// What the task asked for (`TaskSpec::egress`); empty means the operator's policy.
    pub requested: &'a [String],
    pub gateway: IpAddr,
    pub subnet: Option<Cidr>,
    pub bridge: &'a str,
    /// The state backend's port on the gateway, when the task uses it.
    pub backend_port: Option<u16>,
    /// Networks refused unless a rule explicitly allows them: the host's addresses and every
    /// Docker network's subnet.
    pub protected: Vec<Cidr>,
}

/// A task's running egress: proxy, records drain, credentials.
pub struct TaskEgress {
    task_id: String,
    proxy: EgressProxy,
    drain: JoinHandle<()>,
    /// Where the rejections the host firewall remembered are reported at the end.
    firewall: Option<(Backend, Isolation)>,
    out: TaskOutputTx,
    /// `KEY=value` entries for every step container.
    pub env: Vec<String>,
    /// The proxy password, for the task's redaction set.
    pub password: String,
    /// Requested entries the operator's policy does not cover, with why.
    pub refused: Vec<(String, String)>,
}

impl std::fmt::Debug for TaskEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEgress")
            .field("task_id", &self.task_id)
            .field("proxy", &self.proxy.local_addr())
            .finish_non_exhaustive()
    }
}

impl TaskEgress {
    /// Start the task's proxy on the gateway, register the narrowed policy (fenced to the task
    /// subnet) and apply the host firewall rules (when `firewall` is set). Records go to `out` as
    /// events, passed through the task's redaction first (`secrets`).
    pub async fn start(
        plan: EgressPlan<'_>,
        settings: &EgressSettings,
        firewall: Option<(&FirewallRegistry, Backend)>,
        out: TaskOutputTx,
        secrets: Vec<Vec<u8>>,
    ) -> Result<TaskEgress, EgressError> {
        let (policy, refused) = plan.operator.for_task(plan.requested);
        let mut config = ProxyConfig::new(SocketAddr::new(plan.gateway, 0), plan.protected);
        config.max_connections = settings.max_connections.max(1);
        let (tx, rx) = mpsc::channel(RECORD_QUEUE);
        let resolver: Arc<dyn Resolver> = Arc::new(HostsResolver::new(settings.hosts.clone()));
        let proxy = EgressProxy::start(config, resolver, tx).await?;
        let task_id = plan.task.to_string();
        let creds = proxy.register(&task_id, policy, plan.subnet)?;
        // Compiled once for every record of the task; the values themselves are zeroized here.
        let mut secrets = zeroize::Zeroizing::new(secrets);
        secrets.push(creds.password.as_bytes().to_vec());
        let redactor = RecordRedactor::new(&secrets);
        drop(secrets);
        let drain = tokio::spawn(drain_records(rx, out.clone(), redactor));
        let mut egress = TaskEgress {
            firewall: None,
            out,
            task_id,
            env: creds
                .sandbox_env(proxy.local_addr(), &[plan.gateway.to_string()])
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            password: creds.password.clone(),
            refused,
            drain,
            proxy,
        };
        if let Some((registry, backend)) = firewall {
            let iso = Isolation {
                bridge: plan.bridge.to_string(),
                gateway: plan.gateway,
                proxy_port: egress.proxy.local_addr().port(),
                backend_port: plan.backend_port,
            };
            if let Err(e) = registry.apply(plan.task, backend, iso.clone()).await {
                egress.finish().await;
                return Err(e.into());
            }
            egress.firewall = Some((backend, iso));
        }
        Ok(egress)
    }

    /// Revoke the credentials (open tunnels close), stop the proxy and wait until its last
    /// records are events; then report what the host firewall refused. Bounded: a stuck
    /// connection cannot hold the task's end. The firewall rules themselves stay until the
    /// network goes ([`FirewallRegistry::release`]).
    pub async fn finish(self) {
        let TaskEgress {
            task_id,
            proxy,
            drain,
            firewall,
            out,
            ..
        } = self;
        proxy.unregister(&task_id);
        let end = async {
            proxy.shutdown().await;
            let _ = drain.await;
        };
        if tokio::time::timeout(FINISH_WAIT, end).await.is_err() {
            tracing::warn!(task = %task_id, "egress proxy did not stop in time; its last records may be missing");
        }
        let Some((backend, iso)) = firewall else {
            return;
        };
        let rejected = match firewall::rejected(backend, &iso).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(task = %task_id, error = %e, "cannot read the firewall's rejections");
                return;
            }
        };
        for r in rejected {
            let (event, line) = rejection_outputs(&r);
            if out.send(TaskOutput::Event(event)).await.is_err() {
                return;
            }
            let data = Bytes::from(line);
            let log = TaskOutput::Log {
                stream: LogStream::System,
                data,
            };
            if out.send(log).await.is_err() {
                return;
            }
        }
    }
}

/// Turn every record into an event (and a log line for a denial) until the proxy is gone.
async fn drain_records(
    mut rx: mpsc::Receiver<EgressRecord>,
    out: TaskOutputTx,
    redactor: RecordRedactor,
) {
    let mut open = true;
    while let Some(rec) = rx.recv().await {
        if !open {
            continue;
        }
        let (event, line) = record_outputs(&rec, &redactor);
        if let EventKind::Egress { destination, .. } = &event {
            tracing::debug!(allowed = rec.allowed, destination = %destination, "egress decision");
        }
        if out.send(TaskOutput::Event(event)).await.is_err() {
            // Nobody listens any more; keep receiving so the proxy never blocks on us.
            open = false;
            continue;
        }
        if let Some(line) = line {
            let data = Bytes::from(line);
            if out
                .send(TaskOutput::Log {
                    stream: LogStream::System,
                    data,
                })
                .await
                .is_err()
            {
                open = false;
            }
        }
    }
}

/// The audit event for a record and, for a denial, the log line. The destination comes from the
/// sandbox, so it is redacted like the sandbox's output and bounded to what the protocol allows.
pub fn record_outputs(
    rec: &EgressRecord,
    redactor: &RecordRedactor,
) -> (EventKind, Option<String>) {
    let destination = bounded(&redactor.redact(&rec.destination), limits::MAX_NAME);
    let detail = match (&rec.rule, &rec.reason) {
        (Some(rule), None) => format!("rule {rule}"),
        (Some(rule), Some(end)) => format!("rule {rule}; {end}"),
        (None, Some(reason)) => reason.clone(),
        (None, None) => String::new(),
    };
    let detail = bounded(&redactor.redact(&detail), limits::MAX_TEXT);
    let line = (!rec.allowed).then(|| {
        let shown = if destination.is_empty() {
            "(no destination)".to_string()
        } else {
            destination.clone()
        };
        bounded(
            &format!("delegate: egress denied: {shown}: {detail}"),
            limits::MAX_TEXT - 1,
        ) + "\n"
    });
    let event = EventKind::Egress {
        destination,
        address: rec.resolved.map(|a| a.to_string()),
        allowed: rec.allowed,
        detail,
        bytes_up: rec.bytes_up,
        bytes_down: rec.bytes_down,
        duration_ms: rec.duration_ms,
    };
    (event, line)
}

/// The audit event and log line for a direct connection the host firewall refused (to the host
/// itself or routed beyond it).
pub fn rejection_outputs(r: &firewall::Rejected) -> (EventKind, String) {
    let addr = SocketAddr::new(r.addr, r.port).to_string();
    let detail = format!(
        "rejected by the host firewall: a direct {} connection from the sandbox, bypassing the \
         egress proxy",
        r.protocol
    );
    let line = format!("delegate: egress denied: {addr}: {detail}\n");
    let event = EventKind::Egress {
        destination: addr.clone(),
        address: Some(addr),
        allowed: false,
        detail,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    };
    (event, line)
}

/// A task's secrets (its own and the proxy password), compiled once for the sandbox-chosen text
/// of all its egress records; redacts as a step's output stream does ([`logs::Redactor`]),
/// withholding the text when the secrets cannot be compiled.
#[derive(Debug, Clone)]
pub struct RecordRedactor {
    /// `None`: no secrets, text passes through.
    compiled: Option<Compiled>,
}

#[derive(Debug, Clone)]
enum Compiled {
    Ready(crate::redact::Redactor),
    Failed,
}

impl RecordRedactor {
    pub fn new(secrets: &[Vec<u8>]) -> RecordRedactor {
        let compiled = (!secrets.is_empty()).then(|| match logs::compile(secrets) {
            Some(r) => Compiled::Ready(r),
            None => Compiled::Failed,
        });
        RecordRedactor { compiled }
    }

    /// No secrets: text passes through.
    pub fn none() -> RecordRedactor {
        RecordRedactor { compiled: None }
    }

    fn redact(&self, text: &str) -> String {
        match &self.compiled {
            None => text.to_string(),
            Some(Compiled::Ready(r)) => {
                String::from_utf8_lossy(&r.redact(text.as_bytes())).into_owned()
            }
            Some(Compiled::Failed) => String::from_utf8_lossy(logs::WITHHELD).into_owned(),
        }
    }
}

/// At most `max` bytes, cut on a character boundary.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn record(allowed: bool) -> EgressRecord {
        EgressRecord {
            task_id: Some("t".into()),
            destination: "registry.example:443".into(),
            resolved: Some("192.0.2.10:443".parse().unwrap()),
            allowed,
            rule: allowed.then(|| "registry.example:443".to_string()),
            reason: (!allowed)
                .then(|| "registry.example:443 is not in the egress allowlist".into()),
            bytes_up: 10,
            bytes_down: 20,
            duration_ms: 5,
        }
    }

    #[test]
    fn allowed_records_are_events_without_a_log_line() {
        let (event, line) = record_outputs(&record(true), &RecordRedactor::none());
        assert_eq!(
            event,
            EventKind::Egress {
                destination: "registry.example:443".into(),
                address: Some("192.0.2.10:443".into()),
                allowed: true,
                detail: "rule registry.example:443".into(),
                bytes_up: 10,
                bytes_down: 20,
                duration_ms: 5,
            }
        );
        assert_eq!(line, None);
        let mut ended = record(true);
        ended.reason = Some("closed after the idle timeout".into());
        let (EventKind::Egress { detail, .. }, _) = record_outputs(&ended, &RecordRedactor::none())
        else {
            panic!("not an egress event")
        };
        assert_eq!(
            detail,
            "rule registry.example:443; closed after the idle timeout"
        );
    }

    #[test]
    fn denials_are_events_and_a_system_line() {
        let (event, line) = record_outputs(&record(false), &RecordRedactor::none());
        let EventKind::Egress {
            allowed, detail, ..
        } = &event
        else {
            panic!("not an egress event")
        };
        assert!(!allowed);
        assert_eq!(
            detail,
            "registry.example:443 is not in the egress allowlist"
        );
        assert_eq!(
            line.as_deref(),
            Some("delegate: egress denied: registry.example:443: registry.example:443 is not in the egress allowlist\n")
        );
        let mut nothing = record(false);
        nothing.destination.clear();
        nothing.reason = Some("missing proxy credentials".into());
        let (_, line) = record_outputs(&nothing, &RecordRedactor::none());
        assert_eq!(
            line.as_deref(),
            Some("delegate: egress denied: (no destination): missing proxy credentials\n")
        );
    }

    #[test]
    fn sandbox_chosen_text_is_redacted_and_bounded() {
        let mut rec = record(false);
        rec.destination = format!("s3cr3t-value.{}:443", "a".repeat(600));
        rec.reason = Some("s3cr3t-value.x is not in the egress allowlist".into());
        let secrets = vec![b"s3cr3t-value".to_vec()];
        let (event, line) = record_outputs(&rec, &RecordRedactor::new(&secrets));
        let json = serde_json::to_string(&event).unwrap();
        assert!(!json.contains("s3cr3t-value"), "{json}");
        assert!(!line.as_deref().unwrap().contains("s3cr3t-value"));
        let EventKind::Egress { destination, .. } = &event else {
            panic!("not an egress event")
        };
        assert!(
            destination.len() <= limits::MAX_NAME,
            "{}",
            destination.len()
        );
        // What the protocol accepts.
        let msg = delegate_protocol::Message::Event(delegate_protocol::Event {
            task_id: Uuid::nil(),
            seq: 1,
            at_ms: 0,
            event,
        });
        let text = delegate_protocol::encode_text(&msg);
        delegate_protocol::decode_text(&text).unwrap();

        // The secret crossing the cut: bounding first would keep its start (which alone no
        // longer matches). Every split point of the secret's first bytes at the cut.
        let redactor = RecordRedactor::new(&secrets);
        for kept in 3..="s3cr3t-value".len() {
            let mut rec = record(false);
            let pad = limits::MAX_NAME - '…'.len_utf8() - kept;
            rec.destination = format!("{}s3cr3t-value.x:443", "a".repeat(pad));
            let (event, line) = record_outputs(&rec, &redactor);
            let json = serde_json::to_string(&event).unwrap();
            let prefix = &"s3cr3t-value"[..kept];
            assert!(!json.contains(prefix), "{kept}: {json}");
            assert!(!line.as_deref().unwrap().contains(prefix), "{kept}");
        }
        // The case as the review put it.
        let mut rec = record(false);
        rec.destination = format!("{}s3cr3t-value.x:443", "a".repeat(limits::MAX_NAME - 6));
        let (event, _) = record_outputs(&rec, &redactor);
        let json = serde_json::to_string(&event).unwrap();
        assert!(!json.contains("s3c"), "{json}");
    }

    #[test]
    fn firewall_rejections_are_denied_events() {
        let (event, line) = rejection_outputs(&firewall::Rejected {
            addr: IpAddr::from([172, 18, 0, 1]),
            protocol: "tcp".into(),
            port: 22,
        });
        let EventKind::Egress {
            destination,
            address,
            allowed,
            detail,
            ..
        } = event
        else {
            panic!("not an egress event")
        };
        assert_eq!(destination, "172.18.0.1:22");
        assert_eq!(address.as_deref(), Some("172.18.0.1:22"));
        assert!(!allowed);
        assert!(detail.contains("host firewall"), "{detail}");
        assert!(line
            .starts_with("delegate: egress denied: 172.18.0.1:22: rejected by the host firewall"));
    }

    #[test]
    fn task_env_may_not_shadow_the_proxy() {
        assert!(check_task_env(&strings(&["TF_LOG", "AWS_REGION"])).is_ok());
        for bad in [
            "HTTPS_PROXY",
            "https_proxy",
            "No_Proxy",
            "ALL_PROXY",
            "http_proxy",
        ] {
            let e = check_task_env(&strings(&[bad])).unwrap_err();
            assert!(e.contains(bad) && e.contains("reserved"), "{e}");
        }
    }

    #[test]
    fn bridge_names_fit_the_kernel_limit() {
        let t = Uuid::parse_str("6f1c2f5e-8d2a-4c1e-9b1a-1f0e2d3c4b5a").unwrap();
        assert_eq!(bridge_name(t), "dlg6f1c2f5e8d2a");
        assert_eq!(bridge_name(t).len(), 15);
        let iso = Isolation {
            bridge: bridge_name(t),
            gateway: IpAddr::from([172, 18, 0, 1]),
            proxy_port: 1,
            backend_port: None,
        };
        iso.validate().unwrap();
    }

    #[test]
    fn a_replaced_policy_is_seen_by_new_snapshots_only() {
        let parse = |a: &[&str]| Policy::parse(&strings(a), &[]).unwrap();
        let handle = EgressPolicy::new(parse(&["a.example"]));
        let reload = handle.clone();
        let running = handle.current();
        reload.replace(parse(&["b.example"]));
        assert_eq!(running.allow[0].to_string(), "a.example:443");
        assert_eq!(handle.current().allow[0].to_string(), "b.example:443");
        assert_eq!(handle, reload);
        assert!(format!("{handle:?}").contains("b.example:443"));
    }

    #[test]
    fn firewall_mode_names() {
        // Parsed as the configuration parses `egress.firewall`.
        fn parse(s: &str) -> Option<FirewallMode> {
            serde_json::from_value(serde_json::Value::String(s.into())).ok()
        }
        for m in [
            FirewallMode::Auto,
            FirewallMode::Nft,
            FirewallMode::Iptables,
            FirewallMode::Off,
        ] {
            assert_eq!(parse(m.as_str()), Some(m));
        }
        assert_eq!(parse("ufw"), None);
    }

    #[tokio::test]
    async fn hosts_override_the_system_resolver() {
        let r = HostsResolver::new(BTreeMap::from([(
            "mirror.internal".to_string(),
            vec![IpAddr::from([192, 0, 2, 7])],
        )]));
        assert_eq!(
            r.lookup("mirror.internal", 443).await.unwrap(),
            vec![IpAddr::from([192, 0, 2, 7])]
        );
        // Not in the table: the system resolver answers (an IP literal needs no DNS).
        assert_eq!(
            r.lookup("127.0.0.1", 80).await.unwrap(),
            vec![IpAddr::from([127, 0, 0, 1])]
        );
    }

    /// CONNECT through a task's proxy; the status line.
    async fn connect_status(egress: &TaskEgress, target: SocketAddr) -> String {
        use base64::Engine;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let creds = egress
            .env
            .iter()
            .find_map(|e| e.strip_prefix("HTTP_PROXY=http://"))
            .and_then(|s| s.split_once('@'))
            .map(|(c, _)| c.to_string())
            .unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(creds);
        let mut c = tokio::net::TcpStream::connect(egress.proxy.local_addr())
            .await
            .unwrap();
        c.write_all(
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn loopback_plan(task: u128, operator: Arc<Policy>) -> EgressPlan<'static> {
        EgressPlan {
            task: Uuid::from_u128(task),
            operator,
            requested: &[],
            gateway: IpAddr::from([127, 0, 0, 1]),
            subnet: None,
            bridge: "unused",
            backend_port: None,
            protected: vec![],
        }
    }

    /// A reload (SIGHUP) swaps the operator policy for tasks started afterwards; a running task
    /// keeps the policy it started with.
    #[tokio::test]
    async fn a_running_task_keeps_its_policy_across_a_reload() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = upstream.local_addr().unwrap();
        tokio::spawn(async move { while upstream.accept().await.is_ok() {} });
        let handle = EgressPolicy::new(Policy::parse(&strings(&["127.0.0.1/32"]), &[]).unwrap());
        let settings = EgressSettings {
            policy: handle.clone(),
            ..EgressSettings::default()
        };
        let (out, _rx) = mpsc::channel(64);
        let running = TaskEgress::start(
            loopback_plan(1, settings.policy.current()),
            &settings,
            None,
            out.clone(),
            vec![],
        )
        .await
        .unwrap();
        assert!(connect_status(&running, target).await.contains(" 200 "));

        handle.replace(Policy::default());
        let later = TaskEgress::start(
            loopback_plan(2, settings.policy.current()),
            &settings,
            None,
            out,
            vec![],
        )
        .await
        .unwrap();
        assert!(
            connect_status(&running, target).await.contains(" 200 "),
            "the running task keeps its grant"
        );
        assert!(
            connect_status(&later, target).await.contains(" 403 "),
            "a task started after the reload gets the new policy"
        );
        running.finish().await;
        later.finish().await;
    }

    /// The whole per-task path on loopback: narrowed policy, credentials in the environment, a
    /// denial turned into an event and a log line, and the last records delivered by `finish`.
    #[tokio::test]
    async fn a_task_proxy_audits_into_the_task_output() {
        let operator = Arc::new(Policy::parse(&strings(&["allowed.test:80"]), &[]).unwrap());
        let (out, mut rx) = mpsc::channel(64);
        let requested = strings(&["allowed.test:80", "other.test:80"]);
        let egress = TaskEgress::start(
            EgressPlan {
                task: Uuid::nil(),
                operator,
                requested: &requested,
                gateway: IpAddr::from([127, 0, 0, 1]),
                subnet: None,
                bridge: "unused",
                backend_port: None,
                protected: vec![],
            },
            &EgressSettings::default(),
            None,
            out,
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(egress.refused.len(), 1, "{:?}", egress.refused);
        assert_eq!(egress.refused[0].0, "other.test:80");
        let env = egress.env.join("\n");
        assert!(env.contains("HTTPS_PROXY=http://task-"), "{env}");
        assert!(env.contains(&egress.password));
        assert!(env.contains("NO_PROXY=127.0.0.1"), "{env}");
        let proxy_url = egress
            .env
            .iter()
            .find_map(|e| e.strip_prefix("HTTP_PROXY="))
            .unwrap()
            .to_string();
        let creds = proxy_url
            .strip_prefix("http://")
            .and_then(|s| s.split_once('@'))
            .map(|(c, _)| c.to_string())
            .unwrap();
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(creds);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(egress.proxy.local_addr())
            .await
            .unwrap();
        c.write_all(
            format!("CONNECT other.test:80 HTTP/1.1\r\nHost: other.test:80\r\nProxy-Authorization: Basic {auth}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        egress.finish().await;
        let mut got = Vec::new();
        while let Ok(o) = rx.try_recv() {
            got.push(o);
        }
        match &got[..] {
            [TaskOutput::Event(EventKind::Egress {
                destination,
                allowed: false,
                ..
            }), TaskOutput::Log {
                stream: LogStream::System,
                data,
            }] => {
                assert_eq!(destination, "other.test:80");
                assert!(String::from_utf8_lossy(data).contains("egress denied: other.test:80"));
            }
            other => panic!("unexpected output {other:?}"),
        }
    }
}
