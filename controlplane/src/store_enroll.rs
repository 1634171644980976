//! Enrollment storage: bootstrap tokens (only their SHA-256), agent identities (enrolled and/or
//! revoked names) and the serials of the certificates issued to them.
//!
//! Owns: the enrollment queries of [`Store`]. Consuming a token use, claiming the name and
//! recording the certificate happen in one transaction, so two enrollments racing for the last
//! use of a token or for one name cannot both win. Never stores a token value or a private key.

use crate::store::{Store, StoreError};
use crate::tokens::{self, TokenRefusal};
use rusqlite::{params, Connection, OptionalExtension};

/// A bootstrap token as stored (its value is never stored, only `hash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub pool: String,
    pub name_prefix: Option<String>,
    /// Enrollments allowed in total.
    pub uses: u32,
    /// Enrollments made with it.
    pub used: u32,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

/// A token about to be stored.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    /// Hex SHA-256 of the token value.
    pub hash: String,
    pub pool: String,
    pub name_prefix: Option<String>,
    pub uses: u32,
    pub expires_at_ms: i64,
}

/// What the control plane knows about an agent name beyond its connections: how it was enrolled
/// and whether it is revoked. A name with no identity row (an `init` bundle never revoked) is
/// not managed by enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    pub name: String,
    /// The pool its token bound it to (None: never enrolled, only revoked).
    pub pool: Option<String>,
    /// Id of the current enrollment (None: never enrolled). Certificates issued under an
    /// earlier enrollment of the same name are not accepted.
    pub enrollment: Option<String>,
    pub token_id: Option<String>,
    pub enrolled_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub revoked_reason: Option<String>,
}

impl IdentityRow {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

/// A certificate issued by enrollment or renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    pub serial: String,
    pub name: String,
    pub enrollment: Option<String>,
    /// `enroll` or `renew`.
    pub kind: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
}

/// An enrollment about to be committed (the certificate is already signed, not yet handed out).
#[derive(Debug, Clone)]
pub struct NewEnrollment<'a> {
    pub token_id: &'a str,
    pub name: &'a str,
    pub enrollment: &'a str,
    pub serial: &'a str,
    pub not_after_ms: i64,
}

/// Why an enrollment could not be committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollConflict {
    /// The token stopped being usable since it was checked (another enrollment took its last
    /// use, it expired or was revoked).
    Token(TokenRefusal),
    /// The name belongs to an agent that is not revoked.
    NameTaken(String),
}

const TOKEN_COLS: &str = "id, pool, name_prefix, uses, used, created_at_ms, expires_at_ms,
                          revoked_at_ms, last_used_at_ms";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        pool: r.get(1)?,
        name_prefix: r.get(2)?,
        uses: r.get(3)?,
        used: r.get(4)?,
        created_at_ms: r.get(5)?,
        expires_at_ms: r.get(6)?,
        revoked_at_ms: r.get(7)?,
        last_used_at_ms: r.get(8)?,
    })
}

const IDENTITY_COLS: &str =
    "name, pool, enrollment, token_id, enrolled_at_ms, revoked_at_ms, revoked_reason";

fn identity_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<IdentityRow> {
    Ok(IdentityRow {
        name: r.get(0)?,
        pool: r.get(1)?,
        enrollment: r.get(2)?,
        token_id: r.get(3)?,
        enrolled_at_ms: r.get(4)?,
        revoked_at_ms: r.get(5)?,
        revoked_reason: r.get(6)?,
    })
}

fn identity_in(c: &Connection, name: &str) -> Result<Option<IdentityRow>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {IDENTITY_COLS} FROM agent_identities WHERE name = ?1"),
        [name],
        identity_row,
    )
    .optional()?)
}

fn token_in(c: &Connection, id: &str) -> Result<Option<TokenRow>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {TOKEN_COLS} FROM enroll_tokens WHERE id = ?1"),
        [id],
        token_row,
    )
    .optional()?)
}

fn seen_in(c: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(
        c.query_row("SELECT 1 FROM agents WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

impl Store {
    pub fn insert_enroll_token(&self, t: &NewToken, now_ms: i64) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO enroll_tokens (id, hash, pool, name_prefix, uses, used, created_at_ms,
                                        expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
            params![
                t.id,
                t.hash,
                t.pool,
                t.name_prefix,
                t.uses,
                now_ms,
                t.expires_at_ms
            ],
        )?;
        Ok(())
    }

    /// Every token, newest first.
    pub fn enroll_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {TOKEN_COLS} FROM enroll_tokens ORDER BY created_at_ms DESC, id"
        ))?;
        let rows = stmt.query_map([], token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The token whose value hashes to `hash`. The lookup is by hash, so its timing depends on
    /// the hash of the presented value, never on how much of a stored value it matches.
    pub fn enroll_token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM enroll_tokens WHERE hash = ?1"),
                [hash],
                token_row,
            )
            .optional()?)
    }

    pub fn enroll_token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        token_in(&self.db(), id)
    }

    /// Revoke a token; `None` if there is no such token. Revoking twice keeps the first time.
    pub fn revoke_enroll_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<TokenRow>, StoreError> {
        let db = self.db();
        db.execute(
            "UPDATE enroll_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
            params![id, now_ms],
        )?;
        token_in(&db, id)
    }

    pub fn agent_identity(&self, name: &str) -> Result<Option<IdentityRow>, StoreError> {
        identity_in(&self.db(), name)
    }

    pub fn agent_identities(&self) -> Result<Vec<IdentityRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {IDENTITY_COLS} FROM agent_identities ORDER BY name"
        ))?;
        let rows = stmt.query_map([], identity_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// True when an agent of this name has ever connected.
    pub fn agent_seen(&self, name: &str) -> Result<bool, StoreError> {
        seen_in(&self.db(), name)
    }

    pub fn agent_cert(&self, serial: &str) -> Result<Option<CertRow>, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT serial, name, enrollment, kind, issued_at_ms, not_after_ms
                 FROM agent_certs WHERE serial = ?1",
                [serial],
                |r| {
                    Ok(CertRow {
                        serial: r.get(0)?,
                        name: r.get(1)?,
                        enrollment: r.get(2)?,
                        kind: r.get(3)?,
                        issued_at_ms: r.get(4)?,
                        not_after_ms: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    /// Take one use of the token, claim the name for a new enrollment and record its first
    /// certificate, all or nothing. `name_known` says whether something outside the database
    /// (an `init` bundle) already holds the name.
    pub fn commit_enrollment(
        &self,
        e: &NewEnrollment<'_>,
        name_known: bool,
        now_ms: i64,
    ) -> Result<Result<TokenRow, EnrollConflict>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let Some(token) = token_in(&tx, e.token_id)? else {
            return Ok(Err(EnrollConflict::Token(TokenRefusal::Unknown)));
        };
        if let Err(refusal) = tokens::check_token(&token, now_ms) {
            return Ok(Err(EnrollConflict::Token(refusal)));
        }
        let identity = identity_in(&tx, e.name)?;
        let revoked = identity.as_ref().is_some_and(IdentityRow::is_revoked);
        let taken = !revoked && (identity.is_some() || name_known || seen_in(&tx, e.name)?);
        if taken {
            return Ok(Err(EnrollConflict::NameTaken(e.name.to_string())));
        }
        tx.execute(
            "UPDATE enroll_tokens SET used = used + 1, last_used_at_ms = ?2 WHERE id = ?1",
            params![e.token_id, now_ms],
        )?;
        tx.execute(
            "INSERT INTO agent_identities (name, pool, enrollment, token_id, enrolled_at_ms,
                                           revoked_at_ms, revoked_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, NULL)
             ON CONFLICT(name) DO UPDATE SET pool = ?2, enrollment = ?3, token_id = ?4,
                 enrolled_at_ms = ?5, revoked_at_ms = NULL, revoked_reason = NULL",
            params![e.name, token.pool, e.enrollment, e.token_id, now_ms],
        )?;
        tx.execute(
            "INSERT INTO agent_certs (serial, name, enrollment, kind, issued_at_ms, not_after_ms)
             VALUES (?1, ?2, ?3, 'enroll', ?4, ?5)",
            params![e.serial, e.name, e.enrollment, now_ms, e.not_after_ms],
        )?;
        let token = token_in(&tx, e.token_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("token {} vanished", e.token_id)))?;
        tx.commit()?;
        Ok(Ok(token))
    }

    /// Record a renewed certificate under the name's current enrollment (none for an agent that
    /// was never enrolled).
    pub fn record_renewal(
        &self,
        name: &str,
        serial: &str,
        not_after_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let db = self.db();
        let enrollment = identity_in(&db, name)?.and_then(|i| i.enrollment);
        db.execute(
            "INSERT INTO agent_certs (serial, name, enrollment, kind, issued_at_ms, not_after_ms)
             VALUES (?1, ?2, ?3, 'renew', ?4, ?5)",
            params![serial, name, enrollment, now_ms, not_after_ms],
        )?;
        Ok(())
    }

    /// When `name` last had a certificate renewed, if ever.
    pub fn last_renewal_ms(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.db().query_row(
            "SELECT MAX(issued_at_ms) FROM agent_certs WHERE name = ?1 AND kind = 'renew'",
            [name],
            |r| r.get(0),
        )?)
    }

    /// Mark `name` revoked (creating its identity row if it was never enrolled). Returns the row
    /// before the change (its `revoked_at_ms` says whether it already was).
    pub fn revoke_identity(
        &self,
        name: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<IdentityRow>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let before = identity_in(&tx, name)?;
        tx.execute(
            "INSERT INTO agent_identities (name, revoked_at_ms, revoked_reason)
             VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET
                 revoked_at_ms = COALESCE(revoked_at_ms, ?2),
                 revoked_reason = COALESCE(revoked_reason, ?3)",
            params![name, now_ms, reason],
        )?;
        tx.commit()?;
        Ok(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &Store, id: &str, uses: u32, expires_at_ms: i64) {
        s.insert_enroll_token(
            &NewToken {
                id: id.into(),
                hash: format!("hash-{id}"),
                pool: "pool-a".into(),
                name_prefix: None,
                uses,
                expires_at_ms,
            },
            1_000,
        )
        .unwrap();
    }

    fn enrollment<'a>(name: &'a str, serial: &'a str, token_id: &'a str) -> NewEnrollment<'a> {
        NewEnrollment {
            token_id,
            name,
            enrollment: serial,
            serial,
            not_after_ms: 99_000,
        }
    }

    #[test]
    fn uses_are_consumed_once_each() {
        let s = Store::open_in_memory().unwrap();
        token(&s, "t1", 2, 10_000);
        assert_eq!(s.enroll_token_by_hash("hash-t1").unwrap().unwrap().id, "t1");
        assert!(s.enroll_token_by_hash("hash-zz").unwrap().is_none());
        let t = s
            .commit_enrollment(&enrollment("a1", "s1", "t1"), false, 2_000)
            .unwrap()
            .unwrap();
        assert_eq!((t.used, t.last_used_at_ms), (1, Some(2_000)));
        s.commit_enrollment(&enrollment("a2", "s2", "t1"), false, 2_000)
            .unwrap()
            .unwrap();
        assert_eq!(
            s.commit_enrollment(&enrollment("a3", "s3", "t1"), false, 2_000)
                .unwrap(),
            Err(EnrollConflict::Token(TokenRefusal::UsedUp {
                id: "t1".into(),
                uses: 2
            }))
        );
        // Nothing of the refused attempt was recorded.
        assert!(s.agent_identity("a3").unwrap().is_none());
        assert!(s.agent_cert("s3").unwrap().is_none());
        let a1 = s.agent_identity("a1").unwrap().unwrap();
        assert_eq!(a1.pool.as_deref(), Some("pool-a"));
        assert_eq!(a1.token_id.as_deref(), Some("t1"));
        assert_eq!(s.agent_cert("s1").unwrap().unwrap().name, "a1");
    }

    #[test]
    fn expired_or_revoked_token_commits_nothing() {
        let s = Store::open_in_memory().unwrap();
        token(&s, "t1", 5, 10_000);
        assert!(matches!(
            s.commit_enrollment(&enrollment("a1", "s1", "t1"), false, 10_000)
                .unwrap(),
            Err(EnrollConflict::Token(TokenRefusal::Expired { .. }))
        ));
        let r = s.revoke_enroll_token("t1", 3_000).unwrap().unwrap();
        assert_eq!(r.revoked_at_ms, Some(3_000));
        assert_eq!(
            s.revoke_enroll_token("t1", 4_000)
                .unwrap()
                .unwrap()
                .revoked_at_ms,
            Some(3_000)
        );
        assert!(s.revoke_enroll_token("nope", 4_000).unwrap().is_none());
        assert!(matches!(
            s.commit_enrollment(&enrollment("a1", "s1", "t1"), false, 5_000)
                .unwrap(),
            Err(EnrollConflict::Token(TokenRefusal::Revoked { .. }))
        ));
        assert_eq!(s.enroll_token("t1").unwrap().unwrap().used, 0);
    }

    #[test]
    fn a_name_is_enrolled_again_only_after_revocation() {
        let s = Store::open_in_memory().unwrap();
        token(&s, "t1", 10, 100_000);
        s.commit_enrollment(&enrollment("a1", "e1", "t1"), false, 2_000)
            .unwrap()
            .unwrap();
        assert_eq!(
            s.commit_enrollment(&enrollment("a1", "e2", "t1"), false, 2_000)
                .unwrap(),
            Err(EnrollConflict::NameTaken("a1".into()))
        );
        // An init bundle (known outside the database) holds its name too.
        assert_eq!(
            s.commit_enrollment(&enrollment("b1", "e3", "t1"), true, 2_000)
                .unwrap(),
            Err(EnrollConflict::NameTaken("b1".into()))
        );
        assert!(s.revoke_identity("a1", "by test", 3_000).unwrap().is_some());
        assert!(s.agent_identity("a1").unwrap().unwrap().is_revoked());
        s.commit_enrollment(&enrollment("a1", "e4", "t1"), true, 4_000)
            .unwrap()
            .unwrap();
        let a1 = s.agent_identity("a1").unwrap().unwrap();
        assert!(!a1.is_revoked());
        assert_eq!(a1.enrollment.as_deref(), Some("e4"));
        // The old certificate stays recorded under the old enrollment.
        assert_eq!(
            s.agent_cert("e1").unwrap().unwrap().enrollment.as_deref(),
            Some("e1")
        );
        assert_eq!(s.last_renewal_ms("a1").unwrap(), None);
        s.record_renewal("a1", "r1", 50_000, 5_000).unwrap();
        assert_eq!(s.last_renewal_ms("a1").unwrap(), Some(5_000));
        let r1 = s.agent_cert("r1").unwrap().unwrap();
        assert_eq!(
            (r1.kind.as_str(), r1.enrollment.as_deref()),
            ("renew", Some("e4"))
        );
        assert_eq!(s.enroll_token("t1").unwrap().unwrap().used, 2);
    }

    #[test]
    fn revoking_a_never_enrolled_name() {
        let s = Store::open_in_memory().unwrap();
        assert!(s
            .revoke_identity("bundle-1", "by test", 7)
            .unwrap()
            .is_none());
        let before = s.revoke_identity("bundle-1", "again", 8).unwrap().unwrap();
        assert_eq!(before.revoked_at_ms, Some(7));
        let all = s.agent_identities().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].revoked_reason.as_deref(), Some("by test"));
        assert!(all[0].enrollment.is_none());
    }
}
