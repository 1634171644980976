//! The connection lifecycle as a state machine, and the reconnect backoff. Pure: the caller
//! supplies the time and the random source.
//!
//! ```text
//! Connecting{n} ──connect failed──► Disconnected{n, delay(n)} ──backoff elapsed──► Connecting{n+1}
//!      │
//!      └──welcomed──► Connected{n, since} ──lost──► Disconnected{0, delay(0)}  if it lasted
//!                                                   Disconnected{n, delay(n)}  otherwise
//! any ──stop──► Stopped
//! ```
//!
//! `n` counts consecutive attempts that did not give a lasting connection; it is the exponent of
//! the backoff.

use rand::Rng;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;

/// Exponential backoff with full jitter: `delay(n) = random(0, min(max, initial * 2^n))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The upper bound of the delay after `attempt` failures: `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        2u32.checked_pow(attempt)
            .and_then(|f| self.initial.checked_mul(f))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rng.gen_range(0..=ceiling))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Waiting `backoff` before the next attempt.
    Disconnected { attempt: u32, backoff: Duration },
    /// TCP, TLS, WebSocket and Hello/Welcome under way.
    Connecting { attempt: u32 },
    /// Welcomed; frames flowing.
    Connected { attempt: u32, since: Instant },
    /// Shut down; no more attempts.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    BackoffElapsed,
    /// TCP, TLS, WebSocket or the handshake failed (including a refused version).
    ConnectFailed,
    Welcomed {
        at: Instant,
    },
    /// The connection ended (closed, error, or dead peer).
    Lost {
        at: Instant,
    },
    Stop,
}

/// An event that does not apply in the current state: a bug in the caller.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("link event {event:?} is not valid in state {state:?}")]
pub struct InvalidLinkTransition {
    pub state: LinkState,
    pub event: LinkEvent,
}

/// What the machine needs to decide.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub backoff: Backoff,
    /// A connection that lasted this long resets the backoff.
    pub stable_after: Duration,
}

impl LinkState {
    /// The state to start in: connect at once.
    pub fn start() -> LinkState {
        LinkState::Connecting { attempt: 0 }
    }

    /// Apply an event.
    pub fn on(
        self,
        event: LinkEvent,
        policy: &Policy,
        rng: &mut impl Rng,
    ) -> Result<LinkState, InvalidLinkTransition> {
        use LinkEvent::*;
        use LinkState::*;
        let next = match (self, event) {
            (Stopped, _) => Stopped,
            (_, Stop) => Stopped,
            (Disconnected { attempt, .. }, BackoffElapsed) => Connecting {
                attempt: attempt.saturating_add(1),
            },
            (Connecting { attempt }, ConnectFailed) => Disconnected {
                attempt,
                backoff: policy.backoff.delay(attempt, rng),
            },
            (Connecting { attempt }, Welcomed { at }) => Connected { attempt, since: at },
            (Connected { attempt, since }, Lost { at }) => {
                let attempt = if at.saturating_duration_since(since) >= policy.stable_after {
                    0
                } else {
                    attempt
                };
                Disconnected {
                    attempt,
                    backoff: policy.backoff.delay(attempt, rng),
                }
            }
            (state, event) => return Err(InvalidLinkTransition { state, event }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> Policy {
        Policy {
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            stable_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = policy().backoff;
        let ms: Vec<u128> = (0..9).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(
            ms,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.ceiling(40), b.max);
        assert_eq!(b.ceiling(u32::MAX), b.max);
    }

    #[test]
    fn full_jitter_stays_in_range_and_spreads() {
        let b = policy().backoff;
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            let draws: Vec<Duration> = (0..500).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling));
            // Full jitter: the draws cover the low and the high end of the range, so a pool of
            // agents does not reconnect in lockstep.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "attempt {attempt}");
            assert!(
                draws.iter().any(|d| *d > ceiling * 3 / 4),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn zero_initial_gives_zero_delay() {
        let b = Backoff {
            initial: Duration::ZERO,
            max: Duration::from_secs(1),
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.delay(5, &mut rng), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_grow_the_backoff_and_a_lasting_connection_resets_it() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        let mut s = LinkState::start();
        for expected in 0..5 {
            s = s.on(LinkEvent::ConnectFailed, &p, &mut rng).unwrap();
            match s {
                LinkState::Disconnected { attempt, backoff } => {
                    assert_eq!(attempt, expected);
                    assert!(backoff <= p.backoff.ceiling(expected));
                }
                other => panic!("{other:?}"),
            }
            s = s.on(LinkEvent::BackoffElapsed, &p, &mut rng).unwrap();
        }
        assert_eq!(s, LinkState::Connecting { attempt: 5 });

        // A connection that drops at once keeps the exponent.
        let t0 = Instant::now();
        s = s.on(LinkEvent::Welcomed { at: t0 }, &p, &mut rng).unwrap();
        s = s
            .on(
                LinkEvent::Lost {
                    at: t0 + Duration::from_secs(1),
                },
                &p,
                &mut rng,
            )
            .unwrap();
        assert!(matches!(s, LinkState::Disconnected { attempt: 5, .. }));

        // One that lasted resets it.
        s = s.on(LinkEvent::BackoffElapsed, &p, &mut rng).unwrap();
        s = s.on(LinkEvent::Welcomed { at: t0 }, &p, &mut rng).unwrap();
        s = s
            .on(
                LinkEvent::Lost {
                    at: t0 + p.stable_after,
                },
                &p,
                &mut rng,
            )
            .unwrap();
        match s {
            LinkState::Disconnected { attempt, backoff } => {
                assert_eq!(attempt, 0);
                assert!(backoff <= p.backoff.initial);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_events_are_errors_and_stop_is_final() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let s = LinkState::start();
        assert!(s.on(LinkEvent::Lost { at: now }, &p, &mut rng).is_err());
        assert!(s.on(LinkEvent::BackoffElapsed, &p, &mut rng).is_err());
        let c = s.on(LinkEvent::Welcomed { at: now }, &p, &mut rng).unwrap();
        assert!(c.on(LinkEvent::Welcomed { at: now }, &p, &mut rng).is_err());
        assert!(c.on(LinkEvent::ConnectFailed, &p, &mut rng).is_err());
        let d = LinkState::Disconnected {
            attempt: 0,
            backoff: Duration::ZERO,
        };
        assert!(d.on(LinkEvent::Welcomed { at: now }, &p, &mut rng).is_err());
        for st in [s, c, d] {
            let stopped = st.on(LinkEvent::Stop, &p, &mut rng).unwrap();
            assert_eq!(stopped, LinkState::Stopped);
            assert_eq!(
                stopped.on(LinkEvent::Welcomed { at: now }, &p, &mut rng),
                Ok(LinkState::Stopped)
            );
        }
    }

    /// The backoff as the link lives it: with paused time, each wait is within its bound.
    #[tokio::test(start_paused = true)]
    async fn waiting_out_the_backoff_under_paused_time() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(11);
        let mut s = LinkState::start();
        let start = Instant::now();
        let mut bound = Duration::ZERO;
        for n in 0..8 {
            s = s.on(LinkEvent::ConnectFailed, &p, &mut rng).unwrap();
            let LinkState::Disconnected { backoff, .. } = s else {
                panic!("{s:?}")
            };
            tokio::time::sleep(backoff).await;
            bound += p.backoff.ceiling(n);
            s = s.on(LinkEvent::BackoffElapsed, &p, &mut rng).unwrap();
        }
        assert!(start.elapsed() <= bound);
    }
}
