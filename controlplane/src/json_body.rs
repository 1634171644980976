//! Parsing API request bodies without echoing their values.
//!
//! serde's messages quote the offending value (`invalid type: string "TOKEN=abc…"`), and request
//! bodies carry secrets and enrollment tokens. [`parse`] answers with what is safe to show: the
//! JSON path of the problem, its line and column, and the kind of problem (with what the schema
//! expected), never the value.

use crate::api::ApiError;
use serde::de::DeserializeOwned;

/// Longest JSON path echoed back (map keys come from the client).
const MAX_PATH: usize = 200;

/// Parse `body` as a `T`; on failure a 400 whose message starts with `what` (e.g. "invalid
/// submit request") and never contains a value from the body.
pub fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| ApiError::bad_request(format!("{what}: {}", describe(&e))))?;
    // Trailing characters after the value.
    de.end()
        .map_err(|e| ApiError::bad_request(format!("{what}: {}", describe_plain(&e))))?;
    Ok(value)
}

/// A value-free description of a deserialisation error (path, kind, line and column).
pub fn describe(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = e.inner();
    let mut segments: Vec<&serde_path_to_error::Segment> = e.path().iter().collect();
    if message(inner).starts_with("unknown field ") {
        // The last segment is the unknown key itself: the client's text, not the schema's.
        segments.pop();
    }
    let path = join(&segments);
    let at = position(inner);
    if path.is_empty() || path == "." {
        format!("{}{at}", kind(inner))
    } else {
        format!("{} {}{at}", field(&path), kind(inner))
    }
}

/// Segments as serde_path_to_error shows them: `a.b[0]`.
fn join(segments: &[&serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in segments {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

pub fn describe_plain(e: &serde_json::Error) -> String {
    format!("{}{}", kind(e), position(e))
}

fn field(path: &str) -> String {
    let mut p: String = path.chars().filter(|c| !c.is_control()).collect();
    if p.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
        p.push('…');
    }
    format!("at {p}:")
}

fn position(e: &serde_json::Error) -> String {
    if e.line() == 0 {
        String::new()
    } else {
        format!(" (line {}, column {})", e.line(), e.column())
    }
}

/// The kind of problem. For data errors, only serde's own message shapes are used, and only
/// their schema side (what was expected, which field is missing); anything else is "invalid
/// value", since a custom message may quote the input.
fn kind(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "the body could not be read".into(),
        Category::Eof => "the JSON ends too early".into(),
        Category::Syntax => "malformed JSON".into(),
        Category::Data => {
            let msg = message(e);
            let expected = msg
                .rfind(", expected ")
                .map(|i| &msg[i + ", expected ".len()..])
                .filter(|x| !x.is_empty());
            let with = |what: &str| match expected {
                Some(x) => format!("{what}, expected {x}"),
                None => what.to_string(),
            };
            if msg.starts_with("invalid type: ") {
                with("wrong type")
            } else if msg.starts_with("invalid value: ") {
                with("invalid value")
            } else if msg.starts_with("invalid length ") {
                with("wrong length")
            } else if msg.starts_with("unknown variant ") {
                with("unknown variant")
            } else if msg.starts_with("unknown field ") {
                with("unknown field")
            } else if is_schema_field(&msg, "missing field `")
                || is_schema_field(&msg, "duplicate field `")
            {
                msg
            } else {
                "invalid value".into()
            }
        }
    }
}

/// `missing field `name`` / `duplicate field `name``: the name is the schema's (an identifier).
fn is_schema_field(msg: &str, prefix: &str) -> bool {
    msg.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix('`'))
        .is_some_and(|name| {
            !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// serde's message without serde_json's " at line L column C".
fn message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(m) => m.to_string(),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::Secrets;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        op: String,
        #[serde(default)]
        secrets: Secrets,
        #[serde(default)]
        vars: BTreeMap<String, String>,
        #[serde(default)]
        timeout_secs: u64,
        #[serde(default)]
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Plan,
    }

    fn err(body: &str) -> String {
        parse::<Body>(body.as_bytes(), "invalid request")
            .unwrap_err()
            .message
    }

    #[test]
    fn values_are_never_echoed() {
        let cases = [
            r#"{"op":"plan","secrets":"TOKEN=abc-secret-value"}"#,
            r#"{"op":"plan","secrets":{"TOKEN":"abc-secret-value","X":5}}"#,
            r#"{"op":"plan","vars":{"a":["abc-secret-value"]}}"#,
            r#"{"op":"plan","timeout_secs":"abc-secret-value"}"#,
            r#"{"op":"plan","kind":"abc-secret-value"}"#,
            r#"{"op":"plan","abc-secret-value":1}"#,
            r#"{"op":"abc-secret-value" x}"#,
            r#"{"op":"plan"} "abc-secret-value""#,
            r#"["plan", "abc-secret-value"]"#,
            r#""abc-secret-value""#,
            r#"{"op":"plan","timeout_secs":-12345678}"#,
        ];
        for body in cases {
            let m = err(body);
            assert!(!m.contains("abc-secret-value"), "{body} -> {m}");
            assert!(!m.contains("12345678"), "{body} -> {m}");
            assert!(m.starts_with("invalid request: "), "{m}");
        }
    }

    #[test]
    fn the_message_names_the_path_kind_and_position() {
        let m = err(r#"{"op":"plan","secrets":"TOKEN=abc"}"#);
        assert!(m.contains("at secrets:"), "{m}");
        assert!(m.contains("wrong type, expected a map"), "{m}");
        assert!(m.contains("line 1, column"), "{m}");
        let m = err(r#"{"op":"plan","vars":{"region":7}}"#);
        assert!(
            m.contains("at vars.region: wrong type, expected a string"),
            "{m}"
        );
        let m = err(r#"{"secrets":{}}"#);
        assert!(m.contains("missing field `op`"), "{m}");
        let m = err(r#"{"op":"plan","kind":"apply"}"#);
        assert!(
            m.contains("at kind: unknown variant, expected `plan`"),
            "{m}"
        );
        let m = err(r#"{"op":"plan","vars":{},"vaars":{}}"#);
        assert!(m.contains("unknown field, expected one of `op`"), "{m}");
        assert!(!m.contains("vaars"), "{m}");
        let m = err(r#"{"op":"plan","#);
        assert!(m.contains("the JSON ends too early"), "{m}");
        let m = err(r#"{"op":"plan"} x"#);
        assert!(m.contains("malformed JSON"), "{m}");
    }
}
