//! The outbox of one task: every sequenced message the agent sent or will send about the task,
//! kept until the control plane acknowledges it.
//!
//! Sequence numbers start at 1 and grow by one per message in the order pushed. `ack` is
//! cumulative. After a reconnect the outbox is rewound to the last acknowledged message so that
//! everything after it is sent again, in order.
//!
//! This type owns the numbering and the retention in memory; it never touches the network or the
//! disk. The task manager appends every message to the task's encrypted spool
//! ([`crate::spool::TaskSpool`]) before it pushes it here, and rebuilds an outbox from the spool
//! after a restart ([`Outbox::restore`]).

use bytes::Bytes;
use std::collections::VecDeque;
use thiserror::Error;

/// A message ready for the wire: a JSON control message or a binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFrame {
    Text(String),
    Binary(Bytes),
}

impl WireFrame {
    pub fn len(&self) -> usize {
        match self {
            WireFrame::Text(s) => s.len(),
            WireFrame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An acknowledgement or resume point that does not fit what was sent. Not retryable: it means
/// the peers disagree about the task's history; the caller reports it to the peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OutboxError {
    #[error("acknowledged seq {acked} but the last message sent has seq {last}")]
    BeyondEnd { acked: u64, last: u64 },
    #[error("resume from seq {resume} but seq {acked} was already acknowledged and dropped")]
    Behind { resume: u64, acked: u64 },
}

#[derive(Debug)]
pub struct Outbox {
    /// Unacknowledged messages, oldest first; the first has seq `acked + 1`.
    entries: VecDeque<WireFrame>,
    /// Highest acknowledged seq (0: none).
    acked: u64,
    /// Highest seq handed to the current connection.
    sent: u64,
    bytes: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            entries: VecDeque::new(),
            acked: 0,
            sent: 0,
            bytes: 0,
        }
    }

    /// An outbox holding `frames` (seqs `acked + 1 ..`, in order) reloaded from the spool.
    pub fn restore(acked: u64, frames: impl IntoIterator<Item = WireFrame>) -> Self {
        let entries: VecDeque<WireFrame> = frames.into_iter().collect();
        let bytes = entries.iter().map(WireFrame::len).sum();
        Outbox {
            entries,
            acked,
            sent: acked,
            bytes,
        }
    }

    /// The peer holds everything up to `acked`, beyond what this outbox knows (its spooled
    /// history was lost): forget what is held and number on from `acked`.
    pub fn restart_at(&mut self, acked: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.acked = acked;
        self.sent = acked;
    }

    /// Seq of the last message pushed (0: none).
    pub fn last_seq(&self) -> u64 {
        self.acked + self.entries.len() as u64
    }

    /// Highest acknowledged seq (0: none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Append a message; `build` receives its seq. Returns the seq.
    pub fn push(&mut self, build: impl FnOnce(u64) -> WireFrame) -> u64 {
        let seq = self.last_seq() + 1;
        let frame = build(seq);
        self.bytes += frame.len();
        self.entries.push_back(frame);
        seq
    }

    /// Append a message whose seq is already `last_seq() + 1`. Returns the seq.
    pub fn push_frame(&mut self, frame: WireFrame) -> u64 {
        self.push(|_| frame)
    }

    /// Cumulative acknowledgement: drop everything up to and including `seq`. An old ack is a
    /// no-op. Returns how many messages were dropped.
    pub fn ack(&mut self, seq: u64) -> Result<usize, OutboxError> {
        if seq > self.last_seq() {
            return Err(OutboxError::BeyondEnd {
                acked: seq,
                last: self.last_seq(),
            });
        }
        let mut dropped = 0;
        while self.acked < seq {
            if let Some(f) = self.entries.pop_front() {
                self.bytes -= f.len();
            }
            self.acked += 1;
            dropped += 1;
        }
        self.sent = self.sent.max(self.acked);
        Ok(dropped)
    }

    /// A new connection starts: everything not acknowledged is to be sent again.
    pub fn rewind(&mut self) {
        self.sent = self.acked;
    }

    /// A new connection reports that the peer stored everything up to `acked`: drop that and send
    /// the rest again. A resume point behind what was already acknowledged cannot be honoured
    /// (those messages are gone): the outbox rewinds to its own ack and reports it.
    pub fn resume_from(&mut self, acked: u64) -> Result<(), OutboxError> {
        let result = if acked < self.acked {
            Err(OutboxError::Behind {
                resume: acked,
                acked: self.acked,
            })
        } else {
            self.ack(acked).map(|_| ())
        };
        self.rewind();
        result
    }

    /// Whether there is something not yet handed to the current connection.
    pub fn has_unsent(&self) -> bool {
        self.sent < self.last_seq()
    }

    /// The next message not yet handed to the current connection, marked as sent.
    pub fn next_unsent(&mut self) -> Option<WireFrame> {
        if !self.has_unsent() {
            return None;
        }
        let idx = (self.sent - self.acked) as usize;
        let frame = self.entries.get(idx)?.clone();
        self.sent += 1;
        Some(frame)
    }

    /// Nothing is waiting for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held for messages not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(seq: u64) -> WireFrame {
        WireFrame::Text(format!("m{seq}"))
    }

    fn drain(o: &mut Outbox) -> Vec<WireFrame> {
        std::iter::from_fn(|| o.next_unsent()).collect()
    }

    #[test]
    fn numbers_from_one_and_sends_in_order() {
        let mut o = Outbox::new();
        assert_eq!(o.push(text), 1);
        assert_eq!(o.push(text), 2);
        assert_eq!(drain(&mut o), vec![text(1), text(2)]);
        assert!(!o.has_unsent());
        assert_eq!(o.push(text), 3);
        assert_eq!(drain(&mut o), vec![text(3)]);
    }

    #[test]
    fn ack_is_cumulative_and_idempotent() {
        let mut o = Outbox::new();
        for _ in 0..5 {
            o.push(text);
        }
        drain(&mut o);
        assert_eq!(o.ack(3), Ok(3));
        assert_eq!(o.acked(), 3);
        assert_eq!(o.ack(2), Ok(0));
        assert_eq!(o.ack(5), Ok(2));
        assert!(o.is_empty());
        assert_eq!(o.unacked_bytes(), 0);
        assert_eq!(o.ack(6), Err(OutboxError::BeyondEnd { acked: 6, last: 5 }));
    }

    #[test]
    fn rewind_resends_everything_unacked() {
        let mut o = Outbox::new();
        for _ in 0..4 {
            o.push(text);
        }
        drain(&mut o);
        o.ack(1).unwrap();
        o.rewind();
        assert_eq!(drain(&mut o), vec![text(2), text(3), text(4)]);
    }

    #[test]
    fn resume_from_the_peers_point() {
        let mut o = Outbox::new();
        for _ in 0..4 {
            o.push(text);
        }
        drain(&mut o);
        o.resume_from(2).unwrap();
        assert_eq!(drain(&mut o), vec![text(3), text(4)]);
        // A resume point behind our own ack: resend what we still have, report it.
        o.ack(3).unwrap();
        assert_eq!(
            o.resume_from(1),
            Err(OutboxError::Behind {
                resume: 1,
                acked: 3
            })
        );
        assert_eq!(drain(&mut o), vec![text(4)]);
        assert!(o.resume_from(9).is_err());
    }

    #[test]
    fn unsent_and_acked_interleave() {
        let mut o = Outbox::new();
        o.push(text);
        o.push(text);
        assert_eq!(o.next_unsent(), Some(text(1)));
        // The peer acks 1 before we send 2.
        o.ack(1).unwrap();
        assert_eq!(o.next_unsent(), Some(text(2)));
        assert_eq!(o.next_unsent(), None);
    }

    #[test]
    fn restore_and_restart_at() {
        let mut o = Outbox::restore(4, [text(5), text(6)]);
        assert_eq!(o.last_seq(), 6);
        assert_eq!(o.acked(), 4);
        assert_eq!(drain(&mut o), vec![text(5), text(6)]);
        o.resume_from(5).unwrap();
        assert_eq!(drain(&mut o), vec![text(6)]);
        o.restart_at(10);
        assert!(o.is_empty());
        assert_eq!(o.last_seq(), 10);
        assert_eq!(o.push_frame(text(11)), 11);
        assert_eq!(drain(&mut o), vec![text(11)]);
    }

    proptest! {
        /// Whatever the pattern of pushes, acks and reconnects, the peer receives every message
        /// exactly in order when it keeps only the next expected seq (as the control plane does).
        #[test]
        fn peer_sees_every_message_once_in_order(ops in proptest::collection::vec(0u8..4, 1..200)) {
            let mut o = Outbox::new();
            let mut stored = 0u64; // what the peer has stored
            for op in ops {
                match op {
                    0 => { o.push(text); }
                    1 => {
                        if let Some(WireFrame::Text(t)) = o.next_unsent() {
                            let seq: u64 = t[1..].parse().unwrap();
                            if seq == stored + 1 { stored = seq; }
                            prop_assert!(seq <= stored + 1, "gap: got {} after {}", seq, stored);
                        }
                    }
                    2 => { o.ack(stored).unwrap(); }
                    _ => { o.resume_from(stored).unwrap(); }
                }
            }
            o.resume_from(stored).unwrap();
            while let Some(WireFrame::Text(t)) = o.next_unsent() {
                let seq: u64 = t[1..].parse().unwrap();
                prop_assert_eq!(seq, stored + 1);
                stored = seq;
            }
            prop_assert_eq!(stored, o.last_seq());
        }
    }
}
