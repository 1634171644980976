//! Which connected agent gets a queued task (PROTOCOL.md "Dispatch"): an agent of the task's
//! pool with a free slot, never more tasks than its slots, not one that just rejected the task.
//!
//! Owns: the choice as a pure function over a snapshot. Never sends anything.

use std::time::Duration;
use tokio::time::Instant;

/// After an agent rejects a task, it is not offered that task again for this long (unless it is
/// the only way the task could ever run, in which case the task waits for the cooldown).
pub const REJECT_COOLDOWN: Duration = Duration::from_secs(10);

/// An agent as dispatch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub pool: &'a str,
    pub free_slots: u32,
}

/// A past rejection of the task being placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub agent: String,
    pub at: Instant,
}

/// The agent to assign a task of `pool` to: most free slots first, then by name (stable).
pub fn pick<'a>(
    pool: &str,
    candidates: &[Candidate<'a>],
    rejections: &[Rejection],
    now: Instant,
) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|c| c.pool == pool && c.free_slots > 0)
        .filter(|c| {
            !rejections
                .iter()
                .any(|r| r.agent == c.name && now.saturating_duration_since(r.at) < REJECT_COOLDOWN)
        })
        .min_by(|a, b| b.free_slots.cmp(&a.free_slots).then(a.name.cmp(b.name)))
        .map(|c| c.name)
}

/// When a rejection stops excluding its agent, if it still does at `now`.
pub fn cooldown_ends(rejections: &[Rejection], now: Instant) -> Option<Instant> {
    rejections
        .iter()
        .map(|r| r.at + REJECT_COOLDOWN)
        .filter(|t| *t > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(name: &'a str, pool: &'a str, free: u32) -> Candidate<'a> {
        Candidate {
            name,
            pool,
            free_slots: free,
        }
    }

    #[test]
    fn pool_and_free_slots() {
        let now = Instant::now();
        let cands = [c("a", "gpu", 5), c("b", "default", 0), c("c", "default", 1)];
        assert_eq!(pick("default", &cands, &[], now), Some("c"));
        assert_eq!(pick("gpu", &cands, &[], now), Some("a"));
        assert_eq!(pick("other", &cands, &[], now), None);
        let full = [c("b", "default", 0)];
        assert_eq!(pick("default", &full, &[], now), None);
    }

    #[test]
    fn prefers_most_free_then_name() {
        let now = Instant::now();
        let cands = [c("b", "p", 2), c("a", "p", 2), c("z", "p", 3)];
        assert_eq!(pick("p", &cands, &[], now), Some("z"));
        let cands = [c("b", "p", 2), c("a", "p", 2)];
        assert_eq!(pick("p", &cands, &[], now), Some("a"));
    }

    #[test]
    fn recent_rejecter_is_skipped_until_cooldown() {
        let now = Instant::now();
        let cands = [c("a", "p", 2), c("b", "p", 1)];
        let rej = [Rejection {
            agent: "a".into(),
            at: now,
        }];
        assert_eq!(pick("p", &cands, &rej, now), Some("b"));
        let only_a = [c("a", "p", 2)];
        assert_eq!(pick("p", &only_a, &rej, now), None);
        assert_eq!(cooldown_ends(&rej, now), Some(now + REJECT_COOLDOWN));
        let later = now + REJECT_COOLDOWN;
        assert_eq!(pick("p", &only_a, &rej, later), Some("a"));
        assert_eq!(cooldown_ends(&rej, later), None);
    }
}
