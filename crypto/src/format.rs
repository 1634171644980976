//! The byte layout of a sealed stream (see the crate docs for the spec), as pure functions.
//!
//! Owns: header encoding and parsing, per-file key derivation, nonce construction, random bytes.
//! Must never: hold a master key longer than a call, or return a derived key that is not zeroized
//! on drop.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{CryptoError, IntegrityFailure, Result};

/// The first four bytes of every sealed stream.
pub const MAGIC: [u8; 4] = *b"DLGS";
/// The format version this build writes (and the only one it reads).
pub const VERSION: u8 = 1;
/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Length of the random per-file HKDF salt.
pub const SALT_LEN: usize = 32;
/// Length of the random per-file nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;
/// Length of an AES-GCM tag (one per chunk, one for the header).
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk that [`crate::Sealer::new`] uses.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;
/// Smallest chunk size a header may declare.
pub const MIN_CHUNK_SIZE: usize = 1;
/// Largest chunk size a header may declare (bounds the opener's memory).
pub const MAX_CHUNK_SIZE: usize = 1024 * 1024;

/// HKDF `info` prefix; the key id follows it.
const KDF_INFO: &[u8] = b"delegate-crypto v1 file key\0";
/// Last nonce byte of a non-final chunk, the final chunk, and the header tag.
const FLAG_MORE: u8 = 0;
const FLAG_LAST: u8 = 1;
const FLAG_HEADER: u8 = 2;

/// A parsed (or freshly made) header. `bytes` is the exact encoding without the header tag: the
/// AAD of every chunk and of the header tag.
#[derive(Clone)]
pub(crate) struct Header {
    pub key_id: String,
    pub salt: [u8; SALT_LEN],
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub chunk_size: usize,
    pub bytes: Vec<u8>,
}

impl Header {
    pub fn new(key_id: &str, chunk_size: usize) -> Result<Header> {
        validate_key_id(key_id)?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(CryptoError::InvalidChunkSize(chunk_size));
        }
        let mut salt = [0u8; SALT_LEN];
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        random_fill(&mut salt)?;
        random_fill(&mut nonce_prefix)?;
        let mut bytes = Vec::with_capacity(header_len(key_id.len()));
        bytes.extend_from_slice(&MAGIC);
        bytes.push(VERSION);
        bytes.push(key_id.len() as u8);
        bytes.extend_from_slice(key_id.as_bytes());
        bytes.extend_from_slice(&salt);
        bytes.extend_from_slice(&nonce_prefix);
        bytes.extend_from_slice(&(chunk_size as u32).to_be_bytes());
        Ok(Header {
            key_id: key_id.to_owned(),
            salt,
            nonce_prefix,
            chunk_size,
            bytes,
        })
    }

    /// Parses the fields after the key id (`rest` = salt || nonce prefix || chunk size).
    pub fn parse(
        prefix: &[u8; 6],
        key_id: &[u8],
        rest: &[u8; REST_LEN],
    ) -> Result<Header, IntegrityFailure> {
        let key_id = std::str::from_utf8(key_id)
            .ok()
            .filter(|id| validate_key_id(id).is_ok())
            .ok_or(IntegrityFailure::MalformedHeader(
                "key id has forbidden characters",
            ))?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&rest[..SALT_LEN]);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&rest[SALT_LEN..SALT_LEN + NONCE_PREFIX_LEN]);
        let mut size = [0u8; 4];
        size.copy_from_slice(&rest[SALT_LEN + NONCE_PREFIX_LEN..]);
        let chunk_size = u32::from_be_bytes(size) as usize;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(IntegrityFailure::MalformedHeader("chunk size out of range"));
        }
        let mut bytes = Vec::with_capacity(header_len(key_id.len()));
        bytes.extend_from_slice(prefix);
        bytes.extend_from_slice(key_id.as_bytes());
        bytes.extend_from_slice(rest);
        Ok(Header {
            key_id: key_id.to_owned(),
            salt,
            nonce_prefix,
            chunk_size,
            bytes,
        })
    }

    pub fn nonce(&self, counter: u32, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
        self.nonce_with_flag(counter, if last { FLAG_LAST } else { FLAG_MORE })
    }

    fn nonce_with_flag(&self, counter: u32, flag: u8) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[..NONCE_PREFIX_LEN].copy_from_slice(&self.nonce_prefix);
        n[NONCE_PREFIX_LEN..NONCE_PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
        n[11] = flag;
        Nonce::from(n)
    }

    /// The header tag: GCM over an empty plaintext with the header as AAD.
    pub fn tag(&self, cipher: &Aes256Gcm) -> Result<[u8; TAG_LEN]> {
        let nonce = self.nonce_with_flag(u32::MAX, FLAG_HEADER);
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &self.bytes, &mut [])
            // GCM only refuses inputs beyond 2^36 bytes; the header is at most 113 bytes.
            .map_err(|_| CryptoError::StreamTooLong)?;
        Ok(tag.into())
    }

    pub fn verify_tag(&self, cipher: &Aes256Gcm, tag: &[u8; TAG_LEN]) -> bool {
        let nonce = self.nonce_with_flag(u32::MAX, FLAG_HEADER);
        cipher
            .decrypt_in_place_detached(&nonce, &self.bytes, &mut [], Tag::from_slice(tag))
            .is_ok()
    }

    /// The AES-256-GCM cipher for this file: HKDF-SHA256(salt, master key, info || key id).
    pub fn cipher(&self, master: &[u8; 32]) -> Aes256Gcm {
        let mut info = Vec::with_capacity(KDF_INFO.len() + self.key_id.len());
        info.extend_from_slice(KDF_INFO);
        info.extend_from_slice(self.key_id.as_bytes());
        let hk = Hkdf::<Sha256>::new(Some(&self.salt), master);
        let mut okm = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
        if hk.expand(&info, okm.as_mut()).is_err() {
            okm.fill(0);
        }
        Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(okm.as_ref()))
    }
}

/// Bytes after the key id and before the tag: salt, nonce prefix, chunk size.
pub(crate) const REST_LEN: usize = SALT_LEN + NONCE_PREFIX_LEN + 4;

/// Header length without the tag, for a key id of `id_len` bytes.
pub(crate) const fn header_len(id_len: usize) -> usize {
    4 + 1 + 1 + id_len + REST_LEN
}

/// Size of the sealed form of `plaintext_len` bytes under key id `key_id` with the default chunk
/// size (for quota accounting and benches).
pub fn sealed_len(key_id: &str, plaintext_len: u64) -> u64 {
    sealed_len_with_chunk_size(key_id, plaintext_len, DEFAULT_CHUNK_SIZE)
}

/// [`sealed_len`] for an explicit chunk size.
pub fn sealed_len_with_chunk_size(key_id: &str, plaintext_len: u64, chunk_size: usize) -> u64 {
    let chunk = chunk_size.max(1) as u64;
    // The final chunk may be full; an empty input still has one (empty) final chunk.
    let chunks = plaintext_len.div_ceil(chunk).max(1);
    (header_len(key_id.len()) + TAG_LEN) as u64 + plaintext_len + chunks * TAG_LEN as u64
}

/// Key ids name files (`<id>.key`) and appear in headers: 1..=64 bytes of `[A-Za-z0-9._-]`, not
/// starting with `.`.
pub fn validate_key_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CryptoError::InvalidKeyId(id.chars().take(80).collect()))
    }
}

/// Fills `buf` from ring's `SystemRandom` (the OS CSPRNG).
pub(crate) fn random_fill(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new().fill(buf).map_err(|_| CryptoError::Rng)
}
