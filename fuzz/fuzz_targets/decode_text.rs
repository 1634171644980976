//! The control-message decoder must never panic, and whatever it accepts must re-encode and decode
//! to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(msg) = delegate_protocol::decode_text(text) {
        let again = delegate_protocol::decode_text(&delegate_protocol::encode_text(&msg))
            .expect("an accepted message must re-decode");
        assert_eq!(again, msg);
    }
});
