//! Key directories (permissions, formats, rotation, environment key) and sealed files on disk
//! (0600, atomic, never plaintext, re-seal).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use delegate_crypto::{
    generate_key_file, open, open_file, open_file_reader, reseal, rotate, seal, seal_to_file,
    write_current, CryptoError, IntegrityFailure, KeyRing, Reseal, SealedFileWriter, CURRENT_FILE,
    DEFAULT_CHUNK_SIZE,
};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn write_key(dir: &Path, name: &str, content: &[u8], mode: u32) {
    let path = dir.join(name);
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every byte of every file under `dir` (recursively).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(fs::read(&path).unwrap());
        }
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn loads_raw_and_hex_key_files_and_the_current_file() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "k1.key", &[1u8; 32], 0o600);
    write_key(
        dir.path(),
        "k2.key",
        format!("{}\n", hex::encode([2u8; 32])).as_bytes(),
        0o400,
    );
    fs::write(dir.path().join(CURRENT_FILE), "k2\n").unwrap();
    fs::write(dir.path().join("README"), "ignored").unwrap();
    let ring = KeyRing::load(dir.path(), None).unwrap();
    assert_eq!(ring.current_id(), "k2");
    assert_eq!(ring.ids().collect::<Vec<_>>(), ["k1", "k2"]);
    // The hex file decodes to the same key as the raw bytes would.
    let same = KeyRing::from_key("k2", &[2u8; 32]).unwrap();
    assert_eq!(open(&same, &seal(&ring, b"x").unwrap()).unwrap(), b"x");
}

#[test]
fn key_files_readable_by_others_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "k1.key", &[0xAB; 32], 0o644);
    let err = KeyRing::load(dir.path(), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CryptoError::KeyFile { .. }), "{msg}");
    assert!(
        msg.contains("k1.key") && msg.contains("0644") && msg.contains("0600"),
        "{msg}"
    );
    assert!(!msg.to_lowercase().contains("abab"), "{msg}");
    write_key(dir.path(), "k1.key", &[0xAB; 32], 0o640);
    assert!(KeyRing::load(dir.path(), None).is_err());
}

#[test]
fn malformed_key_files_are_refused_without_printing_their_content() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "k1.key", b"not-a-key-0123456789", 0o600);
    let msg = KeyRing::load(dir.path(), None).unwrap_err().to_string();
    assert!(
        msg.contains("expected 32 raw bytes or 64 hex characters"),
        "{msg}"
    );
    assert!(!msg.contains("not-a-key"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "bad id!.key", &[1; 32], 0o600);
    assert!(matches!(
        KeyRing::load(dir.path(), None),
        Err(CryptoError::KeyFile { .. })
    ));
}

#[test]
fn which_key_is_current() {
    // None at all.
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        KeyRing::load(dir.path(), None),
        Err(CryptoError::KeyRing(_))
    ));
    // Several files and no `current` file: ambiguous.
    write_key(dir.path(), "a.key", &[1; 32], 0o600);
    write_key(dir.path(), "b.key", &[2; 32], 0o600);
    let msg = KeyRing::load(dir.path(), None).unwrap_err().to_string();
    assert!(msg.contains("current"), "{msg}");
    // `current` naming a missing key.
    fs::write(dir.path().join(CURRENT_FILE), "zzz\n").unwrap();
    assert!(matches!(
        KeyRing::load(dir.path(), None),
        Err(CryptoError::KeyFile { .. })
    ));
    assert!(write_current(dir.path(), "zzz").is_err());
    write_current(dir.path(), "b").unwrap();
    assert_eq!(KeyRing::load(dir.path(), None).unwrap().current_id(), "b");
    // A single file is current.
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "only.key", &[1; 32], 0o600);
    assert_eq!(
        KeyRing::load(dir.path(), None).unwrap().current_id(),
        "only"
    );
}

#[test]
fn environment_key_forms_and_precedence() {
    let hex_key = hex::encode([5u8; 32]);
    let missing = Path::new("/nonexistent/delegate-keys");
    let ring = KeyRing::load(missing, Some(&hex_key)).unwrap();
    assert_eq!(ring.current_id(), "env");
    let ring = KeyRing::load(missing, Some(&format!(" prod-1:{hex_key}\n"))).unwrap();
    assert_eq!(ring.current_id(), "prod-1");

    // The env key is current unless a `current` file says otherwise; file keys stay readable.
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), "k1.key", &[1; 32], 0o600);
    let ring = KeyRing::load(dir.path(), Some(&hex_key)).unwrap();
    assert_eq!(ring.current_id(), "env");
    assert!(ring.contains("k1"));
    fs::write(dir.path().join(CURRENT_FILE), "k1").unwrap();
    assert_eq!(
        KeyRing::load(dir.path(), Some(&hex_key))
            .unwrap()
            .current_id(),
        "k1"
    );
    // Same id twice.
    assert!(KeyRing::load(dir.path(), Some(&format!("k1:{hex_key}"))).is_err());

    // Malformed values: the message never contains the value.
    for bad in [
        "deadbeef",
        "zz:0011",
        &format!("bad id:{hex_key}"),
        &format!("{hex_key}00"),
    ] {
        let msg = KeyRing::load(missing, Some(bad)).unwrap_err().to_string();
        assert!(msg.starts_with("environment key"), "{msg}");
        assert!(
            !msg.contains(&hex_key) && !msg.contains("deadbeef"),
            "{msg}"
        );
    }
}

#[test]
fn debug_never_shows_key_bytes() {
    let ring = KeyRing::from_key("k1", &[0x5A; 32]).unwrap();
    let dbg = format!("{ring:?} {ring:#?}");
    assert!(dbg.contains("k1"));
    assert!(
        !dbg.contains("90") && !dbg.to_lowercase().contains("5a5a"),
        "{dbg}"
    );
}

#[test]
fn generated_keys_are_0600_and_rotation_keeps_old_data_readable() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("keys");
    let first = rotate(&dir).unwrap();
    assert_eq!(mode(&dir) & 0o077, 0, "key dir is private");
    let key_path = dir.join(format!("{first}.key"));
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(fs::read(&key_path).unwrap().len(), 32);

    let ring1 = KeyRing::load(&dir, None).unwrap();
    assert_eq!(ring1.current_id(), first);
    let data_path = base.path().join("plan.bin");
    seal_to_file(&ring1, &data_path, b"old plan").unwrap();

    let second = rotate(&dir).unwrap();
    assert_ne!(first, second);
    let ring2 = KeyRing::load(&dir, None).unwrap();
    assert_eq!(ring2.current_id(), second);
    assert_eq!(open_file(&ring2, &data_path).unwrap(), b"old plan");
    let sealed_new = seal(&ring2, b"new").unwrap();
    assert_eq!(&sealed_new[6..6 + second.len()], second.as_bytes());

    // generate_key_file adds a key without changing the current one.
    let third = generate_key_file(&dir).unwrap();
    let ring3 = KeyRing::load(&dir, None).unwrap();
    assert_eq!(ring3.current_id(), second);
    assert!(ring3.contains(&third) && ring3.contains(&first));
    // No temp files are left in the key directory.
    assert!(
        names(&dir).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names(&dir)
    );
}

#[test]
fn load_or_create_generates_once() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("keys");
    let ring = KeyRing::load_or_create(&dir, None).unwrap();
    let sealed = seal(&ring, b"kept").unwrap();
    let again = KeyRing::load_or_create(&dir, None).unwrap();
    assert_eq!(again.current_id(), ring.current_id());
    assert_eq!(open(&again, &sealed).unwrap(), b"kept");
    assert_eq!(names(&dir).len(), 2, "one key file and `current`");
    // With an environment key nothing is generated.
    let env_only = base.path().join("env-only");
    KeyRing::load_or_create(&env_only, Some(&hex::encode([1u8; 32]))).unwrap();
    assert!(!env_only.exists());
}

#[test]
fn sealed_files_are_0600_atomic_and_never_hold_plaintext() {
    let ring = KeyRing::from_key("k1", &[1; 32]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.seg");
    let marker = b"PLAINTEXT-MARKER-0123456789";
    let plain: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(3 * DEFAULT_CHUNK_SIZE + 100)
        .collect();

    // While the writer is open, only its temp file exists and it holds only ciphertext.
    let mut writer = SealedFileWriter::create(&ring, &path).unwrap();
    writer.write_all(&plain).unwrap();
    writer.flush().unwrap();
    let during = names(dir.path());
    assert_eq!(during.len(), 1, "{during:?}");
    assert!(
        during[0].starts_with(".spool.seg.") && during[0].ends_with(".tmp"),
        "{during:?}"
    );
    let temp = dir.path().join(&during[0]);
    assert_eq!(mode(&temp), 0o600);
    let temp_bytes = fs::read(&temp).unwrap();
    assert!(
        temp_bytes.len() >= 3 * DEFAULT_CHUNK_SIZE,
        "full chunks reached the disk"
    );
    assert!(!contains(&temp_bytes, &marker[..12]));
    assert!(!path.exists());
    writer.commit().unwrap();

    assert_eq!(names(dir.path()), ["spool.seg"]);
    assert_eq!(mode(&path), 0o600);
    assert!(!contains(&all_bytes(dir.path()), &marker[..12]));
    assert_eq!(open_file(&ring, &path).unwrap(), plain);

    // Replacing an existing file.
    seal_to_file(&ring, &path, b"second version").unwrap();
    assert_eq!(open_file(&ring, &path).unwrap(), b"second version");
    assert_eq!(names(dir.path()), ["spool.seg"]);

    // A writer dropped before commit leaves nothing, and the old file is untouched.
    let before = fs::read(&path).unwrap();
    let mut writer = SealedFileWriter::create(&ring, &path).unwrap();
    writer.write_all(&plain).unwrap();
    drop(writer);
    assert_eq!(names(dir.path()), ["spool.seg"]);
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn errors_name_the_file() {
    let ring = KeyRing::from_key("k1", &[1; 32]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state-7.bin");
    seal_to_file(&ring, &path, &vec![7u8; 200_000]).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x80;
    fs::write(&path, &bytes).unwrap();
    let err = open_file(&ring, &path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("state-7.bin") && msg.contains("chunk 3"),
        "{msg}"
    );
    assert!(matches!(&err, CryptoError::Integrity { file: Some(f), .. } if f == &path));

    // Streaming reader too.
    let mut reader = open_file_reader(&ring, &path).unwrap();
    let err = reader.copy_to(std::io::sink()).unwrap_err();
    assert!(err.to_string().contains("state-7.bin"), "{err}");

    fs::write(&path, &bytes[..n - 50_000]).unwrap();
    let msg = open_file(&ring, &path).unwrap_err().to_string();
    assert!(msg.contains("state-7.bin"), "{msg}");

    let other = KeyRing::from_key("k2", &[1; 32]).unwrap();
    fs::write(&path, &bytes).unwrap();
    let msg = open_file(&other, &path).unwrap_err().to_string();
    assert!(
        msg.contains("state-7.bin") && msg.contains("unknown key id \"k1\""),
        "{msg}"
    );

    let missing = dir.path().join("missing.bin");
    let err = open_file(&ring, &missing).unwrap_err();
    assert!(err.to_string().contains("missing.bin"), "{err}");
    assert!(matches!(err, CryptoError::Io { .. }));
}

#[test]
fn reseal_moves_files_to_the_current_key_and_leaves_bad_files_alone() {
    let base = tempfile::tempdir().unwrap();
    let keys = base.path().join("keys");
    rotate(&keys).unwrap();
    let old_ring = KeyRing::load(&keys, None).unwrap();
    let path = base.path().join("archive.tar");
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    seal_to_file(&old_ring, &path, &plain).unwrap();

    let new_id = rotate(&keys).unwrap();
    let ring = KeyRing::load(&keys, None).unwrap();
    let outcome = reseal(&ring, &path).unwrap();
    assert_eq!(
        outcome,
        Reseal::Resealed {
            from: old_ring.current_id().to_owned(),
            to: new_id.clone()
        }
    );
    assert_eq!(open_file_reader(&ring, &path).unwrap().key_id(), new_id);
    assert_eq!(open_file(&ring, &path).unwrap(), plain);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(
        reseal(&ring, &path).unwrap(),
        Reseal::AlreadyCurrent { key_id: new_id }
    );

    // A damaged file under an old key: reseal fails naming it and changes nothing.
    let bad = base.path().join("bad.tar");
    seal_to_file(&old_ring, &bad, &plain).unwrap();
    let mut bytes = fs::read(&bad).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&bad, &bytes).unwrap();
    let err = reseal(&ring, &bad).unwrap_err();
    assert!(err.to_string().contains("bad.tar"), "{err}");
    assert!(matches!(
        err.integrity_failure(),
        Some(IntegrityFailure::Chunk { .. })
    ));
    assert_eq!(fs::read(&bad).unwrap(), bytes);
    assert_eq!(names(base.path()), ["archive.tar", "bad.tar", "keys"]);
}
