//! The audit trail's hash chain: each record stores `sha256(prev_hash || canonical JSON of the
//! record)`, so editing, deleting or reordering a stored record breaks every later hash.
//!
//! Owns: the canonical form of a record and the chain arithmetic (pure functions). Never touches
//! the database (the store calls these inside its write transaction).

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an audit record says, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Agent id, "api", or "controlplane" for the control plane's own decisions.
    pub who: String,
    /// Dotted action name, e.g. `agent.connected`.
    pub action: String,
    /// The resource: an agent name, a task id, a workspace, a peer address.
    pub target: String,
    /// Free text. Never holds secrets.
    pub detail: String,
}

impl AuditEntry {
    pub fn new(
        who: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        AuditEntry {
            who: who.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
        }
    }
}

/// A stored, chained record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at_ms: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Field order is fixed by this struct, so the JSON is canonical without relying on map ordering.
#[derive(Serialize)]
struct Canonical<'a> {
    id: i64,
    at_ms: i64,
    who: &'a str,
    action: &'a str,
    target: &'a str,
    detail: &'a str,
}

/// The hash of record `id` given the previous record's hash.
pub fn chain_hash(prev_hash: &str, id: i64, at_ms: i64, e: &AuditEntry) -> String {
    let canonical = serde_json::to_vec(&Canonical {
        id,
        at_ms,
        who: &e.who,
        action: &e.action,
        target: &e.target,
        detail: &e.detail,
    })
    .unwrap_or_default();
    let mut input = Vec::with_capacity(prev_hash.len() + canonical.len());
    input.extend_from_slice(prev_hash.as_bytes());
    input.extend_from_slice(&canonical);
    hex::encode(digest(&SHA256, &input).as_ref())
}

/// Check a full chain from the first record. Returns the id of the first record that does not
/// verify.
pub fn verify_chain(records: &[AuditRecord]) -> Result<(), i64> {
    let mut prev = GENESIS.to_string();
    for r in records {
        let entry = AuditEntry::new(&r.who, &r.action, &r.target, &r.detail);
        if r.prev_hash != prev || chain_hash(&prev, r.id, r.at_ms, &entry) != r.hash {
            return Err(r.id);
        }
        prev = r.hash.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|id| {
                let e = AuditEntry::new("api", "task.submitted", format!("t{id}"), "x");
                let hash = chain_hash(&prev, id, 1000 + id, &e);
                let r = AuditRecord {
                    id,
                    at_ms: 1000 + id,
                    who: e.who,
                    action: e.action,
                    target: e.target,
                    detail: e.detail,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5)), Ok(()));
    }

    #[test]
    fn tampering_is_detected() {
        let mut c = chain(5);
        c[2].detail = "edited".into();
        assert_eq!(verify_chain(&c), Err(3));
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify_chain(&c), Err(3));
    }
}
