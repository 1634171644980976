//! Workspace state lock rules, following OpenTofu's `http` backend: one lock per workspace,
//! identified by the `ID` in tofu's lock info JSON.
//!
//! Owns: the decisions as pure functions. Never touches storage.

/// The lock currently held on a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub lock_id: String,
    /// The holder's lock info JSON as tofu sent it (returned to whoever is refused).
    pub info: String,
}

/// What a lock-related request leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take the lock (LOCK on a free workspace).
    Acquire,
    /// Release the lock (UNLOCK by its holder).
    Release,
    /// Go ahead, nothing changes (write by the holder or on a free workspace, re-lock by the
    /// holder, unlock of a free workspace).
    Allow,
    /// Refused with this HTTP status; the body is the holder's lock info.
    Refuse { status: u16, holder: String },
}

/// HTTP 423 Locked: LOCK and writes against someone else's lock.
pub const LOCKED: u16 = 423;
/// HTTP 409 Conflict: UNLOCK with another lock's ID.
pub const CONFLICT: u16 = 409;

pub fn lock(current: Option<&Held>, id: &str) -> Decision {
    match current {
        None => Decision::Acquire,
        Some(h) if h.lock_id == id => Decision::Allow,
        Some(h) => Decision::Refuse {
            status: LOCKED,
            holder: h.info.clone(),
        },
    }
}

pub fn unlock(current: Option<&Held>, id: Option<&str>) -> Decision {
    match current {
        None => Decision::Allow,
        Some(h) if Some(h.lock_id.as_str()) == id => Decision::Release,
        Some(h) => Decision::Refuse {
            status: CONFLICT,
            holder: h.info.clone(),
        },
    }
}

/// POST (write a new state version) or DELETE.
pub fn write(current: Option<&Held>, id: Option<&str>) -> Decision {
    match current {
        None => Decision::Allow,
        Some(h) if Some(h.lock_id.as_str()) == id => Decision::Allow,
        Some(h) => Decision::Refuse {
            status: LOCKED,
            holder: h.info.clone(),
        },
    }
}

/// The `ID` field of tofu's lock info JSON.
pub fn lock_id_of(info: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(info).ok()?;
    let id = v.get("ID")?.as_str()?;
    (!id.is_empty() && id.len() <= delegate_protocol::limits::MAX_NAME).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str) -> Held {
        Held {
            lock_id: id.into(),
            info: format!("{{\"ID\":\"{id}\",\"Who\":\"x\"}}"),
        }
    }

    #[test]
    fn lock_rules() {
        assert_eq!(lock(None, "a"), Decision::Acquire);
        assert_eq!(lock(Some(&held("a")), "a"), Decision::Allow);
        assert_eq!(
            lock(Some(&held("a")), "b"),
            Decision::Refuse {
                status: 423,
                holder: held("a").info
            }
        );
    }

    #[test]
    fn unlock_rules() {
        assert_eq!(unlock(None, Some("a")), Decision::Allow);
        assert_eq!(unlock(Some(&held("a")), Some("a")), Decision::Release);
        assert!(matches!(
            unlock(Some(&held("a")), Some("b")),
            Decision::Refuse { status: 409, .. }
        ));
        assert!(matches!(
            unlock(Some(&held("a")), None),
            Decision::Refuse { status: 409, .. }
        ));
    }

    #[test]
    fn write_rules() {
        assert_eq!(write(None, None), Decision::Allow);
        assert_eq!(write(Some(&held("a")), Some("a")), Decision::Allow);
        assert!(matches!(
            write(Some(&held("a")), None),
            Decision::Refuse { status: 423, .. }
        ));
        assert!(matches!(
            write(Some(&held("a")), Some("b")),
            Decision::Refuse { status: 423, .. }
        ));
    }

    #[test]
    fn lock_id_from_info() {
        assert_eq!(
            lock_id_of(br#"{"ID":"abc","Operation":"OperationTypePlan"}"#),
            Some("abc".into())
        );
        assert_eq!(lock_id_of(br#"{"ID":""}"#), None);
        assert_eq!(lock_id_of(b"not json"), None);
        assert_eq!(lock_id_of(br#"{"id":"lower"}"#), None);
    }
}
