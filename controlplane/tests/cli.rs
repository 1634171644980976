//! The `delegate-cp` binary: init, serve as a child process, the CLI's output shapes, SIGTERM.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

fn cp(dd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_delegate-cp"))
        .args(args)
        .env("DELEGATE_CP_DATA_DIR", dd)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(path: &Path) {
    for _ in 0..1000 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_serve_cli_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("cp");
    let out = cp(&dd, &["init", "--agent", "a1", "--san", "cp.test"]);
    assert!(stdout(&out).contains("agents/a1/agent.toml"));
    let toml = std::fs::read_to_string(dd.join("agents/a1/agent.toml")).unwrap();
    assert!(
        toml.contains("url = \"wss://cp.test:8443/v1/agent\""),
        "{toml}"
    );

    // Twice: refused, nothing overwritten.
    let key_before = std::fs::read(dd.join("tls/ca.key")).unwrap();
    let again = cp(&dd, &["init", "--agent", "a1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a control plane"));
    assert_eq!(std::fs::read(dd.join("tls/ca.key")).unwrap(), key_before);

    // A bad config key is named.
    let cfg_path = dd.join("controlplane.toml");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, format!("{good}bogus_key = 1\n")).unwrap();
    let bad = cp(&dd, &["serve"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bogus_key"));

    let cfg = good
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:8444", "127.0.0.1:0");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_delegate-cp"))
        .args(["serve", "--data-dir"])
        .arg(&dd)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut serve = Serve(child);
    let listen = dd.join("listen.json");
    wait_for(&listen).await;

    assert_eq!(json(&cp(&dd, &["agents", "--json"])), serde_json::json!([]));
    assert!(stdout(&cp(&dd, &["agents"])).starts_with("NAME"));

    // A raw agent connects; `agents --json` has exactly the documented keys.
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&listen).unwrap())
            .unwrap()["agent"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let bundle = dd.join("agents/a1");
    let cert = std::fs::read_to_string(bundle.join("agent.pem")).unwrap();
    let key = std::fs::read_to_string(bundle.join("agent.key")).unwrap();
    let cfg = client_config(
        &bundle.join("ca.pem"),
        Some((&cert, &key)),
        &rustls::version::TLS13,
    );
    let mut ws = connect_with(addr, cfg, "/v1/agent").await.unwrap();
    send(&mut ws, &hello_with("a1", 1, vec![])).await;
    assert!(matches!(
        recv_msg(&mut ws).await,
        delegate_protocol::Message::Welcome(_)
    ));
    let agents = json(&cp(&dd, &["agents", "--json"]));
    let a = &agents[0];
    let mut keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "labels",
            "last_heartbeat",
            "name",
            "pool",
            "state",
            "version"
        ]
    );
    assert_eq!(a["state"], "connected");

    // submit --json prints {"id": ...}; show --json carries state (and no outcome yet).
    let work = tmp.path().join("hello");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("main.tf"), "output \"x\" { value = 1 }\n").unwrap();
    let out = cp(
        &dd,
        &[
            "submit",
            work.to_str().unwrap(),
            "--op",
            "plan",
            "--var",
            "a=b",
            "--secret",
            "TOKEN=hunter2-secret",
            "--json",
        ],
    );
    let id = json(&out)["id"].as_str().unwrap().to_string();
    let shown = json(&cp(&dd, &["show", &id, "--json"]));
    assert_eq!(shown["workspace"], "hello");
    assert_eq!(shown["op"], "plan");
    assert!(shown.get("outcome").is_none(), "{shown}");
    for k in [
        "id",
        "state",
        "reason",
        "summary",
        "agent",
        "created_at",
        "started_at",
        "finished_at",
        "plan_sha256",
        "pool",
    ] {
        assert!(shown.get(k).is_some(), "{k} missing from {shown}");
    }
    assert!(!shown.to_string().contains("hunter2"));
    assert_eq!(
        json(&cp(&dd, &["tasks", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The agent got it (one slot); cancel asks it to stop.
    let assign = recv_msg(&mut ws).await;
    assert!(matches!(assign, delegate_protocol::Message::Assign(_)));
    let out = stdout(&cp(&dd, &["cancel", &id]));
    assert!(out.contains("cancelled"), "{out}");
    let shown = json(&cp(&dd, &["show", &id, "--json"]));
    assert_eq!(shown["outcome"], "cancelled");
    let failed = cp(&dd, &["approve", &id]);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("only a succeeded plan"));
    assert!(stdout(&cp(&dd, &["audit", "--verify"])).contains("intact"));
    let audit = json(&cp(&dd, &["audit", "--task", &id, "--json"]));
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["action"] == "task.submitted"));

    // SIGTERM: exit 0, the agent shown disconnected, listen.json gone.
    kill_term(serve.0.id());
    let status = serve.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!listen.exists());
    let store =
        delegate_controlplane::store::Store::open(&dd.join("cp.db"), Default::default()).unwrap();
    assert_eq!(store.agents().unwrap()[0].state, "disconnected");
    let unreachable = cp(&dd, &["agents"]);
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the control plane"));
}

/// SIGTERM to our own child, by its id.
fn kill_term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
