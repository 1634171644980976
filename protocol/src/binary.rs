//! Binary frames: bulk bytes (log output, artifact and input chunks) with a fixed 28-byte header,
//! so the hot path never base64-encodes.
//!
//! ```text
//! offset size field
//! 0      1    magic 0xD1
//! 1      1    kind: 1 = log, 2 = chunk
//! 2      1    log: stream (0 stdout, 1 stderr, 2 system); chunk: chunk kind (see ChunkKind)
//! 3      1    flags: chunk bit 0 = last chunk of its blob; other bits must be zero
//! 4      16   task id (UUID bytes)
//! 20     8    sequence number, big endian
//! 28     ..   payload (at most MAX_BINARY_PAYLOAD bytes)
//! ```

use crate::{limits, DecodeError};
use uuid::Uuid;

pub const MAGIC: u8 = 0xD1;
pub const HEADER_LEN: usize = 28;
const KIND_LOG: u8 = 1;
const KIND_CHUNK: u8 = 2;
const FLAG_LAST: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines written by the agent itself into the task's log (step banners, notices).
    System,
}

impl LogStream {
    fn to_byte(self) -> u8 {
        match self {
            LogStream::Stdout => 0,
            LogStream::Stderr => 1,
            LogStream::System => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => LogStream::Stdout,
            1 => LogStream::Stderr,
            2 => LogStream::System,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
}

/// What a chunk belongs to. Workspace and Plan flow control plane -> agent (inputs);
/// the others flow agent -> control plane (artifacts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkKind {
    /// Input: the workspace archive (tar.gz).
    Workspace,
    /// Input for apply, or artifact from plan: the binary plan file.
    Plan,
    /// Artifact: `tofu show -json` of the plan.
    PlanJson,
}

impl ChunkKind {
    fn to_byte(self) -> u8 {
        match self {
            ChunkKind::Workspace => 1,
            ChunkKind::Plan => 2,
            ChunkKind::PlanJson => 3,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => ChunkKind::Workspace,
            2 => ChunkKind::Plan,
            3 => ChunkKind::PlanJson,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkKind::Workspace => "workspace",
            ChunkKind::Plan => "plan",
            ChunkKind::PlanJson => "plan_json",
        }
    }
}

/// Output of a task, as produced. `seq` is the task's outbound sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFrame {
    pub task_id: Uuid,
    pub seq: u64,
    pub stream: LogStream,
    pub data: Vec<u8>,
}

/// A piece of a blob. Agent -> control plane: `seq` is the task's outbound sequence number.
/// Control plane -> agent: `seq` is the chunk index within the blob, from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFrame {
    pub task_id: Uuid,
    pub seq: u64,
    pub kind: ChunkKind,
    pub last: bool,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryFrame {
    Log(LogFrame),
    Chunk(ChunkFrame),
}

impl BinaryFrame {
    pub fn task_id(&self) -> Uuid {
        match self {
            BinaryFrame::Log(f) => f.task_id,
            BinaryFrame::Chunk(f) => f.task_id,
        }
    }
    pub fn seq(&self) -> u64 {
        match self {
            BinaryFrame::Log(f) => f.seq,
            BinaryFrame::Chunk(f) => f.seq,
        }
    }
}

fn header(out: &mut Vec<u8>, kind: u8, sub: u8, flags: u8, task: &Uuid, seq: u64) {
    out.push(MAGIC);
    out.push(kind);
    out.push(sub);
    out.push(flags);
    out.extend_from_slice(task.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
}

pub fn encode(frame: &BinaryFrame) -> Vec<u8> {
    match frame {
        BinaryFrame::Log(f) => encode_log(&f.task_id, f.seq, f.stream, &f.data),
        BinaryFrame::Chunk(f) => {
            let mut out = Vec::with_capacity(HEADER_LEN + f.data.len());
            let flags = if f.last { FLAG_LAST } else { 0 };
            header(
                &mut out,
                KIND_CHUNK,
                f.kind.to_byte(),
                flags,
                &f.task_id,
                f.seq,
            );
            out.extend_from_slice(&f.data);
            out
        }
    }
}

/// Encode a log frame without first building a [`LogFrame`] (avoids a copy on the hot path).
pub fn encode_log(task_id: &Uuid, seq: u64, stream: LogStream, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    header(&mut out, KIND_LOG, stream.to_byte(), 0, task_id, seq);
    out.extend_from_slice(data);
    out
}

pub fn decode(bytes: &[u8]) -> Result<BinaryFrame, DecodeError> {
    if bytes.len() > HEADER_LEN + limits::MAX_BINARY_PAYLOAD {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: HEADER_LEN + limits::MAX_BINARY_PAYLOAD,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Malformed(format!(
            "binary frame of {} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != MAGIC {
        return Err(DecodeError::Malformed(format!(
            "bad magic byte 0x{:02x} (expected 0x{MAGIC:02x})",
            bytes[0]
        )));
    }
    let (kind, sub, flags) = (bytes[1], bytes[2], bytes[3]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[4..20]);
    let task_id = Uuid::from_bytes(id);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[20..28]);
    let seq = u64::from_be_bytes(seq);
    let data = bytes[HEADER_LEN..].to_vec();
    match kind {
        KIND_LOG => {
            if flags != 0 {
                return Err(DecodeError::InvalidField {
                    field: "flags",
                    reason: format!("log frames carry no flags, got 0x{flags:02x}"),
                });
            }
            let stream = LogStream::from_byte(sub).ok_or(DecodeError::InvalidField {
                field: "stream",
                reason: format!("unknown log stream {sub}"),
            })?;
            Ok(BinaryFrame::Log(LogFrame {
                task_id,
                seq,
                stream,
                data,
            }))
        }
        KIND_CHUNK => {
            if flags & !FLAG_LAST != 0 {
                return Err(DecodeError::InvalidField {
                    field: "flags",
                    reason: format!("unknown chunk flags 0x{flags:02x}"),
                });
            }
            let kind = ChunkKind::from_byte(sub).ok_or(DecodeError::InvalidField {
                field: "chunk_kind",
                reason: format!("unknown chunk kind {sub}"),
            })?;
            Ok(BinaryFrame::Chunk(ChunkFrame {
                task_id,
                seq,
                kind,
                last: flags & FLAG_LAST != 0,
                data,
            }))
        }
        other => Err(DecodeError::UnknownType(format!("binary kind {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream() -> impl Strategy<Value = LogStream> {
        prop_oneof![
            Just(LogStream::Stdout),
            Just(LogStream::Stderr),
            Just(LogStream::System)
        ]
    }
    fn chunk_kind() -> impl Strategy<Value = ChunkKind> {
        prop_oneof![
            Just(ChunkKind::Workspace),
            Just(ChunkKind::Plan),
            Just(ChunkKind::PlanJson)
        ]
    }

    proptest! {
        #[test]
        fn log_round_trip(id in any::<u128>(), seq in any::<u64>(), s in stream(),
                          data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let f = BinaryFrame::Log(LogFrame { task_id: Uuid::from_u128(id), seq, stream: s, data });
            prop_assert_eq!(decode(&encode(&f)).unwrap(), f);
        }

        #[test]
        fn chunk_round_trip(id in any::<u128>(), seq in any::<u64>(), k in chunk_kind(), last in any::<bool>(),
                            data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let f = BinaryFrame::Chunk(ChunkFrame { task_id: Uuid::from_u128(id), seq, kind: k, last, data });
            prop_assert_eq!(decode(&encode(&f)).unwrap(), f);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
        }
    }

    #[test]
    fn rejects_short_oversized_and_unknown() {
        assert!(matches!(
            decode(&[MAGIC, 1]),
            Err(DecodeError::Malformed(_))
        ));
        let big = vec![0u8; HEADER_LEN + limits::MAX_BINARY_PAYLOAD + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLarge { .. })));
        let mut f = encode_log(&Uuid::nil(), 1, LogStream::Stdout, b"x");
        f[1] = 9;
        assert!(matches!(decode(&f), Err(DecodeError::UnknownType(_))));
        f[1] = KIND_LOG;
        f[2] = 7;
        assert!(matches!(
            decode(&f),
            Err(DecodeError::InvalidField {
                field: "stream",
                ..
            })
        ));
        f[0] = 0;
        assert!(matches!(decode(&f), Err(DecodeError::Malformed(_))));
    }
}
