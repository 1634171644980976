//! Sequence bookkeeping for what an agent sends about a task (PROTOCOL.md "Sequencing"): store
//! the next expected message, ignore resends, refuse gaps.
//!
//! Owns: the decision as a pure function. Never touches storage: the store applies it inside the
//! transaction that writes the message.

/// What to do with a sequenced message, given the highest sequence number already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqDecision {
    /// `seq` is the next one: store it; the new acknowledged point is `seq`.
    Store,
    /// Already stored (a resend after reconnect): ignore it, acknowledge `acked` again.
    Duplicate { acked: u64 },
    /// Something in between is missing: a protocol violation.
    Gap { expected: u64 },
}

pub fn classify(acked: u64, seq: u64) -> SeqDecision {
    if seq <= acked {
        SeqDecision::Duplicate { acked }
    } else if seq == acked + 1 {
        SeqDecision::Store
    } else {
        SeqDecision::Gap {
            expected: acked + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_duplicate_gap() {
        assert_eq!(classify(0, 1), SeqDecision::Store);
        assert_eq!(classify(5, 6), SeqDecision::Store);
        assert_eq!(classify(5, 5), SeqDecision::Duplicate { acked: 5 });
        assert_eq!(classify(5, 1), SeqDecision::Duplicate { acked: 5 });
        // seq 0 is never valid (numbering starts at 1): treated as already stored.
        assert_eq!(classify(0, 0), SeqDecision::Duplicate { acked: 0 });
        assert_eq!(classify(5, 7), SeqDecision::Gap { expected: 6 });
        assert_eq!(
            classify(u64::MAX, u64::MAX),
            SeqDecision::Duplicate { acked: u64::MAX }
        );
    }
}
