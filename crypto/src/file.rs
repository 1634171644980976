//! Sealed files on disk: atomic sealed writes, opening with the file named in errors, re-sealing
//! under the current key.
//!
//! Owns: temp-file naming, permissions (0600), fsync and rename. Must never: write plaintext to
//! disk (the temp file only ever receives ciphertext from a [`Sealer`]), leave a temp file behind
//! on failure or drop, or replace the target before the new content is complete and synced.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{CryptoError, Result};
use crate::format::random_fill;
use crate::keyring::KeyRing;
use crate::stream::{open_reader, Opener, Sealer};

/// Seals `plaintext` into `path` atomically (temp file in the same directory, fsync, rename,
/// fsync of the directory). The file is mode 0600.
pub fn seal_to_file(ring: &KeyRing, path: &Path, plaintext: &[u8]) -> Result<()> {
    let mut writer = SealedFileWriter::create(ring, path)?;
    writer
        .write_all(plaintext)
        .map_err(|e| CryptoError::from_io(e, "write sealed file", Some(path)))?;
    writer.commit()
}

/// Opens the sealed file at `path` whole. Errors name the file.
pub fn open_file(ring: &KeyRing, path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| CryptoError::io("open sealed file", Some(path), e))?;
    open_reader(ring, BufReader::new(file), Some(path))
}

/// Opens the sealed file at `path` for streaming reads. Errors name the file.
pub fn open_file_reader(ring: &KeyRing, path: &Path) -> Result<Opener<BufReader<File>>> {
    let file = File::open(path).map_err(|e| CryptoError::io("open sealed file", Some(path), e))?;
    Opener::with_path(ring, BufReader::new(file), path)
}

/// A sealed file being written incrementally. Nothing appears at the target path until
/// [`SealedFileWriter::commit`]; dropping the writer removes its temp file.
pub struct SealedFileWriter {
    sealer: Option<Sealer<BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl SealedFileWriter {
    /// Starts writing a sealed file that will replace `path` on commit.
    pub fn create(ring: &KeyRing, path: &Path) -> Result<SealedFileWriter> {
        let dir = parent_dir(path);
        let (file, tmp) = create_temp(dir, path)?;
        let mut writer = SealedFileWriter {
            sealer: None,
            tmp,
            path: path.to_path_buf(),
            committed: false,
        };
        let sealer =
            Sealer::new(ring, BufWriter::new(file)).map_err(|e| e.with_file_if_missing(path))?;
        writer.sealer = Some(sealer);
        Ok(writer)
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seals the final chunk, fsyncs, renames over the target and fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let path = self.path.clone();
        let sealer = self
            .sealer
            .take()
            .ok_or(CryptoError::Poisoned(Some(path.clone())))?;
        let buffered = sealer.finish().map_err(|e| e.with_file_if_missing(&path))?;
        let file = buffered
            .into_inner()
            .map_err(|e| CryptoError::io("write sealed file", Some(&path), e.into_error()))?;
        file.sync_all()
            .map_err(|e| CryptoError::io("fsync sealed file", Some(&path), e))?;
        drop(file);
        fs::rename(&self.tmp, &path)
            .map_err(|e| CryptoError::io("rename sealed file into place", Some(&path), e))?;
        self.committed = true;
        sync_dir(parent_dir(&path))
    }
}

impl Write for SealedFileWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.sealer.as_mut() {
            Some(sealer) => sealer.write(data),
            None => Err(CryptoError::Poisoned(Some(self.path.clone())).into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.sealer.as_mut() {
            Some(sealer) => sealer.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for SealedFileWriter {
    fn drop(&mut self) {
        drop(self.sealer.take());
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl std::fmt::Debug for SealedFileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFileWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What [`reseal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reseal {
    /// The file was already sealed under the current key; it was left untouched.
    AlreadyCurrent {
        /// The current key id.
        key_id: String,
    },
    /// The file was re-encrypted.
    Resealed {
        /// The key id it was sealed under.
        from: String,
        /// The current key id it is now sealed under.
        to: String,
    },
}

/// Re-encrypts the sealed file at `path` under the ring's current key, streaming (one chunk of
/// plaintext in memory at a time). The original stays in place until the new file is complete,
/// verified end to end and synced; a file that fails verification is left untouched and the
/// error names it.
pub fn reseal(ring: &KeyRing, path: &Path) -> Result<Reseal> {
    let mut opener = open_file_reader(ring, path)?;
    let from = opener.key_id().to_owned();
    let to = ring.current_id().to_owned();
    if from == to {
        return Ok(Reseal::AlreadyCurrent { key_id: to });
    }
    let mut writer = SealedFileWriter::create(ring, path)?;
    while let Some(chunk) = opener.next_chunk()? {
        writer
            .write_all(chunk)
            .map_err(|e| CryptoError::from_io(e, "write resealed file", Some(path)))?;
    }
    writer.commit()?;
    Ok(Reseal::Resealed { from, to })
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `dir/.<name>.<random>.tmp` with mode 0600 (never an existing file).
fn create_temp(dir: &Path, target: &Path) -> Result<(File, PathBuf)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sealed".to_owned());
    let mut rnd = [0u8; 6];
    random_fill(&mut rnd)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(rnd)));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| CryptoError::io("create temp file", Some(&tmp), e))?;
    Ok((file, tmp))
}

/// Writes `bytes` to a fresh synced 0600 temp file in `dir`; returns its path.
pub(crate) fn write_temp(dir: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let (mut file, tmp) = create_temp(dir, Path::new("key"))?;
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        let _ = fs::remove_file(&tmp);
        return Err(CryptoError::io("write temp file", Some(&tmp), e));
    }
    Ok(tmp)
}

/// Replaces `path` with `bytes` atomically (0600). For small non-secret files like `current`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    let tmp = write_temp(dir, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(CryptoError::io("rename into place", Some(path), e));
    }
    sync_dir(dir)
}

/// Makes a rename or link in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CryptoError::io("fsync directory", Some(dir), e))
}
