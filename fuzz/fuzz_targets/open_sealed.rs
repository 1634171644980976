//! Sealed files on disk are untrusted input: the opener must never panic, and must never hand out
//! plaintext for bytes that were not sealed under the key. Two modes, chosen by the first byte:
//! arbitrary bytes fed to the opener (whole and through small reads), and a genuine sealed stream
//! edited as the input says (bit flip, cut, insertion, deletion), which must always be refused.
#![no_main]
use std::io::{Read, Write};

use delegate_crypto::{open, KeyRing, Opener, Sealer};
use libfuzzer_sys::fuzz_target;

fn ring() -> KeyRing {
    KeyRing::from_key("k1", &[0x42; 32]).expect("constant key id is valid")
}

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    let Some((&mode, rest)) = data.split_first() else {
        assert!(open(&ring, data).is_err());
        return;
    };
    if mode & 1 == 0 {
        // Arbitrary bytes: without the key nothing can be forged.
        assert!(open(&ring, rest).is_err());
        if let Ok(mut opener) = Opener::new(&ring, rest) {
            let mut buf = [0u8; 7];
            loop {
                match opener.read(&mut buf) {
                    Ok(0) => panic!("arbitrary bytes opened"),
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        return;
    }
    // Seal `payload` with a small chunk size, then apply one edit and require a refusal.
    if rest.len() < 3 {
        return;
    }
    let chunk = (mode as usize >> 1) % 40 + 1;
    let edit = rest[0] % 4;
    let at = u16::from_le_bytes([rest[1], rest[2]]) as usize;
    let payload = &rest[3..];
    let mut sealer =
        Sealer::with_chunk_size(&ring, Vec::new(), chunk).expect("chunk size in range");
    sealer.write_all(payload).expect("sealing into a Vec");
    let sealed = sealer.finish().expect("sealing into a Vec");
    assert_eq!(open(&ring, &sealed).expect("genuine stream opens"), payload);
    let mut edited = sealed.clone();
    let pos = at % edited.len();
    match edit {
        0 => edited[pos] ^= 1 << (at % 8),
        1 => edited.truncate(pos),
        2 => edited.insert(pos, (at >> 8) as u8),
        _ => {
            edited.remove(pos);
        }
    }
    assert!(
        open(&ring, &edited).is_err(),
        "edit {edit} at {pos} went undetected"
    );
});
