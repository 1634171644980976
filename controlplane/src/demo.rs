//! `delegate-cp demo`: the whole product in one command, on embedded defaults.
//!
//! It makes a throw-away data directory, initialises a control plane with one agent bundle, serves
//! it in this process on free loopback ports, starts the real `delegate` agent as a child process,
//! makes sure the sandbox image exists (building it from the `tofu`/`terraform` on PATH if not, and
//! saying so), submits the embedded `examples/hello` workspace as a plan, streams its logs, approves
//! it, streams the apply, prints the outputs and tears everything down.
//!
//! It owns nothing that outlives it: the data directory is removed at the end (unless `--keep`),
//! the agent is stopped with SIGTERM (so it removes its containers), and it never listens on
//! anything but loopback.

use crate::api_tasks::TaskView;
use crate::cli::{self, SubmitArgs};
use crate::client::ApiClient;
use crate::config::DataDir;
use crate::init::{self, InitOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The example workspace, embedded so the demo works from any directory.
const HELLO_MAIN_TF: &str = include_str!("../../examples/hello/main.tf");
const AGENT_NAME: &str = "demo-agent";

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot initialise the demo control plane: {0}")]
    Init(#[from] init::InitError),
    #[error("cannot start the demo control plane: {0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sandbox image the agent uses; built locally when missing.
    pub image: String,
    /// The agent binary; default: `delegate` next to this executable, then on PATH.
    pub agent_bin: Option<PathBuf>,
    /// Keep the data directory (its path is printed) instead of removing it.
    pub keep: bool,
    /// Extra labels on every Docker object the demo's agent creates (tests put their run id here).
    pub labels: Vec<(String, String)>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            image: "delegate-sandbox:local".into(),
            agent_bin: None,
            keep: false,
            labels: Vec::new(),
        }
    }
}

/// Where a program is on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, DemoError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(DemoError::Setup(format!(
                "agent binary {} not found",
                p.display()
            )))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("delegate")))
        .filter(|p| p.is_file());
    beside.or_else(|| on_path("delegate")).ok_or_else(|| {
        DemoError::Setup(
            "cannot find the `delegate` agent binary next to delegate-cp or on PATH; build both with `cargo build --release`".into(),
        )
    })
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Setup(format!("cannot find a free loopback port: {e}")))
}

/// Build the sandbox image with the agent's own `sandbox build-image` when Docker lacks it.
async fn ensure_image(
    agent: &Path,
    image: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let present = tokio::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        writeln!(out, "==> sandbox image {image} is present")?;
        return Ok(());
    }
    let binary = on_path("tofu").or_else(|| on_path("terraform")).ok_or_else(|| {
        DemoError::Setup(format!(
            "the sandbox image {image} is not present and neither `tofu` nor `terraform` is on PATH to build it from"
        ))
    })?;
    writeln!(
        out,
        "==> sandbox image {image} not found: building it locally from {}",
        binary.display()
    )?;
    out.flush()?;
    let built = tokio::process::Command::new(agent)
        .args(["sandbox", "build-image", "--from-binary"])
        .arg(&binary)
        .args(["--tag", image])
        .output()
        .await
        .map_err(|e| DemoError::Setup(format!("cannot run {}: {e}", agent.display())))?;
    if !built.status.success() {
        return Err(DemoError::Setup(format!(
            "building the sandbox image failed: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        )));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Run the demo, writing what happens to `out`.
pub async fn run(opts: &DemoOptions, out: &mut (dyn Write + Send)) -> Result<(), DemoError> {
    let agent_bin = find_agent(opts.agent_bin.as_deref())?;
    let root = std::env::temp_dir().join(format!(
        "delegate-demo-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&root)
        .map_err(|e| DemoError::Setup(format!("cannot create {}: {e}", root.display())))?;
    let result = run_in(opts, &agent_bin, &root, out).await;
    if opts.keep {
        writeln!(out, "==> kept the demo data directory: {}", root.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn run_in(
    opts: &DemoOptions,
    agent_bin: &Path,
    root: &Path,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let dd = DataDir::new(root.join("cp"));
    let (agent_port, api_port) = (free_port()?, free_port()?);
    writeln!(out, "==> control plane in {}", dd.root.display())?;
    init::init(
        &dd,
        &InitOptions {
            agents: vec![AGENT_NAME.into()],
            agent_listen: Some(format!("127.0.0.1:{agent_port}")),
            api_listen: Some(format!("127.0.0.1:{api_port}")),
            sans: vec![],
        },
    )?;
    let running = crate::serve::start(&dd).await?;
    writeln!(
        out,
        "==> serving agents on {} and the API on {}",
        running.agent_addr, running.api_addr
    )?;
    ensure_image(agent_bin, &opts.image, out).await?;

    let agent_log = root.join("agent.log");
    let log = std::fs::File::create(&agent_log)?;
    let config = dd.root.join("agents").join(AGENT_NAME).join("agent.toml");
    if !opts.labels.is_empty() {
        add_sandbox_labels(&config, &opts.labels)?;
    }
    if !running_as_root() {
        set_firewall_off(&config)?;
        writeln!(out, "{FIREWALL_OFF_NOTE}")?;
    }
    let mut agent = tokio::process::Command::new(agent_bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("DELEGATE_SANDBOX__IMAGE", &opts.image)
        .env("DELEGATE_SANDBOX__PULL_POLICY", "never")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DemoError::Setup(format!("cannot start {}: {e}", agent_bin.display())))?;
    writeln!(out, "==> agent started (log: {})", agent_log.display())?;

    let result = async {
        let client = ApiClient::from_data_dir(&dd)?;
        wait_connected(&client, &agent_log, &mut agent).await?;
        writeln!(out, "==> agent {AGENT_NAME} connected over mutual TLS 1.3")?;

        let ws = root.join("workspaces").join("hello");
        std::fs::create_dir_all(&ws)?;
        std::fs::write(ws.join("main.tf"), HELLO_MAIN_TF)?;
        let args = SubmitArgs {
            dir: ws,
            op: "plan".into(),
            workspace: Some("hello".into()),
            ..Default::default()
        };
        let req = cli::build_submit(&args, |_| None)?;
        let plan: TaskView = client.post_json("/api/v1/tasks", &req).await?;
        writeln!(out, "==> plan task {} submitted; its logs:", plan.id)?;
        out.flush()?;
        let plan = cli::follow(&client, &plan.id, out).await?;
        expect_success(&plan)?;
        if let Some(s) = &plan.summary {
            writeln!(
                out,
                "==> plan succeeded: {} to add, {} to change, {} to destroy (plan sha256 {})",
                s.add,
                s.change,
                s.destroy,
                plan.plan_sha256.as_deref().unwrap_or("-")
            )?;
        }

        let apply: TaskView = client
            .post_json(
                &format!("/api/v1/tasks/{}/approve", plan.id),
                &serde_json::json!({}),
            )
            .await?;
        writeln!(
            out,
            "==> approved: apply task {} runs exactly that plan; its logs:",
            apply.id
        )?;
        out.flush()?;
        let apply = cli::follow(&client, &apply.id, out).await?;
        expect_success(&apply)?;
        writeln!(out, "==> apply succeeded; outputs:")?;
        if let Some(outputs) = apply
            .summary
            .as_ref()
            .and_then(|s| s.outputs.as_ref())
            .and_then(|o| o.as_object())
        {
            for (name, v) in outputs {
                writeln!(out, "    {name} = {}", v["value"])?;
            }
        }
        let versions = cli::state(&client, "hello", None, false).await?;
        writeln!(out, "==> state kept by the control plane:\n{versions}")?;
        Ok::<(), DemoError>(())
    }
    .await;

    // Stop the agent cleanly (it drains and removes its containers), then the control plane.
    if let Some(pid) = agent.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(60), agent.wait())
            .await
            .is_err()
        {
            let _ = agent.kill().await;
        }
    }
    running.shutdown().await;
    if result.is_err() {
        writeln!(out, "==> agent log (last lines):\n{}", tail(&agent_log, 30))?;
    } else {
        writeln!(out, "==> done: agent stopped, control plane stopped")?;
    }
    result
}

/// Printed when the demo agent runs without the host firewall.
const FIREWALL_OFF_NOTE: &str =
    "==> not running as root: the agent's host firewall rules need root or \
CAP_NET_ADMIN, so the demo agent runs with [egress] firewall = \"off\". Its sandboxes still go \
out only through the egress proxy, but nothing stops them from reaching other services listening \
on this host; run the demo as root to get the firewall.";

/// Whether this process's effective user is root (Linux: `/proc/self/status`). Anywhere that
/// cannot say, not root.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_uid(&s))
        == Some(0)
}

/// The effective uid from `/proc/self/status` text (`Uid:\treal\teffective\tsaved\tfs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
}

/// Edit the agent bundle's config: `edit` gets the named top-level table (created if absent).
fn edit_agent_config(
    config: &Path,
    section: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> Result<(), DemoError> {
    let text = std::fs::read_to_string(config)?;
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| DemoError::Setup(format!("{} is not valid TOML: {e}", config.display())))?;
    let table = doc
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(table) = table.as_table_mut() else {
        return Err(DemoError::Setup(format!(
            "{}: [{section}] is not a table",
            config.display()
        )));
    };
    edit(table);
    std::fs::write(config, doc.to_string())?;
    Ok(())
}

/// Put extra labels into the agent bundle's `[sandbox] labels`.
fn add_sandbox_labels(config: &Path, labels: &[(String, String)]) -> Result<(), DemoError> {
    let mut table = toml::Table::new();
    for (k, v) in labels {
        table.insert(k.clone(), toml::Value::String(v.clone()));
    }
    edit_agent_config(config, "sandbox", |sandbox| {
        sandbox.insert("labels".into(), toml::Value::Table(table));
    })
}

/// `[egress] firewall = "off"` in the agent bundle's config.
fn set_firewall_off(config: &Path) -> Result<(), DemoError> {
    edit_agent_config(config, "egress", |egress| {
        egress.insert("firewall".into(), toml::Value::String("off".into()));
    })
}

fn expect_success(t: &TaskView) -> Result<(), DemoError> {
    match t.outcome.as_deref() {
        Some("succeeded") => Ok(()),
        other => Err(DemoError::Setup(format!(
            "task {} ended {}{}",
            t.id,
            other.unwrap_or("without an outcome"),
            t.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ))),
    }
}

async fn wait_connected(
    client: &ApiClient,
    agent_log: &Path,
    agent: &mut tokio::process::Child,
) -> Result<(), DemoError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = agent.try_wait() {
            return Err(DemoError::Setup(format!(
                "the agent exited ({status}) before connecting:\n{}",
                tail(agent_log, 20)
            )));
        }
        let agents: Vec<serde_json::Value> = client.get_json("/api/v1/agents").await?;
        if agents
            .iter()
            .any(|a| a["name"] == AGENT_NAME && a["state"] == "connected")
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Setup(format!(
                "the agent did not connect within a minute:\n{}",
                tail(agent_log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_example_is_the_shipped_one() {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/main.tf"),
        )
        .unwrap();
        assert_eq!(shipped, HELLO_MAIN_TF);
        assert!(HELLO_MAIN_TF.contains("terraform_data"));
    }

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tdelegate-cp\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn firewall_off_is_written_into_the_agent_config_keeping_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("agent.toml");
        std::fs::write(
            &config,
            "name = \"demo\"\n[sandbox]\nimage = \"x\"\n[egress]\nallow = [\"a:443\"]\n",
        )
        .unwrap();
        set_firewall_off(&config).unwrap();
        add_sandbox_labels(&config, &[("gpu".into(), "no".into())]).unwrap();
        let doc: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
        assert_eq!(doc["egress"]["firewall"].as_str(), Some("off"));
        assert_eq!(doc["egress"]["allow"][0].as_str(), Some("a:443"));
        assert_eq!(doc["sandbox"]["image"].as_str(), Some("x"));
        assert_eq!(doc["sandbox"]["labels"]["gpu"].as_str(), Some("no"));
        assert_eq!(doc["name"].as_str(), Some("demo"));
        // Without an [egress] table: created.
        std::fs::write(&config, "name = \"demo\"\n").unwrap();
        set_firewall_off(&config).unwrap();
        let doc: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
        assert_eq!(doc["egress"]["firewall"].as_str(), Some("off"));
    }

    #[test]
    fn missing_explicit_agent_binary_is_named() {
        let err = find_agent(Some(Path::new("/nonexistent/delegate"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/delegate"));
    }
}
