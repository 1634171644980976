//! At-rest sealing for Delegate: AES-256-GCM in a chunked streaming format with key ids, per-file
//! keys derived with HKDF-SHA256, and key rings that rotate.
//!
//! What this crate owns: the sealed file format, master keys in memory and on disk (key
//! directory), atomic sealed file writes. What it must never do: write plaintext to disk, release
//! unauthenticated plaintext, panic on any input, or put key bytes, environment key values or
//! plaintext into an error or `Debug` output. It does not read the process environment (callers
//! pass an environment key's value) and does no logging.
//!
//! # Use
//!
//! ```
//! # fn main() -> Result<(), delegate_crypto::CryptoError> {
//! use delegate_crypto::{open, seal, KeyRing};
//! let ring = KeyRing::from_key("k1", &[7u8; 32])?;
//! let sealed = seal(&ring, b"state")?;
//! assert_eq!(open(&ring, &sealed)?, b"state");
//! # Ok(()) }
//! ```
//! Streaming: [`Sealer`] (any `Write`), [`Opener`] (any `Read`). Files: [`seal_to_file`],
//! [`SealedFileWriter`], [`open_file`], [`open_file_reader`], [`reseal`]. Keys: [`KeyRing::load`],
//! [`KeyRing::load_or_create`], [`generate_key_file`], [`rotate`].
//!
//! # Sealed stream format, version 1
//!
//! All integers big-endian. `L` is the key id length.
//!
//! | offset   | size | field |
//! |----------|------|-------|
//! | 0        | 4    | magic `DLGS` |
//! | 4        | 1    | format version = `1` |
//! | 5        | 1    | `L`, key id length, 1..=64 |
//! | 6        | L    | key id, ASCII `[A-Za-z0-9._-]`, not starting with `.` |
//! | 6+L      | 32   | salt (random per file) |
//! | 38+L     | 7    | nonce prefix (random per file) |
//! | 45+L     | 4    | chunk size `C`: plaintext bytes per non-final chunk, 1..=1048576 (default 65536) |
//! | 49+L     | 16   | header tag |
//! | 65+L     | ...  | chunks |
//!
//! * **Header** `H` = bytes `0 .. 49+L` (everything before the header tag).
//! * **File key** `K` = HKDF-SHA256(salt = salt, IKM = master key named by the key id,
//!   info = `"delegate-crypto v1 file key\0" || key id`), 32 bytes.
//! * **Nonces** (96 bits, the STREAM construction) = nonce prefix (7) || counter (u32) || flag (1),
//!   flag `0` = non-final chunk, `1` = final chunk, `2` = header tag (with counter `0xFFFFFFFF`).
//! * **Header tag** = the AES-256-GCM tag of the empty plaintext under `K`, the header-tag nonce and
//!   AAD `H`. It makes a tampered header (or a key id swapped for another known key) fail before any
//!   chunk is read.
//! * **Chunks** `i = 0 .. n-1`, `n >= 1`: AES-256-GCM(`K`, nonce(prefix, i, last = i == n-1),
//!   AAD = `H`, plaintext chunk `i`) = ciphertext || 16-byte tag. Every non-final chunk holds
//!   exactly `C` plaintext bytes; the final one 0..=`C` (an empty input is one empty final chunk).
//!   Chunks carry no length: a reader takes `C + 16` bytes at a time, and the piece that reaches the
//!   end of input is the final chunk.
//!
//! Overhead: `65 + L` bytes of header plus 16 bytes per chunk ([`sealed_len`]).
//!
//! What this detects, as [`IntegrityFailure`]s: any changed header byte (bad magic, version, key id
//! length; unknown key id; otherwise the header tag), any changed chunk byte or tag (that chunk's
//! index), chunks reordered or dropped (the counter in the nonce), truncation at a chunk boundary
//! (the last full chunk authenticates only as non-final: "truncated after chunk N") and inside a
//! chunk (that chunk fails), bytes appended after the final chunk (the final chunk no longer
//! authenticates), and a file moved under another key id.
//!
//! What it does not provide: hiding the plaintext length (to within a chunk) or the key id;
//! protection against replacing a whole file with an older, authentic sealed file (rollback); key
//! zeroization inside the `aes-gcm` cipher state (derived keys in this crate's own buffers are
//! wiped, AES round keys are not).

mod error;
mod file;
mod format;
mod keyring;
mod stream;

pub use error::{CryptoError, IntegrityFailure};
pub use file::{open_file, open_file_reader, reseal, seal_to_file, Reseal, SealedFileWriter};
pub use format::{
    sealed_len, sealed_len_with_chunk_size, validate_key_id, DEFAULT_CHUNK_SIZE, MAGIC,
    MAX_CHUNK_SIZE, MAX_KEY_ID_LEN, MIN_CHUNK_SIZE, NONCE_PREFIX_LEN, SALT_LEN, TAG_LEN, VERSION,
};
pub use keyring::{
    generate_key_file, has_key_files, import_key_file, restrict_permissions, rotate, write_current,
    KeyRing, CURRENT_FILE, DEFAULT_ENV_KEY_ID, KEY_LEN,
};
pub use stream::{open, seal, Opener, Sealer};
