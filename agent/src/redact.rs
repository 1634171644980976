//! The streaming secret redactor over every byte a sandbox emits as logs.
//!
//! Owns: turning a task's secrets into the byte patterns they may appear as in output, finding
//! them (aho-corasick), replacing them with [`REPLACEMENT`], and holding back the few bytes at the
//! end of a stream that could still be the start of a secret.
//!
//! Must never: emit a byte before it is certain that no secret form covers it; lose, duplicate or
//! reorder a byte that no secret covers (streaming output equals [`Redactor::redact`] of the
//! concatenated input, whatever the chunking); put a secret, or its length beyond "too short/too
//! long", into an error, a `Debug` string or a log; log anything itself.
//!
//! # Forms matched, per secret
//!
//! Secrets are matched as bytes, case-sensitively. For the secret as given, and, if it contains
//! line breaks, also with every line break as `\n` and as `\r\n` (a TTY turns one into the other):
//! * **raw** bytes (multi-line secrets included);
//! * **JSON-escaped** string content without quotes: as `serde_json` escapes it; with Go's
//!   `encoding/json` HTML escaping (`<` `>` `&` U+2028 U+2029 as `\u003c`...); with every non-ASCII
//!   character as `\uXXXX` (Python's `ensure_ascii`);
//! * **URL-encoded**, upper- and lower-case hex: RFC 3986 (only `A-Za-z0-9-._~` kept) with space as
//!   `%20` and as `+`; `encodeURIComponent` (also keeps `!*'()`); `application/x-www-form-urlencoded`
//!   (keeps `*-._`, space `+`); Python `quote` (also keeps `/`);
//! * **base64**, standard and URL-safe alphabets, with and without padding, at all three alignments
//!   inside a longer base64 text: the secret preceded by 0, 1 or 2 bytes encodes to characters of
//!   which the first 0, 2 or 3 also depend on the preceding bytes; those are dropped and the rest
//!   (the characters that depend on the secret alone) is matched. The final character, which
//!   also depends on what follows the secret, is matched in its end-of-data forms (with and without
//!   padding) and otherwise left out. So inside base64 text, everything that encodes only secret
//!   bits is redacted; at most the two boundary characters survive, each carrying at most 4 bits
//!   of the secret's first or last byte.
//!
//! Overlapping occurrences (two forms, or two secrets, sharing bytes) are handled by redacting the
//! union of all occurrences: every maximal run of bytes covered by any occurrence becomes one
//! `[REDACTED]`, so no fragment of any occurrence survives (plain leftmost-longest matching would
//! leak the tail of a second secret that overlaps the first).
//!
//! Not covered: other encodings (hex, base32, gzip, MIME base64 wrapped over lines, base64 of the
//! JSON- or URL-encoded form, JSON escaped twice, `\/`), other URL encoders' choices of kept
//! characters, case changes, a secret split by something the workload inserts (such as a line
//! break), fragments of a secret shown on their own. The patterns live in the aho-corasick
//! automaton for the redactor's lifetime and are not zeroized; held-back stream bytes are wiped.

use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use zeroize::Zeroize;

/// Shortest secret accepted, in bytes. Shorter secrets would be found all over ordinary output (and
/// their base64 fragments even more), so redacting them would mangle logs while protecting little.
pub const MIN_SECRET_LEN: usize = 4;
/// Longest secret accepted, in bytes (bounds the hold-back of a stream to a few hundred KiB).
pub const MAX_SECRET_LEN: usize = delegate_protocol::limits::MAX_SECRET_LEN;
/// What every occurrence is replaced with.
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// Why a single secret is refused. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    /// Shorter than [`MIN_SECRET_LEN`].
    #[error("it is {len} bytes long; secrets must be at least {MIN_SECRET_LEN} bytes, because shorter ones cannot be redacted from logs without mangling ordinary output")]
    TooShort {
        /// The secret's length in bytes.
        len: usize,
    },
    /// Longer than [`MAX_SECRET_LEN`].
    #[error("it is {len} bytes long; secrets may be at most {MAX_SECRET_LEN} bytes")]
    TooLong {
        /// The secret's length in bytes.
        len: usize,
    },
}

/// Errors building a [`Redactor`]. Not retryable: the same secrets fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    /// One secret is unusable; `index` is its 0-based position in the list given.
    #[error("secret #{index} refused: {problem}")]
    Secret {
        /// Position of the secret in the list passed to [`Redactor::new`].
        index: usize,
        /// What is wrong with it.
        problem: SecretProblem,
    },
    /// The matcher could not be built (too many patterns for its state ids).
    #[error("cannot build the redaction matcher for {patterns} patterns")]
    Build {
        /// How many patterns were derived from the secrets.
        patterns: usize,
    },
}

/// Checks one secret against the length limits (what `submit` should call per `--secret`, to name
/// the offending secret in its own message).
pub fn validate_secret(secret: &str) -> Result<(), SecretProblem> {
    match secret.len() {
        len if len < MIN_SECRET_LEN => Err(SecretProblem::TooShort { len }),
        len if len > MAX_SECRET_LEN => Err(SecretProblem::TooLong { len }),
        _ => Ok(()),
    }
}

/// A compiled set of secrets. Cheap to clone (shared). See the module docs for what it matches.
#[derive(Clone)]
pub struct Redactor {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when there are no secrets: everything passes through.
    matcher: Option<AhoCorasick>,
    prefixes: PrefixAutomaton,
    max_pattern_len: usize,
    secrets: usize,
    patterns: usize,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.inner.secrets)
            .field("patterns", &self.inner.patterns)
            .field("max_pattern_len", &self.inner.max_pattern_len)
            .finish()
    }
}

impl Redactor {
    /// Compiles `secrets`. Refuses any secret shorter than [`MIN_SECRET_LEN`] or longer than
    /// [`MAX_SECRET_LEN`] bytes; the error names its position, never its value.
    pub fn new(secrets: &[&str]) -> Result<Redactor, RedactError> {
        for (index, secret) in secrets.iter().enumerate() {
            validate_secret(secret).map_err(|problem| RedactError::Secret { index, problem })?;
        }
        let mut patterns: Vec<Vec<u8>> = secrets.iter().flat_map(|s| secret_forms(s)).collect();
        patterns.sort_unstable();
        patterns.dedup();
        let count = patterns.len();
        let built = if patterns.is_empty() {
            Ok(None)
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&patterns)
                .map(Some)
                .map_err(|_| RedactError::Build { patterns: count })
        };
        let max_pattern_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let prefixes = PrefixAutomaton::new(&patterns);
        patterns.iter_mut().for_each(|p| p.zeroize());
        Ok(Redactor {
            inner: Arc::new(Inner {
                matcher: built?,
                prefixes,
                max_pattern_len,
                secrets: secrets.len(),
                patterns: count,
            }),
        })
    }

    /// A redactor with no secrets: output equals input.
    pub fn none() -> Redactor {
        Redactor {
            inner: Arc::new(Inner {
                matcher: None,
                prefixes: PrefixAutomaton::new(&[]),
                max_pattern_len: 0,
                secrets: 0,
                patterns: 0,
            }),
        }
    }

    /// Whether this redactor has no secrets.
    pub fn is_empty(&self) -> bool {
        self.inner.matcher.is_none()
    }

    /// Length of the longest pattern; a stream holds back at most one byte less.
    pub fn max_pattern_len(&self) -> usize {
        self.inner.max_pattern_len
    }

    /// Redacts a whole buffer.
    pub fn redact(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        let mut in_run = false;
        emit(
            &mut out,
            input,
            0,
            input.len(),
            &self.covered(input),
            &mut in_run,
        );
        out
    }

    /// A streaming redactor over one output stream.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            buf: Vec::new(),
            buf_start: 0,
            decided: 0,
            in_run: false,
        }
    }

    /// Maximal runs of bytes of `hay` covered by an occurrence of any pattern, sorted, disjoint and
    /// non-adjacent (touching runs are merged).
    fn covered(&self, hay: &[u8]) -> Vec<(usize, usize)> {
        let Some(matcher) = &self.inner.matcher else {
            return Vec::new();
        };
        let mut spans: Vec<(usize, usize)> = matcher
            .find_overlapping_iter(hay)
            .map(|m| (m.start(), m.end()))
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
    }
}

/// Appends the redacted form of `buf[from..to]` to `out`, given the covered runs of `buf`.
/// `in_run` says whether the byte before `from` was covered (its replacement already emitted);
/// it is updated for the byte before `to`.
fn emit(
    out: &mut Vec<u8>,
    buf: &[u8],
    from: usize,
    to: usize,
    covered: &[(usize, usize)],
    in_run: &mut bool,
) {
    let mut pos = from;
    for &(start, end) in covered {
        if end <= pos {
            continue;
        }
        if start >= to {
            break;
        }
        if start > pos {
            out.extend_from_slice(&buf[pos..start]);
            *in_run = false;
        }
        if !*in_run {
            out.extend_from_slice(REPLACEMENT);
            *in_run = true;
        }
        pos = end.min(to);
    }
    if pos < to {
        out.extend_from_slice(&buf[pos..to]);
        *in_run = false;
    }
}

/// Redacts one stream incrementally. `push` returns what is safe to emit now; it holds back only
/// the longest tail that is still the beginning of some secret form (at most
/// `max_pattern_len() - 1` bytes). `finish` flushes that tail and resets for a new stream.
pub struct StreamRedactor {
    redactor: Redactor,
    /// Input bytes from absolute offset `buf_start`: already-emitted context (up to
    /// `max_pattern_len - 1` bytes, for occurrences that began before `decided`) then held bytes.
    buf: Vec<u8>,
    buf_start: u64,
    /// Absolute offset up to which output has been emitted.
    decided: u64,
    /// Whether the byte before `decided` was covered by an occurrence.
    in_run: bool,
}

impl StreamRedactor {
    /// Feeds the next bytes of the stream; returns the output that can be emitted now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.redactor.is_empty() {
            return chunk.to_vec();
        }
        self.buf.extend_from_slice(chunk);
        let held_from = (self.decided - self.buf_start) as usize;
        let hold = self
            .redactor
            .inner
            .prefixes
            .partial_tail(&self.buf[held_from..]);
        self.advance(self.buf.len() - hold)
    }

    /// Ends the stream: returns everything still held back, redacted, and resets.
    pub fn finish(&mut self) -> Vec<u8> {
        let out = self.advance(self.buf.len());
        self.buf.zeroize();
        self.buf = Vec::new();
        self.buf_start = 0;
        self.decided = 0;
        self.in_run = false;
        out
    }

    /// How many input bytes are held back (not yet emitted).
    pub fn held(&self) -> usize {
        self.buf.len() - (self.decided - self.buf_start) as usize
    }

    /// Emits `buf[decided..safe]` (positions relative to `buf`) and trims the context kept.
    fn advance(&mut self, safe: usize) -> Vec<u8> {
        let from = (self.decided - self.buf_start) as usize;
        let mut out = Vec::new();
        if safe <= from {
            return out;
        }
        // Every occurrence that covers a byte in `from..safe` lies inside `buf`: it starts at most
        // `max_pattern_len - 1` bytes before `from` (kept as context) and, since it does not
        // extend into the held tail's partial matches, ends within `buf`.
        let covered = self.redactor.covered(&self.buf);
        emit(&mut out, &self.buf, from, safe, &covered, &mut self.in_run);
        self.decided = self.buf_start + safe as u64;
        let context = self.redactor.inner.max_pattern_len.saturating_sub(1);
        let keep_from = safe.saturating_sub(context);
        if keep_from > 0 {
            self.buf[..keep_from].zeroize();
            self.buf.drain(..keep_from);
            self.buf_start += keep_from as u64;
        }
        out
    }
}

impl Drop for StreamRedactor {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

impl fmt::Debug for StreamRedactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamRedactor")
            .field("redactor", &self.redactor)
            .field("emitted", &self.decided)
            .field("held", &self.held())
            .finish()
    }
}

/// A trie of all patterns with Aho-Corasick failure links, used only to find the longest suffix
/// of the stream that is a proper prefix of some pattern (the bytes that must be held back).
struct PrefixAutomaton {
    /// Children of each node, sorted by byte. Node 0 is the root.
    children: Vec<Vec<(u8, u32)>>,
    fail: Vec<u32>,
    /// For each node, the depth of the deepest node on its failure chain (itself included) that
    /// has children: the length of the longest suffix that a longer pattern could still extend.
    hold: Vec<u32>,
    max_len: usize,
}

impl PrefixAutomaton {
    fn new(patterns: &[Vec<u8>]) -> PrefixAutomaton {
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut depth: Vec<u32> = vec![0];
        for pattern in patterns {
            let mut node = 0usize;
            for &b in pattern {
                node = match children[node].binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => children[node][i].1 as usize,
                    Err(i) => {
                        let next = children.len();
                        children[node].insert(i, (b, next as u32));
                        children.push(Vec::new());
                        depth.push(depth[node] + 1);
                        next
                    }
                };
            }
        }
        let n = children.len();
        let mut fail = vec![0u32; n];
        let mut hold = vec![0u32; n];
        let mut queue = std::collections::VecDeque::new();
        for &(_, child) in &children[0] {
            queue.push_back(child as usize);
        }
        while let Some(node) = queue.pop_front() {
            hold[node] = if children[node].is_empty() {
                hold[fail[node] as usize]
            } else {
                depth[node]
            };
            for i in 0..children[node].len() {
                let (b, child) = children[node][i];
                let mut f = fail[node] as usize;
                let target = loop {
                    if let Some(next) = Self::step(&children, f, b) {
                        break next;
                    }
                    if f == 0 {
                        break 0;
                    }
                    f = fail[f] as usize;
                };
                fail[child as usize] = target as u32;
                queue.push_back(child as usize);
            }
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        PrefixAutomaton {
            children,
            fail,
            hold,
            max_len,
        }
    }

    fn step(children: &[Vec<(u8, u32)>], node: usize, b: u8) -> Option<usize> {
        let edges = &children[node];
        edges
            .binary_search_by_key(&b, |&(c, _)| c)
            .ok()
            .map(|i| edges[i].1 as usize)
    }

    /// Length of the longest suffix of `text` that is a proper prefix of some pattern. Only the
    /// last `max_len - 1` bytes can matter, so only those are scanned.
    fn partial_tail(&self, text: &[u8]) -> usize {
        let window = self.max_len.saturating_sub(1).min(text.len());
        let mut node = 0usize;
        for &b in &text[text.len() - window..] {
            node = loop {
                if let Some(next) = Self::step(&self.children, node, b) {
                    break next;
                }
                if node == 0 {
                    break 0;
                }
                node = self.fail[node] as usize;
            };
        }
        self.hold[node] as usize
    }
}

/// Every byte pattern `secret` is matched as (see the module docs).
fn secret_forms(secret: &str) -> Vec<Vec<u8>> {
    let mut raws = vec![secret.to_owned()];
    if secret.contains('\n') || secret.contains('\r') {
        let lf = secret.replace("\r\n", "\n");
        raws.push(lf.replace('\n', "\r\n"));
        raws.push(lf);
    }
    raws.sort();
    raws.dedup();
    let mut forms = Vec::new();
    for raw in &raws {
        forms.push(raw.as_bytes().to_vec());
        for style in [JsonStyle::Serde, JsonStyle::GoHtml, JsonStyle::AsciiOnly] {
            forms.push(json_escape(raw, style).into_bytes());
        }
        for encoder in URL_ENCODERS {
            for upper in [true, false] {
                forms.push(url_encode(raw, encoder, upper).into_bytes());
            }
        }
        base64_forms(raw.as_bytes(), &mut forms);
    }
    raws.iter_mut().for_each(|r| r.zeroize());
    forms.sort_unstable();
    forms.dedup();
    forms
}

#[derive(Clone, Copy)]
enum JsonStyle {
    /// `serde_json`: `\"` `\\` `\b` `\f` `\n` `\r` `\t`, other controls `\u00xx`.
    Serde,
    /// Go `encoding/json`: Serde plus `<` `>` `&` U+2028 U+2029 as `\u....`.
    GoHtml,
    /// Python `json.dumps` default: Serde plus everything outside printable ASCII as `\u....`.
    AsciiOnly,
}

fn json_escape(s: &str, style: JsonStyle) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => push_u16_escapes(&mut out, c),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if matches!(style, JsonStyle::GoHtml) => {
                push_u16_escapes(&mut out, c)
            }
            c if matches!(style, JsonStyle::AsciiOnly) && !(' '..='~').contains(&c) => {
                push_u16_escapes(&mut out, c)
            }
            c => out.push(c),
        }
    }
    out
}

fn push_u16_escapes(out: &mut String, c: char) {
    let mut units = [0u16; 2];
    for unit in c.encode_utf16(&mut units) {
        out.push_str(&format!("\\u{unit:04x}"));
    }
}

/// Which bytes an URL encoder keeps as they are, and how it writes a space.
struct UrlEncoder {
    keep_extra: &'static [u8],
    space_plus: bool,
}

const URL_ENCODERS: &[UrlEncoder] = &[
    // RFC 3986 unreserved (Go url.PathEscape-like for these bytes, Rust percent-encoding NON_ALPHANUMERIC-ish).
    UrlEncoder {
        keep_extra: b"-._~",
        space_plus: false,
    },
    // Go url.QueryEscape, Python quote_plus.
    UrlEncoder {
        keep_extra: b"-._~",
        space_plus: true,
    },
    // JavaScript encodeURIComponent.
    UrlEncoder {
        keep_extra: b"-_.!~*'()",
        space_plus: false,
    },
    // WHATWG application/x-www-form-urlencoded.
    UrlEncoder {
        keep_extra: b"*-._",
        space_plus: true,
    },
    // Python urllib.parse.quote (safe='/').
    UrlEncoder {
        keep_extra: b"-._~/",
        space_plus: false,
    },
];

fn url_encode(s: &str, encoder: &UrlEncoder, upper: bool) -> String {
    let hex: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || encoder.keep_extra.contains(&b) {
            out.push(b as char);
        } else if b == b' ' && encoder.space_plus {
            out.push('+');
        } else {
            out.push('%');
            out.push(hex[(b >> 4) as usize] as char);
            out.push(hex[(b & 15) as usize] as char);
        }
    }
    out
}

/// Base64 forms at alignments 0, 1, 2 in both alphabets: the characters that depend only on the
/// secret, and that run extended by the end-of-data character with and without padding.
fn base64_forms(secret: &[u8], forms: &mut Vec<Vec<u8>>) {
    let engines: [(
        &base64::engine::GeneralPurpose,
        &base64::engine::GeneralPurpose,
    ); 2] = [(&STANDARD_NO_PAD, &STANDARD), (&URL_SAFE_NO_PAD, &URL_SAFE)];
    for (no_pad, pad) in engines {
        for align in 0..3usize {
            let mut data = vec![0u8; align];
            data.extend_from_slice(secret);
            // Characters 0..lead carry bits of the preceding bytes.
            let lead = (8 * align).div_ceil(6);
            // Characters lead..pure_end carry only secret bits.
            let pure_end = 8 * data.len() / 6;
            let unpadded = no_pad.encode(&data);
            let padded = pad.encode(&data);
            data.zeroize();
            forms.push(unpadded.as_bytes()[lead..pure_end].to_vec());
            forms.push(unpadded.as_bytes()[lead..].to_vec());
            forms.push(padded.as_bytes()[lead..].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// The pieces of `output` between replacements: contiguous runs of input that were kept.
    fn kept_segments(output: &[u8]) -> Vec<&[u8]> {
        let mut segments = Vec::new();
        let mut rest = output;
        while let Some(i) = rest
            .windows(REPLACEMENT.len())
            .position(|w| w == REPLACEMENT)
        {
            segments.push(&rest[..i]);
            rest = &rest[i + REPLACEMENT.len()..];
        }
        segments.push(rest);
        segments
    }

    fn stream_in_chunks(redactor: &Redactor, input: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut stream = redactor.stream();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            out.extend(stream.push(&rest[..n]));
            assert!(
                stream.held() < redactor.max_pattern_len().max(1),
                "held too much"
            );
            rest = &rest[n..];
            i += 1;
        }
        out.extend(stream.finish());
        out
    }

    /// Encodings computed independently of the module (serde_json, the base64 crate, a plain
    /// RFC 3986 encoder): what must never survive redaction.
    fn independent_forms(secret: &str) -> Vec<Vec<u8>> {
        let json = serde_json::to_string(secret).unwrap();
        let mut forms = vec![
            secret.as_bytes().to_vec(),
            json.as_bytes()[1..json.len() - 1].to_vec(),
        ];
        for plus in [false, true] {
            let mut url = String::new();
            for &b in secret.as_bytes() {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        url.push(b as char)
                    }
                    b' ' if plus => url.push('+'),
                    _ => url.push_str(&format!("%{b:02X}")),
                }
            }
            forms.push(url.into_bytes());
        }
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            forms.push(engine.encode(secret).into_bytes());
        }
        forms
    }

    /// The characters of base64(prefix || secret || suffix) that encode only secret bits.
    fn embedded_core(encoded: &str, prefix_len: usize, secret_len: usize) -> Vec<u8> {
        let start = (8 * prefix_len).div_ceil(6);
        let end = 8 * (prefix_len + secret_len) / 6;
        encoded.as_bytes()[start..end].to_vec()
    }

    #[test]
    fn short_and_long_secrets_are_refused_without_revealing_them() {
        let err = Redactor::new(&["long enough", "q7z"]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            RedactError::Secret {
                index: 1,
                problem: SecretProblem::TooShort { len: 3 }
            }
        ));
        assert!(
            msg.contains("at least 4 bytes") && msg.contains("#1"),
            "{msg}"
        );
        assert!(!msg.contains("q7z"), "{msg}");
        let long = "x".repeat(MAX_SECRET_LEN + 1);
        assert!(matches!(
            Redactor::new(&[&long]),
            Err(RedactError::Secret {
                index: 0,
                problem: SecretProblem::TooLong { .. }
            })
        ));
        assert!(Redactor::new(&["abcd"]).is_ok());
        assert_eq!(validate_secret(""), Err(SecretProblem::TooShort { len: 0 }));
    }

    #[test]
    fn debug_never_prints_secrets() {
        let r = Redactor::new(&["hunter2-secret"]).unwrap();
        let mut s = r.stream();
        let _ = s.push(b"xx hunter2-se");
        let dbg = format!("{r:?} {r:#?} {s:?}");
        assert!(
            !dbg.contains("hunter") && !dbg.contains("aHVudGVy"),
            "{dbg}"
        );
    }

    #[test]
    fn raw_and_multiline_forms() {
        let pem = "-----BEGIN KEY-----\nMIIBVQIBADAN\n-----END KEY-----";
        let r = Redactor::new(&["s3cr3t!", pem]).unwrap();
        assert_eq!(r.redact(b"pw=s3cr3t! ok"), b"pw=[REDACTED] ok");
        assert_eq!(
            r.redact(format!("key: {pem}\n").as_bytes()),
            b"key: [REDACTED]\n"
        );
        let crlf = pem.replace('\n', "\r\n");
        assert_eq!(
            r.redact(format!("key: {crlf}\r\n").as_bytes()),
            b"key: [REDACTED]\r\n"
        );
        assert_eq!(r.redact(b"nothing here"), b"nothing here");
    }

    #[test]
    fn json_forms() {
        let secret = "a\"b\\c\nd\t<&>é\u{1}\u{2028}";
        let r = Redactor::new(&[secret]).unwrap();
        let serde = serde_json::to_string(secret).unwrap();
        let out = r.redact(format!("{{\"password\":{serde}}}").as_bytes());
        assert_eq!(out, b"{\"password\":\"[REDACTED]\"}");
        let go = r#"a\"b\\c\nd\t\u003c\u0026\u003eé\u0001\u2028"#;
        assert_eq!(r.redact(format!("\"{go}\"").as_bytes()), b"\"[REDACTED]\"");
        let python = r#"a\"b\\c\nd\t<&>\u00e9\u0001\u2028"#;
        assert_eq!(
            r.redact(format!("\"{python}\"").as_bytes()),
            b"\"[REDACTED]\""
        );
        // Characters outside the BMP as surrogate pairs.
        let r = Redactor::new(&["key😀x"]).unwrap();
        assert_eq!(r.redact(br#""key\ud83d\ude00x""#), b"\"[REDACTED]\"");
    }

    #[test]
    fn url_forms() {
        let r = Redactor::new(&["p@ss word/é*~"]).unwrap();
        for encoded in [
            "p%40ss%20word%2F%C3%A9%2A~",
            "p%40ss+word%2F%C3%A9%2A~",
            "p%40ss%20word%2f%c3%a9%2a~",
            "p%40ss%20word%2F%C3%A9*~",
            "p%40ss+word%2F%C3%A9*%7E",
            "p%40ss%20word/%C3%A9%2A~",
        ] {
            let out = r.redact(format!("GET /?pw={encoded}&x=1").as_bytes());
            assert_eq!(out, b"GET /?pw=[REDACTED]&x=1", "{encoded}");
        }
    }

    #[test]
    fn base64_whole_and_embedded_at_every_alignment() {
        let secret = "correct horse battery staple?>";
        let r = Redactor::new(&[secret]).unwrap();
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            let enc = engine.encode(secret);
            assert_eq!(
                r.redact(format!("token {enc} end").as_bytes()),
                b"token [REDACTED] end"
            );
            for prefix_len in 0..6 {
                for suffix_len in 0..4 {
                    let mut data = vec![0xA5u8; prefix_len];
                    data.extend_from_slice(secret.as_bytes());
                    data.extend_from_slice(&vec![0x5Au8; suffix_len]);
                    let enc = engine.encode(&data);
                    let out = r.redact(enc.as_bytes());
                    let core = embedded_core(&enc, prefix_len, secret.len());
                    let segments = kept_segments(&out);
                    assert_eq!(
                        segments.len(),
                        2,
                        "{prefix_len}/{suffix_len}: {}",
                        String::from_utf8_lossy(&out)
                    );
                    let (left, right) = (segments[0], segments[1]);
                    assert!(enc.as_bytes().starts_with(left) && enc.as_bytes().ends_with(right));
                    // Everything that encodes only secret bits is inside the redacted run.
                    let start = (8 * prefix_len).div_ceil(6);
                    let end = 8 * (prefix_len + secret.len()) / 6;
                    assert!(
                        left.len() <= start && enc.len() - right.len() >= end,
                        "{prefix_len}/{suffix_len}"
                    );
                    assert!(!contains(&out, &core));
                }
            }
        }
    }

    #[test]
    fn overlapping_secrets_leave_no_fragment() {
        let r = Redactor::new(&["abcdef", "defghi"]).unwrap();
        assert_eq!(r.redact(b"xxabcdefghiyy"), b"xx[REDACTED]yy");
        assert_eq!(r.redact(b"abcdefdefghi"), b"[REDACTED]");
        assert_eq!(r.redact(b"abcdef-defghi"), b"[REDACTED]-[REDACTED]");
    }

    #[test]
    fn stream_holds_back_only_a_possible_partial_match() {
        let r = Redactor::new(&["world-secret"]).unwrap();
        let mut s = r.stream();
        assert_eq!(s.push(b"hello wor"), b"hello ");
        assert_eq!(s.held(), 3);
        assert_eq!(s.push(b"ld-sec"), b"");
        assert_eq!(s.push(b"ret! and "), b"[REDACTED]! and ");
        assert_eq!(s.held(), 0);
        assert_eq!(s.push(b"worl"), b"");
        assert_eq!(s.push(b"d peace\n"), b"world peace\n");
        assert_eq!(s.push(b"w"), b"");
        assert_eq!(s.finish(), b"w");
        // After finish the stream starts afresh.
        assert_eq!(s.push(b"x world-secret"), b"x [REDACTED]");
        assert_eq!(s.finish(), b"");
        let none = Redactor::none();
        let mut s = none.stream();
        assert_eq!(s.push(b"anything"), b"anything");
        assert_eq!(s.finish(), b"");
        assert_eq!(Redactor::new(&[]).unwrap().redact(b"abc"), b"abc");
    }

    #[test]
    fn adjacent_occurrences_across_chunks_make_one_run() {
        let r = Redactor::new(&["abcd", "efgh"]).unwrap();
        let batch = r.redact(b"..abcdefgh..");
        assert_eq!(batch, b"..[REDACTED]..");
        for split in 0..12 {
            let input = b"..abcdefgh..";
            assert_eq!(
                stream_in_chunks(&r, input, &[split.max(1), 1, 3]),
                batch,
                "split {split}"
            );
        }
    }

    const SECRET_RE: &str = "[abc12é😀 \n\"\\\\+/=%<&~-]{4,14}";

    #[derive(Debug, Clone)]
    enum Piece {
        Filler(String),
        Form {
            secret: usize,
            form: usize,
        },
        Embedded {
            secret: usize,
            prefix: Vec<u8>,
            suffix: Vec<u8>,
            url_safe: bool,
        },
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            "[abc12é \n\"\\\\+/=%-]{0,8}".prop_map(Piece::Filler),
            (0usize..4, 0usize..8).prop_map(|(secret, form)| Piece::Form { secret, form }),
            (
                0usize..4,
                proptest::collection::vec(any::<u8>(), 0..5),
                proptest::collection::vec(any::<u8>(), 0..5),
                any::<bool>()
            )
                .prop_map(|(secret, prefix, suffix, url_safe)| Piece::Embedded {
                    secret,
                    prefix,
                    suffix,
                    url_safe
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn no_secret_form_survives_and_streaming_equals_batch(
            secrets in proptest::collection::vec(proptest::string::string_regex(SECRET_RE).unwrap(), 1..4),
            pieces in proptest::collection::vec(piece(), 0..12),
            sizes in proptest::collection::vec(1usize..40, 1..8),
        ) {
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let r = Redactor::new(&refs).unwrap();
            let forms: Vec<Vec<Vec<u8>>> = secrets.iter().map(|s| independent_forms(s)).collect();
            let mut input = Vec::new();
            let mut forbidden: Vec<Vec<u8>> = forms.iter().flatten().cloned().collect();
            for p in &pieces {
                match p {
                    Piece::Filler(f) => input.extend_from_slice(f.as_bytes()),
                    Piece::Form { secret, form } => {
                        let f = &forms[secret % forms.len()];
                        input.extend_from_slice(&f[form % f.len()]);
                    }
                    Piece::Embedded { secret, prefix, suffix, url_safe } => {
                        let s = secrets[secret % secrets.len()].as_bytes();
                        let mut data = prefix.clone();
                        data.extend_from_slice(s);
                        data.extend_from_slice(suffix);
                        let enc = if *url_safe { URL_SAFE.encode(&data) } else { STANDARD.encode(&data) };
                        forbidden.push(embedded_core(&enc, prefix.len(), s.len()));
                        input.extend_from_slice(enc.as_bytes());
                    }
                }
            }
            let batch = r.redact(&input);
            let streamed = stream_in_chunks(&r, &input, &sizes);
            prop_assert_eq!(&streamed, &batch);
            for segment in kept_segments(&batch) {
                for needle in &forbidden {
                    prop_assert!(!contains(segment, needle),
                        "form {:?} survived in {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(&batch));
                }
            }
        }

        #[test]
        fn text_without_secrets_passes_through_unchanged(
            secrets in proptest::collection::vec("[g-z]{4,10}", 1..4),
            input in "[!#$(){};: \n]{0,200}",
            sizes in proptest::collection::vec(1usize..30, 1..8),
        ) {
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let r = Redactor::new(&refs).unwrap();
            prop_assert_eq!(r.redact(input.as_bytes()), input.as_bytes());
            prop_assert_eq!(stream_in_chunks(&r, input.as_bytes(), &sizes), input.as_bytes());
        }

        #[test]
        fn json_style_serde_matches_serde_json(s in any::<String>()) {
            let serde = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(json_escape(&s, JsonStyle::Serde), &serde[1..serde.len() - 1]);
        }
    }
}
