//! The encrypted on-disk spool: every sequenced message the agent sends about a task (log, event,
//! artifact chunk, artifact, done) and the task's execution journal, sealed with AES-256-GCM
//! (`delegate-crypto`) and appended before the message is handed to the link; removed once the
//! control plane acknowledged it. After a restart the agent reloads it, lists the tasks in Hello
//! and resends from Welcome's resume points.
//!
//! Owns: the files under `data_dir/spool/`, the byte bound (`[spool] max_bytes`), the order and
//! continuity checks when loading, and the spool lock. Must never: write plaintext to disk (not
//! even a temp file: every byte written is a length prefix or sealed ciphertext), hold a task
//! secret (the link side never gives it one), let a damaged task's files stop another task from
//! loading, panic on any file content, or delete a record the control plane has not acknowledged.
//!
//! # On-disk layout
//!
//! ```text
//! data_dir/keys/            0700   <id>.key (32 bytes, 0600), `current`   (see delegate-crypto)
//! data_dir/spool/           0700
//!   lock                           flock held by the running agent (and by `delegate keys reseal`)
//!   <task uuid>/            0700   one directory per task the agent holds
//!     <first seq, 20 digits>.seg   0600 segment: framed sealed records, append only
//!   quarantine/<task>-<ms>/        a task directory that failed its integrity check, kept for
//!                                  the operator (still sealed); never read again
//! ```
//! A segment's name is the seq of the first frame it may hold. It is a run of records
//! ([`record`]): a 4-byte length, then one sealed stream per record, whose plaintext carries the
//! task id, the seq and the frame bytes as sent on the wire (or the journal). Every segment of a
//! task that has a journal starts with a copy of the latest journal, so older segments can go.
//!
//! * **Append**: a batch of records is sealed in memory and written with one `write` on an
//!   `O_APPEND` descriptor. Frames are not fsynced (a killed process loses nothing that reached
//!   the page cache); a batch holding a journal record is `fdatasync`ed before the caller goes on.
//!   An artifact (all its chunks, its `artifact` message and the journal noting it) is one batch,
//!   so after a crash it is in the spool whole or not at all.
//! * **Roll**: when the active segment reaches `segment_bytes`, the next append opens a new one.
//! * **Compaction**: on each ack, every non-active segment whose last frame is acknowledged is
//!   deleted; a fully acknowledged active segment is replaced by a fresh one (holding only the
//!   journal) once it holds a quarter of a segment (at least 64 KiB; 1 MiB with the default
//!   segments), or at once while appends wait for space. When the
//!   task's `done` is acknowledged its directory is deleted.
//! * **Bound**: `max_bytes` counts the bytes of all segment files. While the spool is at or over
//!   it, appends wait (the task's driver stops reading the executor's bounded channel, so the
//!   step's log reader stops reading Docker and tofu blocks on its pipe). A batch may overshoot
//!   the bound by its own size (at most one artifact); an empty spool always accepts a batch.
//! * **Load** (start): every task directory is read and each record opened; a record that fails
//!   authentication, a torn or missing record, a seq gap, a record of another task or a missing
//!   segment makes that task *broken*: its directory moves to `quarantine/`, the error (naming
//!   the file) becomes the reason of a `lost` outcome, and the other tasks load normally. A torn
//!   last record after a crash during a write is indistinguishable from truncation and is
//!   treated the same way (rare: records are single writes).
//!
//! Known limits: frames are also held in memory until acknowledged (the outbox), so memory use
//! follows the spool's size; a whole segment, or a whole task's acknowledged tail of a quarter segment, may
//! stay on disk until the next ack. Cutting a task's newest segment exactly at a record boundary
//! (dropping its last records), or rolling a file back to an older authentic version, cannot be
//! told from records never written: the format has no outside reference to compare with (see
//! delegate-crypto). What such a cut can hide is bounded: journal records are fsynced, so the
//! execution journal never goes back past a step the sandbox acted on, and records the control
//! plane already acknowledged come back in its resume point (the agent then numbers on from
//! there, [`TaskSpool::reset_at`]). Frames are not fsynced: after a power loss the last ones may
//! be missing or torn (a torn one makes the task `lost`).

pub mod journal;
pub mod keys;
pub mod record;

use crate::tasks::WireFrame;
use delegate_crypto::{CryptoError, KeyRing};
use journal::TaskJournal;
use record::RecordBody;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Default of `[spool] max_bytes`.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Smallest `max_bytes` accepted: room for a few largest records.
pub const MIN_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Size at which a segment is closed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// A fully acknowledged active segment at least this large (and a quarter of `segment_bytes`) is
/// replaced at the next ack.
pub const ROLL_ACKED_BYTES: u64 = 64 * 1024;
/// Name of the spool lock file.
pub const LOCK_FILE: &str = "lock";
/// Directory damaged task directories are moved to.
pub const QUARANTINE_DIR: &str = "quarantine";
const SEGMENT_SUFFIX: &str = ".seg";

/// Errors of the spool.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// A file operation failed. Retryable when the cause is transient (disk full, interrupted).
    #[error("spool {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Sealing failed (random generator, key ring).
    #[error("spool: {0}")]
    Crypto(#[from] CryptoError),
    /// A spool file is damaged or was tampered with. Not retryable; names the file.
    #[error("spool integrity error in {}: {detail}", .path.display())]
    Integrity { path: PathBuf, detail: String },
    /// Another process holds the spool. Not retryable until it stops.
    #[error("the spool {} is in use by another process (is the agent running? stop it first)", .0.display())]
    Locked(PathBuf),
    /// A record out of order: a bug in the caller. Not retryable.
    #[error("task {task}: record with seq {seq} does not follow seq {last}")]
    OutOfOrder { task: Uuid, seq: u64, last: u64 },
}

impl SpoolError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SpoolError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::TimedOut
            ),
            SpoolError::Crypto(e) => e.is_retryable(),
            SpoolError::Integrity { .. }
            | SpoolError::Locked(_)
            | SpoolError::OutOfOrder { .. } => false,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `[spool] max_bytes` as written in the configuration: a byte count, or a size such as
/// `"256m"` (powers of 1024, as the other size keys).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum SizeSetting {
    Bytes(u64),
    Text(String),
}

/// The spool bound from its setting (default [`DEFAULT_MAX_BYTES`]), at least [`MIN_MAX_BYTES`].
pub fn max_bytes_setting(v: Option<&SizeSetting>) -> Result<u64, String> {
    let bytes = match v {
        None => return Ok(DEFAULT_MAX_BYTES),
        Some(SizeSetting::Bytes(b)) => *b,
        Some(SizeSetting::Text(t)) => crate::config::parse_size(t)
            .and_then(|b| u64::try_from(b).map_err(|_| format!("{t:?} is negative")))?,
    };
    if bytes < MIN_MAX_BYTES {
        return Err(format!(
            "{bytes} bytes is too small: the spool needs at least {MIN_MAX_BYTES} bytes (4m) to hold a task's largest messages"
        ));
    }
    Ok(bytes)
}

/// Where and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    /// `data_dir/spool`.
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

impl SpoolSettings {
    pub fn new(dir: PathBuf) -> SpoolSettings {
        Self::with_max(dir, DEFAULT_MAX_BYTES)
    }

    /// Segments of a sixteenth of the bound (64 KiB to 4 MiB), so acknowledgements free space
    /// in steps well below the bound.
    pub fn with_max(dir: PathBuf, max_bytes: u64) -> SpoolSettings {
        SpoolSettings {
            dir,
            max_bytes,
            segment_bytes: (max_bytes / 16).clamp(ROLL_ACKED_BYTES, DEFAULT_SEGMENT_BYTES),
        }
    }
}

/// Figures for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// Bytes of all segment files.
    pub bytes: u64,
    pub max_bytes: u64,
    /// How many times an append had to wait for space.
    pub waits: u64,
}

struct Shared {
    settings: SpoolSettings,
    ring: KeyRing,
    usage: AtomicU64,
    waits: AtomicU64,
    /// Holds the flock for the spool's lifetime.
    _lock: File,
}

/// The spool of one agent. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.settings.dir)
            .field("bytes", &self.usage())
            .finish_non_exhaustive()
    }
}

/// What the spool held for one task at start.
#[derive(Debug)]
pub struct LoadedTask {
    pub task: Uuid,
    /// Where the task's next records go.
    pub spool: TaskSpool,
    /// Frames still on disk, in order, from seq `acked + 1`.
    pub frames: Vec<(u64, WireFrame)>,
    /// Every frame up to here was acknowledged (a lower bound: acknowledged frames may remain).
    pub acked: u64,
    /// Seq of the task's `done`, when it is in the spool.
    pub done_seq: Option<u64>,
    /// The latest journal.
    pub journal: Option<TaskJournal>,
    /// Why the task's files could not be used (names the file); its directory was quarantined
    /// and `frames` is empty.
    pub broken: Option<String>,
}

/// Take the spool lock of `dir` (created 0700 if missing).
pub fn lock(dir: &Path) -> Result<File, SpoolError> {
    create_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(SpoolError::Locked(dir.to_path_buf())),
        Err(e) => Err(SpoolError::Io {
            op: "lock",
            path,
            source: e.into(),
        }),
    }
}

fn create_dir(dir: &Path) -> Result<(), SpoolError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Highest seq a spool accepts (far beyond any task; keeps the arithmetic away from overflow).
pub const MAX_SEQ: u64 = 1 << 62;

/// The first seq of a segment file name, if it is one (seqs start at 1).
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
        .filter(|n| (1..=MAX_SEQ).contains(n))
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Spool {
    /// Lock and load the spool in `settings.dir`. Damaged tasks come back as `broken` (their
    /// files quarantined); only an unusable spool directory itself is an error.
    pub fn open(
        settings: SpoolSettings,
        ring: KeyRing,
    ) -> Result<(Spool, Vec<LoadedTask>), SpoolError> {
        let lock = lock(&settings.dir)?;
        let spool = Spool {
            shared: Arc::new(Shared {
                settings,
                ring,
                usage: AtomicU64::new(0),
                waits: AtomicU64::new(0),
                _lock: lock,
            }),
        };
        let dir = spool.shared.settings.dir.clone();
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                ids.push(id);
            }
        }
        ids.sort();
        let mut loaded = Vec::new();
        for id in ids {
            if let Some(t) = spool.load_task(id)? {
                loaded.push(t);
            }
        }
        Ok((spool, loaded))
    }

    /// The spool of a task that starts now.
    pub fn task(&self, task: Uuid) -> TaskSpool {
        TaskSpool {
            shared: self.shared.clone(),
            task,
            dir: self.shared.settings.dir.join(task.to_string()),
            segments: VecDeque::new(),
            file: None,
            last_seq: 0,
            acked: 0,
            journal: None,
        }
    }

    /// Bytes of all segment files.
    pub fn usage(&self) -> u64 {
        self.shared.usage.load(Ordering::SeqCst)
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.settings.max_bytes
    }

    /// Whether an append must wait: at or over the bound (an empty spool always accepts).
    pub fn is_full(&self) -> bool {
        let u = self.usage();
        u > 0 && u >= self.shared.settings.max_bytes
    }

    /// Count one append that had to wait for space.
    pub fn note_wait(&self) {
        self.shared.waits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            bytes: self.usage(),
            max_bytes: self.max_bytes(),
            waits: self.shared.waits.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.shared.settings.dir
    }

    fn load_task(&self, task: Uuid) -> Result<Option<LoadedTask>, SpoolError> {
        let dir = self.shared.settings.dir.join(task.to_string());
        let mut spool = self.task(task);
        match read_task(&self.shared.ring, task, &dir) {
            Ok(None) => {
                let _ = fs::remove_dir_all(&dir);
                Ok(None)
            }
            Ok(Some(t)) => {
                let bytes: u64 = t.segments.iter().map(|s| s.bytes).sum();
                self.shared.usage.fetch_add(bytes, Ordering::SeqCst);
                spool.segments = t.segments.into();
                spool.last_seq = t.last_seq;
                spool.acked = t.acked;
                spool.journal = t.journal_json;
                Ok(Some(LoadedTask {
                    task,
                    spool,
                    frames: t.frames,
                    acked: t.acked,
                    done_seq: t.done_seq,
                    journal: t.journal,
                    broken: None,
                }))
            }
            Err(e) => {
                let reason = e.to_string();
                let q = self.shared.settings.dir.join(QUARANTINE_DIR);
                create_dir(&q)?;
                let to = q.join(format!("{task}-{}", now_ms()));
                if let Err(err) = fs::rename(&dir, &to) {
                    // Keep going: the task is reported lost either way; its files stay put and
                    // are counted so the bound stays honest.
                    tracing::error!(%task, error = %err, "cannot quarantine a damaged task spool");
                    self.shared
                        .usage
                        .fetch_add(dir_bytes(&dir), Ordering::SeqCst);
                    spool.dir = q.join(format!("{task}-{}-new", now_ms()));
                }
                Ok(Some(LoadedTask {
                    task,
                    spool,
                    frames: Vec::new(),
                    acked: 0,
                    done_seq: None,
                    journal: None,
                    broken: Some(reason),
                }))
            }
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    /// Last frame seq in it; `first_seq - 1` when it holds none.
    last_seq: u64,
    bytes: u64,
    path: PathBuf,
}

struct ReadTask {
    segments: Vec<Segment>,
    frames: Vec<(u64, WireFrame)>,
    last_seq: u64,
    acked: u64,
    done_seq: Option<u64>,
    journal: Option<TaskJournal>,
    journal_json: Option<Zeroizing<Vec<u8>>>,
    /// Newest modification time of the task's segments (Unix ms).
    last_write_ms: Option<u64>,
}

/// Read and verify a task directory. `None`: nothing in it.
fn read_task(ring: &KeyRing, task: Uuid, dir: &Path) -> Result<Option<ReadTask>, SpoolError> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = parse_segment_name(&name) {
            firsts.push(first);
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            // Left by an interrupted reseal: ciphertext, never the live copy.
            let _ = fs::remove_file(entry.path());
        } else {
            return Err(SpoolError::Integrity {
                path: entry.path(),
                detail: "unexpected file in a task's spool directory".into(),
            });
        }
    }
    if firsts.is_empty() {
        return Ok(None);
    }
    firsts.sort_unstable();
    let mut out = ReadTask {
        segments: Vec::new(),
        frames: Vec::new(),
        last_seq: 0,
        acked: firsts[0].saturating_sub(1),
        done_seq: None,
        journal: None,
        journal_json: None,
        last_write_ms: None,
    };
    let mut expected = firsts[0];
    for first in firsts {
        let path = dir.join(segment_name(first));
        let integrity = |detail: String| SpoolError::Integrity {
            path: path.clone(),
            detail,
        };
        if first != expected {
            return Err(integrity(format!(
                "segment starts at seq {first} but the previous one ends at seq {}: records are missing",
                expected - 1
            )));
        }
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let modified = fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        out.last_write_ms = out.last_write_ms.max(modified);
        read_segment(ring, task, &path, &bytes, &mut expected, &mut out)?;
        out.segments.push(Segment {
            first_seq: first,
            last_seq: expected - 1,
            bytes: bytes.len() as u64,
            path,
        });
    }
    out.last_seq = expected - 1;
    if let Some(j) = out.journal.as_mut() {
        j.last_spooled_ms = out.last_write_ms;
    }
    Ok(Some(out))
}

/// What a task's segments held, as read so far.
#[derive(Debug, Default)]
pub struct SegmentContents {
    pub frames: Vec<(u64, WireFrame)>,
    pub done_seq: Option<u64>,
    pub journal: Option<TaskJournal>,
}

/// Verify one segment's bytes as the segment of `task` starting at seq `first_seq`: every record
/// authentic, of this task, in seq order. Pure (no I/O); `path` only names the file in errors.
/// Used by the loader and by the fuzz target.
pub fn check_segment(
    ring: &KeyRing,
    task: Uuid,
    path: &Path,
    first_seq: u64,
    bytes: &[u8],
) -> Result<SegmentContents, SpoolError> {
    let mut expected = first_seq.clamp(1, MAX_SEQ);
    let mut out = ReadTask {
        segments: Vec::new(),
        frames: Vec::new(),
        last_seq: 0,
        acked: 0,
        done_seq: None,
        journal: None,
        journal_json: None,
        last_write_ms: None,
    };
    read_segment(ring, task, path, bytes, &mut expected, &mut out)?;
    Ok(SegmentContents {
        frames: out.frames,
        done_seq: out.done_seq,
        journal: out.journal,
    })
}

/// Read the records of one segment into `out`; `expected` is the next frame seq.
fn read_segment(
    ring: &KeyRing,
    task: Uuid,
    path: &Path,
    bytes: &[u8],
    expected: &mut u64,
    out: &mut ReadTask,
) -> Result<(), SpoolError> {
    let integrity = |detail: String| SpoolError::Integrity {
        path: path.to_path_buf(),
        detail,
    };
    for part in record::split_records(bytes) {
        let (offset, sealed) = part.map_err(|e| integrity(e.to_string()))?;
        let plain = Zeroizing::new(delegate_crypto::open(ring, sealed).map_err(|e| {
            integrity(format!(
                "record at byte {offset}: {}",
                e.integrity_failure()
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| e.to_string())
            ))
        })?);
        let (owner, body) = record::decode_plain(&plain)
            .map_err(|e| integrity(format!("record at byte {offset}: {e}")))?;
        if owner != task {
            return Err(integrity(format!(
                "record at byte {offset} belongs to task {owner}"
            )));
        }
        match body {
            RecordBody::Frame { seq, frame, done } => {
                if seq != *expected {
                    return Err(integrity(format!(
                        "record at byte {offset} has seq {seq}, expected {expected}"
                    )));
                }
                if out.done_seq.is_some() {
                    return Err(integrity(format!(
                        "record at byte {offset} follows the task's done"
                    )));
                }
                if seq >= MAX_SEQ {
                    return Err(integrity(format!(
                        "record at byte {offset} has seq {seq}, beyond any task"
                    )));
                }
                if done {
                    out.done_seq = Some(seq);
                }
                out.frames.push((seq, frame));
                *expected = seq + 1;
            }
            RecordBody::Journal { after_seq, json } => {
                if after_seq.checked_add(1) != Some(*expected) {
                    return Err(integrity(format!(
                        "journal at byte {offset} claims to follow seq {after_seq}, expected {}",
                        *expected - 1
                    )));
                }
                let j = TaskJournal::from_json(&json)
                    .map_err(|e| integrity(format!("journal at byte {offset}: {e}")))?;
                if j.spec.task_id != task {
                    return Err(integrity(format!(
                        "journal at byte {offset} is for task {}",
                        j.spec.task_id
                    )));
                }
                out.journal = Some(j);
                out.journal_json = Some(json);
            }
        }
    }
    Ok(())
}

/// The spool of one task: where its records go, and their compaction.
pub struct TaskSpool {
    shared: Arc<Shared>,
    task: Uuid,
    dir: PathBuf,
    /// Oldest first; the last one is the active segment.
    segments: VecDeque<Segment>,
    /// Append handle of the active segment.
    file: Option<File>,
    last_seq: u64,
    acked: u64,
    /// The latest journal's JSON, copied at the start of every new segment.
    journal: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for TaskSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskSpool")
            .field("task", &self.task)
            .field("segments", &self.segments.len())
            .field("last_seq", &self.last_seq)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl TaskSpool {
    /// Seq of the last frame appended (0: none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Bytes of this task's segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Paths of this task's segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Append a batch with one write. Frame seqs must continue from [`Self::last_seq`]; a
    /// journal's `after_seq` must be the frame seq before it. With a journal in the batch (or
    /// `sync`), the file is `fdatasync`ed before this returns.
    pub fn append(&mut self, batch: &[RecordBody], sync: bool) -> Result<(), SpoolError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Check the order before anything is written.
        let mut next = self.last_seq + 1;
        let mut journal = None;
        for body in batch {
            match body {
                RecordBody::Frame { seq, .. } => {
                    if *seq != next {
                        return Err(SpoolError::OutOfOrder {
                            task: self.task,
                            seq: *seq,
                            last: next - 1,
                        });
                    }
                    next += 1;
                }
                RecordBody::Journal { after_seq, json } => {
                    if *after_seq + 1 != next {
                        return Err(SpoolError::OutOfOrder {
                            task: self.task,
                            seq: *after_seq,
                            last: next - 1,
                        });
                    }
                    journal = Some(json);
                }
            }
        }
        let sync = sync || journal.is_some();
        let ring = &self.shared.ring;
        let mut buf = Vec::new();
        for body in batch {
            buf.extend(record::seal_record(ring, self.task, body)?);
        }
        let roll = self
            .segments
            .back()
            .is_none_or(|s| s.bytes >= self.shared.settings.segment_bytes);
        if roll {
            self.roll()?;
        }
        let path = self.active_path();
        let file = self.open_active()?;
        file.write_all(&buf).map_err(io_err("append to", &path))?;
        if sync {
            file.sync_data().map_err(io_err("fdatasync", &path))?;
        }
        let n = buf.len() as u64;
        self.shared.usage.fetch_add(n, Ordering::SeqCst);
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += n;
            seg.last_seq = next - 1;
        }
        self.last_seq = next - 1;
        if let Some(j) = journal {
            self.journal = Some(j.clone());
        }
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        self.segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    fn open_active(&mut self) -> Result<&mut File, SpoolError> {
        if self.file.is_none() {
            let path = self.active_path();
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_err("open", &path))?;
            self.file = Some(f);
        }
        // Just set when it was missing.
        self.file.as_mut().ok_or_else(|| SpoolError::Io {
            op: "open",
            path: PathBuf::new(),
            source: io::Error::other("no active segment"),
        })
    }

    /// Start a new segment named after the next seq, beginning with the latest journal.
    fn roll(&mut self) -> Result<(), SpoolError> {
        create_dir(&self.dir)?;
        let first = self.last_seq + 1;
        let path = self.dir.join(segment_name(first));
        if self.segments.back().is_some_and(|s| s.first_seq == first) {
            // The active segment holds no frame yet; keep it.
            return Ok(());
        }
        let mut head = Vec::new();
        if let Some(j) = &self.journal {
            head = record::seal_record(
                &self.shared.ring,
                self.task,
                &RecordBody::Journal {
                    after_seq: self.last_seq,
                    json: j.clone(),
                },
            )?;
        }
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        if !head.is_empty() {
            f.write_all(&head)
                .and_then(|()| f.sync_data())
                .map_err(io_err("write", &path))?;
        }
        sync_dir(&self.dir)?;
        let n = head.len() as u64;
        self.shared.usage.fetch_add(n, Ordering::SeqCst);
        self.segments.push_back(Segment {
            first_seq: first,
            last_seq: first - 1,
            bytes: n,
            path,
        });
        self.file = Some(f);
        Ok(())
    }

    /// Everything up to `acked` is stored by the control plane: delete what that frees.
    /// `pressure`: appends are waiting for space, so replace a fully acknowledged active segment
    /// whatever its size.
    pub fn ack(&mut self, acked: u64, pressure: bool) -> Result<(), SpoolError> {
        self.acked = self.acked.max(acked.min(self.last_seq));
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq <= self.acked)
        {
            if let Some(s) = self.segments.pop_front() {
                self.delete(&s)?;
            }
        }
        let replace = self.segments.len() == 1
            && self.segments.back().is_some_and(|s| {
                s.last_seq >= s.first_seq
                    && s.last_seq <= self.acked
                    && (pressure || s.bytes >= self.roll_acked_bytes())
            });
        if replace {
            self.file = None;
            self.roll()?;
            if let Some(s) = self.segments.pop_front() {
                self.delete(&s)?;
            }
        }
        Ok(())
    }

    /// A fully acknowledged active segment this large is replaced at the next ack: a quarter of
    /// a segment, at least [`ROLL_ACKED_BYTES`]. Replacing costs two fsyncs on the link's ack
    /// path, so it is not done for every few KiB of output.
    fn roll_acked_bytes(&self) -> u64 {
        (self.shared.settings.segment_bytes / 4).max(ROLL_ACKED_BYTES)
    }

    fn delete(&self, s: &Segment) -> Result<(), SpoolError> {
        match fs::remove_file(&s.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete", &s.path)(e)),
        }
        self.shared.usage.fetch_sub(s.bytes, Ordering::SeqCst);
        Ok(())
    }

    /// The control plane holds everything up to `acked`, beyond what this spool has (its files
    /// were lost or quarantined): drop what is here and continue numbering after `acked`.
    pub fn reset_at(&mut self, acked: u64) -> Result<(), SpoolError> {
        self.file = None;
        while let Some(s) = self.segments.pop_front() {
            self.delete(&s)?;
        }
        self.last_seq = acked;
        self.acked = acked;
        Ok(())
    }

    /// The task is over (its `done` acknowledged, or the control plane does not know it):
    /// delete its files.
    pub fn remove(mut self) -> Result<(), SpoolError> {
        self.file = None;
        while let Some(s) = self.segments.pop_front() {
            self.delete(&s)?;
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &self.dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests;
