//! Workspace secrets: a stored set of secret environment variables per workspace, merged into
//! every task of that workspace at dispatch (a task's own `--secret` wins).
//!
//! Owns: the `workspace_secrets` table. Each value is sealed ([`crate::at_rest`]) together with
//! its workspace and name, and both are checked on open, so a sealed value moved to another row
//! is an integrity error rather than a secret handed to the wrong workspace. Never returns a
//! value except through [`Store::workspace_secrets`] (for the Assign to the agent), and never
//! puts a value into an error.

use crate::at_rest::AtRestError;
use crate::store::{Store, StoreError};
use delegate_protocol::Secrets;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// What is sealed for one secret.
#[derive(Serialize)]
struct Sealed<'a> {
    workspace: &'a str,
    name: &'a str,
    value: &'a str,
}

/// [`Sealed`] read back. Owned: a value with `"`, `\` or a newline (a PEM key, JSON
/// credentials) is escaped in the sealed JSON and cannot be borrowed from it.
#[derive(Deserialize)]
struct Opened {
    workspace: String,
    name: String,
    #[serde(deserialize_with = "zeroizing_string")]
    value: Zeroizing<String>,
}

fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// A stored secret without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at_ms: i64,
}

fn what(ws: &str, name: &str) -> String {
    format!("secret {name} of workspace {ws}")
}

impl Store {
    /// Store (or replace) secret `name` of workspace `ws`. Returns whether it replaced one.
    pub fn secret_set(
        &self,
        ws: &str,
        name: &str,
        value: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let plain = Zeroizing::new(
            serde_json::to_vec(&Sealed {
                workspace: ws,
                name,
                value,
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot encode {}: {e}", what(ws, name))))?,
        );
        let sealed = self.at_rest.seal(&plain)?;
        let mut db = self.db();
        let tx = db.transaction()?;
        let existed = tx
            .query_row(
                "SELECT 1 FROM workspace_secrets WHERE workspace = ?1 AND name = ?2",
                params![ws, name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        tx.execute(
            "INSERT INTO workspace_secrets (workspace, name, value, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(workspace, name) DO UPDATE SET value = ?3, updated_at_ms = ?4",
            params![ws, name, sealed, now_ms],
        )?;
        tx.commit()?;
        Ok(existed)
    }

    /// Remove a secret. Returns whether it existed.
    pub fn secret_remove(&self, ws: &str, name: &str) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "DELETE FROM workspace_secrets WHERE workspace = ?1 AND name = ?2",
            params![ws, name],
        )?;
        Ok(n == 1)
    }

    /// The names of a workspace's secrets, sorted (values are not read).
    pub fn secret_names(&self, ws: &str) -> Result<Vec<SecretInfo>, StoreError> {
        let db = self.db();
        let rows = db
            .prepare(
                "SELECT name, updated_at_ms FROM workspace_secrets WHERE workspace = ?1
                 ORDER BY name",
            )?
            .query_map([ws], |r| {
                Ok(SecretInfo {
                    name: r.get(0)?,
                    updated_at_ms: r.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every secret of workspace `ws`, opened and checked (for a task's Assign).
    pub fn workspace_secrets(&self, ws: &str) -> Result<Secrets, StoreError> {
        let sealed: Vec<(String, Vec<u8>)> = {
            let db = self.db();
            let rows = db
                .prepare("SELECT name, value FROM workspace_secrets WHERE workspace = ?1")?
                .query_map([ws], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        let mut out = BTreeMap::new();
        for (name, value) in sealed {
            let what = what(ws, &name);
            let plain = Zeroizing::new(self.at_rest.open(&what, &value)?);
            let mut s: Opened =
                serde_json::from_slice(&plain).map_err(|_| AtRestError::Integrity {
                    what: what.clone(),
                    reason: "the sealed content is not a secret record".into(),
                })?;
            if s.workspace != ws || s.name != name {
                return Err(AtRestError::Integrity {
                    what,
                    reason: "the value was sealed for another secret (row moved or swapped)".into(),
                }
                .into());
            }
            out.insert(name, std::mem::take(&mut *s.value));
        }
        Ok(Secrets(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_list_merge_remove_and_detect_swaps() {
        let s = Store::open_in_memory().unwrap();
        assert!(!s.secret_set("prod", "API_TOKEN", "tok-123456", 1).unwrap());
        assert!(s.secret_set("prod", "API_TOKEN", "tok-999999", 2).unwrap());
        s.secret_set("prod", "DB_PASS", "pw-abcdef", 3).unwrap();
        s.secret_set("dev", "API_TOKEN", "dev-token", 4).unwrap();
        let names: Vec<String> = s
            .secret_names("prod")
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, vec!["API_TOKEN", "DB_PASS"]);
        let prod = s.workspace_secrets("prod").unwrap();
        assert_eq!(prod.0["API_TOKEN"], "tok-999999");
        assert_eq!(prod.0.len(), 2);
        assert!(s.workspace_secrets("none").unwrap().0.is_empty());

        // Stored sealed: the raw column never holds the value.
        let raw: Vec<Vec<u8>> = s
            .db()
            .prepare("SELECT value FROM workspace_secrets")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for v in raw {
            assert!(!v.windows(6).any(|w| w == b"tok-99" || w == b"pw-abc"));
        }

        // A sealed value moved onto another secret's row is refused, naming the secret.
        s.db()
            .execute(
                "UPDATE workspace_secrets SET value =
                   (SELECT value FROM workspace_secrets WHERE workspace = 'dev')
                 WHERE workspace = 'prod' AND name = 'DB_PASS'",
                [],
            )
            .unwrap();
        let err = s.workspace_secrets("prod").unwrap_err().to_string();
        assert!(err.contains("secret DB_PASS of workspace prod"), "{err}");
        assert!(err.contains("integrity"), "{err}");
        assert!(!err.contains("dev-token"), "{err}");

        assert!(s.secret_remove("prod", "DB_PASS").unwrap());
        assert!(!s.secret_remove("prod", "DB_PASS").unwrap());
        assert_eq!(s.workspace_secrets("prod").unwrap().0.len(), 1);
    }

    #[test]
    fn values_needing_json_escapes_round_trip() {
        let s = Store::open_in_memory().unwrap();
        let pem = "p\"w\\\nx-----BEGIN\ttab\u{1}é";
        s.secret_set("prod", "KEY", pem, 1).unwrap();
        s.secret_set("prod", "PLAIN", "plain", 2).unwrap();
        let got = s.workspace_secrets("prod").unwrap();
        assert_eq!(got.0["KEY"], pem);
        assert_eq!(got.0["PLAIN"], "plain");
    }
}
