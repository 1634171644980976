//! Control messages, sent as JSON text frames: `{"type": "<name>", ...fields}`.
//!
//! Decoding is strict: unknown types and unknown fields are refused, and [`Message::validate`]
//! enforces every length and count limit from [`crate::limits`].

use crate::binary::{ChunkKind, LogStream};
use crate::{limits, truncate, DecodeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// Every `type` value this version understands.
pub const KNOWN_TYPES: &[&str] = &[
    "hello",
    "welcome",
    "heartbeat",
    "assign",
    "accept",
    "reject",
    "event",
    "ack",
    "artifact",
    "done",
    "cancel",
    "error",
    "state_request",
    "state_response",
    "renew_request",
    "renew_response",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Heartbeat(Heartbeat),
    Assign(Assign),
    Accept(Accept),
    Reject(Reject),
    Event(Event),
    Ack(Ack),
    Artifact(Artifact),
    Done(Done),
    Cancel(Cancel),
    Error(ErrorMsg),
    StateRequest(StateRequest),
    StateResponse(StateResponse),
    RenewRequest(RenewRequest),
    RenewResponse(RenewResponse),
}

impl Message {
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Heartbeat(_) => "heartbeat",
            Message::Assign(_) => "assign",
            Message::Accept(_) => "accept",
            Message::Reject(_) => "reject",
            Message::Event(_) => "event",
            Message::Ack(_) => "ack",
            Message::Artifact(_) => "artifact",
            Message::Done(_) => "done",
            Message::Cancel(_) => "cancel",
            Message::Error(_) => "error",
            Message::StateRequest(_) => "state_request",
            Message::StateResponse(_) => "state_response",
            Message::RenewRequest(_) => "renew_request",
            Message::RenewResponse(_) => "renew_response",
        }
    }

    /// Enforce the per-field limits. Called by [`crate::decode_text`]; senders may call it too.
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Message::Hello(h) => {
                check_list("versions", h.versions.len())?;
                check_name("agent_version", &h.agent_version)?;
                check_name("name", &h.name)?;
                check_name("pool", &h.pool)?;
                check_map("labels", &h.labels, limits::MAX_TEXT)?;
                check_list("tasks", h.tasks.len())?;
                if h.slots == 0 || h.slots > 1024 {
                    return Err(invalid(
                        "slots",
                        format!("must be 1..=1024, got {}", h.slots),
                    ));
                }
            }
            Message::Welcome(w) => {
                check_name("agent_id", &w.agent_id)?;
                check_list("resume", w.resume.len())?;
                if w.heartbeat_interval_ms == 0 {
                    return Err(invalid("heartbeat_interval_ms", "must be positive".into()));
                }
            }
            Message::Heartbeat(_) | Message::Accept(_) | Message::Ack(_) => {}
            Message::Assign(a) => a.task.validate()?,
            Message::Reject(r) => check_text("reason", &r.reason)?,
            Message::Event(e) => e.event.validate()?,
            Message::Artifact(a) => check_sha("sha256", &a.sha256)?,
            Message::Done(d) => {
                if let Some(r) = &d.reason {
                    check_text("reason", r)?;
                }
                if let Some(s) = &d.summary {
                    check_list("summary.drift_addresses", s.drift_addresses.len())?;
                }
            }
            Message::Cancel(c) => check_text("reason", &c.reason)?,
            Message::Error(e) => check_text("message", &e.message)?,
            Message::StateRequest(r) => {
                check_b64_body(&r.body_b64)?;
                if let Some(id) = &r.lock_id {
                    check_name("lock_id", id)?;
                }
            }
            Message::StateResponse(r) => check_b64_body(&r.body_b64)?,
            Message::RenewRequest(r) => check_len("csr_pem", &r.csr_pem, limits::MAX_TEXT)?,
            Message::RenewResponse(r) => {
                check_len("cert_pem", &r.cert_pem, limits::MAX_TEXT)?;
                if let Some(ca) = &r.ca_pem {
                    check_len("ca_pem", ca, limits::MAX_TEXT)?;
                }
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::InvalidField { field, reason }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    if s.len() > max {
        return Err(invalid(field, format!("{} bytes, limit {max}", s.len())));
    }
    Ok(())
}
fn check_name(field: &'static str, s: &str) -> Result<(), DecodeError> {
    check_len(field, s, limits::MAX_NAME)
}
fn check_text(field: &'static str, s: &str) -> Result<(), DecodeError> {
    check_len(field, s, limits::MAX_TEXT)
}
fn check_list(field: &'static str, n: usize) -> Result<(), DecodeError> {
    if n > limits::MAX_ENTRIES {
        return Err(invalid(
            field,
            format!("{n} entries, limit {}", limits::MAX_ENTRIES),
        ));
    }
    Ok(())
}
fn check_map(
    field: &'static str,
    m: &BTreeMap<String, String>,
    max_value: usize,
) -> Result<(), DecodeError> {
    check_list(field, m.len())?;
    for (k, v) in m {
        if k.is_empty() || k.len() > limits::MAX_NAME {
            return Err(invalid(
                field,
                format!(
                    "key {:?} must be 1..={} bytes",
                    truncate(k, 32),
                    limits::MAX_NAME
                ),
            ));
        }
        if v.len() > max_value {
            return Err(invalid(
                field,
                format!(
                    "value of {:?} is {} bytes, limit {max_value}",
                    truncate(k, 32),
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}
fn check_sha(field: &'static str, s: &str) -> Result<(), DecodeError> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(invalid(field, "must be 64 lowercase hex digits".into()));
    }
    Ok(())
}
fn check_b64_body(body: &Option<String>) -> Result<(), DecodeError> {
    if let Some(b) = body {
        let max = limits::MAX_STATE_BYTES.div_ceil(3) * 4;
        check_len("body_b64", b, max)?;
    }
    Ok(())
}

/// Agent -> control plane, first message on a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol versions the agent speaks.
    pub versions: Vec<u16>,
    pub agent_version: String,
    /// The name the agent believes it has. Informational only: identity comes from the certificate.
    pub name: String,
    pub pool: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many tasks the agent runs at once.
    pub slots: u32,
    /// Tasks the agent still holds (running, or with unacknowledged output).
    #[serde(default)]
    pub tasks: Vec<HeldTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldTask {
    pub task_id: Uuid,
    /// Highest sequence number the control plane acknowledged, 0 if none.
    pub acked_seq: u64,
}

/// Control plane -> agent, answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub version: u16,
    /// The agent's identity, taken from its client certificate.
    pub agent_id: String,
    pub heartbeat_interval_ms: u64,
    #[serde(default)]
    pub resume: Vec<ResumePoint>,
}

/// Where the control plane stands on a task the agent said it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumePoint {
    pub task_id: Uuid,
    /// Highest sequence number the control plane has stored; the agent resends everything after it.
    pub acked_seq: u64,
    /// False when the control plane does not know the task (or it is already finished and
    /// complete): the agent drops what it holds for it.
    pub known: bool,
}

/// Either direction. The receiver notes liveness; nothing answers a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Sender's clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

/// Control plane -> agent: run this task. Followed, after Accept, by the input chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    pub task: TaskSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Validate,
    Plan,
    Apply,
    Destroy,
    Drift,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Validate => "validate",
            Op::Plan => "plan",
            Op::Apply => "apply",
            Op::Destroy => "destroy",
            Op::Drift => "drift",
        }
    }
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "validate" => Op::Validate,
            "plan" => Op::Plan,
            "apply" => Op::Apply,
            "destroy" => Op::Destroy,
            "drift" => Op::Drift,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A blob the control plane will stream after Accept, as chunks of the given kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub size: u64,
    pub sha256: String,
}

/// Task secrets. Kept apart from plain env so they can be redacted; `Debug` never prints values.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Secret values are wiped from memory when the map is dropped (names are not secret).
impl Drop for Secrets {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub task_id: Uuid,
    pub op: Op,
    pub workspace: String,
    /// For `plan`: apply the plan in the same task once it is made (`submit --auto-approve`).
    #[serde(default)]
    pub auto_approve: bool,
    /// `-var name=value` arguments.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Paths, inside the workspace archive, passed as `-var-file`.
    #[serde(default)]
    pub var_files: Vec<String>,
    /// Plain environment variables for the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables for the sandbox; redacted from all output.
    #[serde(default)]
    pub secrets: Secrets,
    /// The workspace archive (tar.gz), streamed as `workspace` chunks.
    pub archive: BlobRef,
    /// For `apply`: the approved plan file, streamed as `plan` chunks; its sha256 is verified.
    #[serde(default)]
    pub plan: Option<BlobRef>,
    /// Hard limit for the whole task, in seconds; 0 means the agent's default.
    #[serde(default)]
    pub timeout_secs: u64,
    /// Destinations the task asks to reach; the agent grants only those its own allowlist covers.
    #[serde(default)]
    pub egress: Vec<String>,
}

impl TaskSpec {
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.workspace.is_empty() {
            return Err(invalid("task.workspace", "must not be empty".into()));
        }
        check_name("task.workspace", &self.workspace)?;
        check_map("task.vars", &self.vars, limits::MAX_VALUE)?;
        check_map("task.env", &self.env, limits::MAX_VALUE)?;
        check_map("task.secrets", &self.secrets.0, limits::MAX_VALUE)?;
        check_list("task.var_files", self.var_files.len())?;
        for f in &self.var_files {
            check_text("task.var_files", f)?;
        }
        check_list("task.egress", self.egress.len())?;
        for e in &self.egress {
            check_name("task.egress", e)?;
        }
        check_sha("task.archive.sha256", &self.archive.sha256)?;
        if self.archive.size > limits::MAX_BLOB {
            return Err(invalid(
                "task.archive.size",
                format!("limit {}", limits::MAX_BLOB),
            ));
        }
        if let Some(p) = &self.plan {
            check_sha("task.plan.sha256", &p.sha256)?;
            if p.size > limits::MAX_BLOB {
                return Err(invalid(
                    "task.plan.size",
                    format!("limit {}", limits::MAX_BLOB),
                ));
            }
        }
        if self.op == Op::Apply && self.plan.is_none() {
            return Err(invalid(
                "task.plan",
                "an apply task must carry the approved plan".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    pub task_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reject {
    pub task_id: Uuid,
    pub reason: String,
}

/// Agent -> control plane: something happened in a task. Sequenced and acknowledged like logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub task_id: Uuid,
    pub seq: u64,
    pub at_ms: u64,
    pub event: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventKind {
    StepStarted {
        step: String,
    },
    StepFinished {
        step: String,
        exit_code: i64,
        duration_ms: u64,
    },
    /// A notice from the agent about the task (e.g. why it was refused, an egress denial).
    Notice {
        level: String,
        text: String,
    },
    /// One decision of the task's egress proxy; the control plane keeps it as an audit record.
    Egress {
        /// The destination as the sandbox asked for it (`host:port`).
        destination: String,
        /// The address the proxy resolved and connected to (or refused), if any.
        #[serde(default)]
        address: Option<String>,
        allowed: bool,
        /// The allow rule that matched, or why it was denied.
        detail: String,
        #[serde(default)]
        bytes_up: u64,
        #[serde(default)]
        bytes_down: u64,
        #[serde(default)]
        duration_ms: u64,
    },
}

impl EventKind {
    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            EventKind::StepStarted { step } | EventKind::StepFinished { step, .. } => {
                check_name("event.step", step)
            }
            EventKind::Notice { level, text } => {
                check_name("event.level", level)?;
                check_text("event.text", text)
            }
            EventKind::Egress {
                destination,
                address,
                detail,
                ..
            } => {
                check_name("event.destination", destination)?;
                if let Some(a) = address {
                    check_name("event.address", a)?;
                }
                check_text("event.detail", detail)
            }
        }
    }
}

/// Control plane -> agent: everything up to and including `seq` for this task is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub task_id: Uuid,
    pub seq: u64,
}

/// Agent -> control plane: the chunks of an artifact are complete; verify size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub task_id: Uuid,
    pub seq: u64,
    pub kind: ChunkKind,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Lost => "lost",
        }
    }
    pub fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "succeeded" => Outcome::Succeeded,
            "failed" => Outcome::Failed,
            "cancelled" => Outcome::Cancelled,
            "timed_out" => Outcome::TimedOut,
            "lost" => Outcome::Lost,
            _ => return None,
        })
    }
}

/// What a finished task found.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    #[serde(default)]
    pub add: u64,
    #[serde(default)]
    pub change: u64,
    #[serde(default)]
    pub destroy: u64,
    /// For drift: whether real infrastructure differs from state.
    #[serde(default)]
    pub drift: Option<bool>,
    #[serde(default)]
    pub drift_addresses: Vec<String>,
    /// Whether an apply ran (plan with auto-approve, apply, destroy).
    #[serde(default)]
    pub applied: bool,
    /// Outputs after an apply, as `tofu output -json` printed them (sensitive values removed).
    #[serde(default)]
    pub outputs: Option<serde_json::Value>,
}

/// Agent -> control plane: the task ended. The last sequenced message of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    pub task_id: Uuid,
    pub seq: u64,
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub summary: Option<Summary>,
}

/// Control plane -> agent: stop this task (SIGINT to tofu, then SIGKILL after a grace period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    pub task_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    TooLarge,
    UnknownType,
    InvalidField,
    UnsupportedVersion,
    ProtocolViolation,
    Unauthorized,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Either direction: a frame was refused, or the connection is about to close and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub task_id: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateMethod {
    Get,
    Post,
    Lock,
    Unlock,
    Delete,
}

/// Agent -> control plane: a request tofu made to the task's default http backend, relayed.
/// The workspace is the task's; the agent cannot name another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRequest {
    pub task_id: Uuid,
    pub request_id: u64,
    pub method: StateMethod,
    #[serde(default)]
    pub lock_id: Option<String>,
    #[serde(default)]
    pub body_b64: Option<String>,
}

/// Control plane -> agent: the answer to a StateRequest, as an HTTP status and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateResponse {
    pub request_id: u64,
    pub status: u16,
    #[serde(default)]
    pub body_b64: Option<String>,
}

/// Agent -> control plane: a certificate signing request (PEM) for the agent's current identity,
/// sent over the live mTLS link before the certificate expires. The key never leaves the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// Control plane -> agent: the renewed certificate (PEM), issued for the identity of the
/// connection; the CA bundle too when it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    pub cert_pem: String,
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// For logs and stores: a stream name for a Log frame.
pub fn stream_name(s: LogStream) -> &'static str {
    s.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_text, encode_text};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,20}"
    }

    fn task() -> impl Strategy<Value = TaskSpec> {
        (
            any::<u128>(),
            prop_oneof![
                Just(Op::Validate),
                Just(Op::Plan),
                Just(Op::Destroy),
                Just(Op::Drift)
            ],
            name(),
            proptest::collection::btree_map(name(), ".{0,40}", 0..5),
            proptest::collection::btree_map(name(), ".{0,40}", 0..5),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(id, op, ws, vars, secrets, size, auto)| TaskSpec {
                task_id: Uuid::from_u128(id),
                op,
                workspace: ws,
                auto_approve: auto,
                vars,
                var_files: vec![],
                env: BTreeMap::new(),
                secrets: Secrets(secrets),
                archive: BlobRef {
                    size: size % limits::MAX_BLOB,
                    sha256: "a".repeat(64),
                },
                plan: None,
                timeout_secs: 30,
                egress: vec!["registry.opentofu.org:443".into()],
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                proptest::collection::vec(1u16..5, 1..4),
                name(),
                name(),
                1u32..64
            )
                .prop_map(|(versions, name, pool, slots)| Message::Hello(Hello {
                    versions,
                    agent_version: "0.1.0".into(),
                    name,
                    pool,
                    labels: BTreeMap::from([("os".into(), "linux".into())]),
                    slots,
                    tasks: vec![HeldTask {
                        task_id: Uuid::from_u128(7),
                        acked_seq: 3
                    }],
                })),
            any::<u64>().prop_map(|ts_ms| Message::Heartbeat(Heartbeat { ts_ms })),
            task().prop_map(|task| Message::Assign(Assign { task })),
            (any::<u128>(), any::<u64>()).prop_map(|(id, seq)| Message::Ack(Ack {
                task_id: Uuid::from_u128(id),
                seq
            })),
            (any::<u128>(), any::<u64>(), ".{0,100}").prop_map(|(id, seq, text)| {
                Message::Event(Event {
                    task_id: Uuid::from_u128(id),
                    seq,
                    at_ms: 1,
                    event: EventKind::Notice {
                        level: "warn".into(),
                        text,
                    },
                })
            }),
            (any::<u128>(), any::<u64>()).prop_map(|(id, seq)| Message::Done(Done {
                task_id: Uuid::from_u128(id),
                seq,
                outcome: Outcome::Succeeded,
                reason: None,
                summary: Some(Summary {
                    add: 1,
                    ..Default::default()
                }),
            })),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in message()) {
            let text = encode_text(&msg);
            prop_assert_eq!(decode_text(&text).unwrap(), msg);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = decode_text(&s);
        }
    }

    #[test]
    fn refuses_unknown_type_and_fields() {
        assert!(matches!(
            decode_text(r#"{"type":"bogus"}"#),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            decode_text(r#"{"type":"heartbeat","ts_ms":1,"extra":2}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_text("not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_text(r#"{"no":"type"}"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversized_fields() {
        let h = Message::Hello(Hello {
            versions: vec![1],
            agent_version: "x".into(),
            name: "n".repeat(limits::MAX_NAME + 1),
            pool: "p".into(),
            labels: BTreeMap::new(),
            slots: 1,
            tasks: vec![],
        });
        let err = decode_text(&encode_text(&h)).unwrap_err();
        assert!(
            matches!(err, DecodeError::InvalidField { field: "name", .. }),
            "{err}"
        );
    }

    #[test]
    fn secrets_debug_hides_values() {
        let s = Secrets(BTreeMap::from([(
            "TOKEN".into(),
            "hunter22-very-secret".into(),
        )]));
        let dbg = format!("{s:?}");
        assert!(dbg.contains("TOKEN"));
        assert!(!dbg.contains("hunter22"));
    }

    #[test]
    fn apply_requires_plan() {
        let mut t = TaskSpec {
            task_id: Uuid::nil(),
            op: Op::Apply,
            workspace: "w".into(),
            auto_approve: false,
            vars: BTreeMap::new(),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets: Secrets::default(),
            archive: BlobRef {
                size: 1,
                sha256: "0".repeat(64),
            },
            plan: None,
            timeout_secs: 0,
            egress: vec![],
        };
        assert!(t.validate().is_err());
        t.plan = Some(BlobRef {
            size: 1,
            sha256: "1".repeat(64),
        });
        assert!(t.validate().is_ok());
    }
}
