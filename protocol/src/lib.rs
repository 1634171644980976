//! Delegate wire protocol, version 1.
//!
//! This crate owns the shape of every message exchanged between an agent and a control plane, the
//! binary framing of bulk bytes, the limits a peer enforces on what it receives, and version
//! negotiation. It is described for humans in `PROTOCOL.md` beside this file; the two must agree
//! (a test round-trips every example in that document).
//!
//! It must never perform I/O, allocate without a bound derived from [`limits`], or panic on any input:
//! every decoder returns a [`DecodeError`] that names what was wrong. The connection types that own
//! sockets live in the agent and control plane crates.

pub mod binary;
pub mod limits;
pub mod logging;
pub mod messages;
pub mod version;

pub use binary::{BinaryFrame, ChunkFrame, ChunkKind, LogFrame, LogStream};
pub use messages::*;
pub use version::{negotiate, VersionError, SUPPORTED_VERSIONS};

use thiserror::Error;

/// Why a received frame was refused. Each variant maps to an [`ErrorCode`] sent back to the peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("field {field} is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl DecodeError {
    /// The error code a peer sends back when it refuses this frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::Malformed(_) => ErrorCode::Malformed,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::InvalidField { .. } => ErrorCode::InvalidField,
        }
    }
}

/// A decoded WebSocket frame: control messages travel as JSON text, bulk bytes as binary.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Control(Message),
    Binary(BinaryFrame),
}

/// Decode a text (JSON) frame into a control message, enforcing the text-frame and field limits.
pub fn decode_text(text: &str) -> Result<Message, DecodeError> {
    if text.len() > limits::MAX_TEXT_FRAME {
        return Err(DecodeError::TooLarge {
            size: text.len(),
            limit: limits::MAX_TEXT_FRAME,
        });
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let ty = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| DecodeError::Malformed("missing string field \"type\"".into()))?;
    if !messages::KNOWN_TYPES.contains(&ty) {
        return Err(DecodeError::UnknownType(truncate(ty, 64)));
    }
    if !ty.starts_with("state_") && text.len() > limits::MAX_CONTROL_FRAME {
        return Err(DecodeError::TooLarge {
            size: text.len(),
            limit: limits::MAX_CONTROL_FRAME,
        });
    }
    let msg: Message =
        serde_json::from_value(value).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

/// Encode a control message as the JSON text of a text frame.
pub fn encode_text(msg: &Message) -> String {
    // Serialising these plain data types cannot fail: no maps with non-string keys, no floats.
    serde_json::to_string(msg).unwrap_or_else(|e| {
        format!("{{\"type\":\"error\",\"code\":\"internal\",\"message\":\"encode failed: {e}\"}}")
    })
}

/// Decode a binary frame, enforcing the binary-frame limit.
pub fn decode_binary(bytes: &[u8]) -> Result<BinaryFrame, DecodeError> {
    binary::decode(bytes)
}

/// Encode a binary frame.
pub fn encode_binary(frame: &BinaryFrame) -> Vec<u8> {
    binary::encode(frame)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
