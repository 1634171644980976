//! The approval window of a plan's secrets.
//!
//! Task secrets live in memory only ([`crate::hub::Hub::secrets`]). A succeeded plan keeps its
//! secrets so that approving it can run the apply with them; this module bounds how long: until
//! `approval_ttl` (config) after the plan finished, or until a newer plan or apply of the same
//! workspace finishes (the older plan is stale then). Dropping them is audited as
//! `task.secrets_dropped`; approving such a plan is refused (and audited as
//! `task.approve_refused`) with the reason, asking for the plan to be submitted again.
//!
//! Owns: [`Hub::kept`](crate::hub::Hub::kept) and [`Hub::dropped`](crate::hub::Hub::dropped).
//! Time is always passed in (`now_ms`), so tests inject it.

use crate::cp::ControlPlane;
use crate::hub::{DroppedSecrets, Hub, KeptPlan};
use crate::store_tasks::TaskRow;
use delegate_protocol::{Op, Outcome};
use uuid::Uuid;

/// A drop to audit once the hub lock is released.
type Drop = (Uuid, String);

fn drop_kept(hub: &mut Hub, id: Uuid, reason: String, until_ms: i64) -> Drop {
    hub.secrets.remove(&id);
    hub.kept.remove(&id);
    hub.dropped.insert(
        id,
        DroppedSecrets {
            reason: reason.clone(),
            until_ms,
        },
    );
    (id, reason)
}

/// Whether a finished task makes older kept plans of its workspace stale: a succeeded plan, or
/// any apply or destroy (it may have changed the state, even when it failed).
fn supersedes(op: Op, outcome: Outcome) -> bool {
    match op {
        Op::Plan => outcome == Outcome::Succeeded,
        Op::Apply | Op::Destroy => true,
        _ => false,
    }
}

impl ControlPlane {
    fn approval_ttl_ms(&self) -> i64 {
        self.config.approval_ttl().as_millis().min(i64::MAX as u128) as i64
    }

    fn ttl_text(&self) -> String {
        humantime::format_duration(self.config.approval_ttl()).to_string()
    }

    /// After task `t` finished with `outcome` at `now_ms` (its own secrets already kept or
    /// forgotten by `Hub::forget_task`): start its approval window if it keeps its secrets, and
    /// drop those of older plans of the workspace that it supersedes.
    pub fn secrets_after_finish(&self, t: &TaskRow, outcome: Outcome, keeps: bool, now_ms: i64) {
        let ttl = self.approval_ttl_ms();
        let mut drops = Vec::new();
        {
            let mut hub = self.hub();
            if keeps && hub.secrets.contains_key(&t.id) {
                hub.kept.insert(
                    t.id,
                    KeptPlan {
                        workspace: t.workspace.clone(),
                        created_at_ms: t.created_at_ms,
                        expires_at_ms: now_ms.saturating_add(ttl),
                    },
                );
            }
            if supersedes(t.op, outcome) {
                let stale: Vec<Uuid> = hub
                    .kept
                    .iter()
                    .filter(|(id, k)| {
                        **id != t.id
                            && k.workspace == t.workspace
                            && k.created_at_ms <= t.created_at_ms
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    let reason = format!(
                        "were dropped when the newer {} task {} of workspace {} finished",
                        t.op, t.id, t.workspace
                    );
                    drops.push(drop_kept(&mut hub, id, reason, now_ms.saturating_add(ttl)));
                }
            }
        }
        self.audit_drops(drops);
    }

    /// Task `t` ended with `outcome` at `now_ms` other than by its agent's `done` (lost with its
    /// agent, cancelled before it ran, or its inputs unreadable): it keeps no secrets, makes
    /// older kept plans stale as a finished task would ([`Self::secrets_after_finish`]), and its
    /// state locks go as [`Self::locks_after_end`] decides. Takes the hub lock: call it without.
    pub fn after_end(&self, t: &TaskRow, outcome: Outcome, now_ms: i64) {
        self.secrets_after_finish(t, outcome, false, now_ms);
        self.locks_after_end(t, outcome);
    }

    /// Drop the kept secrets of plans whose approval window has closed at `now_ms`, and forget
    /// old drop reasons. Returns the plans whose secrets were dropped. Run from the lease loop.
    pub fn expire_plan_secrets(&self, now_ms: i64) -> Vec<Uuid> {
        let ttl = self.approval_ttl_ms();
        let mut drops = Vec::new();
        {
            let mut hub = self.hub();
            hub.dropped.retain(|_, d| d.until_ms > now_ms);
            let expired: Vec<Uuid> = hub
                .kept
                .iter()
                .filter(|(_, k)| k.expires_at_ms <= now_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let reason = self.expired_reason();
                drops.push(drop_kept(&mut hub, id, reason, now_ms.saturating_add(ttl)));
            }
        }
        let ids = drops.iter().map(|(id, _)| *id).collect();
        self.audit_drops(drops);
        ids
    }

    fn expired_reason(&self) -> String {
        format!(
            "expired after {} (approval_ttl) without an approval",
            self.ttl_text()
        )
    }

    fn audit_drops(&self, drops: Vec<Drop>) {
        for (id, reason) in drops {
            tracing::info!(task = %id, "the plan's kept secrets {reason}");
            self.audit(
                "controlplane",
                "task.secrets_dropped",
                &id.to_string(),
                &format!("the plan's secrets {reason}"),
            );
        }
    }

    /// Why plan `t` (finished, succeeded, with secret names) cannot be approved at `now_ms` for
    /// want of its secrets, or None when they are there. Expires them first if due.
    pub fn approval_secrets_refusal(&self, t: &TaskRow, now_ms: i64) -> Option<String> {
        if t.inputs.secret_names.is_empty() {
            return None;
        }
        self.expire_plan_secrets(now_ms);
        let hub = self.hub();
        if hub.secrets.contains_key(&t.id) {
            return None;
        }
        let reason = match hub.dropped.get(&t.id) {
            Some(d) => d.reason.clone(),
            None => {
                let window_over = t
                    .finished_at_ms
                    .is_some_and(|f| f.saturating_add(self.approval_ttl_ms()) <= now_ms);
                if window_over {
                    self.expired_reason()
                } else {
                    "were held in memory only and the control plane restarted".to_string()
                }
            }
        };
        Some(format!(
            "the plan's secrets {reason}; submit the plan again (task {})",
            t.id
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::at_rest::{AtRest, BlobStore};
    use crate::config::{CpConfig, DataDir};
    use crate::cp::ControlPlane;
    use crate::store::Store;
    use crate::store_tasks::{NewTask, StoredBlob, TaskInputs};
    use delegate_protocol::{Op, Outcome, Secrets};
    use std::collections::BTreeMap;
    use uuid::Uuid;

    const HOUR: i64 = 3_600_000;

    fn plane(dir: &std::path::Path) -> ControlPlane {
        let store = Store::open_in_memory().unwrap();
        let blobs = BlobStore::open(&dir.join("blobs"), AtRest::ephemeral()).unwrap();
        let config = CpConfig {
            approval_ttl: "1h".into(),
            ..CpConfig::default()
        };
        ControlPlane::with_parts(DataDir::new(dir), config, store, blobs)
    }

    /// A task of workspace `ws` created at `created`, finished with `outcome` at `finished`,
    /// with a secret while it ran; returns its id (the finish path run as on `done`).
    fn finished(
        cp: &ControlPlane,
        n: u128,
        op: Op,
        ws: &str,
        created: i64,
        outcome: Outcome,
        finished: i64,
    ) -> Uuid {
        let id = Uuid::from_u128(n);
        cp.store
            .insert_task(
                &NewTask {
                    id,
                    op,
                    workspace: ws.into(),
                    pool: "default".into(),
                    inputs: TaskInputs {
                        secret_names: vec!["TOKEN".into()],
                        ..TaskInputs::default()
                    },
                    archive: StoredBlob {
                        blob: "b".into(),
                        size: 1,
                        sha256: "a".repeat(64),
                    },
                    plan: None,
                    parent: None,
                },
                created,
            )
            .unwrap();
        cp.hub().secrets.insert(
            id,
            Secrets(BTreeMap::from([("TOKEN".into(), "tok-value".into())])),
        );
        assert!(cp.store.mark_assigned(id, "a1", created + 1).unwrap());
        assert!(cp.store.mark_running(id, "a1", created + 2).unwrap());
        cp.store.finish(id, outcome, None, None, finished).unwrap();
        let t = cp.store.task(id).unwrap().unwrap();
        let keeps = op == Op::Plan && outcome == Outcome::Succeeded;
        cp.hub().forget_task(Some("a1"), id, keeps);
        cp.secrets_after_finish(&t, outcome, keeps, finished);
        id
    }

    fn dropped_audits(cp: &ControlPlane, id: Uuid) -> Vec<String> {
        cp.store
            .audit_records(Some(&id.to_string()))
            .unwrap()
            .into_iter()
            .filter(|r| r.action == "task.secrets_dropped")
            .map(|r| r.detail)
            .collect()
    }

    #[test]
    fn kept_secrets_expire_after_the_approval_window() {
        let tmp = tempfile::tempdir().unwrap();
        let cp = plane(tmp.path());
        let plan = finished(&cp, 1, Op::Plan, "w", 10, Outcome::Succeeded, 1_000);
        assert!(cp.hub().secrets.contains_key(&plan), "kept for approval");

        // Within the window: kept, nothing to refuse.
        assert!(cp.expire_plan_secrets(1_000 + HOUR - 1).is_empty());
        let t = cp.store.task(plan).unwrap().unwrap();
        assert!(cp.approval_secrets_refusal(&t, 1_000 + HOUR - 1).is_none());

        // The sweep at the end of the window drops them, once, audited.
        assert_eq!(cp.expire_plan_secrets(1_000 + HOUR), vec![plan]);
        assert!(cp.expire_plan_secrets(1_000 + 2 * HOUR).is_empty());
        assert!(!cp.hub().secrets.contains_key(&plan));
        let audits = dropped_audits(&cp, plan);
        assert_eq!(audits.len(), 1, "{audits:?}");
        assert!(audits[0].contains("expired after 1h"), "{audits:?}");

        // Approving now is refused with the reason, and audited.
        let err = cp.approve_at(plan, "tester", 1_000 + HOUR + 5).unwrap_err();
        assert_eq!(err.status, 409);
        assert!(
            err.message.contains("the plan's secrets expired after 1h")
                && err.message.contains("submit the plan again"),
            "{err}"
        );
        assert!(!err.message.contains("tok-value"));
        let refused: Vec<String> = cp
            .store
            .audit_records(Some(&plan.to_string()))
            .unwrap()
            .into_iter()
            .filter(|r| r.action == "task.approve_refused")
            .map(|r| r.detail)
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("expired"), "{refused:?}");
        // Still expired, not "restarted", once the drop reason is forgotten.
        let t = cp.store.task(plan).unwrap().unwrap();
        let later = cp.approval_secrets_refusal(&t, 1_000 + 10 * HOUR).unwrap();
        assert!(later.contains("expired after 1h"), "{later}");
    }

    #[test]
    fn approving_at_the_deadline_expires_without_waiting_for_the_sweep() {
        let tmp = tempfile::tempdir().unwrap();
        let cp = plane(tmp.path());
        let plan = finished(&cp, 1, Op::Plan, "w", 10, Outcome::Succeeded, 1_000);
        let err = cp.approve_at(plan, "tester", 1_000 + HOUR).unwrap_err();
        assert!(err.message.contains("expired after 1h"), "{err}");
        assert!(!cp.hub().secrets.contains_key(&plan));
    }

    #[test]
    fn a_newer_plan_or_apply_of_the_workspace_drops_older_kept_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let cp = plane(tmp.path());
        let old = finished(&cp, 1, Op::Plan, "w", 10, Outcome::Succeeded, 100);
        let other_ws = finished(&cp, 2, Op::Plan, "v", 20, Outcome::Succeeded, 200);
        // A failed newer plan changes nothing.
        let failed = finished(&cp, 3, Op::Plan, "w", 30, Outcome::Failed, 300);
        assert!(!cp.hub().secrets.contains_key(&failed));
        assert!(cp.hub().secrets.contains_key(&old));
        // A newer succeeded plan of w: the old one's secrets go; its own are kept.
        let newer = finished(&cp, 4, Op::Plan, "w", 40, Outcome::Succeeded, 400);
        assert!(!cp.hub().secrets.contains_key(&old));
        assert!(cp.hub().secrets.contains_key(&newer));
        assert!(cp.hub().secrets.contains_key(&other_ws), "other workspace");
        let audits = dropped_audits(&cp, old);
        assert_eq!(audits.len(), 1, "{audits:?}");
        assert!(audits[0].contains(&newer.to_string()), "{audits:?}");
        let err = cp.approve_at(old, "tester", 500).unwrap_err();
        assert!(
            err.message.contains("dropped when the newer plan task")
                && err.message.contains("submit the plan again"),
            "{err}"
        );
        // An apply of w (even a failed one) supersedes the newer plan too.
        finished(&cp, 5, Op::Apply, "w", 50, Outcome::Failed, 500);
        assert!(!cp.hub().secrets.contains_key(&newer));
        assert!(cp.hub().kept.keys().eq([&other_ws]));
        // Nothing left to expire in w; v's plan still expires on time.
        assert_eq!(cp.expire_plan_secrets(200 + HOUR), vec![other_ws]);
    }
}
