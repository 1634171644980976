//! Liveness of a connection (heartbeats out, dead-peer detection in) and a rate limit for the
//! agent's own log lines about what the peer sends. Pure: the caller supplies the time.

use std::time::Duration;
use tokio::time::Instant;

/// The peer is dead after this many heartbeat intervals without any frame from it.
pub const DEAD_AFTER_INTERVALS: u32 = 3;

/// When to send a heartbeat and when to give up on a silent peer.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    interval: Duration,
    last_received: Instant,
    next_heartbeat: Instant,
}

impl Liveness {
    /// A connection welcomed at `now`, with the heartbeat interval the control plane chose.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Liveness {
            interval,
            last_received: now,
            next_heartbeat: now + interval,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Any frame arrived (a heartbeat or anything else).
    pub fn received(&mut self, now: Instant) {
        self.last_received = now;
    }

    /// Whether a heartbeat should be sent now.
    pub fn heartbeat_due(&self, now: Instant) -> bool {
        now >= self.next_heartbeat
    }

    /// A heartbeat was sent at `now`.
    pub fn heartbeat_sent(&mut self, now: Instant) {
        self.next_heartbeat = now + self.interval;
    }

    /// The instant after which a silent peer is dead.
    pub fn deadline(&self) -> Instant {
        self.last_received + self.interval * DEAD_AFTER_INTERVALS
    }

    /// Nothing received for three intervals: the peer is dead, whatever TCP says.
    pub fn is_dead(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// When the connection loop must wake up next, absent any frame.
    pub fn next_wakeup(&self) -> Instant {
        self.next_heartbeat.min(self.deadline())
    }
}

/// Allows `max` events per `window`; counts what it suppressed so the next allowed line can say so.
#[derive(Debug, Clone)]
pub struct RateLimit {
    window: Duration,
    max: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(max: u32, window: Duration) -> Self {
        RateLimit {
            window,
            max,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this one, after `n` suppressed since the last logged. `None`: suppress.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.max {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn heartbeats_every_interval() {
        let interval = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut l = Liveness::new(interval, t0);
        let mut sent = Vec::new();
        // Drive it the way the link does: sleep until the next wakeup, act, repeat; the peer
        // answers promptly so it never dies.
        while sent.len() < 6 {
            tokio::time::sleep_until(l.next_wakeup()).await;
            let now = Instant::now();
            assert!(!l.is_dead(now));
            if l.heartbeat_due(now) {
                l.heartbeat_sent(now);
                l.received(now);
                sent.push((now - t0).as_secs());
            }
        }
        assert_eq!(sent, vec![5, 10, 15, 20, 25, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_is_dead_after_three_intervals() {
        let interval = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut l = Liveness::new(interval, t0);
        // We keep sending heartbeats (TCP accepts them), the peer says nothing.
        let died_at = loop {
            tokio::time::sleep_until(l.next_wakeup()).await;
            let now = Instant::now();
            if l.is_dead(now) {
                break now - t0;
            }
            if l.heartbeat_due(now) {
                l.heartbeat_sent(now);
            }
        };
        assert_eq!(died_at, interval * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn any_frame_keeps_the_peer_alive() {
        let interval = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut l = Liveness::new(interval, t0);
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(!l.is_dead(Instant::now()));
        l.received(Instant::now());
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(!l.is_dead(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.is_dead(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_counts_what_it_suppressed() {
        let mut r = RateLimit::new(2, Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(r.allow(now), Some(0));
        assert_eq!(r.allow(now), Some(0));
        assert_eq!(r.allow(now), None);
        assert_eq!(r.allow(now), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.allow(Instant::now()), Some(2));
        assert_eq!(r.allow(Instant::now()), Some(0));
        assert_eq!(r.allow(Instant::now()), None);
    }
}
