//! Version negotiation: both sides list the versions they speak; the highest common one wins.

use thiserror::Error;

/// Protocol versions this build speaks, lowest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("no common protocol version: we speak {ours:?}, the peer speaks {theirs:?}")]
pub struct VersionError {
    pub ours: Vec<u16>,
    pub theirs: Vec<u16>,
}

/// The highest version present in both lists, or an error naming both lists.
pub fn negotiate(ours: &[u16], theirs: &[u16]) -> Result<u16, VersionError> {
    ours.iter()
        .filter(|v| theirs.contains(v))
        .max()
        .copied()
        .ok_or_else(|| VersionError {
            ours: ours.to_vec(),
            theirs: theirs.iter().take(32).copied().collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate(&[1, 2, 3], &[2, 3, 4]), Ok(3));
        assert_eq!(negotiate(&[1], &[1]), Ok(1));
    }

    #[test]
    fn refuses_disjoint() {
        let err = negotiate(&[1], &[2, 3]).unwrap_err();
        assert!(err.to_string().contains("[1]"));
        assert!(err.to_string().contains("[2, 3]"));
        assert!(negotiate(&[1], &[]).is_err());
    }
}
