//! The execution journal of one task: the least the agent must know, after a restart, to finish
//! a task whose containers kept running, and to never start an apply twice.
//!
//! The journal travels in the task's spool stream as sealed `journal` records, ordered with the
//! task's outbound frames (the latest one wins; every new segment starts with a copy, so deleting
//! acknowledged segments never loses it). A journal record is appended with `fdatasync` before the
//! sandbox goes on, so "step N is starting" is on disk before step N's container exists, and
//! "step N exited with code C" before that container is removed.
//!
//! Owns: the journal's shape and its JSON. Must never hold a secret value: [`TaskJournal::new`]
//! keeps the names of the task's secrets only, and [`TaskJournal::from_json`] refuses a journal
//! whose spec carries secret values. The one credential it holds is the per-task password of the
//! agent's own state backend ([`BackendJournal`]), needed to serve a re-attached step; it is wiped
//! from memory on drop and only ever written sealed.

use delegate_protocol::{ChunkKind, Secrets, Summary, TaskSpec};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// Version of the journal's JSON shape.
pub const JOURNAL_VERSION: u32 = 1;

/// A journal that cannot be used. Not retryable.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal is not valid JSON of this agent version: {0}")]
    Json(String),
    #[error("journal version {0} is not supported (this agent writes {JOURNAL_VERSION})")]
    Version(u32),
    #[error("journal holds secret values, which must never be stored")]
    HoldsSecrets,
}

/// What the agent records about a task it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskJournal {
    pub version: u32,
    /// The task as assigned, with `secrets` always empty.
    pub spec: TaskSpec,
    /// Names of the task's secrets; their values lived in memory only.
    pub secret_names: Vec<String>,
    /// Whether an approved plan file came with the task (apply).
    pub has_plan: bool,
    /// When the task started running (Unix ms): the task timeout counts from here.
    pub started_at_ms: u64,
    /// Artifacts whose chunks and `artifact` message are all in the spool.
    #[serde(default)]
    pub artifacts: Vec<ChunkKind>,
    /// Set by the sandbox once the task's Docker objects exist and the workspace is uploaded.
    #[serde(default)]
    pub exec: Option<ExecJournal>,
    /// Not stored: when the spool was last written before a restart (Unix ms), set when the
    /// spool is loaded; says how long the agent was away.
    #[serde(skip)]
    pub last_spooled_ms: Option<u64>,
}

/// The Docker side of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecJournal {
    pub image: String,
    /// The tofu/terraform binary name in the image.
    pub binary: String,
    pub network: String,
    /// The task network's gateway, where the agent serves the state backend.
    pub gateway: String,
    /// The task network's IPv4 subnet, as `a.b.c.d/n`.
    #[serde(default)]
    pub subnet: Option<String>,
    /// The task network's bridge interface (host firewall rules are bound to it).
    #[serde(default)]
    pub bridge: String,
    pub volume: String,
    pub cache_volume: Option<String>,
    /// The task's effective timeout, in seconds, counted from `started_at_ms`.
    pub timeout_secs: u64,
    pub backend: Option<BackendJournal>,
    /// One entry per step of the task, in order.
    pub steps: Vec<StepJournal>,
    /// What the steps collected so far (plan counts, drift, outputs).
    pub summary: Summary,
    /// Exit code of the `plan` step, once known (drift reads it).
    pub plan_exit: Option<i64>,
}

/// The agent's own state backend of a task: where it listened and the credentials tofu was
/// given. Kept so a step that outlived the agent can still reach its state.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendJournal {
    pub port: u16,
    pub username: String,
    pub password: String,
}

impl Drop for BackendJournal {
    fn drop(&mut self) {
        self.password.zeroize();
    }
}

impl std::fmt::Debug for BackendJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendJournal")
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepJournal {
    pub name: String,
    pub state: StepState,
}

/// Where one step stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepState {
    /// Not started.
    Pending,
    /// Recorded before its container is created: from here on the container may exist.
    Started,
    /// The container exited with this code; recorded before the container is removed.
    /// `stopped`: it was interrupted by cancel or timeout.
    Exited { exit_code: i64, stopped: bool },
    /// Judged and collected (artifacts spooled, summary updated); the container may be gone.
    Done,
}

impl TaskJournal {
    /// A journal for a task that starts now. Secret values are dropped: only names are kept.
    pub fn new(spec: &TaskSpec, has_plan: bool, started_at_ms: u64) -> TaskJournal {
        let secret_names = spec.secrets.0.keys().cloned().collect();
        let mut spec = spec.clone();
        wipe(&mut spec.secrets);
        TaskJournal {
            version: JOURNAL_VERSION,
            spec,
            secret_names,
            has_plan,
            started_at_ms,
            artifacts: Vec::new(),
            exec: None,
            last_spooled_ms: None,
        }
    }

    /// Whether the task had secrets (which do not survive an agent restart).
    pub fn had_secrets(&self) -> bool {
        !self.secret_names.is_empty()
    }

    /// JSON for a spool record; wiped when dropped (it may hold the backend password).
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        // Serializing plain data into a Vec cannot fail.
        Zeroizing::new(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn from_json(json: &[u8]) -> Result<TaskJournal, JournalError> {
        // Only where and what kind: serde's own message quotes the offending value, and a
        // journal holds vars, env and the backend password.
        let j: TaskJournal = serde_json::from_slice(json).map_err(|e| {
            JournalError::Json(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if j.version != JOURNAL_VERSION {
            return Err(JournalError::Version(j.version));
        }
        if !j.spec.secrets.0.is_empty() {
            return Err(JournalError::HoldsSecrets);
        }
        Ok(j)
    }
}

/// Empty a secrets map, wiping every value first.
pub fn wipe(secrets: &mut Secrets) {
    for v in secrets.0.values_mut() {
        v.zeroize();
    }
    secrets.0.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::{BlobRef, Op};
    use std::collections::BTreeMap;

    pub(crate) fn spec_with_secret() -> TaskSpec {
        TaskSpec {
            task_id: uuid::Uuid::from_u128(5),
            op: Op::Apply,
            workspace: "w".into(),
            auto_approve: false,
            vars: BTreeMap::from([("region".into(), "eu".into())]),
            var_files: vec![],
            env: BTreeMap::new(),
            secrets: Secrets(BTreeMap::from([(
                "TOKEN".into(),
                "s3cret-value-xyz".into(),
            )])),
            archive: BlobRef {
                size: 1,
                sha256: "0".repeat(64),
            },
            plan: None,
            timeout_secs: 0,
            egress: vec![],
        }
    }

    #[test]
    fn keeps_secret_names_not_values() {
        let spec = spec_with_secret();
        let j = TaskJournal::new(&spec, true, 42);
        assert!(j.spec.secrets.0.is_empty());
        assert_eq!(j.secret_names, vec!["TOKEN".to_string()]);
        assert!(j.had_secrets());
        let json = j.to_json();
        let text = String::from_utf8_lossy(&json);
        assert!(!text.contains("s3cret-value-xyz"), "{text}");
        assert_eq!(TaskJournal::from_json(&json).unwrap(), j);
    }

    #[test]
    fn refuses_secret_values_and_other_versions() {
        let mut j = TaskJournal::new(&spec_with_secret(), false, 1);
        j.spec.secrets = spec_with_secret().secrets;
        let json = serde_json::to_vec(&j).unwrap();
        assert!(matches!(
            TaskJournal::from_json(&json),
            Err(JournalError::HoldsSecrets)
        ));
        let mut j = TaskJournal::new(&spec_with_secret(), false, 1);
        j.version = 9;
        assert!(matches!(
            TaskJournal::from_json(&serde_json::to_vec(&j).unwrap()),
            Err(JournalError::Version(9))
        ));
        assert!(matches!(
            TaskJournal::from_json(b"{"),
            Err(JournalError::Json(_))
        ));
        // A value of the wrong type is not quoted back.
        let mut v = serde_json::to_value(TaskJournal::new(&spec_with_secret(), false, 1)).unwrap();
        v["version"] = serde_json::Value::String("pw-0xDEADBEEF".into());
        let e = TaskJournal::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(!e.to_string().contains("DEADBEEF"), "{e}");
    }

    #[test]
    fn exec_round_trips_and_debug_hides_the_backend_password() {
        let mut j = TaskJournal::new(&spec_with_secret(), true, 1);
        j.exec = Some(ExecJournal {
            image: "img".into(),
            binary: "tofu".into(),
            network: "n".into(),
            gateway: "172.30.0.1".into(),
            subnet: Some("172.30.0.0/16".into()),
            bridge: "dl-x".into(),
            volume: "v".into(),
            cache_volume: None,
            timeout_secs: 60,
            backend: Some(BackendJournal {
                port: 4444,
                username: "delegate".into(),
                password: "pw-abcdef".into(),
            }),
            steps: vec![
                StepJournal {
                    name: "init".into(),
                    state: StepState::Done,
                },
                StepJournal {
                    name: "apply".into(),
                    state: StepState::Exited {
                        exit_code: 1,
                        stopped: false,
                    },
                },
                StepJournal {
                    name: "output".into(),
                    state: StepState::Pending,
                },
            ],
            summary: Summary::default(),
            plan_exit: None,
        });
        j.artifacts.push(ChunkKind::Plan);
        assert_eq!(TaskJournal::from_json(&j.to_json()).unwrap(), j);
        assert!(!format!("{j:?}").contains("pw-abcdef"));
    }
}
