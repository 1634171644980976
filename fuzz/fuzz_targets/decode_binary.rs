//! The binary-frame decoder must never panic, and whatever it accepts must re-encode byte for byte.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = delegate_protocol::decode_binary(data) {
        assert_eq!(delegate_protocol::encode_binary(&frame), data);
    }
});
