//! Spool segment files are read back after a restart: whatever their bytes, the loader must never
//! panic and must never accept a record that was not sealed under the key for this task. Two
//! modes, chosen by the first byte: arbitrary bytes as a segment, and a genuine segment (a journal
//! and a few frames) edited as the input says, which is refused unless the edit changed nothing.
#![no_main]
use bytes::Bytes;
use delegate_agent::spool::check_segment;
use delegate_agent::spool::record::{seal_record, RecordBody};
use delegate_agent::tasks::WireFrame;
use delegate_crypto::KeyRing;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use uuid::Uuid;

const TASK: Uuid = Uuid::from_u128(0x5eed);

fn ring() -> KeyRing {
    KeyRing::from_key("k1", &[0x42; 32]).expect("constant key id is valid")
}

fn genuine(ring: &KeyRing) -> Vec<u8> {
    let mut seg = Vec::new();
    for seq in 1..=3u64 {
        let body = RecordBody::Frame {
            seq,
            frame: WireFrame::Binary(Bytes::from(format!("line {seq}\n"))),
            done: seq == 3,
        };
        seg.extend(seal_record(ring, TASK, &body).expect("seal"));
    }
    seg
}

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    let path = Path::new("fuzz.seg");
    let Some((&mode, rest)) = data.split_first() else {
        let _ = check_segment(&ring, TASK, path, 1, data);
        return;
    };
    if mode & 1 == 0 {
        // Arbitrary bytes: nothing authenticates without the key, so no frame comes back.
        if let Ok(c) = check_segment(&ring, TASK, path, 1, rest) {
            assert!(
                c.frames.is_empty() && c.journal.is_none(),
                "forged record accepted"
            );
        }
        return;
    }
    // An edit of a genuine segment: (position, value) pairs flip bytes, a final cut truncates.
    let original = genuine(&ring);
    let mut seg = original.clone();
    for pair in rest.chunks(3) {
        if let [a, b, v] = pair {
            let at = (usize::from(*a) << 8 | usize::from(*b)) % seg.len().max(1);
            if let Some(byte) = seg.get_mut(at) {
                *byte ^= v | 1;
            }
        }
    }
    if rest.len() % 3 == 1 {
        let cut = usize::from(rest[rest.len() - 1]) % (seg.len() + 1);
        seg.truncate(cut);
    }
    let got = check_segment(&ring, TASK, path, 1, &seg);
    if seg == original {
        assert_eq!(got.expect("genuine segment").frames.len(), 3);
    } else if let Ok(c) = got {
        // Only a cut at a record boundary leaves an authentic (shorter) prefix.
        assert!(c.frames.len() < 3, "an edited segment read back whole");
        assert!(original.starts_with(&seg), "edited bytes accepted");
    }
});
