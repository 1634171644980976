//! Limits a receiver enforces. Both sides use the same numbers; PROTOCOL.md lists them.

/// Largest WebSocket message either side accepts (text or binary), before any parsing.
pub const MAX_WS_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest text (JSON control) frame. Large because state bodies travel base64-encoded.
pub const MAX_TEXT_FRAME: usize = 16 * 1024 * 1024;
/// Largest text frame for any message other than state relay messages.
pub const MAX_CONTROL_FRAME: usize = 1024 * 1024;
/// Largest payload of one binary frame (a log chunk or an artifact/input chunk).
pub const MAX_BINARY_PAYLOAD: usize = 1024 * 1024;
/// Largest decoded state body relayed over the link.
pub const MAX_STATE_BYTES: usize = 8 * 1024 * 1024;
/// Names: agent names, pools, workspaces, label keys, variable names, steps.
pub const MAX_NAME: usize = 256;
/// Free-text fields: reasons, messages, label values.
pub const MAX_TEXT: usize = 8 * 1024;
/// A single variable, env or secret value.
pub const MAX_VALUE: usize = 256 * 1024;
/// Entries in any map or list (labels, vars, env, secrets, held tasks, egress, addresses).
pub const MAX_ENTRIES: usize = 1024;
/// Size of an input blob (workspace archive, plan file) announced in Assign.
pub const MAX_BLOB: u64 = 1024 * 1024 * 1024;
/// Shortest secret accepted at submit: shorter values would redact ordinary words out of logs.
/// The agent's redactor refuses the same (`delegate_agent::redact::MIN_SECRET_LEN`).
pub const MIN_SECRET_LEN: usize = 4;
/// Longest secret accepted at submit and by `secrets set`, in bytes: the agent's redactor holds
/// back that much of each output stream, so it refuses longer secrets
/// (`delegate_agent::redact::MAX_SECRET_LEN` is this constant). Smaller than [`MAX_VALUE`].
pub const MAX_SECRET_LEN: usize = 8 * 1024;
const _: () = assert!(MIN_SECRET_LEN <= MAX_SECRET_LEN && MAX_SECRET_LEN <= MAX_VALUE);
