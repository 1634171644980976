//! The agent's at-rest keys: where they live, first-start generation, rotation, and re-sealing
//! the spool under the current key (`delegate keys rotate|reseal --config FILE`).
//!
//! Keys are `delegate-crypto` key files in `data_dir/keys/` (32 bytes, 0600; `current` names the
//! one new data is sealed under), or one key given by the caller from the `DELEGATE_SPOOL_KEY`
//! environment variable (64 hex digits, optionally `<id>:` before them). This module never reads
//! the environment itself and never prints key material: errors carry ids and paths only.
//!
//! Re-sealing rewrites each segment file whose records are not all under the current key: the
//! new file is written as a 0600 temp file next to the old one (ciphertext only), fsynced and
//! renamed over it. A file that fails verification is left untouched and reported; the others
//! are still re-sealed. It takes the spool lock, so it refuses to run while the agent runs.

use super::record::{self, frame_sealed};
use super::{parse_segment_name, SpoolError, QUARANTINE_DIR};
use delegate_crypto::{CryptoError, KeyRing, Opener};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The key directory under `data_dir`.
pub const KEYS_DIR: &str = "keys";
/// The spool directory under `data_dir`.
pub const SPOOL_DIR: &str = "spool";
/// Environment variable that may hold the agent's key (read by the binary, passed in here).
pub const ENV_KEY: &str = "DELEGATE_SPOOL_KEY";

pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(KEYS_DIR)
}

pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SPOOL_DIR)
}

/// The agent's key ring: the key files in `data_dir/keys/` plus the environment key if given.
/// With neither, a first key is generated (0600) and made current.
pub fn load(data_dir: &Path, env_key: Option<&str>) -> Result<KeyRing, CryptoError> {
    KeyRing::load_or_create(&key_dir(data_dir), env_key)
}

/// The agent's key ring without generating a key when there is none (for `reseal`).
pub fn load_existing(data_dir: &Path, env_key: Option<&str>) -> Result<KeyRing, CryptoError> {
    KeyRing::load(&key_dir(data_dir), env_key)
}

/// Make a new key current; old keys stay so existing spool files still open. Returns its id.
pub fn rotate(data_dir: &Path) -> Result<String, CryptoError> {
    delegate_crypto::rotate(&key_dir(data_dir))
}

/// What [`reseal`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Segment files looked at.
    pub files: usize,
    /// Files rewritten.
    pub rewritten: usize,
    /// Records re-sealed under the current key.
    pub records: usize,
    /// Files that could not be re-sealed, with the reason (naming the file). Left untouched.
    pub failed: Vec<String>,
}

/// Re-seal every spool record not sealed under the ring's current key. Needs the spool lock.
pub fn reseal(data_dir: &Path, ring: &KeyRing) -> Result<ResealReport, SpoolError> {
    let dir = spool_dir(data_dir);
    let mut report = ResealReport::default();
    if !dir.exists() {
        return Ok(report);
    }
    let _lock = super::lock(&dir)?;
    let list = |d: &Path| -> Result<Vec<PathBuf>, SpoolError> {
        let mut v: Vec<PathBuf> = fs::read_dir(d)
            .map_err(super::io_err("list", d))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        v.sort();
        Ok(v)
    };
    for task_dir in list(&dir)? {
        let is_task = task_dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n != QUARANTINE_DIR && Uuid::parse_str(n).is_ok());
        if !is_task || !task_dir.is_dir() {
            continue;
        }
        for seg in list(&task_dir)? {
            let is_seg = seg
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_name)
                .is_some();
            if !is_seg {
                continue;
            }
            report.files += 1;
            match reseal_segment(ring, &seg) {
                Ok(0) => {}
                Ok(n) => {
                    report.rewritten += 1;
                    report.records += n;
                }
                Err(e) => report.failed.push(e.to_string()),
            }
        }
    }
    Ok(report)
}

/// Re-seal one segment file; returns how many records changed key.
fn reseal_segment(ring: &KeyRing, path: &Path) -> Result<usize, SpoolError> {
    let bytes = fs::read(path).map_err(super::io_err("read", path))?;
    let integrity = |detail: String| SpoolError::Integrity {
        path: path.to_path_buf(),
        detail,
    };
    let current = ring.current_id();
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = 0;
    for part in record::split_records(&bytes) {
        let (offset, sealed) = part.map_err(|e| integrity(e.to_string()))?;
        let under = Opener::new(ring, sealed)
            .map(|o| o.key_id().to_string())
            .map_err(|e| integrity(format!("record at byte {offset}: {e}")))?;
        // Verify every record, also those already under the current key.
        let plain = Zeroizing::new(
            delegate_crypto::open(ring, sealed)
                .map_err(|e| integrity(format!("record at byte {offset}: {e}")))?,
        );
        if under == current {
            out.extend_from_slice(&bytes[offset..offset + record::LEN_PREFIX + sealed.len()]);
        } else {
            out.extend(frame_sealed(delegate_crypto::seal(ring, &plain)?)?);
            changed += 1;
        }
    }
    if changed == 0 {
        return Ok(0);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(super::io_err("rewrite", path)(e));
    }
    Ok(changed)
}
