//! The sealed stream format: round trips, and every kind of damage detected as the right
//! integrity failure.

use std::io::{Read, Write};

use delegate_crypto::{
    open, seal, sealed_len_with_chunk_size, CryptoError, IntegrityFailure, KeyRing, Opener, Sealer,
    DEFAULT_CHUNK_SIZE, TAG_LEN,
};
use proptest::prelude::*;

fn ring(id: &str, byte: u8) -> KeyRing {
    KeyRing::from_key(id, &[byte; 32]).unwrap()
}

fn seal_chunked(ring: &KeyRing, data: &[u8], chunk: usize) -> Vec<u8> {
    let mut sealer = Sealer::with_chunk_size(ring, Vec::new(), chunk).unwrap();
    sealer.write_all(data).unwrap();
    sealer.finish().unwrap()
}

fn failure(result: Result<Vec<u8>, CryptoError>) -> IntegrityFailure {
    match result {
        Err(CryptoError::Integrity { failure, .. }) => failure,
        Err(other) => panic!("expected an integrity error, got {other}"),
        Ok(data) => panic!(
            "expected an integrity error, got {} bytes of plaintext",
            data.len()
        ),
    }
}

/// Header length (with its tag) for a key id of `id_len` bytes.
fn header_end(id_len: usize) -> usize {
    65 + id_len
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn round_trip_sizes_around_the_default_chunk() {
    let ring = ring("k1", 1);
    let c = DEFAULT_CHUNK_SIZE;
    for len in [0, 1, c - 1, c, c + 1, 3 * c + 17] {
        let plain = data(len);
        let sealed = seal(&ring, &plain).unwrap();
        assert_eq!(
            sealed.len() as u64,
            delegate_crypto::sealed_len("k1", len as u64),
            "len {len}"
        );
        assert_eq!(open(&ring, &sealed).unwrap(), plain, "len {len}");
        // And through the Read impl with an odd buffer size.
        let mut opener = Opener::new(&ring, &sealed[..]).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4093];
        loop {
            let n = opener.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, plain, "len {len} via Read");
    }
}

#[test]
fn sealing_twice_gives_different_ciphertexts() {
    let ring = ring("k1", 1);
    let a = seal(&ring, b"same plaintext").unwrap();
    let b = seal(&ring, b"same plaintext").unwrap();
    assert_ne!(a, b);
    assert_eq!(&a[..4], b"DLGS");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip_random_data_splits_and_chunk_sizes(
        plain in proptest::collection::vec(any::<u8>(), 0..3000),
        chunk in 1usize..300,
        splits in proptest::collection::vec(1usize..500, 1..20),
        read_size in 1usize..700,
    ) {
        let ring = ring("prop-key", 9);
        let mut sealer = Sealer::with_chunk_size(&ring, Vec::new(), chunk).unwrap();
        let mut rest = &plain[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = splits[i % splits.len()].min(rest.len());
            sealer.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        let sealed = sealer.finish().unwrap();
        prop_assert_eq!(sealed.len() as u64, sealed_len_with_chunk_size("prop-key", plain.len() as u64, chunk));
        prop_assert_eq!(&open(&ring, &sealed).unwrap(), &plain);
        let mut opener = Opener::new(&ring, &sealed[..]).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let n = opener.read(&mut buf).unwrap();
            if n == 0 { break; }
            out.extend_from_slice(&buf[..n]);
        }
        prop_assert_eq!(out, plain);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_open(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        with_header in any::<bool>(),
    ) {
        let ring = ring("k1", 1);
        let mut input = Vec::new();
        if with_header {
            // A plausible header prefix so the parser gets past the magic.
            input.extend_from_slice(b"DLGS\x01\x02k1");
        }
        input.extend_from_slice(&body);
        prop_assert!(open(&ring, &input).is_err());
    }
}

#[test]
fn every_truncation_is_detected_and_boundaries_say_truncated() {
    let ring = ring("k1", 1);
    let chunk = 16;
    let plain = data(100); // 6 full chunks + a 4-byte final chunk
    let sealed = seal_chunked(&ring, &plain, chunk);
    let h = header_end(2);
    assert_eq!(sealed.len(), h + 6 * (chunk + TAG_LEN) + 4 + TAG_LEN);
    for len in 0..sealed.len() {
        let f = failure(open(&ring, &sealed[..len]));
        if len < h {
            assert_eq!(f, IntegrityFailure::TruncatedHeader, "cut at {len}");
            continue;
        }
        let whole_chunks = ((len - h) / (chunk + TAG_LEN)) as u64;
        let into_chunk = (len - h) % (chunk + TAG_LEN);
        if into_chunk == 0 {
            assert_eq!(
                f,
                IntegrityFailure::Truncated {
                    chunks: whole_chunks
                },
                "cut at {len}"
            );
        } else {
            assert_eq!(
                f,
                IntegrityFailure::Chunk {
                    index: whole_chunks
                },
                "cut at {len}"
            );
        }
    }
    // A full final chunk removed exactly at a boundary (plaintext a multiple of the chunk size).
    let sealed = seal_chunked(&ring, &data(64), chunk);
    let cut = sealed.len() - (chunk + TAG_LEN);
    assert_eq!(
        failure(open(&ring, &sealed[..cut])),
        IntegrityFailure::Truncated { chunks: 3 }
    );
}

#[test]
fn every_flipped_bit_is_detected_with_the_right_location() {
    let ring = ring("k1", 1);
    let chunk = 16;
    let sealed = seal_chunked(&ring, &data(40), chunk); // chunks: 16, 16, 8
    let h = header_end(2);
    for byte in 0..sealed.len() {
        for bit in 0..8 {
            let mut bad = sealed.clone();
            bad[byte] ^= 1 << bit;
            let f = failure(open(&ring, &bad));
            let ok = match byte {
                0..=3 => f == IntegrityFailure::BadMagic,
                4 => matches!(f, IntegrityFailure::UnsupportedVersion(_)),
                // Key id length: out of range, a wrong split of the header, or an unknown id.
                5 => matches!(
                    f,
                    IntegrityFailure::MalformedHeader(_)
                        | IntegrityFailure::UnknownKeyId(_)
                        | IntegrityFailure::HeaderAuthentication
                        | IntegrityFailure::TruncatedHeader
                ),
                6..=7 => matches!(
                    f,
                    IntegrityFailure::UnknownKeyId(_) | IntegrityFailure::MalformedHeader(_)
                ),
                // Chunk size: either out of range or authenticated by the header tag.
                47..=50 => matches!(
                    f,
                    IntegrityFailure::HeaderAuthentication | IntegrityFailure::MalformedHeader(_)
                ),
                b if b < h => f == IntegrityFailure::HeaderAuthentication,
                b => {
                    f == IntegrityFailure::Chunk {
                        index: ((b - h) / (chunk + TAG_LEN)) as u64,
                    }
                }
            };
            assert!(ok, "byte {byte} bit {bit}: {f}");
        }
    }
}

#[test]
fn reordered_dropped_and_appended_chunks_are_detected() {
    let ring = ring("k1", 1);
    let chunk = 16;
    let plain = data(16 * 4 + 5); // 4 full chunks + final
    let sealed = seal_chunked(&ring, &plain, chunk);
    let h = header_end(2);
    let c = chunk + TAG_LEN;
    let piece = |i: usize| &sealed[h + i * c..(h + (i + 1) * c).min(sealed.len())];

    let mut swapped = sealed[..h].to_vec();
    for i in [0, 2, 1, 3, 4] {
        swapped.extend_from_slice(piece(i));
    }
    assert_eq!(
        failure(open(&ring, &swapped)),
        IntegrityFailure::Chunk { index: 1 }
    );

    let mut dropped_middle = sealed[..h].to_vec();
    for i in [0, 2, 3, 4] {
        dropped_middle.extend_from_slice(piece(i));
    }
    assert_eq!(
        failure(open(&ring, &dropped_middle)),
        IntegrityFailure::Chunk { index: 1 }
    );

    let mut dropped_last = sealed[..h].to_vec();
    for i in 0..4 {
        dropped_last.extend_from_slice(piece(i));
    }
    assert_eq!(
        failure(open(&ring, &dropped_last)),
        IntegrityFailure::Truncated { chunks: 4 }
    );

    let mut appended = sealed.clone();
    appended.push(0);
    assert_eq!(
        failure(open(&ring, &appended)),
        IntegrityFailure::Chunk { index: 4 }
    );

    // A chunk spliced in from another file under the same key and position does not verify.
    let other = seal_chunked(&ring, &plain, chunk);
    let mut spliced = sealed.clone();
    spliced[h + c..h + 2 * c].copy_from_slice(&other[h + c..h + 2 * c]);
    assert_eq!(
        failure(open(&ring, &spliced)),
        IntegrityFailure::Chunk { index: 1 }
    );
}

#[test]
fn unknown_and_swapped_key_ids_are_detected() {
    let k2 = ring("k2", 2);
    let sealed = seal(&k2, b"secret state").unwrap();
    let only_k1 = ring("k1", 1);
    let err = open(&only_k1, &sealed).unwrap_err();
    assert_eq!(
        err.integrity_failure(),
        Some(&IntegrityFailure::UnknownKeyId("k2".into()))
    );
    assert!(err.to_string().contains("unknown key id \"k2\""), "{err}");

    // Both keys known and even equal: relabelling the file as k1 fails the header tag, because
    // the key id is authenticated and part of the key derivation.
    let mut both = ring("k1", 2);
    both.add("k2", &[2; 32]).unwrap();
    assert_eq!(open(&both, &sealed).unwrap(), b"secret state");
    let mut relabelled = sealed.clone();
    relabelled[6..8].copy_from_slice(b"k1");
    assert_eq!(
        failure(open(&both, &relabelled)),
        IntegrityFailure::HeaderAuthentication
    );

    // Same id, different key bytes.
    let impostor = ring("k2", 3);
    assert_eq!(
        failure(open(&impostor, &sealed)),
        IntegrityFailure::HeaderAuthentication
    );
}

#[test]
fn header_fields_out_of_range_are_rejected() {
    let ring = ring("k1", 1);
    let sealed = seal(&ring, b"x").unwrap();
    let mut zero_chunk = sealed.clone();
    zero_chunk[47..51].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        failure(open(&ring, &zero_chunk)),
        IntegrityFailure::MalformedHeader(_)
    ));
    let mut huge_chunk = sealed.clone();
    huge_chunk[47..51].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        failure(open(&ring, &huge_chunk)),
        IntegrityFailure::MalformedHeader(_)
    ));
    let mut no_id = sealed.clone();
    no_id[5] = 0;
    assert!(matches!(
        failure(open(&ring, &no_id)),
        IntegrityFailure::MalformedHeader(_)
    ));
    let mut long_id = sealed.clone();
    long_id[5] = 65;
    assert!(matches!(
        failure(open(&ring, &long_id)),
        IntegrityFailure::MalformedHeader(_)
    ));
    let mut bad_char = sealed.clone();
    bad_char[6] = b'/';
    assert!(matches!(
        failure(open(&ring, &bad_char)),
        IntegrityFailure::MalformedHeader(_)
    ));
    assert_eq!(failure(open(&ring, b"")), IntegrityFailure::TruncatedHeader);
    assert_eq!(
        failure(open(&ring, b"PK\x03\x04")),
        IntegrityFailure::BadMagic
    );
}

#[test]
fn a_failed_opener_is_poisoned_and_read_errors_carry_the_integrity_error() {
    let ring = ring("k1", 1);
    let mut sealed = seal_chunked(&ring, &data(50), 16);
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let mut opener = Opener::new(&ring, &sealed[..]).unwrap();
    let mut released = 0;
    let err = loop {
        match opener.next_chunk() {
            Ok(Some(c)) => released += c.len(),
            Ok(None) => panic!("tampered stream opened"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        released, 48,
        "the three authentic chunks before the bad one"
    );
    assert_eq!(
        err.integrity_failure(),
        Some(&IntegrityFailure::Chunk { index: 3 })
    );
    assert!(matches!(opener.next_chunk(), Err(CryptoError::Poisoned(_))));

    let mut opener = Opener::new(&ring, &sealed[..]).unwrap();
    let mut sink = Vec::new();
    let io_err = opener.read_to_end(&mut sink).unwrap_err();
    assert_eq!(io_err.kind(), std::io::ErrorKind::InvalidData);
    let back = CryptoError::from_io(io_err, "read", None);
    assert_eq!(
        back.integrity_failure(),
        Some(&IntegrityFailure::Chunk { index: 3 })
    );
    assert!(!back.is_retryable());
}

#[test]
fn a_sealer_dropped_without_finish_leaves_a_truncated_stream() {
    let ring = ring("k1", 1);
    let mut out = Vec::new();
    {
        let mut sealer = Sealer::with_chunk_size(&ring, &mut out, 16).unwrap();
        sealer.write_all(&data(40)).unwrap();
    }
    assert_eq!(
        failure(open(&ring, &out)),
        IntegrityFailure::Truncated { chunks: 2 }
    );
}

#[test]
fn invalid_chunk_sizes_are_refused_by_the_sealer() {
    let ring = ring("k1", 1);
    assert!(matches!(
        Sealer::with_chunk_size(&ring, Vec::new(), 0),
        Err(CryptoError::InvalidChunkSize(0))
    ));
    assert!(
        Sealer::with_chunk_size(&ring, Vec::new(), delegate_crypto::MAX_CHUNK_SIZE + 1).is_err()
    );
}
