//! What a task runs: the tofu steps of each operation with their arguments, the environment of
//! the step containers, and what the agent reads back from tofu (plan JSON, outputs).
//!
//! Owns: every command line and environment variable given to tofu, and the interpretation of its
//! exit codes and JSON. Pure functions only: no Docker, no I/O. Must never put a secret value in
//! anything but the container environment list it returns (no args, no errors).

use delegate_protocol::{Op, Summary, TaskSpec};
use serde_json::Value;
use std::collections::BTreeSet;

/// Where the workspace volume is mounted in every step container.
pub const WORKDIR: &str = "/workspace";
/// The plan file, made by `plan` and used by `apply` (workspace-relative and absolute).
pub const PLAN_REL: &str = ".delegate/plan.tfplan";
pub const PLAN_PATH: &str = "/workspace/.delegate/plan.tfplan";
/// The file the agent adds to a workspace that declares no backend.
pub const BACKEND_FILE: &str = "delegate_backend.tf";
pub const BACKEND_FILE_BODY: &str =
    "# Added by the Delegate agent: this workspace declares no backend, so its state is kept by\n\
     # the control plane through the agent (address and credentials come from TF_HTTP_*).\n\
     terraform {\n  backend \"http\" {}\n}\n";
/// Mount point of the per-pool provider plugin cache volume.
pub const PLUGIN_CACHE_DIR: &str = "/plugin-cache";
/// Most distinct drift addresses reported (the protocol's list limit).
const MAX_DRIFT_ADDRESSES: usize = delegate_protocol::limits::MAX_ENTRIES;

/// A task definition the agent refuses before running anything. Not retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("variable name {0:?} is not a valid identifier")]
    BadVarName(String),
    #[error("var file {0:?} must be a relative path inside the workspace without `..`")]
    BadVarFile(String),
    #[error("environment variable name {0:?} is invalid")]
    BadEnvName(String),
    #[error("environment variable {0:?} is set by the agent and cannot be overridden")]
    ReservedEnv(String),
    #[error("an apply task needs the approved plan file")]
    MissingPlan,
    #[error("could not read `{step}` output as JSON: {reason}")]
    BadJson { step: String, reason: String },
}

/// What the agent does with a step once it exited successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// Fetch the plan file from the volume and upload it as an artifact.
    UploadPlanFile,
    /// Stdout is `show -json` of the plan: counts into the summary; optionally uploaded too.
    PlanJson {
        upload: bool,
        drift: bool,
    },
    /// The apply ran: summary.applied.
    Applied,
    /// Stdout is `output -json`: into summary.outputs without sensitive values.
    Outputs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Name shown in events and labels: init, validate, plan, show, apply, output.
    pub name: &'static str,
    /// Arguments after the binary name.
    pub args: Vec<String>,
    /// Exit codes that mean success. `plan -detailed-exitcode` also succeeds with 2 (changes).
    pub ok_codes: &'static [i64],
    /// Stdout is data for the agent, not log output.
    pub capture_stdout: bool,
    pub after: After,
}

impl Step {
    fn new(name: &'static str, args: &[&str]) -> Step {
        Step {
            name,
            args: args.iter().map(|a| a.to_string()).collect(),
            ok_codes: &[0],
            capture_stdout: false,
            after: After::Nothing,
        }
    }
    fn then(mut self, after: After) -> Step {
        self.after = after;
        self
    }
    fn captured(mut self) -> Step {
        self.capture_stdout = true;
        self
    }
}

fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `-var name=value` and `-var-file=…` arguments, validated.
pub fn var_args(spec: &TaskSpec) -> Result<Vec<String>, StepError> {
    let mut args = Vec::new();
    for (k, v) in &spec.vars {
        if !valid_identifier(k) {
            return Err(StepError::BadVarName(k.clone()));
        }
        args.push("-var".to_string());
        args.push(format!("{k}={v}"));
    }
    for f in &spec.var_files {
        let ok = !f.is_empty()
            && !f.starts_with('/')
            && !f.chars().any(char::is_control)
            && f.split('/').all(|c| c != "..");
        if !ok {
            return Err(StepError::BadVarFile(f.clone()));
        }
        args.push(format!("-var-file={WORKDIR}/{f}"));
    }
    Ok(args)
}

/// The steps of a task, in order. `has_plan` says whether an approved plan file came with it.
pub fn plan_steps(spec: &TaskSpec, has_plan: bool) -> Result<Vec<Step>, StepError> {
    let vars = var_args(spec)?;
    let init = Step::new("init", &["init", "-input=false", "-no-color"]);
    let plan_out = format!("-out={PLAN_PATH}");
    let show = Step::new("show", &["show", "-json", "-no-color", PLAN_PATH]).captured();
    let apply_plan =
        Step::new("apply", &["apply", "-input=false", "-no-color", PLAN_PATH]).then(After::Applied);
    let output = Step::new("output", &["output", "-json", "-no-color"])
        .captured()
        .then(After::Outputs);
    let with_vars = |mut s: Step| {
        s.args.extend(vars.iter().cloned());
        s
    };
    Ok(match spec.op {
        Op::Validate => vec![
            Step::new(
                "init",
                &["init", "-input=false", "-no-color", "-backend=false"],
            ),
            Step::new("validate", &["validate", "-no-color"]),
        ],
        Op::Plan => {
            let mut steps = vec![
                init,
                with_vars(Step::new(
                    "plan",
                    &["plan", "-input=false", "-no-color", &plan_out],
                ))
                .then(After::UploadPlanFile),
                show.then(After::PlanJson {
                    upload: true,
                    drift: false,
                }),
            ];
            if spec.auto_approve {
                steps.push(apply_plan);
                steps.push(output);
            }
            steps
        }
        Op::Apply => {
            if !has_plan {
                return Err(StepError::MissingPlan);
            }
            // Variables are part of the saved plan; tofu refuses -var with a plan file.
            vec![
                init,
                show.then(After::PlanJson {
                    upload: false,
                    drift: false,
                }),
                apply_plan,
                output,
            ]
        }
        // A saved destroy plan, so the summary says what goes and tofu checks it against the
        // state it read; then applied at once.
        Op::Destroy => vec![
            init,
            with_vars(Step::new(
                "plan",
                &["plan", "-destroy", "-input=false", "-no-color", &plan_out],
            )),
            show.then(After::PlanJson {
                upload: false,
                drift: false,
            }),
            apply_plan,
        ],
        Op::Drift => {
            let mut plan = with_vars(Step::new(
                "plan",
                &[
                    "plan",
                    "-detailed-exitcode",
                    "-input=false",
                    "-no-color",
                    &plan_out,
                ],
            ));
            plan.ok_codes = &[0, 2];
            vec![
                init,
                plan,
                show.then(After::PlanJson {
                    upload: true,
                    drift: true,
                }),
            ]
        }
    })
}

/// Connection details of the task's default state backend, for the step environment.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendEnv {
    pub address: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BackendEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendEnv")
            .field("address", &self.address)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Variables the agent sets itself; a task cannot override them.
fn agent_env(backend: Option<&BackendEnv>, plugin_cache: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("TF_IN_AUTOMATION".to_string(), "1".to_string()),
        ("TF_INPUT".into(), "0".into()),
        ("HOME".into(), "/tmp".into()),
        ("CHECKPOINT_DISABLE".into(), "1".into()),
    ];
    if let Some(b) = backend {
        for key in [
            "TF_HTTP_ADDRESS",
            "TF_HTTP_LOCK_ADDRESS",
            "TF_HTTP_UNLOCK_ADDRESS",
        ] {
            env.push((key.into(), b.address.clone()));
        }
        env.push(("TF_HTTP_LOCK_METHOD".into(), "LOCK".into()));
        env.push(("TF_HTTP_UNLOCK_METHOD".into(), "UNLOCK".into()));
        env.push(("TF_HTTP_UPDATE_METHOD".into(), "POST".into()));
        env.push(("TF_HTTP_USERNAME".into(), b.username.clone()));
        env.push(("TF_HTTP_PASSWORD".into(), b.password.clone()));
        // The backend is relayed over the link to the control plane. A dropped link answers 503
        // until the agent reconnects; let tofu ride that out (up to about a minute) instead of
        // failing after its default two retries. Retrying is safe: re-locking by the holder and
        // unlocking a free workspace both succeed, and a repeated write stores the same state.
        env.push(("TF_HTTP_RETRY_MAX".into(), "15".into()));
        env.push(("TF_HTTP_RETRY_WAIT_MIN".into(), "1".into()));
        env.push(("TF_HTTP_RETRY_WAIT_MAX".into(), "5".into()));
    }
    if plugin_cache {
        env.push(("TF_PLUGIN_CACHE_DIR".into(), PLUGIN_CACHE_DIR.into()));
    }
    env
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `KEY=value` list of a step container: the task's env and secrets, then the agent's own
/// variables, then `extra` (more of the agent's own, e.g. the provider mirror's
/// `TF_CLI_CONFIG_FILE`; a task cannot override these either). Errors name the variable, never
/// its value.
pub fn build_env(
    spec: &TaskSpec,
    backend: Option<&BackendEnv>,
    plugin_cache: bool,
    extra: &[(String, String)],
) -> Result<Vec<String>, StepError> {
    let mut ours = agent_env(backend, plugin_cache);
    ours.extend(extra.iter().cloned());
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, v) in spec.env.iter().chain(spec.secrets.0.iter()) {
        if !valid_env_name(k) {
            return Err(StepError::BadEnvName(k.clone()));
        }
        if ours.iter().any(|(o, _)| o == k) {
            return Err(StepError::ReservedEnv(k.clone()));
        }
        // A name in both env and secrets: the secret wins (it comes second).
        if !seen.insert(k.clone()) {
            out.retain(|e: &String| !e.starts_with(&format!("{k}=")));
        }
        out.push(format!("{k}={v}"));
    }
    out.extend(ours.into_iter().map(|(k, v)| format!("{k}={v}")));
    Ok(out)
}

/// What a plan JSON says: the counts, and the addresses that would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanFacts {
    pub add: u64,
    pub change: u64,
    pub destroy: u64,
    /// Resources whose actions are anything but `no-op` (or `read`), sorted, at most 1024.
    pub changed: Vec<String>,
}

/// Read `show -json` output: counts as tofu's "Plan: X to add, Y to change, Z to destroy".
pub fn parse_plan_json(json: &[u8]) -> Result<PlanFacts, StepError> {
    let v: Value = serde_json::from_slice(json).map_err(|e| StepError::BadJson {
        step: "show".into(),
        reason: e.to_string(),
    })?;
    let mut facts = PlanFacts::default();
    let mut changed = BTreeSet::new();
    let changes = v
        .get("resource_changes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for rc in changes {
        let actions: Vec<&str> = rc
            .pointer("/change/actions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let (add, change, destroy) = match actions.as_slice() {
            ["create"] => (1, 0, 0),
            ["update"] => (0, 1, 0),
            ["delete"] => (0, 0, 1),
            ["delete", "create"] | ["create", "delete"] => (1, 0, 1),
            _ => (0, 0, 0),
        };
        facts.add += add;
        facts.change += change;
        facts.destroy += destroy;
        let quiet = actions.is_empty() || actions.iter().all(|a| *a == "no-op" || *a == "read");
        if !quiet {
            if let Some(addr) = rc.get("address").and_then(Value::as_str) {
                changed.insert(addr.to_string());
            }
        }
    }
    facts.changed = changed.into_iter().take(MAX_DRIFT_ADDRESSES).collect();
    Ok(facts)
}

/// Apply plan facts to a summary. For drift, `drift` is what tofu's exit code said
/// (`-detailed-exitcode`: 2 means changes); the addresses come from the plan JSON.
pub fn apply_plan_facts(summary: &mut Summary, facts: PlanFacts, drift: Option<bool>) {
    summary.add = facts.add;
    summary.change = facts.change;
    summary.destroy = facts.destroy;
    if let Some(drifted) = drift {
        summary.drift = Some(drifted);
        summary.drift_addresses = if drifted { facts.changed } else { Vec::new() };
    }
}

/// Read `output -json`, dropping the value of every sensitive output.
pub fn parse_outputs(json: &[u8]) -> Result<Value, StepError> {
    let mut v: Value = serde_json::from_slice(json).map_err(|e| StepError::BadJson {
        step: "output".into(),
        reason: e.to_string(),
    })?;
    if let Some(map) = v.as_object_mut() {
        for out in map.values_mut() {
            if let Some(o) = out.as_object_mut() {
                if o.get("sensitive").and_then(Value::as_bool) != Some(false) {
                    o.remove("value");
                }
            }
        }
    }
    Ok(v)
}

/// Replace every secret inside the strings of a JSON document (keys included) with
/// `[REDACTED]`, in every form the log redactor knows (raw, JSON-escaped, URL-encoded, base64:
/// see [`crate::redact`]), so an output such as `base64encode(var.token)` is caught as it is in
/// the logs. If the secrets cannot be made into a redactor, the whole document is withheld.
pub fn redact_json(v: &mut Value, secrets: &[Vec<u8>]) {
    let secrets: Vec<&str> = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| std::str::from_utf8(s).ok())
        .collect();
    if secrets.is_empty() {
        return;
    }
    let redactor = match crate::redact::Redactor::new(&secrets) {
        Ok(r) => r,
        Err(_) => {
            // Fail closed: nothing that might hold a secret leaves.
            *v = Value::String("[withheld: the task's secrets could not be matched]".into());
            return;
        }
    };
    let mask = |s: &str| String::from_utf8_lossy(&redactor.redact(s.as_bytes())).into_owned();
    fn walk(v: &mut Value, mask: &dyn Fn(&str) -> String) {
        match v {
            Value::String(s) => *s = mask(s),
            Value::Array(items) => items.iter_mut().for_each(|i| walk(i, mask)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut val) in old {
                    walk(&mut val, mask);
                    map.insert(mask(&k), val);
                }
            }
            _ => {}
        }
    }
    walk(v, &mask);
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::{BlobRef, Secrets};
    use std::collections::BTreeMap;

    fn spec(op: Op) -> TaskSpec {
        TaskSpec {
            task_id: uuid::Uuid::nil(),
            op,
            workspace: "w".into(),
            auto_approve: false,
            vars: BTreeMap::from([("region".into(), "eu-west=1".into())]),
            var_files: vec!["env/prod.tfvars".into()],
            env: BTreeMap::from([("TF_LOG".into(), "info".into())]),
            secrets: Secrets(BTreeMap::from([("TF_VAR_token".into(), "s3cr3t".into())])),
            archive: BlobRef {
                size: 1,
                sha256: "0".repeat(64),
            },
            plan: None,
            timeout_secs: 0,
            egress: vec![],
        }
    }

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.name).collect()
    }

    #[test]
    fn validate_steps() {
        let steps = plan_steps(&spec(Op::Validate), false).unwrap();
        assert_eq!(names(&steps), ["init", "validate"]);
        assert!(steps[0].args.contains(&"-backend=false".to_string()));
        assert_eq!(steps[1].args, ["validate", "-no-color"]);
    }

    #[test]
    fn plan_steps_carry_vars_and_upload() {
        let steps = plan_steps(&spec(Op::Plan), false).unwrap();
        assert_eq!(names(&steps), ["init", "plan", "show"]);
        assert_eq!(
            steps[1].args,
            [
                "plan",
                "-input=false",
                "-no-color",
                "-out=/workspace/.delegate/plan.tfplan",
                "-var",
                "region=eu-west=1",
                "-var-file=/workspace/env/prod.tfvars"
            ]
        );
        assert_eq!(steps[1].after, After::UploadPlanFile);
        assert_eq!(steps[2].args, ["show", "-json", "-no-color", PLAN_PATH]);
        assert!(steps[2].capture_stdout);
        assert_eq!(
            steps[2].after,
            After::PlanJson {
                upload: true,
                drift: false
            }
        );
        assert!(steps.iter().all(|s| s.ok_codes == [0]));
    }

    #[test]
    fn plan_with_auto_approve_applies_that_plan() {
        let mut s = spec(Op::Plan);
        s.auto_approve = true;
        let steps = plan_steps(&s, false).unwrap();
        assert_eq!(names(&steps), ["init", "plan", "show", "apply", "output"]);
        assert_eq!(
            steps[3].args,
            ["apply", "-input=false", "-no-color", PLAN_PATH]
        );
        assert_eq!(steps[3].after, After::Applied);
        assert_eq!(steps[4].after, After::Outputs);
    }

    #[test]
    fn apply_uses_the_plan_file_without_vars() {
        assert_eq!(
            plan_steps(&spec(Op::Apply), false),
            Err(StepError::MissingPlan)
        );
        let steps = plan_steps(&spec(Op::Apply), true).unwrap();
        assert_eq!(names(&steps), ["init", "show", "apply", "output"]);
        assert!(steps
            .iter()
            .all(|s| !s.args.iter().any(|a| a.starts_with("-var"))));
        assert_eq!(
            steps[1].after,
            After::PlanJson {
                upload: false,
                drift: false
            }
        );
    }

    #[test]
    fn destroy_and_drift_steps() {
        let steps = plan_steps(&spec(Op::Destroy), false).unwrap();
        assert_eq!(names(&steps), ["init", "plan", "show", "apply"]);
        assert!(steps[1].args.contains(&"-destroy".to_string()));
        assert!(steps[1].args.contains(&"region=eu-west=1".to_string()));
        assert_eq!(steps[3].after, After::Applied);

        let steps = plan_steps(&spec(Op::Drift), false).unwrap();
        assert_eq!(names(&steps), ["init", "plan", "show"]);
        assert!(steps[1].args.contains(&"-detailed-exitcode".to_string()));
        assert_eq!(steps[1].ok_codes, [0, 2]);
        assert_eq!(
            steps[2].after,
            After::PlanJson {
                upload: true,
                drift: true
            }
        );
    }

    #[test]
    fn refuses_bad_vars() {
        let mut s = spec(Op::Plan);
        s.vars.insert("bad name".into(), "x".into());
        assert_eq!(
            plan_steps(&s, false),
            Err(StepError::BadVarName("bad name".into()))
        );
        for f in ["/etc/passwd", "../x.tfvars", "a/../../b", ""] {
            let mut s = spec(Op::Plan);
            s.var_files = vec![f.into()];
            assert_eq!(
                plan_steps(&s, false),
                Err(StepError::BadVarFile(f.into())),
                "{f}"
            );
        }
    }

    #[test]
    fn env_holds_task_env_secrets_and_backend() {
        let backend = BackendEnv {
            address: "http://172.18.0.1:41234/state".into(),
            username: "delegate".into(),
            password: "pw".into(),
        };
        let env = build_env(&spec(Op::Plan), Some(&backend), true, &[]).unwrap();
        for want in [
            "TF_LOG=info",
            "TF_VAR_token=s3cr3t",
            "TF_IN_AUTOMATION=1",
            "TF_INPUT=0",
            "HOME=/tmp",
            "TF_HTTP_ADDRESS=http://172.18.0.1:41234/state",
            "TF_HTTP_LOCK_ADDRESS=http://172.18.0.1:41234/state",
            "TF_HTTP_UNLOCK_ADDRESS=http://172.18.0.1:41234/state",
            "TF_HTTP_LOCK_METHOD=LOCK",
            "TF_HTTP_UNLOCK_METHOD=UNLOCK",
            "TF_HTTP_USERNAME=delegate",
            "TF_HTTP_PASSWORD=pw",
            "TF_PLUGIN_CACHE_DIR=/plugin-cache",
        ] {
            assert!(env.contains(&want.to_string()), "missing {want}");
        }
        let env = build_env(&spec(Op::Plan), None, false, &[]).unwrap();
        assert!(!env
            .iter()
            .any(|e| e.starts_with("TF_HTTP_") || e.starts_with("TF_PLUGIN")));
        assert!(!format!("{backend:?}").contains("pw"));
    }

    #[test]
    fn backend_env_rides_out_a_dropped_link() {
        let b = BackendEnv {
            address: "http://172.18.0.1:4000/state".into(),
            username: "task".into(),
            password: "pw-123456".into(),
        };
        let env = agent_env(Some(&b), false);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("TF_HTTP_RETRY_MAX").as_deref(), Some("15"));
        assert_eq!(get("TF_HTTP_RETRY_WAIT_MAX").as_deref(), Some("5"));
        assert!(agent_env(None, false)
            .iter()
            .all(|(n, _)| !n.starts_with("TF_HTTP")));
    }

    #[test]
    fn env_refuses_bad_and_reserved_names_without_values() {
        let mut s = spec(Op::Plan);
        s.secrets.0.insert("HOME".into(), "topsecret".into());
        let e = build_env(&s, None, false, &[]).unwrap_err();
        assert_eq!(e, StepError::ReservedEnv("HOME".into()));
        assert!(!e.to_string().contains("topsecret"));
        let mut s = spec(Op::Plan);
        s.env.insert("A=B".into(), "x".into());
        assert_eq!(
            build_env(&s, None, false, &[]),
            Err(StepError::BadEnvName("A=B".into()))
        );
        // Their own http backend may use TF_HTTP_* when the agent does not serve one.
        let mut s = spec(Op::Plan);
        s.env
            .insert("TF_HTTP_ADDRESS".into(), "https://state.example".into());
        assert!(build_env(&s, None, false, &[]).is_ok());
        let b = BackendEnv {
            address: "a".into(),
            username: "u".into(),
            password: "p".into(),
        };
        assert!(build_env(&s, Some(&b), false, &[]).is_err());
    }

    #[test]
    fn mirror_env_is_the_agents_own() {
        let mirror = crate::mirror::setup(&crate::mirror::ProviderMirror::Filesystem(
            "/srv/providers".into(),
        ));
        let env = build_env(&spec(Op::Plan), None, false, &mirror.env).unwrap();
        assert!(env.contains(&"TF_CLI_CONFIG_FILE=/workspace/.delegate/tofu.tfrc".to_string()));
        // A task cannot point tofu at a CLI configuration of its own (one with `direct`) when
        // the pool has a mirror; without a mirror it may.
        let mut s = spec(Op::Plan);
        s.env
            .insert("TF_CLI_CONFIG_FILE".into(), "/workspace/mine.tfrc".into());
        assert_eq!(
            build_env(&s, None, false, &mirror.env),
            Err(StepError::ReservedEnv("TF_CLI_CONFIG_FILE".into()))
        );
        assert!(build_env(&s, None, false, &[]).is_ok());
    }

    #[test]
    fn env_secret_wins_over_plain_env_of_the_same_name() {
        let mut s = spec(Op::Plan);
        s.env.insert("TOKEN".into(), "plain".into());
        s.secrets.0.insert("TOKEN".into(), "secret".into());
        let env = build_env(&s, None, false, &[]).unwrap();
        assert!(env.contains(&"TOKEN=secret".to_string()));
        assert!(!env.contains(&"TOKEN=plain".to_string()));
    }

    const PLAN_JSON: &str = r#"{
      "format_version": "1.2",
      "resource_changes": [
        {"address": "terraform_data.new", "change": {"actions": ["create"]}},
        {"address": "terraform_data.upd", "change": {"actions": ["update"]}},
        {"address": "terraform_data.gone", "change": {"actions": ["delete"]}},
        {"address": "terraform_data.repl", "change": {"actions": ["delete", "create"]}},
        {"address": "terraform_data.repl2", "change": {"actions": ["create", "delete"]}},
        {"address": "terraform_data.same", "change": {"actions": ["no-op"]}},
        {"address": "data.x.y", "change": {"actions": ["read"]}}
      ]
    }"#;

    #[test]
    fn plan_json_counts_like_tofu() {
        let facts = parse_plan_json(PLAN_JSON.as_bytes()).unwrap();
        assert_eq!((facts.add, facts.change, facts.destroy), (3, 1, 3));
        assert_eq!(
            facts.changed,
            [
                "terraform_data.gone",
                "terraform_data.new",
                "terraform_data.repl",
                "terraform_data.repl2",
                "terraform_data.upd"
            ]
        );
        let mut summary = Summary::default();
        apply_plan_facts(&mut summary, facts.clone(), None);
        assert_eq!((summary.add, summary.change, summary.destroy), (3, 1, 3));
        assert_eq!(summary.drift, None);
        apply_plan_facts(&mut summary, facts, Some(true));
        assert_eq!(summary.drift, Some(true));
        assert_eq!(summary.drift_addresses.len(), 5);
    }

    #[test]
    fn no_changes_means_no_drift() {
        let facts = parse_plan_json(
            br#"{"resource_changes": [{"address": "a.b", "change": {"actions": ["no-op"]}}]}"#,
        )
        .unwrap();
        let mut summary = Summary::default();
        apply_plan_facts(&mut summary, facts, Some(false));
        assert_eq!(summary.drift, Some(false));
        assert!(summary.drift_addresses.is_empty());
        // An empty configuration has no resource_changes at all.
        assert_eq!(parse_plan_json(b"{}").unwrap(), PlanFacts::default());
        assert!(parse_plan_json(b"not json").is_err());
    }

    #[test]
    fn outputs_lose_sensitive_values() {
        let v = parse_outputs(
            br#"{"greeting": {"sensitive": false, "type": "string", "value": "hello"},
                 "token": {"sensitive": true, "type": "string", "value": "hunter2"}}"#,
        )
        .unwrap();
        assert_eq!(v["greeting"]["value"], "hello");
        assert_eq!(v["token"]["sensitive"], true);
        assert!(v["token"].get("value").is_none());
        assert!(!v.to_string().contains("hunter2"));
    }

    #[test]
    fn json_redaction_masks_secret_values_everywhere() {
        let mut v: Value = serde_json::from_str(
            r#"{"echo": {"sensitive": false, "value": "token=s3cr3t!"},
                "list": {"value": ["a", "s3cr3t", {"s3cr3t": "x"}]}}"#,
        )
        .unwrap();
        redact_json(&mut v, &[b"s3cr3t".to_vec(), Vec::new()]);
        let text = v.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert_eq!(v["echo"]["value"], "token=[REDACTED]!");
        assert_eq!(v["list"]["value"][1], "[REDACTED]");
        assert!(v["list"]["value"][2].get("[REDACTED]").is_some(), "{text}");
    }

    #[test]
    fn json_redaction_catches_encoded_forms_too() {
        use base64::Engine;
        let secret = "tok-9f8e7d6c";
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let mut v = serde_json::json!({
            "b64": { "sensitive": false, "value": b64 },
            "url": { "sensitive": false, "value": "https://x.test/?t=tok-9f8e7d6c%21" },
        });
        redact_json(&mut v, &[secret.as_bytes().to_vec()]);
        let text = v.to_string();
        assert!(!text.contains(&b64), "{text}");
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("[REDACTED]"), "{text}");
    }

    #[test]
    fn json_redaction_fails_closed_on_unusable_secrets() {
        let mut v = serde_json::json!({ "o": { "value": "abc" } });
        // Shorter than the minimum: no redactor can be built, so nothing is shown.
        redact_json(&mut v, &[b"ab".to_vec()]);
        assert!(
            v.as_str().is_some_and(|s| s.starts_with("[withheld")),
            "{v}"
        );
    }
}
