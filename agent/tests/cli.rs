//! The `delegate` binary's commands that need no control plane and no Docker: `version`,
//! `config check`, and `run` refusing a bad configuration.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::Path;
use std::process::{Command, Output};

fn delegate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_delegate"));
    cmd.args(args);
    // Only the variables a test sets: the caller's DELEGATE_* must not leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("DELEGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bundle like `delegate-cp init` writes: CA, agent certificate and key, agent.toml.
fn bundle(dir: &Path) -> std::path::PathBuf {
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "cli test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["runner-1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "runner-1");
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("agent.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("agent.key"), key.serialize_pem()).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        r#"data_dir = "data"
[control_plane]
url = "wss://127.0.0.1:8443/v1/agent"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[agent]
name = "runner-1"
pool = "default"
slots = 2
[sandbox]
image = "delegate-sandbox:local"
pull_policy = "if-missing"
[log]
level = "info"
format = "text"
"#,
    )
    .unwrap();
    config
}

#[test]
fn version_names_the_protocol() {
    let out = delegate(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("delegate {} (protocol v1)", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_check_accepts_a_good_bundle_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = bundle(dir.path());
    let out = delegate(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "config OK");
    assert!(
        !dir.path().join("data").exists(),
        "check must not create anything"
    );
}

#[test]
fn config_check_lists_every_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = bundle(dir.path());
    let bad = std::fs::read_to_string(&config)
        .unwrap()
        .replace("wss://", "http://")
        .replace("slots = 2", "slots = 0\ncolour = \"red\"");
    std::fs::write(&config, bad).unwrap();
    let out = delegate(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[("DELEGATE_SANDBOX__PULL_POLICY", "sometimes")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for key in [
        "control_plane.url: only wss:// URLs are accepted, got http://",
        "agent.slots:",
        "agent.colour:",
        "sandbox.pull_policy:",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn config_check_reads_the_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = bundle(dir.path());
    std::fs::write(dir.path().join("agent.key"), "not a key\n").unwrap();
    std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
    let out = delegate(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("control_plane.ca_file:") && err.contains("ca.pem"),
        "{err}"
    );
    assert!(
        err.contains("control_plane.key_file:") && err.contains("agent.key"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = bundle(dir.path());
    let out = delegate(
        &["run", "--config", config.to_str().unwrap()],
        &[("DELEGATE_CONTROL_PLANE__URL", "ws://127.0.0.1:1/v1/agent")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("control_plane.url"), "{err}");

    let out = delegate(&["run", "--config", "/nonexistent/agent.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/agent.toml"));
}
