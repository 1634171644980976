//! `delegate keys rotate|reseal --config FILE` against a real spool directory.

use bytes::Bytes;
use delegate_agent::spool::record::RecordBody;
use delegate_agent::spool::{keys, Spool, SpoolSettings};
use delegate_agent::tasks::WireFrame;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use uuid::Uuid;

const MARKER: &str = "keys-cli-marker-41d9";

fn delegate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_delegate"));
    cmd.args(args);
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

fn config(dir: &Path) -> PathBuf {
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
"#,
    )
    .unwrap();
    config
}

fn spool(data: &Path) -> (Spool, Vec<delegate_agent::spool::LoadedTask>) {
    Spool::open(
        SpoolSettings::new(keys::spool_dir(data)),
        keys::load_existing(data, None).unwrap(),
    )
    .unwrap()
}

fn write_frames(data: &Path, task: Uuid, n: u64) {
    let (s, _) = spool(data);
    let mut t = s.task(task);
    for seq in 1..=n {
        t.append(
            &[RecordBody::Frame {
                seq,
                frame: WireFrame::Binary(Bytes::from(format!("{MARKER} {seq}\n"))),
                done: false,
            }],
            false,
        )
        .unwrap();
    }
}

#[test]
fn rotate_then_reseal_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let cfg = config.to_str().unwrap();
    let data = dir.path().join("data");

    let out = delegate(&["keys", "rotate", "--config", cfg], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("new current key"));
    let first = keys::load_existing(&data, None)
        .unwrap()
        .current_id()
        .to_string();
    let task = Uuid::from_u128(7);
    write_frames(&data, task, 5);

    let out = delegate(&["keys", "rotate", "--config", cfg], &[]);
    assert!(out.status.success());
    let second = keys::load_existing(&data, None)
        .unwrap()
        .current_id()
        .to_string();
    assert_ne!(first, second);

    // While the agent (here: this process) holds the spool, reseal refuses.
    {
        let _held = spool(&data);
        let out = delegate(&["keys", "reseal", "--config", cfg], &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("is the agent running"),
            "{}",
            text(&out.stderr)
        );
    }

    let out = delegate(&["keys", "reseal", "--config", cfg], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("1 rewritten"), "{said}");
    assert!(said.contains(&format!("under key {second}")), "{said}");

    // The old key is no longer needed.
    std::fs::remove_file(keys::key_dir(&data).join(format!("{first}.key"))).unwrap();
    let (_s, loaded) = spool(&data);
    assert_eq!(loaded.len(), 1);
    assert!(loaded[0].broken.is_none(), "{:?}", loaded[0].broken);
    assert_eq!(loaded[0].frames.len(), 5);
}

#[test]
fn reseal_reports_a_damaged_file_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let cfg = config.to_str().unwrap();
    let data = dir.path().join("data");
    assert!(delegate(&["keys", "rotate", "--config", cfg], &[])
        .status
        .success());
    write_frames(&data, Uuid::from_u128(8), 2);
    let seg = std::fs::read_dir(keys::spool_dir(&data).join(Uuid::from_u128(8).to_string()))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    assert!(delegate(&["keys", "rotate", "--config", cfg], &[])
        .status
        .success());
    let out = delegate(&["keys", "reseal", "--config", cfg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&seg.display().to_string()), "{err}");
    assert!(err.contains("integrity"), "{err}");
}

#[test]
fn an_environment_key_seals_without_a_key_file_and_a_bad_one_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let cfg = config.to_str().unwrap();
    let key = format!("ops:{}", "5a".repeat(32));
    let out = delegate(
        &["keys", "reseal", "--config", cfg],
        &[("DELEGATE_SPOOL_KEY", &key)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("0 rewritten"));
    let out = delegate(
        &["keys", "reseal", "--config", cfg],
        &[("DELEGATE_SPOOL_KEY", "not-a-key-value")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!text(&out.stderr).contains("not-a-key-value"));
    let out = delegate(
        &["keys", "rotate", "--config", "/nonexistent/agent.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}
