//! The byte layout of spool records and segment files, as pure functions.
//!
//! Owns: encoding a record's plaintext, framing sealed records in a segment, and parsing both
//! back with every inconsistency reported. Must never: panic on any input, return a record whose
//! seal did not verify, or hold plaintext anywhere but in memory.
//!
//! ```text
//! segment file   = record*
//! record         = length (u32, big endian) || sealed
//! sealed         = delegate-crypto sealed stream (header with key id, authenticated chunks)
//! plaintext      = version (u8 = 1) || kind (u8) || task id (16) || seq (u64, big endian) || payload
//! kind           = 1 text frame | 2 binary frame | 3 text frame that is the task's `done`
//!                | 4 journal (payload: JSON of a `TaskJournal`; seq: the last frame seq before it)
//! ```
//!
//! The task id and seq live inside the sealed plaintext, so a record moved to another task's
//! directory, swapped with another or dropped is caught by the loader (wrong task, seq gap).

use crate::tasks::WireFrame;
use bytes::Bytes;
use delegate_crypto::{CryptoError, KeyRing};
use thiserror::Error;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Version byte of a record's plaintext.
pub const RECORD_VERSION: u8 = 1;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes before the payload in a record's plaintext.
pub const PLAIN_HEADER: usize = 1 + 1 + 16 + 8;
/// Largest sealed record accepted when reading (a frame is at most 16 MiB; a journal holds one
/// task spec, well below that).
pub const MAX_SEALED_RECORD: usize = 32 * 1024 * 1024;

const KIND_TEXT: u8 = 1;
const KIND_BINARY: u8 = 2;
const KIND_DONE: u8 = 3;
const KIND_JOURNAL: u8 = 4;

/// What one record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// A sequenced message as sent on the wire. `done`: it is the task's `done` message.
    Frame {
        seq: u64,
        frame: WireFrame,
        done: bool,
    },
    /// The task's execution journal as of this point; `after_seq` is the last frame appended
    /// before it (0: none).
    Journal {
        after_seq: u64,
        json: Zeroizing<Vec<u8>>,
    },
}

/// A record's plaintext that does not parse (it authenticated, so this means a bug or a file
/// from another program version). Not retryable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record plaintext too short ({0} bytes)")]
    Short(usize),
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("a text record is not UTF-8")]
    NotUtf8,
}

/// Why a segment's bytes cannot be split into records.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SplitError {
    #[error("truncated at byte {offset}: an incomplete record (length prefix cut short)")]
    TruncatedPrefix { offset: usize },
    #[error("truncated at byte {offset}: the record announces {len} bytes, {left} remain")]
    TruncatedRecord {
        offset: usize,
        len: usize,
        left: usize,
    },
    #[error("record at byte {offset} announces {len} bytes, more than any record may hold")]
    Oversized { offset: usize, len: usize },
}

/// The plaintext of a record. Wiped when dropped: it may hold plan files and state-relevant
/// output until it is sealed.
pub fn encode_plain(task: Uuid, body: &RecordBody) -> Zeroizing<Vec<u8>> {
    let (kind, seq, payload): (u8, u64, &[u8]) = match body {
        RecordBody::Frame {
            seq,
            frame: WireFrame::Text(t),
            done,
        } => (
            if *done { KIND_DONE } else { KIND_TEXT },
            *seq,
            t.as_bytes(),
        ),
        RecordBody::Frame {
            seq,
            frame: WireFrame::Binary(b),
            ..
        } => (KIND_BINARY, *seq, b),
        RecordBody::Journal { after_seq, json } => (KIND_JOURNAL, *after_seq, json),
    };
    let mut out = Zeroizing::new(Vec::with_capacity(PLAIN_HEADER + payload.len()));
    out.push(RECORD_VERSION);
    out.push(kind);
    out.extend_from_slice(task.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parse a record's plaintext: the task it belongs to and its body.
pub fn decode_plain(plain: &[u8]) -> Result<(Uuid, RecordBody), RecordError> {
    if plain.len() < PLAIN_HEADER {
        return Err(RecordError::Short(plain.len()));
    }
    if plain[0] != RECORD_VERSION {
        return Err(RecordError::Version(plain[0]));
    }
    let kind = plain[1];
    let mut id = [0u8; 16];
    id.copy_from_slice(&plain[2..18]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&plain[18..26]);
    let seq = u64::from_be_bytes(seq);
    let payload = &plain[PLAIN_HEADER..];
    let text = || {
        std::str::from_utf8(payload)
            .map(str::to_string)
            .map_err(|_| RecordError::NotUtf8)
    };
    let body = match kind {
        KIND_TEXT | KIND_DONE => RecordBody::Frame {
            seq,
            frame: WireFrame::Text(text()?),
            done: kind == KIND_DONE,
        },
        KIND_BINARY => RecordBody::Frame {
            seq,
            frame: WireFrame::Binary(Bytes::copy_from_slice(payload)),
            done: false,
        },
        KIND_JOURNAL => RecordBody::Journal {
            after_seq: seq,
            json: Zeroizing::new(payload.to_vec()),
        },
        k => return Err(RecordError::Kind(k)),
    };
    Ok((Uuid::from_bytes(id), body))
}

/// Seal a record and frame it for a segment: length prefix, then the sealed bytes.
pub fn seal_record(ring: &KeyRing, task: Uuid, body: &RecordBody) -> Result<Vec<u8>, CryptoError> {
    let plain = encode_plain(task, body);
    frame_sealed(delegate_crypto::seal(ring, &plain)?)
}

/// Put the length prefix in front of sealed bytes.
pub fn frame_sealed(sealed: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
    let len = u32::try_from(sealed.len())
        .ok()
        .filter(|l| *l as usize <= MAX_SEALED_RECORD)
        .ok_or(CryptoError::StreamTooLong)?;
    let mut out = Vec::with_capacity(LEN_PREFIX + sealed.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The sealed records of a segment, in order, each with its byte offset; stops at the first
/// framing problem.
pub fn split_records(bytes: &[u8]) -> SplitRecords<'_> {
    SplitRecords {
        bytes,
        offset: 0,
        failed: false,
    }
}

/// Iterator of [`split_records`].
pub struct SplitRecords<'a> {
    bytes: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Iterator for SplitRecords<'a> {
    type Item = Result<(usize, &'a [u8]), SplitError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.bytes.len() {
            return None;
        }
        let offset = self.offset;
        let rest = &self.bytes[offset..];
        let fail = |s: &mut Self, e: SplitError| {
            s.failed = true;
            Some(Err(e))
        };
        if rest.len() < LEN_PREFIX {
            return fail(self, SplitError::TruncatedPrefix { offset });
        }
        let mut len = [0u8; LEN_PREFIX];
        len.copy_from_slice(&rest[..LEN_PREFIX]);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_SEALED_RECORD {
            return fail(self, SplitError::Oversized { offset, len });
        }
        let left = rest.len() - LEN_PREFIX;
        if left < len {
            return fail(self, SplitError::TruncatedRecord { offset, len, left });
        }
        self.offset = offset + LEN_PREFIX + len;
        Some(Ok((offset, &rest[LEN_PREFIX..LEN_PREFIX + len])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> KeyRing {
        KeyRing::from_key("t1", &[9u8; 32]).unwrap()
    }

    #[test]
    fn plaintext_round_trips() {
        let task = Uuid::from_u128(7);
        for body in [
            RecordBody::Frame {
                seq: 3,
                frame: WireFrame::Text("{\"type\":\"event\"}".into()),
                done: false,
            },
            RecordBody::Frame {
                seq: 4,
                frame: WireFrame::Text("{\"type\":\"done\"}".into()),
                done: true,
            },
            RecordBody::Frame {
                seq: u64::MAX,
                frame: WireFrame::Binary(Bytes::from_static(b"\xd1\x01\x00")),
                done: false,
            },
            RecordBody::Journal {
                after_seq: 9,
                json: Zeroizing::new(b"{}".to_vec()),
            },
        ] {
            let plain = encode_plain(task, &body);
            assert_eq!(decode_plain(&plain), Ok((task, body)));
        }
    }

    #[test]
    fn bad_plaintext_is_an_error() {
        assert_eq!(decode_plain(b"\x01\x01"), Err(RecordError::Short(2)));
        let mut p = encode_plain(
            Uuid::nil(),
            &RecordBody::Journal {
                after_seq: 0,
                json: Zeroizing::new(vec![]),
            },
        )
        .to_vec();
        p[0] = 2;
        assert_eq!(decode_plain(&p), Err(RecordError::Version(2)));
        p[0] = 1;
        p[1] = 9;
        assert_eq!(decode_plain(&p), Err(RecordError::Kind(9)));
        p[1] = KIND_TEXT;
        p.push(0xff);
        assert_eq!(decode_plain(&p), Err(RecordError::NotUtf8));
    }

    #[test]
    fn sealed_records_split_and_open() {
        let r = ring();
        let task = Uuid::from_u128(1);
        let mut seg = Vec::new();
        for seq in 1..=3 {
            seg.extend(
                seal_record(
                    &r,
                    task,
                    &RecordBody::Frame {
                        seq,
                        frame: WireFrame::Text(format!("m{seq}")),
                        done: false,
                    },
                )
                .unwrap(),
            );
        }
        let parts: Vec<_> = split_records(&seg).collect::<Result<_, _>>().unwrap();
        assert_eq!(parts.len(), 3);
        for (i, (_, sealed)) in parts.into_iter().enumerate() {
            let plain = delegate_crypto::open(&r, sealed).unwrap();
            let (t, body) = decode_plain(&plain).unwrap();
            assert_eq!(t, task);
            assert!(matches!(body, RecordBody::Frame { seq, .. } if seq == i as u64 + 1));
        }
        // Cut anywhere inside the last record: the split reports it.
        for cut in 1..40 {
            let short = &seg[..seg.len() - cut];
            let last = split_records(short).last().unwrap();
            assert!(last.is_err(), "cut {cut}");
        }
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut seg = (u32::MAX).to_be_bytes().to_vec();
        seg.extend_from_slice(b"x");
        assert_eq!(
            split_records(&seg).next(),
            Some(Err(SplitError::Oversized {
                offset: 0,
                len: u32::MAX as usize
            }))
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the splitter, and it never yields bytes out of range.
        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut total = 0;
            for part in split_records(&bytes) {
                match part {
                    Ok((off, rec)) => {
                        prop_assert!(off + LEN_PREFIX + rec.len() <= bytes.len());
                        total += LEN_PREFIX + rec.len();
                    }
                    Err(_) => break,
                }
            }
            prop_assert!(total <= bytes.len());
            let _ = decode_plain(&bytes);
        }
    }
}
