//! Master keys by id, one of them current; loading them from a key directory and an optional
//! environment-variable value; generating and rotating key files.
//!
//! Key directory layout: `<id>.key` files (32 raw bytes, or 64 hex characters with optional
//! surrounding whitespace), each mode 0600 or stricter, plus an optional `current` file holding
//! the current key id. Other files are ignored.
//!
//! Owns: key bytes in memory (boxed, zeroized on drop), key-file permissions, which key is
//! current. Must never: print or log key bytes (`Debug` shows ids only), put an environment key's
//! value in an error, overwrite an existing key file, or read the process environment itself
//! (callers pass the value).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, Result};
use crate::format::{random_fill, validate_key_id};

/// Name of the file in the key directory that holds the current key id.
pub const CURRENT_FILE: &str = "current";
/// Key id given to an environment key passed without an explicit `<id>:` prefix.
pub const DEFAULT_ENV_KEY_ID: &str = "env";
/// Length of a master key.
pub const KEY_LEN: usize = 32;

/// One master key. Boxed so moves inside the map never leave copies behind; wiped on drop.
struct MasterKey(Box<[u8; KEY_LEN]>);

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Several 32-byte master keys by id, one of them current (used for sealing); all of them open.
pub struct KeyRing {
    keys: BTreeMap<String, MasterKey>,
    current: String,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// A ring holding one key, which is current.
    pub fn from_key(id: &str, key: &[u8; KEY_LEN]) -> Result<KeyRing> {
        validate_key_id(id)?;
        let mut keys = BTreeMap::new();
        keys.insert(id.to_owned(), MasterKey(Box::new(*key)));
        Ok(KeyRing {
            keys,
            current: id.to_owned(),
        })
    }

    /// Adds a key (not current). Refuses an id that is already present.
    pub fn add(&mut self, id: &str, key: &[u8; KEY_LEN]) -> Result<()> {
        validate_key_id(id)?;
        if self.keys.contains_key(id) {
            return Err(CryptoError::KeyRing(format!(
                "key id {id:?} is defined twice"
            )));
        }
        self.keys.insert(id.to_owned(), MasterKey(Box::new(*key)));
        Ok(())
    }

    /// Makes `id` (already in the ring) the key new data is sealed under.
    pub fn set_current(&mut self, id: &str) -> Result<()> {
        if !self.keys.contains_key(id) {
            return Err(CryptoError::KeyRing(format!("no key with id {id:?}")));
        }
        self.current = id.to_owned();
        Ok(())
    }

    /// The id new data is sealed under.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Whether a key with this id is present.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// All key ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub(crate) fn key(&self, id: &str) -> Option<&[u8; KEY_LEN]> {
        self.keys.get(id).map(|k| &*k.0)
    }

    pub(crate) fn current(&self) -> Result<(&str, &[u8; KEY_LEN])> {
        // Constructors and `set_current` keep `current` in the map; this error would be a bug.
        self.keys
            .get_key_value(&self.current)
            .map(|(id, key)| (id.as_str(), &*key.0))
            .ok_or_else(|| CryptoError::KeyRing("current key missing from the ring".into()))
    }

    /// Loads every `<id>.key` in `dir` plus the environment key `env_key` (its value, if the
    /// caller's variable is set: `<64 hex>` with id `env`, or `<id>:<64 hex>`).
    ///
    /// The current key is: the id in `dir/current` if that file exists; else the environment key
    /// if given; else the only key file if there is exactly one. A missing `dir` counts as empty.
    pub fn load(dir: &Path, env_key: Option<&str>) -> Result<KeyRing> {
        let mut found: BTreeMap<String, MasterKey> = BTreeMap::new();
        let mut file_ids = Vec::new();
        match fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry =
                        entry.map_err(|e| CryptoError::io("list key directory", Some(dir), e))?;
                    let path = entry.path();
                    let name = entry.file_name();
                    let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".key")) else {
                        continue;
                    };
                    if id.starts_with('.') {
                        continue; // temp files of an interrupted generate
                    }
                    validate_key_id(id).map_err(|_| CryptoError::KeyFile {
                        path: path.clone(),
                        problem: "file name is not a valid key id (A-Z a-z 0-9 . _ -, at most 64)"
                            .into(),
                    })?;
                    let key = read_key_file(&path)?;
                    file_ids.push(id.to_owned());
                    found.insert(id.to_owned(), key);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CryptoError::io("list key directory", Some(dir), e)),
        }
        let mut env_id = None;
        if let Some(value) = env_key {
            let (id, key) = parse_env_key(value)?;
            if found.contains_key(&id) {
                return Err(CryptoError::KeyRing(format!(
                    "key id {id:?} is defined both by the environment key and by a key file in {}",
                    dir.display()
                )));
            }
            found.insert(id.clone(), key);
            env_id = Some(id);
        }
        let current = match read_current_file(dir)? {
            Some(id) => {
                if !found.contains_key(&id) {
                    return Err(CryptoError::KeyFile {
                        path: dir.join(CURRENT_FILE),
                        problem: format!("names key id {id:?}, which has no key file and is not the environment key"),
                    });
                }
                id
            }
            None => match (env_id, file_ids.as_slice()) {
                (Some(id), _) => id,
                (None, [only]) => only.clone(),
                (None, []) => {
                    return Err(CryptoError::KeyRing(format!(
                        "no key: {} holds no <id>.key file and no environment key was given",
                        dir.display()
                    )))
                }
                (None, many) => {
                    return Err(CryptoError::KeyRing(format!(
                    "{} holds {} key files but no `{CURRENT_FILE}` file saying which is current",
                    dir.display(),
                    many.len()
                )))
                }
            },
        };
        Ok(KeyRing {
            keys: found,
            current,
        })
    }

    /// [`KeyRing::load`], but when there is no key at all (no key file, no environment key),
    /// first generates one in `dir` (created 0700 if missing) and makes it current. For `init`
    /// and first start.
    pub fn load_or_create(dir: &Path, env_key: Option<&str>) -> Result<KeyRing> {
        if env_key.is_none() && !has_key_files(dir)? {
            rotate(dir)?;
        }
        KeyRing::load(dir, env_key)
    }
}

/// Whether `dir` holds a key file (`*.key`; a dot-prefixed name is a temporary file being
/// written, not a key). A missing directory holds none.
pub fn has_key_files(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry =
                    entry.map_err(|e| CryptoError::io("list key directory", Some(dir), e))?;
                let name = entry.file_name();
                if name
                    .to_str()
                    .is_some_and(|n| n.ends_with(".key") && !n.starts_with('.'))
                {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CryptoError::io("list key directory", Some(dir), e)),
    }
}

fn read_key_file(path: &Path) -> Result<MasterKey> {
    let problem = |p: String| CryptoError::KeyFile {
        path: path.to_path_buf(),
        problem: p,
    };
    let meta = fs::metadata(path).map_err(|e| CryptoError::io("stat key file", Some(path), e))?;
    if !meta.is_file() {
        return Err(problem("not a regular file".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(problem(format!(
            "mode is {mode:04o}; it must be 0600 or stricter (chmod 600 {})",
            path.display()
        )));
    }
    let bytes = Zeroizing::new(
        fs::read(path).map_err(|e| CryptoError::io("read key file", Some(path), e))?,
    );
    let key = decode_key(&bytes).ok_or_else(|| {
        problem(format!(
            "holds {} bytes; expected 32 raw bytes or 64 hex characters",
            bytes.len()
        ))
    })?;
    Ok(key)
}

/// 32 raw bytes, or 64 hex characters with optional surrounding ASCII whitespace.
fn decode_key(bytes: &[u8]) -> Option<MasterKey> {
    let mut key = MasterKey(Box::new([0u8; KEY_LEN]));
    if bytes.len() == KEY_LEN {
        key.0.copy_from_slice(bytes);
        return Some(key);
    }
    let trimmed = bytes.trim_ascii();
    if trimmed.len() == 2 * KEY_LEN && hex::decode_to_slice(trimmed, &mut key.0[..]).is_ok() {
        return Some(key);
    }
    None
}

fn parse_env_key(value: &str) -> Result<(String, MasterKey)> {
    let value = value.trim();
    let (id, hex_part) = match value.split_once(':') {
        Some((id, rest)) => (id, rest),
        None => (DEFAULT_ENV_KEY_ID, value),
    };
    validate_key_id(id)
        .map_err(|_| CryptoError::EnvKey("the key id before ':' is not a valid key id"))?;
    let mut key = MasterKey(Box::new([0u8; KEY_LEN]));
    if hex_part.len() != 2 * KEY_LEN || hex::decode_to_slice(hex_part, &mut key.0[..]).is_err() {
        return Err(CryptoError::EnvKey(
            "expected 64 hex characters, optionally prefixed by '<id>:'",
        ));
    }
    Ok((id.to_owned(), key))
}

fn read_current_file(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(CURRENT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            validate_key_id(id).map_err(|_| CryptoError::KeyFile {
                path: path.clone(),
                problem: "does not hold a valid key id".into(),
            })?;
            Ok(Some(id.to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CryptoError::io("read current key id", Some(&path), e)),
    }
}

/// Generates a random 32-byte key in `dir/<id>.key` (mode 0600; `dir` created 0700 if missing)
/// and returns its id. Does not change which key is current. Never overwrites a key file.
pub fn generate_key_file(dir: &Path) -> Result<String> {
    ensure_dir(dir)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    random_fill(key.as_mut())?;
    let mut raw_id = [0u8; 8];
    random_fill(&mut raw_id)?;
    let id = format!("k{}", hex::encode(raw_id));
    let path = dir.join(format!("{id}.key"));
    let tmp = crate::file::write_temp(dir, key.as_ref())?;
    // `hard_link` fails if the target exists, so an existing key is never replaced.
    let linked =
        fs::hard_link(&tmp, &path).map_err(|e| CryptoError::io("install key file", Some(&path), e));
    let _ = fs::remove_file(&tmp);
    linked?;
    crate::file::sync_dir(dir)?;
    Ok(id)
}

/// Generates a new key in `dir` and makes it current (recorded in `dir/current`). Existing keys
/// stay, so data sealed under them still opens. Returns the new id.
pub fn rotate(dir: &Path) -> Result<String> {
    let id = generate_key_file(dir)?;
    write_current(dir, &id)?;
    Ok(id)
}

/// Records `id` as the current key of `dir` (atomically). The key file must exist.
pub fn write_current(dir: &Path, id: &str) -> Result<()> {
    validate_key_id(id)?;
    let key_path = dir.join(format!("{id}.key"));
    if !key_path.is_file() {
        return Err(CryptoError::KeyRing(format!(
            "no key file {}",
            key_path.display()
        )));
    }
    crate::file::write_atomic(&dir.join(CURRENT_FILE), format!("{id}\n").as_bytes())
}

fn ensure_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CryptoError::io("create key directory", Some(dir), e))
}

/// Sets mode 0600 on a file (used by tests and callers that import keys).
pub fn restrict_permissions(path: &Path) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| CryptoError::io("chmod 600", Some(path), e))
}

/// Writes `key` as a 0600 key file `dir/<id>.key` (for importing a known key). Never overwrites.
pub fn import_key_file(dir: &Path, id: &str, key: &[u8; KEY_LEN]) -> Result<PathBuf> {
    validate_key_id(id)?;
    ensure_dir(dir)?;
    let path = dir.join(format!("{id}.key"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CryptoError::io("create key file", Some(&path), e))?;
    file.write_all(key)
        .and_then(|()| file.sync_all())
        .map_err(|e| CryptoError::io("write key file", Some(&path), e))?;
    crate::file::sync_dir(dir)?;
    Ok(path)
}
