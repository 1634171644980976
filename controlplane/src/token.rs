//! The user API's bearer token check.
//!
//! Owns: comparing a presented `Authorization` header with the token in constant time. Never logs
//! either token.

use ring::digest::{digest, SHA256};

/// True when `header` is `Bearer <token>` with exactly `expected`. Both sides are hashed first so
/// the comparison time depends on neither length nor content.
pub fn bearer_matches(header: Option<&str>, expected: &str) -> bool {
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let a = digest(&SHA256, presented.trim().as_bytes());
    let b = digest(&SHA256, expected.as_bytes());
    let diff = a
        .as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff == 0 && !expected.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check() {
        assert!(bearer_matches(Some("Bearer abc123"), "abc123"));
        assert!(!bearer_matches(Some("Bearer abc124"), "abc123"));
        assert!(!bearer_matches(Some("Bearer abc1234"), "abc123"));
        assert!(!bearer_matches(Some("Bearer "), "abc123"));
        assert!(!bearer_matches(Some("abc123"), "abc123"));
        assert!(!bearer_matches(Some("Basic abc123"), "abc123"));
        assert!(!bearer_matches(None, "abc123"));
        assert!(!bearer_matches(Some("Bearer "), ""));
    }
}
