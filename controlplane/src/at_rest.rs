//! Bytes at rest: the single place where everything the control plane stores about tasks
//! (workspace archives, plans, plan JSON, state versions, log data) passes on its way to and from
//! disk.
//!
//! Owns: [`AtRest::seal`] / [`AtRest::open`] (today the identity; issue 4 puts AES-256-GCM here
//! with a key id header, and every caller is already routed through it) and [`BlobStore`], the
//! files under `DIR/blobs/`. Never logs the bytes it handles.

use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors reading or writing stored bytes. I/O errors may be retryable (disk full, transient);
/// `NotFound` and `Integrity` are not.
#[derive(Debug, Error)]
pub enum AtRestError {
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: integrity check failed: {reason}")]
    Integrity { what: String, reason: String },
}

/// Seals and opens stored bytes. `purpose` names what the bytes are (for key derivation and
/// error messages once sealing exists).
#[derive(Debug, Clone, Default)]
pub struct AtRest {}

impl AtRest {
    pub fn seal(&self, _purpose: &str, plain: &[u8]) -> Vec<u8> {
        plain.to_vec()
    }

    pub fn open(&self, _purpose: &str, stored: &[u8]) -> Result<Vec<u8>, AtRestError> {
        Ok(stored.to_vec())
    }
}

/// Immutable blobs (archives, plans, artifacts, state versions) as files named by a random id.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    at_rest: AtRest,
}

impl BlobStore {
    pub fn open(dir: &Path, at_rest: AtRest) -> Result<BlobStore, AtRestError> {
        std::fs::create_dir_all(dir).map_err(|source| AtRestError::Io {
            path: dir.into(),
            source,
        })?;
        Ok(BlobStore {
            dir: dir.into(),
            at_rest,
        })
    }

    fn path(&self, id: &str) -> Result<PathBuf, AtRestError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(AtRestError::NotFound(id.into()));
        }
        Ok(self.dir.join(id))
    }

    /// Store `data`; returns the new blob's id. Written to a temporary file then renamed, so a
    /// crash never leaves a half blob under a real id.
    pub fn put(&self, purpose: &str, data: &[u8]) -> Result<String, AtRestError> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.path(&id)?;
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let sealed = self.at_rest.seal(purpose, data);
        let io = |source| AtRestError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&sealed).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(id)
    }

    pub fn get(&self, purpose: &str, id: &str) -> Result<Vec<u8>, AtRestError> {
        let path = self.path(id)?;
        let stored = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                AtRestError::NotFound(id.into())
            } else {
                AtRestError::Io { path, source }
            }
        })?;
        self.at_rest.open(purpose, &stored)
    }

    pub fn delete(&self, id: &str) -> Result<(), AtRestError> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(AtRestError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), AtRest::default()).unwrap();
        let id = store.put("archive", b"hello").unwrap();
        assert_eq!(store.get("archive", &id).unwrap(), b"hello");
        store.delete(&id).unwrap();
        assert!(matches!(
            store.get("archive", &id),
            Err(AtRestError::NotFound(_))
        ));
        assert!(matches!(
            store.get("archive", "../etc/passwd"),
            Err(AtRestError::NotFound(_))
        ));
    }
}
