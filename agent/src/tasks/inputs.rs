//! Assembling a task's inputs from the control plane's chunk frames and verifying them.
//!
//! The workspace archive arrives as `workspace` chunks, then (for an apply) the approved plan as
//! `plan` chunks; a chunk's `seq` is its index within the blob, from 0, and the last carries the
//! `last` flag. Each blob's size and SHA-256 must equal the Assign's `BlobRef`. A plan whose hash
//! differs never reaches the executor.
//!
//! Pure: no I/O, memory bounded by the announced sizes.

use delegate_protocol::{BlobRef, ChunkFrame, ChunkKind, TaskSpec};
use ring::digest;
use thiserror::Error;

/// Why a task's inputs were refused. Not retryable: the task fails with this as its reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InputError {
    #[error("expected a {expected} chunk, got a {got} chunk")]
    WrongKind {
        expected: &'static str,
        got: &'static str,
    },
    #[error("{kind} chunk {got} arrived out of order (expected chunk {expected})")]
    OutOfOrder {
        kind: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("{kind} is larger than the {expected} bytes announced")]
    TooLarge { kind: &'static str, expected: u64 },
    #[error("{kind} size mismatch: announced {expected} bytes, received {got}")]
    SizeMismatch {
        kind: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("{kind} sha256 mismatch: expected {expected}, received {got}; refusing to run it")]
    HashMismatch {
        kind: &'static str,
        expected: String,
        got: String,
    },
    #[error("unexpected {kind} chunk: all inputs were already received")]
    AfterEnd { kind: &'static str },
}

fn kind_name(k: ChunkKind) -> &'static str {
    match k {
        ChunkKind::Workspace => "workspace archive",
        ChunkKind::Plan => "plan",
        ChunkKind::PlanJson => "plan JSON",
    }
}

/// Preallocate at most this much for a blob; larger blobs grow as chunks arrive.
const PREALLOC_LIMIT: u64 = 16 * 1024 * 1024;

/// One blob being received.
pub struct BlobAssembly {
    kind: ChunkKind,
    expected: BlobRef,
    next_index: u64,
    data: Vec<u8>,
    hasher: digest::Context,
}

impl BlobAssembly {
    pub fn new(kind: ChunkKind, expected: BlobRef) -> Self {
        BlobAssembly {
            kind,
            next_index: 0,
            data: Vec::with_capacity(expected.size.min(PREALLOC_LIMIT) as usize),
            expected,
            hasher: digest::Context::new(&digest::SHA256),
        }
    }

    /// Take one chunk. Returns `Ok(true)` once the last chunk arrived and the blob verified.
    pub fn push(&mut self, chunk: &ChunkFrame) -> Result<bool, InputError> {
        let kind = kind_name(self.kind);
        if chunk.kind != self.kind {
            return Err(InputError::WrongKind {
                expected: kind,
                got: kind_name(chunk.kind),
            });
        }
        if chunk.seq != self.next_index {
            return Err(InputError::OutOfOrder {
                kind,
                expected: self.next_index,
                got: chunk.seq,
            });
        }
        let new_len = self.data.len() as u64 + chunk.data.len() as u64;
        if new_len > self.expected.size {
            return Err(InputError::TooLarge {
                kind,
                expected: self.expected.size,
            });
        }
        self.data.extend_from_slice(&chunk.data);
        self.hasher.update(&chunk.data);
        self.next_index += 1;
        if !chunk.last {
            return Ok(false);
        }
        if new_len != self.expected.size {
            return Err(InputError::SizeMismatch {
                kind,
                expected: self.expected.size,
                got: new_len,
            });
        }
        let got = hex::encode(self.hasher.clone().finish().as_ref());
        if got != self.expected.sha256 {
            return Err(InputError::HashMismatch {
                kind,
                expected: self.expected.sha256.clone(),
                got,
            });
        }
        Ok(true)
    }

    fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// What the assembly has after a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    Complete {
        archive: Vec<u8>,
        plan: Option<Vec<u8>>,
    },
}

/// The inputs of one task: the workspace archive, then the plan if the task carries one.
pub struct InputAssembly {
    current: Option<BlobAssembly>,
    archive: Option<Vec<u8>>,
    plan: Option<BlobRef>,
}

impl InputAssembly {
    pub fn new(spec: &TaskSpec) -> Self {
        InputAssembly {
            current: Some(BlobAssembly::new(
                ChunkKind::Workspace,
                spec.archive.clone(),
            )),
            archive: None,
            plan: spec.plan.clone(),
        }
    }

    pub fn push(&mut self, chunk: &ChunkFrame) -> Result<Progress, InputError> {
        let Some(current) = self.current.as_mut() else {
            return Err(InputError::AfterEnd {
                kind: kind_name(chunk.kind),
            });
        };
        if !current.push(chunk)? {
            return Ok(Progress::NeedMore);
        }
        let done = self.current.take().map(BlobAssembly::into_data);
        match (self.archive.take(), done) {
            (None, Some(archive)) => match self.plan.take() {
                Some(plan) => {
                    self.archive = Some(archive);
                    self.current = Some(BlobAssembly::new(ChunkKind::Plan, plan));
                    Ok(Progress::NeedMore)
                }
                None => Ok(Progress::Complete {
                    archive,
                    plan: None,
                }),
            },
            (Some(archive), plan) => Ok(Progress::Complete { archive, plan }),
            (None, None) => Err(InputError::AfterEnd {
                kind: kind_name(chunk.kind),
            }),
        }
    }
}

/// SHA-256 in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::{Op, Secrets};
    use std::collections::BTreeMap;
    use uuid::Uuid;

    fn blob(data: &[u8]) -> BlobRef {
        BlobRef {
            size: data.len() as u64,
            sha256: sha256_hex(data),
        }
    }

    fn spec(archive: &[u8], plan: Option<BlobRef>) -> TaskSpec {
        TaskSpec {
            task_id: Uuid::nil(),
            op: if plan.is_some() { Op::Apply } else { Op::Plan },
            workspace: "w".into(),
            auto_approve: false,
            vars: BTreeMap::new(),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets: Secrets::default(),
            archive: blob(archive),
            plan,
            timeout_secs: 0,
            egress: vec![],
        }
    }

    fn chunks(kind: ChunkKind, data: &[u8], size: usize) -> Vec<ChunkFrame> {
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(size).collect()
        };
        let n = pieces.len();
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, p)| ChunkFrame {
                task_id: Uuid::nil(),
                seq: i as u64,
                kind,
                last: i + 1 == n,
                data: p.to_vec(),
            })
            .collect()
    }

    fn feed(a: &mut InputAssembly, frames: &[ChunkFrame]) -> Result<Progress, InputError> {
        let mut last = Progress::NeedMore;
        for f in frames {
            last = a.push(f)?;
        }
        Ok(last)
    }

    #[test]
    fn archive_only() {
        let data = b"0123456789abcdef".repeat(10);
        let mut a = InputAssembly::new(&spec(&data, None));
        let p = feed(&mut a, &chunks(ChunkKind::Workspace, &data, 7)).unwrap();
        assert_eq!(
            p,
            Progress::Complete {
                archive: data,
                plan: None
            }
        );
        assert!(matches!(
            a.push(&chunks(ChunkKind::Workspace, b"x", 1)[0]),
            Err(InputError::AfterEnd { .. })
        ));
    }

    #[test]
    fn empty_archive_is_one_last_chunk() {
        let mut a = InputAssembly::new(&spec(b"", None));
        let p = feed(&mut a, &chunks(ChunkKind::Workspace, b"", 4)).unwrap();
        assert_eq!(
            p,
            Progress::Complete {
                archive: vec![],
                plan: None
            }
        );
    }

    #[test]
    fn archive_then_plan() {
        let archive = b"archive bytes".to_vec();
        let plan = b"plan bytes, approved".to_vec();
        let mut a = InputAssembly::new(&spec(&archive, Some(blob(&plan))));
        assert_eq!(
            feed(&mut a, &chunks(ChunkKind::Workspace, &archive, 5)).unwrap(),
            Progress::NeedMore
        );
        let p = feed(&mut a, &chunks(ChunkKind::Plan, &plan, 3)).unwrap();
        assert_eq!(
            p,
            Progress::Complete {
                archive,
                plan: Some(plan)
            }
        );
    }

    #[test]
    fn plan_with_another_hash_is_refused() {
        let archive = b"archive".to_vec();
        let approved = b"the approved plan".to_vec();
        let tampered = b"the tampered plan".to_vec(); // same length, other bytes
        let mut a = InputAssembly::new(&spec(&archive, Some(blob(&approved))));
        feed(&mut a, &chunks(ChunkKind::Workspace, &archive, 100)).unwrap();
        let e = feed(&mut a, &chunks(ChunkKind::Plan, &tampered, 4)).unwrap_err();
        match &e {
            InputError::HashMismatch {
                kind,
                expected,
                got,
            } => {
                assert_eq!(*kind, "plan");
                assert_eq!(expected, &sha256_hex(&approved));
                assert_eq!(got, &sha256_hex(&tampered));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("refusing"), "{e}");
    }

    #[test]
    fn size_errors() {
        let data = b"12345678".to_vec();
        let mut a = InputAssembly::new(&spec(&data, None));
        let mut longer = data.clone();
        longer.push(b'9');
        assert!(matches!(
            feed(&mut a, &chunks(ChunkKind::Workspace, &longer, 3)),
            Err(InputError::TooLarge { .. })
        ));
        let mut a = InputAssembly::new(&spec(&data, None));
        assert!(matches!(
            feed(&mut a, &chunks(ChunkKind::Workspace, &data[..7], 3)),
            Err(InputError::SizeMismatch {
                expected: 8,
                got: 7,
                ..
            })
        ));
    }

    #[test]
    fn order_and_kind_errors() {
        let data = b"12345678".to_vec();
        let frames = chunks(ChunkKind::Workspace, &data, 3);
        let mut a = InputAssembly::new(&spec(&data, None));
        a.push(&frames[0]).unwrap();
        assert!(matches!(
            a.push(&frames[2]),
            Err(InputError::OutOfOrder {
                expected: 1,
                got: 2,
                ..
            })
        ));
        let mut a = InputAssembly::new(&spec(&data, None));
        assert!(matches!(
            a.push(&chunks(ChunkKind::Plan, &data, 3)[0]),
            Err(InputError::WrongKind { .. })
        ));
    }
}
