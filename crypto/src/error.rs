//! The one error type of `delegate-crypto`.
//!
//! Owns the vocabulary for "why could this not be sealed or opened". Must never carry key bytes,
//! plaintext, or the value of an environment-variable key: every message here may reach a log.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What a sealed stream failed. Every variant means the bytes are wrong (or the key is missing):
/// retrying the same input will fail the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntegrityFailure {
    /// The first bytes are not `DLGS`: not a sealed file at all.
    BadMagic,
    /// A format version this build does not know.
    UnsupportedVersion(u8),
    /// A header field is out of range (key id length, key id characters, chunk size).
    MalformedHeader(&'static str),
    /// The header names a key id the key ring does not hold.
    UnknownKeyId(String),
    /// The header tag did not verify: the header was altered, or the key with this id is not the
    /// one the file was sealed with.
    HeaderAuthentication,
    /// The input ended inside the header.
    TruncatedHeader,
    /// The input ended after `chunks` complete, authentic, non-final chunks: the final chunk (and
    /// maybe more) is missing.
    Truncated {
        /// How many chunks were read and verified before the input ended.
        chunks: u64,
    },
    /// Chunk `index` (0-based) failed authentication: it was altered, cut short, moved, or a chunk
    /// before it was dropped.
    Chunk {
        /// 0-based index of the chunk that failed.
        index: u64,
    },
}

impl fmt::Display for IntegrityFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic (not a Delegate sealed file)"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            Self::MalformedHeader(what) => write!(f, "malformed header: {what}"),
            Self::UnknownKeyId(id) => write!(f, "unknown key id {id:?}"),
            Self::HeaderAuthentication => {
                f.write_str("header authentication failed (header tampered or wrong key)")
            }
            Self::TruncatedHeader => f.write_str("truncated inside the header"),
            Self::Truncated { chunks } => {
                write!(f, "truncated after chunk {chunks} of data: final chunk missing")
            }
            Self::Chunk { index } => write!(
                f,
                "chunk {index} failed authentication (tampered, truncated, reordered or dropped chunk)"
            ),
        }
    }
}

/// Errors of `delegate-crypto`. [`CryptoError::is_retryable`] says which ones may succeed later.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Sealed data failed verification. Never retryable.
    #[error("integrity error{}: {failure}", in_file(.file))]
    Integrity {
        /// The file, when the caller named it.
        file: Option<PathBuf>,
        /// What failed.
        failure: IntegrityFailure,
    },
    /// Reading or writing failed. Retryable when the underlying cause is transient.
    #[error("{op}{}: {source}", in_file(.path))]
    Io {
        /// What was being done ("read sealed data", "rename temp file", ...).
        op: &'static str,
        /// The file involved, when known.
        path: Option<PathBuf>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key file is unusable (permissions, size, encoding, name). Not retryable until an operator
    /// fixes the file.
    #[error("key file {}: {problem}", .path.display())]
    KeyFile {
        /// The key file (or the `current` file).
        path: PathBuf,
        /// What is wrong, never including key bytes.
        problem: String,
    },
    /// The key directory and environment key do not form a usable key ring.
    #[error("key ring: {0}")]
    KeyRing(String),
    /// The environment-variable key is malformed. The message never includes its value.
    #[error("environment key: {0}")]
    EnvKey(&'static str),
    /// A key id is not 1..=64 bytes of `[A-Za-z0-9._-]` not starting with `.`.
    #[error("invalid key id {0:?}: must be 1 to 64 characters of A-Z a-z 0-9 . _ - and not start with '.'")]
    InvalidKeyId(String),
    /// The requested chunk size is outside `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    #[error("invalid chunk size {0}")]
    InvalidChunkSize(usize),
    /// More than 2^32 chunks were written to one sealed stream.
    #[error("sealed stream too long (more than 2^32 chunks)")]
    StreamTooLong,
    /// The stream was used again after an earlier error.
    #[error("sealed stream{}: a previous error makes it unusable", in_file(.0))]
    Poisoned(Option<PathBuf>),
    /// The operating system's random generator failed. Retryable.
    #[error("the system random number generator failed")]
    Rng,
}

impl CryptoError {
    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::OutOfMemory
            ),
            Self::Rng => true,
            _ => false,
        }
    }

    /// The integrity failure, if this is one.
    pub fn integrity_failure(&self) -> Option<&IntegrityFailure> {
        match self {
            Self::Integrity { failure, .. } => Some(failure),
            _ => None,
        }
    }

    /// Recovers a `CryptoError` that went through [`std::io::Read`] / [`std::io::Write`] (which
    /// wrap it in an `io::Error`); any other `io::Error` becomes [`CryptoError::Io`].
    pub fn from_io(err: io::Error, op: &'static str, path: Option<&Path>) -> CryptoError {
        if err.get_ref().is_some_and(|e| e.is::<CryptoError>()) {
            return match err
                .into_inner()
                .map(|inner| inner.downcast::<CryptoError>())
            {
                Some(Ok(inner)) => *inner,
                _ => CryptoError::Poisoned(path.map(Path::to_path_buf)),
            };
        }
        CryptoError::Io {
            op,
            path: path.map(Path::to_path_buf),
            source: err,
        }
    }

    pub(crate) fn integrity(file: Option<&Path>, failure: IntegrityFailure) -> Self {
        Self::Integrity {
            file: file.map(Path::to_path_buf),
            failure,
        }
    }

    pub(crate) fn io(op: &'static str, path: Option<&Path>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.map(Path::to_path_buf),
            source,
        }
    }

    pub(crate) fn with_file_if_missing(self, path: &Path) -> Self {
        match self {
            Self::Integrity {
                file: None,
                failure,
            } => Self::Integrity {
                file: Some(path.to_path_buf()),
                failure,
            },
            Self::Io {
                op,
                path: None,
                source,
            } => Self::Io {
                op,
                path: Some(path.to_path_buf()),
                source,
            },
            Self::Poisoned(None) => Self::Poisoned(Some(path.to_path_buf())),
            other => other,
        }
    }
}

impl From<CryptoError> for io::Error {
    fn from(err: CryptoError) -> io::Error {
        match err {
            CryptoError::Io {
                source,
                op: _,
                path: None,
            } => source,
            other => {
                let kind = match &other {
                    CryptoError::Integrity { .. } => io::ErrorKind::InvalidData,
                    _ => io::ErrorKind::Other,
                };
                io::Error::new(kind, other)
            }
        }
    }
}

fn in_file(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

pub(crate) type Result<T, E = CryptoError> = std::result::Result<T, E>;
