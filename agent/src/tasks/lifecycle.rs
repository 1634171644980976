//! The phases of a task on the link side and the transitions allowed between them.
//!
//! ```text
//! Received ──► ReceivingInputs ──► Running ──► Finishing ──► Done
//!    │               │                            ▲
//!    └───────────────┴────────────────────────────┘  (refused inputs, cancel, link lost)
//! ```
//!
//! `Finishing`: the result is known and `done` is queued; the task no longer holds a slot.
//! `Done`: `done` was acknowledged; the task is forgotten.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted; no input chunk yet.
    Received,
    /// Input chunks arriving (workspace archive, then the plan for an apply).
    ReceivingInputs,
    /// The executor has the task.
    Running,
    /// The result is known; waiting for the control plane to acknowledge `done`.
    Finishing,
    /// `done` acknowledged.
    Done,
}

/// A transition the lifecycle does not allow. A bug or a peer breaking the protocol's order; the
/// task keeps its phase.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("a task cannot go from {from:?} to {to:?}")]
pub struct InvalidTransition {
    pub from: Phase,
    pub to: Phase,
}

impl Phase {
    /// Whether `self -> to` is allowed.
    pub fn can_go(self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (Received, ReceivingInputs)
                | (Received, Running)
                | (Received, Finishing)
                | (ReceivingInputs, Running)
                | (ReceivingInputs, Finishing)
                | (Running, Finishing)
                | (Finishing, Done)
        )
    }

    /// Move to `to`, or refuse without changing anything.
    pub fn advance(&mut self, to: Phase) -> Result<(), InvalidTransition> {
        if !self.can_go(to) {
            return Err(InvalidTransition { from: *self, to });
        }
        *self = to;
        Ok(())
    }

    /// A task holds one of the agent's slots from Accept until its result is known.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Phase::Received | Phase::ReceivingInputs | Phase::Running
        )
    }

    /// Still waiting for input chunks.
    pub fn awaits_inputs(self) -> bool {
        matches!(self, Phase::Received | Phase::ReceivingInputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const ALL: [Phase; 5] = [Received, ReceivingInputs, Running, Finishing, Done];

    #[test]
    fn happy_path() {
        let mut p = Received;
        for to in [ReceivingInputs, Running, Finishing, Done] {
            p.advance(to).unwrap();
        }
        assert_eq!(p, Done);
    }

    #[test]
    fn early_failure_goes_to_finishing() {
        for from in [Received, ReceivingInputs, Running] {
            let mut p = from;
            p.advance(Finishing).unwrap();
        }
    }

    #[test]
    fn invalid_transitions_are_errors_and_change_nothing() {
        let allowed = [
            (Received, ReceivingInputs),
            (Received, Running),
            (Received, Finishing),
            (ReceivingInputs, Running),
            (ReceivingInputs, Finishing),
            (Running, Finishing),
            (Finishing, Done),
        ];
        for from in ALL {
            for to in ALL {
                let mut p = from;
                let r = p.advance(to);
                if allowed.contains(&(from, to)) {
                    assert!(r.is_ok(), "{from:?} -> {to:?}");
                    assert_eq!(p, to);
                } else {
                    assert_eq!(r, Err(InvalidTransition { from, to }));
                    assert_eq!(p, from);
                }
            }
        }
    }

    #[test]
    fn slots_are_held_until_the_result_is_known() {
        assert!(Received.holds_slot() && ReceivingInputs.holds_slot() && Running.holds_slot());
        assert!(!Finishing.holds_slot() && !Done.holds_slot());
    }
}
