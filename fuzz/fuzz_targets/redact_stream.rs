//! The log redactor sees everything a workload prints: whatever the secrets and however the
//! output is chunked, it must not panic, must hold back less than the longest pattern, must give
//! the same output streamed as in one piece, and must leave no raw secret in what it keeps.
#![no_main]
use delegate_agent::redact::{Redactor, REPLACEMENT};
use libfuzzer_sys::fuzz_target;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|input: (Vec<String>, Vec<u8>, Vec<u8>)| {
    let (mut secrets, text, sizes) = input;
    secrets.truncate(6);
    for s in &mut secrets {
        if s.len() > 64 {
            let mut cut = 64;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let Ok(redactor) = Redactor::new(&refs) else {
        return;
    };
    let batch = redactor.redact(&text);

    let mut stream = redactor.stream();
    let mut streamed = Vec::new();
    let mut rest = &text[..];
    let mut i = 0;
    while !rest.is_empty() {
        let n =
            (sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7) as usize).clamp(1, rest.len());
        streamed.extend(stream.push(&rest[..n]));
        assert!(stream.held() < redactor.max_pattern_len().max(1));
        rest = &rest[n..];
        i += 1;
    }
    streamed.extend(stream.finish());
    assert_eq!(streamed, batch);

    // Kept segments are untouched input: none may contain a secret.
    let mut segments = Vec::new();
    let mut out = &batch[..];
    while let Some(k) = out
        .windows(REPLACEMENT.len())
        .position(|w| w == REPLACEMENT)
    {
        segments.push(&out[..k]);
        out = &out[k + REPLACEMENT.len()..];
    }
    segments.push(out);
    for segment in segments {
        for secret in &secrets {
            assert!(!contains(segment, secret.as_bytes()));
        }
    }
});
