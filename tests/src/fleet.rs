//! A control plane plus agents, all labelled with one test run id, torn down (and every labelled
//! Docker object removed) when dropped.

use crate::api::Api;
use crate::docker::{sandbox_image, Cleanup};
use crate::process::{edit_toml, table};
use crate::{ControlPlane, RunningAgent, RUN_LABEL};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Long enough for a tofu task on a loaded 2-core machine; a liveness bound, not a performance one.
pub const TASK_WAIT: Duration = Duration::from_secs(240);

pub struct Fleet {
    // Field order is drop order: agents stop first, then Docker objects go, then the control plane.
    pub agents: Vec<RunningAgent>,
    pub cleanup: Cleanup,
    pub api: Api,
    pub cp: ControlPlane,
    pub run: String,
}

impl Fleet {
    /// A control plane with `names` agents of `slots` slots each, all connected.
    pub async fn start(names: &[&str], slots: u32) -> Fleet {
        Self::start_with(names, slots, |_| {}).await
    }

    /// Like `start`, with a hook to edit each agent.toml before the agent starts.
    pub async fn start_with(names: &[&str], slots: u32, edit: impl Fn(&mut toml::Table)) -> Fleet {
        let run = crate::run_id();
        let image = sandbox_image();
        let mut cp = ControlPlane::init(names, Some(2000));
        cp.start().await;
        let mut agents = Vec::new();
        for name in names {
            let config = cp.agent_dir(name).join("agent.toml");
            edit_toml(&config, |doc| {
                table(doc, "agent").insert("slots".into(), toml::Value::Integer(slots as i64));
                let sb = table(doc, "sandbox");
                sb.insert("image".into(), toml::Value::String(image.into()));
                sb.insert("pull_policy".into(), toml::Value::String("never".into()));
                let mut labels = toml::Table::new();
                labels.insert(RUN_LABEL.into(), toml::Value::String(run.clone()));
                sb.insert("labels".into(), toml::Value::Table(labels));
                edit(doc);
            });
            agents.push(RunningAgent::start(&config, name, &[]));
        }
        let api = Api::new(&cp);
        let fleet = Fleet {
            agents,
            cleanup: Cleanup::new(&run),
            api,
            cp,
            run,
        };
        for name in names {
            let cp = &fleet.cp;
            crate::eventually(
                &format!("agent {name} connected"),
                Duration::from_secs(60),
                || async { Ok(cp.agent_state(name).as_deref() == Some("connected")) },
            )
            .await;
        }
        fleet
    }

    /// A private copy of an example workspace, so tests can change it freely.
    pub fn workspace(&self, example: &str) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(example);
        let dst = self.cp.path().join("workspaces").join(example);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
            }
        }
        dst
    }

    /// `delegate-cp submit DIR --json ARGS...`; returns the task id.
    pub fn submit(&self, dir: &Path, args: &[&str]) -> String {
        let mut all = vec!["submit", dir.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let v = self.cp.cli_json(&all);
        v["id"]
            .as_str()
            .expect("submit --json prints an id")
            .to_string()
    }

    pub fn show(&self, id: &str) -> Value {
        self.cp.cli_json(&["show", id, "--json"])
    }

    /// Wait until the task is finished and return `show --json`.
    pub async fn finished(&self, id: &str) -> Value {
        let cp = &self.cp;
        crate::eventually(&format!("task {id} finished"), TASK_WAIT, || async {
            let out = cp.cli(&["show", id, "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            Ok(v["state"] == "finished")
        })
        .await;
        self.show(id)
    }

    /// Wait for the task to finish and insist it succeeded (printing its logs if not).
    pub async fn succeeded(&self, id: &str) -> Value {
        let v = self.finished(id).await;
        if v["outcome"] != "succeeded" {
            let logs = self.logs(id);
            let lines: Vec<&str> = logs.lines().collect();
            panic!(
                "task {id} did not succeed: {v:#}\nlast log lines:\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        v
    }

    pub fn logs(&self, id: &str) -> String {
        let out = self.cp.cli(&["logs", id]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Docker objects of this run still present.
    pub fn leftovers(&self) -> Vec<String> {
        crate::docker::labelled(&self.run)
    }

    /// Wait up to a minute for this run's Docker objects to be gone; panics listing what is left.
    pub async fn no_leftovers(&self) {
        for _ in 0..240 {
            if self.leftovers().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "labelled Docker objects left behind: {:?}",
            self.leftovers()
        );
    }

    /// A workspace `name` under the control plane's directory holding `files` (name, content).
    pub fn write_workspace(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.cp.path().join("workspaces").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in files {
            std::fs::write(dir.join(file), content).unwrap();
        }
        dir
    }

    /// The control plane's audit records of a task's egress decisions
    /// (`delegate-cp audit --task ID --json`, actions `egress.*`).
    pub fn egress_audit(&self, task: &str) -> Vec<Value> {
        match self.cp.cli_json(&["audit", "--task", task, "--json"]) {
            Value::Array(a) => a
                .into_iter()
                .filter(|r| {
                    r["action"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("egress."))
                })
                .collect(),
            other => panic!("audit --json is not an array: {other}"),
        }
    }
}

/// The egress events of a task, from its `show --json`.
pub fn egress_events(shown: &Value) -> Vec<Value> {
    shown["events"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|e| e["event"].clone())
                .filter(|e| e["kind"] == "egress")
                .collect()
        })
        .unwrap_or_default()
}

/// Compare two task logs; on a difference, panic with the first differing line only (task logs are
/// large).
pub fn assert_same_log(what: &str, expected: &str, got: &str) {
    // tofu prints these two lines only when taking or releasing the lock is slower than 400 ms
    // (its "slow message" threshold), so whether they appear depends on timing, not on delivery.
    fn stable(log: &str) -> String {
        log.split_inclusive('\n')
            .filter(|l| {
                !matches!(
                    l.trim_end(),
                    "Acquiring state lock. This may take a few moments..."
                        | "Releasing state lock. This may take a few moments..."
                )
            })
            .collect()
    }
    let (expected, got) = (&stable(expected), &stable(got));
    if expected == got {
        return;
    }
    let (e, g): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), got.lines().collect());
    let first = e
        .iter()
        .zip(g.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(e.len().min(g.len()));
    let window = |v: &Vec<&str>| {
        v[first.saturating_sub(2)..(first + 3).min(v.len())]
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "{what}: logs differ ({} vs {} lines, {} vs {} bytes); first difference at line {}:\nexpected:\n{}\ngot:\n{}",
        e.len(),
        g.len(),
        expected.len(),
        got.len(),
        first + 1,
        window(&e),
        window(&g)
    );
}
