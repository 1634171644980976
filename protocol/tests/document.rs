//! PROTOCOL.md and the code must agree: every JSON example in the document decodes, re-encodes to the
//! same JSON value, and every message type the code knows has an example.

use delegate_protocol::{decode_text, encode_text, messages::KNOWN_TYPES};
use std::collections::BTreeSet;

fn examples() -> Vec<String> {
    let doc = include_str!("../PROTOCOL.md");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```json") => current = Some(String::new()),
            (Some(buf), "```") => {
                out.push(std::mem::take(buf));
                current = None;
            }
            (Some(buf), l) => {
                buf.push_str(l);
                buf.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_example_round_trips() {
    let examples = examples();
    assert!(
        examples.len() >= 14,
        "found only {} examples",
        examples.len()
    );
    let mut seen = BTreeSet::new();
    for ex in &examples {
        let msg = decode_text(ex).unwrap_or_else(|e| panic!("example does not decode: {e}\n{ex}"));
        seen.insert(msg.type_name());
        let again: serde_json::Value = serde_json::from_str(&encode_text(&msg)).unwrap();
        let orig: serde_json::Value = serde_json::from_str(ex).unwrap();
        assert_eq!(again, orig, "re-encoding changed the example");
    }
    for ty in KNOWN_TYPES {
        assert!(seen.contains(ty), "PROTOCOL.md has no example of {ty}");
    }
}
