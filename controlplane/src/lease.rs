//! Agent leases: what happens to the tasks of an agent that has gone silent.
//!
//! An agent holds a lease on its tasks while it is connected; once it is disconnected its lease
//! runs `lease_ms` (default three heartbeat intervals) from the last time it was seen (its last
//! heartbeat, or this control plane's start, whichever is later: a restarted control plane has
//! not yet had a chance to hear from anyone). Past the lease:
//!
//! * a task only **assigned** (the agent never accepted it, so it never received its inputs and
//!   cannot have started) goes back to the queue for another agent;
//! * a **running** task is marked (`lease_expired_at_ms`, audited `task.lease_expired`) and the
//!   control plane keeps waiting: the agent may come back and resume it from its spool;
//! * once the agent has been silent for `lost_after_ms` (default 10 min), the running task ends
//!   `lost`. A plan, validate or drift is not re-run automatically (submit it again); an apply
//!   or destroy (or a plan that applies itself) is **never** re-dispatched: its reason asks a
//!   human to check the workspace, and its state lock stays held until someone force-unlocks it,
//!   because the agent may still be running tofu behind a network partition.
//!
//! Owns: [`decide`] (a pure function of the task, the agent's liveness and the time, driven by
//! unit tests) and applying its answers ([`ControlPlane::check_leases`], run periodically by
//! [`run_leases`]). Never re-runs a task that was running, and never holds the hub lock across
//! an `.await`.

use crate::cp::ControlPlane;
use crate::store_tasks::{TaskRow, TaskState};
use delegate_protocol::{Op, Outcome};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long a silent agent keeps its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Silence after which assigned tasks are requeued and running ones marked.
    pub lease_ms: i64,
    /// Silence after which running tasks end `lost`.
    pub lost_after_ms: i64,
}

/// What the lease check knows about one task held by an agent.
#[derive(Debug, Clone, Copy)]
pub struct Holding<'a> {
    pub agent: &'a str,
    pub op: Op,
    pub auto_approve: bool,
    pub state: TaskState,
    /// The agent has a live connection right now.
    pub connected: bool,
    /// When the agent was last heard from (ms since the epoch).
    pub last_seen_ms: i64,
    /// Already marked as past its lease.
    pub lease_expired: bool,
}

/// What to do with a held task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    Keep,
    /// The agent is back: clear the lease mark.
    Renew,
    /// Back to the queue (assigned, never accepted).
    Requeue {
        reason: String,
    },
    /// Mark as past its lease and keep waiting.
    Expire {
        reason: String,
    },
    /// End the task `lost`. Its state locks go as [`ControlPlane::locks_after_end`] decides
    /// (an apply's stays for a human).
    Lose {
        reason: String,
    },
}

/// Whether running the task changes infrastructure (never re-run, never silently given up).
pub fn applies(op: Op, auto_approve: bool) -> bool {
    matches!(op, Op::Apply | Op::Destroy) || (op == Op::Plan && auto_approve)
}

/// The lease decision for one task at `now_ms`.
pub fn decide(h: &Holding<'_>, now_ms: i64, p: &LeasePolicy) -> LeaseAction {
    if !matches!(h.state, TaskState::Assigned | TaskState::Running) {
        return LeaseAction::Keep;
    }
    if h.connected {
        return if h.lease_expired {
            LeaseAction::Renew
        } else {
            LeaseAction::Keep
        };
    }
    let silent = now_ms.saturating_sub(h.last_seen_ms);
    if silent <= p.lease_ms {
        return LeaseAction::Keep;
    }
    let agent = h.agent;
    if h.state == TaskState::Assigned {
        return LeaseAction::Requeue {
            reason: format!(
                "agent {agent} silent for {silent} ms (lease {} ms) before accepting it; \
                 back in the queue for another agent",
                p.lease_ms
            ),
        };
    }
    if silent > p.lost_after_ms {
        let reason = if applies(h.op, h.auto_approve) {
            format!(
                "agent {agent} silent for {silent} ms (lost_after_ms {}) while running this {}; \
                 it is never re-run automatically: a human must check the workspace's \
                 infrastructure and state, then force-unlock the workspace \
                 (DELETE /api/v1/workspaces/<ws>/lock) and plan again",
                p.lost_after_ms,
                if h.op == Op::Plan {
                    "self-applying plan".to_string()
                } else {
                    h.op.to_string()
                }
            )
        } else {
            format!(
                "agent {agent} silent for {silent} ms (lost_after_ms {}) while running this {}; \
                 it is not re-run automatically: submit it again",
                p.lost_after_ms, h.op
            )
        };
        return LeaseAction::Lose { reason };
    }
    if h.lease_expired {
        return LeaseAction::Keep;
    }
    LeaseAction::Expire {
        reason: format!(
            "agent {agent} silent for {silent} ms (lease {} ms); waiting for it to come back \
             and resume the task, at most until it has been silent for {} ms",
            p.lease_ms, p.lost_after_ms
        ),
    }
}

impl ControlPlane {
    /// Apply the lease decisions to every task held by an agent, at `now_ms`. Returns what was
    /// done (for tests and logs).
    pub fn check_leases(&self, now_ms: i64) -> Vec<(Uuid, LeaseAction)> {
        let policy = self.config.lease_policy();
        let held = match self.store.held_tasks() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "lease check: cannot list held tasks");
                return Vec::new();
            }
        };
        if held.is_empty() {
            return Vec::new();
        }
        let last_seen = match self.last_seen() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "lease check: cannot read agent liveness");
                return Vec::new();
            }
        };
        let mut done = Vec::new();
        let mut lost = Vec::new();
        let mut requeued = false;
        // Under the hub lock: an agent registering meanwhile either counts as connected here or
        // sees the outcome of this check when its Hello is handled.
        let mut hub = self.hub();
        for t in held {
            let Some(agent) = t.agent.as_deref() else {
                continue;
            };
            let h = Holding {
                agent,
                op: t.op,
                auto_approve: t.inputs.auto_approve,
                state: t.state,
                connected: hub.agents.contains_key(agent),
                last_seen_ms: last_seen
                    .get(agent)
                    .copied()
                    .unwrap_or(0)
                    .max(self.started_ms),
                lease_expired: t.lease_expired_at_ms.is_some(),
            };
            let action = decide(&h, now_ms, &policy);
            let applied = self.apply_lease(&mut hub, &t, agent, &action, now_ms);
            if applied {
                requeued |= matches!(action, LeaseAction::Requeue { .. });
                let ended = matches!(action, LeaseAction::Lose { .. });
                done.push((t.id, action));
                if ended {
                    lost.push(t);
                }
            }
        }
        drop(hub);
        // Without the hub lock (`after_end` takes it).
        for t in &lost {
            self.after_end(t, Outcome::Lost, now_ms);
        }
        if !done.is_empty() {
            self.notify_change();
        }
        if requeued {
            self.request_dispatch();
        }
        done
    }

    /// When each agent was last heard from: its last heartbeat or the end of its last
    /// connection, whichever is later (a busy agent's link carried frames until it dropped).
    fn last_seen(&self) -> Result<HashMap<String, i64>, crate::store::StoreError> {
        let db = self.store.db();
        let rows = db
            .prepare(
                "SELECT a.name, MAX(COALESCE(a.last_heartbeat_ms, 0),
                        COALESCE((SELECT MAX(c.disconnected_at_ms) FROM connections c
                                  WHERE c.agent = a.name), 0))
                 FROM agents a",
            )?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// Returns whether the action changed anything.
    fn apply_lease(
        &self,
        hub: &mut crate::hub::Hub,
        t: &TaskRow,
        agent: &str,
        action: &LeaseAction,
        now_ms: i64,
    ) -> bool {
        let id = t.id.to_string();
        let changed = match action {
            LeaseAction::Keep => return false,
            LeaseAction::Renew => self.store.set_lease_expired(t.id, None),
            LeaseAction::Requeue { reason } => self.store.requeue(t.id, reason),
            LeaseAction::Expire { .. } => self.store.set_lease_expired(t.id, Some(now_ms)),
            LeaseAction::Lose { reason, .. } => {
                self.store
                    .finish(t.id, Outcome::Lost, Some(reason), None, now_ms)
            }
        };
        match changed {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                tracing::error!(task = %t.id, error = %e, "lease check: cannot update the task");
                return false;
            }
        }
        match action {
            LeaseAction::Keep => {}
            LeaseAction::Renew => {
                self.audit(agent, "task.lease_renewed", &id, "agent reconnected");
            }
            LeaseAction::Requeue { reason } => {
                tracing::warn!(task = %t.id, agent, "task requeued: {reason}");
                self.audit("controlplane", "task.requeued", &id, reason);
            }
            LeaseAction::Expire { reason } => {
                tracing::warn!(task = %t.id, agent, "lease expired: {reason}");
                self.audit("controlplane", "task.lease_expired", &id, reason);
            }
            LeaseAction::Lose { reason } => {
                tracing::warn!(task = %t.id, agent, "task lost: {reason}");
                self.audit(
                    "controlplane",
                    "task.finished",
                    &id,
                    &format!("lost: {reason}"),
                );
                // Its locks and older kept plans: `after_end`, once the hub lock is released.
                hub.forget_task(Some(agent), t.id, false);
            }
        }
        true
    }
}

/// Check leases (and expire plans' kept secrets) every quarter lease (at least every 50 ms),
/// until the process ends.
pub async fn run_leases(cp: Arc<ControlPlane>) {
    let every = Duration::from_millis((cp.config.lease_policy().lease_ms / 4).max(50) as u64);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = crate::now_ms();
        cp.check_leases(now);
        // The same tick closes the approval windows of plans' kept secrets.
        cp.expire_plan_secrets(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LeasePolicy = LeasePolicy {
        lease_ms: 15_000,
        lost_after_ms: 600_000,
    };

    fn held(op: Op, state: TaskState) -> Holding<'static> {
        Holding {
            agent: "a1",
            op,
            auto_approve: false,
            state,
            connected: false,
            last_seen_ms: 1_000_000,
            lease_expired: false,
        }
    }

    #[test]
    fn connected_agents_keep_their_tasks() {
        for op in [Op::Plan, Op::Apply, Op::Destroy] {
            for state in [TaskState::Assigned, TaskState::Running] {
                let h = Holding {
                    connected: true,
                    ..held(op, state)
                };
                assert_eq!(decide(&h, 10_000_000_000, &P), LeaseAction::Keep);
                let marked = Holding {
                    lease_expired: true,
                    ..h
                };
                assert_eq!(decide(&marked, 10_000_000_000, &P), LeaseAction::Renew);
            }
        }
    }

    #[test]
    fn within_the_lease_nothing_happens() {
        for state in [TaskState::Assigned, TaskState::Running] {
            let h = held(Op::Apply, state);
            assert_eq!(decide(&h, 1_000_000 + 15_000, &P), LeaseAction::Keep);
        }
        // Finished or queued tasks are not the lease's business.
        for state in [TaskState::Queued, TaskState::Finished] {
            assert_eq!(
                decide(&held(Op::Plan, state), i64::MAX, &P),
                LeaseAction::Keep
            );
        }
    }

    #[test]
    fn assigned_tasks_go_back_to_the_queue_after_the_lease() {
        for op in [Op::Plan, Op::Apply, Op::Destroy, Op::Validate, Op::Drift] {
            match decide(&held(op, TaskState::Assigned), 1_000_000 + 15_001, &P) {
                LeaseAction::Requeue { reason } => {
                    assert!(reason.contains("agent a1"), "{reason}");
                    assert!(reason.contains("15001 ms"), "{reason}");
                }
                other => panic!("{op}: {other:?}"),
            }
        }
    }

    #[test]
    fn running_tasks_wait_then_end_lost() {
        for op in [Op::Plan, Op::Validate, Op::Drift, Op::Apply, Op::Destroy] {
            let h = held(op, TaskState::Running);
            let expired = decide(&h, 1_000_000 + 15_001, &P);
            assert!(
                matches!(expired, LeaseAction::Expire { ref reason } if reason.contains("waiting")),
                "{op}: {expired:?}"
            );
            let marked = Holding {
                lease_expired: true,
                ..h
            };
            assert_eq!(decide(&marked, 1_000_000 + 600_000, &P), LeaseAction::Keep);
            // Marked or not, past lost_after_ms it ends lost.
            for h in [h, marked] {
                match decide(&h, 1_000_000 + 600_001, &P) {
                    LeaseAction::Lose { reason } => {
                        let apply = matches!(op, Op::Apply | Op::Destroy);
                        // Whether its locks are released (`locks_after_end`).
                        assert_eq!(!applies(h.op, h.auto_approve), !apply, "{op}");
                        assert_eq!(reason.contains("a human"), apply, "{op}: {reason}");
                        assert!(reason.contains("not re-run") || reason.contains("never re-run"));
                    }
                    other => panic!("{op}: {other:?}"),
                }
            }
        }
    }

    mod applied {
        use super::super::*;
        use crate::at_rest::{AtRest, BlobStore};
        use crate::config::{CpConfig, DataDir};
        use crate::hub::AgentConn;
        use crate::store::{AgentHello, Store};
        use crate::store_tasks::{NewTask, StoredBlob, TaskInputs};
        use std::collections::{BTreeMap, BTreeSet};

        fn plane(dir: &std::path::Path) -> ControlPlane {
            let store = Store::open_in_memory().unwrap();
            let blobs = BlobStore::open(&dir.join("blobs"), AtRest::ephemeral()).unwrap();
            let mut cp =
                ControlPlane::with_parts(DataDir::new(dir), CpConfig::default(), store, blobs);
            cp.started_ms = 0;
            cp
        }

        fn task(cp: &ControlPlane, n: u128, op: Op, running: bool) -> Uuid {
            let id = Uuid::from_u128(n);
            cp.store
                .insert_task(
                    &NewTask {
                        id,
                        op,
                        workspace: "w".into(),
                        pool: "default".into(),
                        inputs: TaskInputs::default(),
                        archive: StoredBlob {
                            blob: "b".into(),
                            size: 1,
                            sha256: "a".repeat(64),
                        },
                        plan: None,
                        parent: None,
                    },
                    10,
                )
                .unwrap();
            assert!(cp.store.mark_assigned(id, "a1", 20).unwrap());
            if running {
                assert!(cp.store.mark_running(id, "a1", 30).unwrap());
            }
            id
        }

        fn audit_actions(cp: &ControlPlane, id: Uuid) -> Vec<String> {
            cp.store
                .audit_records(Some(&id.to_string()))
                .unwrap()
                .into_iter()
                .map(|r| r.action)
                .collect()
        }

        #[test]
        fn silent_agent_requeues_marks_then_loses_with_injected_time() {
            let tmp = tempfile::tempdir().unwrap();
            let cp = plane(tmp.path());
            let labels = BTreeMap::new();
            let hello = AgentHello {
                name: "a1",
                pool: "default",
                labels: &labels,
                version: "1",
                slots: 4,
                peer: "p",
            };
            let conn = cp.store.agent_connected(&hello, 1_000).unwrap();
            // Connected (a heartbeat) at 1000; the link dropped at 1500.
            cp.store
                .agent_disconnected("a1", conn, "gone", false, 1_500)
                .unwrap();
            let assigned = task(&cp, 1, Op::Validate, false);
            let plan = task(&cp, 2, Op::Plan, true);
            let apply = task(&cp, 3, Op::Apply, true);
            for (ws_task, lock) in [(plan, "L-plan"), (apply, "L-apply")] {
                let ws = format!("ws-{lock}");
                cp.store
                    .state_lock_acquire(&ws, lock, "{}", Some(&ws_task.to_string()), 40)
                    .unwrap();
            }

            // Within the lease (three 5 s heartbeats from the last sign of life, the end of the
            // link at 1500): nothing.
            assert!(cp.check_leases(16_500).is_empty());
            let first = cp.check_leases(16_501);
            assert_eq!(first.len(), 3, "{first:?}");
            let t = cp.store.task(assigned).unwrap().unwrap();
            assert_eq!(t.state, TaskState::Queued);
            assert!(t.agent.is_none());
            assert!(audit_actions(&cp, assigned).contains(&"task.requeued".to_string()));
            for id in [plan, apply] {
                let t = cp.store.task(id).unwrap().unwrap();
                assert_eq!(t.state, TaskState::Running, "still waiting for the agent");
                assert_eq!(t.lease_expired_at_ms, Some(16_501));
                assert!(audit_actions(&cp, id).contains(&"task.lease_expired".to_string()));
            }
            // Marked once only.
            assert!(cp.check_leases(300_000).is_empty());

            assert!(cp.check_leases(601_500).is_empty());
            let second = cp.check_leases(601_501);
            assert_eq!(second.len(), 2, "{second:?}");
            let p = cp.store.task(plan).unwrap().unwrap();
            assert_eq!(p.outcome, Some(Outcome::Lost));
            assert!(p.reason.unwrap().contains("submit it again"));
            assert!(cp.store.state_lock("ws-L-plan").unwrap().is_none());
            let a = cp.store.task(apply).unwrap().unwrap();
            assert_eq!(a.outcome, Some(Outcome::Lost));
            assert!(a.reason.unwrap().contains("a human must check"));
            assert!(
                cp.store.state_lock("ws-L-apply").unwrap().is_some(),
                "a lost apply keeps its lock for a human"
            );
            let kept: Vec<String> = cp
                .store
                .audit_records(Some("workspace/ws-L-apply"))
                .unwrap()
                .into_iter()
                .map(|r| r.action)
                .collect();
            assert!(kept.contains(&"state.lock_kept".to_string()), "{kept:?}");
            assert!(audit_actions(&cp, apply).contains(&"task.finished".to_string()));
            // The requeued task is not the lease's any more; nothing else to do.
            assert!(cp.check_leases(10_000_000).is_empty());
        }

        #[test]
        fn a_lost_apply_makes_older_kept_plans_stale() {
            let tmp = tempfile::tempdir().unwrap();
            let cp = plane(tmp.path());
            let apply = task(&cp, 3, Op::Apply, true);
            // An older plan of the workspace whose secrets wait for approval.
            let old_plan = Uuid::from_u128(9);
            {
                let mut hub = cp.hub();
                hub.secrets.insert(old_plan, Default::default());
                hub.kept.insert(
                    old_plan,
                    crate::hub::KeptPlan {
                        workspace: "w".into(),
                        created_at_ms: 5,
                        expires_at_ms: i64::MAX,
                    },
                );
            }
            let acted = cp.check_leases(10_000_000);
            assert!(matches!(acted[..], [(t, LeaseAction::Lose { .. })] if t == apply));
            let hub = cp.hub();
            assert!(!hub.kept.contains_key(&old_plan));
            assert!(!hub.secrets.contains_key(&old_plan));
            let why = &hub.dropped[&old_plan].reason;
            assert!(why.contains(&apply.to_string()), "{why}");
            drop(hub);
            assert!(audit_actions(&cp, old_plan).contains(&"task.secrets_dropped".to_string()));
        }

        #[test]
        fn a_restarted_control_plane_gives_agents_a_fresh_lease_and_reconnects_renew() {
            let tmp = tempfile::tempdir().unwrap();
            let mut cp = plane(tmp.path());
            cp.started_ms = 1_000_000;
            let id = task(&cp, 7, Op::Plan, true);
            // The agent was last heard of long ago, but this control plane only started at 1e6.
            assert!(cp.check_leases(1_010_000).is_empty());
            let acted = cp.check_leases(1_015_001);
            assert!(matches!(acted[..], [(t, LeaseAction::Expire { .. })] if t == id));
            // It reconnects: the mark is cleared.
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            cp.hub().register(
                "a1",
                AgentConn {
                    conn_id: 1,
                    peer: "p".into(),
                    pool: "default".into(),
                    slots: 1,
                    tx,
                    close: None,
                    held: BTreeSet::new(),
                    ready: true,
                },
            );
            let acted = cp.check_leases(5_000_000);
            assert_eq!(acted, vec![(id, LeaseAction::Renew)]);
            assert_eq!(
                cp.store.task(id).unwrap().unwrap().lease_expired_at_ms,
                None
            );
            assert!(audit_actions(&cp, id).contains(&"task.lease_renewed".to_string()));
        }
    }

    #[test]
    fn a_self_applying_plan_counts_as_an_apply() {
        let h = Holding {
            auto_approve: true,
            ..held(Op::Plan, TaskState::Running)
        };
        match decide(&h, i64::MAX, &P) {
            LeaseAction::Lose { reason } => {
                assert!(applies(h.op, h.auto_approve));
                assert!(reason.contains("self-applying plan"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(applies(Op::Plan, true));
        assert!(!applies(Op::Plan, false));
        assert!(!applies(Op::Drift, true));
    }
}
