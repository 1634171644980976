//! Real `delegate-cp` and `delegate` processes for tests.

use crate::net::free_port;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Build the workspace binaries once per test process (a no-op when up to date) and return the
/// directory holding them.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test-binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "-p", "delegate-agent", "-p"])
            .arg("delegate-controlplane")
            .arg("--manifest-path")
            .arg(&manifest);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "building the delegate binaries failed");
        profile_dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "binary {} not found", p.display());
    p
}

/// A control plane data dir plus, while running, its `serve` process.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub agent_port: u16,
    pub api_port: u16,
    serve: Option<Child>,
    log_path: PathBuf,
}

impl ControlPlane {
    /// `delegate-cp init` with the given agents on fresh loopback ports. `heartbeat_ms` overrides the
    /// heartbeat interval so liveness tests run quickly.
    pub fn init(agents: &[&str], heartbeat_ms: Option<u64>) -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("delegate-cp-")
            .tempdir()
            .unwrap();
        let agent_port = free_port();
        let api_port = free_port();
        let mut cmd = Command::new(bin("delegate-cp"));
        cmd.arg("init")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"));
        for a in agents {
            cmd.arg("--agent").arg(a);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "delegate-cp init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(ms) = heartbeat_ms {
            let path = dir.path().join("controlplane.toml");
            let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
            doc.insert(
                "heartbeat_interval_ms".into(),
                toml::Value::Integer(ms as i64),
            );
            std::fs::write(&path, doc.to_string()).unwrap();
        }
        let log_path = dir.path().join("serve.log");
        ControlPlane {
            dir,
            agent_port,
            api_port,
            serve: None,
            log_path,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.path().join("agents").join(name)
    }

    /// Start `delegate-cp serve` and wait until its API answers.
    pub async fn start(&mut self) {
        assert!(self.serve.is_none(), "control plane already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(bin("delegate-cp"))
            .arg("serve")
            .arg("--data-dir")
            .arg(self.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.serve = Some(child);
        let me = &*self;
        crate::eventually(
            "control plane API answers",
            Duration::from_secs(30),
            || async {
                if let Some(status) = me.exited_status() {
                    return Err(format!("serve exited with {status}: {}", me.log()));
                }
                let out = me.cli(&["agents", "--json"]);
                Ok(out.status.success())
            },
        )
        .await;
    }

    fn exited_status(&self) -> Option<String> {
        // try_wait needs &mut; read /proc instead to keep &self.
        let pid = self.serve.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.split_whitespace()
            .nth(2)
            .filter(|s| *s == "Z")
            .map(|_| "zombie".to_string())
    }

    /// Stop `serve` with SIGTERM (or SIGKILL) and wait for it.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.serve.take() {
            signal(&child, if kill { libc::SIGKILL } else { libc::SIGTERM });
            let _ = wait_timeout(&mut child, Duration::from_secs(15)).or_else(|| {
                let _ = child.kill();
                child.wait().ok()
            });
        }
    }

    pub async fn restart(&mut self) {
        self.stop(false);
        self.start().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Run a `delegate-cp` CLI command against this data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("delegate-cp"))
            .args(args)
            .env("DELEGATE_CP_DATA_DIR", self.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Run a CLI command that must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "delegate-cp {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "delegate-cp {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The `agents --json` entry for `name`, if listed.
    pub fn agent(&self, name: &str) -> Option<Value> {
        let out = self.cli(&["agents", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().find(|a| a["name"] == name).cloned()
    }

    pub fn agent_state(&self, name: &str) -> Option<String> {
        self.agent(name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }

    pub fn audit(&self) -> Vec<Value> {
        match self.cli_json(&["audit", "--json"]) {
            Value::Array(a) => a,
            other => panic!("audit --json is not an array: {other}"),
        }
    }

    /// Audit records whose action is `action`.
    pub fn audit_actions(&self, action: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["action"] == action)
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop(true);
        if std::thread::panicking() {
            eprintln!("---- control plane log ----\n{}", self.log());
        }
    }
}

/// A running `delegate run` process.
pub struct RunningAgent {
    pub name: String,
    pub config: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
}

impl RunningAgent {
    /// Start `delegate run --config <bundle>/agent.toml` with extra environment.
    pub fn start(config: &Path, name: &str, env: &[(&str, &str)]) -> RunningAgent {
        let log_path =
            config.with_file_name(format!("agent-{}.log", uuid::Uuid::new_v4().simple()));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(bin("delegate"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        RunningAgent {
            name: name.into(),
            config: config.into(),
            child: Some(cmd.spawn().unwrap()),
            log_path,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    /// Wait for the process to exit; returns its exit code (None if killed by a signal or still running).
    pub fn wait(&mut self, within: Duration) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        let status = wait_timeout(child, within)?;
        self.child = None;
        Some(status.code())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.name, self.log());
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // Safety is not a concern here: kill(2) on our own child's pid.
    let pid = child.id() as i32;
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wait_timeout(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Edit an agent.toml in place (e.g. add sandbox labels or change the URL).
pub fn edit_toml(path: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let mut doc: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    edit(&mut doc);
    std::fs::write(path, doc.to_string()).unwrap();
}

/// Get or create a sub-table.
pub fn table<'a>(doc: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    doc.entry(key.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
}
