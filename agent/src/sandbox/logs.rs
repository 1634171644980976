//! Turning a step's raw output bytes into log chunks: secrets redacted by
//! [`crate::redact::StreamRedactor`] (raw, JSON-escaped, URL-encoded and base64 forms, also when
//! split across reads), then cut into whole lines, with a partial line released after a short
//! quiet period or once it grows large, so a prompt or progress output without a newline is never
//! held back forever.
//!
//! Owns: the per-stream byte pipeline between the Docker attach stream and `TaskOutput::Log`.
//! Pure state machines, no clock: the caller decides when a partial line is due
//! ([`PARTIAL_FLUSH_AFTER`]). Must never emit a byte of a secret: bytes that could be the start
//! of a secret form are held until they are known not to be one (held back even past the
//! partial-line flush, released only by more output or the end of the stream). If the secrets
//! cannot be compiled into a redactor, the output is withheld rather than shown unredacted.

use crate::redact::{self, StreamRedactor};
use bytes::Bytes;

/// How long a partial line may wait for its newline before it is sent as it is.
pub const PARTIAL_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest chunk sent without a newline.
pub const MAX_CHUNK: usize = 64 * 1024;
/// What replaces a secret.
pub const MASK: &[u8] = redact::REPLACEMENT;
/// What replaces all output when the redactor cannot be built (fail closed).
pub const WITHHELD: &[u8] =
    b"[output withheld: the agent could not build the secret redactor for this task]\n";

/// The secrets compiled as [`Redactor::new`] does (bytes that are not UTF-8 as their lossy text,
/// empty ones ignored); `None` when they cannot be compiled (the caller withholds, fails closed).
pub fn compile<I, S>(secrets: I) -> Option<redact::Redactor>
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
{
    let texts: Vec<zeroize::Zeroizing<String>> = secrets
        .into_iter()
        .filter(|s| !s.as_ref().is_empty())
        .map(|s| zeroize::Zeroizing::new(String::from_utf8_lossy(s.as_ref()).into_owned()))
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    redact::Redactor::new(&refs).ok()
}

/// Streaming secret redaction of one output stream.
#[derive(Debug)]
pub struct Redactor {
    /// `None`: building the redactor failed; everything is withheld.
    inner: Option<StreamRedactor>,
    withheld: bool,
}

impl Redactor {
    /// A redactor for these secrets (bytes that are not UTF-8 are matched as their lossy text).
    /// Secrets are expected to be valid ([`redact::validate_secret`]; the task side refuses
    /// tasks whose secrets are not); an empty secret is ignored.
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        Redactor {
            inner: compile(secrets).map(|r| r.stream()),
            withheld: false,
        }
    }

    /// Feed bytes; returns what is safe to emit now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        match &mut self.inner {
            Some(r) => r.push(data),
            None => self.withhold(),
        }
    }

    /// The stream ended: everything left, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        match &mut self.inner {
            Some(r) => r.finish(),
            None => self.withhold(),
        }
    }

    fn withhold(&mut self) -> Vec<u8> {
        if std::mem::replace(&mut self.withheld, true) {
            Vec::new()
        } else {
            WITHHELD.to_vec()
        }
    }
}

/// Cuts a byte stream into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Complete lines (each ending in `\n`), and `MAX_CHUNK` pieces of an over-long line.
    pub fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(pos + 1);
            if self.partial.is_empty() {
                out.push(Bytes::copy_from_slice(line));
            } else {
                self.partial.extend_from_slice(line);
                out.push(Bytes::from(std::mem::take(&mut self.partial)));
            }
            rest = tail;
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_CHUNK {
            let tail = self.partial.split_off(MAX_CHUNK);
            out.push(Bytes::from(std::mem::replace(&mut self.partial, tail)));
        }
        out
    }

    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// The partial line, if any, to send now.
    pub fn take_partial(&mut self) -> Option<Bytes> {
        self.has_partial()
            .then(|| Bytes::from(std::mem::take(&mut self.partial)))
    }
}

/// The pipeline of one output stream: redact, then split.
#[derive(Debug)]
pub struct StreamLog {
    redactor: Redactor,
    lines: LineSplitter,
}

impl StreamLog {
    pub fn new(redactor: Redactor) -> StreamLog {
        StreamLog {
            redactor,
            lines: LineSplitter::default(),
        }
    }

    pub fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
        let safe = self.redactor.push(data);
        self.lines.push(&safe)
    }

    pub fn has_partial(&self) -> bool {
        self.lines.has_partial()
    }

    /// The partial line is due (quiet period over): release it. Held secret prefixes stay held.
    pub fn flush_partial(&mut self) -> Option<Bytes> {
        self.lines.take_partial()
    }

    /// The stream ended.
    pub fn finish(&mut self) -> Vec<Bytes> {
        let rest = self.redactor.finish();
        let mut out = self.lines.push(&rest);
        out.extend(self.lines.take_partial());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn joined(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn masks_secrets_within_a_chunk() {
        let mut r = Redactor::new(["hunter22"]);
        let mut out = r.push(b"password is hunter22, again hunter22\n");
        out.extend(r.finish());
        assert_eq!(out, b"password is [REDACTED], again [REDACTED]\n");
    }

    #[test]
    fn masks_secrets_split_across_chunks() {
        let mut r = Redactor::new(["hunter22"]);
        let mut out = Vec::new();
        for piece in [&b"token=hun"[..], b"t", b"er2", b"2 done\n"] {
            let got = r.push(piece);
            assert!(!String::from_utf8_lossy(&got).contains("hunt"), "{got:?}");
            out.extend(got);
        }
        out.extend(r.finish());
        assert_eq!(out, b"token=[REDACTED] done\n");
    }

    #[test]
    fn a_prefix_that_does_not_complete_is_released() {
        let mut r = Redactor::new(["hunter22"]);
        assert_eq!(r.push(b"hunt"), b"");
        assert_eq!(r.push(b"ing\n"), b"hunting\n");
        assert_eq!(r.push(b"hun"), b"");
        assert_eq!(r.finish(), b"hun");
    }

    #[test]
    fn longer_secret_wins_over_its_prefix() {
        let mut r = Redactor::new(["abcd", "abcdefgh"]);
        let mut out = r.push(b"x abcd");
        out.extend(r.push(b"efgh y abcd z"));
        out.extend(r.finish());
        assert_eq!(out, b"x [REDACTED] y [REDACTED] z");
    }

    #[test]
    fn encoded_forms_split_across_reads_are_redacted() {
        use base64::Engine;
        let secret = "p@ss word/\"x\"";
        let json = serde_json::to_string(secret).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let url = "p%40ss%20word%2F%22x%22";
        let text = format!("json={json} b64={b64} url={url}\n");
        let mut log = StreamLog::new(Redactor::new([secret]));
        let mut chunks = Vec::new();
        for piece in text.as_bytes().chunks(3) {
            chunks.extend(log.push(piece));
            chunks.extend(log.flush_partial());
        }
        chunks.extend(log.finish());
        let out = String::from_utf8(joined(&chunks)).unwrap();
        assert_eq!(out, "json=\"[REDACTED]\" b64=[REDACTED] url=[REDACTED]\n");
    }

    #[test]
    fn an_unusable_secret_withholds_the_output_instead_of_leaking_it() {
        // Shorter than the redactor's minimum: the task side refuses such tasks; should one get
        // here anyway, nothing of the output is shown.
        let mut log = StreamLog::new(Redactor::new(["abc"]));
        let mut chunks = log.push(b"the secret is abc\n");
        chunks.extend(log.push(b"and again abc\n"));
        chunks.extend(log.finish());
        let out = joined(&chunks);
        assert_eq!(out, WITHHELD);
    }

    #[test]
    fn multiline_secret_is_masked() {
        let key = "-----BEGIN KEY-----\nAAAA\n-----END KEY-----";
        let mut log = StreamLog::new(Redactor::new([key]));
        let mut chunks = log.push(b"key:\n-----BEGIN KEY-----\nAA");
        chunks.extend(log.push(b"AA\n-----END KEY-----\nok\n"));
        chunks.extend(log.finish());
        assert_eq!(joined(&chunks), b"key:\n[REDACTED]\nok\n");
    }

    #[test]
    fn no_secrets_passes_through() {
        let mut r = Redactor::new(Vec::<String>::new());
        assert_eq!(r.push(b"abc"), b"abc");
        let mut r = Redactor::new([""]);
        assert_eq!(r.push(b"abc"), b"abc");
    }

    #[test]
    fn splits_lines_and_holds_partials() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"one\ntw"), vec![Bytes::from_static(b"one\n")]);
        assert!(s.has_partial());
        assert_eq!(
            s.push(b"o\nthree\n"),
            vec![Bytes::from_static(b"two\n"), Bytes::from_static(b"three\n")]
        );
        assert!(!s.has_partial());
        assert_eq!(s.push(b"prompt> "), Vec::<Bytes>::new());
        assert_eq!(s.take_partial(), Some(Bytes::from_static(b"prompt> ")));
        assert_eq!(s.take_partial(), None);
    }

    #[test]
    fn long_lines_are_cut() {
        let mut s = LineSplitter::default();
        let out = s.push(&vec![b'x'; MAX_CHUNK * 2 + 10]);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| c.len() == MAX_CHUNK));
        assert_eq!(s.take_partial().map(|p| p.len()), Some(10));
    }

    #[test]
    fn partial_flush_keeps_held_secret_prefix() {
        let mut log = StreamLog::new(Redactor::new(["s3cr3t"]));
        assert!(log.push(b"value: s3").is_empty());
        // Quiet period over: "value: " goes, "s3" stays held.
        assert_eq!(log.flush_partial(), Some(Bytes::from_static(b"value: ")));
        let mut rest = log.push(b"cr3t\n");
        rest.extend(log.finish());
        assert_eq!(joined(&rest), b"[REDACTED]\n");
    }

    proptest! {
        /// However the output is cut into reads, the secret never appears and the rest is kept.
        #[test]
        fn secret_never_leaks(
            before in "[a-z \\n]{0,40}",
            after in "[a-z \\n]{0,40}",
            cuts in proptest::collection::vec(0usize..100, 0..8),
        ) {
            let secret = "Zq9-secret-Zq9";
            let text = format!("{before}{secret}{after}{secret}");
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut log = StreamLog::new(Redactor::new([secret]));
            let mut chunks = Vec::new();
            let mut start = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                chunks.extend(log.push(&bytes[start..c]));
                chunks.extend(log.flush_partial());
                start = c;
            }
            chunks.extend(log.finish());
            for c in &chunks {
                prop_assert!(!String::from_utf8_lossy(c).contains("Zq9"));
            }
            // Adjacent occurrences merge into one replacement: what the whole-buffer redaction gives.
            let whole = redact::Redactor::new(&[secret]).unwrap().redact(bytes);
            let expected = String::from_utf8_lossy(&whole).into_owned();
            prop_assert!(expected.contains("[REDACTED]"));
            prop_assert_eq!(String::from_utf8_lossy(&joined(&chunks)).into_owned(), expected);
        }
    }
}
