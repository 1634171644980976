//! The `delegate-cp` binary's `keys` and `secrets` commands: offline key rotation and re-sealing,
//! `DELEGATE_CP_KEY` (used, never echoed), and the same commands against a served control plane
//! (secret values from standard input, names only listed, audited).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn cp_env(dd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_delegate-cp"));
    c.args(args)
        .env("DELEGATE_CP_DATA_DIR", dd)
        .env("RUST_LOG", "warn")
        .env_remove("DELEGATE_CP_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn cp(dd: &Path, args: &[&str]) -> Output {
    cp_env(dd, args, &[])
}

fn ok_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn local_ports(dd: &Path) {
    let cfg_path = dd.join("controlplane.toml");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:8444", "127.0.0.1:0");
    std::fs::write(&cfg_path, cfg).unwrap();
}

#[test]
fn offline_rotate_reseal_and_the_environment_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("cp");
    assert!(cp(&dd, &["init"]).status.success());
    local_ports(&dd); // nothing answers there: the commands work on the directory
    let keys: Vec<_> = std::fs::read_dir(dd.join("keys")).unwrap().collect();
    assert_eq!(keys.len(), 1, "init made one key");

    let r = ok_json(&cp(&dd, &["keys", "rotate", "--json"]));
    let new = r["key_id"].as_str().unwrap().to_string();
    assert_ne!(r["previous"], r["key_id"]);
    assert_eq!(
        std::fs::read_to_string(dd.join("keys/current"))
            .unwrap()
            .trim(),
        new
    );
    let r = ok_json(&cp(&dd, &["keys", "reseal", "--json"]));
    assert_eq!(r["key_id"], new.as_str());
    assert_eq!(r["failures"], serde_json::json!([]));

    // A malformed environment key is refused without being echoed.
    let bad = "zz-not-a-key-value-42";
    let out = cp_env(&dd, &["keys", "rotate"], &[("DELEGATE_CP_KEY", bad)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("environment key"), "{err}");
    assert!(!err.contains(bad), "{err}");

    // With no `current` file, the environment key is the current one.
    let dd2 = tmp.path().join("cp2");
    assert!(cp(&dd2, &["init"]).status.success());
    local_ports(&dd2);
    let hex_key = "5a".repeat(32);
    let r = ok_json(&cp_env(
        &dd2,
        &["keys", "rotate", "--json"],
        &[("DELEGATE_CP_KEY", &format!("ops1:{hex_key}"))],
    ));
    assert_eq!(r["previous"], "ops1");
    // The audit trail names the rotation and never holds key material.
    let db = std::fs::read(dd2.join("cp.db")).unwrap();
    assert!(!db.windows(hex_key.len()).any(|w| w == hex_key.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_secrets_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("cp");
    assert!(cp(&dd, &["init"]).status.success());
    local_ports(&dd);
    let child = Command::new(env!("CARGO_BIN_EXE_delegate-cp"))
        .args(["serve", "--data-dir"])
        .arg(&dd)
        .env("RUST_LOG", "warn")
        .env_remove("DELEGATE_CP_KEY")
        .spawn()
        .unwrap();
    let _serve = Serve(child);
    for _ in 0..1000 {
        if dd.join("listen.json").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The value from standard input: never on the command line, never printed.
    let value = "stdin-secret-value-314159";
    let mut set = Command::new(env!("CARGO_BIN_EXE_delegate-cp"))
        .args(["secrets", "set", "prod", "DB_PASSWORD"])
        .env("DELEGATE_CP_DATA_DIR", &dd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(value));
    let from_env = cp_env(
        &dd,
        &["secrets", "set", "prod", "API_KEY", "--from-env", "MY_KEY"],
        &[("MY_KEY", "env-secret-value-2718")],
    );
    assert!(from_env.status.success());
    let short = cp(&dd, &["secrets", "set", "prod", "PIN", "--value", "123"]);
    assert!(!short.status.success());
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(err.contains("PIN") && err.contains("shorter"), "{err}");

    let list = ok_json(&cp(&dd, &["secrets", "list", "prod", "--json"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["API_KEY", "DB_PASSWORD"]);
    assert!(!list.to_string().contains(value));
    assert!(cp(&dd, &["secrets", "rm", "prod", "API_KEY"])
        .status
        .success());

    // Keys through the running control plane: audited as the API's doing.
    let r = ok_json(&cp(&dd, &["keys", "rotate", "--json"]));
    let r2 = ok_json(&cp(&dd, &["keys", "reseal", "--json"]));
    assert_eq!(r2["key_id"], r["key_id"]);
    assert_eq!(r2["values_resealed"], 1, "the stored secret: {r2}");
    let audit = ok_json(&cp(&dd, &["audit", "--json"]));
    let actions: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                a["who"].as_str().unwrap(),
                a["action"].as_str().unwrap()
            )
        })
        .collect();
    for a in [
        "api secret.set",
        "api secret.removed",
        "api keys.rotated",
        "api keys.resealed",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} missing: {actions:?}");
    }
    assert!(!audit.to_string().contains(value));
}
