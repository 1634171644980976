//! Bytes at rest: the single place where everything the control plane stores about tasks
//! (workspace archives, plans, plan JSON, state versions, log data, task summaries, workspace
//! secrets) passes on its way to and from disk, sealed with AES-256-GCM (`delegate-crypto`).
//!
//! Owns: the key ring in memory ([`AtRest`]: loading it from `DIR/keys/` plus the optional
//! `DELEGATE_CP_KEY` value, rotating it), [`AtRest::seal`] / [`AtRest::open`] for values kept in
//! SQLite, and [`BlobStore`], the sealed files under `DIR/blobs/`. Must never: write plaintext to
//! disk, log or put into an error the bytes it handles or any key material, or return bytes that
//! did not authenticate (a tampered or truncated value is an [`AtRestError::Integrity`] naming
//! what it was: "state version 3 of workspace prod", "log of task … seq 12").
//!
//! # Layout and choices
//!
//! * **Keys**: `DIR/keys/<id>.key` (32 random bytes, 0600, directory 0700) and `DIR/keys/current`
//!   naming the key new data is sealed under. `init` generates one key file (without `current`:
//!   a lone key file is current); the first start generates one if there is no key at all.
//!   `DELEGATE_CP_KEY` (64 hex, or `<id>:<64 hex>`; read by `main`/`serve` only) adds a key held
//!   outside the data directory; it is current when there is no `current` file. `keys rotate`
//!   writes `current`.
//!   Every sealed value carries its key id in its header, so `keys rotate` (a new current key)
//!   leaves old data readable and `keys reseal` re-encrypts it under the current key.
//! * **Blob files** (archives, plans, plan JSON, state versions): one sealed stream per file,
//!   written through a temporary file, fsync and rename (0600). Artifacts are assembled into their
//!   blob streaming ([`BlobWriter`]), one chunk of plaintext at a time; archives and plans handed
//!   to agents are read whole (they are sent from memory anyway, and bounded by
//!   `max_archive_bytes` / the artifact limits).
//! * **Values in SQLite** (log data per log frame, artifact parts while an artifact is uploading,
//!   task summaries — they hold tofu outputs — and workspace secrets): each value is its own
//!   small sealed stream in a BLOB column. One value per log frame costs ~100 bytes of header and
//!   tag per frame; in exchange every frame is stored the moment it is acknowledged, with no
//!   read-modify-write of a growing file, and a damaged frame names its task and sequence number.
//!   Deleted rows leave only ciphertext in SQLite's free pages and WAL.
//! * Not sealed: metadata needed to query and to audit (task ids, ops, workspace names, states,
//!   sizes, hashes, event JSON, the audit trail, secret *names*). Task inputs (`vars`, plain `env`)
//!   are not secrets by contract; secrets go in `--secret` / workspace secrets.
//!
//! The format does not stop a whole sealed value being swapped for another authentic one (see
//! `delegate-crypto`); workspace secrets therefore seal their workspace and name with the value
//! and check them on open.

use delegate_crypto::{CryptoError, KeyRing, Opener, Reseal, SealedFileWriter};
use ring::digest::{Context, SHA256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;
use zeroize::Zeroizing;

/// The environment variable holding an extra key (`main` and `serve` read it, nothing else).
pub const KEY_ENV: &str = "DELEGATE_CP_KEY";

/// Errors reading or writing stored bytes. `Io` may be retryable (disk full, transient);
/// `NotFound`, `Integrity` and `Keys` are not: the data or the key setup must be fixed.
#[derive(Debug, Error)]
pub enum AtRestError {
    #[error("{what}: blob {id} not found")]
    NotFound { what: String, id: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: integrity check failed: {reason}")]
    Integrity { what: String, reason: String },
    /// The key directory, a key file or the environment key is unusable.
    #[error("keys: {0}")]
    Keys(String),
    /// Sealing or opening failed for a reason other than integrity (I/O inside the sealed stream,
    /// the random generator).
    #[error("{what}: {source}")]
    Crypto { what: String, source: CryptoError },
}

impl AtRestError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AtRestError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::StorageFull
            ),
            AtRestError::Crypto { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    fn from_crypto(what: &str, e: CryptoError) -> AtRestError {
        match e {
            CryptoError::Integrity { failure, .. } => AtRestError::Integrity {
                what: what.to_string(),
                reason: failure.to_string(),
            },
            e @ (CryptoError::KeyFile { .. }
            | CryptoError::KeyRing(_)
            | CryptoError::EnvKey(_)
            | CryptoError::InvalidKeyId(_)) => AtRestError::Keys(e.to_string()),
            source => AtRestError::Crypto {
                what: what.to_string(),
                source,
            },
        }
    }
}

/// Where the key ring comes from, so it can be rotated and reloaded.
struct KeySource {
    dir: PathBuf,
    /// The value of `DELEGATE_CP_KEY`, if set. Wiped on drop.
    env_key: Option<Zeroizing<String>>,
}

struct Inner {
    ring: RwLock<Arc<KeyRing>>,
    source: Option<KeySource>,
}

/// A key rotation: the previous and the new current key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub from: String,
    pub to: String,
}

/// Seals and opens stored bytes with the control plane's key ring. Cheap to clone; clones share
/// the ring, so a rotation is seen by every holder.
#[derive(Clone)]
pub struct AtRest {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AtRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtRest")
            .field("current", &self.current_key_id())
            .finish_non_exhaustive()
    }
}

/// An ephemeral random key that lives only in this process: for tests and for tools that read
/// no sealed data. Data sealed with it cannot be read by any other process.
impl Default for AtRest {
    fn default() -> Self {
        AtRest::ephemeral()
    }
}

impl AtRest {
    /// Load the keys of `dir` (`DIR/keys`) plus the environment key; when there is no key at all,
    /// first generate one in `dir` (0600) and make it current.
    pub fn load(dir: &Path, env_key: Option<&str>) -> Result<AtRest, AtRestError> {
        let ring = KeyRing::load_or_create(dir, env_key)
            .map_err(|e| AtRestError::from_crypto("keys", e))?;
        Ok(AtRest {
            inner: Arc::new(Inner {
                ring: RwLock::new(Arc::new(ring)),
                source: Some(KeySource {
                    dir: dir.to_path_buf(),
                    env_key: env_key.map(|k| Zeroizing::new(k.to_string())),
                }),
            }),
        })
    }

    /// A fixed ring (cannot rotate).
    pub fn from_ring(ring: KeyRing) -> AtRest {
        AtRest {
            inner: Arc::new(Inner {
                ring: RwLock::new(Arc::new(ring)),
                source: None,
            }),
        }
    }

    /// A random key held in memory only (tests; tools that read no sealed data).
    pub fn ephemeral() -> AtRest {
        let mut key = Zeroizing::new([0u8; delegate_crypto::KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key[..])
            .expect("the system random generator works");
        let ring = KeyRing::from_key("ephemeral", &key).expect("a constant, valid key id");
        AtRest::from_ring(ring)
    }

    /// The ring as it is now (a rotation swaps in a new one).
    pub fn ring(&self) -> Arc<KeyRing> {
        self.inner
            .ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The key new data is sealed under.
    pub fn current_key_id(&self) -> String {
        self.ring().current_id().to_string()
    }

    /// Every key id that can open data.
    pub fn key_ids(&self) -> Vec<String> {
        self.ring().ids().map(str::to_string).collect()
    }

    /// The key directory, when the ring was loaded from one.
    pub fn key_dir(&self) -> Option<&Path> {
        self.inner.source.as_ref().map(|s| s.dir.as_path())
    }

    /// Seal `plain` under the current key (for a value kept in the database).
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, AtRestError> {
        delegate_crypto::seal(&self.ring(), plain).map_err(|e| AtRestError::from_crypto("seal", e))
    }

    /// Open a sealed value; `what` names it in errors.
    pub fn open(&self, what: &str, stored: &[u8]) -> Result<Vec<u8>, AtRestError> {
        delegate_crypto::open(&self.ring(), stored).map_err(|e| AtRestError::from_crypto(what, e))
    }

    /// The key id a sealed value was sealed under (its header authenticated, nothing decrypted).
    pub fn key_id_of(&self, what: &str, stored: &[u8]) -> Result<String, AtRestError> {
        let opener =
            Opener::new(&self.ring(), stored).map_err(|e| AtRestError::from_crypto(what, e))?;
        Ok(opener.key_id().to_string())
    }

    /// Make a new key current (written to the key directory, 0600) and reload the ring. Data
    /// sealed under the old keys stays readable.
    pub fn rotate(&self) -> Result<Rotated, AtRestError> {
        let Some(src) = &self.inner.source else {
            return Err(AtRestError::Keys(
                "this key ring has no key directory; it cannot rotate".into(),
            ));
        };
        let from = self.current_key_id();
        let to =
            delegate_crypto::rotate(&src.dir).map_err(|e| AtRestError::from_crypto("rotate", e))?;
        self.reload()?;
        Ok(Rotated { from, to })
    }

    /// Re-read the key directory (and the environment key given at load).
    pub fn reload(&self) -> Result<(), AtRestError> {
        let Some(src) = &self.inner.source else {
            return Ok(());
        };
        let ring = KeyRing::load(&src.dir, src.env_key.as_ref().map(|k| k.as_str()))
            .map_err(|e| AtRestError::from_crypto("keys", e))?;
        *self.inner.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        Ok(())
    }
}

/// A blob as stored: its id, plaintext size and plaintext SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutBlob {
    pub id: String,
    pub size: u64,
    pub sha256: String,
}

/// Immutable blobs (archives, plans, artifacts, state versions) as sealed files named by a
/// random id.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    at_rest: AtRest,
}

impl BlobStore {
    pub fn open(dir: &Path, at_rest: AtRest) -> Result<BlobStore, AtRestError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| AtRestError::Io {
                path: dir.into(),
                source,
            })?;
        Ok(BlobStore {
            dir: dir.into(),
            at_rest,
        })
    }

    pub fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    fn valid_id(id: &str) -> bool {
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    }

    fn path(&self, what: &str, id: &str) -> Result<PathBuf, AtRestError> {
        if !Self::valid_id(id) {
            return Err(AtRestError::NotFound {
                what: what.into(),
                id: id.into(),
            });
        }
        Ok(self.dir.join(id))
    }

    /// The file of blob `id` (for tests and tools that inspect the store).
    pub fn file(&self, id: &str) -> Option<PathBuf> {
        Self::valid_id(id).then(|| self.dir.join(id))
    }

    /// Store `data` sealed; returns the new blob's id. Written to a temporary file then renamed,
    /// so a crash never leaves a half blob under a real id.
    pub fn put(&self, what: &str, data: &[u8]) -> Result<String, AtRestError> {
        let mut w = self.writer(what)?;
        w.write(data)?;
        Ok(w.commit()?.id)
    }

    /// Start a blob written piece by piece (sealed as it goes; hashed on the way).
    pub fn writer(&self, what: &str) -> Result<BlobWriter, AtRestError> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.path(what, &id)?;
        let file = SealedFileWriter::create(&self.at_rest.ring(), &path)
            .map_err(|e| AtRestError::from_crypto(what, e))?;
        Ok(BlobWriter {
            what: what.to_string(),
            id,
            file,
            sha: Context::new(&SHA256),
            size: 0,
        })
    }

    /// Read and open blob `id`; `what` names it in errors ("state version 3 of workspace w").
    pub fn get(&self, what: &str, id: &str) -> Result<Vec<u8>, AtRestError> {
        let path = self.path(what, id)?;
        let named = format!("{what} (blob {id})");
        match delegate_crypto::open_file(&self.at_rest.ring(), &path) {
            Ok(data) => Ok(data),
            Err(CryptoError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Err(AtRestError::NotFound {
                    what: what.into(),
                    id: id.into(),
                })
            }
            Err(e) => Err(AtRestError::from_crypto(&named, e)),
        }
    }

    pub fn delete(&self, id: &str) -> Result<(), AtRestError> {
        let path = self.path("blob", id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(AtRestError::Io { path, source }),
        }
    }

    /// Ids of every stored blob (temporary files of unfinished writes are not blobs).
    pub fn ids(&self) -> Result<Vec<String>, AtRestError> {
        let io = |source| AtRestError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if let Some(name) = entry.file_name().to_str() {
                if Self::valid_id(name) {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Re-encrypt blob `id` under the current key (streaming; the original stays until the new
    /// file is complete and verified). `what` names the blob in an error; it is only called then
    /// (finding a blob's owner is a database search).
    pub fn reseal(&self, what: impl FnOnce() -> String, id: &str) -> Result<Reseal, AtRestError> {
        let Some(path) = self.file(id) else {
            return Err(AtRestError::NotFound {
                what: what(),
                id: id.into(),
            });
        };
        delegate_crypto::reseal(&self.at_rest.ring(), &path)
            .map_err(|e| AtRestError::from_crypto(&format!("{} (blob {id})", what()), e))
    }
}

/// A blob being written: sealed to a temporary file as it goes; nothing appears under its id
/// until [`BlobWriter::commit`]. Dropping it removes the temporary file.
pub struct BlobWriter {
    what: String,
    id: String,
    file: SealedFileWriter,
    sha: Context,
    size: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("what", &self.what)
            .field("id", &self.id)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<(), AtRestError> {
        self.file
            .write_all(data)
            .map_err(|e| CryptoError::from_io(e, "write blob", Some(self.file.path())))
            .map_err(|e| AtRestError::from_crypto(&self.what, e))?;
        self.sha.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// Plaintext bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The SHA-256 (hex) of what was written, without committing.
    pub fn sha256(&self) -> String {
        hex::encode(self.sha.clone().finish().as_ref())
    }

    /// Seal the end, sync and move the file under its id.
    pub fn commit(self) -> Result<PutBlob, AtRestError> {
        let sha256 = self.sha256();
        let BlobWriter {
            what,
            id,
            file,
            size,
            ..
        } = self;
        file.commit()
            .map_err(|e| AtRestError::from_crypto(&what, e))?;
        Ok(PutBlob { id, size, sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> KeyRing {
        KeyRing::from_key("k1", &[b; 32]).unwrap()
    }

    #[test]
    fn put_get_delete_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), AtRest::from_ring(key(1))).unwrap();
        let id = store.put("archive", b"hello plaintext").unwrap();
        let raw = std::fs::read(dir.path().join(&id)).unwrap();
        assert!(raw.starts_with(&delegate_crypto::MAGIC));
        assert!(!raw.windows(15).any(|w| w == b"hello plaintext"));
        assert_eq!(store.get("archive", &id).unwrap(), b"hello plaintext");
        assert_eq!(store.ids().unwrap(), vec![id.clone()]);
        store.delete(&id).unwrap();
        assert!(matches!(
            store.get("archive", &id),
            Err(AtRestError::NotFound { .. })
        ));
        assert!(matches!(
            store.get("archive", "../etc/passwd"),
            Err(AtRestError::NotFound { .. })
        ));
    }

    #[test]
    fn tampered_or_truncated_blob_names_what() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), AtRest::from_ring(key(1))).unwrap();
        let id = store.put("state", &vec![7u8; 100_000]).unwrap();
        let path = dir.path().join(&id);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[200] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = store
            .get("state version 3 of workspace prod", &id)
            .unwrap_err();
        assert!(matches!(err, AtRestError::Integrity { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("state version 3 of workspace prod"), "{msg}");
        assert!(msg.contains("integrity check failed"), "{msg}");
        std::fs::write(&path, &good[..good.len() - 20]).unwrap();
        let msg = store.get("plan of task t", &id).unwrap_err().to_string();
        assert!(
            msg.contains("plan of task t") && msg.contains("integrity"),
            "{msg}"
        );
        // Another key cannot open it: an integrity error, not garbage.
        std::fs::write(&path, &good).unwrap();
        let other = BlobStore::open(dir.path(), AtRest::from_ring(key(2))).unwrap();
        let msg = other.get("x", &id).unwrap_err().to_string();
        assert!(msg.contains("integrity"), "{msg}");
    }

    #[test]
    fn values_seal_and_detect_damage() {
        let at = AtRest::ephemeral();
        let sealed = at.seal(b"log line").unwrap();
        assert_eq!(at.open("log", &sealed).unwrap(), b"log line");
        assert_eq!(at.key_id_of("log", &sealed).unwrap(), "ephemeral");
        for cut in [0, 5, sealed.len() - 1] {
            let err = at.open("log of task t seq 4", &sealed[..cut]).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("log of task t seq 4: integrity"),
                "{err}"
            );
        }
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert!(matches!(
            at.open("x", &flipped),
            Err(AtRestError::Integrity { .. })
        ));
        assert!(matches!(
            AtRest::ephemeral().open("x", &sealed),
            Err(AtRestError::Integrity { .. })
        ));
    }

    #[test]
    fn writer_streams_hashes_and_discards_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), AtRest::ephemeral()).unwrap();
        let mut w = store.writer("plan").unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        for piece in data.chunks(70_000) {
            w.write(piece).unwrap();
        }
        let put = w.commit().unwrap();
        assert_eq!(put.size, data.len() as u64);
        assert_eq!(put.sha256, crate::tasks::sha256_hex(&data));
        assert_eq!(store.get("plan", &put.id).unwrap(), data);
        let mut w = store.writer("plan").unwrap();
        w.write(b"abandoned").unwrap();
        drop(w);
        assert_eq!(store.ids().unwrap(), vec![put.id.clone()]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rotate_keeps_old_data_readable_and_reseal_moves_it() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = tmp.path().join("keys");
        let at = AtRest::load(&keys, None).unwrap();
        let first = at.current_key_id();
        let meta = std::fs::metadata(keys.join(format!("{first}.key"))).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        let store = BlobStore::open(&tmp.path().join("blobs"), at.clone()).unwrap();
        let old_blob = store.put("state", b"old state").unwrap();
        let old_value = at.seal(b"old value").unwrap();

        let r = at.rotate().unwrap();
        assert_eq!(r.from, first);
        assert_ne!(r.to, first);
        assert_eq!(at.current_key_id(), r.to);
        assert_eq!(store.get("state", &old_blob).unwrap(), b"old state");
        assert_eq!(at.open("v", &old_value).unwrap(), b"old value");
        let new_value = at.seal(b"new").unwrap();
        assert_eq!(at.key_id_of("v", &new_value).unwrap(), r.to);

        assert_eq!(
            store.reseal(|| "state".into(), &old_blob).unwrap(),
            Reseal::Resealed {
                from: first.clone(),
                to: r.to.clone()
            }
        );
        let raw = std::fs::read(store.file(&old_blob).unwrap()).unwrap();
        assert_eq!(at.key_id_of("state", &raw).unwrap(), r.to);
        assert_eq!(store.get("state", &old_blob).unwrap(), b"old state");

        // A fresh load (a restart) sees the same current key and opens both.
        let again = AtRest::load(&keys, None).unwrap();
        assert_eq!(again.current_key_id(), r.to);
        assert_eq!(again.open("v", &old_value).unwrap(), b"old value");
    }

    #[test]
    fn environment_key_is_used_and_never_shown() {
        let tmp = tempfile::tempdir().unwrap();
        let hex_key = "ab".repeat(32);
        let at = AtRest::load(&tmp.path().join("keys"), Some(&hex_key)).unwrap();
        assert_eq!(at.current_key_id(), "env");
        assert!(
            !tmp.path().join("keys").exists(),
            "no key file is generated when the environment gives one"
        );
        assert!(!format!("{at:?}").contains(&hex_key));
        let err = AtRest::load(&tmp.path().join("k2"), Some("nothex"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("nothex"), "{err}");
        assert!(at.rotate().is_ok(), "rotating adds a file key");
        assert_ne!(at.current_key_id(), "env");
        assert!(at.key_ids().contains(&"env".to_string()));
    }
}
