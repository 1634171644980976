//! Incremental sealing and opening over any `std::io::Write` / `std::io::Read`.
//!
//! Owns: the chunking of a stream, chunk authentication, and the detection of truncation,
//! reordering and tampering. Must never: release a chunk's plaintext before its tag verified, keep
//! more than one chunk of plaintext in memory, or keep going after a failure (a failed stream is
//! poisoned).
//!
//! Plaintext released by [`Opener`] is authentic chunk by chunk; that the stream is *complete* is
//! only known when the opener reports the end (`Ok(None)` / `Ok(0)`). A consumer that acts on
//! data before the end must be ready to undo it if a later chunk fails ([`open`] and
//! [`crate::open_file`] only return after the end).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Tag};
use zeroize::Zeroizing;

use crate::error::{CryptoError, IntegrityFailure, Result};
use crate::format::{
    header_len, sealed_len, Header, DEFAULT_CHUNK_SIZE, MAGIC, MAX_KEY_ID_LEN, REST_LEN, TAG_LEN,
    VERSION,
};
use crate::keyring::KeyRing;

/// Seals everything written to it into `out`, under the key ring's current key.
///
/// Ciphertext reaches `out` one full chunk at a time; [`Sealer::finish`] seals the final
/// (possibly partial, possibly empty) chunk. A `Sealer` dropped without `finish` leaves a stream
/// that openers reject as truncated. `flush` flushes `out` but cannot force out a partial chunk.
pub struct Sealer<W: Write> {
    out: W,
    header: Header,
    cipher: Aes256Gcm,
    counter: u64,
    chunk_size: usize,
    buf: Zeroizing<Vec<u8>>,
    poisoned: bool,
}

impl<W: Write> Sealer<W> {
    /// Writes the header to `out` and returns a sealer with the default 64 KiB chunks.
    pub fn new(ring: &KeyRing, out: W) -> Result<Self> {
        Self::with_chunk_size(ring, out, DEFAULT_CHUNK_SIZE)
    }

    /// Like [`Sealer::new`] with `chunk_size` plaintext bytes per chunk
    /// (`MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`).
    pub fn with_chunk_size(ring: &KeyRing, mut out: W, chunk_size: usize) -> Result<Self> {
        let (key_id, master) = ring.current()?;
        let header = Header::new(key_id, chunk_size)?;
        let cipher = header.cipher(master);
        let tag = header.tag(&cipher)?;
        out.write_all(&header.bytes)
            .and_then(|()| out.write_all(&tag))
            .map_err(|e| CryptoError::io("write sealed header", None, e))?;
        Ok(Sealer {
            out,
            header,
            cipher,
            counter: 0,
            chunk_size,
            buf: Zeroizing::new(Vec::with_capacity(chunk_size)),
            poisoned: false,
        })
    }

    /// The id of the key this stream is sealed under.
    pub fn key_id(&self) -> &str {
        &self.header.key_id
    }

    /// Seals the final chunk, flushes, and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        if self.poisoned {
            return Err(CryptoError::Poisoned(None));
        }
        self.seal_chunk(true)?;
        self.out
            .flush()
            .map_err(|e| CryptoError::io("flush sealed data", None, e))?;
        Ok(self.out)
    }

    fn seal_chunk(&mut self, last: bool) -> Result<()> {
        let result = self.seal_chunk_inner(last);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn seal_chunk_inner(&mut self, last: bool) -> Result<()> {
        let counter = u32::try_from(self.counter).map_err(|_| CryptoError::StreamTooLong)?;
        let nonce = self.header.nonce(counter, last);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &self.header.bytes, self.buf.as_mut_slice())
            .map_err(|_| CryptoError::StreamTooLong)?;
        self.out
            .write_all(&self.buf)
            .and_then(|()| self.out.write_all(&tag))
            .map_err(|e| CryptoError::io("write sealed data", None, e))?;
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(CryptoError::Poisoned(None).into());
        }
        let mut rest = data;
        while !rest.is_empty() {
            // A full buffer is sealed as non-final only once more data arrives, so a stream whose
            // length is a multiple of the chunk size ends with a full final chunk.
            if self.buf.len() == self.chunk_size {
                self.seal_chunk(false)?;
            }
            let take = (self.chunk_size - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> std::fmt::Debug for Sealer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.header.key_id)
            .field("chunks_written", &self.counter)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// Opens a sealed stream read from `reader`, verifying each chunk before releasing it.
///
/// Use [`Opener::next_chunk`] or [`Opener::copy_to`] for typed errors; the [`Read`] impl wraps
/// them in `io::Error` (recover with [`CryptoError::from_io`]).
pub struct Opener<R: Read> {
    reader: R,
    header: Header,
    cipher: Aes256Gcm,
    path: Option<PathBuf>,
    counter: u64,
    buf: Zeroizing<Vec<u8>>,
    lookahead: Option<u8>,
    plain_len: usize,
    pos: usize,
    state: OpenState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenState {
    /// More chunks follow the one in `buf`.
    Reading,
    /// The chunk in `buf` is the verified final chunk.
    Finished,
    /// A failure happened; nothing more is released.
    Failed,
}

impl<R: Read> Opener<R> {
    /// Reads and authenticates the header. Fails on bad magic, unknown version, unknown key id or
    /// a tampered header.
    pub fn new(ring: &KeyRing, reader: R) -> Result<Self> {
        Self::open_inner(ring, reader, None)
    }

    /// Like [`Opener::new`], naming `path` in every error.
    pub fn with_path(ring: &KeyRing, reader: R, path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_inner(ring, reader, Some(path.into()))
    }

    fn open_inner(ring: &KeyRing, mut reader: R, path: Option<PathBuf>) -> Result<Self> {
        let p = path.as_deref();
        let header = read_header(&mut reader, p)?;
        let master = ring.key(&header.key_id).ok_or_else(|| {
            CryptoError::integrity(p, IntegrityFailure::UnknownKeyId(header.key_id.clone()))
        })?;
        let cipher = header.cipher(master);
        let mut tag = [0u8; TAG_LEN];
        read_exact_or(&mut reader, &mut tag, p, IntegrityFailure::TruncatedHeader)?;
        if !header.verify_tag(&cipher, &tag) {
            return Err(CryptoError::integrity(
                p,
                IntegrityFailure::HeaderAuthentication,
            ));
        }
        let cap = header.chunk_size + TAG_LEN;
        Ok(Opener {
            reader,
            header,
            cipher,
            path,
            counter: 0,
            buf: Zeroizing::new(Vec::with_capacity(cap)),
            lookahead: None,
            plain_len: 0,
            pos: 0,
            state: OpenState::Reading,
        })
    }

    /// The id of the key the stream was sealed under.
    pub fn key_id(&self) -> &str {
        &self.header.key_id
    }

    /// The next verified piece of plaintext (the rest of the current chunk), or `None` once the
    /// authentic final chunk has been released. May return an empty slice (an empty final chunk).
    pub fn next_chunk(&mut self) -> Result<Option<&[u8]>> {
        if self.pos >= self.plain_len {
            match self.state {
                OpenState::Finished => return Ok(None),
                OpenState::Failed => return Err(CryptoError::Poisoned(self.path.clone())),
                OpenState::Reading => {
                    if let Err(e) = self.load_chunk() {
                        self.state = OpenState::Failed;
                        self.plain_len = 0;
                        self.pos = 0;
                        self.buf.iter_mut().for_each(|b| *b = 0);
                        return Err(e);
                    }
                }
            }
        }
        let start = self.pos;
        self.pos = self.plain_len;
        Ok(Some(&self.buf[start..self.plain_len]))
    }

    /// Writes all remaining plaintext to `out`; returns the number of bytes written.
    pub fn copy_to<W: Write>(&mut self, mut out: W) -> Result<u64> {
        let mut total = 0u64;
        while let Some(chunk) = self.next_chunk()? {
            out.write_all(chunk)
                .map_err(|e| CryptoError::io("write opened data", None, e))?;
            total += chunk.len() as u64;
        }
        Ok(total)
    }

    fn failure(&self, failure: IntegrityFailure) -> CryptoError {
        CryptoError::integrity(self.path.as_deref(), failure)
    }

    /// Reads the next chunk (and one byte of lookahead, which says whether it is the final one),
    /// verifies and decrypts it into `buf`.
    fn load_chunk(&mut self) -> Result<()> {
        let full = self.header.chunk_size + TAG_LEN;
        let index = self.counter;
        self.buf.clear();
        self.buf.resize(full, 0);
        let mut n = 0;
        if let Some(b) = self.lookahead.take() {
            self.buf[0] = b;
            n = 1;
        }
        n += read_full(&mut self.reader, &mut self.buf[n..])
            .map_err(|e| CryptoError::io("read sealed data", self.path.as_deref(), e))?;
        let mut one = [0u8; 1];
        let more = n == full
            && read_full(&mut self.reader, &mut one)
                .map_err(|e| CryptoError::io("read sealed data", self.path.as_deref(), e))?
                == 1;
        if n == 0 {
            return Err(self.failure(IntegrityFailure::Truncated { chunks: index }));
        }
        let counter =
            u32::try_from(index).map_err(|_| self.failure(IntegrityFailure::Chunk { index }))?;
        if n < TAG_LEN {
            return Err(self.failure(IntegrityFailure::Chunk { index }));
        }
        let (body, tag) = self.buf[..n].split_at_mut(n - TAG_LEN);
        let tag = Tag::clone_from_slice(tag);
        let aad = &self.header.bytes;
        let ok = self
            .cipher
            .decrypt_in_place_detached(&self.header.nonce(counter, !more), aad, body, &tag)
            .is_ok();
        if !ok {
            // A full chunk that authenticates as non-final but is followed by nothing: the stream
            // was cut at a chunk boundary. (Verification left `body` untouched.)
            if !more
                && n == full
                && self
                    .cipher
                    .decrypt_in_place_detached(&self.header.nonce(counter, false), aad, body, &tag)
                    .is_ok()
            {
                return Err(self.failure(IntegrityFailure::Truncated { chunks: index + 1 }));
            }
            return Err(self.failure(IntegrityFailure::Chunk { index }));
        }
        if more {
            self.lookahead = Some(one[0]);
        } else {
            self.state = OpenState::Finished;
        }
        self.counter += 1;
        self.plain_len = n - TAG_LEN;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.plain_len {
                let n = (self.plain_len - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match self.next_chunk() {
                Ok(None) => return Ok(0),
                Ok(Some(_)) => {
                    // `next_chunk` marked the chunk consumed; rewind to serve it from `buf`.
                    self.pos = 0;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<R: Read> std::fmt::Debug for Opener<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("key_id", &self.header.key_id)
            .field("path", &self.path)
            .field("chunks_read", &self.counter)
            .finish_non_exhaustive()
    }
}

/// Seals `plaintext` under the ring's current key.
pub fn seal(ring: &KeyRing, plaintext: &[u8]) -> Result<Vec<u8>> {
    let cap = usize::try_from(sealed_len(ring.current_id(), plaintext.len() as u64)).unwrap_or(0);
    let mut sealer = Sealer::new(ring, Vec::with_capacity(cap))?;
    sealer
        .write_all(plaintext)
        .map_err(|e| CryptoError::from_io(e, "seal", None))?;
    sealer.finish()
}

/// Opens a whole sealed buffer. Returns the plaintext only if every chunk verified and the stream
/// is complete.
pub fn open(ring: &KeyRing, sealed: &[u8]) -> Result<Vec<u8>> {
    open_reader(ring, sealed, None)
}

pub(crate) fn open_reader<R: Read>(
    ring: &KeyRing,
    reader: R,
    path: Option<&Path>,
) -> Result<Vec<u8>> {
    let mut opener = match path {
        Some(p) => Opener::with_path(ring, reader, p)?,
        None => Opener::new(ring, reader)?,
    };
    // Partial plaintext is wiped if a later chunk fails.
    let mut out = Zeroizing::new(Vec::new());
    opener.copy_to(&mut *out)?;
    Ok(std::mem::take(&mut *out))
}

/// Reads the header up to (not including) its tag.
fn read_header<R: Read>(reader: &mut R, path: Option<&Path>) -> Result<Header> {
    let integrity = |f| CryptoError::integrity(path, f);
    let mut prefix = [0u8; 6];
    let n = read_full(reader, &mut prefix[..4])
        .map_err(|e| CryptoError::io("read sealed header", path, e))?;
    if prefix[..n] != MAGIC[..n] {
        return Err(integrity(IntegrityFailure::BadMagic));
    }
    if n < 4 {
        return Err(integrity(IntegrityFailure::TruncatedHeader));
    }
    read_exact_or(
        reader,
        &mut prefix[4..],
        path,
        IntegrityFailure::TruncatedHeader,
    )?;
    if prefix[4] != VERSION {
        return Err(integrity(IntegrityFailure::UnsupportedVersion(prefix[4])));
    }
    let id_len = prefix[5] as usize;
    if id_len == 0 || id_len > MAX_KEY_ID_LEN {
        return Err(integrity(IntegrityFailure::MalformedHeader(
            "key id length out of range",
        )));
    }
    let mut id = [0u8; MAX_KEY_ID_LEN];
    read_exact_or(
        reader,
        &mut id[..id_len],
        path,
        IntegrityFailure::TruncatedHeader,
    )?;
    let mut rest = [0u8; REST_LEN];
    read_exact_or(reader, &mut rest, path, IntegrityFailure::TruncatedHeader)?;
    let header = Header::parse(&prefix, &id[..id_len], &rest).map_err(integrity)?;
    debug_assert_eq!(header.bytes.len(), header_len(id_len));
    Ok(header)
}

fn read_exact_or<R: Read>(
    reader: &mut R,
    buf: &mut [u8],
    path: Option<&Path>,
    short: IntegrityFailure,
) -> Result<()> {
    let n = read_full(reader, buf).map_err(|e| CryptoError::io("read sealed header", path, e))?;
    if n < buf.len() {
        return Err(CryptoError::integrity(path, short));
    }
    Ok(())
}

/// Reads until `buf` is full or the reader reports end of input; returns the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
